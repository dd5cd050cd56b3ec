#!/usr/bin/env bash
# The showcase sweep on the embedded digits: schedulers x freeze depths, one MLflow parent run.
# Extra arguments go to Hydra:  ./multirun.sh trainer.max_epochs=8 model=mobilenet_v3_small
set -euo pipefail
cd "$(dirname "$0")"
python train.py -m scheduler=step,cosine freeze.depth=0,2,4 trainer.max_epochs=4 trainer.progress=false "$@"
echo
echo "Look at the runs:  mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db"

#!/usr/bin/env bash
# The showcase sweep on the embedded digits: 5 schedulers x 4 freeze depths (0, 2, 4 and -1 = head
# only), resnet18, 6 epochs each; about 10 minutes on 2 CPU cores. One MLflow parent run holds the
# comparison; each job is a child run. Extra arguments go to Hydra:
#   ./multirun.sh trainer.max_epochs=10 model=mobilenet_v3_small
#   ./multirun.sh seed=0,1,2                      # repeat every configuration over three seeds
#   ./multirun.sh hydra/launcher=joblib hydra.launcher.n_jobs=2
set -euo pipefail
cd "$(dirname "$0")"
python train.py -m \
    scheduler=step,cosine,onecycle,plateau,cosine_restarts \
    freeze.depth=0,2,4,-1 \
    trainer.max_epochs=6 \
    trainer.progress=false \
    logger.log_model=false \
    "$@"
sweep=$(ls -td outputs/multirun/*/*/ 2>/dev/null | head -n 1)
echo
echo "The comparison: ${sweep}comparison.png (table: ${sweep}comparison.md)"
echo "Look at the runs:  mlflow ui --backend-store-uri ${MLFLOW_TRACKING_URI:-sqlite:///outputs/mlflow.db}"

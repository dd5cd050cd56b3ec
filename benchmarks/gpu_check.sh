#!/usr/bin/env bash
# The GPU checks behind BENCHMARKS.md's GPU figures, in one go, on a machine with a CUDA GPU:
#
#   bash benchmarks/gpu_check.sh [OUTDIR] [BUDGET_SECONDS] [bench_gpu.py options...]
#
# 1. images/s of resnet18 and resnet50 at 224 px, tunelab's loop against the bare loop, for every
#    precision / channels_last / compile option (benchmarks/bench_gpu.py);
# 2. the GPU tests (tests/test_performance_options.py: every option trains on the GPU, in-memory
#    data moved there once);
# 3. `python train.py` on the GPU with bf16-mixed and channels_last, timed as a whole process.
# On a machine without network, wheels of what it lacks (Hydra, MLflow) may lie in .whl/: they are
# installed into /tmp/site first. Each part writes its output to OUTDIR.
set -u
out=${1:-gpu-results}
budget=${2:-200}
shift 2 2>/dev/null || shift $#
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, torchvision, mlflow, hydra; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'mlflow', mlflow.__version__, 'hydra', hydra.__version__)"

echo "== 1. images/s (bench_gpu.py, budget ${budget} s)"
python3 benchmarks/bench_gpu.py --compile --budget "$budget" "$@" --json "$out/gpu.json" 2>&1 | tr '\r' '\n' | grep -v 'it/s\]\|s/it\]\|^\s*$' > "$out/bench.txt"
grep -v 'Warning\|warn(' "$out/bench.txt" | tail -16

echo "== 2. GPU tests"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_performance_options.py -k gpu > "$out/pytest.txt" 2>&1
tail -4 "$out/pytest.txt"

echo "== 3. python train.py on the GPU, whole process"
TIMEFORMAT='whole process %R s'
time timeout 90 python3 train.py trainer.precision=bf16-mixed trainer.channels_last=true trainer.max_epochs=4 trainer.progress=false \
  hydra.run.dir=/tmp/gpu-run > "$out/train.txt" 2>&1
echo "exit $?"
grep -E 'Training:|epoch [0-9]/|Best|Error|WARN' "$out/train.txt" | cut -c1-300 | tail -8

#!/usr/bin/env bash
# Every GPU check in one command on one H100/H200, each stage under its own time limit (`stage` below):
#   1. the tests marked `gpu` (fractional-GPU search, DDP search with 2+ GPUs, CUDA checkpoint
#      through the export against onnxruntime on the CPU, finite bf16 metrics);
#   2. bench_train.py on the GPU: plain PyTorch against raylocal's loop, torch.compile, evaluation
#      batch sizes, and K trainers sharing the GPU;
#   3. the default search, `python -m raylocal.tune --trials 50 --no-final`, timed as a whole command
#      (the search alone, as measured before the final phase existed), then the default command
#      with its final phase capped at 10 epochs (`--final-epochs 10`);
# then one table of what was measured. Logs go to $OUT (else experiments/gpu_check_out).
#
#   RAYLOCAL_DATA_DIR=/path/to/mnist bash experiments/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/gpu_check_out}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
export PYTHONUNBUFFERED=1
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: PyTorch sees no CUDA GPU here; nothing to check" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local status=${PIPESTATUS[0]}
  echo "$status $((SECONDS - started))" > "$out/$name.status"
  echo "=== $name: exit $status after $((SECONDS - started))s"
}

stage tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
stage bench_train 160 python3 experiments/bench_train.py --device cuda --concurrent 1,4,8,16
stage search 240 python3 -m raylocal.tune --trials 50 --no-final --name gpu-check --storage "$out/results" --quiet
stage final 300 python3 -m raylocal.tune --trials 50 --final-epochs 10 --name gpu-final --storage "$out/results" --quiet

python3 experiments/gpu_table.py "$out"

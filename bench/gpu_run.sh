#!/usr/bin/env bash
# One full call on a lent GPU machine: build fusetune._C, run the GPU test tier, time the kernels
# and (when workloads are named) the end-to-end training steps. Logs and JSON go to $OUT.
#   bash bench/gpu_run.sh [W1,W2]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 -m fusetune.cli env
python3 -m pytest -m gpu -q -rfs 2>&1 | tee "$out/gpu-tests.log" | tail -25
python3 bench/kernels.py 2>&1 | tee "$out/kernels.log" | tail -40
python3 bench/nf4_dequant.py 2>&1 | tee "$out/nf4-dequant.log" | tail -12
python3 bench/nf4_gemv.py 2>&1 | tee "$out/nf4-gemv.log" | tail -40
if [ -n "${1:-}" ]; then
  python3 bench/e2e.py --repeat 2 --workloads "$1" 2>&1 | tee "$out/e2e.log" | tail -25
fi

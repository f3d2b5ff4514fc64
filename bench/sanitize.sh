#!/usr/bin/env bash
# compute-sanitizer's memcheck and racecheck over every op of the CUDA extension (csrc/), on a lent
# GPU machine: the ops' tests that run the "cuda" backend, at their small odd shapes (the
# sanitizer slows kernels down a hundredfold). Exit code 1 on the first error either tool reports.
#   bash bench/sanitize.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
tests=(tests/ops/test_cuda_extension.py tests/ops/test_glu.py tests/ops/test_rope.py tests/ops/test_cross_entropy.py
       tests/ops/test_linear_cross_entropy.py tests/ops/test_nf4_gemv.py tests/quant/test_nf4.py tests/lora/test_mlp.py)
status=0
for tool in memcheck racecheck; do
  echo "---- compute-sanitizer --tool $tool ----"
  compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
    python3 -m pytest -q -x -k cuda "${tests[@]}" 2>&1 | tee "$out/sanitize-$tool.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit "$status"

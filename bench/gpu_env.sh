# Sourced at the start of every command on a lent GPU machine (bench/gpu_run.sh does it):
#   source bench/gpu_env.sh
# The machine has no network, so nothing is pip-installed: the extension is built in place with
# the system compiler (the image's own g++ gives a .so that crashes on TORCH_CHECK messages).
# The packages the image lacks (bitsandbytes, for the QLoRA workloads W4-W7) come in a tarball
# made here with `bash ../shared/tools/pack-gpu-extras.sh .gpu` (carry .gpu); it is unpacked to
# /tmp/site and put on PYTHONPATH. Sets $out (logs and JSON: $OUT when the device tool sets it).
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ CC=/usr/bin/gcc
out=${OUT:-/tmp/fusetune-out}
mkdir -p "$out"
if [ -f .gpu/gpu-extras.tar.gz ]; then
  mkdir -p /tmp/site && tar xzf .gpu/gpu-extras.tar.gz -C /tmp/site \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} && echo "unpacked .gpu/gpu-extras.tar.gz to /tmp/site"
else
  echo "no .gpu/gpu-extras.tar.gz (make it with: bash ../shared/tools/pack-gpu-extras.sh .gpu):" \
       "no bitsandbytes, so the QLoRA workloads W4-W7 report an error row"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if FUSETUNE_BUILD_CUDA=1 python3 setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  echo "built fusetune._C"
else
  echo "building fusetune._C failed:"; tail -30 "$out/build.log"
fi
ln -sfn ../../triton_kernels python/fusetune/triton_kernels
export PYTHONPATH=$PWD/python:$PWD:${PYTHONPATH:-}

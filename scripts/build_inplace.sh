#!/usr/bin/env bash
# Builds the kernel packages' CUDA extensions in place, without pip (so it also works offline and without
# build isolation); the packages are then used from the working tree through PYTHONPATH.
# Architectures: those of the GPUs found, unless TORCH_CUDA_ARCH_LIST is set (e.g. "8.0;9.0+PTX").
# Parallel compile jobs: MAX_JOBS (default: the number of CPUs). The CPU scan kernel is skipped unless
# MAMBA_SKIP_CPU_BUILD=FALSE (the GPU tests and benchmarks do not need it).
# Usage: bash scripts/build_inplace.sh LOGFILE [PACKAGE_DIR ...]   (default: both packages of this tree;
# on failure the log's tail is printed and the exit status is non-zero)
set -uo pipefail
cd "$(dirname "$0")/.." || exit
log=${1:?usage: build_inplace.sh LOGFILE [PACKAGE_DIR ...]}
shift
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(causal-conv1d mamba-1p1p1)

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch
print(';'.join(sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))")
  if [ -z "$TORCH_CUDA_ARCH_LIST" ]; then
    echo "build_inplace.sh: no CUDA GPU found; set TORCH_CUDA_ARCH_LIST (e.g. 9.0) to build for another machine" >&2
    exit 1
  fi
fi
if [ -z "${CUDA_HOME:-}" ]; then
  if ! nvcc=$(command -v nvcc); then
    echo "build_inplace.sh: nvcc not found; install the CUDA toolkit or set CUDA_HOME" >&2
    exit 1
  fi
  CUDA_HOME=$(dirname "$(dirname "$nvcc")")
fi
export TORCH_CUDA_ARCH_LIST CUDA_HOME MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CPU_BUILD=${MAMBA_SKIP_CPU_BUILD:-TRUE}
echo "building ${packages[*]} for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS (log: $log)"
for pkg in "${packages[@]}"; do
  (cd "$pkg" && python3 setup.py build_ext --inplace) >>"$log" 2>&1 || { tail -40 "$log"; exit 1; }
done

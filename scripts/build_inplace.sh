#!/usr/bin/env bash
# Builds both CUDA extensions in place for sm_90 (the device machines' H100/H200), for the GPU check
# scripts: no pip, since the device machine has no network and setuptools' develop re-invokes pip with
# build isolation; the packages are then used from the working tree through PYTHONPATH.
# Usage: bash scripts/build_inplace.sh LOGFILE [PACKAGE_DIR ...]   (default: both packages of the tree;
# exit status non-zero, and the log's tail printed, on failure)
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:?usage: build_inplace.sh LOGFILE [PACKAGE_DIR ...]}
shift
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(causal-conv1d mamba-1p1p1)
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0
export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CPU_BUILD=TRUE
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
# The device image sets CC/CXX to /opt/gcc wrappers whose extensions link libstdc++ statically: a C++
# error thrown inside such an extension crashes the interpreter instead of raising RuntimeError
# (tests/gpu/exception_check/run.sh shows it). Build with the system compiler instead.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
for pkg in "${packages[@]}"; do
  (cd "$pkg" && python3 setup.py build_ext --inplace) >>"$log" 2>&1 || { tail -40 "$log"; exit 1; }
done

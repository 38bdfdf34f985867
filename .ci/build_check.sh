#!/usr/bin/env bash
# Force-builds both CUDA extensions (causal_conv1d_cuda, selective_scan_cuda) and the standalone
# benchmarks/kernel_timer.cu on a machine with nvcc and a CUDA build of torch but no GPU, so that a build
# break never lands. Builds into a temporary directory (the working tree's in-place .so files are left
# alone) for the default architectures (sm_80, sm_90 + PTX) unless TORCH_CUDA_ARCH_LIST is set. Prints the
# time it took.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
export MAMBA_SKIP_CPU_BUILD=TRUE  # scripts/setup.sh has built and tested the CPU extension already
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
for pkg in causal-conv1d mamba-1p1p1; do
  echo "== building $pkg"
  (cd "$pkg" && python setup.py -q build_ext --build-temp "$tmp/$pkg/temp" --build-lib "$tmp/$pkg/lib") \
    >"$tmp/$pkg.log" 2>&1 || { tail -60 "$tmp/$pkg.log"; echo "BUILD FAILED: $pkg"; exit 1; }
done
# The built modules must load and register a CUDA kernel for every op the Python packages call (the ops are
# defined across several source files; a file left out of the build would only show on a GPU).
PYTHONPATH="$tmp/causal-conv1d/lib:$tmp/mamba-1p1p1/lib" python - <<'PY'
import torch, causal_conv1d_cuda, selective_scan_cuda
expected = {"causal_conv1d_cuda": ("fwd", "bwd", "bi_fwd", "bi_bwd"),
            "selective_scan_cuda": ("fwd", "bwd", "bi_fwd", "bi_bwd", "add_rms_norm", "conv_x_proj")}
missing = [f"{lib}::{op}" for lib, ops in expected.items() for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{lib}::{op}", "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print("extensions load, every op has its CUDA kernel:", causal_conv1d_cuda.__file__, selective_scan_cuda.__file__,
      sep="\n  ")
PY
# The standalone kernel timer includes the kernels' sources directly: it must keep compiling with them
# (for sm_90, the GPUs it is run on).
"$CUDA_HOME/bin/nvcc" -O3 -std=c++17 -arch=sm_90 -I mamba-1p1p1/csrc/selective_scan -I mamba-1p1p1/csrc/conv_x_proj \
  -o "$tmp/kernel_timer" \
  benchmarks/kernel_timer.cu \
  || { echo "BUILD FAILED: benchmarks/kernel_timer.cu"; exit 1; }
echo "build_check: both extensions and the kernel timer built in $(( $(date +%s) - start )) s (MAX_JOBS=$MAX_JOBS, archs ${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX})"

#!/usr/bin/env bash
# GPU check, meant for one `run` call on the device machine (see /work/.library/device):
# builds both extensions in place for sm_90 only, runs the GPU tests, runs the kernel benchmark,
# and writes the logs under $OUT (default ./gpu_check_out). Usage: bash scripts/gpu_check.sh [bench args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0
export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CPU_BUILD=TRUE
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
# The device image sets CC/CXX to /opt/gcc wrappers whose extensions link libstdc++ statically: a C++
# error thrown inside such an extension crashes the interpreter instead of raising RuntimeError
# (tests/gpu/exception_check/run.sh shows it). Build with the system compiler instead.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.log"

if [ "${GPU_CHECK_EXC_DIAG:-0}" != 0 ]; then
  bash tests/gpu/exception_check/run.sh /tmp/exc_check > "$OUT/exc_diag.log" 2>&1 &
  diag_pid=$!
fi
start=$(date +%s)
# In-place builds (no pip: the device machine has no network, and setuptools' develop re-invokes pip
# with build isolation); the packages are then used from the working tree through PYTHONPATH.
rc=0
for pkg in causal-conv1d mamba-1p1p1; do
  (cd $pkg && python3 setup.py build_ext --inplace) >>"$OUT/build.log" 2>&1 || rc=$?
done
export PYTHONPATH=$PWD/causal-conv1d:$PWD/mamba-1p1p1:$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi

if [ -n "${diag_pid:-}" ]; then wait $diag_pid; cat "$OUT/exc_diag.log"; fi
python3 -m pytest tests/gpu -x -q ${PYTEST_ARGS:-} -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
echo "pytest rc=$test_rc" | tee -a "$OUT/env.log"

bench_rc=0
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  python3 benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json" "$@" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
echo "bench rc=$bench_rc" | tee -a "$OUT/env.log"
exit $(( test_rc != 0 ? test_rc : bench_rc ))

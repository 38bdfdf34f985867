#!/usr/bin/env bash
# GPU check, meant for one `run` call on the device machine (see /work/.library/device):
# builds both extensions in place for sm_90 only, runs the GPU tests, runs the kernel benchmark,
# and writes the logs under $OUT (default ./gpu_check_out). Usage: bash scripts/gpu_check.sh [bench args]
# GPU_CHECK_BENCH=0 skips the benchmark. GPU_CHECK_BASE_TREE=DIR (an older tree's causal-conv1d,
# mamba-1p1p1 and vim, e.g. `git archive REV causal-conv1d mamba-1p1p1 vim | tar -x -C DIR`) builds that
# tree while the tests run, then times both trees' scan kernels (benchmarks/profile_scan.py --time, and
# benchmarks/kernel_timer_ab.sh at the model's shapes, outputs compared) and Vim end to end
# (benchmarks/compare_trees.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
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
bash scripts/build_inplace.sh "$OUT/build.log"
rc=$?
export PYTHONPATH=$PWD/causal-conv1d:$PWD/mamba-1p1p1:$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
if [ $rc -ne 0 ]; then exit $rc; fi

if [ -n "${diag_pid:-}" ]; then wait $diag_pid; cat "$OUT/exc_diag.log"; fi
if [ -n "${GPU_CHECK_BASE_TREE:-}" ]; then
  base=$(realpath "$GPU_CHECK_BASE_TREE")
  bash scripts/build_inplace.sh "$OUT/base_build.log" "$base/causal-conv1d" "$base/mamba-1p1p1" &
  base_pid=$!
fi
python3 -m pytest tests/gpu -x -q ${PYTEST_ARGS:-} -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
echo "pytest rc=$test_rc" | tee -a "$OUT/env.log"

bench_rc=0
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  python3 benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json" "$@" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
echo "bench rc=$bench_rc" | tee -a "$OUT/env.log"

if [ -n "${base_pid:-}" ]; then
  if wait $base_pid; then
    for side in "base:$base" "new:$PWD"; do
      tree=${side#*:}
      PYTHONPATH=$tree/causal-conv1d:$tree/mamba-1p1p1:$tree python3 benchmarks/profile_scan.py --time \
        --dtypes float32 bfloat16 2>&1 | tee "$OUT/profile_scan_time_${side%%:*}.txt"
    done
    bash benchmarks/kernel_timer_ab.sh "$base" "$OUT/kernel_timer_ab.txt"
    python3 benchmarks/compare_trees.py base="$base" new=. --out "$OUT/compare_trees.txt"
  else
    echo "base tree build failed (see base_build.log)" | tee -a "$OUT/env.log"
  fi
fi
exit $(( test_rc != 0 ? test_rc : bench_rc ))

#!/usr/bin/env bash
# GPU check for any machine with an NVIDIA GPU, nvcc and a CUDA build of torch: builds both kernel
# packages in place for the GPUs found (scripts/build_inplace.sh), runs the GPU tests (tests/gpu) and the
# benchmarks (benchmarks/bench_kernels.py, and benchmarks/bench_models.py for Vim-tiny next to DeiT-tiny),
# and writes every log and JSON to $OUT (default ./gpu_check_out).
# Usage: bash scripts/gpu_check.sh [bench_kernels.py args]
#   TORCH_CUDA_ARCH_LIST="8.0;9.0"  architectures to build for (default: those of the GPUs found)
#   MAX_JOBS=N                      parallel compile jobs (default: the number of CPUs)
#   GPU_CHECK_BENCH=0               skip the benchmarks
#   PYTEST_ARGS="-k scan"           extra pytest arguments
#   GPU_CHECK_BASE_TREE=DIR         also build an older tree (a folder with its causal-conv1d, mamba-1p1p1 and
#                                   vim, e.g. `git archive REV causal-conv1d mamba-1p1p1 vim | tar -x -C DIR`)
#                                   and time both trees' scan kernels and Vim-tiny end to end
set -uo pipefail
cd "$(dirname "$0")/.." || exit
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA GPU found (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
  exit 1
fi
if ! python3 -c "import pytest" 2>/dev/null; then
  echo "gpu_check.sh: pytest is not installed; run: python3 -m pip install pytest" >&2
  exit 1
fi
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2 || true
} 2>&1 | tee "$OUT/env.log"

start=$(date +%s)
bash scripts/build_inplace.sh "$OUT/build.log"
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
if [ $rc -ne 0 ]; then exit $rc; fi
export PYTHONPATH=$PWD/causal-conv1d:$PWD/mamba-1p1p1:$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -n "${GPU_CHECK_BASE_TREE:-}" ]; then  # built while the tests run
  base=$(realpath "$GPU_CHECK_BASE_TREE")
  bash scripts/build_inplace.sh "$OUT/base_build.log" "$base/causal-conv1d" "$base/mamba-1p1p1" &
  base_pid=$!
fi
# shellcheck disable=SC2086  # PYTEST_ARGS holds several words
python3 -m pytest tests/gpu -x -q ${PYTEST_ARGS:-} -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
echo "pytest rc=$test_rc" | tee -a "$OUT/env.log"

bench_rc=0
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  python3 benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json" "$@" 2>&1 | tee "$OUT/bench_kernels.log"
  bench_rc=${PIPESTATUS[0]}
  python3 benchmarks/bench_models.py --models tiny --out "$OUT" 2>&1 | tee "$OUT/bench_models.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
fi
echo "bench rc=$bench_rc" | tee -a "$OUT/env.log"

if [ -n "${base_pid:-}" ]; then
  if wait "$base_pid"; then
    for side in "base:$base" "new:$PWD"; do
      tree=${side#*:}
      PYTHONPATH=$tree/causal-conv1d:$tree/mamba-1p1p1:$tree python3 benchmarks/profile_scan.py --time \
        --dtypes float32 bfloat16 2>&1 | tee "$OUT/profile_scan_time_${side%%:*}.txt"
    done
    python3 benchmarks/compare_trees.py base="$base" new=. --out "$OUT/compare_trees.txt"
  else
    echo "base tree build failed (see base_build.log)" | tee -a "$OUT/env.log"
  fi
fi
exit $(( test_rc != 0 ? test_rc : bench_rc ))

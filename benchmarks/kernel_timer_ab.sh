#!/usr/bin/env bash
# Builds benchmarks/kernel_timer.cu against a base tree's kernel sources and against this tree's, times both
# builds at Vim-tiny's shapes (batch 128: inference at 1248, training forward and backward at 224) in three
# alternating rounds, and compares the two builds' outputs byte for byte. Builds for sm_90,
# so it needs nvcc and a GPU of compute capability 9.0 (change -arch below for another GPU).
# Usage: bash benchmarks/kernel_timer_ab.sh BASE_DIR [LOG]   (BASE_DIR holds mamba-1p1p1/, e.g. a `git archive`)
set -uo pipefail
base=$(realpath "${1:?usage: kernel_timer_ab.sh BASE_DIR [LOG]}")
log=$(realpath "${2:-/dev/stdout}")
cd "$(dirname "$0")/.."
nvcc=${CUDA_HOME:+$CUDA_HOME/bin/}nvcc
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
declare -A tree=([base]=$base [new]=.)
for side in base new; do
  "$nvcc" -O3 -std=c++17 -arch=sm_90 -I "${tree[$side]}/mamba-1p1p1/csrc/selective_scan" \
    -I "${tree[$side]}/mamba-1p1p1/csrc/conv_x_proj" -o "$tmp/$side" \
    benchmarks/kernel_timer.cu || { echo "kernel_timer_ab: the $side build failed" | tee "$log"; exit 1; }
done
runs=("scan-infer 128 384 6085 bf16 20" "scan-infer 128 384 6085 fp32 20" "scan-train 128 384 197 bf16 50"
      "scan-train 128 384 197 fp32 50" "scan-bwd 128 384 197 bf16 50" "scan-bwd 128 384 197 fp32 50"
      "conv-x-proj 128 384 6085 bf16 20")
{
  echo "# benchmarks/kernel_timer.cu: base = $base, new = this tree; $(nvidia-smi --query-gpu=name --format=csv,noheader)"
  for round in 1 2 3; do
    for i in "${!runs[@]}"; do
      for side in base new; do
        # shellcheck disable=SC2086  # a run's words are the timer's arguments
        echo "$side ${runs[$i]}: $("$tmp/$side" ${runs[$i]} "$tmp/$side.$i.out" 2>&1)"
      done
    done
  done
  for i in "${!runs[@]}"; do
    if cmp -s "$tmp/base.$i.out" "$tmp/new.$i.out"; then same="bitwise equal"; else same="differ"; fi
    echo "${runs[$i]}: outputs $same"
  done
} 2>&1 | tee "$log"

#!/usr/bin/env bash
# Quick start, CPU friendly (about 3 minutes on 2 cores): set up, train a small Vim (4 blocks, width 64,
# 16-pixel patches: 5 tokens at 32x32) on the built-in handwritten digits, then evaluate the checkpoint.
# Rerunning resumes the finished run and only evaluates; delete output/quickstart to train again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One thread: these small ops gain little from two, and spinning OpenMP threads slow down many-fold
# when other processes share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
model=(--model vim_tiny_patch16_224 --model-kwargs depth=4 embed_dim=64 --input-size 32
       --data-set DIGITS --batch-size 32 --num-workers 0 --device cpu)
python main.py "${model[@]}" --epochs 12 --lr 2e-3 --unscale-lr --warmup-epochs 1 --drop-path 0 \
  --mixup 0 --cutmix 0 --no-repeated-aug --reprob 0 --no-model-ema --print-freq 20 --output-dir output/quickstart
python main.py "${model[@]}" --eval --resume output/quickstart/checkpoint.pth

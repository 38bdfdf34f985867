#!/usr/bin/env bash
# Vim-small pre-training on ImageNet-1k, the published recipe: 8 GPUs x 64 images (global batch 512),
# lr 1e-3 (x 512/512), weight decay 0.05, drop-path 0.05, 300 epochs, fp32.
# Usage: scripts/pt-vim-s.sh --data-path /path/to/imagenet [--output-dir DIR] [--gpus N] [main.py flags]
exec "$(dirname "$0")/launch.sh" pt-vim-s --model vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2 \
  --batch-size 64 --lr 1e-3 --weight-decay 0.05 --drop-path 0.05 --epochs 300 --no-amp --compile "$@"

#!/usr/bin/env bash
# Vim-tiny pre-training on ImageNet-1k, the published recipe: 8 GPUs x 128 images (global batch 1024),
# lr 5e-4 scaled to 5e-4 x 1024/512 = 1e-3, weight decay 0.1, no drop-path, 300 epochs, fp32.
# With fewer GPUs the global batch and the scaled lr shrink; raise --batch-size to keep 1024.
# Usage: scripts/pt-vim-t.sh --data-path /path/to/imagenet [--output-dir DIR] [--gpus N] [main.py flags]
exec "$(dirname "$0")/launch.sh" pt-vim-t --model vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2 \
  --batch-size 128 --lr 5e-4 --weight-decay 0.1 --drop-path 0.0 --epochs 300 --no-amp --compile "$@"

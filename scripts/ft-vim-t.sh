#!/usr/bin/env bash
# Vim-tiny fine-tuning "at finer granularity" (patch stride 8, 730 tokens) from the stride-16 pre-trained
# checkpoint, the published recipe: 8 GPUs x 128 images (global 1024), lr 5e-6 scaled to 1e-5, weight
# decay 1e-8, no drop-path, 30 epochs, warm-up from 1e-5, min lr 1e-5, fp32. Position embeddings are
# resampled from the 14x14 to the 27x27 grid.
# Usage: scripts/ft-vim-t.sh --data-path /path/to/imagenet --finetune PRETRAINED.pth [--output-dir DIR]
#        [--gpus N] [main.py flags]      (or PRETRAINED=... in the environment)
exec "$(dirname "$0")/launch.sh" ft-vim-t --model vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2 \
  --batch-size 128 --lr 5e-6 --weight-decay 1e-8 --drop-path 0.0 --epochs 30 --warmup-lr 1e-5 --min-lr 1e-5 \
  --no-amp --compile "$@"

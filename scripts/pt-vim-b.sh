#!/usr/bin/env bash
# Vim-base pre-training on ImageNet-1k. No recipe was published (the released model reached 81.9);
# this one is ours, not reproduced: DeiT-B's settings at Vim-small's batch, i.e. 8 GPUs x 64 images
# (global 512), lr 5e-4 (x 512/512), weight decay 0.05, drop-path 0.1, 300 epochs, fp32, EMA on.
# Add --grad-checkpointing if 64 images do not fit a GPU; bf16 (--if-amp) trains faster.
# Usage: scripts/pt-vim-b.sh --data-path /path/to/imagenet [--output-dir DIR] [--gpus N] [main.py flags]
exec "$(dirname "$0")/launch.sh" pt-vim-b --model vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2 \
  --batch-size 64 --lr 5e-4 --weight-decay 0.05 --drop-path 0.1 --epochs 300 --no-amp --compile "$@"

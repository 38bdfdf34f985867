#!/usr/bin/env bash
# Runs main.py with torchrun on this node's GPUs; the recipe scripts (pt-*.sh, ft-*.sh) call it.
#
#   scripts/<recipe>.sh --data-path /path/to/imagenet [--output-dir DIR] [--gpus N] [other main.py flags]
#
# Environment instead of flags: DATA_PATH, OUTPUT_DIR (default output/<recipe>), NUM_GPUS (default: all
# GPUs of the node), PRETRAINED (--finetune, required by the ft-* recipes). Several nodes: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, as torchrun names them.
# Flags given on the command line come after the recipe's, so they override it. The recipes train through
# torch.compile (--compile: CUDA graphs); --compile none turns it off.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
recipe=$1
shift
gpus=${NUM_GPUS:-}
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --gpus) gpus=$2; shift 2 ;;
    --gpus=*) gpus=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
# given --flag-name: whether the arguments hold the flag, in either spelling (main.py takes both)
given() { local a; for a in "${args[@]}"; do a=${a%%=*}; [ "${a//_/-}" = "$1" ] && return 0; done; return 1; }

if [ -n "${DATA_PATH:-}" ] && ! given --data-path; then args+=(--data-path "$DATA_PATH"); fi
if [ -n "${PRETRAINED:-}" ] && ! given --finetune; then args+=(--finetune "$PRETRAINED"); fi
case $recipe in  # fine-tuning from scratch would silently train another recipe
  ft-*) given --finetune || { echo "error: $recipe needs --finetune PRETRAINED.pth (or PRETRAINED=...)" >&2; exit 2; } ;;
esac
given --output-dir || args+=(--output-dir "${OUTPUT_DIR:-$repo/output/$recipe}")
if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$gpus" -ge 1 ] || { echo "error: no GPU found: pass --gpus N or set NUM_GPUS" >&2; exit 2; }
fi

if [ "${NNODES:-1}" -gt 1 ]; then
  rendezvous=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
              --master_port "${MASTER_PORT:-29500}")
else
  rendezvous=(--standalone)
fi
cd "$repo"
exec torchrun "${rendezvous[@]}" --nproc_per_node "$gpus" main.py "${args[@]}"

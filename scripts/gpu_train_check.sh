#!/usr/bin/env bash
# Trainer check for a node with 2 GPUs (about 5-8 minutes including the build):
#  1. tiny pre-training recipe (scripts/pt-vim-t.sh) of Vim-tiny at 224 on DIGITS, 2 processes (NCCL),
#     ~300 steps: the training loss must fall;
#  2. 500 steps of Vim-tiny at 224 on DIGITS in bf16 autocast and in fp32, same seed, one GPU each at
#     the same time: no non-finite step, final-epoch losses within 5%.
# Logs and a summary go to $OUT (default ./gpu_train_check_out). DIGITS needs scikit-learn, or
# data/digits.npz written by `python datasets.py --export-digits data/digits.npz` on a machine with it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-$PWD/gpu_train_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
} 2>&1 | tee "$OUT/env.log"

# Extensions: built in place unless importable.
export PYTHONPATH=$PWD/causal-conv1d:$PWD/mamba-1p1p1:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import causal_conv1d_cuda, selective_scan_cuda" 2>/dev/null; then
  bash scripts/build_inplace.sh "$OUT/build.log" || exit 1
  echo "extensions built after $(elapsed)" | tee -a "$OUT/env.log"
fi

# DIGITS reads --data-path only without scikit-learn (data/digits.npz).
if ! python3 -c "import sklearn" 2>/dev/null && [ ! -f data/digits.npz ]; then
  echo "error: no scikit-learn and no data/digits.npz (see the header)" | tee -a "$OUT/env.log"; exit 2
fi
common=(--data-set DIGITS --data-path data --input-size 224 --num-workers 4 --seed 0)

# 1. The tiny pre-training recipe on 2 GPUs: 2 x 64 images per step, 11 steps per epoch, 28 epochs = 308 steps.
NUM_GPUS=2 bash scripts/pt-vim-t.sh "${common[@]}" --output-dir "$OUT/pt_2gpu" --batch-size 64 --epochs 28 \
  --warmup-epochs 2 --print-freq 11 > "$OUT/pt_2gpu.log" 2>&1
pt_rc=$?
echo "2-GPU pre-training rc=$pt_rc after $(elapsed)" | tee -a "$OUT/env.log"

# 2. bf16 and fp32 side by side: 64 images per step, 22 steps per epoch, 23 epochs = 506 steps.
precision_run() {  # gpu name amp-flags...
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu python3 main.py "${common[@]}" --model vim_tiny_patch16_224 --batch-size 64 --epochs 23 \
    --lr 1e-3 --unscale-lr --warmup-epochs 2 --mixup 0 --cutmix 0 --no-model-ema --drop-path 0 \
    --output-dir "$OUT/$name" --print-freq 22 "$@" > "$OUT/$name.log" 2>&1
}
precision_run 0 bf16 --if-amp --amp-dtype bfloat16 &
bf16_pid=$!
precision_run 1 fp32 --no-amp
fp32_rc=$?
wait $bf16_pid
bf16_rc=$?
echo "bf16 rc=$bf16_rc fp32 rc=$fp32_rc after $(elapsed)" | tee -a "$OUT/env.log"

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
out = sys.argv[1]
def log(name):
    try:
        return [json.loads(line) for line in open(f'{out}/{name}/log.txt')]
    except OSError:
        return []
ok = True
pt = log('pt_2gpu')
if pt:
    falls = pt[-1]['train_loss'] < 0.9 * pt[0]['train_loss']  # a clear fall, with mixup and cutmix on
    ok &= falls
    print(f"2-GPU pre-training: {len(pt)} epochs, train loss {pt[0]['train_loss']:.4f} -> {pt[-1]['train_loss']:.4f}, "
          f"val acc {pt[-1]['test_acc1']:.1f}%, skipped steps {sum(r['train_skipped_steps'] for r in pt):.0f}: "
          f"{'falls' if falls else 'DOES NOT FALL'}")
else:
    ok = False
    print('2-GPU pre-training: no log')
bf16, fp32 = log('bf16'), log('fp32')
if bf16 and fp32:
    skipped = sum(r['train_skipped_steps'] for r in bf16 + fp32)
    a, b = bf16[-1]['train_loss'], fp32[-1]['train_loss']
    close = abs(a - b) <= 0.05 * b and skipped == 0
    ok &= close
    print(f"500 steps: final-epoch train loss bf16 {a:.4f} vs fp32 {b:.4f} ({100 * (a - b) / b:+.1f}%), "
          f"val acc bf16 {bf16[-1]['test_acc1']:.1f}% fp32 {fp32[-1]['test_acc1']:.1f}%, skipped steps {skipped:.0f}: "
          f"{'within 5%' if close else 'NOT within 5%'}")
    for e, (x, y) in enumerate(zip(bf16, fp32)):
        print(f"  epoch {e:2d}: bf16 {x['train_loss']:.4f}  fp32 {y['train_loss']:.4f}")
else:
    ok = False
    print('bf16/fp32: missing log')
print('PASS' if ok else 'FAIL')
sys.exit(0 if ok else 1)
PY
summary_rc=${PIPESTATUS[0]}
echo "total $(elapsed)" | tee -a "$OUT/env.log"
exit $(( pt_rc || bf16_rc || fp32_rc || summary_rc ))

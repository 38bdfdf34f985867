"""Where a training step's GPU time goes: the CUDA kernels of one Vim step, by total time, then summed
by kind (scan, conv, matmul, compiled element-wise kernels, optimizer, other).

    python benchmarks/profile_step.py [--model vim_tiny_patch16_224] [--batch 128] [--bf16] [--compile]
                                      [--features RES]

--features RES profiles feature extraction (forward_features under inference_mode) at RES x RES instead.

--compile profiles the step as torch.compile runs it (default mode: the same kernels as the trainer's
CUDA-graph mode, each visible to the profiler).
"""
import argparse
import collections
import re

import torch
from torch.profiler import ProfilerActivity, profile

import timm
import vim  # noqa: F401  (registers the Vim models)
from bench_models import make_step

# First matching pattern wins; kernel names as the profiler reports them.
KINDS = (
    ("scan backward", r"ssm::ss_bi?bwd_kernel"),
    ("scan forward", r"ssm::ss_bi?fwd_kernel"),
    ("conv", r"causal_conv1d::conv_"),
    ("matmul", r"gemm|xmma|cutlass|cublas|splitKreduce|nvjet"),
    ("optimizer", r"multi_tensor_apply"),
    ("compiled element-wise (triton)", r"^triton_"),
    ("other", r""),
)


def by_kind(prof, steps):
    """GPU time per kind of kernel (ms per step) and the largest kernels of each kind."""
    totals, kernels = collections.Counter(), collections.defaultdict(collections.Counter)
    for event in prof.key_averages():
        # Kernels only: ranges such as Optimizer.step also report GPU time, that of the kernels inside them.
        if (event.device_type != torch.autograd.DeviceType.CUDA or event.is_user_annotation
                or event.self_device_time_total <= 0):
            continue
        kind = next(k for k, pattern in KINDS if re.search(pattern, event.key))
        ms = event.self_device_time_total / 1e3 / steps
        totals[kind] += ms
        kernels[kind][event.key[:100]] += ms
    return totals, kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vim_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile'd step")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (times are per step)")
    parser.add_argument("--features", type=int, metavar="RES", help="profile feature extraction at RES x RES")
    args = parser.parse_args()
    size = args.features or 224
    model = timm.create_model(args.model, img_size=size).cuda()
    images = torch.randn(args.batch, 3, size, size, device="cuda")
    step = make_step("features" if args.features else "train", model, images, args.bf16,
                     "default" if args.compile else None)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    totals, kernels = by_kind(prof, args.steps)
    total = sum(totals.values())
    if total == 0:
        raise SystemExit("the profiler recorded no CUDA kernels (is CUPTI available?)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.model}, batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {'compiled' if args.compile else 'eager'}, "
          f"{f'features at {size}' if args.features else 'training step at 224'}: {total:.2f} ms of GPU time per step")
    for kind, ms in totals.most_common():
        print(f"  {kind:32s} {ms:7.2f} ms  {100 * ms / total:5.1f}%")
        for name, kernel_ms in kernels[kind].most_common(3):
            print(f"      {kernel_ms:7.2f} ms  {name}")


if __name__ == "__main__":
    main()

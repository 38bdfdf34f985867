"""The fused bidirectional scan of one Vim block on token-major inputs (B and C sliced from one
x_proj-like output, as in the model), for a kernel profiler to attach to, or timed.

Without --time it runs mamba_ssm.ops.mamba_inner.fused_bimamba_scan forward and backward with a full-size delta (the fused
delta projection of the model's training forward is not used there); --shape, --dtype and --iters
apply to this mode only.

    ncu --clock-control none --kernel-name regex:ss_bi --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy python benchmarks/profile_scan.py
    python benchmarks/profile_scan.py --time [--dtypes float32 bfloat16] [--json FILE]

--time prints the GPU time (CUDA-graph replay, median) of the raw kernels at the shapes of
bench_kernels.py: the training forward (fused delta projection, checkpoints saved), the inference
forward (convs and delta projection fused, nothing saved) and the backward.
"""
import argparse
import json
import math

import torch

from bench_kernels import DSTATE, SHAPES, graph_bench, scan_parameters


def token_major(batch, dim, seqlen, dtype):
    return torch.randn(batch, seqlen, dim, device="cuda", dtype=dtype).transpose(1, 2)


def direction_inputs(batch, dim, seqlen, dtype, rank):
    """u, delta, A, B, C, D, delta_bias, the low-rank dt and dt_proj weight of one direction."""
    x_dbl = torch.randn(batch, seqlen, rank + 2 * DSTATE, device="cuda", dtype=dtype)
    dt_low = x_dbl[..., :rank].transpose(1, 2)
    B = x_dbl[..., rank:rank + DSTATE].transpose(1, 2).unsqueeze(1)
    C = x_dbl[..., rank + DSTATE:].transpose(1, 2).unsqueeze(1)
    dt_proj = torch.randn(dim, rank, device="cuda") * 0.5 * rank ** -0.5
    delta = (dt_low.transpose(1, 2).float() @ dt_proj.t()).to(dtype).transpose(1, 2)
    A, D, bias = scan_parameters(dim)
    return [token_major(batch, dim, seqlen, dtype), delta, A, B, C, D, bias], dt_low, dt_proj


def time_kernels(batch, dim, seqlen, dtype):
    ops = torch.ops.selective_scan_cuda
    rank = math.ceil(dim / 2 / 16)
    f, low_f, proj_f = direction_inputs(batch, dim, seqlen, dtype, rank)
    b, low_b, proj_b = direction_inputs(batch, dim, seqlen, dtype, rank)
    z, dout = token_major(batch, dim, seqlen, dtype), token_major(batch, dim, seqlen, dtype)
    x_f, x_b = token_major(batch, dim, seqlen, dtype), token_major(batch, dim, seqlen, dtype)
    w_f, w_b = torch.randn(dim, 4, device="cuda") * 0.5, torch.randn(dim, 4, device="cuda") * 0.5
    cb_f, cb_b = torch.randn(dim, device="cuda"), torch.randn(dim, device="cuda")
    no_proj = (None,) * 6
    fused_delta = [*f[:1], low_f, *f[2:], *b[:1], low_b, *b[2:]]
    fused_all = [x_f, low_f, *f[2:], x_b, low_b, *b[2:]]
    _, ysum, ck_f, ck_b = ops.bi_fwd(*f, *b, z, *no_proj, True, True)
    return {
        "train_fwd_ms": graph_bench(lambda: ops.bi_fwd(*fused_delta, z, proj_f, proj_b, None, None, None, None,
                                                       True, True)),
        "infer_fwd_ms": graph_bench(lambda: ops.bi_fwd(*fused_all, z, proj_f, proj_b, w_f, cb_f, w_b, cb_b,
                                                       True, False)),
        "bwd_ms": graph_bench(lambda: ops.bi_bwd(*f, *b, z, dout, ysum, ck_f, ck_b, True)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 384, 197], metavar=("BATCH", "DIM", "SEQLEN"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--time", action="store_true", help="time the kernels at bench_kernels.py's shapes")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="with --time")
    parser.add_argument("--json", help="with --time: write the rows here")
    args = parser.parse_args()
    from mamba_ssm.ops import mamba_inner

    if args.time:
        rows = []
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; GPU ms (CUDA-graph replay, median)")
        print(f"{'shape':13s} {'dtype':9s} {'train fwd':>9s} {'infer fwd':>9s} {'bwd':>7s}")
        for dtype_name in args.dtypes:
            for name, batch, dim, seqlen in SHAPES:
                row = {"shape": name, "dtype": dtype_name,
                       **time_kernels(batch, dim, seqlen, getattr(torch, dtype_name))}
                rows.append(row)
                print(f"{name:13s} {dtype_name:9s} {row['train_fwd_ms']:9.3f} {row['infer_fwd_ms']:9.3f} "
                      f"{row['bwd_ms']:7.3f}", flush=True)
                torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
        return

    dtype = getattr(torch, args.dtype)
    batch, dim, seqlen = args.shape
    f, _, _ = direction_inputs(batch, dim, seqlen, dtype, 1)
    b, _, _ = direction_inputs(batch, dim, seqlen, dtype, 1)
    tensors = f + b + [token_major(batch, dim, seqlen, dtype)]
    for t in tensors:
        t.requires_grad_()
    dout = token_major(batch, dim, seqlen, dtype)
    for _ in range(args.iters):
        torch.autograd.grad(mamba_inner.fused_bimamba_scan(*tensors, True), tensors, dout)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Runs the fused bidirectional scan of one Vim block (forward and backward, as the model calls it:
token-major inputs) a few times, for a kernel profiler to attach to:

    ncu --clock-control none --kernel-name regex:ss_bi --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy python benchmarks/profile_scan.py
"""
import argparse
import math

import torch


def token_major(batch, dim, seqlen, dtype):
    return torch.randn(batch, seqlen, dim, device="cuda", dtype=dtype).transpose(1, 2)


def direction_inputs(batch, dim, seqlen, dstate, dtype):
    """u, delta, A, B, C, D, delta_bias of one direction; B and C slices of one x_proj-like output."""
    x_dbl = torch.randn(batch, seqlen, 2 * dstate, device="cuda", dtype=dtype)
    B = x_dbl[..., :dstate].transpose(1, 2).unsqueeze(1)
    C = x_dbl[..., dstate:].transpose(1, 2).unsqueeze(1)
    A = -torch.arange(1, dstate + 1, device="cuda", dtype=torch.float32).repeat(dim, 1)
    dt = torch.exp(torch.rand(dim, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = dt + torch.log(-torch.expm1(-dt))
    delta = 0.5 * token_major(batch, dim, seqlen, dtype)
    return [token_major(batch, dim, seqlen, dtype), delta, A, B, C, torch.ones(dim, device="cuda"), bias]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 384, 197], metavar=("BATCH", "DIM", "SEQLEN"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    from mamba_ssm.ops import cuda_ops

    dtype = getattr(torch, args.dtype)
    batch, dim, seqlen = args.shape
    tensors = direction_inputs(batch, dim, seqlen, 16, dtype) + direction_inputs(batch, dim, seqlen, 16, dtype)
    tensors.append(token_major(batch, dim, seqlen, dtype))
    for t in tensors:
        t.requires_grad_()
    dout = token_major(batch, dim, seqlen, dtype)
    for _ in range(args.iters):
        torch.autograd.grad(cuda_ops.bimamba_scan(*tensors, True), tensors, dout)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Shared helpers of the GPU kernel tests (accuracy bounds, poisoning, fresh seeds)."""
import os

import torch
import torch.nn.functional as F

# Per-dtype floor of the error bound, relative to max|ref|: covers the rounding of the output to
# the dtype (half an ulp: 2^-11 fp16, 2^-8 bf16) and fp32 noise, for cases where the same-precision
# PyTorch reference happens to be (nearly) exact.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Multiple of the same-precision reference's own error (against float64) that the kernel may reach.
FACTOR = 2.0


def fresh_seed():
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def poison_allocator(nbytes=1 << 28):
    """Fill free blocks of the CUDA caching allocator with NaN, so that an output allocated with
    torch.empty that a kernel leaves (partly) unwritten holds NaN instead of stale valid data."""
    junk = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del junk
    small = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 10, 1 << 14, 1 << 18, 1 << 20)]
    del small


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_bound(name, got, ref64, same_prec, dtype, seed, factor=FACTOR, floor=None):
    """|got - ref64| <= factor * |same_prec - ref64| + floor * max|ref64| (max norms), and finite."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (seed {seed})"
    if got.numel() == 0:
        return
    scale = ref64.abs().max().item()
    floor = FLOOR[dtype] if floor is None else floor
    e_got = max_err(got, ref64)
    e_ref = max_err(same_prec, ref64)
    bound = factor * e_ref + floor * max(scale, 1e-30)
    assert e_got <= bound, (
        f"{name}: max error {e_got:.3e} > bound {bound:.3e} (same-precision reference error {e_ref:.3e}, "
        f"max|ref| {scale:.3e}, dtype {dtype}, seed {seed})")


def conv_silu_ref(x, weight, bias, anti_causal):
    """silu(depthwise conv1d of x (batch, dim, seqlen) with weight (dim, width) and bias (dim,) or None), in
    x's precision: causal, or anti-causal (the conv of the time-flipped sequence, flipped back); written with
    F.conv1d, independently of the kernels and causal_conv1d_ref."""
    width = weight.shape[1]
    xs = x.flip(-1) if anti_causal else x
    out = F.conv1d(F.pad(xs, (width - 1, 0)), weight.to(x.dtype).unsqueeze(1),
                   None if bias is None else bias.to(x.dtype), groups=x.shape[1])
    out = F.silu(out)
    return out.flip(-1) if anti_causal else out

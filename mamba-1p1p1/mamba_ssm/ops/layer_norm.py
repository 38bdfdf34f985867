"""RMSNorm with the residual add folded in ("add, then normalise, return both"): what it computes (the
PyTorch form in `rms_norm_fn`) and which code runs it (`_fused_kernel_applies`: in eager CUDA inference, the
add_rms_norm kernel of csrc/rms_norm)."""
import torch
import torch.nn as nn

from mamba_ssm.ops import extensions, policy

MAX_NORM_HIDDEN = 1024  # row length of add_rms_norm (kMaxNormHidden in csrc/rms_norm/rms_norm.h)
NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_kernel_applies(x, weight, bias, residual, stream_dtype):
    """Eager CUDA inference: one kernel instead of ~8 element-wise passes. Under torch.compile the
    PyTorch form is kept, since inductor fuses it with its neighbours; with autograd too. The kernel
    reads the residual in the stream's dtype (Vim's blocks pass the previous stream back)."""
    return (policy.kernel_takes(x, extensions.cuda, "cuda", NORM_DTYPES) and x.shape[-1] <= MAX_NORM_HIDDEN
            and (residual is None or residual.dtype == stream_dtype)
            and policy.eager_inference(x, weight, bias, residual))


def add_rms_norm(x, residual, weight, bias, eps: float, stream_dtype, return_stream: bool):
    """Inference (no autograd) residual add + RMSNorm of CUDA rows on one kernel, as rms_norm_fn computes
    it: (out in x's dtype, stream = x + residual in stream_dtype, float32 or x's dtype; stream empty unless
    return_stream). x's last dim must be at most MAX_NORM_HIDDEN and the residual (if any) in stream_dtype."""
    extensions.cuda.require()
    return torch.ops.selective_scan_cuda.add_rms_norm(
        x.contiguous(), None if residual is None else residual.contiguous(), weight, bias, float(eps),
        stream_dtype == torch.float32, return_stream)


def rms_norm_fn(x, weight, bias=None, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
    """Normalise s = x + residual (or x) by its root mean square over the last dim, scale by weight.

    The sum and the statistics are computed in float32; the output has x's dtype. With prenorm the
    updated residual stream s is returned too, in float32 when residual_in_fp32 else in x's dtype.
    """
    hidden = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm_fn: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None and tuple(v.shape) != (hidden,):
            raise ValueError(f"rms_norm_fn: {name} must be ({hidden},) for rows of {hidden}, got {tuple(v.shape)}")
    stream_dtype = torch.float32 if residual_in_fp32 else x.dtype
    if _fused_kernel_applies(x, weight, bias, residual, stream_dtype):
        out, stream = add_rms_norm(x, residual, weight, bias, eps, stream_dtype, prenorm)
        return (out, stream) if prenorm else out
    x_dtype = x.dtype
    stream = x.float() if residual is None else x.float() + residual.float()
    rstd = torch.rsqrt(stream.square().mean(dim=-1, keepdim=True) + eps)
    out = stream * rstd * weight.float()
    if bias is not None:
        out = out + bias.float()
    out = out.to(x_dtype)
    if not prenorm:
        return out
    return out, stream.to(stream_dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(x, self.weight, residual=residual, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32, eps=self.eps)

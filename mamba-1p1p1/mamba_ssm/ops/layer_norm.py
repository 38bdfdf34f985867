"""RMSNorm with the residual add folded in ("add, then normalise, return both"), in PyTorch."""
import torch
import torch.nn as nn


def rms_norm_fn(x, weight, bias=None, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
    """Normalise s = x + residual (or x) by its root mean square over the last dim, scale by weight.

    The sum and the statistics are computed in float32; the output has x's dtype. With prenorm the
    updated residual stream s is returned too, in float32 when residual_in_fp32 else in x's dtype.
    """
    x_dtype = x.dtype
    stream = x.float() if residual is None else x.float() + residual.float()
    rstd = torch.rsqrt(stream.square().mean(dim=-1, keepdim=True) + eps)
    out = stream * rstd * weight.float()
    if bias is not None:
        out = out + bias.float()
    out = out.to(x_dtype)
    if not prenorm:
        return out
    return out, stream if residual_in_fp32 else stream.to(x_dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(x, self.weight, residual=residual, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32, eps=self.eps)

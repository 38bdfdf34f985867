"""Bridge to the compiled CUDA extension ``causal_conv1d_cuda``.

The extension is optional: without it every op falls back to the PyTorch
reference in ``causal_conv1d_interface``. This module is the only place that
imports the extension.

The kernels are exposed as differentiable ``torch.library`` custom ops
(``causal_conv1d::fwd`` and its backward ``causal_conv1d::bwd``), so ``torch.compile``
traces them without graph breaks. Both take a ``reverse`` flag: the anti-causal conv,
i.e. the causal conv of the flipped sequence, flipped back, without materialising a flip.
"""
from typing import Optional

import torch
from torch import Tensor

from causal_conv1d.extension import OptionalExtension
from causal_conv1d.layout import empty_in_layout

_EXTENSION = OptionalExtension(
    "causal_conv1d_cuda", "causal_conv1d CUDA kernels",
    "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e causal-conv1d "
    "(needs nvcc and a CUDA build of torch)")
available = _EXTENSION.available
require = _EXTENSION.require


@torch.library.custom_op("causal_conv1d::fwd", mutates_args=())
def _conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    require()
    return torch.ops.causal_conv1d_cuda.fwd(x, weight, bias, silu, reverse)


@_conv_fwd.register_fake
def _(x, weight, bias, silu, reverse):
    return empty_in_layout(x)


@torch.library.custom_op("causal_conv1d::bwd", mutates_args=())
def _conv_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], dout: Tensor, silu: bool,
              reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx in x's dtype, dweight fp32 (dim, width), dbias fp32 (dim,) or empty without bias)."""
    require()
    dx, dweight, dbias = torch.ops.causal_conv1d_cuda.bwd(x, weight, bias, dout, silu, reverse)
    return dx, dweight, dbias


@_conv_bwd.register_fake
def _(x, weight, bias, dout, silu, reverse):
    dbias_shape = (x.shape[1],) if bias is not None else (0,)
    return (empty_in_layout(x), x.new_empty(weight.shape, dtype=torch.float32),
            x.new_empty(dbias_shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu
    ctx.reverse = reverse


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _conv_bwd(x, weight, bias, dout, ctx.silu, ctx.reverse)
    return dx, dweight.to(weight.dtype), (dbias.to(bias.dtype) if bias is not None else None), None, None


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias, silu: bool, reverse: bool = False) -> torch.Tensor:
    """Differentiable CUDA causal depthwise conv1d. x (batch, dim, seqlen), weight (dim, width).

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]), act = SiLU if silu.
    x: float32/float16/bfloat16 (any batch/channel strides); weight and bias of any float dtype
    (computed in fp32); width 2..4. reverse=True gives the anti-causal conv
    (= conv(x.flip(-1)).flip(-1)). Returns a tensor in x's dtype and layout (causal_conv1d.layout).
    """
    require()
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1] or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, seqlen) and weight (dim, width) with width 2..4; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return _conv_fwd(x, weight, bias, bool(silu), bool(reverse))

"""Bridge to the compiled CUDA extension ``causal_conv1d_cuda``.

The extension is optional: without it every op falls back to the PyTorch
reference in ``causal_conv1d_interface``. This module is the only place that
imports the extension.

The kernels are exposed as differentiable ``torch.library`` custom ops
(``causal_conv1d::fwd`` and its backward ``causal_conv1d::bwd``), so ``torch.compile``
traces them without graph breaks. Both take a ``reverse`` flag: the anti-causal conv,
i.e. the causal conv of the flipped sequence, flipped back, without materialising a flip.
``causal_conv1d::bi_fwd`` / ``bi_bwd`` run both convs of a Vim block (causal and anti-causal,
each with its own weights) over one token-major x in one pass.
"""
from typing import Optional

import torch
from torch import Tensor

from causal_conv1d.extension import OptionalExtension
from causal_conv1d.layout import empty_in_layout, is_token_major

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


def _fake_weight_grads(x, weight, bias):
    """Shapes of the backward ops' fp32 (dweight, dbias), dbias empty without a bias."""
    return (x.new_empty(weight.shape, dtype=torch.float32),
            x.new_empty((x.shape[1],) if bias is not None else (0,), dtype=torch.float32))


def _param_grad(grad, param):
    """A backward op's fp32 parameter gradient in the parameter's dtype; None for an absent parameter."""
    return grad.to(param.dtype) if param is not None else None


def _check_shapes(op, x, weight):
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1] or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"{op}: x must be (batch, dim, seqlen) and weight (dim, width) with width 2..4; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")


@_conv_bwd.register_fake
def _(x, weight, bias, dout, silu, reverse):
    return (empty_in_layout(x), *_fake_weight_grads(x, weight, bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu
    ctx.reverse = reverse


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _conv_bwd(x, weight, bias, dout, ctx.silu, ctx.reverse)
    return dx, _param_grad(dweight, weight), _param_grad(dbias, bias), None, None


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias, silu: bool, reverse: bool = False) -> torch.Tensor:
    """Differentiable CUDA causal depthwise conv1d. x (batch, dim, seqlen), weight (dim, width).

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]), act = SiLU if silu.
    x: float32/float16/bfloat16 (any batch/channel strides); weight and bias of any float dtype
    (computed in fp32); width 2..4. reverse=True gives the anti-causal conv
    (= conv(x.flip(-1)).flip(-1)). Returns a tensor in x's dtype and layout (causal_conv1d.layout).
    """
    require()
    _check_shapes("causal_conv1d", x, weight)
    return _conv_fwd(x, weight, bias, bool(silu), bool(reverse))


@torch.library.custom_op("causal_conv1d::bi_fwd", mutates_args=())
def _bi_fwd(x: Tensor, weight_f: Tensor, bias_f: Optional[Tensor], weight_b: Tensor, bias_b: Optional[Tensor],
            silu: bool) -> tuple[Tensor, Tensor]:
    require()
    out_f, out_b = torch.ops.causal_conv1d_cuda.bi_fwd(x, weight_f, bias_f, weight_b, bias_b, silu)
    return out_f, out_b


@_bi_fwd.register_fake
def _(x, weight_f, bias_f, weight_b, bias_b, silu):
    return empty_in_layout(x), empty_in_layout(x)


@torch.library.custom_op("causal_conv1d::bi_bwd", mutates_args=())
def _bi_bwd(x: Tensor, weight_f: Tensor, bias_f: Optional[Tensor], weight_b: Tensor, bias_b: Optional[Tensor],
            dout_f: Tensor, dout_b: Tensor, silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx in x's dtype, dweight_f, dbias_f, dweight_b, dbias_b fp32; a dbias is empty without its bias)."""
    require()
    dx, dwf, dbf, dwb, dbb = torch.ops.causal_conv1d_cuda.bi_bwd(x, weight_f, bias_f, weight_b, bias_b, dout_f,
                                                                 dout_b, silu)
    return dx, dwf, dbf, dwb, dbb


@_bi_bwd.register_fake
def _(x, weight_f, bias_f, weight_b, bias_b, dout_f, dout_b, silu):
    return (empty_in_layout(x), *_fake_weight_grads(x, weight_f, bias_f), *_fake_weight_grads(x, weight_b, bias_b))


def _bi_setup_context(ctx, inputs, output):
    x, weight_f, bias_f, weight_b, bias_b, silu = inputs
    ctx.save_for_backward(x, weight_f, bias_f, weight_b, bias_b)
    ctx.silu = silu


def _bi_backward(ctx, dout_f, dout_b):
    x, weight_f, bias_f, weight_b, bias_b = ctx.saved_tensors
    dx, dwf, dbf, dwb, dbb = _bi_bwd(x, weight_f, bias_f, weight_b, bias_b, dout_f, dout_b, ctx.silu)
    return (dx, _param_grad(dwf, weight_f), _param_grad(dbf, bias_f), _param_grad(dwb, weight_b),
            _param_grad(dbb, bias_b), None)


_bi_fwd.register_autograd(_bi_backward, setup_context=_bi_setup_context)


def causal_conv1d_bidirectional(x: torch.Tensor, weight_f: torch.Tensor, bias_f, weight_b: torch.Tensor, bias_b,
                                silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (causal_conv1d(x, weight_f, bias_f, silu), causal_conv1d(x, weight_b, bias_b, silu,
    reverse=True)) in one pass over x, for a token-major x (channel stride 1); both weights (dim, width)
    of one width 2..4. The backward writes one dx, the sum of both directions' terms."""
    require()
    for weight in (weight_f, weight_b):
        _check_shapes("causal_conv1d_bidirectional", x, weight)
    if weight_f.shape != weight_b.shape:
        raise ValueError(f"causal_conv1d_bidirectional: both weights must have one shape, got {tuple(weight_f.shape)} "
                         f"and {tuple(weight_b.shape)}")
    if not is_token_major(x):
        raise ValueError(f"causal_conv1d_bidirectional: x must be token-major (channel stride 1, e.g. a (batch, seqlen, "
                         f"dim) tensor transposed), got strides {x.stride()}; call causal_conv1d once per direction")
    return _bi_fwd(x, weight_f, bias_f, weight_b, bias_b, bool(silu))

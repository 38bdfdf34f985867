"""Bridge to the compiled CUDA extension ``selective_scan_cuda``.

The extension is optional: without it every op falls back to the PyTorch
reference in ``selective_scan_interface``. This module is the only place that
imports the extension.

Its single-direction kernels serve the ``mamba_ssm::selective_scan_fwd`` / ``_bwd`` ops of
``scan_ops`` for CUDA tensors (checkpoints every 32 positions, 16 state slots: 1/2 float per
element at N = 16). The fused bidirectional scan of a Vim v2 block is its own differentiable op,
``mamba_ssm::bimamba_scan_fwd`` / ``_bwd``, traced by ``torch.compile`` without graph breaks.
"""
from typing import Optional

import torch
from torch import Tensor

from causal_conv1d.extension import OptionalExtension
from causal_conv1d.layout import empty_in_layout
from mamba_ssm.ops import scan_ops

_EXTENSION = OptionalExtension(
    "selective_scan_cuda", "selective-scan CUDA kernels",
    "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e mamba-1p1p1 "
    "(needs nvcc and a CUDA build of torch)")
available = _EXTENSION.available
require = _EXTENSION.require
CHUNK = 32       # positions per checkpoint (kChunk in csrc/selective_scan/ss_common.h)
MAX_STATE = 16   # d_state the kernels support (kMaxState)
MAX_NORM_HIDDEN = 1024  # row length of add_rms_norm (kMaxNormHidden)
NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if available():
    scan_ops.register_kernels("cuda", torch.ops.selective_scan_cuda,
                              scan_ops.KernelTraits(CHUNK, state_slots=MAX_STATE))


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
                   reverse: bool = False):
    """Differentiable CUDA selective scan (scan_ops.selective_scan) for dstate <= 16."""
    require()
    if A.dim() != 2 or not 1 <= A.shape[1] <= MAX_STATE:
        raise ValueError(f"selective_scan: the CUDA kernels support dstate 1..{MAX_STATE} (A is (dim, dstate)); "
                         f"got A of shape {tuple(A.shape)}")
    return scan_ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)


def add_rms_norm(x, residual, weight, bias, eps: float, stream_dtype, return_stream: bool):
    """Inference (no autograd) residual add + RMSNorm of CUDA rows on one kernel, as
    layer_norm.rms_norm_fn computes it: (out in x's dtype, stream = x + residual in stream_dtype, float32
    or x's dtype; stream empty unless return_stream). x's last dim must be at most MAX_NORM_HIDDEN and the
    residual (if any) in stream_dtype."""
    require()
    return torch.ops.selective_scan_cuda.add_rms_norm(
        x.contiguous(), None if residual is None else residual.contiguous(), weight, bias, float(eps),
        stream_dtype == torch.float32, return_stream)


MAX_CONV_PROJ_OUT = 96  # rank + 2 * dstate that conv_x_proj holds (kMaxConvProjOut in csrc/selective_scan/ss_common.h)
CONV_PROJ_DTYPES = (torch.float16, torch.bfloat16)


def conv_x_proj_applies(x, conv_weights, proj_weights) -> bool:
    """Whether `bidirectional_conv_x_proj` takes x (batch, dim, seqlen) with these conv weights (dim, 1,
    width) and x_proj weights (out_dim, dim), one per direction: eager (not under torch.compile, whose
    inductor has its own conv and matmul kernels), CUDA, bf16/fp16 (tensor cores), batch <= 65535,
    token-major x whose channel pairs are 4-byte aligned (as a linear layer's output is), dim a multiple
    of 8, one conv width <= 4 and one out_dim <= MAX_CONV_PROJ_OUT for both directions."""
    if not available() or torch.compiler.is_compiling():  # first: data_ptr() would break the traced graph
        return False
    widths = {w.shape[-1] for w in conv_weights}
    out_shapes = {tuple(w.shape) for w in proj_weights}
    return (x.is_cuda and x.dtype in CONV_PROJ_DTYPES and x.shape[0] <= 65535 and x.shape[1] % 8 == 0
            and x.stride(1) == 1 and x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0 and x.stride(2) % 2 == 0
            and len(widths) == 1 and widths.pop() <= 4
            and len(out_shapes) == 1 and out_shapes.pop()[0] <= MAX_CONV_PROJ_OUT)


def bidirectional_conv_x_proj(x, conv_f, conv_b, proj_weight_f, proj_weight_b):
    """Inference front end of a Vim v2 block in one kernel: silu(conv_f(x)) @ proj_weight_f.T and
    silu(conv_b(x)) @ proj_weight_b.T, where conv_* = (weight (dim, width <= 4), bias or None) and conv_b is
    anti-causal (the conv of the flipped sequence, flipped back). The conv outputs are rounded to x's dtype,
    as a separate conv would write them, and never stored. Returns (x_dbl_f, x_dbl_b), each (batch,
    seqlen, out_dim) in x's dtype (the weights are cast to it, as autocast does for a linear layer)."""
    require()
    return torch.ops.selective_scan_cuda.conv_x_proj(x, *conv_f, *conv_b, proj_weight_f, proj_weight_b)


# ---------------------------------------------------------------------------------------------
# Fused bidirectional scan (Vim v2 block): out = silu(z) * (y_f + y_b) * out_scale, where direction b runs
# from position L-1 down to 0 over natural-order inputs: no flipped copies, one launch each way.
# With a direction's delta projection weight W (dim, rank), its `delta` input is the low-rank dt
# (batch, rank, seqlen): the forward kernel forms delta = W @ dt itself, so the full-size delta is
# neither written by a matmul nor kept for the backward; the backward recomputes it with one matmul
# (transient) and turns the kernel's ddelta into the gradients of dt and W. For inference a direction's
# conv weight and bias may be passed too: its `u` is then the conv's input, and the forward kernel
# applies silu(conv(.)) itself, so the conv output never coexists with the scan's other tensors.
# ---------------------------------------------------------------------------------------------
MAX_DELTA_RANK = 64  # kMaxDeltaRank in csrc/selective_scan/ss_common.h


@torch.library.custom_op("mamba_ssm::bimamba_scan_fwd", mutates_args=())
def _bi_fwd(u_f: Tensor, delta_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Optional[Tensor],
            delta_bias_f: Optional[Tensor], u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
            D_b: Optional[Tensor], delta_bias_b: Optional[Tensor], z: Tensor, dt_proj_f: Optional[Tensor],
            dt_proj_b: Optional[Tensor], conv_weight_f: Optional[Tensor], conv_bias_f: Optional[Tensor],
            conv_weight_b: Optional[Tensor], conv_bias_b: Optional[Tensor], delta_softplus: bool,
            save_ckpt: bool, out_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out = silu(z) * ysum * out_scale in u's dtype, ysum = y_f + y_b fp32 (ungated, unscaled), ckpt_f,
    ckpt_b); all but out empty unless save_ckpt."""
    require()
    out, ysum, ck_f, ck_b = torch.ops.selective_scan_cuda.bi_fwd(
        u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z,
        dt_proj_f, dt_proj_b, conv_weight_f, conv_bias_f, conv_weight_b, conv_bias_b, delta_softplus, save_ckpt,
        out_scale)
    return out, ysum, ck_f, ck_b


@_bi_fwd.register_fake
def _(u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z,
      dt_proj_f, dt_proj_b, conv_weight_f, conv_bias_f, conv_weight_b, conv_bias_b, delta_softplus, save_ckpt,
      out_scale):
    batch, dim, seqlen = u_f.shape
    f32 = torch.float32
    ck_shape = (batch, dim, (seqlen + CHUNK - 1) // CHUNK, MAX_STATE) if save_ckpt else (0,)
    ysum = empty_in_layout(u_f, f32) if save_ckpt else u_f.new_empty((0,), dtype=f32)
    return empty_in_layout(u_f), ysum, u_f.new_empty(ck_shape, dtype=f32), u_f.new_empty(ck_shape, dtype=f32)


@torch.library.custom_op("mamba_ssm::bimamba_scan_bwd", mutates_args=())
def _bi_bwd(u_f: Tensor, delta_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Optional[Tensor],
            delta_bias_f: Optional[Tensor], u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
            D_b: Optional[Tensor], delta_bias_b: Optional[Tensor], z: Tensor, dout: Tensor, ysum: Tensor,
            ckpt_f: Tensor, ckpt_b: Tensor, delta_softplus: bool, out_scale: float) -> list[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, ddelta_bias of f, the same of b, dz]; absent ones empty."""
    require()
    return list(torch.ops.selective_scan_cuda.bi_bwd(
        u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z, dout,
        ysum, ckpt_f, ckpt_b, delta_softplus, out_scale))


@_bi_bwd.register_fake
def _(u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z, dout, ysum,
      ckpt_f, ckpt_b, delta_softplus, out_scale):
    f32 = torch.float32
    dim = u_f.shape[1]
    grads = []
    for A, B, C, D, bias in ((A_f, B_f, C_f, D_f, delta_bias_f), (A_b, B_b, C_b, D_b, delta_bias_b)):
        grads += [empty_in_layout(u_f), empty_in_layout(u_f), u_f.new_empty(A.shape, dtype=f32),
                  u_f.new_empty(B.shape), u_f.new_empty(C.shape),
                  u_f.new_empty((dim,) if D is not None else (0,), dtype=f32),
                  u_f.new_empty((dim,) if bias is not None else (0,), dtype=f32)]
    return grads + [empty_in_layout(u_f)]


def _by_direction(tensors):
    """(u_f, ..., delta_bias_b, z, dt_proj_f, dt_proj_b, conv...) -> the 7 tensors of f and of b, each + its dt_proj."""
    f, b, dt_proj_f, dt_proj_b = tensors[:7], tensors[7:14], tensors[15], tensors[16]
    return [*f, dt_proj_f], [*b, dt_proj_b]


def _bi_setup_context(ctx, inputs, output):
    *tensors, delta_softplus, save_ckpt, out_scale = inputs
    out, ysum, ck_f, ck_b = output
    ctx.mark_non_differentiable(ysum, ck_f, ck_b)
    ctx.save_for_backward(*tensors, *((ysum, ck_f, ck_b) if save_ckpt else (None, None, None)))
    ctx.delta_softplus = delta_softplus
    ctx.out_scale = out_scale


def _delta_proj_grads(ddelta, dt, weight):
    """Gradients of dt (batch, rank, seqlen) and W (dim, rank) from that of delta = W @ dt."""
    ddelta_t = ddelta.transpose(1, 2)  # (batch, seqlen, dim): contiguous for token-major inputs
    ddt = torch.matmul(ddelta_t, weight.to(ddelta.dtype)).transpose(1, 2)
    dweight = torch.matmul(ddelta_t.reshape(-1, ddelta.shape[1]).t(), dt.transpose(1, 2).reshape(-1, dt.shape[1]))
    return ddt.to(dt.dtype), dweight.to(weight.dtype)


def _bi_backward(ctx, dout, dysum, dck_f, dck_b):
    *tensors, ysum, ck_f, ck_b = ctx.saved_tensors
    if ck_f is None:  # forward ran without checkpoints: recompute them
        _, ysum, ck_f, ck_b = _bi_fwd(*tensors, ctx.delta_softplus, True, ctx.out_scale)
    directions = _by_direction(tensors)
    kernel_inputs = []
    for u, delta, A, B, C, D, bias, dt_proj in directions:
        if dt_proj is not None:  # the full-size delta, for this backward only
            delta = scan_ops.delta_projection(delta, dt_proj.to(delta.dtype))
        kernel_inputs += [u, delta, A, B, C, D, bias]
    g = _bi_bwd(*kernel_inputs, tensors[14], dout, ysum, ck_f, ck_b, ctx.delta_softplus, ctx.out_scale)
    grads = []
    for (u, delta, A, B, C, D, bias, dt_proj), gd in zip(directions, (g[0:7], g[7:14])):
        ddelta, ddt_proj = gd[1], None
        if dt_proj is not None:
            ddelta, ddt_proj = _delta_proj_grads(ddelta, delta, dt_proj)
        grads.append([gd[0], ddelta, *gd[2:5], gd[5] if D is not None else None, gd[6] if bias is not None else None,
                      ddt_proj])
    (*gf, ddt_proj_f), (*gb, ddt_proj_b) = grads
    return (*gf, *gb, g[14], ddt_proj_f, ddt_proj_b, None, None, None, None, None, None, None)


_bi_fwd.register_autograd(_bi_backward, setup_context=_bi_setup_context)


def bimamba_scan(u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z,
                 delta_softplus: bool, delta_proj_weight_f=None, delta_proj_weight_b=None, conv_f=None, conv_b=None,
                 out_scale: float = 1.0):
    """Differentiable fused bidirectional selective scan of a Vim v2 block.

    Returns silu(z) * (y_f + y_b) * out_scale in u's dtype (Vim's average: out_scale 0.5), where y_f is the scan
    of direction f (no gate) and y_b the scan of direction b run from position L-1 down to 0, i.e.
    flip(scan(flip(inputs_b))) without any flipped copy. All sequence inputs are in natural order, with
    the shapes of `selective_scan` (B/C as (batch, groups, dstate, seqlen)); z is required. With
    delta_proj_weight_* (dim, rank), rank <= 64, that direction's delta is given as the low-rank dt
    (batch, rank, seqlen) and delta = W @ dt is formed inside the kernels. Inference only: conv_* =
    (weight (dim, width), bias or None) makes that direction's u the input of its causal conv (anti-causal
    for b), which the kernel applies with SiLU. One kernel launch for both directions forward, one for
    both backward.
    """
    require()
    for A in (A_f, A_b):
        if A.dim() != 2 or not 1 <= A.shape[1] <= MAX_STATE:
            raise ValueError(f"bimamba_scan: the CUDA kernels support dstate 1..{MAX_STATE}; got A {tuple(A.shape)}")
    if u_b.shape != u_f.shape or z.shape != u_f.shape:
        raise ValueError(f"bimamba_scan: u_f, u_b and z must have one shape, got {tuple(u_f.shape)}, "
                         f"{tuple(u_b.shape)}, {tuple(z.shape)}")
    for W in (delta_proj_weight_f, delta_proj_weight_b):
        if W is not None and not (W.dim() == 2 and W.shape[0] == u_f.shape[1] and W.shape[1] <= MAX_DELTA_RANK):
            raise ValueError(f"bimamba_scan: a delta projection weight must be (dim, rank) with dim = {u_f.shape[1]} "
                             f"and rank <= {MAX_DELTA_RANK}; got {tuple(W.shape)}")
    u_f, delta_f, A_f, B_f, C_f, D_f, z, delta_bias_f = scan_ops.normalise(u_f, delta_f, A_f, B_f, C_f, D_f, z, delta_bias_f)
    u_b = u_b.to(u_f.dtype)
    u_b, delta_b, A_b, B_b, C_b, D_b, _, delta_bias_b = scan_ops.normalise(u_b, delta_b, A_b, B_b, C_b, D_b, None, delta_bias_b)
    tensors = (u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z,
               delta_proj_weight_f, delta_proj_weight_b)
    convs = [t for conv in (conv_f, conv_b) for t in (conv if conv is not None else (None, None))]
    save_ckpt = scan_ops.needs_grad(*tensors, *convs)
    if save_ckpt and (conv_f is not None or conv_b is not None):
        raise ValueError("bimamba_scan: the fused conv (conv_f / conv_b) is for inference; without it, apply "
                         "causal_conv1d first, or run under torch.no_grad() / inference_mode()")
    out, _, _, _ = _bi_fwd(*tensors, *convs, bool(delta_softplus), save_ckpt, float(out_scale))
    return out

"""Bridge to the compiled CUDA extension ``selective_scan_cuda``.

The extension is optional: without it every op falls back to the PyTorch
reference in ``selective_scan_interface``. This module is the only place that
imports the extension.

The kernels are exposed as differentiable ``torch.library`` custom ops under ``mamba_ssm::``
(``selective_scan_fwd`` with its backward ``selective_scan_bwd``), so ``torch.compile``
traces them without graph breaks. The forward saves the fp32 state before every chunk of
32 positions (``ckpt``, 1/2 float per element at N = 16) when a gradient will be needed; the
backward recomputes the states inside each chunk from it. All ops take a ``reverse`` flag:
the scan runs from position L-1 down to 0 (the scan of the flipped sequence, in place).
"""
from typing import Optional

import torch
from torch import Tensor

try:
    import selective_scan_cuda as _ext
except ImportError as error:
    _ext = None
    _import_error = error
else:
    _import_error = None

BUILD_COMMAND = (
    "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e mamba-1p1p1 "
    "(needs nvcc and a CUDA build of torch)"
)
CHUNK = 32       # positions per checkpoint (kChunk in csrc/selective_scan/ss_common.h)
MAX_STATE = 16   # d_state the kernels support (kMaxState)


def available() -> bool:
    return _ext is not None


def require() -> None:
    if _ext is None:
        raise RuntimeError(
            f"the selective-scan CUDA kernels are not built ({_import_error}); build them with: {BUILD_COMMAND}"
        )


# ---------------------------------------------------------------------------------------------
# Single direction
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mamba_ssm::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, return_last_state: bool,
              save_ckpt: bool, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out in u's dtype, last_state fp32 (batch, dim, dstate) or empty, ckpt fp32 or empty)."""
    require()
    out, last, ckpt = torch.ops.selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                         return_last_state, save_ckpt, reverse)
    return out, last, ckpt


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, save_ckpt, reverse):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    f32 = torch.float32
    last = u.new_empty((batch, dim, dstate) if return_last_state else (0,), dtype=f32)
    ckpt = u.new_empty((batch, dim, (seqlen + CHUNK - 1) // CHUNK, MAX_STATE) if save_ckpt else (0,), dtype=f32)
    return u.new_empty(u.shape), last, ckpt


@torch.library.custom_op("mamba_ssm::selective_scan_bwd", mutates_args=())
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], dout: Tensor, dlast: Optional[Tensor], ckpt: Tensor,
              delta_softplus: bool, reverse: bool) -> list[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; absent ones (no D / z / delta_bias) are empty."""
    require()
    return list(torch.ops.selective_scan_cuda.bwd(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt,
                                                  delta_softplus, reverse))


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt, delta_softplus, reverse):
    f32 = torch.float32
    dim = u.shape[1]
    return [
        u.new_empty(u.shape), u.new_empty(u.shape), u.new_empty(A.shape, dtype=f32),
        u.new_empty(B.shape), u.new_empty(C.shape),
        u.new_empty((dim,) if D is not None else (0,), dtype=f32),
        u.new_empty(u.shape) if z is not None else u.new_empty((0,), dtype=f32),
        u.new_empty((dim,) if delta_bias is not None else (0,), dtype=f32),
    ]


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, save_ckpt, reverse = inputs
    ckpt = output[2] if save_ckpt else None
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
    ctx.delta_softplus = delta_softplus
    ctx.reverse = reverse


def _scan_backward(ctx, dout, dlast, dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    if ckpt is None:  # the forward ran without saving checkpoints (e.g. under no_grad): recompute them
        ckpt = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, False, True, ctx.reverse)[2]
    if dlast is not None and dlast.numel() == 0:
        dlast = None
    du, ddelta, dA, dB, dC, dD, dz, ddb = _scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), dlast,
                                                    ckpt, ctx.delta_softplus, ctx.reverse)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            ddb if delta_bias is not None else None, None, None, None, None)


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _normalise(u, delta, A, B, C, D, z, delta_bias):
    """Cast to the kernels' dtypes (differentiably): sequences in u's dtype, parameters in fp32."""
    dt = u.dtype
    delta, B, C = delta.to(dt), B.to(dt), C.to(dt)
    z = z.to(dt) if z is not None else None
    A = A.to(torch.float32)
    D = D.to(torch.float32) if D is not None else None
    delta_bias = delta_bias.to(torch.float32) if delta_bias is not None else None
    return u, delta, A, B, C, D, z, delta_bias


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
                   reverse: bool = False):
    """Differentiable CUDA selective scan.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate) real; B, C: (batch, groups, dstate, seqlen);
    D, delta_bias: (dim,) or None; z may be None. Returns out (batch, dim, seqlen) in u's dtype,
    and with return_last_state also the fp32 state (batch, dim, dstate) after the last position.
    u: float32/float16/bfloat16 (delta, B, C, z are cast to it; A, D, delta_bias to fp32);
    dstate <= 16. reverse=True scans positions L-1 .. 0 (= the scan of the flipped inputs,
    flipped back); its last state is then the state after position 0.
    """
    require()
    if A.dim() != 2 or not 1 <= A.shape[1] <= MAX_STATE:
        raise ValueError(f"selective_scan: the CUDA kernels support dstate 1..{MAX_STATE} (A is (dim, dstate)); "
                         f"got A of shape {tuple(A.shape)}")
    u, delta, A, B, C, D, z, delta_bias = _normalise(u, delta, A, B, C, D, z, delta_bias)
    save_ckpt = _needs_grad(u, delta, A, B, C, D, z, delta_bias)
    out, last, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state),
                             save_ckpt, bool(reverse))
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------------
# Fused bidirectional scan (Vim v2 block): out = silu(z) * (y_f + y_b), where direction b runs
# from position L-1 down to 0 over natural-order inputs: no flipped copies, one launch each way.
# ---------------------------------------------------------------------------------------------
_BI_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


@torch.library.custom_op("mamba_ssm::bimamba_scan_fwd", mutates_args=())
def _bi_fwd(u_f: Tensor, delta_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Optional[Tensor],
            delta_bias_f: Optional[Tensor], u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
            D_b: Optional[Tensor], delta_bias_b: Optional[Tensor], z: Tensor, delta_softplus: bool,
            save_ckpt: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out in u's dtype, ysum = y_f + y_b fp32 (ungated), ckpt_f, ckpt_b (empty unless save_ckpt))."""
    require()
    out, ysum, ck_f, ck_b = torch.ops.selective_scan_cuda.bi_fwd(
        u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z,
        delta_softplus, save_ckpt)
    return out, ysum, ck_f, ck_b


@_bi_fwd.register_fake
def _(u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z,
      delta_softplus, save_ckpt):
    batch, dim, seqlen = u_f.shape
    f32 = torch.float32
    ck_shape = (batch, dim, (seqlen + CHUNK - 1) // CHUNK, MAX_STATE) if save_ckpt else (0,)
    return (u_f.new_empty(u_f.shape), u_f.new_empty(u_f.shape, dtype=f32), u_f.new_empty(ck_shape, dtype=f32),
            u_f.new_empty(ck_shape, dtype=f32))


@torch.library.custom_op("mamba_ssm::bimamba_scan_bwd", mutates_args=())
def _bi_bwd(u_f: Tensor, delta_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Optional[Tensor],
            delta_bias_f: Optional[Tensor], u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
            D_b: Optional[Tensor], delta_bias_b: Optional[Tensor], z: Tensor, dout: Tensor, ysum: Tensor,
            ckpt_f: Tensor, ckpt_b: Tensor, delta_softplus: bool) -> list[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, ddelta_bias of f, the same of b, dz]; absent ones empty."""
    require()
    return list(torch.ops.selective_scan_cuda.bi_bwd(
        u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z, dout,
        ysum, ckpt_f, ckpt_b, delta_softplus))


@_bi_bwd.register_fake
def _(u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z, dout, ysum,
      ckpt_f, ckpt_b, delta_softplus):
    f32 = torch.float32
    dim = u_f.shape[1]
    grads = []
    for A, B, C, D, bias in ((A_f, B_f, C_f, D_f, delta_bias_f), (A_b, B_b, C_b, D_b, delta_bias_b)):
        grads += [u_f.new_empty(u_f.shape), u_f.new_empty(u_f.shape), u_f.new_empty(A.shape, dtype=f32),
                  u_f.new_empty(B.shape), u_f.new_empty(C.shape),
                  u_f.new_empty((dim,) if D is not None else (0,), dtype=f32),
                  u_f.new_empty((dim,) if bias is not None else (0,), dtype=f32)]
    return grads + [u_f.new_empty(u_f.shape)]


def _bi_setup_context(ctx, inputs, output):
    *tensors, delta_softplus, save_ckpt = inputs
    out, ysum, ck_f, ck_b = output
    ctx.mark_non_differentiable(ysum, ck_f, ck_b)
    ctx.save_for_backward(*tensors, ysum, ck_f if save_ckpt else None, ck_b if save_ckpt else None)
    ctx.delta_softplus = delta_softplus


def _bi_backward(ctx, dout, dysum, dck_f, dck_b):
    *tensors, ysum, ck_f, ck_b = ctx.saved_tensors
    if ck_f is None:  # forward ran without checkpoints: recompute them
        _, ysum, ck_f, ck_b = _bi_fwd(*tensors, ctx.delta_softplus, True)
    g = _bi_bwd(*tensors, dout.contiguous(), ysum, ck_f, ck_b, ctx.delta_softplus)
    f_opt, b_opt = tensors[5:7], tensors[12:14]  # (D, delta_bias) of each direction
    gf = g[0:5] + [g[5] if f_opt[0] is not None else None, g[6] if f_opt[1] is not None else None]
    gb = g[7:12] + [g[12] if b_opt[0] is not None else None, g[13] if b_opt[1] is not None else None]
    return (*gf, *gb, g[14], None, None)


_bi_fwd.register_autograd(_bi_backward, setup_context=_bi_setup_context)


def bimamba_scan(u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z,
                 delta_softplus: bool):
    """Differentiable fused bidirectional selective scan of a Vim v2 block.

    Returns silu(z) * (y_f + y_b) in u's dtype (the sum: the caller divides by 2), where y_f is the scan
    of direction f (no gate) and y_b the scan of direction b run from position L-1 down to 0, i.e.
    flip(scan(flip(inputs_b))) without any flipped copy. All sequence inputs are in natural order, with
    the shapes of `selective_scan` (B/C as (batch, groups, dstate, seqlen)); z is required. One kernel
    launch for both directions forward, one for both backward.
    """
    require()
    for A in (A_f, A_b):
        if A.dim() != 2 or not 1 <= A.shape[1] <= MAX_STATE:
            raise ValueError(f"bimamba_scan: the CUDA kernels support dstate 1..{MAX_STATE}; got A {tuple(A.shape)}")
    if u_b.shape != u_f.shape or z.shape != u_f.shape:
        raise ValueError(f"bimamba_scan: u_f, u_b and z must have one shape, got {tuple(u_f.shape)}, "
                         f"{tuple(u_b.shape)}, {tuple(z.shape)}")
    u_f, delta_f, A_f, B_f, C_f, D_f, z, delta_bias_f = _normalise(u_f, delta_f, A_f, B_f, C_f, D_f, z, delta_bias_f)
    u_b = u_b.to(u_f.dtype)
    u_b, delta_b, A_b, B_b, C_b, D_b, _, delta_bias_b = _normalise(u_b, delta_b, A_b, B_b, C_b, D_b, None, delta_bias_b)
    tensors = (u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z)
    out, _, _, _ = _bi_fwd(*tensors, bool(delta_softplus), _needs_grad(*tensors))
    return out

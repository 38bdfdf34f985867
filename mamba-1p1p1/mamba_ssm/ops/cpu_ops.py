"""Bridge to the compiled CPU extension ``selective_scan_cpu``.

The extension is optional: without it every op falls back to the PyTorch reference in
``selective_scan_interface``. This module is the only place that imports the extension.

The fused C++ kernels (csrc/selective_scan_cpu) are exposed as differentiable ``torch.library``
custom ops under ``mamba_ssm::`` (``selective_scan_cpu_fwd`` with its backward
``selective_scan_cpu_bwd``), mirroring ``cuda_ops``. They compute in fp32 for fp32 / fp16 / bf16
inputs (float64 is not accepted: leave it to the reference). The forward saves the fp32 state before
every chunk of 64 positions (``ckpt``, 1/4 float per element at N = 16) when a gradient will be
needed; the backward recomputes the states inside each chunk from it. ``reverse=True`` runs the scan
from position L-1 down to 0 on the natural-order inputs (= the scan of the flipped sequence, flipped
back), so a bidirectional block needs no flips.
"""
from typing import Optional

import torch
from torch import Tensor

try:
    import selective_scan_cpu as _ext  # noqa: F401  (importing registers torch.ops.selective_scan_cpu)
except ImportError as error:
    _ext = None
    _import_error = error
else:
    _import_error = None

BUILD_COMMAND = "pip install --no-build-isolation -e mamba-1p1p1 (needs a C++ compiler; MAMBA_SKIP_CPU_BUILD unset)"
CHUNK = 64  # positions per checkpoint (kChunk in csrc/selective_scan_cpu/selective_scan_cpu.cpp)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    return _ext is not None


def require() -> None:
    if _ext is None:
        raise RuntimeError(
            f"the selective-scan CPU kernels are not built ({_import_error}); build them with: {BUILD_COMMAND}"
        )


def supports(u: Tensor, B: Tensor, C: Tensor) -> bool:
    """Whether the CPU kernel takes these inputs: CPU tensors, fp32/fp16/bf16, per-step B and C."""
    return (available() and u.device.type == "cpu" and u.dtype in DTYPES and B.dim() >= 3 and C.dim() >= 3
            and not B.is_complex() and not C.is_complex())


@torch.library.custom_op("mamba_ssm::selective_scan_cpu_fwd", mutates_args=(), device_types="cpu")
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, return_last_state: bool,
              save_ckpt: bool, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out in u's dtype, last_state fp32 (batch, dim, dstate) or empty, ckpt fp32 or empty)."""
    require()
    out, last, ckpt = torch.ops.selective_scan_cpu.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                        return_last_state, save_ckpt, reverse)
    return out, last, ckpt


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, save_ckpt, reverse):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    f32 = torch.float32
    last = u.new_empty((batch, dim, dstate) if return_last_state else (0,), dtype=f32)
    ckpt = u.new_empty((batch, dim, (seqlen + CHUNK - 1) // CHUNK, dstate) if save_ckpt else (0,), dtype=f32)
    return u.new_empty(u.shape), last, ckpt


@torch.library.custom_op("mamba_ssm::selective_scan_cpu_bwd", mutates_args=(), device_types="cpu")
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], dout: Tensor, dlast: Optional[Tensor], ckpt: Tensor,
              delta_softplus: bool, reverse: bool) -> list[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; absent ones (no D / z / delta_bias) are empty."""
    require()
    return list(torch.ops.selective_scan_cpu.bwd(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt,
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
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
    ctx.delta_softplus = delta_softplus
    ctx.reverse = reverse


def _scan_backward(ctx, dout, dlast, dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    if ckpt is None:  # the forward ran without saving checkpoints: recompute them
        ckpt = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, False, True, ctx.reverse)[2]
    if dlast is not None and dlast.numel() == 0:
        dlast = None
    if dout is None:
        dout = torch.zeros_like(u)
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
    """Differentiable fused CPU selective scan.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate) real; B, C: (batch, groups, dstate, seqlen);
    D, delta_bias: (dim,) or None; z may be None. Returns out (batch, dim, seqlen) in u's dtype,
    and with return_last_state also the fp32 state (batch, dim, dstate) after the last position.
    u: float32/float16/bfloat16 (delta, B, C, z are cast to it; A, D, delta_bias to fp32); dstate <= 256.
    reverse=True scans positions L-1 .. 0 (= the scan of the flipped inputs, flipped back); its last
    state is then the state after position 0.
    """
    require()
    u, delta, A, B, C, D, z, delta_bias = _normalise(u, delta, A, B, C, D, z, delta_bias)
    save_ckpt = _needs_grad(u, delta, A, B, C, D, z, delta_bias)
    out, last, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state),
                             save_ckpt, bool(reverse))
    return (out, last) if return_last_state else out

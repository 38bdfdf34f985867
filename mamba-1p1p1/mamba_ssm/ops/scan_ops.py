"""The selective scan as one differentiable ``torch.library`` op with a compiled kernel per device.

``mamba_ssm::selective_scan_fwd`` and its backward ``selective_scan_bwd`` run the extension that
``cuda_ops`` (``selective_scan_cuda``) or ``cpu_ops`` (``selective_scan_cpu``) registered for the inputs'
device, so ``torch.compile`` sees one op with one fake implementation and one autograd formula. Both
extensions share the calling convention: the forward saves the fp32 state before every chunk of
positions (``ckpt``) when a gradient will be needed, and the backward recomputes the states inside each
chunk from it; ``reverse=True`` scans from position L-1 down to 0 on natural-order inputs. Sequence
outputs (out, du, ddelta, dz) follow u's layout (``causal_conv1d.layout``).
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from causal_conv1d.layout import empty_in_layout


class KernelTraits(NamedTuple):
    chunk: int                  # positions per checkpoint
    state_slots: Optional[int]  # state slots per checkpoint, None for dstate


_KERNEL_TRAITS = {}  # device type -> KernelTraits


@torch.library.custom_op("mamba_ssm::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, return_last_state: bool,
              save_ckpt: bool, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out in u's dtype, last_state fp32 (batch, dim, dstate) or empty, ckpt fp32 or empty)."""
    raise RuntimeError(f"no selective-scan kernel is built for {u.device.type} tensors")


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, save_ckpt, reverse):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    traits = _KERNEL_TRAITS[u.device.type]
    f32 = torch.float32
    last = u.new_empty((batch, dim, dstate) if return_last_state else (0,), dtype=f32)
    ckpt_shape = (batch, dim, (seqlen + traits.chunk - 1) // traits.chunk, traits.state_slots or dstate) \
        if save_ckpt else (0,)
    return empty_in_layout(u), last, u.new_empty(ckpt_shape, dtype=f32)


@torch.library.custom_op("mamba_ssm::selective_scan_bwd", mutates_args=())
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], dout: Tensor, dlast: Optional[Tensor], ckpt: Tensor,
              delta_softplus: bool, reverse: bool) -> list[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; absent ones (no D / z / delta_bias) are empty."""
    raise RuntimeError(f"no selective-scan kernel is built for {u.device.type} tensors")


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt, delta_softplus, reverse):
    f32 = torch.float32
    dim = u.shape[1]
    return [
        empty_in_layout(u), empty_in_layout(u), u.new_empty(A.shape, dtype=f32),
        u.new_empty(B.shape), u.new_empty(C.shape),
        u.new_empty((dim,) if D is not None else (0,), dtype=f32),
        empty_in_layout(u) if z is not None else u.new_empty((0,), dtype=f32),
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
    if ckpt is None:  # the op was called directly with save_ckpt=False: recompute the checkpoints
        ckpt = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, False, True, ctx.reverse)[2]
    if dlast is not None and dlast.numel() == 0:
        dlast = None
    if dout is None:  # only the last state was used
        dout = torch.zeros_like(u)
    # dout in any layout: the kernels read it with its strides (CUDA: converted to u's layout if needed).
    du, ddelta, dA, dB, dC, dD, dz, ddb = _scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt,
                                                    ctx.delta_softplus, ctx.reverse)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            ddb if delta_bias is not None else None, None, None, None, None)


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def register_kernels(device_type, extension_ops, traits: KernelTraits):
    """Run the scan on `device_type` tensors through a built extension's `fwd` / `bwd` raw ops."""
    _KERNEL_TRAITS[device_type] = traits
    _scan_fwd.register_kernel(device_type)(lambda *args: tuple(extension_ops.fwd(*args)))
    _scan_bwd.register_kernel(device_type)(lambda *args: list(extension_ops.bwd(*args)))


def delta_projection(dt, weight):
    """delta = weight @ dt per position: dt (batch, rank, seqlen), weight (dim, rank) -> (batch, dim, seqlen),
    in the linear layer's (token-major) layout."""
    return torch.nn.functional.linear(dt.transpose(1, 2), weight).transpose(1, 2)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def normalise(u, delta, A, B, C, D, z, delta_bias):
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
    """Differentiable selective scan on the kernel registered for u's device.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate) real; B, C: (batch, groups, dstate, seqlen);
    D, delta_bias: (dim,) or None; z may be None. Returns out (batch, dim, seqlen) in u's dtype,
    and with return_last_state also the fp32 state (batch, dim, dstate) after the last position.
    u: float32/float16/bfloat16 (delta, B, C, z are cast to it; A, D, delta_bias to fp32).
    reverse=True scans positions L-1 .. 0 (= the scan of the flipped inputs, flipped back); its last
    state is then the state after position 0.
    """
    u, delta, A, B, C, D, z, delta_bias = normalise(u, delta, A, B, C, D, z, delta_bias)
    save_ckpt = needs_grad(u, delta, A, B, C, D, z, delta_bias)
    out, last, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state),
                             save_ckpt, bool(reverse))
    return (out, last) if return_last_state else out

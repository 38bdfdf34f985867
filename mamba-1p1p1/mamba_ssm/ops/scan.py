"""The selective scan (one direction): what it computes, its differentiable op, and which code runs it.

`selective_scan_ref` is the reference. The kernels run as one ``torch.library`` op, ``mamba_ssm::selective_scan_fwd``
and its backward ``selective_scan_bwd``, implemented per device by the compiled extension for it
(``selective_scan_cuda``: dstate <= 16; ``selective_scan_cpu``: fp32 / fp16 / bf16), so ``torch.compile``
sees one op with one fake implementation and one autograd formula. Both extensions share the calling
convention: the forward saves the fp32 state before every chunk of positions (``ckpt``) when a gradient
will be needed, and the backward recomputes the states inside each chunk from it; ``reverse=True`` scans
from position L-1 down to 0 on natural-order inputs. Sequence outputs (out, du, ddelta, dz) follow u's
layout (``causal_conv1d.layout``). `selective_scan_fn` chooses the path (`kernel_for`).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from causal_conv1d.layout import empty_in_layout
from mamba_ssm.ops import extensions, policy

BACKENDS = ("auto", "cuda", "cpu", "reference")
# Elements of one (chunk, batch, dim, dstate) block the reference materialises at a time: blocks that
# stay in the CPU's cache ran fastest (2**18 beat 2**20 and 2**22 by 2-3x on 2 cores at Vim-tiny size).
_REFERENCE_CHUNK_ELEMENTS = 1 << 18
# The CUDA kernels: checkpoints every CUDA_CHUNK positions with MAX_STATE state slots (1/2 float per element
# at N = 16; kChunk, kMaxState in csrc/selective_scan/ss_common.h). The CPU kernels: every CPU_CHUNK
# positions, dstate slots (1/4 float per element at N = 16; kChunk in csrc/selective_scan_cpu), computing
# in fp32 for CPU_DTYPES (float64 is left to the reference).
CUDA_CHUNK = 32
MAX_STATE = 16
CPU_CHUNK = 64
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must both be (batch, dim, seqlen), got {tuple(u.shape)} and {tuple(delta.shape)}"
        )
    batch, dim, seqlen = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim, dstate) with dim = {dim}, got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported: Vim uses real A = -exp(A_log)")
    dstate = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            ok = tuple(M.shape) == (dim, dstate)
        elif M.dim() == 3:
            ok = tuple(M.shape) == (batch, dstate, seqlen)
        elif M.dim() == 4:
            ok = M.shape[0] == batch and M.shape[2:] == (dstate, seqlen) and dim % M.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be (dim, dstate) = {(dim, dstate)}, (batch, dstate, seqlen) = {(batch, dstate, seqlen)} "
                f"or (batch, groups, dstate, seqlen) with groups dividing dim; got {tuple(M.shape)}"
            )
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _time_major(M, dim):
    """B or C as a time-major view that broadcasts against (seqlen, batch, dim, dstate): per channel
    (1, 1, dim, dstate); per step (seqlen, batch, groups, dstate) with groups 1 or a divisor of dim."""
    if M.dim() == 2:
        return M.view(1, 1, dim, -1)
    if M.dim() == 3:
        M = M.unsqueeze(1)
    return M.permute(3, 0, 1, 2)


def _steps(M_t, per_step, start, stop, dim):
    """The chunk [start, stop) of a time-major B or C, each group expanded to its channels."""
    if not per_step:
        return M_t
    chunk = M_t[start:stop]
    groups = chunk.shape[2]
    return chunk if groups == 1 else chunk.repeat_interleave(dim // groups, dim=2)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The selective scan in PyTorch, computed in float32 (float64 for float64 inputs).

    Per channel d and state n, with delta' = softplus(delta + delta_bias) when delta_softplus:
        h[t] = exp(delta'[t] * A[d, n]) * h[t-1] + delta'[t] * B[t, n] * u[t]
        y[t] = sum_n C[t, n] * h[t] + D[d] * u[t],   out = y * silu(z)
    u, delta, z: (batch, dim, seqlen); A: (dim, dstate); B, C: (dim, dstate), (batch, dstate, seqlen)
    or (batch, groups, dstate, seqlen) (channel d uses group d // (dim / groups)). Returns out in u's
    dtype (and the fp32 last state (batch, dim, dstate) when asked).

    Vectorised over batch, channels and states; the recurrence runs position by position inside
    chunks so that only one chunk's (dstate x seqlen) factors exist at a time.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    compute_dtype = torch.promote_types(u.dtype, torch.float32)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]

    u = u.to(compute_dtype)
    delta = delta.to(compute_dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute_dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # Time-major layout (seqlen, batch, dim, dstate): every step of the recurrence reads and writes
    # contiguous memory, and per-step B and C broadcast over channels without copies.
    delta_t = delta.permute(2, 0, 1).unsqueeze(-1)
    u_t = u.permute(2, 0, 1).unsqueeze(-1)
    A_t = A.to(compute_dtype).view(1, 1, dim, dstate)
    B_t = _time_major(B.to(compute_dtype), dim)
    C_t = _time_major(C.to(compute_dtype), dim)

    track_grad = policy.needs_grad(u, delta, A, B, C, D, z, delta_bias)
    chunk = max(1, min(seqlen, _REFERENCE_CHUNK_ELEMENTS // max(1, batch * dim * dstate)))
    h = u.new_zeros(batch, dim, dstate)
    ys = []
    for start in range(0, seqlen, chunk):
        stop = min(seqlen, start + chunk)
        decay = torch.exp(delta_t[start:stop] * A_t)
        inflow = (delta_t[start:stop] * u_t[start:stop]) * _steps(B_t, B.dim() > 2, start, stop, dim)
        if track_grad:
            states = []
            for t in range(stop - start):
                h = torch.addcmul(inflow[t], decay[t], h)
                states.append(h)
            states = torch.stack(states)
        else:
            # Without autograd the states overwrite the inflow buffer in place: no per-step allocation.
            states = inflow
            states[0].addcmul_(decay[0], h)
            for t in range(1, stop - start):
                states[t].addcmul_(decay[t], states[t - 1])
            h = states[-1]
        ys.append((states * _steps(C_t, C.dim() > 2, start, stop, dim)).sum(-1))
    y = torch.cat(ys).permute(1, 2, 0)
    if D is not None:
        y = y + u * D.to(compute_dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    out = y.to(out_dtype)
    if return_last_state:
        return out, h
    return out


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


def _register_kernels(device_type, extension_ops, traits: KernelTraits):
    """Run the scan on `device_type` tensors through a built extension's `fwd` / `bwd` raw ops."""
    _KERNEL_TRAITS[device_type] = traits
    _scan_fwd.register_kernel(device_type)(lambda *args: tuple(extension_ops.fwd(*args)))
    _scan_bwd.register_kernel(device_type)(lambda *args: list(extension_ops.bwd(*args)))


if extensions.cuda.available():
    _register_kernels("cuda", torch.ops.selective_scan_cuda, KernelTraits(CUDA_CHUNK, state_slots=MAX_STATE))
if extensions.cpu.available():
    _register_kernels("cpu", torch.ops.selective_scan_cpu, KernelTraits(CPU_CHUNK, state_slots=None))


def delta_projection(dt, weight):
    """delta = weight @ dt per position: dt (batch, rank, seqlen), weight (dim, rank) -> (batch, dim, seqlen),
    in the linear layer's (token-major) layout."""
    return torch.nn.functional.linear(dt.transpose(1, 2), weight).transpose(1, 2)


def normalise(u, delta, A, B, C, D, z, delta_bias):
    """Cast to the kernels' dtypes (differentiably): sequences in u's dtype, parameters in fp32."""
    dt = u.dtype
    delta, B, C = delta.to(dt), B.to(dt), C.to(dt)
    z = z.to(dt) if z is not None else None
    A = A.to(torch.float32)
    D = D.to(torch.float32) if D is not None else None
    delta_bias = delta_bias.to(torch.float32) if delta_bias is not None else None
    return u, delta, A, B, C, D, z, delta_bias


def _kernel_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
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
    save_ckpt = policy.needs_grad(u, delta, A, B, C, D, z, delta_bias)
    out, last, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state),
                             save_ckpt, bool(reverse))
    return (out, last) if return_last_state else out


def cuda_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
                        reverse: bool = False):
    """Differentiable CUDA selective scan (`_kernel_scan`) for dstate <= MAX_STATE; B, C (batch, groups, dstate,
    seqlen)."""
    extensions.cuda.require()
    if A.dim() != 2 or not 1 <= A.shape[1] <= MAX_STATE:
        raise ValueError(f"selective_scan: the CUDA kernels support dstate 1..{MAX_STATE} (A is (dim, dstate)); "
                         f"got A of shape {tuple(A.shape)}")
    return _kernel_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)


def cpu_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
                       reverse: bool = False):
    """Differentiable fused CPU selective scan (`_kernel_scan`); dstate <= 256; B, C (batch, groups, dstate,
    seqlen)."""
    extensions.cpu.require()
    return _kernel_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)


def cpu_kernel_takes(u: Tensor) -> bool:
    """Whether the CPU kernel takes a scan of u (with per-step real B and C): a CPU tensor, fp32/fp16/bf16."""
    return policy.kernel_takes(u, extensions.cpu, "cpu", CPU_DTYPES)


def kernel_for(backend, u, per_step):
    """The kernel bridge (cuda_selective_scan or cpu_selective_scan) that runs a scan of u (per_step: with
    per-position B and C), or None for the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return None
    if backend == "auto":
        if per_step and policy.kernel_takes(u, extensions.cuda, "cuda"):
            return cuda_selective_scan
        return cpu_selective_scan if per_step and cpu_kernel_takes(u) else None
    extension, bridge = ((extensions.cuda, cuda_selective_scan) if backend == "cuda"
                         else (extensions.cpu, cpu_selective_scan))
    extension.require()
    if u.device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend.upper()} tensors, got {u.device.type} ones; "
                         "move them or use backend='auto'")
    if not per_step:
        raise ValueError("the scan kernels take per-step B and C only; use backend='reference' for (dim, dstate)")
    return bridge


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, backend="auto", reverse=False):
    """The selective scan (see selective_scan_ref) on a compiled kernel where one is built for the input's
    device (CUDA; CPU for fp32/fp16/bf16), else on the reference. reverse=True scans from the last
    position to the first (the scan of the flipped inputs, flipped back; the kernels index backwards).
    backend: "auto", "cuda" or "cpu" (that kernel, or an error saying how to build it) or "reference"."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    bridge = kernel_for(backend, u, B.dim() > 2 and C.dim() > 2 and not (B.is_complex() or C.is_complex()))
    if bridge is not None:
        B = B.unsqueeze(1) if B.dim() == 3 else B
        C = C.unsqueeze(1) if C.dim() == 3 else C
        return bridge(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
    if not reverse:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    def flip(t):
        return t.flip(-1) if t is not None and t.dim() > 2 else t

    result = selective_scan_ref(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus,
                                return_last_state)
    if return_last_state:
        return result[0].flip(-1), result[1]
    return result.flip(-1)

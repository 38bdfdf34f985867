"""Selective scan and the Mamba inner op: PyTorch references and the single dispatch point per op."""
import torch
import torch.nn.functional as F

from causal_conv1d import causal_conv1d_bidirectional_fn, causal_conv1d_fn
from causal_conv1d.layout import is_token_major
from mamba_ssm.ops import cpu_ops, cuda_ops, linear_3xtf32, scan_ops

BACKENDS = ("auto", "cuda", "cpu", "reference")
# Elements of one (chunk, batch, dim, dstate) block the reference materialises at a time: blocks that
# stay in the CPU's cache ran fastest (2**18 beat 2**20 and 2**22 by 2-3x on 2 cores at Vim-tiny size).
_REFERENCE_CHUNK_ELEMENTS = 1 << 18


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

    track_grad = scan_ops.needs_grad(u, delta, A, B, C, D, z, delta_bias)
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


def _kernel_for(backend, u, per_step):
    """The kernel bridge (cuda_ops or cpu_ops) that runs a scan of u (per_step: with per-position B and C),
    or None for the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return None
    if backend == "auto":
        if u.is_cuda and cuda_ops.available() and per_step:
            return cuda_ops
        return cpu_ops if per_step and cpu_ops.supports(u) else None
    bridge = cuda_ops if backend == "cuda" else cpu_ops
    bridge.require()
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
    bridge = _kernel_for(backend, u, B.dim() > 2 and C.dim() > 2 and not (B.is_complex() or C.is_complex()))
    if bridge is not None:
        B = B.unsqueeze(1) if B.dim() == 3 else B
        C = C.unsqueeze(1) if C.dim() == 3 else C
        return bridge.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     reverse)
    if not reverse:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    def flip(t):
        return t.flip(-1) if t is not None and t.dim() > 2 else t

    result = selective_scan_ref(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus,
                                return_last_state)
    if return_last_state:
        return result[0].flip(-1), result[1]
    return result.flip(-1)


def _split_xz(xz):
    """x and z, the two channel halves of xz (batch, 2 * d_inner, seqlen). A token-major xz (the in_proj
    output, transposed) is split along its contiguous channel dim, so that the gradient of xz is built in
    that same layout and in_proj's backward needs no copy."""
    if is_token_major(xz):
        x, z = xz.transpose(1, 2).chunk(2, dim=-1)
        return x.transpose(1, 2), z.transpose(1, 2)
    return xz.chunk(2, dim=1)


def _conv_weight(conv1d_weight):
    """A Conv1d weight (dim, 1, width) as the conv ops take it, (dim, width)."""
    return conv1d_weight.reshape(conv1d_weight.shape[0], -1)


def _project(u, x_proj_weight, dstate, delta_rank, B=None, C=None, B_proj_bias=None, C_proj_bias=None):
    """x_proj of the conv output u (batch, channels, seqlen) -> [dt | B | C] per position (`_split_x_dbl`)."""
    # (batch, seqlen, rank + 2 * dstate); a product too skinny for the eager 3xTF32 op (see linear_3xtf32)
    x_dbl = linear_3xtf32.linear(u.transpose(1, 2), x_proj_weight, compiled_only=True)
    return _split_x_dbl(x_dbl, dstate, delta_rank, B, C, B_proj_bias, C_proj_bias)


def _split_x_dbl(x_dbl, dstate, delta_rank, B=None, C=None, B_proj_bias=None, C_proj_bias=None):
    """An x_proj output (batch, seqlen, rank + 2 * dstate) as the low-rank dt (batch, delta_rank, seqlen)
    and B, C (batch, dstate, seqlen) (where not given), views of x_dbl."""
    # One split, not three slices: its backward is one concatenation instead of a zero-filled
    # x_dbl-sized gradient per slice, summed.
    dt, B_proj, C_proj = x_dbl.split([delta_rank, dstate, x_dbl.shape[-1] - delta_rank - dstate], dim=-1)
    if B is None:
        B = (B_proj if B_proj_bias is None else B_proj + B_proj_bias).transpose(1, 2)
    if C is None:
        C = (C_proj if C_proj_bias is None else C_proj + C_proj_bias).transpose(1, 2)
    return dt.transpose(1, 2), B, C


def _ssm_inputs(x, conv1d_weight, conv1d_bias, x_proj_weight, dstate, delta_rank, B=None, C=None, B_proj_bias=None,
                C_proj_bias=None, backend="auto", reverse=False):
    """Conv (SiLU; anti-causal when reverse) of x, then x_proj (`_project`). Returns (u, dt, B, C) with u
    the conv output (batch, channels, seqlen)."""
    u = causal_conv1d_fn(x, _conv_weight(conv1d_weight), conv1d_bias, activation="silu", backend=backend,
                         reverse=reverse)
    return (u, *_project(u, x_proj_weight, dstate, delta_rank, B, C, B_proj_bias, C_proj_bias))


def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A,
                               B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                               delta_softplus=True, backend="auto"):
    """One direction of a Mamba mixer before its output projection.

    xz: (batch, 2 * d_inner, seqlen) holding x then the gate z. x goes through the causal conv (SiLU),
    x_proj gives [dt | B | C] per position (B, C only where not given), delta = delta_proj_weight @ dt,
    then the selective scan with softplus(delta + delta_bias), skip D and gate silu(z).
    Returns (batch, d_inner, seqlen).
    """
    x, z = _split_xz(xz)
    x, dt, B, C = _ssm_inputs(x, conv1d_weight, conv1d_bias, x_proj_weight, A.shape[1], delta_proj_weight.shape[1],
                              B, C, B_proj_bias, C_proj_bias, backend)
    return selective_scan_fn(x, scan_ops.delta_projection(dt, delta_proj_weight), A, B, C, D, z=z, delta_bias=delta_bias,
                             delta_softplus=delta_softplus, backend=backend)


def mamba_inner_ref(*args, **kwargs):
    """mamba_inner_fn_no_out_proj computed on the reference ops only."""
    return mamba_inner_fn_no_out_proj(*args, backend="reference", **kwargs)


def bimamba_v1_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, A_b,
                                    D=None, delta_bias=None, backend="auto"):
    """The "v1" bidirectional mixer before its output projection: one conv and one set of projections
    (forward direction); a second scan with A_b runs over their outputs from the end. Returns the sum
    of both directions in natural position order, (batch, d_inner, seqlen)."""
    x, z = _split_xz(xz)
    x, dt, B, C = _ssm_inputs(x, conv1d_weight, conv1d_bias, x_proj_weight, A.shape[1], delta_proj_weight.shape[1],
                              backend=backend)
    delta = scan_ops.delta_projection(dt, delta_proj_weight)
    scan = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True, backend=backend)
    return (selective_scan_fn(x, delta, A, B, C, **scan)
            + selective_scan_fn(x, delta, A_b, B, C, reverse=True, **scan))


def bimamba_inner_fn_no_out_proj(xz, forward_params, backward_params, backend="auto", out_scale=1.0):
    """Both directions of a bidirectional ("v2") Mamba mixer before its output projection.

    forward_params / backward_params: dicts with each direction's conv1d_weight, conv1d_bias,
    x_proj_weight, delta_proj_weight, A, D and delta_bias. The backward direction is the forward
    computation on the flipped sequence, flipped back: an anti-causal conv and a scan from the end, on
    natural-order tensors. On CUDA both scans run in one fused kernel, which also forms delta from the
    low-rank dt itself. Returns (y_forward + y_backward) * out_scale, (batch, d_inner, seqlen): Vim averages
    the directions with out_scale 0.5, which the fused kernels apply to the output and its gradient.
    """
    x, z = _split_xz(xz)
    directions = (forward_params, backward_params)
    fused = _kernel_for(backend, x, per_step=True) is cuda_ops and \
        max(p["delta_proj_weight"].shape[1] for p in directions) <= cuda_ops.MAX_DELTA_RANK
    # Inference on the fused kernel: the conv runs again inside the scan, so each direction's conv
    # output lives only until its x_proj has read it (peak memory at high resolution).
    fuse_conv = fused and not scan_ops.needs_grad(xz, *forward_params.values(), *backward_params.values())
    ranks = [(p["A"].shape[1], p["delta_proj_weight"].shape[1]) for p in directions]
    conv_weights, proj_weights = [p["conv1d_weight"] for p in directions], [p["x_proj_weight"] for p in directions]

    def conv(params):
        return (_conv_weight(params["conv1d_weight"]), params["conv1d_bias"]) if fuse_conv else None

    if fuse_conv and cuda_ops.conv_x_proj_applies(x, conv_weights, proj_weights):  # no conv outputs at all
        x_dbls = cuda_ops.bidirectional_conv_x_proj(x, *map(conv, directions), *proj_weights)
        inputs = [(x, *_split_x_dbl(x_dbl, *r)) for x_dbl, r in zip(x_dbls, ranks)]
    elif fuse_conv:
        inputs = [(x, *_ssm_inputs(x, p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"], *r, backend=backend,
                                   reverse=reverse)[1:])
                  for p, r, reverse in zip(directions, ranks, (False, True))]
    else:  # both convs in one pass over x where the kernel takes it (x read once, one dx written)
        convs = [t for p in directions for t in (_conv_weight(p["conv1d_weight"]), p["conv1d_bias"])]
        if backend in ("auto", "cpu") and cpu_ops.conv_silu_pair_applies(x, *convs):
            us = cpu_ops.conv_silu_pair(x, *convs)
        else:
            us = causal_conv1d_bidirectional_fn(x, *convs, activation="silu", backend=backend)
        inputs = [(u, *_project(u, p["x_proj_weight"], *r)) for u, p, r in zip(us, directions, ranks)]
    if fused:
        def kernel_args(params, u, dt, B, C):
            return (u, dt, params["A"], B.unsqueeze(1), C.unsqueeze(1), params["D"], params["delta_bias"])

        return cuda_ops.bimamba_scan(*kernel_args(forward_params, *inputs[0]), *kernel_args(backward_params, *inputs[1]),
                                     z, delta_softplus=True,
                                     delta_proj_weight_f=forward_params["delta_proj_weight"],
                                     delta_proj_weight_b=backward_params["delta_proj_weight"],
                                     conv_f=conv(forward_params), conv_b=conv(backward_params), out_scale=out_scale)
    ys = [selective_scan_fn(u, scan_ops.delta_projection(dt, params["delta_proj_weight"]), params["A"], B, C,
                            params["D"], z=z, delta_bias=params["delta_bias"], delta_softplus=True, backend=backend,
                            reverse=reverse)
          for params, (u, dt, B, C), reverse in zip(directions, inputs, (False, True))]
    y = ys[0] + ys[1]
    return y if out_scale == 1.0 else y.mul_(out_scale)  # in place: the sum is a fresh tensor

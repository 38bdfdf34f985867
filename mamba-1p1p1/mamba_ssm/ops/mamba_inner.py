"""The Mamba inner op, one direction and the bidirectional (Vim) variants: what they compute, and which code runs
them.

`mamba_inner_fn_no_out_proj` (one direction), `bimamba_v1_inner_fn_no_out_proj` and
`bimamba_inner_fn_no_out_proj` ("v2", Vim's block) compose the causal conv, x_proj, the delta projection and
the selective scan (`scan`); `mamba_inner_ref` runs them on the references only. On CUDA the v2 block runs
its two scans as one differentiable op (`fused_bimamba_scan`, ``mamba_ssm::bimamba_scan_fwd`` / ``_bwd``,
traced by ``torch.compile`` without graph breaks), and in eager inference its convs and x_proj as one
kernel (`bidirectional_conv_x_proj`); in CPU inference the same op runs both scans in one pass (the
selective_scan_cpu kernel), after both convs in one pass (`conv_silu_pair`). `bimamba_inner_fn_no_out_proj`
chooses among these paths.
"""
from typing import Optional

import torch
from torch import Tensor

from causal_conv1d import causal_conv1d_bidirectional_fn, causal_conv1d_fn
from causal_conv1d.layout import empty_in_layout, is_token_major
from mamba_ssm.ops import extensions, linear_3xtf32, policy, scan
from mamba_ssm.ops.scan import selective_scan_fn


MAX_CONV_PROJ_OUT = 96  # rank + 2 * dstate that conv_x_proj holds (kMaxConvProjOut in csrc/conv_x_proj/conv_x_proj.h)
CONV_PROJ_DTYPES = (torch.float16, torch.bfloat16)


def conv_x_proj_applies(x, conv_weights, proj_weights) -> bool:
    """Whether `bidirectional_conv_x_proj` takes x (batch, dim, seqlen) with these conv weights (dim, 1,
    width) and x_proj weights (out_dim, dim), one per direction: eager (not under torch.compile, whose
    inductor has its own conv and matmul kernels), CUDA, bf16/fp16 (tensor cores), batch <= 65535,
    token-major x whose channel pairs are 4-byte aligned (as a linear layer's output is), dim a multiple
    of 8, one conv width <= 4 and one out_dim <= MAX_CONV_PROJ_OUT for both directions."""
    if torch.compiler.is_compiling():  # first: data_ptr() would break a traced graph
        return False
    widths = {w.shape[-1] for w in conv_weights}
    out_shapes = {tuple(w.shape) for w in proj_weights}
    return (policy.kernel_takes(x, extensions.cuda, "cuda", CONV_PROJ_DTYPES)
            and x.shape[0] <= 65535 and x.shape[1] % 8 == 0
            and x.stride(1) == 1 and x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0 and x.stride(2) % 2 == 0
            and len(widths) == 1 and widths.pop() <= 4
            and len(out_shapes) == 1 and out_shapes.pop()[0] <= MAX_CONV_PROJ_OUT)


def bidirectional_conv_x_proj(x, conv_f, conv_b, proj_weight_f, proj_weight_b):
    """Inference front end of a Vim v2 block in one kernel: silu(conv_f(x)) @ proj_weight_f.T and
    silu(conv_b(x)) @ proj_weight_b.T, where conv_* = (weight (dim, width <= 4), bias or None) and conv_b is
    anti-causal (the conv of the flipped sequence, flipped back). The conv outputs are rounded to x's dtype,
    as a separate conv would write them, and never stored. Returns (x_dbl_f, x_dbl_b), each (batch,
    seqlen, out_dim) in x's dtype (the weights are cast to it, as autocast does for a linear layer)."""
    extensions.cuda.require()
    return torch.ops.selective_scan_cuda.conv_x_proj(x, *conv_f, *conv_b, proj_weight_f, proj_weight_b)


CONV_SILU_PAIR_DTYPES = (torch.float32,)


def conv_silu_pair_applies(x, *params) -> bool:
    """Whether `conv_silu_pair` takes both convs of a bidirectional block over x: inference (no autograd
    through x or the weights), an fp32 token-major CPU tensor (the layout the block's in_proj writes), and
    CPU fp32 weights and biases."""
    return (policy.kernel_takes(x, extensions.cpu, "cpu", CONV_SILU_PAIR_DTYPES) and is_token_major(x)
            and not policy.needs_grad(x, *params)
            and all(p is None or (p.device.type == "cpu" and p.dtype == torch.float32) for p in params))


def conv_silu_pair(x, weight_f, bias_f, weight_b, bias_b):
    """(silu(causal conv of x), silu(anti-causal conv of x)) in one pass over x, token-major outputs;
    inference only (see conv_silu_pair_applies). Weights (dim, width), biases (dim,) or None."""
    extensions.cpu.require()
    return tuple(torch.ops.selective_scan_cpu.conv_silu_pair(x, weight_f, bias_f, weight_b, bias_b))


if extensions.cpu.available():
    @torch.library.register_fake("selective_scan_cpu::conv_silu_pair")
    def _(x, weight_f, bias_f, weight_b, bias_b):
        return tuple(empty_in_layout(x) for _ in range(2))


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


def _bi_kernels(u):
    """The ops of the extension that runs the fused bidirectional scan of u (its device's)."""
    if u.device.type == "cuda":
        extensions.cuda.require()
        return torch.ops.selective_scan_cuda
    extensions.cpu.require()
    return torch.ops.selective_scan_cpu


@torch.library.custom_op("mamba_ssm::bimamba_scan_fwd", mutates_args=())
def _bi_fwd(u_f: Tensor, delta_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Optional[Tensor],
            delta_bias_f: Optional[Tensor], u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
            D_b: Optional[Tensor], delta_bias_b: Optional[Tensor], z: Tensor, dt_proj_f: Optional[Tensor],
            dt_proj_b: Optional[Tensor], conv_weight_f: Optional[Tensor], conv_bias_f: Optional[Tensor],
            conv_weight_b: Optional[Tensor], conv_bias_b: Optional[Tensor], delta_softplus: bool,
            save_ckpt: bool, out_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out = silu(z) * ysum * out_scale in u's dtype, ysum = y_f + y_b fp32 (ungated, unscaled), ckpt_f,
    ckpt_b); all but out empty unless save_ckpt (CUDA only: the CPU kernel is for inference)."""
    out, ysum, ck_f, ck_b = _bi_kernels(u_f).bi_fwd(
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
    ck_shape = (batch, dim, (seqlen + scan.CUDA_CHUNK - 1) // scan.CUDA_CHUNK, scan.MAX_STATE) if save_ckpt else (0,)
    ysum = empty_in_layout(u_f, f32) if save_ckpt else u_f.new_empty((0,), dtype=f32)
    return empty_in_layout(u_f), ysum, u_f.new_empty(ck_shape, dtype=f32), u_f.new_empty(ck_shape, dtype=f32)


@torch.library.custom_op("mamba_ssm::bimamba_scan_bwd", mutates_args=())
def _bi_bwd(u_f: Tensor, delta_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Optional[Tensor],
            delta_bias_f: Optional[Tensor], u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
            D_b: Optional[Tensor], delta_bias_b: Optional[Tensor], z: Tensor, dout: Tensor, ysum: Tensor,
            ckpt_f: Tensor, ckpt_b: Tensor, delta_softplus: bool, out_scale: float) -> list[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, ddelta_bias of f, the same of b, dz]; absent ones empty."""
    extensions.cuda.require()  # CPU training runs each direction's scan, which has its own backward
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
            delta = scan.delta_projection(delta, dt_proj.to(delta.dtype))
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


def fused_bimamba_scan(u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b,
                       delta_bias_b, z, delta_softplus: bool, delta_proj_weight_f=None, delta_proj_weight_b=None,
                       conv_f=None, conv_b=None, out_scale: float = 1.0):
    """Differentiable fused bidirectional selective scan of a Vim v2 block.

    Returns silu(z) * (y_f + y_b) * out_scale in u's dtype (Vim's average: out_scale 0.5), where y_f is the scan
    of direction f (no gate) and y_b the scan of direction b run from position L-1 down to 0, i.e.
    flip(scan(flip(inputs_b))) without any flipped copy. All sequence inputs are in natural order, with
    the shapes of `selective_scan` (B/C as (batch, groups, dstate, seqlen)); z is required. With
    delta_proj_weight_* (dim, rank), rank <= 64, that direction's delta is given as the low-rank dt
    (batch, rank, seqlen) and delta = W @ dt is formed inside the kernels. Inference only: conv_* =
    (weight (dim, width), bias or None) makes that direction's u the input of its causal conv (anti-causal
    for b), which the kernel applies with SiLU (CUDA only). One kernel launch for both directions forward,
    one for both backward. On the CPU (the selective_scan_cpu kernel, dstate <= 256) the op is for inference:
    under autograd, run each direction's `selective_scan_fn`.
    """
    on_cuda = u_f.device.type == "cuda"
    _bi_kernels(u_f)
    for A in (A_f, A_b):
        if on_cuda and (A.dim() != 2 or not 1 <= A.shape[1] <= scan.MAX_STATE):
            raise ValueError(f"bimamba_scan: the CUDA kernels support dstate 1..{scan.MAX_STATE}; "
                             f"got A {tuple(A.shape)}")
    if u_b.shape != u_f.shape or z.shape != u_f.shape:
        raise ValueError(f"bimamba_scan: u_f, u_b and z must have one shape, got {tuple(u_f.shape)}, "
                         f"{tuple(u_b.shape)}, {tuple(z.shape)}")
    for W in (delta_proj_weight_f, delta_proj_weight_b):
        if W is not None and not (W.dim() == 2 and W.shape[0] == u_f.shape[1] and W.shape[1] <= MAX_DELTA_RANK):
            raise ValueError(f"bimamba_scan: a delta projection weight must be (dim, rank) with dim = {u_f.shape[1]} "
                             f"and rank <= {MAX_DELTA_RANK}; got {tuple(W.shape)}")
    u_f, delta_f, A_f, B_f, C_f, D_f, z, delta_bias_f = scan.normalise(u_f, delta_f, A_f, B_f, C_f, D_f, z, delta_bias_f)
    u_b = u_b.to(u_f.dtype)
    u_b, delta_b, A_b, B_b, C_b, D_b, _, delta_bias_b = scan.normalise(u_b, delta_b, A_b, B_b, C_b, D_b, None, delta_bias_b)
    tensors = (u_f, delta_f, A_f, B_f, C_f, D_f, delta_bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b, z,
               delta_proj_weight_f, delta_proj_weight_b)
    convs = [t for conv in (conv_f, conv_b) for t in (conv if conv is not None else (None, None))]
    save_ckpt = policy.needs_grad(*tensors, *convs)
    if save_ckpt and not on_cuda:
        raise ValueError("bimamba_scan: on the CPU the fused bidirectional scan is for inference; under autograd, "
                         "run each direction's selective_scan_fn (as bimamba_inner_fn_no_out_proj does)")
    if save_ckpt and (conv_f is not None or conv_b is not None):
        raise ValueError("bimamba_scan: the fused conv (conv_f / conv_b) is for inference; without it, apply "
                         "causal_conv1d first, or run under torch.no_grad() / inference_mode()")
    out, _, _, _ = _bi_fwd(*tensors, *convs, bool(delta_softplus), save_ckpt, float(out_scale))
    return out


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
    return selective_scan_fn(x, scan.delta_projection(dt, delta_proj_weight), A, B, C, D, z=z, delta_bias=delta_bias,
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
    delta = scan.delta_projection(dt, delta_proj_weight)
    scan_args = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True, backend=backend)
    return (selective_scan_fn(x, delta, A, B, C, **scan_args)
            + selective_scan_fn(x, delta, A_b, B, C, reverse=True, **scan_args))


def bimamba_inner_fn_no_out_proj(xz, forward_params, backward_params, backend="auto", out_scale=1.0):
    """Both directions of a bidirectional ("v2") Mamba mixer before its output projection.

    forward_params / backward_params: dicts with each direction's conv1d_weight, conv1d_bias,
    x_proj_weight, delta_proj_weight, A, D and delta_bias. The backward direction is the forward
    computation on the flipped sequence, flipped back: an anti-causal conv and a scan from the end, on
    natural-order tensors. On CUDA, and in CPU inference, both scans run in one fused kernel, which also forms
    delta from the low-rank dt itself. Returns (y_forward + y_backward) * out_scale, (batch, d_inner, seqlen): Vim averages
    the directions with out_scale 0.5, which the fused kernels apply to the output and its gradient.
    """
    x, z = _split_xz(xz)
    directions = (forward_params, backward_params)
    grad = policy.needs_grad(xz, *forward_params.values(), *backward_params.values())
    kernel = scan.kernel_for(backend, x, per_step=True)
    # The fused op: on CUDA always, on the CPU for inference (its kernel has no backward).
    fused = (kernel is scan.cuda_selective_scan or (kernel is scan.cpu_selective_scan and not grad)) and \
        max(p["delta_proj_weight"].shape[1] for p in directions) <= MAX_DELTA_RANK
    # Inference on the fused CUDA kernel: the conv runs again inside the scan, so each direction's conv
    # output lives only until its x_proj has read it (peak memory at high resolution).
    fuse_conv = fused and kernel is scan.cuda_selective_scan and not grad
    ranks = [(p["A"].shape[1], p["delta_proj_weight"].shape[1]) for p in directions]
    conv_weights, proj_weights = [p["conv1d_weight"] for p in directions], [p["x_proj_weight"] for p in directions]

    def conv(params):
        return (_conv_weight(params["conv1d_weight"]), params["conv1d_bias"]) if fuse_conv else None

    if fuse_conv and conv_x_proj_applies(x, conv_weights, proj_weights):  # no conv outputs at all
        x_dbls = bidirectional_conv_x_proj(x, *map(conv, directions), *proj_weights)
        inputs = [(x, *_split_x_dbl(x_dbl, *r)) for x_dbl, r in zip(x_dbls, ranks)]
    elif fuse_conv:
        inputs = [(x, *_ssm_inputs(x, p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"], *r, backend=backend,
                                   reverse=reverse)[1:])
                  for p, r, reverse in zip(directions, ranks, (False, True))]
    else:  # both convs in one pass over x where the kernel takes it (x read once, one dx written)
        convs = [t for p in directions for t in (_conv_weight(p["conv1d_weight"]), p["conv1d_bias"])]
        if backend in ("auto", "cpu") and conv_silu_pair_applies(x, *convs):
            us = conv_silu_pair(x, *convs)
        else:
            us = causal_conv1d_bidirectional_fn(x, *convs, activation="silu", backend=backend)
        inputs = [(u, *_project(u, p["x_proj_weight"], *r)) for u, p, r in zip(us, directions, ranks)]
    if fused:
        def kernel_args(params, u, dt, B, C):
            return (u, dt, params["A"], B.unsqueeze(1), C.unsqueeze(1), params["D"], params["delta_bias"])

        return fused_bimamba_scan(*kernel_args(forward_params, *inputs[0]), *kernel_args(backward_params, *inputs[1]),
                                  z, delta_softplus=True,
                                  delta_proj_weight_f=forward_params["delta_proj_weight"],
                                  delta_proj_weight_b=backward_params["delta_proj_weight"],
                                  conv_f=conv(forward_params), conv_b=conv(backward_params), out_scale=out_scale)
    ys = [selective_scan_fn(u, scan.delta_projection(dt, params["delta_proj_weight"]), params["A"], B, C,
                            params["D"], z=z, delta_bias=params["delta_bias"], delta_softplus=True, backend=backend,
                            reverse=reverse)
          for params, (u, dt, B, C), reverse in zip(directions, inputs, (False, True))]
    y = ys[0] + ys[1]
    return y if out_scale == 1.0 else y.mul_(out_scale)  # in place: the sum is a fresh tensor

"""GPU tests of the selective-scan CUDA kernels: outputs, last state and all gradients against a
float64 reference, with per-dtype error bounds relative to the same-precision PyTorch reference
(see tests/gpu/gpu_test_helpers.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from gpu_test_helpers import check_bound, conv_silu_ref, fresh_seed, poison_allocator  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEQLENS = [1, 63, 197, 730, 2049, 6085]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _ref(u, delta, A, B, C, D, z, delta_bias, softplus, last, reverse):
    from mamba_ssm.ops.scan import selective_scan_ref

    if not reverse:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, softplus, last)
    fl = lambda t: t.flip(-1) if t is not None else None  # noqa: E731
    res = selective_scan_ref(fl(u), fl(delta), A, fl(B), fl(C), D, fl(z), delta_bias, softplus, last)
    if last:
        return res[0].flip(-1), res[1]
    return res.flip(-1)


def make_inputs(batch, dim, seqlen, dstate, dtype, groups=1, has_z=True, has_D=True, has_bias=True,
                softplus=True):
    """Vim-like inputs: A = -(1..N) (jittered), delta_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1]."""
    dev = "cuda"
    u = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)
    if softplus:
        delta = (0.5 * torch.randn(batch, dim, seqlen, device=dev)).to(dtype)
    else:
        delta = (0.2 * torch.rand(batch, dim, seqlen, device=dev)).to(dtype)
    A = -torch.arange(1, dstate + 1, device=dev, dtype=torch.float32).repeat(dim, 1)
    A = A * (0.5 + torch.rand(dim, dstate, device=dev))
    B = torch.randn(batch, groups, dstate, seqlen, device=dev, dtype=dtype)
    C = torch.randn(batch, groups, dstate, seqlen, device=dev, dtype=dtype)
    D = torch.randn(dim, device=dev) if has_D else None
    z = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype) if has_z else None
    if has_bias:
        dt = torch.exp(torch.rand(dim, device=dev) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        # softplus^-1(dt) when softplus is applied; without softplus a small positive bias keeps
        # delta + bias > 0 (a negative step would make exp(delta * A) > 1 and the states blow up).
        delta_bias = dt + torch.log(-torch.expm1(-dt)) if softplus else dt
    else:
        delta_bias = None
    return [u, delta, A, B, C, D, z, delta_bias]


def to_token_major(inputs):
    """The same values with channel stride 1, as a Vim block produces them: u, delta, z as (batch, seqlen, dim)
    tensors transposed, B and C as (batch, seqlen, groups, dstate) ones permuted."""
    out = list(inputs)
    for i in (0, 1, 6):
        if out[i] is not None:
            out[i] = out[i].transpose(1, 2).contiguous().transpose(1, 2)
    for i in (3, 4):
        out[i] = out[i].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    return out


def run_case(batch, dim, seqlen, dtype, dstate=16, groups=1, has_z=True, has_D=True, has_bias=True,
             softplus=True, reverse=False, last_state=False, inputs=None):
    from mamba_ssm.ops import scan

    seed = fresh_seed()
    if inputs is None:
        inputs = make_inputs(batch, dim, seqlen, dstate, dtype, groups, has_z, has_D, has_bias, softplus)
    dout = torch.randn(batch, dim, seqlen, device="cuda", dtype=dtype)
    dlast = torch.randn(batch, dim, dstate, device="cuda") if last_state else None

    def leaves(cast):
        return [cast(t).detach().clone().requires_grad_() if t is not None else None for t in inputs]

    def loss(res):
        if last_state:
            out, last = res
            return (out.double() * dout.double()).sum() + (last.double() * dlast.double()).sum(), res
        return (res.double() * dout.double()).sum(), res

    k_in = leaves(lambda t: t)
    poison_allocator()
    res_k = scan.cuda_selective_scan(*k_in, softplus, last_state, reverse=reverse)
    poison_allocator()
    lk, res_k = loss(res_k)
    lk.backward()
    r64 = leaves(lambda t: t.double())
    l64, res_64 = loss(_ref(*r64, softplus, last_state, reverse))
    l64.backward()
    rlo = leaves(lambda t: t)
    llo, res_lo = loss(_ref(*rlo, softplus, last_state, reverse))
    llo.backward()

    out_k = res_k[0] if last_state else res_k
    assert out_k.dtype == dtype and out_k.shape == inputs[0].shape
    if seqlen > 1:  # outputs and du keep u's layout (token-major when u is)
        assert (out_k.stride(1) == 1) == (k_in[0].grad.stride(1) == 1) == (inputs[0].stride(1) == 1)
    check_bound("out", out_k, res_64[0] if last_state else res_64, res_lo[0] if last_state else res_lo, dtype, seed)
    if last_state:
        assert res_k[1].dtype == torch.float32
        check_bound("last_state", res_k[1], res_64[1], res_lo[1], dtype, seed)
    for name, a, b, c in zip(NAMES, k_in, r64, rlo):
        if a is None:
            continue
        assert a.grad is not None, f"no gradient for {name}"
        assert a.grad.dtype == a.dtype, f"{name}.grad dtype {a.grad.dtype} != {a.dtype}"
        check_bound("d" + name, a.grad, b.grad, c.grad, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("batch", [1, 3])
def test_scan_matches_float64(batch, seqlen, dtype):
    dim = 384 if (batch + seqlen) % 2 == 0 else 768
    run_case(batch, dim, seqlen, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("seqlen", [63, 730])
def test_scan_reverse_with_last_state(seqlen, dtype):
    run_case(3, 384, seqlen, dtype, reverse=True, last_state=True)


@pytest.mark.parametrize(
    "kw",
    [dict(has_z=False), dict(has_D=False, has_bias=False, softplus=False), dict(groups=2),
     dict(dstate=8), dict(dstate=1, has_z=False), dict(dstate=13, groups=3, last_state=True),
     dict(softplus=False, last_state=True)],
    ids=["no_z", "no_D_bias_softplus", "groups2", "dstate8", "dstate1", "dstate13_groups3", "nosoftplus_last"])
def test_scan_variants(kw):
    run_case(2, 96, 197, torch.float32, **kw)


def test_scan_channels_not_multiple_of_block():
    run_case(2, 40, 100, torch.float32)        # 40 channels: one full and one partial block
    run_case(1, 3 * 20, 65, torch.float32, groups=3)  # 20 channels per group


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("seqlen,reverse", [(1, False), (197, False), (730, True)])
def test_scan_token_major_inputs(seqlen, reverse, dtype):
    inputs = to_token_major(make_inputs(3, 384, seqlen, 16, dtype))
    run_case(3, 384, seqlen, dtype, reverse=reverse, inputs=inputs)
    run_case(2, 40, seqlen, dtype, inputs=to_token_major(make_inputs(2, 40, seqlen, 16, dtype, groups=2)))


def test_scan_strided_inputs():
    """x and z as halves of one (batch, 2*dim, L) tensor (Vim's xz), delta not contiguous in L."""
    batch, dim, seqlen = 2, 64, 150
    inputs = make_inputs(batch, dim, seqlen, 16, torch.float32)
    xz = torch.randn(batch, 2 * dim, seqlen, device="cuda")
    inputs[0], inputs[6] = xz[:, :dim], xz[:, dim:]
    inputs[1] = inputs[1].transpose(1, 2).contiguous().transpose(1, 2)
    run_case(batch, dim, seqlen, torch.float32, inputs=inputs)


def test_scan_forward_is_deterministic():
    from mamba_ssm.ops import scan

    inputs = make_inputs(3, 384, 730, 16, torch.bfloat16)
    a = scan.cuda_selective_scan(*inputs, True, False)
    b = scan.cuda_selective_scan(*inputs, True, False)
    assert torch.equal(a, b)


def test_scan_rejects_large_dstate():
    from mamba_ssm.ops import scan

    inputs = make_inputs(1, 8, 10, 17, torch.float32)
    with pytest.raises(ValueError, match="dstate"):
        scan.cuda_selective_scan(*inputs, True, False)


@pytest.mark.parametrize("token_major", [False, True], ids=["channel_major", "token_major"])
def test_scan_opcheck(token_major):
    from mamba_ssm.ops import scan  # noqa: F401  (registers the ops)

    inputs = make_inputs(2, 8, 40, 4, torch.float32)
    u, delta, A, B, C, D, z, bias = to_token_major(inputs) if token_major else inputs
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    op = torch.ops.mamba_ssm.selective_scan_fwd.default
    torch.library.opcheck(op, (*leaves, True, True, True, False))
    torch.library.opcheck(op, (u, delta, A, B, C, None, None, None, False, False, False, True))
    with torch.no_grad():
        ckpt = op(u, delta, A, B, C, D, z, bias, True, False, True, False)[2]
    dout = torch.randn_like(u)
    args = [t.detach() for t in (u, delta, A, B, C, D, z, bias)]
    torch.library.opcheck(torch.ops.mamba_ssm.selective_scan_bwd.default,
                          (*args, dout, None, ckpt, True, False))


def test_scan_backward_without_saved_checkpoints():
    """A forward that saved no checkpoints (called with save_ckpt=False) still differentiates."""
    from mamba_ssm.ops import scan

    inputs = [t.requires_grad_() if t is not None else None for t in make_inputs(2, 32, 77, 16, torch.float32)]
    out = torch.ops.mamba_ssm.selective_scan_fwd(*inputs, True, False, False, False)[0]
    g1 = torch.autograd.grad(out.sum(), [t for t in inputs])
    out2 = scan.cuda_selective_scan(*inputs, True, False)
    g2 = torch.autograd.grad(out2.sum(), [t for t in inputs])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("token_major", [False, True], ids=["channel_major", "token_major"])
def test_conv_and_scan_under_torch_compile(token_major):
    """A Mamba-like inner op (conv -> silu -> scan with z gate) compiles without graph breaks, and the
    compiled code around the ops (which trusts their fake strides) computes the same values."""
    from causal_conv1d import cuda_ops as conv_ops
    from mamba_ssm.ops import scan

    batch, dim, seqlen, dstate = 2, 32, 70, 16
    inputs = make_inputs(batch, dim, seqlen, dstate, torch.float32)
    u, delta, A, B, C, D, z, bias = to_token_major(inputs) if token_major else inputs
    w = torch.randn(dim, 4, device="cuda")
    params = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias, w)]

    def f(u, delta, A, B, C, D, z, bias, w):
        x = conv_ops.causal_conv1d(u, w, None, True)
        y_f = scan.cuda_selective_scan(x, delta, A, B, C, D, z, bias, True, False)
        y_b = scan.cuda_selective_scan(x, delta, A, B, C, D, z, bias, True, False, reverse=True)
        return (y_f + y_b).square().sum()

    eager = f(*params)
    ge = torch.autograd.grad(eager, params)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(*params)
    gc = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-4)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Fused bidirectional scan
# ------------------------------------------------------------------------------------------------
def _bi_ref(f_in, b_in, z, softplus):
    """(y_f + flip(scan(flip(b)))) * silu(z), from the single-direction reference (no gate)."""
    u, delta, A, B, C, D, _, bias = f_in
    y_f = _ref(u, delta, A, B, C, D, None, bias, softplus, False, False)
    u, delta, A, B, C, D, _, bias = b_in
    y_b = _ref(u, delta, A, B, C, D, None, bias, softplus, False, True)
    return (y_f.to(torch.promote_types(y_f.dtype, torch.float32)) + y_b) * F.silu(
        z.to(torch.promote_types(z.dtype, torch.float32)))


def with_delta_projection(inputs, rank):
    """The inputs with delta replaced by a low-rank dt (batch, rank, seqlen), token-major like a slice of
    x_proj's output, plus a delta projection weight (dim, rank) as a 9th entry."""
    batch, dim, seqlen = inputs[0].shape
    out = list(inputs)
    out[1] = torch.randn(batch, seqlen, rank, device="cuda", dtype=inputs[0].dtype).transpose(1, 2)
    return out + [torch.randn(dim, rank, device="cuda") * 0.5 * rank ** -0.5]


def _projected(inputs):
    """Reference inputs: delta = W @ dt formed explicitly (in the inputs' precision) when W is present."""
    if len(inputs) < 9 or inputs[8] is None:
        return inputs[:8]
    out = list(inputs[:8])
    out[1] = torch.einsum("dr,brl->bdl", inputs[8].to(inputs[1].dtype), inputs[1])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("batch,dim,seqlen", [(3, 384, 197), (1, 768, 730), (2, 64, 1), (1, 96, 2049)])
@pytest.mark.parametrize("token_major,rank", [(False, 0), (True, 0), (True, 12), (False, 48), (True, 48)],
                         ids=["channel_major", "token_major", "token_major_dt_proj12", "channel_major_dt_proj48",
                              "token_major_dt_proj48"])
def test_bimamba_scan_matches_float64(batch, dim, seqlen, dtype, token_major, rank):
    """rank > 0: delta given as a low-rank dt and a projection weight, formed inside the kernels."""
    from mamba_ssm.ops import mamba_inner

    seed = fresh_seed()
    layout = to_token_major if token_major else list
    f_in = layout(make_inputs(batch, dim, seqlen, 16, dtype))
    b_in = layout(make_inputs(batch, dim, seqlen, 16, dtype))
    if rank:
        f_in, b_in = with_delta_projection(f_in, rank), with_delta_projection(b_in, rank)
    z = f_in[6]
    dout = torch.randn(batch, dim, seqlen, device="cuda", dtype=dtype)

    def leaves(cast):
        def leaf(t):
            return cast(t).detach().clone().requires_grad_() if t is not None else None
        fl, bl = [leaf(t) for t in f_in], [leaf(t) for t in b_in]
        fl[6] = leaf(z)
        bl[6] = None
        return fl, bl

    def args(fl, bl):
        return (*[fl[i] for i in (0, 1, 2, 3, 4, 5, 7)], *[bl[i] for i in (0, 1, 2, 3, 4, 5, 7)], fl[6])

    kf, kb = leaves(lambda t: t)
    poison_allocator()
    projections = dict(delta_proj_weight_f=kf[8], delta_proj_weight_b=kb[8]) if rank else {}
    scale = 0.5 if rank == 12 else 1.0  # Vim-tiny's configuration averages the two directions
    out = mamba_inner.fused_bimamba_scan(*args(kf, kb), True, **projections, out_scale=scale)
    poison_allocator()
    (out.double() * dout.double()).sum().backward()
    rf, rb = leaves(lambda t: t.double())
    o64 = _bi_ref(_projected(rf), _projected(rb), rf[6], True) * scale
    (o64 * dout.double()).sum().backward()
    lf, lb = leaves(lambda t: t)
    olo = (_bi_ref(_projected(lf), _projected(lb), lf[6], True) * scale).to(dtype)
    (olo.double() * dout.double()).sum().backward()

    assert out.dtype == dtype
    if seqlen > 1:
        assert (out.stride(1) == 1) == token_major and (kf[0].grad.stride(1) == 1) == token_major
    check_bound("out", out, o64, olo, dtype, seed)
    for tag, ks, rs, ls in (("f", kf, rf, lf), ("b", kb, rb, lb)):
        for name, a, b, c in zip(NAMES + ("delta_proj_weight",), ks, rs, ls):
            if a is None:
                continue
            assert a.grad is not None and a.grad.dtype == a.dtype, f"d{name}_{tag}"
            check_bound(f"d{name}_{tag}", a.grad, b.grad, c.grad, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_bimamba_scan_equals_two_single_scans(dtype):
    """Same function as the two single-direction kernels (reverse flag) combined; without gradients the
    fused op keeps y_f in its output tensor, rounded to the dtype (bfloat16) before the reverse direction
    adds it, as the single-direction output y_f is rounded here."""
    from mamba_ssm.ops import mamba_inner, scan

    seed = fresh_seed()
    f_in = make_inputs(2, 64, 300, 16, dtype)
    b_in = make_inputs(2, 64, 300, 16, dtype)
    z = f_in[6]
    out = mamba_inner.fused_bimamba_scan(*[f_in[i] for i in (0, 1, 2, 3, 4, 5, 7)], *[b_in[i] for i in (0, 1, 2, 3, 4, 5, 7)],
                                z, True)
    f_nz = list(f_in)
    f_nz[6] = None
    b_nz = list(b_in)
    b_nz[6] = None
    y_f = scan.cuda_selective_scan(*f_nz, True, False)
    y_b = scan.cuda_selective_scan(*b_nz, True, False, reverse=True)
    gate = F.silu(z.float())
    expected = (y_f.float() + y_b.float()) * gate
    # Rounding bound: the single-direction outputs are each rounded to the dtype (unit roundoff u), the
    # fused output once; the fp32 arithmetic of both paths adds a little on top.
    u = torch.finfo(dtype).eps / 2
    bound = u * ((y_f.float().abs() + y_b.float().abs()) * gate.abs() + expected.abs()) + 1e-5 * (1 + expected.abs())
    excess = ((out.float() - expected).abs() - bound).max().item()
    assert excess <= 0, f"fused output off the two single scans by {excess:.3g} beyond the rounding bound (seed {seed})"


@pytest.mark.parametrize("token_major", [False, True], ids=["channel_major", "token_major"])
def test_bimamba_opcheck_and_compile(token_major):
    from mamba_ssm.ops import mamba_inner

    layout = to_token_major if token_major else list
    f_in = layout(make_inputs(2, 8, 40, 4, torch.float32))
    b_in = layout(make_inputs(2, 8, 40, 4, torch.float32))
    tensors = [t.requires_grad_() for t in (*[f_in[i] for i in (0, 1, 2, 3, 4, 5, 7)],
                                             *[b_in[i] for i in (0, 1, 2, 3, 4, 5, 7)], f_in[6])]
    no_extras = (None,) * 6  # no fused delta projections, no fused convs
    torch.library.opcheck(torch.ops.mamba_ssm.bimamba_scan_fwd.default, (*tensors, *no_extras, True, True, 1.0))
    torch.library.opcheck(torch.ops.mamba_ssm.bimamba_scan_fwd.default, (*tensors, *no_extras, True, False, 0.5))
    # With the delta projections formed in the kernels (dt of rank 3 in place of delta).
    f_dt, b_dt = with_delta_projection(f_in, 3), with_delta_projection(b_in, 3)
    projected = [t.detach().requires_grad_() if t is not None else None for t in
                 (*[f_dt[i] for i in (0, 1, 2, 3, 4, 5, 7)], *[b_dt[i] for i in (0, 1, 2, 3, 4, 5, 7)], f_dt[6],
                  f_dt[8], b_dt[8])]
    torch.library.opcheck(torch.ops.mamba_ssm.bimamba_scan_fwd.default, (*projected, *no_extras[2:], True, True, 0.5))
    # Inference with the convs fused as well (u is then the convs' input).
    convs = [torch.randn(8, 4, device="cuda"), torch.randn(8, device="cuda"), torch.randn(8, 4, device="cuda"), None]
    with torch.no_grad():
        torch.library.opcheck(torch.ops.mamba_ssm.bimamba_scan_fwd.default,
                              (*[t.detach() if t is not None else None for t in projected], *convs, True, False, 0.5))

    def f(*ts):
        return mamba_inner.fused_bimamba_scan(*ts, True, out_scale=0.5).square().sum()

    eager = f(*tensors)
    ge = torch.autograd.grad(eager, tensors)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*tensors)
    gc = torch.autograd.grad(got, tensors)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-4)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_zz_errors_raised_in_the_extension_reach_python():
    """Checks inside the C++ ops raise RuntimeError. Run in a subprocess: an extension built by a toolchain
    that links libstdc++ statically can crash the interpreter on a C++ exception instead; the Python
    wrappers validate arguments before the call."""
    import subprocess
    import sys

    code = """
import torch, causal_conv1d_cuda, selective_scan_cuda
x = torch.randn(1, 8, 16, device="cuda")
try:
    torch.ops.causal_conv1d_cuda.fwd(x, torch.randn(8, 5, device="cuda"), None, False, False)
except RuntimeError as e:
    assert "width" in str(e)
    print("raised")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "raised" in res.stdout, (
        f"C++ error did not reach Python cleanly (rc {res.returncode}): {res.stderr[-2000:]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("token_major,width,dim,seqlen", [
    (True, 4, 192, 197), (True, 2, 80, 37), (True, 3, 80, 730), (False, 4, 192, 197), (False, 3, 96, 1),
    (False, 2, 40, 63)], ids=lambda v: str(v))
def test_bimamba_fused_conv_matches_float64(token_major, width, dim, seqlen, dtype):
    """The inference forward with both directions' convs applied inside the scan kernel (register halo
    across segments; anti-causal for direction b) against float64 convs and scans, for both layouts,
    conv widths 2-4, channel counts that leave a partial block of 32, and sequences shorter than a segment."""
    from mamba_ssm.ops import mamba_inner

    seed = fresh_seed()
    layout = to_token_major if token_major else list
    f_in = layout(make_inputs(2, dim, seqlen, 16, dtype))
    b_in = layout(make_inputs(2, dim, seqlen, 16, dtype))
    x, z = f_in[0], f_in[6]  # both directions convolve the same input, as in a Vim block
    convs = [(torch.randn(dim, width, device="cuda") * 0.5, torch.randn(dim, device="cuda") * 0.3) for _ in range(2)]
    with torch.no_grad():
        out = mamba_inner.fused_bimamba_scan(*[f_in[i] for i in (0, 1, 2, 3, 4, 5, 7)], x,
                                    *[b_in[i] for i in (1, 2, 3, 4, 5, 7)], z, True, conv_f=convs[0], conv_b=convs[1])

    def reference(cast):
        def direction(inputs, conv, anti_causal):
            t = [cast(v) if v is not None else None for v in inputs]
            # In x's precision: the low-precision reference that sets the tolerance rounds like a user's
            # fp16 conv.
            t[0] = conv_silu_ref(cast(x), cast(conv[0]), cast(conv[1]), anti_causal)
            return t
        return _bi_ref(direction(f_in, convs[0], False), direction(b_in, convs[1], True), cast(z), True)

    o64 = reference(lambda t: t.double())
    olo = reference(lambda t: t).to(dtype)
    assert out.dtype == dtype
    if seqlen > 1:
        assert (out.stride(1) == 1) == token_major
    check_bound("out", out, o64, olo, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_bimamba_inner_inference_fuses_conv(dtype):
    """Without gradients the inner op runs the convs inside the scan kernel: same values as the training
    path (separate conv kernels), and the op refuses the fused conv when a gradient is needed."""
    from mamba_ssm.modules.mamba_simple import Mamba
    from mamba_ssm.ops import mamba_inner
    from mamba_ssm.ops.mamba_inner import bimamba_inner_fn_no_out_proj

    torch.manual_seed(0)
    mixer = Mamba(96, bimamba_type="v2").cuda()
    with torch.no_grad():
        for conv in (mixer.conv1d, mixer.conv1d_b):
            conv.bias.add_(0.3 * torch.randn_like(conv.bias))
    xz = torch.randn(3, 150, 2 * mixer.d_inner, device="cuda", dtype=dtype).transpose(1, 2)
    params = mixer._direction_params(""), mixer._direction_params("_b")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):  # as in the model
        with torch.no_grad():
            fused = bimamba_inner_fn_no_out_proj(xz, *params)
        separate = bimamba_inner_fn_no_out_proj(xz.detach().requires_grad_(), *params)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), separate.detach().float(), rtol=tol, atol=tol)

    u = xz[:, :mixer.d_inner].detach().requires_grad_()
    args = [torch.randn(3, 12, 150, device="cuda") for _ in range(2)]
    with pytest.raises(ValueError, match="inference"):
        mamba_inner.fused_bimamba_scan(u, args[0], params[0]["A"], torch.randn(3, 1, 16, 150, device="cuda"),
                              torch.randn(3, 1, 16, 150, device="cuda"), None, None, u, args[1], params[1]["A"],
                              torch.randn(3, 1, 16, 150, device="cuda"), torch.randn(3, 1, 16, 150, device="cuda"),
                              None, None, xz[:, mixer.d_inner:], True,
                              delta_proj_weight_f=params[0]["delta_proj_weight"],
                              delta_proj_weight_b=params[1]["delta_proj_weight"],
                              conv_f=(params[0]["conv1d_weight"].squeeze(1), None))

"""GPU tests of the causal_conv1d CUDA kernels: outputs and all gradients against a float64
reference, with per-dtype error bounds relative to the same-precision PyTorch reference."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from gpu_test_helpers import check_bound, fresh_seed, poison_allocator  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEQLENS = [1, 63, 197, 730, 2049, 6085]


def _ref(x, weight, bias, silu, reverse):
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    act = "silu" if silu else None
    if reverse:
        return causal_conv1d_ref(x.flip(-1), weight, bias, act).flip(-1)
    return causal_conv1d_ref(x, weight, bias, act)


def _conv_input(batch, dim, seqlen, dtype, strided, token_major, dev="cuda"):
    """x (batch, dim, seqlen) in one of the layouts the kernels take."""
    if token_major:  # channel stride 1: a (batch, seqlen, dim) tensor transposed
        # strided: the x half of Vim's token-major xz (batch, seqlen, 2*dim), position stride 2*dim
        return torch.randn(batch, seqlen, 2 * dim if strided else dim, device=dev, dtype=dtype)[..., :dim].transpose(1, 2)
    if strided:  # x as the first half of a (batch, 2*dim, seqlen) tensor, like Vim's xz.chunk(2)
        return torch.randn(batch, 2 * dim, seqlen, device=dev, dtype=dtype)[:, :dim]
    return torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)


def _run_case(batch, dim, seqlen, width, dtype, silu=True, has_bias=True, reverse=False, strided=False,
              token_major=False):
    from causal_conv1d import cuda_ops

    seed = fresh_seed()
    dev = "cuda"
    x = _conv_input(batch, dim, seqlen, dtype, strided, token_major)
    weight = (torch.randn(dim, width, device=dev) / width ** 0.5).to(dtype)
    bias = torch.randn(dim, device=dev).to(dtype) if has_bias else None
    dout = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)

    leaves = [t for t in (x, weight, bias) if t is not None]
    # Kernel.
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    poison_allocator()
    out = cuda_ops.causal_conv1d(xs[0], xs[1], xs[2] if has_bias else None, silu, reverse)
    poison_allocator()
    out.backward(dout)
    # float64 reference and same-precision PyTorch reference.
    r64 = [t.detach().double().requires_grad_() for t in leaves]
    o64 = _ref(r64[0], r64[1], r64[2] if has_bias else None, silu, reverse)
    o64.backward(dout.double())
    rlo = [t.detach().clone().requires_grad_() for t in leaves]
    olo = _ref(rlo[0], rlo[1], rlo[2] if has_bias else None, silu, reverse)
    olo.backward(dout)

    assert out.dtype == dtype and out.shape == x.shape
    if seqlen > 1:  # out and dx keep x's layout
        assert (out.stride(1) == 1) == (xs[0].grad.stride(1) == 1) == token_major
    check_bound("out", out, o64, olo, dtype, seed)
    for name, a, b, c in zip(("dx", "dweight", "dbias"), xs, r64, rlo):
        assert a.grad.dtype == a.dtype
        check_bound(name, a.grad, b.grad, c.grad, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_matches_float64(batch, seqlen, dtype):
    dim = 384 if (batch + seqlen) % 2 == 0 else 768
    _run_case(batch, dim, seqlen, 4, dtype)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("silu,has_bias,reverse", [(False, True, False), (True, False, False), (True, True, True),
                                                   (False, False, True)])
def test_conv_variants(width, silu, has_bias, reverse):
    _run_case(2, 64, 197, width, torch.float32, silu=silu, has_bias=has_bias, reverse=reverse)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("seqlen", [1, 5, 197, 2049])
@pytest.mark.parametrize("width,reverse,silu,has_bias", [(4, False, True, True), (4, True, True, True),
                                                         (3, True, False, False), (2, False, True, False)])
def test_conv_token_major(seqlen, width, reverse, silu, has_bias, dtype):
    dim = 384 if seqlen != 5 else 40  # 40: a partial block of channels
    _run_case(3, dim, seqlen, width, dtype, silu=silu, has_bias=has_bias, reverse=reverse, token_major=True)


def _run_bidirectional_case(batch, dim, seqlen, width, dtype, silu=True, has_bias=True, strided=True):
    """Both convs of a Vim block in one kernel against the two convs of the float64 reference (the
    anti-causal one on the flipped sequence): both outputs, dx (the sum of both directions' terms) and
    each direction's weight and bias gradients."""
    from causal_conv1d import cuda_ops

    seed = fresh_seed()
    dev = "cuda"
    x = _conv_input(batch, dim, seqlen, dtype, strided, token_major=True)
    params = []
    for _ in range(2):
        params.append((torch.randn(dim, width, device=dev) / width ** 0.5).to(dtype))
        params.append(torch.randn(dim, device=dev).to(dtype) if has_bias else None)
    douts = [torch.randn(batch, seqlen, dim, device=dev, dtype=dtype).transpose(1, 2) for _ in range(2)]
    leaves = [x] + [t for t in params if t is not None]

    def with_bias(ts):  # the leaves back in (x, wf, bf, wb, bb) order, None for absent biases
        it = iter(ts[1:])
        return [ts[0]] + [next(it) if t is not None else None for t in params]

    xs = [t.detach().clone().requires_grad_() for t in leaves]
    poison_allocator()
    outs = cuda_ops.causal_conv1d_bidirectional(*with_bias(xs), silu)
    poison_allocator()
    torch.autograd.backward(outs, douts)

    def reference(ts, cast):
        x_, wf, bf, wb, bb = with_bias(ts)
        o = (_ref(x_, wf, bf, silu, False), _ref(x_, wb, bb, silu, True))
        torch.autograd.backward(o, [cast(d) for d in douts])
        return o

    r64 = [t.detach().double().requires_grad_() for t in leaves]
    o64 = reference(r64, lambda d: d.double())
    rlo = [t.detach().clone().requires_grad_() for t in leaves]
    olo = reference(rlo, lambda d: d)
    for name, got, e64, elo in zip(("out_f", "out_b"), outs, o64, olo):
        assert got.dtype == dtype and got.stride(1) == 1  # x's dtype and token-major layout
        check_bound(name, got, e64, elo, dtype, seed)
    names = ["dx", "dweight_f"] + ["dbias_f"] * has_bias + ["dweight_b"] + ["dbias_b"] * has_bias
    for name, a, b, c in zip(names, xs, r64, rlo):
        assert a.grad.dtype == a.dtype
        check_bound(name, a.grad, b.grad, c.grad, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("seqlen", [2, 5, 22, 197, 2049])  # 2, 5, 22: segments that reach both ends
def test_conv_bidirectional_matches_float64(seqlen, dtype):
    _run_bidirectional_case(3, 384 if seqlen != 5 else 40, seqlen, 4, dtype)


@pytest.mark.parametrize("width,silu,has_bias,strided", [(2, True, False, True), (3, False, True, False),
                                                         (4, False, False, True)])
def test_conv_bidirectional_variants(width, silu, has_bias, strided):
    _run_bidirectional_case(2, 64, 197, width, torch.float32, silu=silu, has_bias=has_bias, strided=strided)


def test_conv_bidirectional_rejects_other_layouts_and_mixed_widths():
    from causal_conv1d import cuda_ops

    w = torch.randn(16, 4, device="cuda")
    with pytest.raises(ValueError, match="token-major"):
        cuda_ops.causal_conv1d_bidirectional(torch.randn(2, 16, 30, device="cuda"), w, None, w, None, True)
    x = torch.randn(2, 30, 16, device="cuda").transpose(1, 2)
    with pytest.raises(ValueError, match="one shape"):
        cuda_ops.causal_conv1d_bidirectional(x, w, None, torch.randn(16, 3, device="cuda"), None, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("token_major", [False, True], ids=["channel_major", "token_major"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("seqlen", [22, 730])  # 22: one segment of 16 positions touching both ends, then a tail
def test_conv_strided_input(seqlen, reverse, token_major, dtype):
    _run_case(3, 96, seqlen, 4, dtype, reverse=reverse, strided=True, token_major=token_major)


def test_conv_fp32_weights_with_bf16_input():
    """Under autocast the conv weight stays fp32 while x is bf16: gradients keep each input's dtype."""
    from causal_conv1d import cuda_ops

    x = torch.randn(2, 32, 100, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 4, device="cuda", requires_grad=True)
    b = torch.randn(32, device="cuda", requires_grad=True)
    out = cuda_ops.causal_conv1d(x, w, b, True)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    ref = _ref(x.detach().double(), w.detach().double(), b.detach().double(), True, False)
    assert (out.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_conv_rejects_bad_width():
    from causal_conv1d import cuda_ops

    x = torch.randn(1, 8, 16, device="cuda")
    with pytest.raises(ValueError, match="width"):
        cuda_ops.causal_conv1d(x, torch.randn(8, 5, device="cuda"), None, False)


def test_conv_opcheck():
    from causal_conv1d import cuda_ops  # noqa: F401  (registers the ops)

    x = torch.randn(2, 16, 37, device="cuda", requires_grad=True)
    w = torch.randn(16, 4, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.causal_conv1d.fwd.default, (x, w, b, True, False))
    torch.library.opcheck(torch.ops.causal_conv1d.fwd.default, (x, w, None, False, True))
    dout = torch.randn(2, 16, 37, device="cuda")
    torch.library.opcheck(torch.ops.causal_conv1d.bwd.default, (x.detach(), w.detach(), b.detach(), dout, True, False))
    # Token-major input: the fake implementations must give the kernels' output strides.
    xt = torch.randn(2, 37, 16, device="cuda").transpose(1, 2).requires_grad_()
    torch.library.opcheck(torch.ops.causal_conv1d.fwd.default, (xt, w, b, True, True))
    torch.library.opcheck(torch.ops.causal_conv1d.bwd.default, (xt.detach(), w.detach(), b.detach(), dout, True, True))
    w_b = torch.randn(16, 4, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.causal_conv1d.bi_fwd.default, (xt, w, b, w_b, None, True))
    dout_t = torch.randn(2, 37, 16, device="cuda").transpose(1, 2)
    torch.library.opcheck(torch.ops.causal_conv1d.bi_bwd.default,
                          (xt.detach(), w.detach(), b.detach(), w_b.detach(), None, dout_t, dout, True))


def test_conv_torch_compile_fullgraph():
    from causal_conv1d import cuda_ops

    def f(x, w, b):
        y = cuda_ops.causal_conv1d(x, w, b, True)
        return cuda_ops.causal_conv1d(y * 2, w, b, False, reverse=True).sum()

    x = torch.randn(2, 32, 50, device="cuda", requires_grad=True)
    w = torch.randn(32, 3, device="cuda", requires_grad=True)
    b = torch.randn(32, device="cuda", requires_grad=True)
    eager = f(x, w, b)
    ge = torch.autograd.grad(eager, (x, w, b))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(x, w, b)
    gc = torch.autograd.grad(got, (x, w, b))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-4)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)

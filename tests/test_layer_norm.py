"""CPU tests of rms_norm_fn / RMSNorm against a float64 hand computation."""
import pytest
import torch

from mamba_ssm.ops.layer_norm import RMSNorm, rms_norm_fn


def rms_oracle(x, weight, bias=None, residual=None, eps=1e-6):
    s = x.double() if residual is None else x.double() + residual.double()
    out = s / torch.sqrt((s * s).sum(-1, keepdim=True) / s.shape[-1] + eps) * weight.double()
    if bias is not None:
        out = out + bias.double()
    return out, s


@pytest.mark.parametrize("use_residual", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_matches_float64_hand_computation(use_residual, use_bias, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(8, generator=g)
    b = torch.randn(8, generator=g) if use_bias else None
    r = torch.randn(2, 5, 8, generator=g) if use_residual else None
    out = rms_norm_fn(x, w, b, residual=r, eps=eps)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), rms_oracle(x, w, b, r, eps)[0], rtol=1e-5, atol=1e-6)


def test_hand_checked_values():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    out = rms_norm_fn(x, torch.tensor([1.0, 2.0]), eps=0.0)
    expected = torch.tensor([[3.0, 8.0]]) / 12.5 ** 0.5
    torch.testing.assert_close(out, expected)


def test_eps_is_used():
    x = torch.full((1, 4), 1e-3)
    w = torch.ones(4)
    torch.testing.assert_close(rms_norm_fn(x, w, eps=1e-5).double(), rms_oracle(x, w, eps=1e-5)[0], rtol=1e-5, atol=0)
    assert not torch.allclose(rms_norm_fn(x, w, eps=1e-5), rms_norm_fn(x, w, eps=1e-8))


def test_prenorm_returns_fp32_residual_stream_when_residual_in_fp32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=g).bfloat16()
    r = torch.randn(2, 3, 8, generator=g).bfloat16()
    w = torch.ones(8)
    out, stream = rms_norm_fn(x, w, residual=r, prenorm=True, residual_in_fp32=True)
    assert out.dtype == torch.bfloat16 and stream.dtype == torch.float32
    # the stream is the exact fp32 sum (not rounded to bf16 first)
    assert torch.equal(stream, x.float() + r.float())
    torch.testing.assert_close(out.double(), rms_oracle(x, w, residual=r)[0], rtol=1e-2, atol=1e-2)
    # an fp32 residual stream with bf16 x: the sum is fp32 and not rounded
    r32 = torch.randn(2, 3, 8, generator=g) * 1e-3 + 1.0
    _, stream32 = rms_norm_fn(x, w, residual=r32, prenorm=True, residual_in_fp32=True)
    assert torch.equal(stream32, x.float() + r32)
    # layer 0: no residual yet, the stream is x itself in fp32
    _, first = rms_norm_fn(x, w, prenorm=True, residual_in_fp32=True)
    assert first.dtype == torch.float32 and torch.equal(first, x.float())


def test_prenorm_without_residual_in_fp32_keeps_x_dtype():
    x = torch.randn(2, 3, 8).bfloat16()
    r = torch.randn(2, 3, 8).bfloat16()
    out, stream = rms_norm_fn(x, torch.ones(8), residual=r, prenorm=True, residual_in_fp32=False)
    assert out.dtype == torch.bfloat16 and stream.dtype == torch.bfloat16
    torch.testing.assert_close(stream.float(), x.float() + r.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtype_follows_x(dtype):
    x = torch.randn(4, 16).to(dtype)
    w = torch.randn(16)  # fp32 weight, as in the model
    out = rms_norm_fn(x, w)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), rms_oracle(x, w)[0], rtol=tol, atol=tol)


def test_gradients_match_hand_computation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=g, requires_grad=True)
    r = torch.randn(3, 8, generator=g, requires_grad=True)
    w = torch.randn(8, generator=g, requires_grad=True)
    out, stream = rms_norm_fn(x, w, residual=r, prenorm=True, residual_in_fp32=True)
    (out.square().sum() + stream.sum()).backward()
    grads = [t.grad.clone() for t in (x, r, w)]
    xd, rd, wd = (t.detach().double().requires_grad_(True) for t in (x, r, w))
    o, s = rms_oracle(xd, wd, residual=rd)
    (o.square().sum() + s.sum()).backward()
    for got, want in zip(grads, (xd.grad, rd.grad, wd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_rmsnorm_module():
    m = RMSNorm(8)
    assert m.eps == 1e-5 and torch.equal(m.weight, torch.ones(8))
    assert [n for n, _ in m.named_parameters()] == ["weight"]  # weight only, no bias (checkpoint format)
    with torch.no_grad():
        m.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(2, 3, 8) * 1e-3  # small, so that eps = 1e-5 matters
    r = torch.randn(2, 3, 8) * 1e-3
    out, stream = m(x, residual=r, prenorm=True, residual_in_fp32=True)
    ref, ref_s = rms_oracle(x, m.weight, residual=r, eps=1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stream.double(), ref_s, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(m(x).double(), rms_oracle(x, m.weight, eps=1e-5)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("residual_shape,weight_shape,bias_shape,message", [
    ((2, 3, 7), (8,), None, "residual must have x's shape"),
    ((2, 3, 8), (7,), None, "weight must be (8,)"),
    (None, (8,), (1, 8), "bias must be (8,)"),
])
def test_mismatched_shapes_are_named(residual_shape, weight_shape, bias_shape, message):
    x = torch.randn(2, 3, 8)
    residual = torch.randn(residual_shape) if residual_shape else None
    bias = torch.randn(bias_shape) if bias_shape else None
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rms_norm_fn(x, torch.randn(weight_shape), bias, residual=residual)

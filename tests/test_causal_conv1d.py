"""CPU tests of causal_conv1d: the reference against explicit loops, gradients, dispatch and errors."""
import math

import numpy as np
import pytest
import torch

from causal_conv1d import causal_conv1d_bidirectional_fn, causal_conv1d_fn, causal_conv1d_ref
from helpers import extension_importable


def conv_oracle(x, weight, bias=None, activation=None):
    """out[b, d, t] = bias[d] + sum_k w[d, k] * x[b, d, t - (W - 1) + k], explicit loops in float64 numpy."""
    x = x.detach().double().numpy()
    w = weight.detach().double().numpy()
    bsz, dim, seqlen = x.shape
    width = w.shape[1]
    out = np.zeros((bsz, dim, seqlen))
    for b in range(bsz):
        for d in range(dim):
            for t in range(seqlen):
                acc = 0.0 if bias is None else float(bias[d])
                for k in range(width):
                    src = t - (width - 1) + k
                    if src >= 0:
                        acc += w[d, k] * x[b, d, src]
                if activation in ("silu", "swish"):
                    acc = acc / (1.0 + math.exp(-acc))
                out[b, d, t] = acc
    return torch.from_numpy(out)


def _inputs(bsz, dim, seqlen, width, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, dim, seqlen, generator=g, dtype=dtype)
    w = torch.randn(dim, width, generator=g, dtype=dtype)
    b = torch.randn(dim, generator=g, dtype=dtype)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    return x, w, b


@pytest.mark.parametrize("fn", [causal_conv1d_ref, causal_conv1d_fn])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 7])
@pytest.mark.parametrize("use_bias", [True, False])
def test_matches_explicit_loops(fn, activation, width, seqlen, use_bias):
    x, w, b = _inputs(2, 3, seqlen, width, seed=width * 100 + seqlen)
    bias = b if use_bias else None
    out = fn(x, w, bias, activation)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, conv_oracle(x, w, bias, activation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("width", [2, 4])
def test_token_major_input_matches_loops_and_keeps_its_layout(reverse, width):
    # A token-major x (channel stride 1, a linear layer's output seen as (batch, dim, seqlen)) takes the
    # reference's (batch, seqlen, dim) path; the anti-causal conv is the causal one of the flipped sequence.
    g = torch.Generator().manual_seed(width + 10 * reverse)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64).transpose(1, 2)  # (2, 5, 9), channel stride 1
    w = torch.randn(5, width, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    out = causal_conv1d_ref(x, w, b, "silu", reverse=reverse)
    expected = conv_oracle(x.flip(-1), w, b, "silu").flip(-1) if reverse else conv_oracle(x, w, b, "silu")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.stride(1) == 1, "the output keeps the token-major layout"


def test_bidirectional_pairs_each_weight_with_its_direction():
    # f: the causal conv with weight_f; b: the anti-causal conv with weight_b (the causal conv of the
    # flipped sequence, flipped back); x token-major as in a Vim block.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64).transpose(1, 2)
    wf, wb = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    bf, bb = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    out_f, out_b = causal_conv1d_bidirectional_fn(x, wf, bf, wb, bb, "silu")
    torch.testing.assert_close(out_f, conv_oracle(x, wf, bf, "silu"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_b, conv_oracle(x.flip(-1), wb, bb, "silu").flip(-1), rtol=1e-12, atol=1e-12)


def test_token_major_gradients_match_channel_major():
    g = torch.Generator().manual_seed(3)
    x_tm = torch.randn(2, 7, 4, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    x_cm = x_tm.detach().contiguous().requires_grad_()
    w = torch.randn(4, 4, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    for x in (x_tm, x_cm):
        (causal_conv1d_ref(x, w, None, "silu") * dout).sum().backward()
    torch.testing.assert_close(x_tm.grad, x_cm.grad, rtol=1e-12, atol=1e-12)
    x_ref = x_cm.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: causal_conv1d_ref(x_.transpose(1, 2).contiguous().transpose(1, 2), w,
                                                                 None, "silu"), (x_ref,))


def test_hand_checked_values():
    # width 2: out[t] = w0 * x[t-1] + w1 * x[t] + bias
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    w = torch.tensor([[10.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.5], dtype=torch.float64)
    out = causal_conv1d_ref(x, w, b)
    expected = torch.tensor([[[1.5, 12.5, 23.5, 34.5]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # width 3, no bias: out[t] = w0 x[t-2] + w1 x[t-1] + w2 x[t]
    w3 = torch.tensor([[100.0, 10.0, 1.0]], dtype=torch.float64)
    out3 = causal_conv1d_fn(x, w3)
    torch.testing.assert_close(out3, torch.tensor([[[1.0, 12.0, 123.0, 234.0]]], dtype=torch.float64), rtol=0, atol=0)
    # silu on top
    out_silu = causal_conv1d_fn(x, w, b, activation="silu")
    torch.testing.assert_close(out_silu, expected * torch.sigmoid(expected))


def test_causality_future_does_not_leak():
    x, w, b = _inputs(1, 2, 9, 4, seed=3)
    out = causal_conv1d_fn(x, w, b, "silu")
    x2 = x.clone()
    x2[..., 5:] = torch.randn(1, 2, 4, dtype=torch.float64)
    out2 = causal_conv1d_fn(x2, w, b, "silu")
    torch.testing.assert_close(out[..., :5], out2[..., :5], rtol=0, atol=0)
    assert not torch.allclose(out[..., 5:], out2[..., 5:])


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 7, 197])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck(width, seqlen, activation):
    long = seqlen == 197
    x, w, b = _inputs(1 if long else 2, 2, seqlen, width, seed=seqlen + width, requires_grad=True)
    # For 197 positions the full Jacobian is large: fast mode checks random projections of it instead.
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: causal_conv1d_fn(x_, w_, b_, activation), (x, w, b), eps=1e-6, atol=1e-7,
        fast_mode=long)


def test_gradcheck_without_bias():
    x, w, _ = _inputs(2, 3, 7, 3, seed=11, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_: causal_conv1d_ref(x_, w_, None, "silu"), (x, w))


def test_low_precision_output_dtype_follows_x():
    x, w, b = _inputs(2, 4, 7, 4, dtype=torch.float32, seed=5)
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        out = causal_conv1d_fn(xl, w, b, "silu")
        assert out.dtype == dtype
        ref = conv_oracle(xl.double(), w, b, "silu")
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("xz_half", [False, True], ids=["dense", "half_of_xz"])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anti_causal"])
@pytest.mark.parametrize("width,seqlen,use_bias,activation", [(2, 6, True, "silu"), (3, 6, False, None),
                                                              (4, 6, True, "silu"), (4, 2, False, "silu"),
                                                              (4, 3, True, None)])
def test_fp32_token_major_cpu_path_matches_float64(monkeypatch, xz_half, reverse, width, seqlen, use_bias,
                                                   activation):
    """fp32 token-major CPU convs (a dense one, and Vim's x: a channel half of xz) run on torch's oneDNN
    conv, not the reference: the output against explicit float64 loops, the gradients of x, weight and
    bias against the float64 reference, and a new dense token-major output (sequences shorter than the
    conv too)."""
    import causal_conv1d.causal_conv1d_interface as iface

    g = torch.Generator().manual_seed(width * 10 + seqlen + reverse)
    shape = (2, 9, seqlen)
    x64 = torch.randn(shape[0], seqlen, 2 * shape[1] if xz_half else shape[1], generator=g,
                      dtype=torch.float64).transpose(1, 2)[:, :shape[1]]
    w64 = torch.randn(shape[1], width, generator=g, dtype=torch.float64)
    b64 = torch.randn(shape[1], generator=g, dtype=torch.float64) if use_bias else None
    dout = torch.randn(*shape, generator=g, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (x64, w64, b64) if t is not None]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]

    def reference_must_not_run(*args):
        raise AssertionError("fp32 CPU conv fell back to the reference")

    monkeypatch.setattr(iface, "causal_conv1d_ref", reference_must_not_run)
    out = causal_conv1d_fn(*leaves32[:2], leaves32[2] if use_bias else None, activation, reverse=reverse)
    monkeypatch.undo()
    (out.double() * dout).sum().backward()
    ref = causal_conv1d_ref(*leaves64[:2], leaves64[2] if use_bias else None, activation, reverse=reverse)
    (ref * dout).sum().backward()

    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
    expected = flip(conv_oracle(flip(x64), w64, b64, activation))
    assert out.dtype == torch.float32 and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "weight", "bias"), leaves32, leaves64):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_fp32_cpu_convs_outside_the_onednn_case_run_the_reference(monkeypatch):
    """Channel-major x, bf16, and fp32 under CPU autocast (where conv2d would run in bf16) stay on the
    reference; a token-major fp32 x does not."""
    import causal_conv1d.causal_conv1d_interface as iface

    calls = []
    reference = iface.causal_conv1d_ref
    monkeypatch.setattr(iface, "causal_conv1d_ref", lambda *a, **k: calls.append(1) or reference(*a, **k))
    w, b = torch.randn(8, 4), torch.randn(8)
    token_major = torch.randn(2, 5, 8).transpose(1, 2)
    causal_conv1d_fn(torch.randn(2, 8, 5), w, b, "silu")
    causal_conv1d_fn(token_major.bfloat16(), w.bfloat16(), b.bfloat16(), "silu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_conv1d_fn(token_major, w, b, "silu")
    assert len(calls) == 3 and out.dtype == torch.float32
    causal_conv1d_fn(token_major, w, b, "silu")
    assert len(calls) == 3


def test_backend_reference_equals_auto_on_cpu():
    x, w, b = _inputs(2, 3, 7, 4, seed=9)
    torch.testing.assert_close(causal_conv1d_fn(x, w, b, "silu", backend="reference"),
                               causal_conv1d_fn(x, w, b, "silu", backend="auto"), rtol=0, atol=0)


@pytest.mark.parametrize("args, match", [
    (dict(x=torch.randn(3, 7), weight=torch.randn(3, 4)), r"x must be \(batch, dim, seqlen\)"),
    (dict(x=torch.randn(2, 3, 7), weight=torch.randn(5, 4)), r"weight must be \(dim, width\)"),
    (dict(x=torch.randn(2, 3, 7), weight=torch.randn(3, 1, 4)), r"squeeze"),
    (dict(x=torch.randn(2, 3, 7), weight=torch.randn(3, 4), bias=torch.randn(4)), r"bias must be \(3,\)"),
    (dict(x=torch.randn(2, 3, 7), weight=torch.randn(3, 4), activation="relu"), r"activation must be one of.*relu"),
])
@pytest.mark.parametrize("fn", [causal_conv1d_ref, causal_conv1d_fn])
def test_bad_inputs_raise_value_error(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(**args)


def test_unknown_backend_raises_value_error():
    with pytest.raises(ValueError, match=r"backend must be one of.*'triton'"):
        causal_conv1d_fn(torch.randn(1, 2, 5), torch.randn(2, 4), backend="triton")


@pytest.mark.skipif(extension_importable("causal_conv1d_cuda"), reason="the CUDA extension is built here")
def test_cuda_backend_without_extension_says_how_to_build():
    with pytest.raises(RuntimeError, match=r"not built") as info:
        causal_conv1d_fn(torch.randn(1, 2, 5), torch.randn(2, 4), backend="cuda")
    message = str(info.value)
    assert "pip install" in message and "causal-conv1d" in message


@pytest.mark.skipif(not extension_importable("causal_conv1d_cuda"), reason="the CUDA extension is not built here")
def test_cuda_backend_with_cpu_tensors_raises_value_error():
    with pytest.raises(ValueError, match=r"needs CUDA tensors"):
        causal_conv1d_fn(torch.randn(1, 2, 5), torch.randn(2, 4), backend="cuda")

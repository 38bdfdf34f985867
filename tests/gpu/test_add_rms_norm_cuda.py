"""GPU tests of the inference residual add + RMSNorm kernel (selective_scan_cuda::add_rms_norm) against a
float64 computation, and of when rms_norm_fn dispatches to it."""
import pytest
import torch

from gpu_test_helpers import fresh_seed, poison_allocator
from mamba_ssm.ops import extensions, layer_norm
from mamba_ssm.ops.layer_norm import rms_norm_fn

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and extensions.cuda.available()),
                                reason="needs a CUDA GPU and the built extension")

# Rounding of one result to the dtype (half an ulp, with a factor 2 of margin) plus fp32 arithmetic.
RTOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _oracle(x, residual, weight, bias, eps):
    """float64: stream = x + residual, out = stream / sqrt(mean(stream^2) + eps) * weight + bias."""
    stream = x.double() + (0 if residual is None else residual.double())
    rms = torch.linalg.vector_norm(stream, dim=-1, keepdim=True) / stream.shape[-1] ** 0.5
    out = stream / torch.sqrt(rms * rms + eps) * weight.double()
    return (out if bias is None else out + bias.double()), stream


def _assert_close(got, ref, dtype, what, seed):
    assert got.dtype == dtype and got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values (seed {seed})"
    err = (got.double() - ref).abs()
    bound = RTOL[dtype] * ref.abs() + 1e-6 * ref.abs().max()
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max().item():.3e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1, 33, 192, 300, 768, 1024])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64(dtype, hidden, with_residual, residual_in_fp32, with_bias):
    seed = fresh_seed()
    poison_allocator()
    stream_dtype = torch.float32 if residual_in_fp32 else dtype
    # 3 * 37 rows: the last block of 8 rows is partial.
    x = (2 * torch.randn(3, 37, hidden, device="cuda") + 0.5).to(dtype)
    residual = torch.randn(3, 37, hidden, device="cuda").to(stream_dtype) if with_residual else None
    weight = torch.randn(hidden, device="cuda")
    bias = torch.randn(hidden, device="cuda") if with_bias else None
    with torch.inference_mode():
        out, stream = rms_norm_fn(x, weight, bias, residual=residual, prenorm=True,
                                  residual_in_fp32=residual_in_fp32, eps=1e-5)
        out_only = rms_norm_fn(x, weight, bias, residual=residual, residual_in_fp32=residual_in_fp32, eps=1e-5)
    ref_out, ref_stream = _oracle(x, residual, weight, bias, 1e-5)
    _assert_close(out, ref_out, dtype, "out", seed)
    _assert_close(stream, ref_stream, stream_dtype, "stream", seed)
    assert torch.equal(out_only, out)


def test_rows_beyond_one_grid_dimension_of_blocks():
    """70,000 blocks of 8 rows (more than 65,535), each row its own scale."""
    rows = 8 * 70_000
    x = torch.randn(rows, 1, device="cuda") * torch.linspace(0.5, 3.0, rows, device="cuda")[:, None]
    weight = torch.full((1,), 2.0, device="cuda")
    with torch.inference_mode():
        out = rms_norm_fn(x, weight, eps=0.0)
    # One element per row: x / |x| * 2 (rsqrtf is within 2 ulp).
    torch.testing.assert_close(out, 2 * torch.sign(x), rtol=1e-6, atol=0)


def _count_kernel_calls(monkeypatch):
    calls = []
    original = layer_norm.add_rms_norm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_norm, "add_rms_norm", counting)
    return calls


def test_kernel_serves_inference_only(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(4, 192, device="cuda")
    residual = torch.randn(4, 192, device="cuda")
    weight = torch.randn(192, device="cuda", requires_grad=True)
    with torch.no_grad():
        inference = rms_norm_fn(x, weight, residual=residual)
    assert len(calls) == 1

    training = rms_norm_fn(x, weight, residual=residual)  # autograd needed: the PyTorch form
    assert len(calls) == 1 and training.requires_grad
    training.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    torch.testing.assert_close(inference, training.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,hidden", [(torch.float64, 192), (torch.float32, 1025)])
def test_unsupported_rows_fall_back_to_pytorch(monkeypatch, dtype, hidden):
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(5, hidden, device="cuda", dtype=dtype)
    weight = torch.randn(hidden, device="cuda", dtype=dtype)
    with torch.inference_mode():
        out = rms_norm_fn(x, weight, eps=1e-6)
    assert not calls
    torch.testing.assert_close(out.double(), _oracle(x, None, weight, None, 1e-6)[0], rtol=1e-5, atol=1e-6)


def test_residual_in_another_dtype_than_the_stream_is_summed_unrounded(monkeypatch):
    """An fp32 residual with a bf16 stream: the sum is taken in fp32 before rounding (the PyTorch form; the
    kernel reads the residual in the stream's dtype only)."""
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(4, 192, device="cuda").bfloat16()
    residual = torch.randn(4, 192, device="cuda") * (1 + 2.0 ** -12)  # not representable in bf16
    weight = torch.randn(192, device="cuda")
    with torch.inference_mode():
        out, stream = rms_norm_fn(x, weight, residual=residual, prenorm=True, residual_in_fp32=False)
    assert not calls
    ref_out, ref_stream = _oracle(x, residual, weight, None, 1e-6)
    _assert_close(out, ref_out, torch.bfloat16, "out", 0)
    _assert_close(stream, ref_stream, torch.bfloat16, "stream", 0)


def test_non_contiguous_input():
    x = torch.randn(6, 192, 4, device="cuda")[..., 1]  # element stride 4
    assert not x.is_contiguous()
    weight = torch.randn(192, device="cuda")
    with torch.inference_mode():
        out = rms_norm_fn(x, weight, eps=1e-6)
    _assert_close(out, _oracle(x, None, weight, None, 1e-6)[0], torch.float32, "out", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_starting_at_odd_elements(monkeypatch, dtype):
    """Contiguous rows whose storage starts one element into its allocation: the kernel reads elements one by
    one there (pairs need aligned pointers), with the same result."""
    calls = _count_kernel_calls(monkeypatch)
    seed = fresh_seed()
    rows, hidden = 37, 192
    x = torch.randn(rows * hidden + 1, device="cuda").to(dtype)[1:].view(rows, hidden)
    residual = torch.randn(rows * hidden + 1, device="cuda")[1:].view(rows, hidden)
    weight = torch.randn(hidden, device="cuda")
    assert x.is_contiguous() and x.data_ptr() % (2 * x.element_size()) != 0
    with torch.inference_mode():
        out, stream = rms_norm_fn(x, weight, residual=residual, prenorm=True, residual_in_fp32=True, eps=1e-5)
    assert len(calls) == 1
    ref_out, ref_stream = _oracle(x, residual, weight, None, 1e-5)
    _assert_close(out, ref_out, dtype, "out", seed)
    _assert_close(stream, ref_stream, torch.float32, "stream", seed)

"""The 3xTF32 linear on the GPU: outputs and gradients at least about as close to float64 as cuBLAS's IEEE
fp32 (the claim that lets it be the default for fp32), under autograd, opcheck and torch.compile."""
import logging

import pytest
import torch

from gpu_test_helpers import check_bound, fresh_seed, poison_allocator
from mamba_ssm.ops import linear_3xtf32, policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or linear_3xtf32.kernels is None,
                                reason="needs a CUDA GPU and Triton")

# The bound: 1.5x cuBLAS's IEEE fp32 error (measured 3-4x below it at Vim's shapes), plus 2^-22 of max|ref|,
# the precision of each 3xTF32 product, which short reductions (K below ~64), where fp32's rounding error
# (growing with sqrt(K)) is smaller, can show.
FACTOR, FLOOR = 1.5, 2 ** -22

SHAPES = [  # rows M, in K, out N: Vim-tiny's in_proj, out_proj and x_proj at batch 128, odd sizes, long reductions
    (128 * 197, 192, 768), (128 * 197, 384, 192), (128 * 197, 384, 44), (1000, 37, 70), (3, 5000, 129),
    (333, 96, 1),
]


def _ieee(fn):
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return fn()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_at_least_as_accurate_as_ieee_fp32(M, K, N, a_transposed, with_bias):
    seed = fresh_seed()
    a = torch.randn(K, M, device="cuda").t() if a_transposed else torch.randn(M, K, device="cuda")
    w = torch.randn(N, K, device="cuda") * K ** -0.5
    bias = torch.randn(2 * N, device="cuda")[::2] if with_bias else None  # strided
    poison_allocator()
    got = linear_3xtf32.kernels.mm(a, w.t(), bias)
    ref = a.double() @ w.double().t() + (bias.double() if with_bias else 0)
    ieee = _ieee(lambda: torch.nn.functional.linear(a, w, bias))
    check_bound("mm", got, ref, ieee, torch.float32, seed, factor=FACTOR, floor=FLOOR)


@pytest.mark.parametrize("M,K,N", SHAPES[:4])
def test_linear_gradients_match_float64(M, K, N):
    seed = fresh_seed()
    layer = torch.nn.Linear(K, N, device="cuda")
    x = torch.randn(2, M // 2, K, device="cuda", requires_grad=True)
    grad_out = torch.randn(2, M // 2, N, device="cuda")
    out = linear_3xtf32.linear(x, layer.weight, layer.bias)
    got = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad_out)

    ref_layer = torch.nn.Linear(K, N, dtype=torch.float64, device="cuda")
    ref_layer.load_state_dict(layer.state_dict())
    ref_x = x.detach().double().requires_grad_()
    ref_out = ref_layer(ref_x)
    ref = torch.autograd.grad(ref_out, (ref_x, ref_layer.weight, ref_layer.bias), grad_out.double())

    def ieee_grads():
        ieee_x = x.detach().requires_grad_()
        return torch.autograd.grad(layer(ieee_x), (ieee_x, layer.weight, layer.bias), grad_out)

    ieee = _ieee(ieee_grads)
    check_bound("out", out, ref_out, _ieee(lambda: layer(x)), torch.float32, seed, factor=FACTOR, floor=FLOOR)
    for name, g, r, i in zip(("grad x", "grad weight", "grad bias"), got, ref, ieee):
        check_bound(name, g, r, i, torch.float32, seed, factor=FACTOR, floor=FLOOR)


def test_non_contiguous_input_and_empty_batch():
    layer = torch.nn.Linear(48, 24, device="cuda")
    y = torch.randn(3, 48, 50, device="cuda")  # out_proj's input: the (batch, channels, tokens) scan output
    ref = y.double().transpose(1, 2) @ layer.weight.double().t() + layer.bias.double()
    got = linear_3xtf32.linear(y.transpose(1, 2), layer.weight, layer.bias)
    assert got.shape == (3, 50, 24)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    empty = linear_3xtf32.linear(torch.randn(0, 7, 48, device="cuda"), layer.weight, layer.bias)
    assert empty.shape == (0, 7, 24)


def test_falls_back_under_autocast_tf32_and_ieee_mode():
    x = torch.randn(4, 8, device="cuda")
    w = torch.randn(2, 8, device="cuda")
    assert linear_3xtf32.applies(x, w)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert not linear_3xtf32.applies(x, w)
    assert not linear_3xtf32.applies(x.double(), w.double())
    try:
        policy.set_mode("ieee")
        assert not linear_3xtf32.applies(x, w)
    finally:
        policy.set_mode("3xtf32")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert not linear_3xtf32.applies(x, w)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert linear_3xtf32.applies(x, w)


def test_opcheck():
    a = torch.randn(300, 64, device="cuda", requires_grad=True)
    b = torch.randn(64, 40, device="cuda", requires_grad=True)
    bias = torch.randn(40, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.mamba_ssm.mm_3xtf32.default, (a, b, bias))
    torch.library.opcheck(torch.ops.mamba_ssm.mm_3xtf32.default, (a, b, None))


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_torch_compile_fullgraph_matches_eager():
    """Also: torch.compile's analysis of which tensors the kernel writes succeeds. Where it fails (as it did for
    a method called on an int argument) it logs a warning and treats every input as written, which costs
    copies around each call."""
    dynamo_log = logging.getLogger("torch._dynamo")  # the logger of torch._higher_order_ops.triton_kernel_wrap
    messages = _Messages()
    layer = torch.nn.Linear(96, 192, device="cuda")
    x = torch.randn(4, 197, 96, device="cuda", requires_grad=True)

    def eager(inputs):
        return linear_3xtf32.linear(inputs, layer.weight, layer.bias)

    results = []
    dynamo_log.addHandler(messages)
    try:  # without the on-disk caches, which would skip the analysis on a rerun
        with torch._inductor.config.patch(force_disable_caches=True):
            for forward in (eager, torch.compile(eager, fullgraph=True)):
                out = forward(x)
                results.append((out, *torch.autograd.grad(out.square().sum(), (x, layer.weight, layer.bias))))
    finally:
        dynamo_log.removeHandler(messages)
    for eager_result, traced in zip(*results):
        torch.testing.assert_close(traced, eager_result, rtol=1e-5, atol=1e-5)
    assert not [m for m in messages.messages if "assuming every input is mutated" in m]


def _mm_kernel_launches(step):
    step()  # compilation and autotuning launch the kernel too
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        step()
        torch.cuda.synchronize()
    return sum(event.count for event in profile.key_averages() if "_mm_kernel" in event.key)


@pytest.mark.parametrize("compiled", [False, True])
def test_mixer_projections_run_on_the_kernel(compiled):
    """A v2 mixer's in_proj and out_proj, forward and both gradients, go through the 3xTF32 kernel in fp32;
    both directions' x_proj too, in compiled code only; the delta projection (a reduction over dt's rank)
    never does."""
    from mamba_ssm.modules.mamba_simple import Mamba

    mixer = Mamba(d_model=32, d_state=16, bimamba_type="v2", if_divide_out=True, device="cuda")
    x = torch.randn(2, 20, 32, device="cuda", requires_grad=True)
    loss = torch.compile(lambda inputs: mixer(inputs).sum()) if compiled else lambda inputs: mixer(inputs).sum()
    projections = 2 + (2 if compiled else 0)  # in_proj, out_proj (+ x_proj of both directions)
    assert _mm_kernel_launches(lambda: loss(x).backward()) == 3 * projections  # forward, input and weight grads

"""GPU tests of the bidirectional conv + x_proj inference kernel (selective_scan_cuda::conv_x_proj) against
float64, and of when the v2 mixer uses it."""
import pytest
import torch

from gpu_test_helpers import conv_silu_ref, fresh_seed, poison_allocator
from mamba_ssm.ops import extensions, mamba_inner

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and extensions.cuda.available()),
                                reason="needs a CUDA GPU and the built extension")

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _check(got, u64, weight, dtype, what, seed):
    """got (batch, seqlen, out) against u64 @ W^T (W as the kernel uses it, in dtype). Per element: the kernel
    rounds each conv output to dtype (at most a unit roundoff of |u| each: |W| @ |u| bounds the effect),
    accumulates in fp32 and rounds the result once; a factor 2 of margin on both. As a whole: those
    roundings are independent, so their effect on the norm is about 0.8 unit roundoffs of the result's
    norm; bounded by 2 (an emulation of the kernel on the CPU passed 180 of 180 cases of this file, one with
    a tap dropped in a single channel failed 162)."""
    w = weight.to(dtype).double()
    ref = u64.transpose(1, 2) @ w.t()
    slack = UNIT_ROUNDOFF[dtype] * (u64.abs().transpose(1, 2) @ w.abs().t())
    bound = 2 * (slack + UNIT_ROUNDOFF[dtype] * ref.abs()) + 1e-6 * ref.abs().max()
    assert got.dtype == dtype and got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values (seed {seed})"
    err = got.double().cpu() - ref.cpu()
    excess = err.abs() - bound.cpu()
    assert (excess <= 0).all(), f"{what}: max excess {excess.max().item():.3e} (seed {seed})"
    rel = (err.norm() / ref.norm()).item()
    assert rel <= 2 * UNIT_ROUNDOFF[dtype], f"{what}: relative error {rel:.3e} (seed {seed})"


# (dim, seqlen, out_dim): one and several channel chunks of 64 with a partial last one, sequences shorter
# than a block's 64 positions and across blocks, and each accumulator size (<= 48, <= 64, <= 96).
SHAPES = [(64, 1, 44), (136, 7, 44), (384, 301, 44), (200, 128, 56), (96, 129, 80), (64, 260, 96)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("dim,seqlen,out_dim", SHAPES)
@pytest.mark.parametrize("width,with_bias", [(4, True), (4, False), (3, False), (2, True), (1, True)])
def test_matches_float64(dtype, dim, seqlen, out_dim, width, with_bias):
    seed = fresh_seed()
    poison_allocator()
    batch = 2
    # x as the model has it: the first half of the in_proj output (batch, seqlen, 2 dim), transposed.
    xz = torch.randn(batch, seqlen, 2 * dim, device="cuda").to(dtype)
    x = xz[..., :dim].transpose(1, 2)
    convs = [(0.5 * torch.randn(dim, width, device="cuda"), torch.randn(dim, device="cuda") if with_bias else None)
             for _ in range(2)]
    proj = [torch.randn(out_dim, dim, device="cuda") / dim ** 0.5 for _ in range(2)]
    with torch.inference_mode():
        outs = mamba_inner.bidirectional_conv_x_proj(x, *convs, *proj)
    for reverse, (out, (weight, bias), w) in enumerate(zip(outs, convs, proj)):
        ref = conv_silu_ref(x.double(), weight, bias, bool(reverse))
        _check(out, ref, w, dtype, f"direction {reverse}", seed)


def test_weights_at_any_alignment():
    """x_proj weights given as bf16 views that start 2 bytes into their storage (the kernel copies 16-byte
    pieces of them): same values as from aligned copies of them."""
    dim, seqlen, out_dim = 64, 70, 44
    x = torch.randn(1, seqlen, dim, device="cuda").bfloat16().transpose(1, 2)
    convs = [(torch.randn(dim, 4, device="cuda"), None) for _ in range(2)]
    views = [torch.randn(out_dim * dim + 1, device="cuda").bfloat16()[1:].view(out_dim, dim) for _ in range(2)]
    assert all(v.data_ptr() % 16 != 0 for v in views)
    with torch.inference_mode():
        got = mamba_inner.bidirectional_conv_x_proj(x, *convs, *views)
        want = mamba_inner.bidirectional_conv_x_proj(x, *convs, *[v.clone() for v in views])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_rejects_what_it_cannot_run():
    conv = (torch.randn(64, 4, device="cuda"), None)
    proj = torch.randn(44, 64, device="cuda")
    x32 = torch.randn(1, 10, 64, device="cuda").transpose(1, 2)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        mamba_inner.bidirectional_conv_x_proj(x32, conv, conv, proj, proj)
    x = x32.bfloat16()
    with pytest.raises(RuntimeError, match="token-major"):
        mamba_inner.bidirectional_conv_x_proj(x.contiguous(), conv, conv, proj, proj)
    x60 = torch.randn(1, 10, 60, device="cuda").bfloat16().transpose(1, 2)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        mamba_inner.bidirectional_conv_x_proj(x60, (conv[0][:60], None), (conv[0][:60], None), proj[:, :60],
                                           proj[:, :60])
    odd = torch.randn(1, 10, 129, device="cuda").bfloat16()[..., 1:].transpose(1, 2)  # odd position stride
    with pytest.raises(RuntimeError, match="4-byte aligned"):
        mamba_inner.bidirectional_conv_x_proj(odd, conv, conv, proj, proj)
    with pytest.raises(RuntimeError, match="out_dim <= 96"):
        big = torch.randn(97, 64, device="cuda")
        mamba_inner.bidirectional_conv_x_proj(x, conv, conv, big, big)
    widths = [conv[0].unsqueeze(1)] * 2  # as the mixer holds them: (dim, 1, width)
    assert mamba_inner.conv_x_proj_applies(x, widths, [proj, proj])
    assert not mamba_inner.conv_x_proj_applies(x32, widths, [proj, proj])
    assert not mamba_inner.conv_x_proj_applies(x.contiguous(), widths, [proj, proj])
    assert not mamba_inner.conv_x_proj_applies(odd, widths, [proj, proj])
    assert not mamba_inner.conv_x_proj_applies(x, widths, [proj, proj[:40]])  # the directions' out_dims differ
    assert not mamba_inner.conv_x_proj_applies(x, [widths[0], widths[0][..., :3]], [proj, proj])  # and widths


def test_mixer_uses_it_in_half_precision_inference_only(monkeypatch):
    """The v2 mixer's inference in bf16 autocast goes through the kernel (one call per block) and equals the
    separate conv and x_proj kernels it replaces; fp32 and training keep them."""
    from mamba_ssm.modules.mamba_simple import Mamba

    calls = []
    original = mamba_inner.bidirectional_conv_x_proj

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(mamba_inner, "bidirectional_conv_x_proj", counting)
    torch.manual_seed(0)
    mixer = Mamba(96, bimamba_type="v2", if_divide_out=True).cuda()
    with torch.no_grad():
        for conv in (mixer.conv1d, mixer.conv1d_b):
            conv.bias.add_(0.3 * torch.randn_like(conv.bias))
    hidden = torch.randn(3, 150, 96, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused = mixer(hidden)
        assert len(calls) == 1
        monkeypatch.setattr(mamba_inner, "conv_x_proj_applies", lambda *args: False)
        separate = mixer(hidden)
    assert len(calls) == 1
    rel = ((fused.double() - separate.double()).norm() / separate.double().norm()).item()
    assert rel < 1e-2
    monkeypatch.undo()
    monkeypatch.setattr(mamba_inner, "bidirectional_conv_x_proj", counting)
    with torch.no_grad():
        mixer(hidden)  # fp32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixer(hidden).float().sum().backward()  # training
    assert len(calls) == 1

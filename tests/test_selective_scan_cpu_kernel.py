"""The fused CPU selective scan (`selective_scan_cpu`, mamba_ssm.ops.scan.cpu_selective_scan) against float64.

The oracle is the PyTorch reference run in float64 (its own tests check it against an explicit
recurrence); gradients come from autograd through it. Skipped when the extension is not importable.
"""
import pytest
import torch

from helpers import assert_max_error as close
from mamba_ssm.ops import extensions, mamba_inner, scan
from mamba_ssm.ops.scan import selective_scan_ref
from test_causal_conv1d import conv_oracle

pytestmark = pytest.mark.skipif(not extensions.cpu.available(), reason="selective_scan_cpu extension not built")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make(batch=2, dim=8, seqlen=7, dstate=16, groups=1, with_D=True, with_z=True, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(
        u=r(batch, dim, seqlen),
        delta=torch.rand(batch, dim, seqlen, generator=g, dtype=torch.float64) * 0.6 - 0.3,
        A=-(0.5 + torch.rand(dim, dstate, generator=g, dtype=torch.float64)),
        B=r(batch, groups, dstate, seqlen),
        C=r(batch, groups, dstate, seqlen),
        D=r(dim) if with_D else None,
        z=r(batch, dim, seqlen) if with_z else None,
        delta_bias=r(dim) * 0.3 if with_bias else None,
    )
    return t


def oracle(t, softplus, reverse, dout=None, dlast=None):
    """float64 reference (flipping inputs/outputs for reverse); returns out, last, grads."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in t.items()}
    x = dict(leaves)
    if reverse:
        for k in ("u", "delta", "B", "C", "z"):
            if x[k] is not None:
                x[k] = x[k].flip(-1)
    out, last = selective_scan_ref(**x, delta_softplus=softplus, return_last_state=True)
    if reverse:
        out = out.flip(-1)
    grads = None
    if dout is not None:
        torch.autograd.backward([out, last] if dlast is not None else [out],
                                [dout, dlast] if dlast is not None else [dout])
        grads = {k: (v.grad if v is not None else None) for k, v in leaves.items()}
    return out.detach(), last.detach(), grads


def run_kernel(t, softplus, reverse, dtype=torch.float32, dout=None, dlast=None, return_last_state=True):
    leaves = {}
    for k, v in t.items():
        if v is None:
            leaves[k] = None
        elif k in ("A", "D", "delta_bias"):
            leaves[k] = v.detach().float().requires_grad_()
        else:
            leaves[k] = v.detach().to(dtype).requires_grad_()
    res = scan.cpu_selective_scan(*(leaves[k] for k in NAMES), softplus, return_last_state, reverse=reverse)
    out, last = res if return_last_state else (res, None)
    grads = None
    if dout is not None:
        outs, gs = [out], [dout.to(out.dtype)]
        if dlast is not None:
            outs.append(last)
            gs.append(dlast.float())
        torch.autograd.backward(outs, gs)
        grads = {k: (v.grad if v is not None else None) for k, v in leaves.items()}
    return out, last, grads


CASES = [
    # (seqlen, groups, with_D, with_z, with_bias, softplus, reverse)
    (1, 1, True, True, True, True, False),
    (7, 2, True, True, True, True, False),
    (7, 1, False, False, False, False, True),
    (64, 1, True, False, True, True, True),
    (65, 2, False, True, False, True, False),  # crosses a checkpoint boundary (CHUNK = 64)
    (129, 1, True, True, True, True, True),
    (197, 1, True, True, True, True, False),
    (197, 2, True, True, False, False, True),
]


@pytest.mark.parametrize("seqlen,groups,with_D,with_z,with_bias,softplus,reverse", CASES)
def test_fwd_bwd_fp32_vs_float64(seqlen, groups, with_D, with_z, with_bias, softplus, reverse):
    assert scan.CPU_CHUNK == 64
    t = make(seqlen=seqlen, groups=groups, with_D=with_D, with_z=with_z, with_bias=with_bias, seed=seqlen)
    if not softplus:  # a stable recurrence needs delta >= 0
        t["delta"] = t["delta"].abs() + 0.05
        if t["delta_bias"] is not None:
            t["delta_bias"] = t["delta_bias"].abs()
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(t["u"].shape, generator=g, dtype=torch.float64)
    dlast = torch.randn(2, 8, 16, generator=g, dtype=torch.float64)
    out_r, last_r, gr = oracle(t, softplus, reverse, dout, dlast)
    out, last, gk = run_kernel(t, softplus, reverse, dout=dout, dlast=dlast)
    assert out.dtype == torch.float32 and out.shape == t["u"].shape and last.shape == (2, 8, 16)
    close(out, out_r, 2e-6, 1e-6, "out")
    close(last, last_r, 2e-6, 1e-6, "last_state")
    for k in NAMES:
        if t[k] is None:
            assert gk[k] is None
            continue
        assert gk[k].shape == t[k].shape, k
        close(gk[k], gr[k], 5e-6, 1e-6, f"grad {k}")


@pytest.mark.parametrize("dstate", [3, 16, 24, 32])  # 32: 16-float vectors where AVX-512 runs
def test_dstate_generic_and_no_last_state(dstate):
    t = make(seqlen=70, dstate=dstate, groups=2, seed=dstate)
    dout = torch.randn(t["u"].shape, dtype=torch.float64)
    out_r, _, gr = oracle(t, True, False, dout)
    out, last, gk = run_kernel(t, True, False, dout=dout, return_last_state=False)
    assert last is None
    close(out, out_r, 2e-6, 1e-6, "out")
    for k in NAMES:
        close(gk[k], gr[k], 5e-6, 1e-6, f"grad {k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    t = make(seqlen=197, seed=3)
    # the oracle sees the inputs rounded to the kernel's input dtype
    rounded = {k: (v.to(dtype).double() if v is not None and k not in ("A", "D", "delta_bias") else v)
               for k, v in t.items()}
    dout = torch.randn(t["u"].shape, dtype=torch.float64).to(dtype).double()
    out_r, last_r, gr = oracle(rounded, True, False, dout)
    out, last, gk = run_kernel(t, True, False, dtype=dtype, dout=dout)
    assert out.dtype == dtype and last.dtype == torch.float32
    close(out, out_r, 1e-2, 1e-2, "out")  # fp32 compute, rounded once to the output dtype
    close(last, last_r, 2e-6, 1e-6, "last_state")
    for k in NAMES:
        assert gk[k].dtype == (torch.float32 if k in ("A", "D", "delta_bias") else dtype), k
        close(gk[k], gr[k], 1e-2, 1e-2, f"grad {k}")


def test_reverse_equals_flipped_scan():
    t = make(seqlen=100, seed=5)
    f32 = {k: (v.float() if v is not None else None) for k, v in t.items()}
    out_rev, last_rev = scan.cpu_selective_scan(*(f32[k] for k in NAMES), True, True, reverse=True)
    flipped = dict(f32)
    for k in ("u", "delta", "B", "C", "z"):
        flipped[k] = f32[k].flip(-1)
    out_flip, last_flip = scan.cpu_selective_scan(*(flipped[k] for k in NAMES), True, True)
    torch.testing.assert_close(out_rev, out_flip.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(last_rev, last_flip, rtol=0, atol=0)


def test_backward_without_saved_checkpoints_and_noncontiguous():
    """Strided inputs (z from a chunk of xz, delta and B/C transposed) and grads that reach only u."""
    batch, dim, L, N = 2, 8, 80, 16
    xz = torch.randn(batch, 2 * dim, L)
    u, z = xz.chunk(2, dim=1)
    u = u.clone().requires_grad_()
    delta = (torch.rand(batch, L, dim) * 0.5).transpose(1, 2)  # position stride != 1
    A = -(0.5 + torch.rand(dim, N))
    B = torch.randn(batch, L, N).transpose(1, 2).unsqueeze(1)
    C = torch.randn(batch, L, N).transpose(1, 2).unsqueeze(1)
    out = scan.cpu_selective_scan(u, delta, A, B, C, None, z, None, True, False)
    out.sum().backward()
    ref_u = u.detach().double().requires_grad_()
    ref = selective_scan_ref(ref_u, delta.double(), A.double(), B.double(), C.double(), None, z.double(), None, True)
    ref.sum().backward()
    close(out, ref.detach(), 2e-6, 1e-6, "out")
    close(u.grad, ref_u.grad, 5e-6, 1e-6, "grad u")


@pytest.mark.parametrize("batch,groups,reverse", [(2, 3, False), (2, 3, True), (8, 1, True)])
def test_token_major_blocks_of_channels(batch, groups, reverse):
    """Token-major operands as Vim passes them (u and z channel halves of one (batch, seqlen, 2 dim) tensor,
    delta and dout (batch, seqlen, dim) transposed): the kernels move rows 16 channels at a time, so dim 21
    leaves a partial block; 3 groups of 7 channels put block and group boundaries in different places
    (the forward's blocks stop at a group's end), and with batch 8 the backward's work units span more than
    16 channels (several blocks each)."""
    dim, L, N = 21, 70, 16
    g = torch.Generator().manual_seed(21 + batch + reverse)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    xz = r(batch, L, 2 * dim).transpose(1, 2)
    t = dict(u=xz[:, :dim], delta=(torch.rand(batch, L, dim, generator=g, dtype=torch.float64) * 0.6 - 0.3).transpose(1, 2),
             A=-(0.5 + torch.rand(dim, N, generator=g, dtype=torch.float64)), B=r(batch, groups, N, L),
             C=r(batch, groups, N, L), D=r(dim), z=xz[:, dim:], delta_bias=r(dim) * 0.3)
    dout = r(batch, L, dim).transpose(1, 2)
    out_r, last_r, gr = oracle(t, True, reverse, dout)
    leaves = {k: (v.detach().float().requires_grad_() if k in ("A", "D", "delta_bias", "B", "C") else None)
              for k, v in t.items()}
    xz32 = xz.detach().float().requires_grad_()
    delta32 = t["delta"].detach().float().requires_grad_()
    leaves.update(u=xz32[:, :dim], delta=delta32, z=xz32[:, dim:])
    out, last = scan.cpu_selective_scan(*(leaves[k] for k in NAMES), True, True, reverse=reverse)
    assert out.stride(1) == 1, "the output keeps u's token-major layout"
    out.backward(dout.float())
    close(out, out_r, 2e-6, 1e-6, "out")
    close(last, last_r, 2e-6, 1e-6, "last_state")
    close(xz32.grad[:, :dim], gr["u"], 5e-6, 1e-6, "grad u")
    close(xz32.grad[:, dim:], gr["z"], 5e-6, 1e-6, "grad z")
    close(delta32.grad, gr["delta"], 5e-6, 1e-6, "grad delta")
    for k in ("A", "B", "C", "D", "delta_bias"):
        close(leaves[k].grad, gr[k], 5e-6, 1e-6, f"grad {k}")


@pytest.mark.parametrize("dtype,rank,groups,dstate,seqlen", [
    (torch.float32, 12, 1, 16, 197),   # Vim-tiny's block: low-rank delta
    (torch.float32, None, 2, 5, 70),   # full-size delta; 2 groups of 11 channels end in partial blocks; dstate 5
    (torch.bfloat16, 3, 1, 16, 1),
])
def test_bimamba_scan_inference_vs_float64(dtype, rank, groups, dstate, seqlen):
    """The fused bidirectional op on the CPU (inference): silu(z) (y_f + y_b) out_scale with y_b scanned from
    position L-1 down, delta formed from the low-rank dt inside the kernel, u_f and z token-major channel
    halves of one tensor (as Vim passes them), against the float64 reference of each direction run on the
    inputs rounded to the kernel's dtype."""
    batch, dim, scale = 2, 22, 0.5
    g = torch.Generator().manual_seed(dim + seqlen)
    tf, tb = (make(batch, dim, seqlen, dstate, groups, seed=s) for s in (3, 4))
    xz = torch.randn(batch, seqlen, 2 * dim, generator=g, dtype=torch.float64).transpose(1, 2)
    tf["u"], z = xz[:, :dim], xz[:, dim:]
    tb["z"] = tf["z"] = None
    low_rank = {}
    for tag in ("f", "b"):
        if rank is not None:
            W = torch.randn(dim, rank, generator=g, dtype=torch.float64) * 0.5
            dt = torch.randn(batch, rank, seqlen, generator=g, dtype=torch.float64) * 0.3
            low_rank[tag] = (W, dt)
    rounded = lambda v: v.to(dtype).double() if v is not None else None  # noqa: E731
    refs = []
    for tag, t, reverse in (("f", tf, False), ("b", tb, True)):
        r = {k: (rounded(v) if k in ("u", "delta", "B", "C") else v) for k, v in t.items()}
        if tag in low_rank:
            W, dt = low_rank[tag]
            r["delta"] = torch.einsum("dr,brl->bdl", W, rounded(dt))
        refs.append(oracle(r, True, reverse)[0])
    ref = (refs[0] + refs[1]) * torch.nn.functional.silu(rounded(z)) * scale

    def kernel_args(tag, t):
        delta = low_rank[tag][1] if tag in low_rank else t["delta"]
        return (t["u"].to(dtype), delta.to(dtype), t["A"].float(), t["B"].to(dtype), t["C"].to(dtype),
                t["D"].float(), t["delta_bias"].float())

    with torch.inference_mode():
        out = mamba_inner.fused_bimamba_scan(
            *kernel_args("f", tf), *kernel_args("b", tb), z.to(dtype), True,
            delta_proj_weight_f=low_rank["f"][0].float() if rank else None,
            delta_proj_weight_b=low_rank["b"][0].float() if rank else None, out_scale=scale)
    assert out.dtype == dtype and out.shape == (batch, dim, seqlen)
    if seqlen > 1:
        assert out.stride(1) == 1, "the output keeps u's token-major layout"
    if dtype == torch.float32:
        close(out, ref, 2e-6, 1e-6, "out")
    else:
        close(out, ref, 1e-2, 1e-3, "out")  # the output rounded to bfloat16


def test_bimamba_scan_opcheck():
    """The CPU kernel under the fused op's schema and fake (what torch.compile traces), low-rank delta in f."""
    tf, tb = ({k: (v.float() if v is not None else None) for k, v in make(dim=20, seqlen=9, seed=s).items()}
              for s in (5, 6))
    W = torch.randn(20, 3)
    dt = torch.randn(2, 3, 9)
    args = (tf["u"], dt, tf["A"], tf["B"], tf["C"], tf["D"], tf["delta_bias"],
            tb["u"], tb["delta"], tb["A"], tb["B"], tb["C"], tb["D"], tb["delta_bias"], tf["z"],
            W, None, None, None, None, None, True, False, 0.5)
    torch.library.opcheck(torch.ops.mamba_ssm.bimamba_scan_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_bimamba_scan_cpu_is_for_inference():
    t = {k: (v.float() if v is not None else None) for k, v in make().items()}
    args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    out = mamba_inner.fused_bimamba_scan(*args, *args, t["z"], True)  # no autograd: runs
    assert out.shape == t["u"].shape
    with pytest.raises(ValueError, match="inference"):
        mamba_inner.fused_bimamba_scan(args[0].requires_grad_(), *args[1:], *args, t["z"], True)


def test_empty_and_no_grad():
    t = make(seqlen=5)
    with torch.no_grad():
        out = scan.cpu_selective_scan(*(v.float() if v is not None else None for v in t.values()), True, False)
    assert out.shape == t["u"].shape
    e = {k: (v[:0].float() if k in ("u", "delta", "B", "C", "z") else v.float()) for k, v in t.items()}
    out, last = scan.cpu_selective_scan(*(e[k] for k in NAMES), True, True)
    assert out.shape == (0, 8, 5) and last.shape == (0, 8, 16)


@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck(reverse):
    t = make(batch=2, dim=4, seqlen=70, dstate=8, groups=2)
    f = {k: v.float().requires_grad_() for k, v in t.items()}
    args = tuple(f[k] for k in NAMES) + (True, True, True, reverse)
    torch.library.opcheck(torch.ops.mamba_ssm.selective_scan_fwd.default, args)
    out, last, ckpt = torch.ops.mamba_ssm.selective_scan_fwd(*args)
    bargs = tuple(f[k].detach() for k in NAMES) + (torch.randn_like(out), torch.randn_like(last), ckpt.detach(),
                                                   True, reverse)
    torch.library.opcheck(torch.ops.mamba_ssm.selective_scan_bwd.default, bargs)


def test_bad_inputs():
    t = {k: v.float() for k, v in make().items()}
    with pytest.raises(RuntimeError, match="B and C"):
        scan.cpu_selective_scan(t["u"], t["delta"], t["A"], t["B"][:, :, :, :3], t["C"], None, None, None, True, False)
    with pytest.raises(RuntimeError, match="groups"):
        B3 = torch.randn(2, 3, 16, 7)
        scan.cpu_selective_scan(t["u"], t["delta"], t["A"], B3, B3, None, None, None, True, False)


@pytest.mark.parametrize("dim,seqlen,width,with_bias", [(21, 70, 4, True), (8, 2, 4, False), (16, 5, 2, True)])
def test_conv_silu_pair_vs_float64(dim, seqlen, width, with_bias):
    """Both convs of a bidirectional block (inference): the causal one, and the anti-causal one as the causal
    conv of the flipped sequence flipped back; x a token-major channel half of a wider tensor (as in Vim);
    dim 21 ends in a partial vector, seqlen 2 is shorter than the conv."""
    g = torch.Generator().manual_seed(dim + seqlen)
    xz = torch.randn(3, seqlen, 2 * dim, generator=g, dtype=torch.float64).transpose(1, 2)
    x = xz[:, :dim]
    wf, wb = torch.randn(dim, width, generator=g, dtype=torch.float64), torch.randn(dim, width, generator=g, dtype=torch.float64)
    bf, bb = (torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(2)) if with_bias else (None, None)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    assert mamba_inner.conv_silu_pair_applies(f32(x), f32(wf), f32(bf))
    out_f, out_b = mamba_inner.conv_silu_pair(f32(x), f32(wf), f32(bf), f32(wb), f32(bb))
    assert out_f.stride(1) == 1 and out_b.stride(1) == 1, "token-major outputs, as the linear layers take them"
    ref_f = conv_oracle(x, wf, bf, "silu")
    ref_b = conv_oracle(x.flip(-1), wb, bb, "silu").flip(-1)
    close(out_f, ref_f, 2e-6, 1e-6, "causal conv")
    close(out_b, ref_b, 2e-6, 1e-6, "anti-causal conv")


def test_conv_silu_pair_only_for_inference():
    x = torch.randn(2, 7, 8).transpose(1, 2)
    w = torch.randn(8, 4, requires_grad=True)
    assert not mamba_inner.conv_silu_pair_applies(x, w, None)  # autograd: the differentiable convs run instead
    with torch.no_grad():
        assert mamba_inner.conv_silu_pair_applies(x, w, None)
        assert not mamba_inner.conv_silu_pair_applies(x.contiguous(), w, None)  # channel-major
        assert not mamba_inner.conv_silu_pair_applies(x.double(), w.double(), None)

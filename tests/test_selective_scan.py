"""CPU tests of the selective scan and the Mamba inner op against an independent float64 recurrence."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import extension_importable
from test_causal_conv1d import conv_oracle
from mamba_ssm.ops import scan
from mamba_ssm.ops.mamba_inner import bimamba_inner_fn_no_out_proj, mamba_inner_fn_no_out_proj, mamba_inner_ref
from mamba_ssm.ops.scan import selective_scan_fn, selective_scan_ref


# ---------------------------------------------------------------------------------------------------
# Independent oracle: an explicit recurrence, one (batch, channel) at a time, in float64 numpy.
# ---------------------------------------------------------------------------------------------------
def _np(t):
    return None if t is None else t.detach().double().numpy()


def _state_input(M, b, d, t, dim):
    """B or C for batch b, channel d, position t, whatever its layout."""
    if M.ndim == 2:  # (dim, N)
        return M[d]
    if M.ndim == 3:  # (batch, N, L)
        return M[b, :, t]
    groups = M.shape[1]  # (batch, G, N, L): channel d belongs to group d // (dim // G)
    return M[b, d // (dim // groups), :, t]


def scan_oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    u, delta, A, B, C, D, z, delta_bias = map(_np, (u, delta, A, B, C, D, z, delta_bias))
    bsz, dim, seqlen = u.shape
    out = np.zeros((bsz, dim, seqlen))
    last = np.zeros((bsz, dim, A.shape[1]))
    for b in range(bsz):
        for d in range(dim):
            h = np.zeros(A.shape[1])
            for t in range(seqlen):
                dt = delta[b, d, t] + (0.0 if delta_bias is None else delta_bias[d])
                if delta_softplus:
                    dt = math.log1p(math.exp(dt))
                h = np.exp(dt * A[d]) * h + dt * _state_input(B, b, d, t, dim) * u[b, d, t]
                y = float(np.dot(_state_input(C, b, d, t, dim), h))
                if D is not None:
                    y += D[d] * u[b, d, t]
                if z is not None:
                    zz = z[b, d, t]
                    y *= zz / (1.0 + math.exp(-zz))
                out[b, d, t] = y
            last[b, d] = h
    return torch.from_numpy(out), torch.from_numpy(last)


def make_inputs(bsz=2, dim=4, seqlen=7, dstate=3, layout="batch", groups=2, dtype=torch.float64, seed=0,
                with_optional=True, requires_grad=False):
    """layout of B and C: 'channel' (dim, N), 'batch' (batch, N, L) or 'group' (batch, G, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    def bc_shape():
        return {"channel": (dim, dstate), "batch": (bsz, dstate, seqlen),
                "group": (bsz, groups, dstate, seqlen)}[layout]

    t = dict(
        u=rnd(bsz, dim, seqlen),
        delta=(torch.rand(bsz, dim, seqlen, generator=g, dtype=torch.float64) * 0.6 - 0.3).to(dtype),
        A=-(0.5 + torch.rand(dim, dstate, generator=g, dtype=torch.float64)).to(torch.float64 if dtype == torch.float64 else torch.float32),
        B=rnd(*bc_shape()),
        C=rnd(*bc_shape()),
    )
    if with_optional:
        t.update(D=rnd(dim).to(t["A"].dtype), z=rnd(bsz, dim, seqlen), delta_bias=rnd(dim, scale=0.3).to(t["A"].dtype))
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def _positive_delta(t):
    """Without softplus the scan needs delta >= 0 for a stable recurrence: shift it."""
    t["delta"] = (t["delta"].detach().abs() + 0.05).requires_grad_(t["u"].requires_grad)
    if "delta_bias" in t:
        t["delta_bias"] = t["delta_bias"].detach().abs().requires_grad_(t["u"].requires_grad)
    return t


# ---------------------------------------------------------------------------------------------------
# Forward values
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_fn])
@pytest.mark.parametrize("layout", ["channel", "batch", "group"])
@pytest.mark.parametrize("seqlen", [1, 7, 33])
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("with_optional", [True, False])
def test_scan_matches_recurrence(fn, layout, seqlen, softplus, with_optional):
    t = make_inputs(seqlen=seqlen, layout=layout, with_optional=with_optional, seed=seqlen)
    if not softplus:
        _positive_delta(t)
    out, last = fn(**t, delta_softplus=softplus, return_last_state=True)
    ref_out, ref_last = scan_oracle(**t, delta_softplus=softplus)
    assert out.dtype == torch.float64 and out.shape == t["u"].shape
    assert last.shape == (2, 4, 3)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)


def test_scan_hand_checked_values():
    # One channel, one state: A = -1, delta = log(2) so exp(delta*A) = 1/2; B = C = 1, u = 1.
    # h = [ln2, ln2*1.5, ln2*1.75], y = h + D*u with D = 0.5.
    ln2 = math.log(2.0)
    u = torch.ones(1, 1, 3, dtype=torch.float64)
    delta = torch.full((1, 1, 3), ln2, dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.ones(1, 1, 3, dtype=torch.float64)
    C = torch.ones(1, 1, 3, dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    out, last = selective_scan_fn(u, delta, A, B, C, D, return_last_state=True)
    expected = torch.tensor([[[ln2 + 0.5, 1.5 * ln2 + 0.5, 1.75 * ln2 + 0.5]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(last, torch.tensor([[[1.75 * ln2]]], dtype=torch.float64))
    # softplus(delta + bias) with bias chosen so that the effective delta is again ln2: softplus^-1(ln2) = 0
    out_sp = selective_scan_fn(u, torch.zeros_like(delta), A, B, C, D, delta_bias=torch.zeros(1, dtype=torch.float64),
                               delta_softplus=True)
    torch.testing.assert_close(out_sp, expected, rtol=1e-14, atol=1e-14)


def test_scan_is_causal():
    t = make_inputs(seqlen=9, seed=4)
    out = selective_scan_fn(**t, delta_softplus=True)
    t2 = dict(t)
    for k in ("u", "delta", "z", "B", "C"):
        t2[k] = t[k].clone()
        t2[k][..., 6:] = torch.randn_like(t2[k][..., 6:])
    out2 = selective_scan_fn(**t2, delta_softplus=True)
    torch.testing.assert_close(out[..., :6], out2[..., :6], rtol=0, atol=0)
    assert not torch.allclose(out[..., 6:], out2[..., 6:])


@pytest.mark.parametrize("groups", [1, 4])
def test_grouped_bc_equals_expanded_per_channel_batch_bc(groups):
    # Grouped B/C with G groups equals running each group's channels with the (batch, N, L) layout.
    t = make_inputs(dim=4, seqlen=5, layout="group", groups=groups, seed=21)
    out = selective_scan_fn(**t, delta_softplus=True)
    per = 4 // groups
    for gi in range(groups):
        sl = slice(gi * per, (gi + 1) * per)
        sub = dict(u=t["u"][:, sl], delta=t["delta"][:, sl], A=t["A"][sl], B=t["B"][:, gi], C=t["C"][:, gi],
                   D=t["D"][sl], z=t["z"][:, sl], delta_bias=t["delta_bias"][sl])
        ref, _ = scan_oracle(**sub, delta_softplus=True)
        torch.testing.assert_close(out[:, sl], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("b_layout, c_layout", [
    ("channel", "batch"), ("batch", "channel"), ("channel", "group"), ("group", "channel"),
    ("batch", "group"), ("group", "batch"),
])
def test_mixed_b_c_layouts_match_recurrence(b_layout, c_layout):
    # The input check accepts B and C with different layouts (as upstream mamba does), so the result
    # must be the recurrence's; raising a ValueError would also be acceptable, a wrong result is not.
    tb = make_inputs(seqlen=6, layout=b_layout, groups=2, seed=31)
    tc = make_inputs(seqlen=6, layout=c_layout, groups=2, seed=32)
    t = dict(tb, C=tc["C"])
    try:
        out = selective_scan_fn(**t, delta_softplus=True)
    except ValueError:
        return
    ref, _ = scan_oracle(**t, delta_softplus=True)
    torch.testing.assert_close(
        out, ref, rtol=1e-10, atol=1e-10,
        msg=lambda m: f"B {b_layout} {tuple(t['B'].shape)} with C {c_layout} {tuple(t['C'].shape)}: wrong result\n{m}")


@pytest.mark.parametrize("chunk_elements", ["one", "three_steps", "four_steps"])
@pytest.mark.parametrize("grad_mode", [False, True])
@pytest.mark.parametrize("layout", ["channel", "batch", "group"])
def test_chunk_boundaries(monkeypatch, chunk_elements, grad_mode, layout):
    seqlen = 11
    t = make_inputs(seqlen=seqlen, layout=layout, seed=41, requires_grad=grad_mode)
    per_step = 2 * 4 * 3  # batch * dim * dstate
    elements = {"one": 1, "three_steps": 3 * per_step, "four_steps": 4 * per_step + 5}[chunk_elements]
    monkeypatch.setattr(scan, "_REFERENCE_CHUNK_ELEMENTS", elements)
    ref_out, ref_last = scan_oracle(**t, delta_softplus=True)
    with torch.set_grad_enabled(grad_mode):
        out, last = selective_scan_ref(**t, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)
    if grad_mode:
        # gradients through chunk boundaries equal those of the unchunked computation
        out.sum().backward()
        grads = [t[k].grad.clone() for k in ("u", "delta", "A", "B", "C")]
        monkeypatch.setattr(scan, "_REFERENCE_CHUNK_ELEMENTS", 1 << 30)
        for k in t:
            t[k].grad = None
        selective_scan_ref(**t, delta_softplus=True).sum().backward()
        for g, k in zip(grads, ("u", "delta", "A", "B", "C")):
            torch.testing.assert_close(g, t[k].grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["channel", "batch", "group"])
def test_grad_mode_and_no_grad_paths_agree(layout):
    t = make_inputs(dtype=torch.float32, seqlen=13, layout=layout, seed=51)
    before = {k: v.clone() for k, v in t.items()}
    with torch.no_grad():
        out_ng, last_ng = selective_scan_fn(**t, delta_softplus=True, return_last_state=True)
    tg = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out_g, last_g = selective_scan_fn(**tg, delta_softplus=True, return_last_state=True)
    assert out_g.requires_grad and not out_ng.requires_grad
    torch.testing.assert_close(out_ng, out_g.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last_ng, last_g.detach(), rtol=1e-6, atol=1e-6)
    for k, v in t.items():  # the in-place no-grad path must leave the inputs alone
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["batch", "group"])
def test_low_precision_output_dtype(dtype, layout):
    t = make_inputs(dtype=dtype, seqlen=9, layout=layout, seed=61)
    assert t["A"].dtype == torch.float32
    out, last = selective_scan_fn(**t, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype
    assert last.dtype == torch.float32
    ref, ref_last = scan_oracle(**t, delta_softplus=True)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-4, atol=1e-4)


def test_float32_inputs_give_float32_output():
    t = make_inputs(dtype=torch.float32, seed=71)
    out = selective_scan_fn(**t, delta_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), scan_oracle(**t, delta_softplus=True)[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------
GRAD_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.mark.parametrize("seqlen", [1, 7, 197])
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("layout", ["batch", "channel", "group"])
def test_gradcheck_scan(seqlen, softplus, layout):
    long = seqlen == 197
    if long and layout != "batch":
        pytest.skip("197 positions are checked on the (batch, N, L) layout only, to stay fast")
    t = make_inputs(bsz=1 if long else 2, dim=2, dstate=2, seqlen=seqlen, layout=layout, groups=2,
                    seed=seqlen + 1, requires_grad=True)
    if not softplus:
        _positive_delta(t)
    inputs = tuple(t[k] for k in GRAD_KEYS)

    def f(*args):
        out, last = selective_scan_fn(*args, delta_softplus=softplus, return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=long)


def test_gradcheck_mamba_inner():
    g = torch.Generator().manual_seed(81)
    d_inner, rank, dstate, seqlen = 3, 2, 2, 5

    def r(*s, scale=0.5):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).requires_grad_(True)

    inputs = (r(2, 2 * d_inner, seqlen), r(d_inner, 1, 4), r(d_inner), r(rank + 2 * dstate, d_inner),
              r(d_inner, rank), (-(0.5 + torch.rand(d_inner, dstate, generator=g, dtype=torch.float64))).requires_grad_(True),
              r(d_inner), r(d_inner))

    def f(xz, cw, cb, xw, dw, A, D, db):
        return mamba_inner_fn_no_out_proj(xz, cw, cb, xw, dw, A, D=D, delta_bias=db)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ---------------------------------------------------------------------------------------------------
# The Mamba inner op (one direction) and the bidirectional composition
# ---------------------------------------------------------------------------------------------------
def inner_oracle(xz, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, delta_bias):
    """conv with SiLU (the loop oracle of test_causal_conv1d) -> x_proj -> dt_proj -> recurrence -> gate,
    all in float64."""
    xz = xz.detach().double()
    x, z = xz.chunk(2, dim=1)
    xc = conv_oracle(x, conv_w.reshape(conv_w.shape[0], -1), conv_b, "silu")
    rank = dt_proj_w.shape[1]
    dstate = A.shape[1]
    x_dbl = torch.einsum("ed,bdl->bel", x_proj_w.detach().double(), xc)
    dt = torch.einsum("dr,brl->bdl", dt_proj_w.detach().double(), x_dbl[:, :rank])
    B = x_dbl[:, rank:rank + dstate]
    C = x_dbl[:, rank + dstate:]
    out, _ = scan_oracle(xc, dt, A, B, C, D, z, delta_bias, delta_softplus=True)
    return out


def _direction(d_inner=4, rank=2, dstate=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
    return dict(conv1d_weight=r(d_inner, 1, 4), conv1d_bias=r(d_inner), x_proj_weight=r(rank + 2 * dstate, d_inner),
                delta_proj_weight=r(d_inner, rank), A=-(0.5 + torch.rand(d_inner, dstate, generator=g, dtype=torch.float64)),
                D=r(d_inner), delta_bias=r(d_inner))


@pytest.mark.parametrize("fn", [mamba_inner_fn_no_out_proj, mamba_inner_ref])
@pytest.mark.parametrize("seqlen", [1, 7])
def test_mamba_inner_matches_oracle(fn, seqlen):
    p = _direction(seed=seqlen)
    xz = torch.randn(2, 8, seqlen, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = fn(xz, **p)
    ref = inner_oracle(xz, p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"], p["delta_proj_weight"],
                       p["A"], p["D"], p["delta_bias"])
    assert out.shape == (2, 4, seqlen)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("out_scale", [1.0, 0.5])
def test_bimamba_inner_is_forward_plus_flipped_backward(out_scale):
    pf, pb = _direction(seed=1), _direction(seed=2)
    xz = torch.randn(2, 8, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out = bimamba_inner_fn_no_out_proj(xz, pf, pb, out_scale=out_scale)
    args = lambda p: (p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"], p["delta_proj_weight"],  # noqa: E731
                      p["A"], p["D"], p["delta_bias"])
    ref = (inner_oracle(xz, *args(pf)) + inner_oracle(xz.flip(-1), *args(pb)).flip(-1)) * out_scale
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_bimamba_inner_fp32_inference_token_major():
    """Vim's CPU inference path: fp32, no autograd, xz token-major as in_proj writes it (both convs in one
    pass on the CPU extension where it is built), against the float64 oracle."""
    pf, pb = _direction(d_inner=12, seed=3), _direction(d_inner=12, seed=4)
    xz = torch.randn(2, 9, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).transpose(1, 2)
    args = lambda p: (p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"], p["delta_proj_weight"],  # noqa: E731
                      p["A"], p["D"], p["delta_bias"])
    ref = (inner_oracle(xz, *args(pf)) + inner_oracle(xz.flip(-1), *args(pb)).flip(-1)) * 0.5
    f32 = lambda p: {k: v.float() for k, v in p.items()}  # noqa: E731
    with torch.inference_mode():
        out = bimamba_inner_fn_no_out_proj(xz.float(), f32(pf), f32(pb), out_scale=0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Errors and dispatch
# ---------------------------------------------------------------------------------------------------
def _bad(**changes):
    t = make_inputs(seed=91)
    t.update(changes)
    return t


@pytest.mark.parametrize("name, inputs, match", [
    ("u 2-D", _bad(u=torch.randn(4, 7, dtype=torch.float64), delta=torch.randn(4, 7, dtype=torch.float64)),
     r"u and delta must both be \(batch, dim, seqlen\)"),
    ("delta shape", _bad(delta=torch.randn(2, 4, 6, dtype=torch.float64)), r"u and delta"),
    ("A dim", _bad(A=-torch.rand(5, 3, dtype=torch.float64)), r"A must be \(dim, dstate\)"),
    ("A complex", _bad(A=torch.randn(4, 3, dtype=torch.complex128)), r"complex"),
    ("B dstate", _bad(B=torch.randn(2, 2, 7, dtype=torch.float64)), r"B must be"),
    ("C seqlen", _bad(C=torch.randn(2, 3, 6, dtype=torch.float64)), r"C must be"),
    ("B channel", _bad(B=torch.randn(4, 2, dtype=torch.float64)), r"B must be"),
    ("B groups", _bad(B=torch.randn(2, 3, 3, 7, dtype=torch.float64)), r"groups dividing dim"),
    ("B 5-D", _bad(B=torch.randn(2, 1, 1, 3, 7, dtype=torch.float64)), r"B must be"),
    ("D shape", _bad(D=torch.randn(3, dtype=torch.float64)), r"D must be \(4,\)"),
    ("delta_bias shape", _bad(delta_bias=torch.randn(4, 1, dtype=torch.float64)), r"delta_bias must be \(4,\)"),
    ("z shape", _bad(z=torch.randn(2, 4, 6, dtype=torch.float64)), r"z must have u's shape"),
])
@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_fn])
def test_bad_scan_inputs_raise_value_error(fn, name, inputs, match):
    with pytest.raises(ValueError, match=match):
        fn(**inputs)


def test_unknown_backend_raises_value_error():
    with pytest.raises(ValueError, match=r"backend must be one of.*'triton'"):
        selective_scan_fn(**make_inputs(), backend="triton")
    p = _direction()
    with pytest.raises(ValueError, match=r"backend must be one of"):
        mamba_inner_fn_no_out_proj(torch.randn(1, 8, 3, dtype=torch.float64), **p, backend="kernel")


def test_reference_backend_equals_auto_on_cpu():
    t = make_inputs(seed=95)
    torch.testing.assert_close(selective_scan_fn(**t, backend="reference"), selective_scan_fn(**t, backend="auto"),
                               rtol=0, atol=0)


@pytest.mark.skipif(extension_importable("selective_scan_cuda"), reason="the CUDA extension is built here")
def test_cuda_backend_without_extension_says_how_to_build():
    with pytest.raises(RuntimeError, match=r"not built") as info:
        selective_scan_fn(**make_inputs(), backend="cuda")
    message = str(info.value)
    assert "pip install" in message and "mamba-1p1p1" in message


@pytest.mark.skipif(not extension_importable("selective_scan_cuda"), reason="the CUDA extension is not built here")
def test_cuda_backend_with_cpu_tensors_raises_value_error():
    with pytest.raises(ValueError, match=r"needs CUDA tensors"):
        selective_scan_fn(**make_inputs(), backend="cuda")


def test_imports_without_gpu_and_without_heavy_dependencies():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = (
        "import sys\n"
        "import torch\n"
        "before = set(sys.modules)\n"
        "import causal_conv1d\n"
        "import mamba_ssm\n"
        "from mamba_ssm import Mamba, selective_scan_fn\n"
        "assert not torch.cuda.is_available()\n"
        "for name in ('transformers', 'triton', 'timm'):\n"
        "    assert name not in sys.modules, name + ' was imported by import mamba_ssm'\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "own = {'mamba_ssm', 'causal_conv1d', 'torch', 'selective_scan_cuda', 'selective_scan_cpu', 'causal_conv1d_cuda'}\n"
        "extra = new - set(sys.stdlib_module_names) - own\n"
        "assert not extra, f'mamba_ssm imported more than torch and the standard library: {extra}'\n"
        "y = Mamba(8, bimamba_type='v2', if_divide_out=True)(torch.randn(1, 5, 8))\n"
        "assert y.shape == (1, 5, 8)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

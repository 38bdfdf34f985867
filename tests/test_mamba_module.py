"""CPU tests of the Mamba mixer module: parameters, initialisation, checkpoint keys and the bidirectional composition."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops.mamba_inner import mamba_inner_ref
from mamba_ssm.ops.scan import selective_scan_ref

SPEC = Path(__file__).parent / "data" / "checkpoint_keys.json"  # copy of shared/spec/checkpoint_keys.json
MODELS = {
    192: "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    384: "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    768: "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}


def _params(m, suffix):
    # A, D and delta_bias pass through float32 as in the original Vim code (`-torch.exp(A_log.float())`),
    # so a float64 module still rounds them to float32.
    conv = getattr(m, "conv1d" + suffix)
    dt = getattr(m, "dt_proj" + suffix)
    return (conv.weight, conv.bias, getattr(m, "x_proj" + suffix).weight, dt.weight,
            -torch.exp(getattr(m, "A" + suffix + "_log").float()), None, None, getattr(m, "D" + suffix).float(),
            dt.bias.float())


def _inner(m, xz, suffix):
    cw, cb, xw, dw, A, B, C, D, db = _params(m, suffix)
    return mamba_inner_ref(xz, cw, cb, xw, dw, A, B, C, D, delta_bias=db)


def _module(d_model=16, seed=0, **kw):
    torch.manual_seed(seed)
    m = Mamba(d_model, **kw).double()
    with torch.no_grad():  # move parameters away from their init so that every one matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _xz(m, h):
    return (h @ m.in_proj.weight.T + (m.in_proj.bias if m.in_proj.bias is not None else 0)).transpose(1, 2)


@pytest.mark.parametrize("seqlen", [1, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_v2_divide_out_equals_hand_built_composition(seqlen, bias):
    m = _module(bimamba_type="v2", if_divide_out=True, bias=bias)
    h = torch.randn(2, seqlen, 16, dtype=torch.float64)
    out = m(h)
    xz = _xz(m, h)
    y = (_inner(m, xz, "") + _inner(m, xz.flip(-1), "_b").flip(-1)) / 2
    expected = F.linear(y.transpose(1, 2), m.out_proj.weight, m.out_proj.bias)  # out_proj((y_f + y_b) / 2)
    assert out.shape == h.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10,
                               msg=lambda s: f"v2 (bias={bias}) != out_proj((y_fwd + y_bwd) / 2)\n{s}")


def test_v2_without_divide_out_sums_directions():
    m = _module(bimamba_type="v2", if_divide_out=False)
    h = torch.randn(2, 7, 16, dtype=torch.float64)
    xz = _xz(m, h)
    y = _inner(m, xz, "") + _inner(m, xz.flip(-1), "_b").flip(-1)
    torch.testing.assert_close(m(h), y.transpose(1, 2) @ m.out_proj.weight.T, rtol=1e-10, atol=1e-10)


def test_v2_directions_are_independent_of_each_other():
    # The forward direction does not see the future, the backward one does not see the past: changing the
    # last tokens changes the earlier outputs only through the backward-direction parameters.
    m = _module(bimamba_type="v2", if_divide_out=True)
    h = torch.randn(1, 8, 16, dtype=torch.float64)
    h2 = h.clone()
    h2[:, 5:] = torch.randn(1, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        for name in ("x_proj_b", "dt_proj_b", "conv1d_b"):
            for p in getattr(m, name).parameters():
                p.zero_()
        m.D_b.zero_()
    torch.testing.assert_close(m(h)[:, :5], m(h2)[:, :5], rtol=1e-12, atol=1e-12)


def test_none_variant_is_causal_single_direction():
    m = _module(bimamba_type="none")
    h = torch.randn(2, 7, 16, dtype=torch.float64)
    out = m(h)
    expected = _inner(m, _xz(m, h), "").transpose(1, 2) @ m.out_proj.weight.T
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    h2 = h.clone()
    h2[:, 4:] += 1.0
    torch.testing.assert_close(m(h2)[:, :4], out[:, :4], rtol=0, atol=0)


def test_v1_matches_upstream_bimamba_v1():
    # Upstream Vim "v1" (BiMambaInnerFn): ONE causal conv and ONE x_proj/dt_proj in the forward direction;
    # the backward scan runs on the flipped conv output, flipped delta/B/C/z with A_b and the shared D and
    # delta_bias; y = y_f + y_b.flip; out = out_proj(y) (no division).
    m = _module(bimamba_type="v1")
    h = torch.randn(2, 7, 16, dtype=torch.float64)
    xz = _xz(m, h)
    x, z = xz.chunk(2, dim=1)
    L = x.shape[-1]
    xc = F.silu(F.conv1d(x, m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.d_inner)[..., :L])
    x_dbl = torch.einsum("ed,bdl->bel", m.x_proj.weight, xc)
    dt = torch.einsum("dr,brl->bdl", m.dt_proj.weight, x_dbl[:, :m.dt_rank])
    B, C = x_dbl[:, m.dt_rank:m.dt_rank + m.d_state], x_dbl[:, m.dt_rank + m.d_state:]
    A, A_b = -torch.exp(m.A_log.float()), -torch.exp(m.A_b_log.float())
    D, db = m.D.float(), m.dt_proj.bias.float()
    y_f = selective_scan_ref(xc, dt, A, B, C, D, z, db, True)
    y_b = selective_scan_ref(xc.flip(-1), dt.flip(-1), A_b, B.flip(-1), C.flip(-1), D, z.flip(-1), db, True)
    expected = (y_f + y_b.flip(-1)).transpose(1, 2) @ m.out_proj.weight.T
    torch.testing.assert_close(
        m(h), expected, rtol=1e-10, atol=1e-10,
        msg=lambda s: "bimamba v1 differs from upstream Vim's BiMambaInnerFn (backward scan on the flipped "
                      f"causal-conv output)\n{s}")


def _names(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_parameters_of_each_variant():
    d, di, N, r = 16, 32, 16, 1
    common = {"in_proj.weight": (2 * di, d), "conv1d.weight": (di, 1, 4), "conv1d.bias": (di,),
              "x_proj.weight": (r + 2 * N, di), "dt_proj.weight": (di, r), "dt_proj.bias": (di,),
              "A_log": (di, N), "D": (di,), "out_proj.weight": (d, di)}
    assert _names(Mamba(d, bimamba_type="none")) == common
    assert _names(Mamba(d, bimamba_type="v1")) == dict(common, A_b_log=(di, N))
    v2 = dict(common, A_b_log=(di, N), D_b=(di,), **{k.replace(".", "_b.", 1): v for k, v in common.items()
                                                      if k.split(".")[0] in ("conv1d", "x_proj", "dt_proj")})
    assert _names(Mamba(d, bimamba_type="v2", if_divide_out=True)) == v2
    with_bias = _names(Mamba(d, bias=True))
    assert with_bias["in_proj.bias"] == (2 * di,) and with_bias["out_proj.bias"] == (d,)
    assert "conv1d.bias" not in _names(Mamba(d, conv_bias=False))
    m = Mamba(d, d_state=4, d_conv=3, expand=3, dt_rank=5)
    assert _names(m)["x_proj.weight"] == (5 + 8, 48) and _names(m)["conv1d.weight"] == (48, 1, 3)


@pytest.mark.parametrize("bimamba_type", ["none", "v1"])
def test_other_variants_run_forward_and_backward(bimamba_type):
    m = Mamba(16, bimamba_type=bimamba_type)
    h = torch.randn(2, 5, 16, requires_grad=True)
    out = m(h)
    assert out.shape == h.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_v2_backward_reaches_every_parameter():
    m = Mamba(16, bimamba_type="v2", if_divide_out=True)
    m(torch.randn(2, 5, 16)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_module_output_dtype():
    m = Mamba(16, bimamba_type="v2", if_divide_out=True, dtype=torch.bfloat16)
    out = m(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_unknown_bimamba_type_raises():
    with pytest.raises(ValueError, match=r"bimamba_type must be one of.*'v3'"):
        Mamba(16, bimamba_type="v3")


@pytest.mark.parametrize("d_model", [192, 384, 768])
def test_v2_state_dict_matches_checkpoint_keys(d_model):
    spec = json.loads(SPEC.read_text())[MODELS[d_model]]["keys"]
    prefix = "layers.0.mixer."
    expected = {k[len(prefix):]: tuple(v) for k, v in spec.items() if k.startswith(prefix)}
    assert len(expected) == 16
    assert _names(Mamba(d_model, bimamba_type="v2", if_divide_out=True)) == expected


# ---------------------------------------------------------------------------------------------------
# Initialisation (model.md)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v2_small():
    torch.manual_seed(123)
    return Mamba(192, bimamba_type="v2", if_divide_out=True)  # d_inner 384, dt_rank 12


def test_init_a_log_and_d(v2_small):
    expected = torch.log(torch.arange(1, 17, dtype=torch.float64)).expand(384, 16)
    for name in ("A_log", "A_b_log"):
        torch.testing.assert_close(getattr(v2_small, name).double(), expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(-torch.exp(getattr(v2_small, name).double()),
                                   -torch.arange(1, 17, dtype=torch.float64).expand(384, 16), rtol=1e-6, atol=0)
    for name in ("D", "D_b"):
        assert torch.equal(getattr(v2_small, name), torch.ones(384))


def test_init_dt_proj(v2_small):
    assert v2_small.dt_rank == 12
    bound = 12 ** -0.5
    for suffix in ("", "_b"):
        dt_proj = getattr(v2_small, "dt_proj" + suffix)
        w = dt_proj.weight
        assert w.abs().max() <= bound + 1e-7
        assert w.abs().max() > 0.8 * bound and w.std() > 0.4 * bound  # uniform over the range, not tiny
        dt = F.softplus(dt_proj.bias.double())
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
        # log-uniform: about half below the geometric mean 1e-2, spread over the decades
        frac_low = (dt < 1e-2).double().mean()
        assert 0.3 < frac_low < 0.7
        assert dt.min() < 2e-3 and dt.max() > 5e-2
        assert getattr(dt_proj.bias, "_no_reinit", False) is True
    assert not torch.equal(v2_small.dt_proj.weight, v2_small.dt_proj_b.weight)


def test_init_dt_floor_clamps():
    torch.manual_seed(0)
    m = Mamba(64, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(m.dt_proj.bias.double()), torch.full((128,), 1e-4, dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_init_dt_constant():
    m = Mamba(64, dt_init="constant", dt_scale=2.0)
    assert torch.all(m.dt_proj.weight == 2.0 * 4 ** -0.5)


def test_no_weight_decay_flags(v2_small):
    for name in ("A_log", "A_b_log", "D", "D_b"):
        assert getattr(getattr(v2_small, name), "_no_weight_decay", False) is True, name
    assert not getattr(v2_small.in_proj.weight, "_no_weight_decay", False)


def test_other_biases_and_no_bias_layers():
    m = Mamba(32, bimamba_type="v2", if_divide_out=True)
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.x_proj.bias is None and m.x_proj_b.bias is None
    mb = Mamba(32, bias=True)
    # the dt_proj bias is softplus^-1(dt) > -7, never the generic zero
    assert (mb.dt_proj.bias < 0).all() and (mb.dt_proj.bias > -7).all()

"""CPU tests of the Vim model (issue 3): checkpoint format, an independent float64 reference of the
forward pass (values and gradients), middle class token and position-embedding order, resampling,
checkpoint loading, the timm API, input sizes, mixed precision, initialisation and drop path.

Run: PYTHONPATH=causal-conv1d:mamba-1p1p1:. python -m pytest tests/test_vim_model.py
"""
import argparse
import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
import timm

from vim.models_mamba import checkpoint_filter_fn, load_checkpoint, resample_pos_embed

import vim_reference as ref
from helpers import assert_max_error as assert_close

pytestmark = pytest.mark.usefixtures("one_thread")



# The table of shared/spec/model.md: name -> (embed_dim, stride, tokens at 224, params with a 1000-class head).
SUFFIX = "_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
MODELS = {
    "vim_tiny_patch16_224" + SUFFIX: (192, 16, 197, 7_148_008),
    "vim_tiny_patch16_stride8_224" + SUFFIX: (192, 8, 730, 7_250_344),
    "vim_small_patch16_224" + SUFFIX: (384, 16, 197, 25_796_584),
    "vim_small_patch16_stride8_224" + SUFFIX: (384, 8, 730, 26_001_256),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": (768, 16, 197, 97_598_440),
}
ALIASES = {
    "vim_tiny_patch16_224": "vim_tiny_patch16_224" + SUFFIX,
    "vim_tiny_patch16_stride8_224": "vim_tiny_patch16_stride8_224" + SUFFIX,
    "vim_small_patch16_224": "vim_small_patch16_224" + SUFFIX,
    "vim_small_patch16_stride8_224": "vim_small_patch16_stride8_224" + SUFFIX,
    "vim_base_patch16_224": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}
HUB = {  # model.md "Released checkpoints"
    "vim_tiny_patch16_224" + SUFFIX: ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_tiny_patch16_stride8_224" + SUFFIX: ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_224" + SUFFIX: ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim_small_patch16_stride8_224" + SUFFIX: ("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth"),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2":
        ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
}


def _spec_keys():
    # Every key and shape of the five published models (a copy of shared/spec/checkpoint_keys.json).
    return json.loads((pathlib.Path(__file__).parent / "data" / "checkpoint_keys.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# helpers


def small(stride=16, img=48, depth=2, dim=32, num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vim_tiny_patch16_224", depth=depth, embed_dim=dim, img_size=img, stride=stride,
                             num_classes=num_classes, **kw)


def perturb(model, seed=1):
    """Move every parameter away from its initial value so that no term of the forward pass is trivial."""
    g = torch.Generator().manual_seed(seed)

    def rnd(p):
        return torch.randn(p.shape, generator=g, dtype=p.dtype)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.endswith("A_b_log"):
                p.copy_(torch.log(0.3 + 4 * torch.rand(p.shape, generator=g, dtype=p.dtype)))
            elif name.endswith("mixer.D") or name.endswith("mixer.D_b"):
                p.copy_(rnd(p))
            elif "dt_proj" in name and name.endswith("bias"):
                p.add_(0.5 * rnd(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * rnd(p))
            elif "norm" in name:
                p.copy_(1 + 0.3 * rnd(p))
            elif name in ("pos_embed", "cls_token"):
                p.copy_(0.5 * rnd(p))
            else:
                p.mul_(1 + 0.2 * rnd(p))
    return model


def leaf_state_dict(model):
    """The model's weights as float64 leaf tensors that require grad (for the reference)."""
    return {k: v.detach().double().clone().requires_grad_(True) for k, v in model.state_dict().items()}


def save_trainer_checkpoint(path, state_dict, **extra):
    """What the original DeiT-style trainer writes: an argparse Namespace next to the weights."""
    args = argparse.Namespace(model="vim_tiny", lr=5e-4, finetune="", input_size=224)
    torch.save(dict(model=state_dict, args=args, epoch=299, **extra), path)


# ----------------------------------------------------------------------------------------------------------
# 1. checkpoint format and parameter counts


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_matches_checkpoint_keys_and_params(name):
    spec = _spec_keys()[name]
    model = timm.create_model(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(spec["keys"]), (
        f"missing {sorted(set(spec['keys']) - set(got))[:5]}, extra {sorted(set(got) - set(spec['keys']))[:5]}")
    assert got == spec["keys"]
    n = sum(p.numel() for p in model.parameters())
    dim, stride, tokens, params = MODELS[name]
    assert n == params == spec["num_params"]
    assert model.pos_embed.shape == (1, tokens, dim)
    assert model.patch_embed.proj.stride == (stride, stride)
    # No buffers hide in the state dict: every entry is a parameter.
    assert len(list(model.parameters())) == len(got)


@pytest.mark.parametrize("alias", list(ALIASES))
def test_short_alias_builds_same_architecture(alias):
    spec = _spec_keys()[ALIASES[alias]]
    model = timm.create_model(alias)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == spec["keys"]
    assert sum(p.numel() for p in model.parameters()) == MODELS[ALIASES[alias]][3]


@pytest.mark.parametrize("name", list(MODELS) + list(ALIASES))
def test_pretrained_cfg_points_at_released_checkpoint(name):
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id, filename = HUB[ALIASES.get(name, name)]
    assert cfg.hf_hub_id == hub_id
    assert cfg.hf_hub_filename == filename
    assert cfg.input_size == (3, 224, 224)
    assert cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
    assert tuple(cfg.mean) == (0.485, 0.456, 0.406) and tuple(cfg.std) == (0.229, 0.224, 0.225)


def test_all_names_registered():
    names = set(timm.list_models("vim_*"))
    assert set(MODELS) | set(ALIASES) <= names


# ----------------------------------------------------------------------------------------------------------
# 2. the independent float64 reference: values and gradients

# The model keeps A = -exp(A_log.float()), D.float() and dt bias .float() like the original Mamba code,
# so even after .double() these three parameters pass through float32: agreement with the float64
# reference is ~1e-7 relative, not 1e-14. The tolerances below leave room for that and nothing more.
RTOL, ATOL = 2e-6, 1e-7

GRAD_PARAMS = ["pos_embed", "cls_token", "patch_embed.proj.weight", "head.bias", "norm_f.weight",
               "layers.0.mixer.A_log", "layers.0.mixer.A_b_log", "layers.0.mixer.conv1d_b.weight",
               "layers.0.mixer.in_proj.weight", "layers.1.mixer.D", "layers.1.mixer.D_b",
               "layers.1.mixer.dt_proj_b.bias", "layers.1.mixer.x_proj.weight", "layers.1.mixer.out_proj.weight",
               "layers.1.norm.weight"]


@pytest.mark.parametrize("img,stride", [(48, 16), (32, 8), ((32, 48), 8)])
def test_forward_and_gradients_match_independent_reference(img, stride):
    model = perturb(small(stride=stride, img=img, depth=2, dim=32)).double().eval()
    sd = leaf_state_dict(model)
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_model = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)

    out = model(x_model)
    expected = ref.vim_forward(sd, x_ref, stride)
    assert out.dtype == torch.float64 and out.shape == (2, 10)
    assert_close(out, expected["logits"], RTOL, ATOL, "logits")
    assert expected["logits"].abs().max() > 0.1  # not a trivial comparison
    tokens = model.forward_features(x_model)
    assert tokens.shape == expected["tokens"].shape
    assert_close(tokens, expected["tokens"], RTOL, ATOL, "forward_features")

    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (out * g).sum().backward()
    (expected["logits"] * g).sum().backward()
    assert_close(x_model.grad, x_ref.grad, RTOL, ATOL, "d/d input")
    assert x_ref.grad.abs().max() > 0
    params = dict(model.named_parameters())
    for name in GRAD_PARAMS:
        assert sd[name].grad is not None and sd[name].grad.abs().max() > 0, name
        assert_close(params[name].grad, sd[name].grad, 1e-5, 1e-7, f"d/d {name}")


def test_reference_catches_wrong_class_index_and_direction():
    """Sanity of the comparison itself: the reference is sensitive to the details it is meant to check."""
    model = perturb(small(stride=16, img=48)).double().eval()
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    base = ref.vim_forward(sd, x, 16)["logits"]
    # Swapping the two directions' parameters changes the function.
    swapped = dict(sd)
    for k in sd:
        if "_b." in k or k.endswith("_b_log") or k.endswith(".D_b"):
            fwd = k.replace("_b.", ".").replace("A_b_log", "A_log").replace(".D_b", ".D")
            swapped[k], swapped[fwd] = sd[fwd], sd[k]
    assert (ref.vim_forward(swapped, x, 16)["logits"] - base).abs().max() > 1e-3
    # Moving the class-token row of pos_embed elsewhere changes the function.
    moved = dict(sd)
    moved["pos_embed"] = sd["pos_embed"].roll(1, dims=1)
    assert (ref.vim_forward(moved, x, 16)["logits"] - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# 3. middle class token, position-embedding order, resampling


def _embedded_tokens(model, x):
    """The hidden states fed into block 0 (patch tokens + class token + pos_embed)."""
    seen = {}
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0].detach().clone()))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        hook.remove()
    return seen["h"]


@pytest.mark.parametrize("img,stride,M", [(48, 16, 9), (64, 16, 16), (40, 8, 16), ((32, 64), 16, 8)])
def test_class_token_in_middle_and_pos_embed_rows(img, stride, M):
    model = small(stride=stride, img=img).eval()
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn(2, 3, h, w)
    c = M // 2
    assert model.pos_embed.shape[1] == M + 1
    v = torch.linspace(-3, 3, model.embed_dim)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.cls_token.copy_(torch.full_like(model.cls_token, 0.25))
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=stride)
    patches = patches.flatten(2).transpose(1, 2)  # raster order
    e0 = _embedded_tokens(model, x)
    assert e0.shape == (2, M + 1, model.embed_dim)
    # pos_embed = 0: patches in raster order around the class token at row M // 2.
    torch.testing.assert_close(e0[:, :c], patches[:, :c])
    torch.testing.assert_close(e0[:, c], torch.full_like(e0[:, c], 0.25))
    torch.testing.assert_close(e0[:, c + 1:], patches[:, c:])
    # Only the class-token row non-zero: only the class token moves, by exactly that row.
    for row in (c, 0, c - 1, c + 1, M):
        with torch.no_grad():
            model.pos_embed.zero_()
            model.pos_embed[0, row] = v
        e = _embedded_tokens(model, x)
        diff = (e - e0).abs().amax(dim=(0, 2))
        assert set(torch.nonzero(diff).flatten().tolist()) == {row}
        torch.testing.assert_close(e[:, row] - e0[:, row], v.expand(2, -1))

    # End to end: class token v with pos_embed 0 is the same function as pos_embed row M//2 = v with
    # class token 0, and not the same as putting v on a patch row.
    with torch.no_grad():
        model.pos_embed.zero_()
        model.cls_token.copy_(v.view(1, 1, -1))
        a = model(x)
        model.cls_token.zero_()
        model.pos_embed[0, c] = v
        b = model(x)
        model.pos_embed.zero_()
        model.pos_embed[0, c + 1] = v
        wrong = model(x)
    torch.testing.assert_close(a, b)
    assert (a - wrong).abs().max() > 1e-4


def test_forward_head_reads_middle_row():
    model = small(dim=8, num_classes=3)
    feats = torch.arange(2 * 11 * 8, dtype=torch.float32).view(2, 11, 8)  # M = 10 patches -> class row 5
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 5])
    torch.testing.assert_close(model.forward_head(feats), feats[:, 5] @ model.head.weight.T + model.head.bias)
    assert model.forward_head(torch.zeros(4, 730, 8), pre_logits=True).shape == (4, 8)


def test_resample_identity_at_same_grid():
    pe = torch.randn(1, 197, 24)
    torch.testing.assert_close(resample_pos_embed(pe, (14, 14)), pe, rtol=0, atol=0)
    torch.testing.assert_close(resample_pos_embed(pe, (14, 14), (14, 14)), pe, rtol=0, atol=0)
    pe2 = torch.randn(1, 1 + 4 * 6, 8)
    torch.testing.assert_close(resample_pos_embed(pe2, (4, 6), (4, 6)), pe2, rtol=0, atol=0)


@pytest.mark.parametrize("new_grid", [(27, 27), (24, 24), (7, 7), (10, 20)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resample_keeps_class_row_and_linear_patch_rows(new_grid, mode):
    D = 6
    old = (14, 14)
    slopes_r = torch.linspace(-1, 1, D)
    slopes_c = torch.linspace(0.5, -0.3, D)
    offset = torch.linspace(0, 2, D)
    ii, jj = torch.meshgrid(torch.arange(old[0]).float(), torch.arange(old[1]).float(), indexing="ij")
    grid = ii[..., None] * slopes_r + jj[..., None] * slopes_c + offset  # (14, 14, D)
    patches = grid.reshape(-1, D)
    cls_row = torch.full((D,), 100.0)
    c = patches.shape[0] // 2  # 98
    pe = torch.cat([patches[:c], cls_row[None], patches[c:]])[None]
    assert pe.shape == (1, 197, D)

    out = resample_pos_embed(pe, new_grid, interpolation=mode)
    Mn = new_grid[0] * new_grid[1]
    cn = Mn // 2
    assert out.shape == (1, Mn + 1, D)
    torch.testing.assert_close(out[0, cn], cls_row, rtol=0, atol=0)
    rest = torch.cat([out[0, :cn], out[0, cn + 1:]]).reshape(new_grid[0], new_grid[1], D)
    assert rest.abs().max() < 50  # the class row was not mixed into the grid
    # align_corners=False: new pixel I sits at old coordinate (I + 0.5) * old / new - 0.5.
    y = (torch.arange(new_grid[0]).float() + 0.5) * old[0] / new_grid[0] - 0.5
    x = (torch.arange(new_grid[1]).float() + 0.5) * old[1] / new_grid[1] - 0.5
    expected = y[:, None, None] * slopes_r + x[None, :, None] * slopes_c + offset
    # Away from the borders (where the grid is padded by replication) the linear function is reproduced:
    # exactly when upsampling (antialias bicubic is Keys' a=-0.5 kernel, bilinear is exact), up to the
    # kernel's known non-linearity (< 0.05 of one grid step here) when shrinking by a non-integer factor.
    shrink = any(n < o and o % n for n, o in zip(new_grid, old))
    atol = 0.06 if shrink else 1e-4
    by = max(2, math.ceil(3 * new_grid[0] / old[0]))
    bx = max(2, math.ceil(3 * new_grid[1] / old[1]))
    inner = (slice(by, new_grid[0] - by), slice(bx, new_grid[1] - bx))
    assert rest[inner].numel() > 0
    torch.testing.assert_close(rest[inner], expected[inner], rtol=0, atol=atol)


def test_resample_stride16_to_stride8_checkpoint_filter_keeps_class_row():
    src = small(stride=16, img=224, depth=1, dim=16, num_classes=5)
    dst = small(stride=8, img=224, depth=1, dim=16, num_classes=5)
    sd = src.state_dict()
    out = checkpoint_filter_fn(sd, dst)
    assert out["pos_embed"].shape == (1, 730, 16)
    torch.testing.assert_close(out["pos_embed"][0, 364], sd["pos_embed"][0, 98], rtol=0, atol=0)
    dst.load_state_dict(out)  # strict


# ----------------------------------------------------------------------------------------------------------
# 4. checkpoint files


def test_trainer_checkpoint_loads_through_load_checkpoint_and_pretrained(tmp_path):
    model = perturb(small(num_classes=1000))
    sd = model.state_dict()
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    save_trainer_checkpoint(path, sd)
    # The Namespace makes a plain weights_only load refuse the file; load_checkpoint allow-lists it.
    with pytest.raises(Exception):
        torch.load(path, map_location="cpu", weights_only=True)
    loaded = load_checkpoint(str(path))
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["epoch"] == 299
    assert loaded["model"].keys() == sd.keys()

    for name in ("vim_tiny_patch16_224", "vim_tiny_patch16_224" + SUFFIX):
        m2 = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               depth=2, embed_dim=32, img_size=48, num_classes=1000)
        sd2 = m2.state_dict()
        assert sd2.keys() == sd.keys()
        for k in sd:
            assert torch.equal(sd2[k], sd[k]), k
        x = torch.randn(1, 3, 48, 48)
        with torch.no_grad():
            torch.testing.assert_close(m2.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_pretrained_with_other_num_classes_drops_head(tmp_path):
    model = perturb(small(num_classes=1000))
    sd = model.state_dict()
    path = tmp_path / "ckpt.pth"
    save_trainer_checkpoint(path, sd)
    m2 = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                           depth=2, embed_dim=32, img_size=48, num_classes=10)
    assert m2.head.weight.shape == (10, 32)
    sd2 = m2.state_dict()
    for k in sd:
        if not k.startswith("head."):
            assert torch.equal(sd2[k], sd[k]), k
    # The new head is freshly initialised (bias zero), not a slice of the old one.
    assert torch.equal(m2.head.bias, torch.zeros(10))
    m0 = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                           depth=2, embed_dim=32, img_size=48, num_classes=0)
    assert "head.weight" not in m0.state_dict()
    assert torch.equal(m0.pos_embed, sd["pos_embed"])


def test_raw_state_dict_file_loads(tmp_path):
    model = perturb(small(num_classes=1000))
    path = tmp_path / "raw.pth"
    torch.save(model.state_dict(), path)
    m2 = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                           depth=2, embed_dim=32, img_size=48, num_classes=1000)
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


def test_pretrained_file_uses_model_not_model_ema(tmp_path):
    """The released files are DeiT-trainer dicts that most likely hold `model_ema` next to `model`; the
    published accuracies (and the original --eval/--resume) are those of `model`."""
    model = perturb(small(num_classes=1000), seed=1)
    ema = perturb(small(num_classes=1000, seed=7), seed=2)
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    save_trainer_checkpoint(path, model.state_dict(), model_ema=ema.state_dict())
    m2 = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                           depth=2, embed_dim=32, img_size=48, num_classes=1000)
    assert torch.equal(m2.pos_embed, model.pos_embed), "loaded model_ema instead of model"
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


def test_stride16_checkpoint_into_stride8_model_resamples(tmp_path):
    src = perturb(small(stride=16, img=224, depth=1, dim=16, num_classes=1000))
    sd = src.state_dict()
    path = tmp_path / "s16.pth"
    save_trainer_checkpoint(path, sd)
    dst = timm.create_model("vim_tiny_patch16_stride8_224", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path)), depth=1, embed_dim=16)
    assert dst.pos_embed.shape == (1, 730, 16)
    torch.testing.assert_close(dst.pos_embed[0, 364], sd["pos_embed"][0, 98], rtol=0, atol=0)
    expected = resample_pos_embed(sd["pos_embed"], (27, 27))
    torch.testing.assert_close(dst.pos_embed.detach(), expected, rtol=0, atol=0)
    for k, v in sd.items():
        if k != "pos_embed":
            assert torch.equal(dst.state_dict()[k], v), k


def test_ddp_prefixed_state_dict_loads_through_filter():
    model = perturb(small())
    sd = model.state_dict()
    ddp = {"module." + k: v for k, v in sd.items()}
    target = small(seed=5)
    for wrapped in (ddp, {"model": ddp}, {"model": sd}, sd):
        out = checkpoint_filter_fn(wrapped, target)
        assert out.keys() == sd.keys()
        target.load_state_dict(out, strict=True)
        for k, v in sd.items():
            assert torch.equal(target.state_dict()[k], v)


# ----------------------------------------------------------------------------------------------------------
# 5. gradient checkpointing


def test_grad_checkpointing_same_gradients_less_saved_memory():
    def run(checkpointing):
        model = perturb(small(depth=3, dim=32, img=64, stride=8))
        model.train()  # drop rates are 0: deterministic
        model.set_grad_checkpointing(checkpointing)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), x.grad.clone(), grads, saved[0]

    out0, gx0, g0, saved0 = run(False)
    out1, gx1, g1, saved1 = run(True)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-7)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    assert saved1 < 0.5 * saved0, (saved1, saved0)


# ----------------------------------------------------------------------------------------------------------
# 6. features, intermediates, head, classifier, weight decay, parameter groups


def test_features_only_shapes_stride8_224():
    fm = timm.create_model("vim_tiny_patch16_stride8_224", features_only=True, out_indices=(0, 2),
                           depth=3, embed_dim=32)
    assert fm.feature_info.channels() == [32, 32]
    assert fm.feature_info.reduction() == [8, 8]
    with torch.no_grad():
        feats = fm(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 27, 27), (1, 32, 27, 27)]


@pytest.mark.parametrize("out_indices,blocks", [((0, 2), [0, 2]), ((1,), [1]), ((-1,), [2]), (2, [1, 2])])
def test_features_only_values_are_residual_stream_without_class_token(out_indices, blocks):
    plain = perturb(small(stride=8, img=48, depth=3, dim=16))
    sd = plain.state_dict()
    fm = timm.create_model("vim_tiny_patch16_224", features_only=True, out_indices=out_indices, depth=3,
                           embed_dim=16, img_size=48, stride=8, num_classes=10)
    missing, _ = fm.model.load_state_dict(sd, strict=False)
    assert not missing
    fm = fm.double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        feats = fm(x)
        expected = ref.vim_forward({k: v.double() for k, v in sd.items()}, x, 8)
    c = expected["cls_index"]
    assert len(feats) == len(blocks)
    for f, i in zip(feats, blocks):
        assert f.shape == (2, 16, 5, 5)
        s = expected["streams"][i]
        want = torch.cat([s[:, :c], s[:, c + 1:]], 1).transpose(1, 2).reshape(2, 16, 5, 5)
        assert_close(f, want, RTOL, ATOL, f"block {i}")


def test_forward_intermediates_nlc_and_norm():
    model = perturb(small(stride=16, img=48, depth=3, dim=16)).double().eval()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = ref.vim_forward(sd, x, 16)
        final, inter = model.forward_intermediates(x, indices=[0, 2], output_fmt="NLC")
        _, inter_norm = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC")
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NCHW")
    c = expected["cls_index"]
    assert_close(final, expected["tokens"], RTOL, ATOL, "final")
    for f, i in zip(inter, [0, 2]):
        s = expected["streams"][i]
        assert f.shape == (2, 9, 16)
        assert_close(f, torch.cat([s[:, :c], s[:, c + 1:]], 1), RTOL, ATOL, f"NLC block {i}")
    assert len(inter_norm) == 1
    s = ref.rms_norm(expected["streams"][2], sd["norm_f.weight"])
    assert_close(inter_norm[0], torch.cat([s[:, :c], s[:, c + 1:]], 1), RTOL, ATOL, "normed")
    assert len(only) == 1 and only[0].shape == (2, 16, 3, 3)
    s = expected["streams"][1]
    assert_close(only[0], torch.cat([s[:, :c], s[:, c + 1:]], 1).transpose(1, 2).reshape(2, 16, 3, 3),
                 RTOL, ATOL, "NCHW")


def test_forward_head_pre_logits_and_reset_classifier():
    model = perturb(small(dim=32, num_classes=10)).eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (3, 32)
        torch.testing.assert_close(pre, feats[:, 4])
        torch.testing.assert_close(model(x), pre @ model.head.weight.T + model.head.bias)
        model.reset_classifier(5)
        assert model.get_classifier().out_features == 5 and model.num_classes == 5
        assert model(x).shape == (3, 5)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
    assert not any(k.startswith("head.") for k in model.state_dict())


def test_no_weight_decay_and_optimizer_groups():
    model = small(depth=2, dim=16)
    assert set(model.no_weight_decay()) == {"pos_embed", "cls_token"}
    import timm.optim

    groups = timm.optim.param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "layers.0.mixer.D", "layers.1.mixer.D_b", "norm_f.weight",
            "layers.0.mixer.dt_proj.bias", "head.bias", "patch_embed.proj.bias"} <= not_decayed
    # model.md: the 2-D A_log / A_b_log were decayed in the original recipe (the documented choice).
    assert {"layers.0.mixer.A_log", "layers.1.mixer.A_b_log", "head.weight",
            "layers.0.mixer.in_proj.weight"} <= decayed


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_covers_every_parameter(coarse):
    from timm.models._manipulate import group_parameters

    model = small(depth=3, dim=16)
    grouped = group_parameters(model, model.group_matcher(coarse=coarse))
    flat = [n for names in grouped.values() for n in names]
    all_names = [n for n, _ in model.named_parameters()]
    assert sorted(flat) == sorted(all_names)
    order = {n: gid for gid, names in grouped.items() for n in names}
    assert order["cls_token"] == order["pos_embed"] == order["patch_embed.proj.weight"]
    assert order["cls_token"] < order["layers.0.norm.weight"] < order["layers.1.mixer.A_log"]
    assert order["layers.1.mixer.D"] < order["layers.2.mixer.out_proj.weight"]
    # timm convention: (99999,) puts the final norm with the last block (as ViT's '^norm' does).
    assert order["norm_f.weight"] == order["layers.2.mixer.out_proj.weight"]
    assert len({order[f"layers.{i}.norm.weight"] for i in range(3)}) == 3
    assert order["layers.0.mixer.A_log"] == order["layers.0.mixer.out_proj.weight"]


# ----------------------------------------------------------------------------------------------------------
# 7. inputs of another size


def test_fixed_size_model_rejects_other_sizes_clearly():
    model = small(img=48, dynamic_img_size=False)
    for shape in ((1, 3, 64, 64), (1, 3, 48, 64), (1, 3, 32, 48)):
        with pytest.raises(ValueError, match="48"):
            model(torch.randn(*shape))
    with pytest.raises(ValueError):
        model(torch.randn(1, 4, 48, 48))


@pytest.mark.parametrize("size,stride", [((32, 64), 16), ((40, 56), 8)])
def test_dynamic_img_size_equals_model_built_for_that_size(tmp_path, size, stride):
    dyn = perturb(small(img=48, stride=stride, dynamic_img_size=True)).eval()
    sd = dyn.state_dict()
    path = tmp_path / "ckpt.pth"
    save_trainer_checkpoint(path, sd)
    built = small(img=size, stride=stride, seed=9).eval()
    built.load_state_dict(checkpoint_filter_fn(load_checkpoint(str(path)), built))
    grid = ((size[0] - 16) // stride + 1, (size[1] - 16) // stride + 1)
    assert built.pos_embed.shape == (1, grid[0] * grid[1] + 1, 32)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a = dyn(x)
        b = built(x)
        same = dyn(torch.randn(1, 3, 48, 48))  # the built size still works
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert same.shape == (1, 10)
    # And against the float64 reference with the resampled pos_embed.
    sd64 = {k: v.double() for k, v in sd.items()}
    old = (48 - 16) // stride + 1
    sd64["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid, (old, old)).double()
    expected = ref.vim_forward(sd64, x.double(), stride)["logits"]
    assert_close(a.double(), expected, 1e-4, 1e-5, "dynamic vs reference")


def test_set_input_size():
    model = perturb(small(img=48, dynamic_img_size=False)).eval()
    old_pe = model.pos_embed.detach().clone()
    model.set_input_size(64)
    assert model.pos_embed.shape == (1, 17, 32)
    assert isinstance(model.pos_embed, torch.nn.Parameter)
    torch.testing.assert_close(model.pos_embed[0, 8], old_pe[0, 4], rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 10)
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 48, 48))
    sd64 = {k: v.detach().double() for k, v in model.state_dict().items()}
    assert_close(out.double(), ref.vim_forward(sd64, x.double(), 16)["logits"], 1e-4, 1e-5, "set_input_size")
    model.set_input_size((32, 48))
    assert model.pos_embed.shape == (1, 7, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 48)).shape == (1, 10)


# ----------------------------------------------------------------------------------------------------------
# 8. mixed precision


def test_bf16_autocast_close_to_fp32_with_fp32_residual():
    model = perturb(small(depth=3, dim=32, img=48)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref32 = model(x)
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append((out[0].dtype, out[1].dtype)))
             for layer in model.layers]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 3
    for mixer_dtype, residual_dtype in seen:
        assert residual_dtype == torch.float32
        assert mixer_dtype == torch.bfloat16  # autocast really was in effect
    assert torch.isfinite(low).all()
    rel = (low.float() - ref32).norm() / ref32.norm()
    assert rel < 5e-2, rel


# ----------------------------------------------------------------------------------------------------------
# 9. initialisation


@pytest.fixture(scope="module")
def tiny_full():
    torch.manual_seed(0)
    return timm.create_model("vim_tiny_patch16_224")


def test_init_dt_bias_and_weights(tiny_full):
    m = tiny_full
    dts = []
    for layer in m.layers:
        for s in ("", "_b"):
            dt_proj = getattr(layer.mixer, "dt_proj" + s)
            dt = F.softplus(dt_proj.bias.detach().double())
            assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
            dts.append(dt)
            bound = 12 ** -0.5
            assert dt_proj.weight.abs().max() <= bound
            assert dt_proj.weight.abs().max() > 0.95 * bound
    dts = torch.cat(dts)
    # log-uniform on [1e-3, 1e-1]: log10(dt) uniform on [-3, -1], mean -2, not zeroed.
    logs = dts.log10()
    assert logs.min() < -2.9 and logs.max() > -1.1
    assert abs(logs.mean().item() + 2) < 0.05


def test_init_out_proj_scaled_by_depth(tiny_full):
    depth = 24
    bound = 1 / math.sqrt(384) / math.sqrt(depth)  # kaiming_uniform(a=sqrt 5): 1/sqrt(fan_in)
    for layer in tiny_full.layers:
        w = layer.mixer.out_proj.weight.detach()
        assert w.abs().max() <= bound * (1 + 1e-6)
        assert w.abs().max() > 0.99 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3)
    # the in_proj keeps the ordinary Linear init (not divided by sqrt(depth))
    w = tiny_full.layers[0].mixer.in_proj.weight
    assert w.abs().max() > 0.99 / math.sqrt(192)


def test_init_biases_norms_embeddings(tiny_full):
    m = tiny_full
    assert torch.equal(m.head.bias, torch.zeros(1000))
    assert abs(m.head.weight.std().item() - 0.02) < 0.001
    assert torch.equal(m.patch_embed.proj.bias, torch.zeros(192))
    # LeCun normal: variance 1 / fan_in (fan_in = 3 * 16 * 16), truncated at two std.
    std = math.sqrt(1 / 768)
    assert abs(m.patch_embed.proj.weight.std().item() - std) < 0.03 * std
    assert m.patch_embed.proj.weight.abs().max() <= 2.3 * std
    assert abs(m.pos_embed.std().item() - 0.02) < 0.001
    assert abs(m.cls_token.std().item() - 0.02) < 0.005
    assert m.pos_embed.abs().max() <= 2 and m.cls_token.abs().max() <= 2
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None and "dt_proj" not in name:
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
    norms = [layer.norm.weight for layer in m.layers] + [m.norm_f.weight]
    for w in norms:
        assert torch.equal(w, torch.ones(192))
    assert m.layers[0].norm.eps == 1e-5 and m.norm_f.eps == 1e-5
    a_log = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(384, 16)
    for layer in m.layers:
        torch.testing.assert_close(layer.mixer.A_log.detach(), a_log)
        torch.testing.assert_close(layer.mixer.A_b_log.detach(), a_log)
        assert torch.equal(layer.mixer.D, torch.ones(384)) and torch.equal(layer.mixer.D_b, torch.ones(384))
    # The two directions are initialised independently.
    assert not torch.equal(m.layers[0].mixer.dt_proj.bias, m.layers[0].mixer.dt_proj_b.bias)
    assert not torch.equal(m.layers[0].mixer.x_proj.weight, m.layers[0].mixer.x_proj_b.weight)


# ----------------------------------------------------------------------------------------------------------
# 10. drop path


def _rate(module):
    return getattr(module, "drop_prob", 0.0) if not isinstance(module, torch.nn.Identity) else 0.0


def test_drop_path_schedule():
    depth, r = 5, 0.4
    model = small(depth=depth, dim=16, drop_path_rate=r)
    expected = ([0.0] + torch.linspace(0, r, depth).tolist())
    for i, layer in enumerate(model.layers):
        assert _rate(layer.drop_path) == pytest.approx(expected[i]), i
    assert _rate(model.drop_path) == pytest.approx(r)
    assert [pytest.approx(v) for v in (0.0, 0.0, 0.1, 0.2, 0.3)] == [_rate(layer.drop_path) for layer in model.layers]


def test_drop_path_behaviour_in_train_mode():
    # depth 2, rate 1: layer 0 and 1 have rate 0 ([0, 0, 1][:2]); the final add drops block 1's output
    # entirely, so in train mode the features are norm_f(stream after block 0).
    model = perturb(small(depth=2, dim=16, drop_path_rate=1.0)).double()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    expected = ref.vim_forward(sd, x, 16)
    with torch.no_grad():
        train = model.train().forward_features(x)
        evald = model.eval().forward_features(x)
    assert_close(train, ref.rms_norm(expected["streams"][0], sd["norm_f.weight"]), RTOL, ATOL, "train")
    assert_close(evald, expected["tokens"], RTOL, ATOL, "eval")

"""Vision Mamba (Vim, ICML 2024): bidirectional Mamba blocks over patch tokens with a middle class token.

Loads the released checkpoints unchanged. Order follows timm's model files: blocks, the model,
checkpoint adaptation, pretrained configs, registration.
"""
import argparse
import math
import os
import socket
from typing import List, Optional, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops.layer_norm import RMSNorm, rms_norm_fn
from timm.layers import (DropPath, calculate_drop_path_rates, lecun_normal_, register_notrace_function,
                         register_notrace_module, resample_abs_pos_embed, to_2tuple, trunc_normal_)
from timm.models import adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # not re-exported by timm.models; its models import it so

# torch.fx (timm's FX feature extraction) keeps the mixer and the fused norm as leaves: their Python code
# branches on tensor properties and calls autograd Functions.
register_notrace_module(Mamba)
register_notrace_function(rms_norm_fn)

__all__ = ["VisionMamba", "checkpoint_filter_fn", "load_checkpoint", "resample_pos_embed"]


def _grid_size(img_size, patch_size, stride):
    return tuple((i - p) // s + 1 for i, p, s in zip(img_size, patch_size, stride))


@register_notrace_module  # a leaf for torch.fx: it checks the input and chooses a kernel by device
class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided conv; stride < patch size gives overlapping patches.

    Returns the tokens and their (rows, columns) grid; dynamic_img_size=False accepts only img_size."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192, dynamic_img_size=True,
                 device=None, dtype=None):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.img_size = to_2tuple(img_size)
        self.dynamic_img_size = dynamic_img_size
        self.grid_size = _grid_size(self.img_size, self.patch_size, self.stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride,
                              device=device, dtype=dtype)

    def _check(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected images (batch, channels, height, width), got shape {tuple(x.shape)}")
        if x.shape[1] != self.proj.in_channels:
            raise ValueError(f"expected {self.proj.in_channels} input channels, got {x.shape[1]}")
        size = tuple(x.shape[-2:])
        if any(s < p for s, p in zip(size, self.patch_size)):
            raise ValueError(f"input {size[0]}x{size[1]} is smaller than one {self.patch_size[0]}-pixel patch")
        if size != self.img_size and not self.dynamic_img_size:
            raise ValueError(
                f"this model was built for {self.img_size[0]}x{self.img_size[1]} inputs only, got "
                f"{size[0]}x{size[1]}: resize the images, create the model with img_size={size} or "
                "dynamic_img_size=True, or call model.set_input_size()")
        return _grid_size(size, self.patch_size, self.stride)

    def forward(self, x):
        grid = self._check(x)
        if not x.is_cuda or self.stride != self.patch_size:
            return self.proj(x).flatten(2).transpose(1, 2), grid
        # Non-overlapping patches on a GPU: one matmul over each patch's pixels. cuDNN ran this conv in bf16
        # with a kernel that does not use the tensor cores (12 ms of a 300 ms Vim-tiny batch at 1248 on an
        # H200). On the CPU the conv is the faster of the two (oneDNN).
        batch, chans = x.shape[:2]
        (ph, pw), (gh, gw) = self.patch_size, grid
        if torch.is_autocast_enabled(x.device.type):  # the patch copy below then moves half the bytes
            x = x.to(torch.get_autocast_dtype(x.device.type))
        patches = (x[:, :, :gh * ph, :gw * pw].reshape(batch, chans, gh, ph, gw, pw)
                   .permute(0, 2, 4, 1, 3, 5).reshape(batch, gh * gw, chans * ph * pw))
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias), grid


class Block(nn.Module):
    """Add, then norm, then mix: returns the mixer output and the fp32 residual stream it was fed from."""

    def __init__(self, dim, mixer, drop_path=0.0, norm_eps=1e-5, residual_in_fp32=True, device=None, dtype=None):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=norm_eps, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden_states, residual=None):
        if residual is not None:
            hidden_states = self.drop_path(hidden_states)
        hidden_states, residual = rms_norm_fn(
            hidden_states, self.norm.weight, residual=residual, prenorm=True,
            residual_in_fp32=self.residual_in_fp32, eps=self.norm.eps)
        return self.mixer(hidden_states), residual


@register_notrace_function  # keeps the grid comparison out of torch.fx graphs
def resample_pos_embed(pos_embed, new_grid, old_grid=None, interpolation="bicubic", antialias=True):
    """Resample a Vim position embedding (1, M + 1, D) whose class-token row sits at index M // 2.

    The patch rows are interpolated as a 2-D grid (old_grid, inferred as square when not given) to
    new_grid; the class-token row is carried over unchanged to index new_M // 2.
    """
    num_patches = pos_embed.shape[1] - 1
    if old_grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"pos_embed has {num_patches} patch rows, not a square grid: pass old_grid=(h, w)")
        old_grid = (side, side)
    new_grid = tuple(new_grid)
    if tuple(old_grid) == new_grid:
        return pos_embed
    cls_index = num_patches // 2
    cls_row = pos_embed[:, cls_index:cls_index + 1]
    patches = torch.cat([pos_embed[:, :cls_index], pos_embed[:, cls_index + 1:]], dim=1)
    patches = resample_abs_pos_embed(patches, list(new_grid), list(old_grid), num_prefix_tokens=0,
                                     interpolation=interpolation, antialias=antialias)
    new_cls_index = patches.shape[1] // 2
    return torch.cat([patches[:, :new_cls_index], cls_row, patches[:, new_cls_index:]], dim=1)


class VisionMamba(nn.Module):
    """Vim: patch tokens with a class token in the middle, absolute position embeddings, a stack of
    bidirectional ("v2") Mamba blocks on an fp32 residual stream, RMSNorm, and a linear head on the
    class token."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, num_classes=1000, embed_dim=192,
                 depth=24, d_state=16, drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-5, residual_in_fp32=True,
                 dynamic_img_size=True, global_pool="token", device=None, dtype=None):
        super().__init__()
        _check_global_pool(global_pool)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.global_pool = "token"
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.depth = depth
        self.grad_checkpointing = False
        self.num_prefix_tokens = 1

        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim, dynamic_img_size, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # Layer i drops its input branch with rate [0, linspace(0, rate, depth)][i]; the final add uses rate.
        layer_drop_rates = [0.0] + calculate_drop_path_rates(drop_path_rate, depth)
        self.layers = nn.ModuleList([
            Block(embed_dim,
                  Mamba(embed_dim, d_state=d_state, layer_idx=i, bimamba_type="v2", if_divide_out=True, **dd),
                  drop_path=layer_drop_rates[i], norm_eps=norm_eps, residual_in_fp32=residual_in_fp32, **dd)
            for i in range(depth)
        ])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps, **dd)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.stride[0]
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self._init_weights()

    def _init_weights(self):
        nn.init.zeros_(self.patch_embed.proj.bias)
        lecun_normal_(self.patch_embed.proj.weight)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for layer in self.layers:
            for module in layer.modules():
                if isinstance(module, nn.Linear) and module.bias is not None \
                        and not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            # Each block adds one branch to the residual stream: shrink its output by sqrt(depth).
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            with torch.no_grad():
                out_proj /= math.sqrt(self.depth)

    @torch.jit.ignore
    def no_weight_decay(self):
        """pos_embed and cls_token; timm also exempts every 1-D parameter. A_log / A_b_log (2-D) are decayed,
        as in the original recipe."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    @property
    def dynamic_img_size(self):
        return self.patch_embed.dynamic_img_size

    def reset_classifier(self, num_classes, global_pool=None):
        if global_pool is not None:
            _check_global_pool(global_pool)
        self.num_classes = num_classes
        ref = self.cls_token  # the new head goes where the model is, in its dtype
        self.head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    def set_input_size(self, img_size):
        """Rebuild for another input size, resampling the position embedding (a frozen one stays frozen)."""
        embed = self.patch_embed
        embed.img_size = to_2tuple(img_size)
        old_grid = embed.grid_size
        embed.grid_size = _grid_size(embed.img_size, embed.patch_size, embed.stride)
        embed.num_patches = embed.grid_size[0] * embed.grid_size[1]
        with torch.no_grad():
            resampled = resample_pos_embed(self.pos_embed.detach(), embed.grid_size, old_grid)
        self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)

    def _embed(self, x):
        x, grid = self.patch_embed(x)
        pos_embed = resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size)
        cls_index = x.shape[1] // 2
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :cls_index], cls_token, x[:, cls_index:]], dim=1)
        return self.pos_drop(x + pos_embed), grid

    def _run_layer(self, layer, hidden_states, residual):
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(layer, hidden_states, residual, use_reentrant=False)
        return layer(hidden_states, residual)

    def _final_norm(self, hidden_states, residual):
        hidden_states = self.drop_path(hidden_states)
        if isinstance(self.norm_f, nn.Identity):  # pruned by prune_intermediate_layers(prune_norm=True)
            return residual + hidden_states
        return rms_norm_fn(hidden_states, self.norm_f.weight, residual=residual, eps=self.norm_f.eps)

    def forward_features(self, x):
        """(batch, M + 1, embed_dim): every token after the final norm, class token at row M // 2."""
        hidden_states, _ = self._embed(x)
        residual = None
        for layer in self.layers:
            hidden_states, residual = self._run_layer(layer, hidden_states, residual)
        return self._final_norm(hidden_states, residual)

    def forward_head(self, x, pre_logits=False):
        x = x[:, (x.shape[1] - 1) // 2]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices: Optional[Union[int, List[int]]] = None, norm=False,
                              stop_early=False, output_fmt="NCHW", intermediates_only=False):
        """Dense features for detection and segmentation.

        indices: the blocks whose outputs are returned (an int n takes the last n, None all). Each is the residual
        stream after that block (with norm, passed through the final norm) with the class token removed:
        (batch, embed_dim, grid_h, grid_w) for "NCHW", (batch, grid_h * grid_w, embed_dim) for "NLC".
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        hidden_states, grid = self._embed(x)
        residual = None
        intermediates = []
        last = max_index if (stop_early or intermediates_only) else len(self.layers) - 1
        for i, layer in enumerate(self.layers[:last + 1]):
            hidden_states, residual = self._run_layer(layer, hidden_states, residual)
            if i in take:
                tokens = self._final_norm(hidden_states, residual) if norm else residual + hidden_states
                intermediates.append(self._patch_map(tokens, grid, output_fmt))
        if intermediates_only:
            return intermediates
        # With stop_early the final features are those of the last block run (as timm's ViT returns them).
        return self._final_norm(hidden_states, residual), intermediates

    @staticmethod
    def _patch_map(tokens, grid, output_fmt):
        cls_index = (tokens.shape[1] - 1) // 2
        patches = torch.cat([tokens[:, :cls_index], tokens[:, cls_index + 1:]], dim=1)
        if output_fmt == "NLC":
            return patches
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, grid[0], grid[1])

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the blocks after the last one taken (and the head): for features_only models."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.depth = len(self.layers)
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path):
        """Load a checkpoint file of the original trainer or of ours (timm calls this for pretrained=True)."""
        state_dict = checkpoint_filter_fn(load_checkpoint(checkpoint_path), self)
        if self.num_classes != state_dict["head.weight"].shape[0]:
            del state_dict["head.weight"], state_dict["head.bias"]
            missing, unexpected = self.load_state_dict(state_dict, strict=False)
            if unexpected or set(missing) != {k for k in ("head.weight", "head.bias") if k in self.state_dict()}:
                raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        else:
            self.load_state_dict(state_dict)


def _check_global_pool(global_pool):
    if global_pool != "token":
        raise ValueError(f"Vim classifies from its class token: global_pool must be 'token', got {global_pool!r}")


def load_checkpoint(path):
    """torch.load a checkpoint safely (weights_only), accepting the original trainer's argparse args."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_filter_fn(state_dict, model):
    """Adapt a checkpoint to `model`: unwrap {'model': ...}, strip DDP's 'module.' prefix, resample
    pos_embed (keeping the middle class-token row) when the model's patch grid differs, and fold or repeat
    the patch conv's input channels when the model's in_chans differs."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resample_pos_embed(value, model.patch_embed.grid_size)
        elif key == "patch_embed.proj.weight" and value.shape[1] != model.in_chans:
            value = adapt_input_conv(model.in_chans, value)
        out[key] = value
    return out


def _cfg(hf_hub_id="", hf_hub_filename="", **kwargs):
    return {
        "hf_hub_id": hf_hub_id, "hf_hub_filename": hf_hub_filename, "custom_load": "hf",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


_TINY, _SMALL, _BASE = "hustvl/Vim-tiny-midclstok", "hustvl/Vim-small-midclstok", "hustvl/Vim-base-midclstok"
_NAME_SUFFIX = "_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
_ARCHS = {
    # registered name: (architecture, pretrained file)
    "vim_tiny_patch16_224" + _NAME_SUFFIX: (dict(embed_dim=192), (_TINY, "vim_t_midclstok_76p1acc.pth")),
    "vim_tiny_patch16_stride8_224" + _NAME_SUFFIX: (dict(embed_dim=192, stride=8),
                                                    (_TINY, "vim_t_midclstok_ft_78p3acc.pth")),
    "vim_small_patch16_224" + _NAME_SUFFIX: (dict(embed_dim=384), (_SMALL, "vim_s_midclstok_80p5acc.pth")),
    "vim_small_patch16_stride8_224" + _NAME_SUFFIX: (dict(embed_dim=384, stride=8),
                                                     (_SMALL, "vim_s_midclstok_ft_81p6acc.pth")),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": (
        dict(embed_dim=768), (_BASE, "vim_b_midclstok_81p9acc.pth")),
}
# The short names users type, each an alias of a published name above.
ALIASES = {
    "vim_tiny_patch16_224": "vim_tiny_patch16_224" + _NAME_SUFFIX,
    "vim_tiny_patch16_stride8_224": "vim_tiny_patch16_stride8_224" + _NAME_SUFFIX,
    "vim_small_patch16_224": "vim_small_patch16_224" + _NAME_SUFFIX,
    "vim_small_patch16_stride8_224": "vim_small_patch16_stride8_224" + _NAME_SUFFIX,
    "vim_base_patch16_224": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}

default_cfgs = generate_default_cfgs({
    name: _cfg(*hub) for name, (_, hub) in _ARCHS.items()
} | {alias: _cfg(*_ARCHS[name][1]) for alias, name in ALIASES.items()})


def _hub_reachable(endpoint, timeout=3.0):
    """One connection attempt to the hub's host: huggingface_hub retries an unreachable hub for ~24 s."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _pretrained_file(variant):
    """The released checkpoint's local path: from the Hugging Face cache, else downloaded. Without network
    (or with HF_HUB_OFFLINE=1) and no cached copy this fails at once, naming the offline routes."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, filename = _ARCHS[ALIASES.get(variant, variant)][1]
    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if constants.HF_HUB_OFFLINE or not (proxied or _hub_reachable(constants.ENDPOINT)):
        raise RuntimeError(
            f"pretrained=True needs {repo}/{filename}, which is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and the hub ({constants.ENDPOINT}) is unreachable: pass "
            "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth'), or download it where there is network "
            "and point HF_HOME / HF_HUB_CACHE at that cache (HF_HUB_OFFLINE=1 skips the network)")
    return hf_hub_download(repo, filename)


def _create_vim(variant, pretrained=False, **kwargs):
    arch = _ARCHS[ALIASES.get(variant, variant)][0]
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    # The released checkpoint, fetched with a fail-fast network check, unless the caller named another source.
    names_source = any(overlay.get(k) for k in ("file", "url", "state_dict", "hf_hub_id", "hf_hub_filename", "source"))
    if pretrained and not names_source and kwargs.get("pretrained_cfg") is None:
        overlay["file"] = _pretrained_file(variant)
    # timm resets custom_load when an overlay names a weight file; keep our loader, which reads the
    # trainer's 'model' entry (not 'model_ema') and adapts the head and position embedding.
    kwargs["pretrained_cfg_overlay"] = {"custom_load": "hf", **overlay}
    return build_model_with_cfg(
        VisionMamba, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=3),
        **dict(arch, **kwargs),
    )


def _register(name):
    def create(pretrained=False, **kwargs):
        return _create_vim(name, pretrained=pretrained, **kwargs)
    create.__name__ = name
    create.__doc__ = f"Vision Mamba `{ALIASES.get(name, name)}`."
    create.__module__ = __name__
    return register_model(create)


for _name in list(_ARCHS) + list(ALIASES):
    globals()[_name] = _register(_name)

"""An independent float64 Vim forward pass, written from shared/spec/model.md alone.

Works on a plain state dict (the checkpoint format) and never imports the code under test. It is
deliberately written in another style than the model: explicit patch extraction instead of a conv,
an explicit-loop causal conv, a token-by-token recurrence for the selective scan, and the backward
direction computed literally on the flipped sequence.
"""

import torch
import torch.nn.functional as F


def rms_norm(s, weight, eps=1e-5):
    return s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps) * weight


def patch_tokens(img, weight, bias, stride):
    """Conv2d(kernel=patch, stride) written as explicit patch dot products; tokens in raster order."""
    B, C, H, W = img.shape
    D, _, ph, pw = weight.shape
    gh, gw = (H - ph) // stride + 1, (W - pw) // stride + 1
    wflat = weight.reshape(D, -1)
    tokens = []
    for i in range(gh):
        for j in range(gw):
            patch = img[:, :, i * stride:i * stride + ph, j * stride:j * stride + pw].reshape(B, -1)
            tokens.append(patch @ wflat.T + bias)
    return torch.stack(tokens, 1), (gh, gw)


def causal_depthwise_conv(x, weight, bias):
    """x (B, L, E), weight (E, 1, K): out_t = bias + sum_k w[:, k] * x_{t-(K-1)+k} (zeros before t=0)."""
    B, L, E = x.shape
    w = weight[:, 0, :]
    K = w.shape[1]
    out = []
    for t in range(L):
        acc = bias.expand(B, E)
        for k in range(K):
            j = t - (K - 1) + k
            if j >= 0:
                acc = acc + w[:, k] * x[:, j]
        out.append(acc)
    return torch.stack(out, 1)


def one_direction(x, z, p, suffix, d_state):
    """One Mamba direction on (B, L, E) inputs, sequential recurrence over positions."""
    u = F.silu(causal_depthwise_conv(x, p["conv1d" + suffix + ".weight"], p["conv1d" + suffix + ".bias"]))
    x_dbl = u @ p["x_proj" + suffix + ".weight"].T
    rank = p["dt_proj" + suffix + ".weight"].shape[1]
    dt = x_dbl[..., :rank]
    Bm = x_dbl[..., rank:rank + d_state]
    Cm = x_dbl[..., rank + d_state:rank + 2 * d_state]
    delta = F.softplus(dt @ p["dt_proj" + suffix + ".weight"].T + p["dt_proj" + suffix + ".bias"])
    A = -torch.exp(p["A" + suffix + "_log"])  # (E, N)
    Dskip = p["D" + suffix]
    Bsz, L, E = u.shape
    h = torch.zeros(Bsz, E, d_state, dtype=u.dtype)
    ys = []
    for t in range(L):
        d_t = delta[:, t, :, None]  # (B, E, 1)
        h = torch.exp(d_t * A) * h + d_t * Bm[:, t, None, :] * u[:, t, :, None]
        y_t = (h * Cm[:, t, None, :]).sum(-1) + Dskip * u[:, t]
        ys.append(y_t * F.silu(z[:, t]))
    return torch.stack(ys, 1)


def bimamba_v2(h, p, d_state=16):
    """Vim's mixer: in_proj, forward direction, backward direction on the flipped sequence (flipped
    back), average, out_proj."""
    xz = h @ p["in_proj.weight"].T
    E = xz.shape[-1] // 2
    x, z = xz[..., :E], xz[..., E:]
    y_f = one_direction(x, z, p, "", d_state)
    y_b = one_direction(x.flip(1), z.flip(1), p, "_b", d_state).flip(1)
    return ((y_f + y_b) / 2) @ p["out_proj.weight"].T


def sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def vim_forward(sd, img, stride, eps=1e-5, d_state=16):
    """Returns dict(logits, tokens (final-normed, all rows), streams (residual stream after each block,
    class token included), cls_index, grid)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    patches, grid = patch_tokens(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride)
    M = patches.shape[1]
    c = M // 2
    cls = sd["cls_token"].expand(img.shape[0], 1, -1)
    tokens = torch.cat([patches[:, :c], cls, patches[:, c:]], 1) + sd["pos_embed"]
    residual = None
    hidden = tokens
    streams = []
    for i in range(depth):
        p = sub(sd, f"layers.{i}.")
        residual = hidden if residual is None else residual + hidden
        hidden = bimamba_v2(rms_norm(residual, p["norm.weight"], eps), sub(p, "mixer."), d_state)
        streams.append(residual + hidden)
    residual = residual + hidden
    out = rms_norm(residual, sd["norm_f.weight"], eps)
    logits = out[:, c] @ sd["head.weight"].T + sd["head.bias"] if "head.weight" in sd else out[:, c]
    return dict(logits=logits, tokens=out, streams=streams, cls_index=c, grid=grid)

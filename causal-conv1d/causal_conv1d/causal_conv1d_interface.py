"""Causal depthwise conv1d: the PyTorch reference and the single dispatch point."""
import torch
import torch.nn.functional as F

from causal_conv1d import cuda_ops
from causal_conv1d.layout import is_token_major

ACTIVATIONS = (None, "silu", "swish")
BACKENDS = ("auto", "cuda", "cpu", "reference")  # "cpu": oneDNN where it applies, else the reference


def _check_inputs(x, weight, bias, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, seqlen), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"weight must be (dim, width) with dim = x.shape[1] = {x.shape[1]}, got shape {tuple(weight.shape)}; "
            "a Conv1d weight of shape (dim, 1, width) needs .squeeze(1)"
        )
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must be ({x.shape[1]},), got shape {tuple(bias.shape)}")


def causal_conv1d_ref(x, weight, bias=None, activation=None, reverse=False):
    """out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k], then the activation.

    x: (batch, dim, seqlen); weight: (dim, width); positions before 0 count as zeros. reverse=True gives
    the anti-causal conv, the causal conv of the flipped sequence flipped back. Computed in the weight's
    dtype, returned in x's dtype.
    """
    _check_inputs(x, weight, bias, activation)
    width, seqlen = weight.shape[1], x.shape[-1]
    # A sum of `width` shifted copies: far faster on CPUs than a grouped F.conv1d with one channel a group.
    # A token-major x (channel stride 1, as a linear layer writes it) is computed as (batch, seqlen, dim):
    # every shifted copy is then contiguous and the weights broadcast along the contiguous dim; the
    # output keeps x's layout, as the CUDA kernels' does.
    token_major = is_token_major(x)
    rows = x.transpose(1, 2) if token_major else x
    time_dim = 1 if token_major else 2
    before, after = (0, width - 1) if reverse else (width - 1, 0)
    padded = F.pad(rows.to(weight.dtype), (0, 0, before, after) if token_major else (before, after))
    taps = [padded.narrow(time_dim, width - 1 - k if reverse else k, seqlen) for k in range(width)]
    tap_weight = [weight[:, k] if token_major else weight[:, k:k + 1] for k in range(width)]  # broadcast over time
    if bias is None:
        out = taps[0] * tap_weight[0]
    else:  # the bias enters with the first tap: one pass over the output fewer
        out = torch.addcmul(bias if token_major else bias[:, None], taps[0], tap_weight[0])
    for k in range(1, width):
        out = torch.addcmul(out, taps[k], tap_weight[k])
    if activation is not None:
        out = F.silu(out)
    if token_major:
        out = out.transpose(1, 2)
    return out.to(x.dtype)


def _onednn_applies(x, weight, bias):
    """Whether `_conv_onednn` runs this conv: fp32 token-major CPU tensors (what Vim passes; the case
    measured faster), oneDNN built and enabled, no CPU autocast (which would run conv2d in bf16). In bf16
    and float64 oneDNN's depthwise conv is slower than the reference; without oneDNN conv2d is far slower."""
    return (x.device.type == "cpu" and is_token_major(x) and x.numel() > 0
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
            and all(t is None or t.dtype == torch.float32 for t in (x, weight, bias)))


def _conv_onednn(x, weight, bias, activation, reverse):
    """causal_conv1d_ref's result through torch's depthwise conv2d (oneDNN on CPUs): at Vim-tiny's shape
    (batch 16, 2 cores) 2-3x faster than the reference's shifted copies forward, 1.6x forward+backward.
    The token-major x is seen as a (batch, dim, 1, seqlen) channels-last image, so the output is
    token-major too. Padding both ends by width-1 makes output j see x[j-(width-1) .. j]: the causal conv
    is outputs 0..seqlen-1; the anti-causal one, with the taps reversed, outputs width-1 onward. Returns
    a new dense token-major tensor, as the reference does (SiLU writes one; without it, a copy)."""
    dim, width = weight.shape
    taps = (weight.flip(-1) if reverse else weight).reshape(dim, 1, 1, width)
    out = F.conv2d(x.unsqueeze(2), taps, bias, padding=(0, width - 1), groups=dim)
    out = out.narrow(3, width - 1 if reverse else 0, x.shape[-1]).squeeze(2)
    if activation is not None:
        return F.silu(out)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def causal_conv1d_fn(x, weight, bias=None, activation=None, backend="auto", reverse=False):
    """Causal depthwise conv1d on the compiled kernel for CUDA tensors, on torch's oneDNN conv for fp32
    token-major CPU tensors, else on the reference.

    reverse=True gives the anti-causal conv, conv(x.flip(-1)).flip(-1), without flipped copies on the
    kernel. backend: "auto" (the kernel when the input is on a GPU and the extension is built, else as
    "cpu"), "cuda" (the kernel, or an error saying how to build it), "cpu" (oneDNN where it applies, else
    the reference) or "reference".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_inputs(x, weight, bias, activation)
    use_kernel = backend == "cuda" or (backend == "auto" and x.is_cuda and cuda_ops.available())
    if not use_kernel:
        if backend != "reference" and _onednn_applies(x, weight, bias):
            return _conv_onednn(x, weight, bias, activation, reverse)
        return causal_conv1d_ref(x, weight, bias, activation, reverse)
    cuda_ops.require()
    if not x.is_cuda:
        raise ValueError("backend='cuda' needs CUDA tensors; move them with .cuda() or use backend='auto'")
    return cuda_ops.causal_conv1d(x, weight, bias, activation is not None, reverse)


def causal_conv1d_bidirectional_fn(x, weight_f, bias_f, weight_b, bias_b, activation=None, backend="auto"):
    """Both convs of a bidirectional (Vim) block over one x: (causal conv with weight_f, anti-causal conv
    with weight_b), as causal_conv1d_fn(..., reverse=False / True). On the kernel, a token-major x (channel
    stride 1, as a linear layer writes it) is read once for both and its gradient written once; other
    inputs run the two convs one after the other."""
    _check_inputs(x, weight_f, bias_f, activation)
    _check_inputs(x, weight_b, bias_b, activation)
    use_kernel = backend in ("auto", "cuda") and x.is_cuda and cuda_ops.available()
    if use_kernel and is_token_major(x) and weight_f.shape == weight_b.shape and 2 <= weight_f.shape[1] <= 4:
        return cuda_ops.causal_conv1d_bidirectional(x, weight_f, bias_f, weight_b, bias_b, activation is not None)
    return (causal_conv1d_fn(x, weight_f, bias_f, activation, backend),
            causal_conv1d_fn(x, weight_b, bias_b, activation, backend, reverse=True))

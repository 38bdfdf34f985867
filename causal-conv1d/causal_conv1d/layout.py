"""Memory layouts of (batch, dim, seqlen) tensors, shared by the kernels' Python fakes and callers.

The CUDA kernels read two layouts without copying: channel-major (seqlen stride 1) and token-major
(channel stride 1: the (batch, seqlen, channels) output of a linear layer seen as (batch, dim, seqlen)).
They return new tensors in the layout of their main input, so a Mamba block computes in the linear
layers' layout end to end. The C++ twin of this rule, for all the extensions, is causal-conv1d/csrc/seq_layout.h.
"""
import torch


def is_token_major(t: torch.Tensor) -> bool:
    return t.size(1) > 1 and t.size(2) > 1 and t.stride(1) == 1 and t.stride(2) != 1


def empty_in_layout(like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A new tensor of like's (batch, dim, seqlen) shape, token-major if like is, else contiguous."""
    batch, dim, seqlen = like.shape
    if is_token_major(like):
        return like.new_empty((batch, seqlen, dim), dtype=dtype).transpose(1, 2)
    return like.new_empty((batch, dim, seqlen), dtype=dtype)

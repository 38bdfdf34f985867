"""Causal depthwise conv1d with CUDA kernels and a pure-PyTorch reference."""
from causal_conv1d.causal_conv1d_interface import (
    causal_conv1d_bidirectional_fn,
    causal_conv1d_fn,
    causal_conv1d_ref,
)

__version__ = "1.1.0"
__all__ = ["causal_conv1d_bidirectional_fn", "causal_conv1d_fn", "causal_conv1d_ref"]

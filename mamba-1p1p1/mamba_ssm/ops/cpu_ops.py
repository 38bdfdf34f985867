"""Bridge to the compiled CPU extension ``selective_scan_cpu``.

The extension is optional: without it every op falls back to the PyTorch reference in
``selective_scan_interface``. This module is the only place that imports the extension.

The fused C++ kernels (csrc/selective_scan_cpu) serve the ``mamba_ssm::selective_scan_fwd`` /
``_bwd`` ops of ``scan_ops`` for CPU tensors. They compute in fp32 for fp32 / fp16 / bf16 inputs
(float64 is left to the reference) and checkpoint the state every 64 positions (1/4 float per
element at N = 16).
"""
import torch
from torch import Tensor

from causal_conv1d.extension import OptionalExtension
from causal_conv1d.layout import is_token_major
from mamba_ssm.ops import scan_ops

_EXTENSION = OptionalExtension(
    "selective_scan_cpu", "selective-scan CPU kernels",
    "pip install --no-build-isolation -e mamba-1p1p1 (needs a C++ compiler; MAMBA_SKIP_CPU_BUILD unset)")
available = _EXTENSION.available
require = _EXTENSION.require
CHUNK = 64  # positions per checkpoint (kChunk in csrc/selective_scan_cpu/selective_scan_cpu.cpp)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(u: Tensor) -> bool:
    """Whether the CPU kernel takes a scan of u (with per-step real B and C): a CPU tensor, fp32/fp16/bf16."""
    return available() and u.device.type == "cpu" and u.dtype in DTYPES


if available():
    scan_ops.register_kernels("cpu", torch.ops.selective_scan_cpu,
                              scan_ops.KernelTraits(CHUNK, state_slots=None))

    @torch.library.register_fake("selective_scan_cpu::conv_silu_pair")
    def _(x, weight_f, bias_f, weight_b, bias_b):
        batch, dim, seqlen = x.shape
        return tuple(x.new_empty(batch, seqlen, dim).transpose(1, 2) for _ in range(2))


def conv_silu_pair_applies(x, *params) -> bool:
    """Whether conv_silu_pair takes both convs of a bidirectional block over x: inference (no autograd
    through x or the weights) on an fp32 token-major CPU tensor, the layout the block's in_proj writes."""
    return (available() and x.device.type == "cpu" and x.dtype == torch.float32 and is_token_major(x)
            and not scan_ops.needs_grad(x, *params)
            and all(p is None or (p.device.type == "cpu" and p.dtype == torch.float32) for p in params))


def conv_silu_pair(x, weight_f, bias_f, weight_b, bias_b):
    """(silu(causal conv of x), silu(anti-causal conv of x)) in one pass over x, token-major outputs;
    inference only (see conv_silu_pair_applies). Weights (dim, width), biases (dim,) or None."""
    return tuple(torch.ops.selective_scan_cpu.conv_silu_pair(x, weight_f, bias_f, weight_b, bias_b))


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
                   reverse: bool = False):
    """Differentiable fused CPU selective scan (scan_ops.selective_scan); dstate <= 256."""
    require()
    return scan_ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)

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


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
                   reverse: bool = False):
    """Differentiable fused CPU selective scan (scan_ops.selective_scan); dstate <= 256."""
    require()
    return scan_ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)

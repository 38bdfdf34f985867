"""Selective state-space (Mamba) ops with CUDA kernels and pure-PyTorch references."""
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops.selective_scan_interface import (
    bimamba_inner_fn_no_out_proj,
    bimamba_v1_inner_fn_no_out_proj,
    mamba_inner_fn_no_out_proj,
    mamba_inner_ref,
    selective_scan_fn,
    selective_scan_ref,
)

__version__ = "1.1.1"
__all__ = [
    "Mamba",
    "bimamba_inner_fn_no_out_proj",
    "bimamba_v1_inner_fn_no_out_proj",
    "mamba_inner_fn_no_out_proj",
    "mamba_inner_ref",
    "selective_scan_fn",
    "selective_scan_ref",
]

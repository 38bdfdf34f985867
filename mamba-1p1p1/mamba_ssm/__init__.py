"""Selective state-space (Mamba) ops with CUDA kernels and pure-PyTorch references."""
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops.mamba_inner import (
    bimamba_inner_fn_no_out_proj,
    bimamba_v1_inner_fn_no_out_proj,
    mamba_inner_fn_no_out_proj,
    mamba_inner_ref,
)
from mamba_ssm.ops.scan import selective_scan_fn, selective_scan_ref

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

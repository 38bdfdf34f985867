"""The switches that choose which code runs an op, in one place (as timm's layers/config.py does for fused
attention): the process-wide fp32 matmul mode and the tests every op family asks before its fast path.

Each op family's module (scan, mamba_inner, layer_norm, linear_3xtf32) decides its own path with these."""
import os

import torch

# Where the Triton kernels (mm_3xtf32) can run: a CUDA GPU, or Triton's CPU interpreter (TRITON_INTERPRET=1).
# Elsewhere nothing imports Triton, nor torch._dynamo (which imports it): importing mamba_ssm on a machine
# without a GPU stays light.
TRITON_KERNELS_MAY_RUN = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

MODES = ("3xtf32", "ieee", "tf32")
_matmul_mode = "3xtf32"


def set_mode(mode):
    """How CUDA fp32 matmuls run: "3xtf32" (the default) takes the mixer's in_proj, x_proj and out_proj through
    mm_3xtf32's kernel, "ieee" keeps every matmul on cuBLAS's IEEE fp32 kernels, "tf32" allows TF32 in
    every matmul. Sets torch's TF32 flag accordingly; with TF32 allowed in torch, however it was set
    (tf32_matmuls), the layers use torch's linear."""
    global _matmul_mode
    if mode not in MODES:
        raise ValueError(f"fp32 matmul mode must be one of {MODES}, got {mode!r}")
    _matmul_mode = mode
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"


def matmul_mode():
    return _matmul_mode


def tf32_matmuls():
    """Whether torch's CUDA fp32 matmuls may use TF32, set through either of torch's APIs. Reading the legacy
    flag raises once the newer fp32_precision API has been used, and reading the newer one breaks
    torch.compile's graph, hence the order."""
    try:
        return torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


if TRITON_KERNELS_MAY_RUN:  # compiled code reads the flag once, when it is traced
    tf32_matmuls = torch.compiler.assume_constant_result(tf32_matmuls)


def needs_grad(*tensors) -> bool:
    """Whether autograd will need a backward through these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_inference(*tensors) -> bool:
    """Whether an inference-only, eager-only kernel may run: no autograd through the tensors, and not while
    torch.compile traces (such kernels read data_ptr(), which breaks the traced graph, or have a PyTorch form
    that inductor fuses with its neighbours)."""
    return not torch.compiler.is_compiling() and not needs_grad(*tensors)


def kernel_takes(x, extension, device_type, dtypes=None) -> bool:
    """Whether a kernel of a built extension can take x: a tensor on device_type, of one of dtypes if given."""
    return x.device.type == device_type and (dtypes is None or x.dtype in dtypes) and extension.available()

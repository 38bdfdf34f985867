"""How the Mamba mixer's fp32 CUDA in_proj, x_proj and out_proj multiply: by default as 3xTF32 products on
tensor cores (mamba_ssm.ops.mm_3xtf32), at least as accurate as IEEE fp32 at Vim's shapes, and faster in a
compiled training step. One eager call of the op costs more than cuBLAS's at Vim-tiny's 224 shapes (H200,
benchmarks/results v16): 236-406 us against 38-44 us for the skinny x_proj (out_features = dt_rank +
2 * d_state, 44 in Vim-tiny), which therefore uses the kernel only in compiled code. The delta projection
(rank 12-48; in training its forward runs inside the fused scan kernel) is not routed here."""
import os

import torch

MODES = ("3xtf32", "ieee", "tf32")
_mode = "3xtf32"

# The kernel module imports Triton: it is imported only where its kernels can run, a CUDA GPU or Triton's
# CPU interpreter (TRITON_INTERPRET=1), so that importing mamba_ssm on a machine without a GPU stays light.
kernels = None
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from mamba_ssm.ops import mm_3xtf32 as kernels
    except ImportError:  # a CUDA torch without Triton: the layers stay on torch's linear
        kernels = None


def set_mode(mode):
    """How CUDA fp32 matmuls run: "3xtf32" (the default) takes the mixer's in_proj, x_proj and out_proj through
    mm_3xtf32's kernel, "ieee" keeps every matmul on cuBLAS's IEEE fp32 kernels, "tf32" allows TF32 in
    every matmul. Sets torch's TF32 flag accordingly; with TF32 allowed in torch, however it was set
    (tf32_matmuls), the layers use torch's linear."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"fp32 matmul mode must be one of {MODES}, got {mode!r}")
    _mode = mode
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"


def tf32_matmuls():
    """Whether torch's CUDA fp32 matmuls may use TF32, set through either of torch's APIs. Reading the legacy
    flag raises once the newer fp32_precision API has been used, and reading the newer one breaks
    torch.compile's graph, hence the order; compiled code reads it once, when it is traced."""
    try:
        return torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


if kernels is not None:  # the decorator imports torch._dynamo, and with it Triton: only where the kernels are
    tf32_matmuls = torch.compiler.assume_constant_result(tf32_matmuls)


def applies(x, weight):
    return (_mode == "3xtf32" and kernels is not None and x.is_cuda and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cuda") and not tf32_matmuls())


def linear(x, weight, bias=None, compiled_only=False):
    """F.linear(x, weight, bias), through the 3xTF32 kernel where it applies (see set_mode); with compiled_only,
    only in torch.compile'd code, for products so small that the eager op's per-call cost exceeds cuBLAS's."""
    if (compiled_only and not torch.compiler.is_compiling()) or not applies(x, weight):
        return torch.nn.functional.linear(x, weight, bias)
    out = kernels.mm(x.reshape(-1, x.shape[-1]), weight.t(), bias)
    return out.view(*x.shape[:-1], weight.shape[0])

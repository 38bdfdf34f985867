"""How the Mamba mixer's fp32 CUDA in_proj, x_proj and out_proj multiply: by default as 3xTF32 products on
tensor cores (mamba_ssm.ops.mm_3xtf32), at least as accurate as IEEE fp32 at Vim's shapes, and faster in a
compiled training step. For the skinny x_proj (out_features = dt_rank + 2 * d_state, 44 in Vim-tiny) one
eager call of the op costs several times cuBLAS's whole product, so x_proj uses the kernel only in compiled
code. The delta projection (rank 12-48; in training its forward runs inside the fused scan kernel) is not
routed here. Whether the kernel runs is `applies`; the mode switch is policy.set_mode."""
import torch

from mamba_ssm.ops import policy

kernels = None
if policy.TRITON_KERNELS_MAY_RUN:  # the kernel module imports Triton
    try:
        from mamba_ssm.ops import mm_3xtf32 as kernels
    except ImportError:  # a CUDA torch without Triton: the layers stay on torch's linear
        kernels = None


def applies(x, weight):
    """Whether the 3xTF32 kernel runs x @ weight.T: the mode is "3xtf32" (policy.set_mode), fp32 CUDA tensors,
    no autocast, TF32 not allowed in torch."""
    return (policy.matmul_mode() == "3xtf32" and kernels is not None and x.is_cuda
            and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cuda")
            and not policy.tf32_matmuls())


def linear(x, weight, bias=None, compiled_only=False):
    """F.linear(x, weight, bias), through the 3xTF32 kernel where it applies (see policy.set_mode); with compiled_only,
    only in torch.compile'd code, for products so small that the eager op's per-call cost exceeds cuBLAS's."""
    if (compiled_only and not torch.compiler.is_compiling()) or not applies(x, weight):
        return torch.nn.functional.linear(x, weight, bias)
    out = kernels.mm(x.reshape(-1, x.shape[-1]), weight.t(), bias)
    return out.view(*x.shape[:-1], weight.shape[0])

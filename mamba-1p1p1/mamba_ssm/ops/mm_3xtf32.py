"""Float32 matrix products on tensor cores at float32 accuracy ("3xTF32"): the op mamba_ssm::mm_3xtf32.

a @ b is summed as a_small @ b_big + a_big @ b_small + a_big @ b_big, where x = x_big + x_small and x_big
is x rounded to TF32 (10 mantissa bits): three TF32 tensor-core products that together keep ~21 mantissa
bits per product; the dropped a_small @ b_small is ~2^-22 of it. Hopper's tensor cores add into their
accumulator without rounding to nearest, which over a long reduction costs more accuracy than IEEE fp32
(4-8e-6 relative at Vim's shapes), so each BLOCK_K slice is summed on the tensor cores from zero and then
added to a float32 accumulator in ordinary registers: measured against float64, the result is
then several times closer than cuBLAS's IEEE fp32 product at Vim's shapes, and the kernel faster
(csrc/DESIGN.md). Short reductions (K below ~64) are the exception: there IEEE fp32's error,
which grows with sqrt(K), can be below the ~2^-22 of each 3xTF32 product.

b is split in memory (it is the weight, or the narrower activation of a weight gradient), in the K-major
layout that TF32 tensor-core operands are read in; a is split in registers after its load.

Not bitwise reproducible across processes: the autotuner picks BLOCK_K by timing, and BLOCK_K sets the
order of the sums. An infinite input gives NaN where IEEE gives inf (inf - inf in the split).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Long reductions (weight gradients: K = batch * tokens) over few output tiles are split over K so that
# every multiprocessor gets work; the partial sums are added afterwards (deterministic, unlike atomics).
SPLIT_MIN_K = 1024
SPLIT_ALIGN = 64  # a multiple of every BLOCK_K, so that no split boundary falls inside a block

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)
    for bm, bn, bk, stages, warps in (
        (128, 64, 32, 3, 8), (128, 64, 32, 4, 8), (128, 64, 64, 3, 8), (128, 64, 32, 4, 4),
        (128, 128, 32, 3, 8), (128, 128, 16, 4, 8), (64, 128, 32, 4, 4), (256, 64, 32, 3, 8),
        (64, 64, 32, 4, 4),
    )
]


@triton.jit
def _split_tf32(x):
    big = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return big, x - big


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K_SPLIT", "A_K_MAJOR"])
@triton.jit
def _mm_kernel(a_ptr, b_big_ptr, b_small_ptr, bias_ptr, c_ptr, M, N, K, K_SPLIT,
               stride_am, stride_ak, stride_cs, stride_cm,
               A_K_MAJOR: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[split] = a[:, K range of split] @ b[K range, :] (+ bias), b given as its big and small parts,
    each (N, K) row-major."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rm = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_begin = split * K_SPLIT
    k_count = tl.minimum(K_SPLIT, K - k_begin)
    # The layout flag lets the compiler see a's unit stride and vectorise its loads.
    if A_K_MAJOR:
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + (k_begin + rk)[None, :]
        a_step = BLOCK_K
    else:
        a_ptrs = a_ptr + rm[:, None] + (k_begin + rk)[None, :].to(tl.int64) * stride_ak
        a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)  # not stride_ak.to: torch.compile's analysis passes an int
    b_offsets = rn[None, :].to(tl.int64) * K + (k_begin + rk)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_count, BLOCK_K):
        in_k = rk < k_count - k
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
        b_mask = in_k[:, None] & (rn[None, :] < N)
        b_big = tl.load(b_big_ptr + b_offsets, mask=b_mask, other=0.0)
        b_small = tl.load(b_small_ptr + b_offsets, mask=b_mask, other=0.0)
        a_big, a_small = _split_tf32(a)
        part = tl.dot(a_small, b_big, input_precision="tf32")
        part = tl.dot(a_big, b_small, part, input_precision="tf32")
        acc += tl.dot(a_big, b_big, part, input_precision="tf32")
        a_ptrs += a_step
        b_offsets += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    c_ptrs = c_ptr + split.to(tl.int64) * stride_cs + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def split_tf32(t):
    """t = big + small exactly, big = t rounded to TF32 to nearest (the kernel's rounding of a)."""
    big = ((t.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return big, t - big


def launch(a, b, bias, sms, kernel=None, **meta):
    """The kernel's launch for mm on sms multiprocessors; kernel and meta (block sizes) are for running
    it in Triton's interpreter, without the autotuner."""
    M, K = a.shape
    N = b.shape[1]
    if a.stride(1) == 1:
        a_k_major = True
    elif a.stride(0) == 1:
        a_k_major = False
    else:
        a, a_k_major = a.contiguous(), True
    b_big, b_small = (part.contiguous() for part in split_tf32(b.t()))
    bias = None if bias is None else bias.contiguous()
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    split = max(1, min(triton.cdiv(2 * sms, tiles), K // SPLIT_MIN_K))
    k_split = triton.cdiv(triton.cdiv(K, split), SPLIT_ALIGN) * SPLIT_ALIGN
    split = triton.cdiv(K, k_split)
    out = torch.empty((split, M, N), device=a.device, dtype=torch.float32)
    has_bias = bias is not None and split == 1
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)
    (kernel or wrap_triton(_mm_kernel))[grid](
        a, b_big, b_small, bias if has_bias else out, out, M, N, K, k_split,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1), A_K_MAJOR=a_k_major, HAS_BIAS=has_bias, **meta)
    if split == 1:
        return out[0]
    out = out.sum(0)
    return out if bias is None else out + bias


@torch.library.triton_op("mamba_ssm::mm_3xtf32", mutates_args=())
def mm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a (M, K) @ b (K, N) [+ bias (N,)] of float32 CUDA tensors via 3xTF32; any strides; a new (M, N)."""
    M, K = a.shape
    if M == 0 or K == 0 or b.shape[1] == 0:
        out = a.new_zeros((M, b.shape[1]))
        return out if bias is None else out + bias
    with torch.cuda.device(a.device):  # Triton launches on the current device
        return launch(a, b, bias, torch.cuda.get_device_properties(a.device).multi_processor_count)


def _save_operands(ctx, inputs, output):
    a, b, bias = inputs
    ctx.save_for_backward(a, b)
    ctx.has_bias = bias is not None


def _mm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = mm(grad, b.t()) if ctx.needs_input_grad[0] else None
    grad_b = None
    if ctx.needs_input_grad[1]:  # a^T @ grad; the kernel splits its right operand in memory: the narrower
        grad_b = mm(a.t(), grad) if grad.shape[1] <= a.shape[1] else mm(grad.t(), a).t()
    grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_a, grad_b, grad_bias


mm.register_autograd(_mm_backward, setup_context=_save_operands)

// Shared between the host binding and the kernels. No torch headers here, so
// the .cu files compile with plain nvcc quickly.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace causal_conv1d {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConvParams {
  // Two layouts of the (batch, dim, seqlen) tensors. Channel-major: x has seqlen stride 1, out / dout / dx
  // are contiguous. Token-major (channel stride 1, e.g. the (batch, seqlen, channels) output of a linear
  // layer seen as (batch, dim, seqlen)): out / dout / dx are (batch, seqlen, dim) contiguous, transposed.
  bool token_major;
  const void* x;
  const float* weight;  // (dim, width) fp32, contiguous
  const float* bias;    // (dim,) fp32 or nullptr
  const void* dout;     // backward only
  void* out;            // forward output, x's dtype
  void* dx;             // backward, x's dtype
  float* dw_partial;    // backward: (splits, dim, width + 1); column `width` is the bias gradient
  int64_t x_batch_stride, x_dim_stride, x_seq_stride;
  int batch, dim, seqlen, width, splits;
  bool silu;
  bool reverse;  // anti-causal: the causal conv of the flipped sequence, flipped back
};

// Positions covered by one block of the token-major kernels (8 warps x 16 positions).
constexpr int kTokenMajorBlockPositions = 128;

// Implemented in conv_fwd.cu / conv_bwd.cu. Return the launch error (cudaSuccess if none).
cudaError_t conv_fwd_cuda(DType dtype, const ConvParams& p, cudaStream_t stream);
cudaError_t conv_bwd_cuda(DType dtype, const ConvParams& p, cudaStream_t stream);
// Both directions over one token-major x (f causal, b anti-causal; see conv_kernels.cuh): f and b share
// x, width, silu and the geometry; the backward writes the summed dx to f.dx.
cudaError_t conv_bi_fwd_cuda(DType dtype, const ConvParams& f, const ConvParams& b, cudaStream_t stream);
cudaError_t conv_bi_bwd_cuda(DType dtype, const ConvParams& f, const ConvParams& b, cudaStream_t stream);

}  // namespace causal_conv1d

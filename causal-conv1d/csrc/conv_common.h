// Shared between the host binding and the kernels. No torch headers here, so
// the .cu files compile with plain nvcc quickly.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace causal_conv1d {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConvParams {
  const void* x;        // (batch, dim, seqlen), last-dim stride 1
  const float* weight;  // (dim, width) fp32, contiguous
  const float* bias;    // (dim,) fp32 or nullptr
  const void* dout;     // (batch, dim, seqlen) contiguous (backward only)
  void* out;            // forward output, contiguous, x's dtype
  void* dx;             // backward: contiguous, x's dtype
  float* dw_partial;    // backward: (splits, dim, width + 1); column `width` is the bias gradient
  int64_t x_batch_stride, x_dim_stride;
  int batch, dim, seqlen, width, splits;
  bool silu;
  bool reverse;  // anti-causal: the causal conv of the flipped sequence, flipped back
};

// Implemented in conv_fwd.cu / conv_bwd.cu. Return the launch error (cudaSuccess if none).
cudaError_t conv_fwd_cuda(DType dtype, const ConvParams& p, cudaStream_t stream);
cudaError_t conv_bwd_cuda(DType dtype, const ConvParams& p, cudaStream_t stream);

}  // namespace causal_conv1d

// Shared by the host binding (conv_x_proj_op.cpp) and the kernel (conv_x_proj.cu); no torch headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common/dtype.h"

namespace ssm {

// Both directions' conv (SiLU) and x_proj of a bidirectional block, for bf16/fp16 inference
// (conv_x_proj.cu): out[dir] = silu(conv_dir(x)) @ proj_weight[dir]^T, where dir 1's conv is that of the
// flipped sequence, flipped back (taps over x[t .. t+width-1]).
constexpr int kMaxConvProjOut = 96;  // out_dim = rank + 2 * dstate the kernel holds (kMaxDeltaRank would need 96)
struct ConvProjParams {
  int batch, dim, seqlen, conv_width, out_dim;
  const void* x;  // (batch, seqlen, dim) with channel stride 1, the input dtype
  int64_t x_batch_stride, x_seq_stride;
  const float* conv_weight[2];  // (dim, conv_width) fp32, contiguous; conv_width <= 4
  const float* conv_bias[2];    // (dim,) fp32 or nullptr
  const void* proj_weight[2];   // (out_dim, dim) in x's dtype, contiguous, dim % 8 == 0
  void* out[2];                 // (batch, seqlen, out_dim) contiguous, x's dtype
};
template <DType kDType> cudaError_t conv_x_proj_cuda(const ConvProjParams& p, cudaStream_t stream);

}  // namespace ssm

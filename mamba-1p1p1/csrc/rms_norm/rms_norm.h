// Shared by the host binding (rms_norm_op.cpp) and the kernel (add_rms_norm.cu); no torch headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common/dtype.h"

namespace ssm {

// Residual add + RMSNorm over the last dim of contiguous rows, for inference (add_rms_norm.cu):
//   stream = x + residual (fp32),  out = stream * rsqrt(mean(stream^2) + eps) * weight (+ bias).
constexpr int kMaxNormHidden = 1024;  // row length the kernel holds in registers (one warp per row)
constexpr int kNormRowsPerBlock = 8;
struct NormParams {
  int64_t rows;
  int hidden;
  float eps;
  const void* x;         // (rows, hidden)
  const void* residual;  // (rows, hidden) in the stream's dtype, or nullptr
  const float* weight;   // (hidden,)
  const float* bias;     // (hidden,) or nullptr
  void* out;             // (rows, hidden), x's dtype
  void* stream;          // (rows, hidden) in fp32 (kStreamFp32) or x's dtype, or nullptr: not written
};
template <DType kDType, bool kStreamFp32> cudaError_t add_rms_norm_cuda(const NormParams& p, cudaStream_t stream);

}  // namespace ssm

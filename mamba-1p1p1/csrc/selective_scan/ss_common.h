// Shared between the host binding and the kernels. No torch headers here, so the .cu files
// compile with plain nvcc quickly.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ssm {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kChunk = 32;     // positions per chunk = checkpoint interval of the forward
constexpr int kMaxState = 16;  // d_state supported (smaller values are zero-padded)

struct ScanParams {
  int batch, dim, seqlen, dstate, ngroups, nchunks;
  bool delta_softplus;
  bool reverse;  // scan positions L-1 .. 0 (the scan of the flipped sequence, in place)

  // (batch, dim, seqlen) inputs with last-dim stride 1; strides in elements.
  const void* u;
  const void* delta;
  const void* z;  // nullptr: no gate
  int64_t u_batch_stride, u_dim_stride, delta_batch_stride, delta_dim_stride, z_batch_stride, z_dim_stride;
  const void* B;  // (batch, ngroups, dstate, seqlen), contiguous, u's dtype
  const void* C;
  const float* A;           // (dim, dstate)
  const float* D;           // (dim,) or nullptr
  const float* delta_bias;  // (dim,) or nullptr

  // Forward outputs (all contiguous).
  void* out;          // (batch, dim, seqlen) u's dtype, = (y [+ y_acc_in]) * silu(z); nullptr: not written
  float* ckpt;        // (batch, dim, nchunks, kMaxState): state before each chunk; nullptr: not saved
  float* last_state;  // (batch, dim, dstate) or nullptr
  const float* y_acc_in;  // fp32 (batch, dim, seqlen) added to y before the gate (fused bidirectional)
  float* y_acc_out;       // fp32 (batch, dim, seqlen): receives y (+ y_acc_in), ungated; may equal y_acc_in

  // Backward (all contiguous).
  const void* dout;      // (batch, dim, seqlen), u's dtype
  const float* dlast;    // (batch, dim, dstate) gradient of last_state, or nullptr
  const float* ysum;     // if set with z: dz = dout * ysum * silu'(z) instead of the recomputed y
  bool write_dz;
  void* du;
  void* ddelta;
  void* dz;
  float* dA;           // (dim, dstate), zero-initialised, accumulated with atomics
  float* dB;           // (batch, ngroups, dstate, seqlen) fp32, zero-initialised, atomics
  float* dC;
  float* dD;           // (dim,) or nullptr, zero-initialised
  float* ddelta_bias;  // (dim,) or nullptr, zero-initialised
};

// Implemented in ss_{fwd,bwd}_{fp32,fp16,bf16}.cu. Return the launch error (cudaSuccess if none).
template <DType kDType> cudaError_t ss_fwd_cuda(const ScanParams& p, cudaStream_t stream);
template <DType kDType> cudaError_t ss_bwd_cuda(const ScanParams& p, cudaStream_t stream);
// Both directions in one launch (pf: forward direction, pb: reverse direction; same shapes).
template <DType kDType> cudaError_t ss_bifwd_cuda(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream);
template <DType kDType> cudaError_t ss_bibwd_cuda(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream);

}  // namespace ssm

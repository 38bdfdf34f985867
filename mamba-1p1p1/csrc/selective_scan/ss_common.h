// Shared between the host binding and the kernels. No torch headers here, so the .cu files
// compile with plain nvcc quickly.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common/dtype.h"

namespace ssm {

constexpr int kChunk = 32;     // positions per chunk = checkpoint interval of the forward
constexpr int kMaxState = 16;  // d_state supported (smaller values are zero-padded)
constexpr int kMaxDeltaRank = 64;  // rank of a fused delta projection (Vim-base: 48)

struct ScanParams {
  int batch, dim, seqlen, dstate, ngroups, nchunks;
  bool delta_softplus;
  bool reverse;  // scan positions L-1 .. 0 (the scan of the flipped sequence, in place)
  // out is multiplied by out_scale and the backward reads dout * out_scale: Vim averages its two
  // directions (0.5) without a separate pass over the output and its gradient.
  float out_scale;

  // Layout of the (batch, dim, seqlen) tensors: token-major (channel stride 1, e.g. the output of a
  // linear layer as (batch, seqlen, dim)) or channel-major (seqlen stride 1). Element tiles are then
  // loaded and stored with lanes along channels or along positions, so accesses stay coalesced.
  bool token_major;
  // Inputs; strides in elements.
  const void* u;
  const void* delta;
  const void* z;  // nullptr: no gate
  int64_t u_batch_stride, u_dim_stride, u_seq_stride;
  int64_t delta_batch_stride, delta_dim_stride, delta_seq_stride;
  int64_t z_batch_stride, z_dim_stride, z_seq_stride;
  const void* B;  // (batch, ngroups, dstate, seqlen), any strides, u's dtype
  const void* C;
  int64_t B_batch_stride, B_group_stride, B_state_stride, B_seq_stride;
  int64_t C_batch_stride, C_group_stride, C_state_stride, C_seq_stride;
  // Every other (batch, dim, seqlen) tensor (out, y_acc_*, dout, ysum, du, ddelta, dz) is new, in the same
  // layout: (batch, seqlen, dim) contiguous when token_major, else (batch, dim, seqlen) contiguous.
  // Fused delta projection (forward kernels only): when dt_low is set, delta[b, d, t] =
  // sum_k dt_proj[d, k] * dt_low[b, k, t] is formed inside the kernel (delta is unused) and never stored.
  const void* dt_low;     // (batch, rank, seqlen), any strides, u's dtype
  int64_t dt_low_batch_stride, dt_low_rank_stride, dt_low_seq_stride;
  const float* dt_proj;   // (dim, rank) fp32, contiguous
  int rank;
  // Fused causal conv (forward kernels, inference only): when conv_weight is set, u is the conv's input x
  // and the kernel applies silu(conv(x)) itself (the fused conv of fwd_direction in ss_kernels.cuh).
  const float* conv_weight;  // (dim, conv_width) fp32, contiguous
  const float* conv_bias;    // (dim,) fp32 or nullptr
  int conv_width;
  const float* A;           // (dim, dstate)
  const float* D;           // (dim,) or nullptr
  const float* delta_bias;  // (dim,) or nullptr

  // Forward outputs.
  void* out;          // (batch, dim, seqlen) u's dtype, = (y [+ y_acc_in]) * silu(z) * out_scale; nullptr: none
  float* ckpt;        // (batch, dim, nchunks, kMaxState): state before each chunk; nullptr: not saved
  float* last_state;  // (batch, dim, dstate) or nullptr
  // Fused bidirectional forward; both in the output layout, fp32 when acc_fp32 (training: ysum) else in u's
  // dtype (inference: the output tensor itself holds the first direction's y).
  const void* y_acc_in;  // (batch, dim, seqlen) added to y before the gate
  void* y_acc_out;       // (batch, dim, seqlen): receives y (+ y_acc_in), ungated; may equal y_acc_in
  bool acc_fp32;

  // Backward (dB, dC, dA, dD, ddelta_bias contiguous).
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

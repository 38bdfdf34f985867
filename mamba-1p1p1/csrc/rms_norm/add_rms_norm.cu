// Residual add + RMSNorm for inference: one warp per row, the row in registers, one read of x and the
// residual and one write of the output and the new residual stream. Eager PyTorch ran this as ~8
// element-wise passes over fp32 tensors (a fifth of Vim-tiny's feature extraction time at 1248).
#include <type_traits>

#include "../common/dtype_convert.cuh"
#include "rms_norm.h"

namespace ssm {
namespace {

constexpr int kNormThreads = 32 * kNormRowsPerBlock;

// kVec (1 or 2) consecutive elements at `at`, aligned to kVec elements, to and from fp32.
template <int kVec, typename E>
__device__ __forceinline__ void load_vec(const E* at, float* v) {
  if constexpr (kVec == 2) {
    const float2 q = load_pair(at);
    v[0] = q.x;
    v[1] = q.y;
  } else {
    v[0] = to_float(*at);
  }
}
template <int kVec, typename E>
__device__ __forceinline__ void store_vec(E* at, const float* v) {
  if constexpr (kVec == 2) {
    store_pair(at, v[0], v[1]);
  } else {
    *at = from_float<E>(v[0]);
  }
}

// kVec = 2 (even rows, aligned pointers): each lane takes pairs of consecutive elements, so a warp's access
// covers 2 x 32 elements per instruction (2-byte loads of bf16 rows left bandwidth unused); kVec = 1
// otherwise.
template <typename T, typename S, int kPerLane, int kVec>
__global__ void __launch_bounds__(kNormThreads) add_rms_norm_kernel(NormParams p) {
  const int64_t row = int64_t(blockIdx.x) * kNormRowsPerBlock + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t base = row * p.hidden;
  const T* x = static_cast<const T*>(p.x) + base;
  const S* residual = p.residual ? static_cast<const S*>(p.residual) + base : nullptr;
  constexpr int kSteps = kPerLane / kVec;
  float v[kPerLane];
  float sum_sq = 0.f;
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const int i = kVec * (lane + 32 * k);  // lanes on consecutive elements: coalesced
    float* vk = v + kVec * k;
    float r[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) vk[e] = r[e] = 0.f;
    if (i < p.hidden) {  // kVec = 2: hidden is even, so i + 1 < hidden too
      load_vec<kVec>(x + i, vk);
      if (residual) load_vec<kVec>(residual + i, r);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      vk[e] += r[e];
      sum_sq = fmaf(vk[e], vk[e], sum_sq);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  const float rstd = rsqrtf(sum_sq / p.hidden + p.eps);
  T* out = static_cast<T*>(p.out) + base;
  S* stream = p.stream ? static_cast<S*>(p.stream) + base : nullptr;
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const int i = kVec * (lane + 32 * k);
    if (i >= p.hidden) continue;
    const float* vk = v + kVec * k;
    if (stream) store_vec<kVec>(stream + i, vk);
    float w[kVec], b[kVec], y[kVec];
    load_vec<kVec>(p.weight + i, w);
    if (p.bias) load_vec<kVec>(p.bias + i, b);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      y[e] = vk[e] * rstd * w[e];
      if (p.bias) y[e] += b[e];
    }
    store_vec<kVec>(out + i, y);
  }
}

template <typename T, typename S, int kPerLane>
cudaError_t launch(const NormParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.rows + kNormRowsPerBlock - 1) / kNormRowsPerBlock;
  const auto aligned = [](const void* at, size_t bytes) { return reinterpret_cast<uintptr_t>(at) % bytes == 0; };
  const bool pairs = p.hidden % 2 == 0 && aligned(p.x, 2 * sizeof(T)) && aligned(p.residual, 2 * sizeof(S)) &&
                     aligned(p.stream, 2 * sizeof(S)) && aligned(p.out, 2 * sizeof(T)) &&
                     aligned(p.weight, 2 * sizeof(float)) && aligned(p.bias, 2 * sizeof(float));
  if (pairs) {
    add_rms_norm_kernel<T, S, kPerLane, 2><<<dim3(unsigned(blocks)), kNormThreads, 0, stream>>>(p);
  } else {
    add_rms_norm_kernel<T, S, kPerLane, 1><<<dim3(unsigned(blocks)), kNormThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

template <DType kDType, bool kStreamFp32>
cudaError_t add_rms_norm_cuda(const NormParams& p, cudaStream_t stream) {
  using T = typename TypeOf<kDType>::type;
  using S = std::conditional_t<kStreamFp32, float, T>;
  // Registers per lane sized to the row: Vim's d_model is 192 (tiny), 384 (small) or 768 (base).
  if (p.hidden <= 256) return launch<T, S, 8>(p, stream);
  if (p.hidden <= 512) return launch<T, S, 16>(p, stream);
  return launch<T, S, kMaxNormHidden / 32>(p, stream);
}

template cudaError_t add_rms_norm_cuda<DType::kFloat32, true>(const NormParams&, cudaStream_t);
template cudaError_t add_rms_norm_cuda<DType::kFloat16, true>(const NormParams&, cudaStream_t);
template cudaError_t add_rms_norm_cuda<DType::kFloat16, false>(const NormParams&, cudaStream_t);
template cudaError_t add_rms_norm_cuda<DType::kBFloat16, true>(const NormParams&, cudaStream_t);
template cudaError_t add_rms_norm_cuda<DType::kBFloat16, false>(const NormParams&, cudaStream_t);

}  // namespace ssm

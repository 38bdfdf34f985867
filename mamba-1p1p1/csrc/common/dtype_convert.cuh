// The kernels' element types and their conversions to and from the fp32 they compute in.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dtype.h"

namespace ssm {

template <DType> struct TypeOf;
template <> struct TypeOf<DType::kFloat32> { using type = float; };
template <> struct TypeOf<DType::kFloat16> { using type = __half; };
template <> struct TypeOf<DType::kBFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two consecutive elements (their address aligned to two elements) to and from fp32, as one 8-byte (fp32) or
// 4-byte (fp16, bf16) access.
__device__ __forceinline__ float2 load_pair(const float* at) { return *reinterpret_cast<const float2*>(at); }
__device__ __forceinline__ float2 load_pair(const __half* at) {
  return __half22float2(*reinterpret_cast<const __half2*>(at));
}
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* at) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(at));
}
__device__ __forceinline__ void store_pair(float* at, float a, float b) {
  *reinterpret_cast<float2*>(at) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(__half* at, float a, float b) {
  *reinterpret_cast<__half2*>(at) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* at, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(at) = __floats2bfloat162_rn(a, b);
}

}  // namespace ssm

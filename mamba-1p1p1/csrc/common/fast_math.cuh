// Hardware approximations (MUFU) of the element-wise functions the kernels share.
#pragma once
#include <cuda_bf16.h>

#include <type_traits>

namespace ssm {

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// __expf and the approximate division (a few ulp; 0 where 1 + e^-x overflows), not IEEE division, whose slow
// path costs ~20 instructions.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

// x * sigmoid(x) for data of type T. For bf16 as x/2 + x/2 tanh(x/2): one MUFU op and three instructions
// instead of two and six. Its absolute error is about 1e-5 (x in [-24, 24), against the exact value): at
// most one bf16 ulp of the result down to x = -6, up to 3 ulps in [-12, -6), and 0 below -12 (|silu| < 1e-4),
// which moves Vim's gated scan outputs by at most one bf16 ulp. The backward differentiates the sigmoid form.
// fp16 (3 more mantissa bits) and fp32 keep the sigmoid form.
template <typename T>
__device__ __forceinline__ float silu(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const float half_x = 0.5f * x;
    return fmaf(half_x, tanh_approx(half_x), half_x);
  }
  return x * sigmoid(x);
}

}  // namespace ssm

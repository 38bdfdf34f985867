// Fused CPU selective scan (forward and backward) for the `selective_scan_cpu` extension.
//
// Ops live in the `selective_scan_cpu` library (torch.ops.selective_scan_cpu.{fwd,bwd}); the Python
// package wraps them in differentiable torch.library custom ops (mamba_ssm/ops/scan.py). Importing
// the module registers the ops; it holds no Python functions.
//
// Semantics (per batch b, channel d, state n; t runs 0..L-1, or L-1..0 with `reverse`):
//   dt_t = softplus(delta_t + delta_bias[d])    (or without softplus / bias)
//   h_t  = exp(dt_t * A[d,n]) * h_{t-1} + dt_t * B[b,g,n,t] * u_t,   h_{-1} = 0
//   y_t  = sum_n C[b,g,n,t] * h_t + D[d] * u_t,   out_t = y_t * silu(z_t)
// All arithmetic is fp32 whatever the input dtype (fp32 / fp16 / bf16); outputs are in u's dtype and
// layout (token-major or contiguous: empty_in_layout).
//
// Parallelism: the forward splits (batch, channel) pairs over at::parallel_for. The inner loops run
// over the states (8 per vector, GCC/Clang vector extensions; a scalar loop for dstate not a multiple
// of 8) and, for the per-position work (softplus, gates), over positions. exp/log are branch-free
// Cephes polynomials (relative error ~1e-7) that vectorise, instead of libm calls; no fast-math. On x86-64 (GCC / Clang) the hot
// per-channel functions are compiled for the baseline, AVX2+FMA and AVX-512 and the widest one the CPU
// supports is chosen once at load time (torch.ops.selective_scan_cpu.isa() names it; the environment
// variable SELECTIVE_SCAN_CPU_ISA=base|avx2 caps it), so one binary runs on any x86-64 machine.
//
// Backward: the forward optionally saves the state before every chunk of kChunk positions (ckpt,
// (batch, dim, nchunks, dstate) fp32); the backward recomputes each chunk's states from its checkpoint
// into a small buffer and runs the reverse (adjoint) recurrence over it, so no O(L * dstate) state per
// channel is ever stored. Gradients of B and C (shared by a group's channels) are accumulated into one
// private buffer per task and summed afterwards; those of A, D and delta_bias are written per
// (batch, channel) and summed over the batch afterwards: no atomics, no races, deterministic results.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "seq_layout.h"

// x86-64: the hot functions are compiled three times (baseline, AVX2+FMA, AVX-512) and the widest one
// the CPU supports is picked once at load time, so one binary runs on any x86-64 machine.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(SS_CPU_NO_MULTIVERSION)
#define SS_X86_DISPATCH 1
#define SS_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,f16c,popcnt")))
#define SS_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,f16c,popcnt")))
#else
#define SS_X86_DISPATCH 0
#endif

#if defined(__GNUC__)
#define SS_INLINE inline __attribute__((always_inline))
#else
#define SS_INLINE inline
#endif

namespace sscpu {
namespace {

constexpr int kChunk = 64;       // positions per checkpoint (CPU_CHUNK in mamba_ssm/ops/scan.py)
constexpr int kMaxState = 256;   // largest dstate supported
// Channels whose rows are moved together: in a token-major operand (channel stride 1) 8 adjacent
// channels of a position share a cache line. Also the period of the per-channel constants (bias, D)
// of the row functions below, so a block of channels stored position-major is one vector per position.
constexpr int kRowBlock = 8;

using OptTensor = std::optional<at::Tensor>;

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if SS_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const char* force = std::getenv("SELECTIVE_SCAN_CPU_ISA");  // "base", "avx2" or "avx512": cap the ISA
  Isa isa = avx512 ? Isa::kAvx512 : (avx2 ? Isa::kAvx2 : Isa::kBase);
  if (force != nullptr) {
    const std::string f(force);
    const Isa cap = f == "base" ? Isa::kBase : (f == "avx2" ? Isa::kAvx2 : Isa::kAvx512);
    isa = static_cast<int>(cap) < static_cast<int>(isa) ? cap : isa;
  }
  return isa;
#else
  return Isa::kBase;
#endif
}

const Isa g_isa = detect_isa();

const char* isa_name() {
#if SS_X86_DISPATCH
  return g_isa == Isa::kAvx512 ? "avx512" : (g_isa == Isa::kAvx2 ? "avx2" : "x86-64 baseline");
#else
  return "generic (compiler default)";
#endif
}

// NAME(PARAMS) calls WIDE_IMPL(ARGS) in the AVX-512 variant and IMPL(ARGS) in the others, compiled for
// each ISA and dispatched on g_isa; SS_DISPATCHED uses NAME##_impl for all.
#if SS_X86_DISPATCH
#define SS_DISPATCHED_AS(NAME, PARAMS, ARGS, WIDE_IMPL, IMPL)                     \
  SS_TARGET_AVX512 void NAME##_avx512 PARAMS { WIDE_IMPL ARGS; }                  \
  SS_TARGET_AVX2 void NAME##_avx2 PARAMS { IMPL ARGS; }                           \
  void NAME##_base PARAMS { IMPL ARGS; }                                          \
  void NAME PARAMS {                                                              \
    switch (g_isa) {                                                              \
      case Isa::kAvx512: NAME##_avx512 ARGS; return;                              \
      case Isa::kAvx2: NAME##_avx2 ARGS; return;                                  \
      default: NAME##_base ARGS; return;                                          \
    }                                                                             \
  }
#else
#define SS_DISPATCHED_AS(NAME, PARAMS, ARGS, WIDE_IMPL, IMPL) \
  void NAME PARAMS { IMPL ARGS; }
#endif
#define SS_DISPATCHED(NAME, PARAMS, ARGS) SS_DISPATCHED_AS(NAME, PARAMS, ARGS, NAME##_impl, NAME##_impl)

// ------------------------------------------------------------------------------------------------
// fp32 math on scalars and on 8-float vectors (GCC/Clang vector extensions: they compile to ymm
// instructions in the AVX2/AVX-512 variants and to pairs of xmm instructions in the baseline one).
// exp/log are branch-free Cephes polynomials (relative error ~1e-7), written once for both types.
// ------------------------------------------------------------------------------------------------
#if defined(__GNUC__) || defined(__clang__)
#define SS_VEC 1
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
// 16 floats: one AVX-512 register (Vim's 16 states in one vector), used by the AVX-512 variants only.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
template <class V = v8f>
SS_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
SS_INLINE void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
// The two halves of a v16f summed (a v8f, lane parts of the same sums); a v8f unchanged.
SS_INLINE v8f fold8(v8f v) { return v; }
SS_INLINE v8f fold8(v16f v) {
  v8f lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return lo + hi;
}
SS_INLINE float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
#if defined(__clang__)
#define SS_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SS_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif
// Pairwise sums within each 128-bit half: (a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7).
SS_INLINE v8f hadd(v8f a, v8f b) {
  return SS_SHUFFLE(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + SS_SHUFFLE(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// (hsum(y[0]), ..., hsum(y[7])) in 21 vector operations, against ~13 for each hsum call.
SS_INLINE v8f hsum8(const v8f (&y)[8]) {
  const v8f lo_hi0 = hadd(hadd(y[0], y[1]), hadd(y[2], y[3]));  // halves' sums of y0..y3, low then high
  const v8f lo_hi1 = hadd(hadd(y[4], y[5]), hadd(y[6], y[7]));
  return SS_SHUFFLE(lo_hi0, lo_hi1, 0, 1, 2, 3, 8, 9, 10, 11) + SS_SHUFFLE(lo_hi0, lo_hi1, 4, 5, 6, 7, 12, 13, 14, 15);
}
SS_INLINE v8f reversed(v8f v) { return SS_SHUFFLE(v, v, 7, 6, 5, 4, 3, 2, 1, 0); }
SS_INLINE v8f as_float(v8i i) { return reinterpret_cast<v8f>(i); }
SS_INLINE v8i as_int(v8f f) { return reinterpret_cast<v8i>(f); }
SS_INLINE v8i to_int(v8f f) { return __builtin_convertvector(f, v8i); }
SS_INLINE v8f to_float(v8i i) { return __builtin_convertvector(i, v8f); }
SS_INLINE v16f as_float(v16i i) { return reinterpret_cast<v16f>(i); }
SS_INLINE v16i to_int(v16f f) { return __builtin_convertvector(f, v16i); }
#else
#define SS_VEC 0
#endif
SS_INLINE float vload1(const float* p) { return *p; }
SS_INLINE float as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}
SS_INLINE int32_t as_int(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}
SS_INLINE int32_t to_int(float f) { return static_cast<int32_t>(f); }
SS_INLINE float to_float(int32_t i) { return static_cast<float>(i); }

template <class V>
SS_INLINE V splat(float c) {
  return V{} + c;
}
template <class V>
SS_INLINE V load(const float* p) {
  if constexpr (std::is_same_v<V, float>) return *p;
#if SS_VEC
  else return vload<V>(p);
#endif
}
template <class V>
SS_INLINE void store(float* p, V v) {
  if constexpr (std::is_same_v<V, float>) *p = v;
#if SS_VEC
  else vstore<V>(p, v);
#endif
}

// exp(x): 0 below -87.34 (where expf underflows to subnormals), clamped to exp(88) above 88 (only
// reached by sigmoid(z) for z < -88, where it is harmless).
template <class V>
SS_INLINE V fexp(V x) {
  const V lo = splat<V>(-87.33654f), hi = splat<V>(88.0f);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  V r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  const V r2 = r * r;
  V p = splat<V>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r2 + r + 1.0f;
  const V scale = as_float((to_int(k) + 127) << 23);
  return x < lo ? splat<V>(0.0f) : p * scale;
}

// 2^x for x <= 0 (or NaN): the decays exp(dt A) = 2^(dt A log2(e)) of the recurrences, 16 per element,
// where exp's range reduction is the costliest part. x = k + f with k integer, f in [-0.5, 0.5]; 2^f by
// a degree-5 minimax polynomial (relative error below 2e-7 evaluated in fp32, like the GPU's ex2.approx)
// times 2^k built from the exponent bits: ~14 vector operations against fexp's ~24. 2^x is subnormal below
// -126: the result is 0 below -126.5 and 2^x (subnormal) from there to -126.
template <class V>
SS_INLINE V fexp2_nonpos(V x) {
  // Raised to -127, where k = -127 builds a zero scale: one select instead of a clamp and a zeroing.
  const V xc = x < splat<V>(-127.0f) ? splat<V>(-127.0f) : x;  // NaN stays NaN
  const V k = (xc + 12582912.0f) - 12582912.0f;  // round to nearest
  const V f = xc - k;
  V p = splat<V>(1.3264723959e-3f);
  p = p * f + 9.6715129453e-3f;
  p = p * f + 5.5507337548e-2f;
  p = p * f + 2.4022242079e-1f;
  p = p * f + 6.9314697759e-1f;
  p = p * f + 1.0f;
  return p * as_float((to_int(k) + 127) << 23);
}
constexpr float kLog2e = 1.4426950408889634f;

// log(x) for finite x >= 1 (Cephes logf polynomial).
template <class V>
SS_INLINE V flog_ge1(V x) {
  const auto bits = as_int(x);
  auto e = ((bits >> 23) & 0xff) - 126;
  V m = as_float((bits & 0x007fffff) | 0x3f000000);  // x = m * 2^e, m in [0.5, 1)
  const auto small = m < splat<V>(0.707106781186547524f);
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const V z = m * m;
  V y = splat<V>(7.0376836292E-2f);
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  const V fe = to_float(e);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + fe * 0.693359375f;
}

// softplus(x) = log1p(exp(x)) (torch's threshold 20), and sigmoid(x) = d softplus / dx.
template <class V>
SS_INLINE void softplus_sigmoid(V x, V& sp, V& sig) {
  const V twenty = splat<V>(20.0f);
  const V e = fexp(x > twenty ? twenty : x);
  const V w = 1.0f + e;
  const V l = flog_ge1(w) - ((w - 1.0f) - e) / w;  // log1p(e) with the rounding of 1+e undone
  sp = x > twenty ? x : l;
  sig = e / w;
}

// Applies f<V>(t) over positions 0..L-1: 8 at a time, then the tail one by one.
template <class F>
SS_INLINE void for_rows(int L, F&& f) {
  int t = 0;
#if SS_VEC
  for (; t + 8 <= L; t += 8) f.template operator()<v8f>(t);
#endif
  for (; t < L; ++t) f.template operator()<float>(t);
}

// ------------------------------------------------------------------------------------------------
// Per-channel kernels on fp32 rows (positions in natural order; `reverse` flips the scan order)
// ------------------------------------------------------------------------------------------------
struct FwdChannel {
  int L, N;
  int ps;              // stride between positions in dt, dtu and y (kRowBlock: a position-major block)
  bool reverse;
  const float* dt;     // [L] softplus'd delta
  const float* dtu;    // [L] dt * u
  const float* A;      // [N]
  const float* Bt;     // [L, N] time-major
  const float* Ct;     // [L, N]
  float* y;            // [L] sum_n C h (before D and gate)
  float* last;         // [N] or null
  float* ckpt;         // [nchunks, N] or null
};

template <class V>
SS_INLINE float reduce(V v) {
  if constexpr (std::is_same_v<V, float>) return v;
#if SS_VEC
  else return hsum(fold8(v));
#endif
}

// One step of the forward recurrence at position t over NV state vectors: updates h, returns y_t's parts
// (one per lane; `reduce` sums them).
template <class V, int kNV>
SS_INLINE V fwd_step(int NV, int N, int t, int ps, const float* dt, const float* dtu, const float* Bt,
                     const float* Ct, const V* A2v, V* h) {
  constexpr int W = sizeof(V) / sizeof(float);
  const float d = dt[t * ps], du = dtu[t * ps];
  const float* b = Bt + static_cast<int64_t>(t) * N;
  const float* c = Ct + static_cast<int64_t>(t) * N;
  V yv = splat<V>(0.0f);
  for (int k = 0; k < (kNV > 0 ? kNV : NV); ++k) {
    h[k] = fexp2_nonpos(d * A2v[k]) * h[k] + du * load<V>(b + k * W);
    yv += load<V>(c + k * W) * h[k];
  }
  return yv;
}

// States in vectors of 8 (V = v8f, N a multiple of 8) or one at a time (V = float, any N).
// kNV > 0 fixes the number of state vectors at compile time (N = 16: two of 8): the loops over them
// unroll and the states stay in registers instead of a stack array on the recurrence's critical path
// (1.5x faster for Vim's N = 16 on AVX2). Positions run chunk by chunk (a checkpoint before each) and, with
// vectors, 8 steps at a time, whose y's lane sums are formed together (hsum8).
template <class V, int kNV = 0>
SS_INLINE void fwd_channel_t(const FwdChannel& a) {
  constexpr int W = sizeof(V) / sizeof(float);
  const int N = a.N, NV = kNV > 0 ? kNV : N / W, L = a.L, ps = a.ps, step = a.reverse ? -1 : 1;
  // The fields in locals: the stores to y would otherwise make the compiler reload them every step.
  const float *dt = a.dt, *dtu = a.dtu, *Bt = a.Bt, *Ct = a.Ct;
  float* y = a.y;
  V h[kMaxState / W];
  V A2v[kMaxState / W];  // A log2(e): the decays are 2^(dt A2)
  for (int k = 0; k < NV; ++k) {
    h[k] = splat<V>(0.0f);
    A2v[k] = load<V>(a.A + k * W) * kLog2e;
  }
  for (int i0 = 0; i0 < L; i0 += kChunk) {
    if (a.ckpt != nullptr) {
      float* c = a.ckpt + static_cast<int64_t>(i0 / kChunk) * N;
      for (int k = 0; k < NV; ++k) store<V>(c + k * W, h[k]);
    }
    const int i1 = std::min(L, i0 + kChunk);
    int i = i0, t = a.reverse ? L - 1 - i0 : i0;
#if SS_VEC
    if constexpr (!std::is_same_v<V, float>) {
      for (; i + 8 <= i1; i += 8, t += 8 * step) {
        v8f ys[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) ys[j] = fold8(fwd_step<V, kNV>(NV, N, t + j * step, ps, dt, dtu, Bt, Ct, A2v, h));
        const v8f sums = hsum8(ys);
        for (int j = 0; j < 8; ++j) y[(t + j * step) * ps] = sums[j];
      }
    }
#endif
    for (; i < i1; ++i, t += step) y[t * ps] = reduce(fwd_step<V, kNV>(NV, N, t, ps, dt, dtu, Bt, Ct, A2v, h));
  }
  if (a.last != nullptr)
    for (int k = 0; k < NV; ++k) store<V>(a.last + k * W, h[k]);
}

// kWide: the AVX-512 variant, where 16 states make one vector (Vim's N = 16: half the instructions).
template <bool kWide>
SS_INLINE void fwd_channel_impl(const FwdChannel& a) {
#if SS_VEC
  if constexpr (kWide) {
    if (a.N == 16) return fwd_channel_t<v16f, 1>(a);
    if (a.N % 16 == 0) return fwd_channel_t<v16f>(a);
  }
  if (a.N == 16) return fwd_channel_t<v8f, 2>(a);
  if (a.N % 8 == 0) return fwd_channel_t<v8f>(a);
#endif
  fwd_channel_t<float>(a);
}
SS_DISPATCHED_AS(fwd_channel, (const FwdChannel& a), (a), fwd_channel_impl<true>, fwd_channel_impl<false>)

// Row preparation and finishing over n elements, vectorised. The per-channel constants (bias8, D8) have
// period kRowBlock: element i uses bias8[i % kRowBlock], so the same functions serve one channel's row
// (all 8 equal) and a position-major block of kRowBlock channels (one per channel).
static_assert(kRowBlock == 8, "the row functions load the per-channel constants as one 8-float vector");
SS_INLINE void prep_rows_impl(int n, const float* delta, const float* u, const float* bias8, bool softplus, float* dt,
                              float* sig, float* dtu) {
  if (softplus) {
    for_rows(n, [&]<class V>(int t) {
      V sp, sg;
      softplus_sigmoid<V>(load<V>(delta + t) + load<V>(bias8 + t % kRowBlock), sp, sg);
      store<V>(dt + t, sp);
      if (sig != nullptr) store<V>(sig + t, sg);
      store<V>(dtu + t, sp * load<V>(u + t));
    });
  } else {
    for (int t = 0; t < n; ++t) {
      const float d = delta[t] + bias8[t % kRowBlock];
      dt[t] = d;
      if (sig != nullptr) sig[t] = 1.0f;
      dtu[t] = d * u[t];
    }
  }
}
SS_DISPATCHED(prep_rows,
              (int n, const float* delta, const float* u, const float* bias8, bool softplus, float* dt, float* sig,
               float* dtu),
              (n, delta, u, bias8, softplus, dt, sig, dtu))

// out = (y + D u) * silu(z)   (in place in y)
SS_INLINE void finish_rows_impl(int n, float* y, const float* u, const float* D8, const float* z) {
  if (z != nullptr) {
    for_rows(n, [&]<class V>(int t) {
      const V zz = load<V>(z + t);
      store<V>(y + t, (load<V>(y + t) + load<V>(D8 + t % kRowBlock) * load<V>(u + t)) * (zz / (1.0f + fexp<V>(-zz))));
    });
  } else {
    for (int t = 0; t < n; ++t) y[t] = y[t] + D8[t % kRowBlock] * u[t];
  }
}
SS_DISPATCHED(finish_rows, (int n, float* y, const float* u, const float* D8, const float* z), (n, y, u, D8, z))

struct BwdChannel {
  int L, N;
  bool reverse;
  const float* u;      // [L]
  const float* dt;     // [L]
  const float* dtu;    // [L]
  const float* dy;     // [L] dL/dy (dout * silu(z))
  const float* A;      // [N]
  const float* Bt;     // [L, N]
  const float* Ct;     // [L, N]
  const float* ckpt;   // [nchunks, N]
  const float* dlast;  // [N] or null
  float Dv;
  float* y;            // [L] out: sum_n C h (for dz)
  float* du;           // [L] out (complete: includes dy * D)
  float* ddt;          // [L] out: dL/d dt
  float* dA;           // [N] out (this channel, overwritten)
  float* dBt;          // [L, N] accumulated (+=)
  float* dCt;          // [L, N] accumulated (+=)
  float* hbuf;         // [kChunk, N] scratch
  float* abuf;         // [kChunk, N] scratch
};

// Recomputation step at position t: the decays into the row ac and the states (carried in h) into hc;
// returns y_t's lane parts.
template <class V, int kNV>
SS_INLINE V bwd_recompute_step(int NV, float dt, float dtu, const float* b, const float* c, const V* A2v, V* h,
                               float* hc, float* ac) {
  constexpr int W = sizeof(V) / sizeof(float);
  V yv = splat<V>(0.0f);
  for (int k = 0; k < (kNV > 0 ? kNV : NV); ++k) {
    const V an = fexp2_nonpos(dt * A2v[k]);
    h[k] = an * h[k] + dtu * load<V>(b + k * W);
    store<V>(ac + k * W, an);
    store<V>(hc + k * W, h[k]);
    yv += load<V>(c + k * W) * h[k];
  }
  return yv;
}

// Reverse step at position t (rows hp, hc, ac of the chunk's states and decays): updates the carried
// adjoint g, dA and the rows db, dc; adds the lane parts of sum_n g B to gb and of sum_n A g a h_{t-1} to gah.
template <class V, int kNV>
SS_INLINE void bwd_reverse_step(int NV, float dy, float dt, float dtu, const float* b, const float* c, const float* hp,
                                const float* hc, const float* ac, float* db, float* dc, const V* Av, V* g, V* dA,
                                V& gb, V& gah) {
  constexpr int W = sizeof(V) / sizeof(float);
  gb = gah = splat<V>(0.0f);
  for (int k = 0; k < (kNV > 0 ? kNV : NV); ++k) {
    const V gn = g[k] + dy * load<V>(c + k * W);  // dL/dh_t
    store<V>(dc + k * W, load<V>(dc + k * W) + dy * load<V>(hc + k * W));
    store<V>(db + k * W, load<V>(db + k * W) + gn * dtu);
    gb += gn * load<V>(b + k * W);
    const V an = load<V>(ac + k * W);
    const V gn_a_h = gn * load<V>(hp + k * W) * an;  // dL/d(dt*A)
    dA[k] += gn_a_h * dt;
    gah += gn_a_h * Av[k];
    g[k] = gn * an;
  }
}

// kNV: as in fwd_channel_t. Chunks run last first: their states are recomputed from the checkpoint, then
// the reverse recurrence runs over them; with vectors, 8 steps at a time with their lane sums formed
// together (hsum8), as in the forward.
template <class V, int kNV = 0>
SS_INLINE void bwd_channel_t(const BwdChannel& a) {
  constexpr int W = sizeof(V) / sizeof(float);
  const int N = a.N, NV = kNV > 0 ? kNV : N / W, L = a.L;
  const int nchunks = (L + kChunk - 1) / kChunk;
  const bool reverse = a.reverse;
  // The fields in locals, as in fwd_channel_t.
  const float *u = a.u, *dt = a.dt, *dtu = a.dtu, *dy = a.dy, *Bt = a.Bt, *Ct = a.Ct;
  float *y = a.y, *du = a.du, *ddt = a.ddt, *dBt = a.dBt, *dCt = a.dCt, *hbuf = a.hbuf, *abuf = a.abuf;
  const float Dv = a.Dv;
  V g[kMaxState / W];   // carried adjoint: a_{t+1} * g_{t+1}
  V dA[kMaxState / W];
  V Av[kMaxState / W];
  V A2v[kMaxState / W];  // A log2(e), as in fwd_channel_t
  V h[kMaxState / W];    // the recomputed state
  for (int k = 0; k < NV; ++k) {
    g[k] = a.dlast != nullptr ? load<V>(a.dlast + k * W) : splat<V>(0.0f);
    dA[k] = splat<V>(0.0f);
    Av[k] = load<V>(a.A + k * W);
    A2v[k] = Av[k] * kLog2e;
  }
  for (int ch = nchunks - 1; ch >= 0; --ch) {
    const int i0 = ch * kChunk, i1 = std::min(L, i0 + kChunk);
    const float* h0 = a.ckpt + static_cast<int64_t>(ch) * N;
    for (int k = 0; k < NV; ++k) h[k] = load<V>(h0 + k * W);
    // Recompute the chunk's states (after each step) and decays, and y.
    int i = i0;
#if SS_VEC
    if constexpr (!std::is_same_v<V, float>) {
      for (; i + 8 <= i1; i += 8) {
        v8f ys[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const int t = reverse ? L - 1 - (i + j) : i + j;
          const int64_t row = static_cast<int64_t>(i + j - i0) * N;
          ys[j] = bwd_recompute_step<V, kNV>(NV, dt[t], dtu[t], Bt + static_cast<int64_t>(t) * N,
                                             Ct + static_cast<int64_t>(t) * N, A2v, h, hbuf + row, abuf + row);
        }
        const v8f sums = hsum8(ys);
        if (reverse) vstore(y + (L - 8 - i), reversed(sums));
        else vstore(y + i, sums);
      }
    }
#endif
    for (; i < i1; ++i) {
      const int t = reverse ? L - 1 - i : i;
      const int64_t row = static_cast<int64_t>(i - i0) * N;
      y[t] = reduce(bwd_recompute_step<V, kNV>(NV, dt[t], dtu[t], Bt + static_cast<int64_t>(t) * N,
                                               Ct + static_cast<int64_t>(t) * N, A2v, h, hbuf + row, abuf + row));
    }
    // Reverse recurrence over the chunk: du_t = dt_t sum_n g B + D dy_t, ddt_t = u_t sum_n g B + sum_n A g a h_{t-1}.
    i = i1 - 1;
#if SS_VEC
    if constexpr (!std::is_same_v<V, float>) {
      for (; i - 7 >= i0; i -= 8) {
        v8f gb[8], gah[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const int ij = i - j, t = reverse ? L - 1 - ij : ij;
          const int64_t row = static_cast<int64_t>(ij - i0) * N, tN = static_cast<int64_t>(t) * N;
          const float* hp = ij == i0 ? h0 : hbuf + row - N;
          bwd_reverse_step<V, kNV>(NV, dy[t], dt[t], dtu[t], Bt + tN, Ct + tN, hp, hbuf + row, abuf + row, dBt + tN,
                                   dCt + tN, Av, g, dA, gb[j], gah[j]);
        }
        // Steps i, i-1, .., i-7 are positions t0+7 .. t0 (descending) or t0 .. t0+7 (reverse).
        const int t0 = reverse ? L - 1 - i : i - 7;
        const v8f sb = reverse ? hsum8(gb) : reversed(hsum8(gb));
        const v8f sa = reverse ? hsum8(gah) : reversed(hsum8(gah));
        vstore(du + t0, vload(dt + t0) * sb + vload(dy + t0) * Dv);
        vstore(ddt + t0, vload(u + t0) * sb + sa);
      }
    }
#endif
    for (; i >= i0; --i) {
      const int t = reverse ? L - 1 - i : i;
      const int64_t row = static_cast<int64_t>(i - i0) * N, tN = static_cast<int64_t>(t) * N;
      const float* hp = i == i0 ? h0 : hbuf + row - N;
      V gb, gah;
      bwd_reverse_step<V, kNV>(NV, dy[t], dt[t], dtu[t], Bt + tN, Ct + tN, hp, hbuf + row, abuf + row, dBt + tN,
                               dCt + tN, Av, g, dA, gb, gah);
      const float sb = reduce(gb);
      du[t] = dt[t] * sb + dy[t] * Dv;
      ddt[t] = u[t] * sb + reduce(gah);
    }
  }
  for (int k = 0; k < NV; ++k) store<V>(a.dA + k * W, dA[k]);
}

SS_INLINE void bwd_channel_impl(const BwdChannel& a) {
#if SS_VEC
  if (a.N == 16) return bwd_channel_t<v8f, 2>(a);
  if (a.N % 8 == 0) return bwd_channel_t<v8f>(a);
#endif
  bwd_channel_t<float>(a);
}
SS_DISPATCHED(bwd_channel, (const BwdChannel& a), (a))

// dy = dout * silu(z); dsilu = silu'(z)
SS_INLINE void gate_bwd_rows_impl(int L, const float* dout, const float* z, float* dy, float* dsilu) {
  for_rows(L, [&]<class V>(int t) {
    const V zz = load<V>(z + t);
    const V s = 1.0f / (1.0f + fexp<V>(-zz));
    store<V>(dy + t, load<V>(dout + t) * zz * s);
    store<V>(dsilu + t, s * (1.0f + zz * (1.0f - s)));
  });
}
SS_DISPATCHED(gate_bwd_rows, (int L, const float* dout, const float* z, float* dy, float* dsilu),
              (L, dout, z, dy, dsilu))

// Both depthwise convs of a bidirectional block at one position t, with SiLU (inference): per channel c
//   of[c] = silu(bf[c] + sum_k wf[k, c] x_{t-(W-1)+k}[c]),   ob[c] = silu(bb[c] + sum_k wb[k, c] x_{t+(W-1)-k}[c])
// (the causal conv and the anti-causal one, positions outside 0..L-1 reading zeros). x: position rows of
// `dim` channels (stride xs between positions); weights tap-major (W, dim), so each tap is a vector load.
SS_INLINE void conv_silu_pair_impl(int L, int dim, int W, int t, const float* x, int64_t xs, const float* wf,
                                   const float* bf, const float* wb, const float* bb, float* of, float* ob) {
  for_rows(dim, [&]<class V>(int c) {
    V af = load<V>(bf + c), ab = load<V>(bb + c);
    for (int k = 0; k < W; ++k) {
      const int sf = t - (W - 1) + k, sb = t + (W - 1) - k;
      if (sf >= 0) af += load<V>(wf + k * dim + c) * load<V>(x + sf * xs + c);
      if (sb < L) ab += load<V>(wb + k * dim + c) * load<V>(x + sb * xs + c);
    }
    store<V>(of + c, af / (1.0f + fexp<V>(-af)));
    store<V>(ob + c, ab / (1.0f + fexp<V>(-ab)));
  });
}
SS_DISPATCHED(conv_silu_pair,
              (int L, int dim, int W, int t, const float* x, int64_t xs, const float* wf, const float* bf,
               const float* wb, const float* bb, float* of, float* ob),
              (L, dim, W, t, x, xs, wf, bf, wb, bb, of, ob))

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
// Row of a (batch, dim, seqlen) operand to fp32; any position stride (e.g. delta = (x W^T)^T).
template <typename T>
SS_INLINE void load_row(const T* src, int64_t stride, float* dst, int L) {
  if (stride == 1) {
    for (int t = 0; t < L; ++t) dst[t] = static_cast<float>(src[t]);
  } else {
    for (int t = 0; t < L; ++t) dst[t] = static_cast<float>(src[t * stride]);
  }
}
template <typename T>
SS_INLINE void store_row(const float* src, T* dst, int64_t stride, int L) {
  if (stride == 1) {
    for (int t = 0; t < L; ++t) dst[t] = static_cast<T>(src[t]);
  } else {
    for (int t = 0; t < L; ++t) dst[t * stride] = static_cast<T>(src[t]);
  }
}


// Rows of channels d0 .. d0+nch-1 (nch <= kRowBlock, positions 0..L-1) of batch element b of a (batch,
// dim, seqlen) operand of type T, into dst[c * L + t] as fp32. A token-major operand is read position by
// position, its nch adjacent values at a time: one strided row per channel touched a new cache line at
// every position (the token-major forward ran 35% slower than the channel-major one).
template <typename T>
SS_INLINE void load_rows(const at::Tensor& operand, int64_t b, int64_t d0, int nch, int L, float* dst) {
  const int64_t dim_stride = operand.stride(1), seq_stride = operand.stride(2);
  const T* src = operand.const_data_ptr<T>() + b * operand.stride(0) + d0 * dim_stride;
  if (dim_stride == 1 && seq_stride != 1) {
    for (int t = 0; t < L; ++t)
      for (int c = 0; c < nch; ++c) dst[c * L + t] = static_cast<float>(src[t * seq_stride + c]);
  } else {
    for (int c = 0; c < nch; ++c) load_row(src + c * dim_stride, seq_stride, dst + c * L, L);
  }
}
// The inverse of load_rows: src[c * L + t] into the operand's rows.
template <typename T>
SS_INLINE void store_rows(const float* src, at::Tensor& operand, int64_t b, int64_t d0, int nch, int L) {
  const int64_t dim_stride = operand.stride(1), seq_stride = operand.stride(2);
  T* dst = operand.data_ptr<T>() + b * operand.stride(0) + d0 * dim_stride;
  if (dim_stride == 1 && seq_stride != 1) {
    for (int t = 0; t < L; ++t)
      for (int c = 0; c < nch; ++c) dst[t * seq_stride + c] = static_cast<T>(src[c * L + t]);
  } else {
    for (int c = 0; c < nch; ++c) store_row(src + c * L, dst + c * dim_stride, seq_stride, L);
  }
}

constexpr int kPrefetch = 8;  // positions ahead that load_block prefetches

// Channels d0 .. d0+nch-1 of batch element b of a (batch, dim, seqlen) operand as a position-major fp32
// block: dst[t * kRowBlock + c], zeros for c >= nch. From a token-major operand each position is one
// contiguous run of channels (no transposition, unlike load_rows).
template <typename T>
SS_INLINE void load_block(const at::Tensor& operand, int64_t b, int64_t d0, int nch, int L, float* dst) {
  const int64_t dim_stride = operand.stride(1), seq_stride = operand.stride(2);
  const T* src = operand.const_data_ptr<T>() + b * operand.stride(0) + d0 * dim_stride;
  for (int t = 0; t < L; ++t) {
    float* row = dst + static_cast<int64_t>(t) * kRowBlock;
    const T* s = src + t * seq_stride;
    // Positions lie a whole row of channels apart (kilobytes), usually on another page, where the
    // hardware prefetchers stop: fetch a few positions ahead (the loads were a third of the forward).
    if (t + kPrefetch < L) __builtin_prefetch(s + kPrefetch * seq_stride);
    if (dim_stride == 1 && nch == kRowBlock) {
      for (int c = 0; c < kRowBlock; ++c) row[c] = static_cast<float>(s[c]);
    } else {
      for (int c = 0; c < kRowBlock; ++c) row[c] = c < nch ? static_cast<float>(s[c * dim_stride]) : 0.0f;
    }
  }
}
// The inverse of load_block (its first nch channels).
template <typename T>
SS_INLINE void store_block(const float* src, at::Tensor& operand, int64_t b, int64_t d0, int nch, int L) {
  const int64_t dim_stride = operand.stride(1), seq_stride = operand.stride(2);
  T* dst = operand.data_ptr<T>() + b * operand.stride(0) + d0 * dim_stride;
  for (int t = 0; t < L; ++t) {
    const float* row = src + static_cast<int64_t>(t) * kRowBlock;
    T* d = dst + t * seq_stride;
    if (dim_stride == 1 && nch == kRowBlock) {
      for (int c = 0; c < kRowBlock; ++c) d[c] = static_cast<T>(row[c]);
    } else {
      for (int c = 0; c < nch; ++c) d[c * dim_stride] = static_cast<T>(row[c]);
    }
  }
}

// A block's per-channel constant (bias or D, absent: zeros) as the 8-vector the row functions take.
SS_INLINE void block_constants(const float* v, int64_t d0, int nch, float* v8) {
  for (int c = 0; c < kRowBlock; ++c) v8[c] = v != nullptr && c < nch ? v[d0 + c] : 0.0f;
}

// New tensors take u's layout, so that a Mamba block stays in the linear layers' layout, as with the CUDA kernels.
using seq_layout::empty_in_layout;

at::Tensor seq_operand(const at::Tensor& t, const at::Tensor& u, const char* name) {
  TORCH_CHECK(t.sizes() == u.sizes(), "selective_scan_cpu: ", name, " must have u's shape ", u.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "selective_scan_cpu: ", name, " must be a CPU tensor");
  return t.scalar_type() == u.scalar_type() ? t : t.to(u.scalar_type());
}

at::Tensor f32_vec(const OptTensor& t, int64_t dim, const char* name) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->numel() == dim, "selective_scan_cpu: ", name, " must be (dim,) = (", dim, ",), got ", t->sizes());
  TORCH_CHECK(t->device().is_cpu(), "selective_scan_cpu: ", name, " must be a CPU tensor");
  return t->to(at::kFloat).contiguous().view({dim});
}

struct Prepared {
  at::Tensor u, delta, z, A, Bt, Ct, D, bias;  // Bt, Ct: fp32 (batch, groups, L, N)
  int64_t batch, dim, L, N, groups, nchunks;
};

Prepared prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: u must be a CPU tensor");
  TORCH_CHECK(u.dim() == 3, "selective_scan_cpu: u must be (batch, dim, seqlen), got ", u.sizes());
  const auto st = u.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "selective_scan_cpu: u must be float32, float16 or bfloat16, got ", st);
  Prepared r;
  r.batch = u.size(0);
  r.dim = u.size(1);
  r.L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == r.dim, "selective_scan_cpu: A must be (dim, dstate) with dim = ", r.dim,
              ", got ", A.sizes());
  TORCH_CHECK(!A.is_complex(), "selective_scan_cpu: complex A is not supported");
  r.N = A.size(1);
  TORCH_CHECK(r.N >= 1 && r.N <= kMaxState, "selective_scan_cpu: dstate must be between 1 and ", kMaxState,
              ", got ", r.N);
  TORCH_CHECK(B.dim() == 4 && C.dim() == 4, "selective_scan_cpu: B and C must be (batch, groups, dstate, seqlen), got ",
              B.sizes(), " and ", C.sizes());
  r.groups = B.size(1);
  TORCH_CHECK(B.size(0) == r.batch && B.size(2) == r.N && B.size(3) == r.L && C.sizes() == B.sizes(),
              "selective_scan_cpu: B and C must be (", r.batch, ", groups, ", r.N, ", ", r.L, "), got ", B.sizes(),
              " and ", C.sizes());
  TORCH_CHECK(r.groups >= 1 && r.dim % r.groups == 0, "selective_scan_cpu: dim ", r.dim,
              " is not divisible by groups ", r.groups);
  TORCH_CHECK(r.L < (int64_t(1) << 30), "selective_scan_cpu: seqlen too large");
  TORCH_CHECK(B.device().is_cpu() && C.device().is_cpu() && A.device().is_cpu(),
              "selective_scan_cpu: A, B, C must be CPU tensors");
  r.nchunks = (r.L + kChunk - 1) / kChunk;
  r.u = u;
  r.delta = seq_operand(delta, u, "delta");
  if (z.has_value()) r.z = seq_operand(*z, u, "z");
  r.A = A.to(at::kFloat).contiguous();
  // Time-major fp32 copies of B and C (values rounded to u's dtype first, as the CUDA kernels read them).
  r.Bt = B.to(st).to(at::kFloat).transpose(2, 3).contiguous();
  r.Ct = C.to(st).to(at::kFloat).transpose(2, 3).contiguous();
  r.D = f32_vec(D, r.dim, "D");
  r.bias = f32_vec(delta_bias, r.dim, "delta_bias");
  return r;
}

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options().dtype(at::kFloat)); }

template <typename T>
void fwd_impl(const Prepared& p, bool softplus, bool reverse, at::Tensor& out, float* last, float* ckpt) {
  const int L = static_cast<int>(p.L), N = static_cast<int>(p.N);
  const int64_t dim = p.dim, per_group = p.dim / p.groups;
  const bool has_z = p.z.defined();
  const float* A = p.A.data_ptr<float>();
  const float* Bt = p.Bt.data_ptr<float>();
  const float* Ct = p.Ct.data_ptr<float>();
  const float* Dp = p.D.defined() ? p.D.data_ptr<float>() : nullptr;
  const float* bias = p.bias.defined() ? p.bias.data_ptr<float>() : nullptr;
  const int64_t nblk = (dim + kRowBlock - 1) / kRowBlock;  // blocks of channels per batch element
  const int64_t grain = std::max<int64_t>(1, 2048 / (kRowBlock * std::max<int64_t>(1, p.L)));
  // A block of kRowBlock channels at a time, position-major (load_block): the per-position work runs
  // over the block's channels as one vector per position, and token-major operands need no transposition.
  at::parallel_for(0, p.batch * nblk, grain, [&](int64_t begin, int64_t end) {
    const int n = L * kRowBlock;
    std::vector<float> buf(static_cast<size_t>(n) * 6);
    float *fu = buf.data(), *fd = fu + n, *fz = fd + n, *y = fz + n, *dt = y + n, *dtu = dt + n;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nblk, d0 = (i % nblk) * kRowBlock;
      const int nch = static_cast<int>(std::min<int64_t>(kRowBlock, dim - d0));
      load_block<T>(p.u, b, d0, nch, L, fu);
      load_block<T>(p.delta, b, d0, nch, L, fd);
      if (has_z) load_block<T>(p.z, b, d0, nch, L, fz);
      float bias8[kRowBlock], D8[kRowBlock];
      block_constants(bias, d0, nch, bias8);
      block_constants(Dp, d0, nch, D8);
      prep_rows(n, fd, fu, bias8, softplus, dt, nullptr, dtu);
      for (int c = 0; c < nch; ++c) {
        const int64_t d = d0 + c, bd = b * dim + d, g = d / per_group;
        FwdChannel a;
        a.L = L;
        a.N = N;
        a.ps = kRowBlock;
        a.reverse = reverse;
        a.dt = dt + c;
        a.dtu = dtu + c;
        a.A = A + d * N;
        a.Bt = Bt + (b * p.groups + g) * p.L * N;
        a.Ct = Ct + (b * p.groups + g) * p.L * N;
        a.y = y + c;
        a.last = last ? last + bd * N : nullptr;
        a.ckpt = ckpt ? ckpt + bd * p.nchunks * N : nullptr;
        fwd_channel(a);
      }
      finish_rows(n, y, fu, D8, has_z ? fz : nullptr);
      store_block<T>(y, out, b, d0, nch, L);
    }
  });
}

// -> (out, last_state or empty, ckpt or empty)
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta,
                                                        const at::Tensor& A, const at::Tensor& B,
                                                        const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                                                        const OptTensor& delta_bias, bool delta_softplus,
                                                        bool return_last_state, bool save_ckpt, bool reverse) {
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = empty_in_layout(u);
  at::Tensor last = return_last_state ? at::zeros({p.batch, p.dim, p.N}, f32) : empty0(u);
  at::Tensor ckpt = save_ckpt ? at::empty({p.batch, p.dim, p.nchunks, p.N}, f32) : empty0(u);
  if (out.numel() == 0) return {out, last, ckpt};
  float* lp = return_last_state ? last.data_ptr<float>() : nullptr;
  float* cp = save_ckpt ? ckpt.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_cpu_fwd",
                                  [&] { fwd_impl<scalar_t>(p, delta_softplus, reverse, out, lp, cp); });
  return {out, last, ckpt};
}

// -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); absent gradients are empty tensors.
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                                 const OptTensor& delta_bias, const at::Tensor& dout, const OptTensor& dlast,
                                 const at::Tensor& ckpt, bool delta_softplus, bool reverse) {
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias);
  const auto f32 = u.options().dtype(at::kFloat);
  TORCH_CHECK(ckpt.dim() == 4 && ckpt.size(0) == p.batch && ckpt.size(1) == p.dim && ckpt.size(2) == p.nchunks &&
                  ckpt.size(3) == p.N && ckpt.scalar_type() == at::kFloat,
              "selective_scan_cpu: ckpt must be the fp32 (batch, dim, nchunks, dstate) tensor saved by the forward, got ",
              ckpt.sizes());
  at::Tensor dout_c = seq_operand(dout, u, "dout");
  at::Tensor ckpt_c = ckpt.contiguous();
  at::Tensor dlast_c;
  if (dlast.has_value()) {
    TORCH_CHECK(dlast->numel() == p.batch * p.dim * p.N, "selective_scan_cpu: dlast must be (batch, dim, dstate)");
    dlast_c = dlast->to(at::kFloat).contiguous();
  }
  const int64_t batch = p.batch, dim = p.dim, groups = p.groups, per_group = dim / groups;
  const int L = static_cast<int>(p.L), N = static_cast<int>(p.N);
  at::Tensor du = empty_in_layout(u);
  at::Tensor ddelta = empty_in_layout(u);
  at::Tensor dz = z.has_value() ? empty_in_layout(u) : empty0(u);
  // Work units: (batch, group, block of channels); each owns a private dB/dC accumulator.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t bg = batch * groups;
  const int64_t nblocks = std::max<int64_t>(1, std::min<int64_t>(per_group, (4 * nthreads + bg - 1) / bg));
  const int64_t block = (per_group + nblocks - 1) / nblocks;
  at::Tensor dBp = at::zeros({bg * nblocks, p.L, p.N}, f32);
  at::Tensor dCp = at::zeros({bg * nblocks, p.L, p.N}, f32);
  at::Tensor dAp = at::empty({batch, dim, p.N}, f32);
  at::Tensor dDp = at::empty({batch, dim}, f32);
  at::Tensor ddbp = at::empty({batch, dim}, f32);
  if (du.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_cpu_bwd", [&] {
      using T = scalar_t;
      const bool has_z = p.z.defined();
      const float* Ap = p.A.data_ptr<float>();
      const float* Bt = p.Bt.data_ptr<float>();
      const float* Ct = p.Ct.data_ptr<float>();
      const float* Dp = p.D.defined() ? p.D.data_ptr<float>() : nullptr;
      const float* bias = p.bias.defined() ? p.bias.data_ptr<float>() : nullptr;
      const float* ck = ckpt_c.data_ptr<float>();
      const float* dl = dlast_c.defined() ? dlast_c.data_ptr<float>() : nullptr;
      float* dBpp = dBp.data_ptr<float>();
      float* dCpp = dCp.data_ptr<float>();
      float* dApp = dAp.data_ptr<float>();
      float* dDpp = dDp.data_ptr<float>();
      float* ddbpp = ddbp.data_ptr<float>();
      at::parallel_for(0, bg * nblocks, 1, [&](int64_t begin, int64_t end) {
        const size_t rows = static_cast<size_t>(L) * kRowBlock;
        std::vector<float> buf(rows * 7 + static_cast<size_t>(L) * 5 + static_cast<size_t>(kChunk) * N * 2);
        // Rows of a block of channels: inputs, then the gradients written back together.
        float *fu = buf.data(), *fd = fu + rows, *fz = fd + rows, *fg = fz + rows, *gu = fg + rows, *gd = gu + rows,
              *gz = gd + rows;
        float *dt = gz + rows, *sig = dt + L, *dtu = sig + L, *dy = dtu + L, *y = dy + L;  // one channel's
        float* hbuf = y + L;
        float* abuf = hbuf + static_cast<size_t>(kChunk) * N;
        for (int64_t w = begin; w < end; ++w) {
          const int64_t bgi = w / nblocks, blk = w % nblocks;
          const int64_t b = bgi / groups, g = bgi % groups;
          const int64_t d0 = g * per_group + blk * block, d1 = std::min(g * per_group + per_group, d0 + block);
          float* dBt = dBpp + w * p.L * N;
          float* dCt = dCpp + w * p.L * N;
          for (int64_t r0 = d0; r0 < d1; r0 += kRowBlock) {
            const int nch = static_cast<int>(std::min<int64_t>(kRowBlock, d1 - r0));
            load_rows<T>(p.u, b, r0, nch, L, fu);
            load_rows<T>(p.delta, b, r0, nch, L, fd);
            load_rows<T>(dout_c, b, r0, nch, L, fg);
            if (has_z) load_rows<T>(p.z, b, r0, nch, L, fz);
            for (int c = 0; c < nch; ++c) {
              const int64_t d = r0 + c, bd = b * dim + d;
              const float *uc = fu + c * L, *gc = fg + c * L;
              float* dsilu = fz + c * L;  // silu'(z) replaces z once dy is known
              float *duc = gu + c * L, *ddt = gd + c * L;
              const float Dv = Dp ? Dp[d] : 0.0f;
              float bias8[kRowBlock];
              std::fill(bias8, bias8 + kRowBlock, bias ? bias[d] : 0.0f);
              prep_rows(L, fd + c * L, uc, bias8, delta_softplus, dt, sig, dtu);
              if (has_z) {
                gate_bwd_rows(L, gc, dsilu, dy, dsilu);
              } else {
                std::copy(gc, gc + L, dy);
              }
              BwdChannel a;
              a.L = L;
              a.N = N;
              a.reverse = reverse;
              a.u = uc;
              a.dt = dt;
              a.dtu = dtu;
              a.dy = dy;
              a.A = Ap + d * N;
              a.Bt = Bt + bgi * p.L * N;
              a.Ct = Ct + bgi * p.L * N;
              a.ckpt = ck + bd * p.nchunks * N;
              a.dlast = dl ? dl + bd * N : nullptr;
              a.Dv = Dv;
              a.y = y;
              a.du = duc;
              a.ddt = ddt;
              a.dA = dApp + bd * N;
              a.dBt = dBt;
              a.dCt = dCt;
              a.hbuf = hbuf;
              a.abuf = abuf;
              bwd_channel(a);
              float sD = 0.0f, sdb = 0.0f;
              for (int t = 0; t < L; ++t) {
                sD += dy[t] * uc[t];
                const float ddl = ddt[t] * sig[t];
                ddt[t] = ddl;
                sdb += ddl;
              }
              dDpp[bd] = sD;
              ddbpp[bd] = sdb;
              if (has_z) {
                float* dzc = gz + c * L;
                for (int t = 0; t < L; ++t) dzc[t] = gc[t] * (y[t] + Dv * uc[t]) * dsilu[t];
              }
            }
            store_rows<T>(gu, du, b, r0, nch, L);
            store_rows<T>(gd, ddelta, b, r0, nch, L);
            if (has_z) store_rows<T>(gz, dz, b, r0, nch, L);
          }
        }
      });
    });
  }
  at::Tensor dA = dAp.sum(0);
  at::Tensor dB = dBp.view({batch, groups, nblocks, p.L, p.N}).sum(2).transpose(2, 3).to(u.scalar_type()).contiguous();
  at::Tensor dC = dCp.view({batch, groups, nblocks, p.L, p.N}).sum(2).transpose(2, 3).to(u.scalar_type()).contiguous();
  at::Tensor dD = D.has_value() ? dDp.sum(0) : empty0(u);
  at::Tensor ddb = delta_bias.has_value() ? ddbp.sum(0) : empty0(u);
  return {du, ddelta, dA, dB, dC, dD, dz, ddb};
}

// Inference-only: (silu(causal conv of x with wf, bf), silu(anti-causal conv with wb, bb)) for an fp32
// token-major x (batch, dim, seqlen), both token-major. weights (dim, width), biases (dim,) or absent.
std::tuple<at::Tensor, at::Tensor> conv_silu_pair_op(const at::Tensor& x, const at::Tensor& wf, const OptTensor& bf,
                                                  const at::Tensor& wb, const OptTensor& bb) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(1) == 1,
              "selective_scan_cpu.conv_silu_pair: x must be a float32 token-major (batch, dim, seqlen) CPU tensor");
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2);
  TORCH_CHECK(wf.dim() == 2 && wf.size(0) == dim && wb.sizes() == wf.sizes(),
              "selective_scan_cpu.conv_silu_pair: weights must be (dim, width) with dim = ", dim, ", got ", wf.sizes(),
              " and ", wb.sizes());
  const int W = static_cast<int>(wf.size(1));
  const at::Tensor wft = wf.to(at::kFloat).t().contiguous(), wbt = wb.to(at::kFloat).t().contiguous();
  const at::Tensor zeros = at::zeros({dim}, x.options());
  const at::Tensor bft = bf.has_value() ? f32_vec(bf, dim, "bf") : zeros;
  const at::Tensor bbt = bb.has_value() ? f32_vec(bb, dim, "bb") : zeros;
  at::Tensor of = seq_layout::empty_seq(batch, dim, L, true, x.options());
  at::Tensor ob = seq_layout::empty_seq(batch, dim, L, true, x.options());
  const float* xp = x.const_data_ptr<float>();
  float *ofp = of.data_ptr<float>(), *obp = ob.data_ptr<float>();
  const int64_t xb = x.stride(0), xs = x.stride(2);
  at::parallel_for(0, batch * L, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, dim)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / L;
      const int t = static_cast<int>(i % L);
      conv_silu_pair(static_cast<int>(L), static_cast<int>(dim), W, t, xp + b * xb, xs, wft.const_data_ptr<float>(),
                     bft.const_data_ptr<float>(), wbt.const_data_ptr<float>(), bbt.const_data_ptr<float>(),
                     ofp + i * dim, obp + i * dim);
    }
  });
  return {of, ob};
}

}  // namespace
}  // namespace sscpu

TORCH_LIBRARY(selective_scan_cpu, m) {
  m.def(
      "fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool delta_softplus, bool return_last_state, bool save_ckpt, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "Tensor dout, Tensor? dlast, Tensor ckpt, bool delta_softplus, bool reverse) -> Tensor[]");
  m.def("conv_silu_pair(Tensor x, Tensor wf, Tensor? bf, Tensor wb, Tensor? bb) -> (Tensor, Tensor)");
  m.def("isa() -> str", []() -> std::string { return sscpu::isa_name(); });
}

TORCH_LIBRARY_IMPL(selective_scan_cpu, CPU, m) {
  m.impl("fwd", &sscpu::scan_fwd);
  m.impl("bwd", &sscpu::scan_bwd);
  m.impl("conv_silu_pair", &sscpu::conv_silu_pair_op);
}

static struct PyModuleDef selective_scan_cpu_module = {
    PyModuleDef_HEAD_INIT, "selective_scan_cpu",
    "Fused CPU kernels of the selective scan (ops in torch.ops.selective_scan_cpu)", -1, nullptr};
PyMODINIT_FUNC PyInit_selective_scan_cpu(void) { return PyModule_Create(&selective_scan_cpu_module); }

// Fused CPU selective scan (forward and backward) for the `selective_scan_cpu` extension.
//
// Ops live in the `selective_scan_cpu` library (torch.ops.selective_scan_cpu.{fwd,bwd,bi_fwd,conv_silu_pair});
// the Python package wraps them in torch.library custom ops (mamba_ssm/ops/scan.py, mamba_inner.py).
// Importing the module registers the ops; it holds no Python functions.
//
// Semantics (per batch b, channel d, state n; t runs 0..L-1, or L-1..0 with `reverse`):
//   dt_t = softplus(delta_t + delta_bias[d])    (or without softplus / bias)
//   h_t  = exp(dt_t * A[d,n]) * h_{t-1} + dt_t * B[b,g,n,t] * u_t,   h_{-1} = 0
//   y_t  = sum_n C[b,g,n,t] * h_t + D[d] * u_t,   out_t = y_t * silu(z_t)
// All arithmetic is fp32 whatever the input dtype (fp32 / fp16 / bf16); outputs are in u's dtype and
// layout (token-major or contiguous: empty_in_layout).
//
// Forward: blocks of 16 channels (of one group) are split over at::parallel_for; a block's rows are held
// position-major, so a position's 16 channels are one vector (two of 8 below AVX-512) and the states an
// unrolled loop: B and C of a position are scalars broadcast to every lane and y needs no sum across lanes.
// `bi_fwd` runs both directions of a Vim block per block of channels (inference), forming delta from the
// low-rank dt itself and gating once. The per-position work (softplus, gates) is vectorised over the rows.
// exp/log1p are branch-free polynomials (relative error ~1e-7) that vectorise, instead of libm calls; no
// fast-math. On x86-64 (GCC / Clang) the hot functions are compiled for the baseline, AVX2+FMA and AVX-512
// and the widest one the CPU supports is chosen once at load time (torch.ops.selective_scan_cpu.isa() names
// it; the environment variable SELECTIVE_SCAN_CPU_ISA=base|avx2 caps it), so one binary runs on any x86-64
// machine.
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
constexpr int kMaxDeltaRank = 64;  // largest rank of a low-rank delta (MAX_DELTA_RANK in mamba_ssm/ops/mamba_inner.py)
// Channels whose rows are moved together: in a token-major operand (channel stride 1) 16 adjacent
// channels of a position fill a cache line. Also the period of the per-channel constants (bias, D)
// of the row functions below, so a block of channels stored position-major is one 16-float vector (two
// of 8) per position.
constexpr int kRowBlock = 16;

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
// fp32 math on scalars and on 8- and 16-float vectors (GCC/Clang vector extensions: v8f compiles to ymm
// instructions in the AVX2/AVX-512 variants and to pairs of xmm instructions in the baseline one; v16f, one
// zmm register, is used by the AVX-512 variants only). exp/log1p are branch-free polynomials (relative
// error ~1e-7), written once for every type.
// ------------------------------------------------------------------------------------------------
#if defined(__GNUC__) || defined(__clang__)
#define SS_VEC 1
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
template <class V = v8f>
SS_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
SS_INLINE void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
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
// The float vector whose bits are those of v shifted left by 23 (modulo 2^32).
SS_INLINE v8f bits_shl23(v8f v) { return reinterpret_cast<v8f>(reinterpret_cast<v8u>(v) << 23); }
SS_INLINE v16f bits_shl23(v16f v) { return reinterpret_cast<v16f>(reinterpret_cast<v16u>(v) << 23); }
#else
#define SS_VEC 0
#endif
SS_INLINE float bits_shl23(float v) {
  uint32_t i;
  std::memcpy(&i, &v, sizeof(i));
  i <<= 23;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}

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

// 2^x, x = k + f with k integer, f in [-0.5, 0.5]: 2^f by a degree-5 minimax polynomial (relative error
// below 2e-7 evaluated in fp32, like the GPU's ex2.approx) times 2^k. Adding 1.5 * 2^23 + 127 rounds x to an
// integer whose low mantissa bits are k + 127, so those bits shifted into the exponent field are 2^k: ~11
// vector operations. The result is 0 below -126.5 (2^x is subnormal below -126); kUpper clamps x to 127 (the
// decays of the recurrences, x <= 0, skip it).
template <class V, bool kUpper>
SS_INLINE V exp2_poly(V x) {
  constexpr float kRound = 12582912.0f + 127.0f;
  // Raised to -127, where k + 127 = 0 builds a zero scale: one select instead of a clamp and a zeroing.
  V xc = x < splat<V>(-127.0f) ? splat<V>(-127.0f) : x;  // NaN stays NaN
  if constexpr (kUpper) xc = xc > splat<V>(127.0f) ? splat<V>(127.0f) : xc;
  const V kb = xc + kRound;
  const V f = xc - (kb - kRound);
  V p = splat<V>(1.3264723959e-3f);
  p = p * f + 9.6715129453e-3f;
  p = p * f + 5.5507337548e-2f;
  p = p * f + 2.4022242079e-1f;
  p = p * f + 6.9314697759e-1f;
  p = p * f + 1.0f;
  return p * bits_shl23(kb);
}
constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0 (or NaN): the decays exp(dt A) = 2^(dt A log2(e)), one per state update.
template <class V>
SS_INLINE V fexp2_nonpos(V x) {
  return exp2_poly<V, false>(x);
}

// exp(x) = 2^(x log2(e)) (rounding the product adds a relative error of about |x| 6e-8): 0 below -87.7,
// 2^127 above 88 (only reached by sigmoid(z) for z < -88, where it is harmless).
template <class V>
SS_INLINE V fexp(V x) {
  return exp2_poly<V, true>(x * kLog2e);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)) (torch's; its threshold 20 changes nothing in fp32), and with
// kSigmoid sigmoid(x) = d softplus / dx. log1p on [0, 1] is a degree-9 polynomial (relative error below 3e-7
// evaluated in fp32), with no range reduction, unlike a log.
template <class V, bool kSigmoid>
SS_INLINE void softplus_sigmoid(V x, V& sp, V& sig) {
  const V zero = splat<V>(0.0f);
  const V e = fexp2_nonpos((x < zero ? x : -x) * kLog2e);  // exp(-|x|)
  V q = splat<V>(5.2322140e-3f);
  q = q * e - 2.9502830e-2f;
  q = q * e + 7.8221105e-2f;
  q = q * e - 1.3662738e-1f;
  q = q * e + 1.9105709e-1f;
  q = q * e - 2.4842885e-1f;
  q = q * e + 3.3319080e-1f;
  q = q * e - 4.9999493e-1f;
  q = q * e + 9.9999994e-1f;
  sp = (x > zero ? x : zero) + q * e;
  if constexpr (kSigmoid) sig = (x > zero ? splat<V>(1.0f) : e) / (1.0f + e);
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
// Forward on a position-major block of kRowBlock channels (row t holds the block's channels at position
// t): the channels are the lanes of one vector and the states an unrolled loop, so a position's y needs no
// sum across lanes and its B and C values are scalars broadcast to every lane (a third fewer operations per
// state update than one channel's states in the lanes).
// ------------------------------------------------------------------------------------------------
struct FwdBlock {
  int L, N, nch;         // nch <= kRowBlock channels of one group
  bool reverse;
  const float* dt;       // [L, kRowBlock] softplus'd delta
  const float* dtu;      // [L, kRowBlock] dt * u
  const float* A;        // [nch, N] the block's rows of A
  const float* Bt;       // [L, N] time-major (the block's group)
  const float* Ct;       // [L, N]
  float* y;              // [L, kRowBlock] out: sum_n C h (before D and gate)
  float* last;           // [nch, N] or null
  float* ckpt;           // [nch, nchunks, N] or null
};

// Stores the states h of channels c .. c+lanes-1 (those below nch) as rows of `dst`, one per channel,
// `stride` apart.
template <class V, int kG>
SS_INLINE void store_states(const V (&h)[kG], int nch, int c, float* dst, int64_t stride) {
  constexpr int lanes = sizeof(V) / sizeof(float);
  for (int j = 0; j < kG; ++j) {
    float v[lanes];
    store<V>(v, h[j]);
    for (int l = 0; l < lanes && c + l < nch; ++l) dst[(c + l) * stride + j] = v[l];
  }
}

// States n0 .. n0+kG-1 of the block over every position: adds their part of y (writes it when `first`).
// The lanes of V are channels c .. c+lanes-1 (V = float: channel c alone, compilers without vector
// extensions).
template <class V, int kG>
SS_INLINE void fwd_states(const FwdBlock& a, int n0, bool first, int c) {
  constexpr int lanes = sizeof(V) / sizeof(float);
  const int L = a.L, N = a.N, step = a.reverse ? -1 : 1;
  const int64_t ckpt_stride = static_cast<int64_t>((L + kChunk - 1) / kChunk) * N;
  // The fields in locals: the stores to y would otherwise make the compiler reload them every step.
  const float *dt = a.dt + c, *dtu = a.dtu + c, *Bt = a.Bt + n0, *Ct = a.Ct + n0;
  float* y = a.y + c;
  V h[kG], A2[kG];  // A log2(e): the decays are 2^(dt A2)
  for (int j = 0; j < kG; ++j) {
    h[j] = splat<V>(0.0f);
    float lane_a[lanes];
    for (int l = 0; l < lanes; ++l) lane_a[l] = c + l < a.nch ? a.A[(c + l) * N + n0 + j] * kLog2e : 0.0f;
    A2[j] = load<V>(lane_a);
  }
  for (int i0 = 0; i0 < L; i0 += kChunk) {
    if (a.ckpt != nullptr) store_states<V, kG>(h, a.nch, c, a.ckpt + (i0 / kChunk) * N + n0, ckpt_stride);
    const int i1 = std::min(L, i0 + kChunk);
    for (int i = i0, t = a.reverse ? L - 1 - i0 : i0; i < i1; ++i, t += step) {
      const V d = load<V>(dt + t * kRowBlock), du = load<V>(dtu + t * kRowBlock);
      const float* b = Bt + static_cast<int64_t>(t) * N;
      const float* cc = Ct + static_cast<int64_t>(t) * N;
      V yv = first ? splat<V>(0.0f) : load<V>(y + t * kRowBlock);
#pragma GCC unroll 16
      for (int j = 0; j < kG; ++j) {
        h[j] = fexp2_nonpos(d * A2[j]) * h[j] + du * b[j];
        yv += cc[j] * h[j];
      }
      store<V>(y + t * kRowBlock, yv);
    }
  }
  if (a.last != nullptr) store_states<V, kG>(h, a.nch, c, a.last + n0, N);
}

// kG states per pass keep their states and decay rates in registers; y is summed over the passes.
template <class V, int kG>
SS_INLINE void fwd_block_lanes(const FwdBlock& a, int c) {
  int n0 = 0;
  for (; n0 + kG <= a.N; n0 += kG) fwd_states<V, kG>(a, n0, n0 == 0, c);
  for (; n0 < a.N; ++n0) fwd_states<V, 1>(a, n0, n0 == 0, c);
}

// kWide: the AVX-512 variant, where the block's 16 channels make one vector. The lane dispatch is written
// out here and in low_rank_rows_impl rather than shared through a generic lambda: a lambda's body that is not
// inlined is compiled for the baseline ISA, not the caller's (the scan ran 5x slower that way).
template <bool kWide>
SS_INLINE void fwd_block_impl(const FwdBlock& a) {
  static_assert(kRowBlock == 16, "a block's channels are the lanes of one v16f or two v8f");
#if SS_VEC
  if constexpr (kWide) {
    fwd_block_lanes<v16f, 16>(a, 0);
  } else {
    for (int c = 0; c < a.nch; c += 8) fwd_block_lanes<v8f, 8>(a, c);
  }
#else
  for (int c = 0; c < a.nch; ++c) fwd_block_lanes<float, 8>(a, c);
#endif
}
SS_DISPATCHED_AS(fwd_block, (const FwdBlock& a), (a), fwd_block_impl<true>, fwd_block_impl<false>)

// Row preparation and finishing over n elements, vectorised. The per-channel constants (bias_blk, D_blk) have
// period kRowBlock: element i uses bias_blk[i % kRowBlock], so the same functions serve one channel's row
// (all equal) and a position-major block of kRowBlock channels (one per channel).
static_assert(kRowBlock % 8 == 0, "the row functions load the per-channel constants 8 floats at a time");
SS_INLINE void prep_rows_impl(int n, const float* delta, const float* u, const float* bias_blk, bool softplus, float* dt,
                              float* sig, float* dtu) {
  if (softplus && sig != nullptr) {
    for_rows(n, [&]<class V>(int t) {
      V sp, sg;
      softplus_sigmoid<V, true>(load<V>(delta + t) + load<V>(bias_blk + t % kRowBlock), sp, sg);
      store<V>(dt + t, sp);
      store<V>(sig + t, sg);
      store<V>(dtu + t, sp * load<V>(u + t));
    });
  } else if (softplus) {
    for_rows(n, [&]<class V>(int t) {
      V sp, unused;
      softplus_sigmoid<V, false>(load<V>(delta + t) + load<V>(bias_blk + t % kRowBlock), sp, unused);
      store<V>(dt + t, sp);
      store<V>(dtu + t, sp * load<V>(u + t));
    });
  } else {
    for (int t = 0; t < n; ++t) {
      const float d = delta[t] + bias_blk[t % kRowBlock];
      dt[t] = d;
      if (sig != nullptr) sig[t] = 1.0f;
      dtu[t] = d * u[t];
    }
  }
}
SS_DISPATCHED(prep_rows,
              (int n, const float* delta, const float* u, const float* bias_blk, bool softplus, float* dt, float* sig,
               float* dtu),
              (n, delta, u, bias_blk, softplus, dt, sig, dtu))

// y += D u
SS_INLINE void add_skip_rows_impl(int n, float* y, const float* u, const float* D_blk) {
  for_rows(n, [&]<class V>(int t) { store<V>(y + t, load<V>(y + t) + load<V>(D_blk + t % kRowBlock) * load<V>(u + t)); });
}
SS_DISPATCHED(add_skip_rows, (int n, float* y, const float* u, const float* D_blk), (n, y, u, D_blk))

// y = (y + y2) * silu(z) * scale, y2 optional (the two directions of a bidirectional block, gated once)
SS_INLINE void gate_rows_impl(int n, float* y, const float* y2, const float* z, float scale) {
  for_rows(n, [&]<class V>(int t) {
    const V zz = load<V>(z + t);
    const V sum = y2 != nullptr ? load<V>(y + t) + load<V>(y2 + t) : load<V>(y + t);
    store<V>(y + t, sum * (zz / (1.0f + fexp<V>(-zz))) * scale);
  });
}
SS_DISPATCHED(gate_rows, (int n, float* y, const float* y2, const float* z, float scale), (n, y, y2, z, scale))

// A block's delta from the low-rank dt: delta[t * kRowBlock + c] = sum_r dtl[t * rank + r] * Wb[r * kRowBlock + c]
// (dtl: the batch element's dt, position-major; Wb: the block's rows of the projection weight, transposed).
// V: the lanes of channels c0 .. c0+lanes-1.
template <class V>
SS_INLINE void low_rank_lanes(int L, int rank, const float* dtl, const float* Wb, float* delta, int c0) {
  for (int t = 0; t < L; ++t) {
    const float* d = dtl + static_cast<int64_t>(t) * rank;
    V acc = splat<V>(0.0f);
    for (int r = 0; r < rank; ++r) acc += d[r] * load<V>(Wb + r * kRowBlock + c0);
    store<V>(delta + static_cast<int64_t>(t) * kRowBlock + c0, acc);
  }
}
template <bool kWide>
SS_INLINE void low_rank_rows_impl(int L, int rank, const float* dtl, const float* Wb, float* delta) {
#if SS_VEC
  if constexpr (kWide) {
    low_rank_lanes<v16f>(L, rank, dtl, Wb, delta, 0);
  } else {
    for (int c = 0; c < kRowBlock; c += 8) low_rank_lanes<v8f>(L, rank, dtl, Wb, delta, c);
  }
#else
  for (int c = 0; c < kRowBlock; ++c) low_rank_lanes<float>(L, rank, dtl, Wb, delta, c);
#endif
}
SS_DISPATCHED_AS(low_rank_rows, (int L, int rank, const float* dtl, const float* Wb, float* delta),
                 (L, rank, dtl, Wb, delta), low_rank_rows_impl<true>, low_rank_rows_impl<false>)

// ------------------------------------------------------------------------------------------------
// Backward, per channel on fp32 rows (positions in natural order; `reverse` flips the scan order): the
// channel's states are the vector lanes.
// ------------------------------------------------------------------------------------------------
template <class V>
SS_INLINE float reduce(V v) {
  if constexpr (std::is_same_v<V, float>) return v;
#if SS_VEC
  else return hsum(v);
#endif
}

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
  at::Tensor dtl, Wt;  // delta given low-rank: fp32 dt (batch, L, rank) and the projection weight^T (rank, dim)
  int64_t batch, dim, L, N, groups, nchunks, rank = 0;
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
  if (delta.defined()) r.delta = seq_operand(delta, u, "delta");
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

// Buffers of one task: position-major rows of a block (n = L * kRowBlock floats each).
struct BlockRows {
  explicit BlockRows(int64_t L) : n(static_cast<int>(L) * kRowBlock), buf(static_cast<size_t>(n) * 7) {
    float* r = buf.data();
    for (float** row : {&u, &delta, &z, &dt, &dtu, &y, &y2}) {
      *row = r;
      r += n;
    }
  }
  int n;
  std::vector<float> buf;
  float *u, *delta, *z, *dt, *dtu, *y, *y2;
};

// Blocks of kRowBlock channels within a group (they share B and C), position-major (load_block): the
// per-position work runs over the block's channels as one vector, and token-major operands need no
// transposition. Block i of the parallel loop: batch element b, group g, channels d0 .. d0+nch-1.
struct BlockIndex {
  int64_t b, bg, d0;
  int nch;
};
int64_t blocks_per_group(const Prepared& p) { return (p.dim / p.groups + kRowBlock - 1) / kRowBlock; }
BlockIndex block_index(const Prepared& p, int64_t i) {
  const int64_t per_group = p.dim / p.groups, nblk = blocks_per_group(p);
  const int64_t bg = i / nblk, blk = i % nblk;
  return {bg / p.groups, bg, (bg % p.groups) * per_group + blk * kRowBlock,
          static_cast<int>(std::min<int64_t>(kRowBlock, per_group - blk * kRowBlock))};
}
// f(block, rows) for every block of p, split over at::parallel_for, with one BlockRows per task.
template <class F>
void for_each_block(const Prepared& p, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 2048 / (kRowBlock * std::max<int64_t>(1, p.L)));
  at::parallel_for(0, p.batch * p.groups * blocks_per_group(p), grain, [&](int64_t begin, int64_t end) {
    BlockRows rows(p.L);
    for (int64_t i = begin; i < end; ++i) f(block_index(p, i), rows);
  });
}

// The scan of block k of one direction: y = sum_n C h + D u (before any gate) into the rows y; u's rows into
// rows.u; rows.delta, rows.dt and rows.dtu are scratch.
template <typename T>
void scan_block(const Prepared& p, const BlockIndex& k, bool softplus, bool reverse, float* last, float* ckpt,
                BlockRows& rows, float* y) {
  float *fu = rows.u, *fd = rows.delta, *dt = rows.dt, *dtu = rows.dtu;
  const int L = static_cast<int>(p.L), N = static_cast<int>(p.N), n = L * kRowBlock;
  load_block<T>(p.u, k.b, k.d0, k.nch, L, fu);
  if (p.rank > 0) {
    float Wb[kMaxDeltaRank * kRowBlock];
    const float* Wt = p.Wt.const_data_ptr<float>();
    for (int64_t r = 0; r < p.rank; ++r)
      for (int c = 0; c < kRowBlock; ++c) Wb[r * kRowBlock + c] = c < k.nch ? Wt[r * p.dim + k.d0 + c] : 0.0f;
    low_rank_rows(L, static_cast<int>(p.rank), p.dtl.const_data_ptr<float>() + k.b * p.L * p.rank, Wb, fd);
  } else {
    load_block<T>(p.delta, k.b, k.d0, k.nch, L, fd);
  }
  float bias_blk[kRowBlock], D_blk[kRowBlock];
  block_constants(p.bias.defined() ? p.bias.const_data_ptr<float>() : nullptr, k.d0, k.nch, bias_blk);
  block_constants(p.D.defined() ? p.D.const_data_ptr<float>() : nullptr, k.d0, k.nch, D_blk);
  prep_rows(n, fd, fu, bias_blk, softplus, dt, nullptr, dtu);
  FwdBlock a;
  a.L = L;
  a.N = N;
  a.nch = k.nch;
  a.reverse = reverse;
  a.dt = dt;
  a.dtu = dtu;
  a.A = p.A.const_data_ptr<float>() + k.d0 * N;
  a.Bt = p.Bt.const_data_ptr<float>() + k.bg * p.L * N;
  a.Ct = p.Ct.const_data_ptr<float>() + k.bg * p.L * N;
  a.y = y;
  a.last = last ? last + (k.b * p.dim + k.d0) * N : nullptr;
  a.ckpt = ckpt ? ckpt + (k.b * p.dim + k.d0) * p.nchunks * N : nullptr;
  fwd_block(a);
  add_skip_rows(n, y, fu, D_blk);
}

template <typename T>
void fwd_impl(const Prepared& p, bool softplus, bool reverse, at::Tensor& out, float* last, float* ckpt) {
  const int L = static_cast<int>(p.L);
  for_each_block(p, [&](const BlockIndex& k, BlockRows& rows) {
    scan_block<T>(p, k, softplus, reverse, last, ckpt, rows, rows.y);
    if (p.z.defined()) {
      load_block<T>(p.z, k.b, k.d0, k.nch, L, rows.z);
      gate_rows(rows.n, rows.y, nullptr, rows.z, 1.0f);
    }
    store_block<T>(rows.y, out, k.b, k.d0, k.nch, L);
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

// A direction whose delta comes low-rank: dt (batch, rank, seqlen) and the projection weight W (dim, rank),
// delta = W @ dt, formed block by block (low_rank_rows) instead of read.
void set_low_rank(Prepared& p, const at::Tensor& dt, const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2 && W.size(0) == p.dim && W.size(1) >= 1 && W.size(1) <= kMaxDeltaRank,
              "selective_scan_cpu.bi_fwd: a delta projection weight must be (dim, rank) with dim = ", p.dim,
              " and 1 <= rank <= ", kMaxDeltaRank, ", got ", W.sizes());
  p.rank = W.size(1);
  TORCH_CHECK(dt.dim() == 3 && dt.size(0) == p.batch && dt.size(1) == p.rank && dt.size(2) == p.L,
              "selective_scan_cpu.bi_fwd: with a delta projection weight, delta must be the low-rank dt (", p.batch,
              ", ", p.rank, ", ", p.L, "), got ", dt.sizes());
  TORCH_CHECK(dt.device().is_cpu() && W.device().is_cpu(), "selective_scan_cpu.bi_fwd: dt and W must be CPU tensors");
  p.dtl = dt.to(p.u.scalar_type()).to(at::kFloat).transpose(1, 2).contiguous();
  p.Wt = W.to(at::kFloat).t().contiguous();
}

// Both directions of a Vim v2 block in one pass over each block of channels, for inference (the CUDA op's
// schema): out = silu(z) * (y_f + y_b) * out_scale, y_b scanned from position L-1 down to 0. Returns
// (out, and three empty tensors: the sum and checkpoints a backward would need).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bi_fwd(
    const at::Tensor& u_f, const at::Tensor& delta_f, const at::Tensor& A_f, const at::Tensor& B_f,
    const at::Tensor& C_f, const OptTensor& D_f, const OptTensor& bias_f, const at::Tensor& u_b,
    const at::Tensor& delta_b, const at::Tensor& A_b, const at::Tensor& B_b, const at::Tensor& C_b,
    const OptTensor& D_b, const OptTensor& bias_b, const at::Tensor& z, const OptTensor& dt_proj_f,
    const OptTensor& dt_proj_b, const OptTensor& conv_weight_f, const OptTensor& conv_bias_f,
    const OptTensor& conv_weight_b, const OptTensor& conv_bias_b, bool delta_softplus, bool save_ckpt,
    double out_scale) {
  TORCH_CHECK(!save_ckpt, "selective_scan_cpu.bi_fwd is for inference (it saves nothing for a backward): "
              "training on the CPU runs each direction's scan (selective_scan_fn)");
  TORCH_CHECK(!conv_weight_f.has_value() && !conv_weight_b.has_value() && !conv_bias_f.has_value() &&
                  !conv_bias_b.has_value(),
              "selective_scan_cpu.bi_fwd: the CPU kernel takes the conv outputs as u (no fused conv)");
  TORCH_CHECK(u_b.sizes() == u_f.sizes() && u_b.scalar_type() == u_f.scalar_type(),
              "selective_scan_cpu.bi_fwd: u_f and u_b must have one shape and dtype, got ", u_f.sizes(), " ",
              u_f.scalar_type(), " and ", u_b.sizes(), " ", u_b.scalar_type());
  Prepared pf = prepare(u_f, dt_proj_f.has_value() ? at::Tensor() : delta_f, A_f, B_f, C_f, D_f, z, bias_f);
  Prepared pb = prepare(u_b, dt_proj_b.has_value() ? at::Tensor() : delta_b, A_b, B_b, C_b, D_b, std::nullopt, bias_b);
  TORCH_CHECK(pb.groups == pf.groups, "selective_scan_cpu.bi_fwd: B_f and B_b must have one number of groups, got ",
              pf.groups, " and ", pb.groups);
  if (dt_proj_f.has_value()) set_low_rank(pf, delta_f, *dt_proj_f);
  if (dt_proj_b.has_value()) set_low_rank(pb, delta_b, *dt_proj_b);
  at::Tensor out = empty_in_layout(u_f);
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_f.scalar_type(), "selective_scan_cpu_bi_fwd", [&] {
      const int L = static_cast<int>(pf.L);
      for_each_block(pf, [&](const BlockIndex& k, BlockRows& rows) {
        scan_block<scalar_t>(pf, k, delta_softplus, false, nullptr, nullptr, rows, rows.y);
        scan_block<scalar_t>(pb, k, delta_softplus, true, nullptr, nullptr, rows, rows.y2);
        load_block<scalar_t>(pf.z, k.b, k.d0, k.nch, L, rows.z);
        gate_rows(rows.n, rows.y, rows.y2, rows.z, static_cast<float>(out_scale));
        store_block<scalar_t>(rows.y, out, k.b, k.d0, k.nch, L);
      });
    });
  }
  return {out, empty0(u_f), empty0(u_f), empty0(u_f)};
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
              float bias_blk[kRowBlock];
              std::fill(bias_blk, bias_blk + kRowBlock, bias ? bias[d] : 0.0f);
              prep_rows(L, fd + c * L, uc, bias_blk, delta_softplus, dt, sig, dtu);
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
  m.def(
      "bi_fwd(Tensor u_f, Tensor delta_f, Tensor A_f, Tensor B_f, Tensor C_f, Tensor? D_f, Tensor? delta_bias_f, "
      "Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor? D_b, Tensor? delta_bias_b, "
      "Tensor z, Tensor? dt_proj_f, Tensor? dt_proj_b, Tensor? conv_weight_f, Tensor? conv_bias_f, "
      "Tensor? conv_weight_b, Tensor? conv_bias_b, bool delta_softplus, bool save_ckpt, float out_scale=1.0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_silu_pair(Tensor x, Tensor wf, Tensor? bf, Tensor wb, Tensor? bb) -> (Tensor, Tensor)");
  m.def("isa() -> str", []() -> std::string { return sscpu::isa_name(); });
}

TORCH_LIBRARY_IMPL(selective_scan_cpu, CPU, m) {
  m.impl("fwd", &sscpu::scan_fwd);
  m.impl("bwd", &sscpu::scan_bwd);
  m.impl("bi_fwd", &sscpu::bi_fwd);
  m.impl("conv_silu_pair", &sscpu::conv_silu_pair_op);
}

static struct PyModuleDef selective_scan_cpu_module = {
    PyModuleDef_HEAD_INIT, "selective_scan_cpu",
    "Fused CPU kernels of the selective scan (ops in torch.ops.selective_scan_cpu)", -1, nullptr};
PyMODINIT_FUNC PyInit_selective_scan_cpu(void) { return PyModule_Create(&selective_scan_cpu_module); }

// Causal (or anti-causal) depthwise conv1d, forward and backward.
//
// Semantics, in "logical" time s (s = position for the causal mode, s = L-1-position for the
// anti-causal mode, so the anti-causal conv is the causal conv of the flipped sequence,
// flipped back):   out[s] = act(bias + sum_k w[k] * x[s - (W-1) + k]),  x[<0] = 0.
//
// Mapping: one block per (channel d, batch split). Its warps take (batch, segment of 32*kE
// positions) tasks; lane l holds positions seg + l, seg + 32 + l, ... (coalesced loads, one per
// element), and the W-1 neighbours each output needs come from other lanes through shuffles,
// so every input element is read from memory about once. The weights of the channel stay in
// registers; the backward keeps the weight/bias gradient partial sums in registers, reduces
// them over the block once and writes one partial per (split, channel): the final sum over
// splits (done by the caller) is deterministic.
//
// Token-major inputs (channel stride 1) use their own kernels: lane = channel (coalesced), warp =
// a segment of kSegTM positions whose inputs, with the W-1 neighbours the taps reach, are all loaded
// into registers first; a block is 32 channels x kWarps segments of one batch element, and its partial
// weight/bias gradients are reduced over the warps and written once per (block, channel).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "conv_common.h"

namespace causal_conv1d {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The SiLU's sigmoid with __expf and the approximate division (a few ulp; 0 where 1 + e^-x overflows):
// IEEE division costs ~20 instructions on its slow path.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A warp task covers kSeg = 32 * kE positions of one row (lane-strided: s = seg + 32 e + lane);
// Forward: kE = 8 for rows of >= 128 positions (more loads in flight per warp), 2 for short ones
// (less padding). Backward: kE = 2 (see conv_bwd_launch_impl).

__device__ __forceinline__ int phys_pos(int s, int L, bool reverse) { return reverse ? L - 1 - s : s; }

__device__ __forceinline__ void batch_range(const ConvParams& p, int split, int& b0, int& b1) {
  const int per = (p.batch + p.splits - 1) / p.splits;
  b0 = split * per;
  b1 = min(p.batch, b0 + per);
}

template <typename T>
__device__ __forceinline__ float load_x(const T* row, int s, int L, bool reverse) {
  return (s >= 0 && s < L) ? to_float(row[phys_pos(s, L, reverse)]) : 0.f;
}

// xm[e][k] = x at logical position s_e - k (k = 0..W-1) for this lane's positions s_e = seg + 32 e + lane.
// Neighbours come from other lanes through shuffles; the W-1 positions before the segment are
// loaded by the last lanes ("prev", position seg - 32 + lane).
template <typename T, int W, int kE>
__device__ __forceinline__ void gather_left(const T* row, int seg, int L, bool reverse, int lane,
                                            const float (&xv)[kE], float (&xm)[kE][W]) {
  const float prev = (lane >= 32 - (W - 1)) ? load_x(row, seg - 32 + lane, L, reverse) : 0.f;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    xm[e][0] = xv[e];
#pragma unroll
    for (int k = 1; k < W; ++k) {
      // Lanes >= 32-k are asked (by lanes < k) for the position 32 earlier: their previous element.
      const float before = e == 0 ? prev : xv[e - 1];
      const float send = lane >= 32 - k ? before : xv[e];
      xm[e][k] = __shfl_sync(0xffffffffu, send, (lane - k) & 31);
    }
  }
}

template <typename T, int W, int kE>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(const ConvParams p) {
  const int d = blockIdx.x;
  int b0, b1;
  batch_range(p, blockIdx.y, b0, b1);
  const int L = p.seqlen;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float w[W];
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = p.weight[d * W + k];
  const float bias = p.bias != nullptr ? p.bias[d] : 0.f;
  constexpr int kSeg = 32 * kE;
  const int nseg = (L + kSeg - 1) / kSeg;
  const int tasks = (b1 - b0) * nseg;
  const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
  T* __restrict__ out = reinterpret_cast<T*>(p.out);
  for (int task = warp; task < tasks; task += kWarps) {  // warp-uniform loop
    const int b = b0 + task / nseg;
    const int seg = (task % nseg) * kSeg;
    const T* xr = x + b * p.x_batch_stride + d * p.x_dim_stride;
    T* outr = out + (int64_t(b) * p.dim + d) * L;
    float xv[kE], xm[kE][W];
#pragma unroll
    for (int e = 0; e < kE; ++e) xv[e] = load_x(xr, seg + 32 * e + lane, L, p.reverse);
    gather_left<T, W, kE>(xr, seg, L, p.reverse, lane, xv, xm);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int s = seg + 32 * e + lane;
      float acc = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) acc = fmaf(w[W - 1 - k], xm[e][k], acc);
      if (p.silu) acc *= sigmoid(acc);
      if (s < L) outr[phys_pos(s, L, p.reverse)] = from_float<T>(acc);
    }
  }
}

// go * silu'(pre)
__device__ __forceinline__ float silu_backward(float go, float pre) {
  const float sg = sigmoid(pre);
  return go * sg * (1.f + pre * (1.f - sg));
}

template <int W>
__device__ __forceinline__ float grad_pre(float go, const float* xk, const float (&w)[W], float bias, bool silu) {
  // go * act'(pre), pre = bias + sum_k w[W-1-k] * x[s-k] with xk[k] = x[s-k].
  if (!silu) return go;
  float pre = bias;
#pragma unroll
  for (int k = 0; k < W; ++k) pre = fmaf(w[W - 1 - k], xk[k], pre);
  return silu_backward(go, pre);
}

template <typename T, int W, int kE>
__global__ void __launch_bounds__(kThreads) conv_bwd_kernel(const ConvParams p) {
  const int d = blockIdx.x;
  int b0, b1;
  batch_range(p, blockIdx.y, b0, b1);
  const int L = p.seqlen;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float w[W];
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = p.weight[d * W + k];
  const float bias = p.bias != nullptr ? p.bias[d] : 0.f;
  constexpr int kSeg = 32 * kE;
  const int nseg = (L + kSeg - 1) / kSeg;
  const int tasks = (b1 - b0) * nseg;
  const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
  const T* __restrict__ dout = reinterpret_cast<const T*>(p.dout);
  T* __restrict__ dx = reinterpret_cast<T*>(p.dx);
  float dw[W], db = 0.f;
#pragma unroll
  for (int k = 0; k < W; ++k) dw[k] = 0.f;
  for (int task = warp; task < tasks; task += kWarps) {
    const int b = b0 + task / nseg;
    const int seg = (task % nseg) * kSeg;
    const T* xr = x + b * p.x_batch_stride + d * p.x_dim_stride;
    const int64_t row = (int64_t(b) * p.dim + d) * L;
    const T* dr = dout + row;
    float xv[kE], xm[kE][W], g[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) xv[e] = load_x(xr, seg + 32 * e + lane, L, p.reverse);
    gather_left<T, W, kE>(xr, seg, L, p.reverse, lane, xv, xm);
#pragma unroll
    for (int e = 0; e < kE; ++e) g[e] = grad_pre<W>(load_x(dr, seg + 32 * e + lane, L, p.reverse), xm[e], w, bias, p.silu);
    // g at the W-1 positions after the segment, computed directly by lanes 0..W-2.
    float gnext = 0.f;
    if (lane < W - 1) {
      const int s = seg + kSeg + lane;
      float xk[W];
#pragma unroll
      for (int k = 0; k < W; ++k) xk[k] = load_x(xr, s - k, L, p.reverse);
      gnext = grad_pre<W>(load_x(dr, s, L, p.reverse), xk, w, bias, p.silu);
    }
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int s = seg + 32 * e + lane;
      // dx[s] = sum_k w[W-1-k] g[s+k]; g[s+k] lives in lane (lane+k)&31, element e or e+1.
      float acc = w[W - 1] * g[e];
#pragma unroll
      for (int k = 1; k < W; ++k) {
        const float after = e + 1 < kE ? g[e + 1 < kE ? e + 1 : e] : gnext;
        const float send = lane < k ? after : g[e];
        acc = fmaf(w[W - 1 - k], __shfl_sync(0xffffffffu, send, (lane + k) & 31), acc);
      }
      if (s < L) dx[row + phys_pos(s, L, p.reverse)] = from_float<T>(acc);
      // g is 0 past the end, so these need no bound check.
      db += g[e];
#pragma unroll
      for (int k = 0; k < W; ++k) dw[W - 1 - k] = fmaf(g[e], xm[e][k], dw[W - 1 - k]);
    }
  }
  // Block reduction of the W + 1 partial sums.
  __shared__ float red[kWarps][W + 1];
#pragma unroll
  for (int k = 0; k <= W; ++k) {
    float v = k < W ? dw[k] : db;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) red[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x <= W) {
    float v = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) v += red[i][threadIdx.x];
    p.dw_partial[(int64_t(blockIdx.y) * p.dim + d) * (W + 1) + threadIdx.x] = v;
  }
}

// ------------------------------------------------------------------------------------------
// Token-major layout
// ------------------------------------------------------------------------------------------
// A warp walks its segment's positions through pointers that step by one signed stride (negative
// when reverse), so each load or store is one address add. Only segments within W-1 positions of
// either end check bounds (kEdge); elsewhere every position is valid and nothing is predicated.
constexpr int kSegTM = 16;  // positions per warp
static_assert(kWarps * kSegTM == kTokenMajorBlockPositions, "host and kernels must agree on the grid");

struct TokenMajorGeo {
  int b, d, seg;
  bool active;
};

__device__ __forceinline__ TokenMajorGeo token_major_geo(const ConvParams& p) {
  TokenMajorGeo g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  g.b = blockIdx.z;
  g.d = blockIdx.x * 32 + lane;
  g.seg = (blockIdx.y * kWarps + warp) * kSegTM;
  g.active = g.d < p.dim && g.seg < p.seqlen;
  return g;
}

// Channel d of row b at the segment's first logical position, and the signed step to the next one.
template <typename T>
struct SegmentPtr {
  T* at;
  int64_t step;
};

template <typename T>
__device__ __forceinline__ SegmentPtr<T> segment_ptr(T* row, int64_t seq_stride, int seg, int L, bool reverse) {
  return {row + int64_t(phys_pos(seg, L, reverse)) * seq_stride, reverse ? -seq_stride : seq_stride};
}

// Channel d's weights into w; returns its bias (0 without one).
template <int W>
__device__ __forceinline__ float channel_weights(const ConvParams& p, int d, float (&w)[W]) {
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = p.weight[d * W + k];
  return p.bias != nullptr ? p.bias[d] : 0.f;
}

// Element i of a segment that starts at logical position s0: 0 outside [0, L) (checked with kEdge only).
template <bool kEdge, typename T>
__device__ __forceinline__ float load_seq(SegmentPtr<const T> p, int i, int s0, int L) {
  return (!kEdge || (s0 + i >= 0 && s0 + i < L)) ? to_float(p.at[i * p.step]) : 0.f;
}

template <typename T, int W, bool kEdge, bool kSilu>
__device__ __forceinline__ void conv_fwd_tm_segment(SegmentPtr<const T> x, SegmentPtr<T> out, int seg, int L,
                                                    const float (&w)[W], float bias) {
  // All inputs are loaded before any output is formed: xs[i] = x[seg - (W-1) + i].
  float xs[kSegTM + W - 1];
#pragma unroll
  for (int i = 0; i < kSegTM + W - 1; ++i) xs[i] = load_seq<kEdge>(x, i - (W - 1), seg, L);
#pragma unroll
  for (int i = 0; i < kSegTM; ++i) {
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) acc = fmaf(w[k], xs[i + k], acc);
    if (kSilu) acc *= sigmoid(acc);
    if (!kEdge || seg + i < L) out.at[i * out.step] = from_float<T>(acc);
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) conv_fwd_tm_kernel(const ConvParams p) {
  const TokenMajorGeo g = token_major_geo(p);
  if (!g.active) return;
  const int L = p.seqlen;
  float w[W];
  const float bias = channel_weights(p, g.d, w);
  const T* xrow = reinterpret_cast<const T*>(p.x) + g.b * p.x_batch_stride + g.d;
  T* orow = reinterpret_cast<T*>(p.out) + int64_t(g.b) * L * p.dim + g.d;
  const SegmentPtr<const T> x = segment_ptr(xrow, p.x_seq_stride, g.seg, L, p.reverse);
  const SegmentPtr<T> out = segment_ptr(orow, int64_t(p.dim), g.seg, L, p.reverse);
  const bool edge = g.seg < W - 1 || g.seg + kSegTM > L;
  if (edge) {
    p.silu ? conv_fwd_tm_segment<T, W, true, true>(x, out, g.seg, L, w, bias)
           : conv_fwd_tm_segment<T, W, true, false>(x, out, g.seg, L, w, bias);
  } else {
    p.silu ? conv_fwd_tm_segment<T, W, false, true>(x, out, g.seg, L, w, bias)
           : conv_fwd_tm_segment<T, W, false, false>(x, out, g.seg, L, w, bias);
  }
}

// dx at the segment's positions needs g[t] = dout[t] * act'(pre[t]) for t = seg .. seg + kSegTM + W - 2,
// and each g[t] needs x[t-W+1 .. t]: xs[i] = x[seg - (W-1) + i], gs[i] = dout[seg + i], then g[seg + i]
// (0 past L, where dout reads as 0). All loads are issued first.
template <typename T, int W, bool kEdge, bool kSilu>
__device__ __forceinline__ void conv_bwd_tm_segment(SegmentPtr<const T> x, SegmentPtr<const T> dout, SegmentPtr<T> dx,
                                                    int seg, int L, const float (&w)[W], float bias, float (&dw)[W],
                                                    float& db) {
  constexpr int kG = kSegTM + W - 1;
  float xs[kG + W - 1], gs[kG];
#pragma unroll
  for (int i = 0; i < kG + W - 1; ++i) xs[i] = load_seq<kEdge>(x, i - (W - 1), seg, L);
#pragma unroll
  for (int i = 0; i < kG; ++i) gs[i] = load_seq<kEdge>(dout, i, seg, L);
#pragma unroll
  for (int i = 0; i < kG; ++i) {
    if (kSilu) {
      float pre = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) pre = fmaf(w[k], xs[i + k], pre);
      gs[i] = silu_backward(gs[i], pre);
    }
  }
#pragma unroll
  for (int i = 0; i < kSegTM; ++i) {  // positions past L have g = 0: no check needed
    db += gs[i];
#pragma unroll
    for (int k = 0; k < W; ++k) dw[k] = fmaf(gs[i], xs[i + k], dw[k]);
  }
#pragma unroll
  for (int i = 0; i < kSegTM; ++i) {  // dx[seg + i] = sum_k w[k] g[seg + i + (W-1) - k]
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < W; ++k) acc = fmaf(w[k], gs[i + W - 1 - k], acc);
    if (!kEdge || seg + i < L) dx.at[i * dx.step] = from_float<T>(acc);
  }
}

// Sums the warps' weight/bias gradient partials of each channel (lane) through `red` and writes one
// partial per (block, channel) to p.dw_partial. Called by every thread of the block.
template <int W>
__device__ __forceinline__ void write_block_partials(const ConvParams& p, int d, const float (&dw)[W], float db,
                                                     float (&red)[kWarps][W + 1][32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k <= W; ++k) red[warp][k][lane] = k < W ? dw[k] : db;
  __syncthreads();
  if (warp == 0 && d < p.dim) {
    const int split = blockIdx.z * gridDim.y + blockIdx.y;
#pragma unroll
    for (int k = 0; k <= W; ++k) {
      float v = 0.f;
#pragma unroll
      for (int i = 0; i < kWarps; ++i) v += red[i][k][lane];
      p.dw_partial[(int64_t(split) * p.dim + d) * (W + 1) + k] = v;
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) conv_bwd_tm_kernel(const ConvParams p) {
  const TokenMajorGeo g = token_major_geo(p);
  const int L = p.seqlen;
  float dw[W], db = 0.f;
#pragma unroll
  for (int k = 0; k < W; ++k) dw[k] = 0.f;
  if (g.active) {
    float w[W];
    const float bias = channel_weights(p, g.d, w);
    const int64_t row = int64_t(g.b) * L * p.dim + g.d;  // dout and dx: (batch, seqlen, dim) contiguous
    const T* xrow = reinterpret_cast<const T*>(p.x) + g.b * p.x_batch_stride + g.d;
    const SegmentPtr<const T> x = segment_ptr(xrow, p.x_seq_stride, g.seg, L, p.reverse);
    const SegmentPtr<const T> dout = segment_ptr(reinterpret_cast<const T*>(p.dout) + row, int64_t(p.dim), g.seg, L,
                                                 p.reverse);
    const SegmentPtr<T> dx = segment_ptr(reinterpret_cast<T*>(p.dx) + row, int64_t(p.dim), g.seg, L, p.reverse);
    const bool edge = g.seg < W - 1 || g.seg + kSegTM + W - 1 > L;
    if (edge) {
      p.silu ? conv_bwd_tm_segment<T, W, true, true>(x, dout, dx, g.seg, L, w, bias, dw, db)
             : conv_bwd_tm_segment<T, W, true, false>(x, dout, dx, g.seg, L, w, bias, dw, db);
    } else {
      p.silu ? conv_bwd_tm_segment<T, W, false, true>(x, dout, dx, g.seg, L, w, bias, dw, db)
             : conv_bwd_tm_segment<T, W, false, false>(x, dout, dx, g.seg, L, w, bias, dw, db);
    }
  }
  __shared__ float red[kWarps][W + 1][32];
  write_block_partials(p, g.d, dw, db, red);
}

// ------------------------------------------------------------------------------------------
// Both convs of a Vim block over one token-major x, each with its own weights: the causal conv (f)
// and the anti-causal conv (b). One pass over x gives both outputs, and the backward sums both
// directions' terms of dx in registers, so x is read once and dx written once (no separate add).
// f and b share x, dx, silu and the grid; each has its weight, bias, out / dout and dw_partial.
// Positions are walked forward for both: xs[j] = x[seg - (W-1) + j] covers the W-1 positions on
// either side of the segment, which b's taps x[t .. t+W-1] reach.
// ------------------------------------------------------------------------------------------
template <typename T, int W, bool kEdge, bool kSilu>
__device__ __forceinline__ void conv_bi_fwd_tm_segment(SegmentPtr<const T> x, SegmentPtr<T> out_f, SegmentPtr<T> out_b,
                                                       int seg, int L, const float (&wf)[W], float bf,
                                                       const float (&wb)[W], float bb) {
  float xs[kSegTM + 2 * (W - 1)];
#pragma unroll
  for (int j = 0; j < kSegTM + 2 * (W - 1); ++j) xs[j] = load_seq<kEdge>(x, j - (W - 1), seg, L);
#pragma unroll
  for (int i = 0; i < kSegTM; ++i) {  // t = seg + i: f reads x[t-(W-1)+k], b reads x[t+(W-1)-k]
    float af = bf, ab = bb;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      af = fmaf(wf[k], xs[i + k], af);
      ab = fmaf(wb[k], xs[i + 2 * (W - 1) - k], ab);
    }
    if (kSilu) {
      af *= sigmoid(af);
      ab *= sigmoid(ab);
    }
    if (!kEdge || seg + i < L) {
      out_f.at[i * out_f.step] = from_float<T>(af);
      out_b.at[i * out_b.step] = from_float<T>(ab);
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) conv_bi_fwd_tm_kernel(const ConvParams f, const ConvParams b) {
  const TokenMajorGeo g = token_major_geo(f);
  if (!g.active) return;
  const int L = f.seqlen;
  float wf[W], wb[W];
  const float bf = channel_weights(f, g.d, wf), bb = channel_weights(b, g.d, wb);
  const int64_t row = int64_t(g.b) * L * f.dim + g.d;  // outputs: (batch, seqlen, dim) contiguous
  const SegmentPtr<const T> x = segment_ptr(reinterpret_cast<const T*>(f.x) + g.b * f.x_batch_stride + g.d,
                                            f.x_seq_stride, g.seg, L, false);
  const SegmentPtr<T> out_f = segment_ptr(reinterpret_cast<T*>(f.out) + row, int64_t(f.dim), g.seg, L, false);
  const SegmentPtr<T> out_b = segment_ptr(reinterpret_cast<T*>(b.out) + row, int64_t(f.dim), g.seg, L, false);
  const bool edge = g.seg < W - 1 || g.seg + kSegTM + W - 1 > L;
  if (edge) {
    f.silu ? conv_bi_fwd_tm_segment<T, W, true, true>(x, out_f, out_b, g.seg, L, wf, bf, wb, bb)
           : conv_bi_fwd_tm_segment<T, W, true, false>(x, out_f, out_b, g.seg, L, wf, bf, wb, bb);
  } else {
    f.silu ? conv_bi_fwd_tm_segment<T, W, false, true>(x, out_f, out_b, g.seg, L, wf, bf, wb, bb)
           : conv_bi_fwd_tm_segment<T, W, false, false>(x, out_f, out_b, g.seg, L, wf, bf, wb, bb);
  }
}

// dx[t] = sum_k wf[k] g_f[t+(W-1)-k] + sum_k wb[k] g_b[t-(W-1)+k] for t in the segment, with
// gf[i] = g_f[seg + i] and gb[i] = g_b[seg - (W-1) + i], i < kSegTM + W - 1 (0 outside [0, L)).
template <typename T, int W, bool kEdge, bool kSilu>
__device__ __forceinline__ void conv_bi_bwd_tm_segment(SegmentPtr<const T> x, SegmentPtr<const T> dout_f,
                                                       SegmentPtr<const T> dout_b, SegmentPtr<T> dx, int seg, int L,
                                                       const float (&wf)[W], float bf, const float (&wb)[W], float bb,
                                                       float (&dwf)[W], float& dbf, float (&dwb)[W], float& dbb) {
  constexpr int kG = kSegTM + W - 1;
  float xs[kSegTM + 2 * (W - 1)], gf[kG], gb[kG];
#pragma unroll
  for (int j = 0; j < kSegTM + 2 * (W - 1); ++j) xs[j] = load_seq<kEdge>(x, j - (W - 1), seg, L);
#pragma unroll
  for (int i = 0; i < kG; ++i) {
    gf[i] = load_seq<kEdge>(dout_f, i, seg, L);
    gb[i] = load_seq<kEdge>(dout_b, i - (W - 1), seg, L);
  }
  if (kSilu) {
#pragma unroll
    for (int i = 0; i < kG; ++i) {  // gf[i] at t = seg + i reads xs[i + k]; gb[i] at t = seg - (W-1) + i, xs[i + (W-1) - k]
      float pf = bf, pb = bb;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        pf = fmaf(wf[k], xs[i + k], pf);
        pb = fmaf(wb[k], xs[i + (W - 1) - k], pb);
      }
      gf[i] = silu_backward(gf[i], pf);
      gb[i] = silu_backward(gb[i], pb);
    }
  }
#pragma unroll
  for (int i = 0; i < kSegTM; ++i) {  // t = seg + i; g is 0 past L
    dbf += gf[i];
    dbb += gb[i + W - 1];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      dwf[k] = fmaf(gf[i], xs[i + k], dwf[k]);
      dwb[k] = fmaf(gb[i + W - 1], xs[i + 2 * (W - 1) - k], dwb[k]);
    }
  }
#pragma unroll
  for (int i = 0; i < kSegTM; ++i) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      acc = fmaf(wf[k], gf[i + W - 1 - k], acc);
      acc = fmaf(wb[k], gb[i + k], acc);
    }
    if (!kEdge || seg + i < L) dx.at[i * dx.step] = from_float<T>(acc);
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) conv_bi_bwd_tm_kernel(const ConvParams f, const ConvParams b) {
  const TokenMajorGeo g = token_major_geo(f);
  const int L = f.seqlen;
  float dwf[W], dwb[W], dbf = 0.f, dbb = 0.f;
#pragma unroll
  for (int k = 0; k < W; ++k) dwf[k] = dwb[k] = 0.f;
  if (g.active) {
    float wf[W], wb[W];
    const float bf = channel_weights(f, g.d, wf), bb = channel_weights(b, g.d, wb);
    const int64_t row = int64_t(g.b) * L * f.dim + g.d;  // douts and dx: (batch, seqlen, dim) contiguous
    const int64_t step = f.dim;
    const SegmentPtr<const T> x = segment_ptr(reinterpret_cast<const T*>(f.x) + g.b * f.x_batch_stride + g.d,
                                              f.x_seq_stride, g.seg, L, false);
    const SegmentPtr<const T> dout_f = segment_ptr(reinterpret_cast<const T*>(f.dout) + row, step, g.seg, L, false);
    const SegmentPtr<const T> dout_b = segment_ptr(reinterpret_cast<const T*>(b.dout) + row, step, g.seg, L, false);
    const SegmentPtr<T> dx = segment_ptr(reinterpret_cast<T*>(f.dx) + row, step, g.seg, L, false);
    const bool edge = g.seg < W - 1 || g.seg + kSegTM + W - 1 > L;
    if (edge) {
      f.silu ? conv_bi_bwd_tm_segment<T, W, true, true>(x, dout_f, dout_b, dx, g.seg, L, wf, bf, wb, bb, dwf, dbf, dwb, dbb)
             : conv_bi_bwd_tm_segment<T, W, true, false>(x, dout_f, dout_b, dx, g.seg, L, wf, bf, wb, bb, dwf, dbf, dwb, dbb);
    } else {
      f.silu ? conv_bi_bwd_tm_segment<T, W, false, true>(x, dout_f, dout_b, dx, g.seg, L, wf, bf, wb, bb, dwf, dbf, dwb, dbb)
             : conv_bi_bwd_tm_segment<T, W, false, false>(x, dout_f, dout_b, dx, g.seg, L, wf, bf, wb, bb, dwf, dbf, dwb, dbb);
    }
  }
  __shared__ float red[kWarps][W + 1][32];
  write_block_partials(f, g.d, dwf, dbf, red);
  __syncthreads();  // red is reused
  write_block_partials(b, g.d, dwb, dbb, red);
}

inline dim3 token_major_grid(const ConvParams& p) {
  constexpr int per_block = kTokenMajorBlockPositions;
  return dim3((p.dim + 31) / 32, (p.seqlen + per_block - 1) / per_block, p.batch);
}

template <typename T>
cudaError_t conv_tm_launch(const ConvParams& p, bool backward, cudaStream_t stream) {
  const dim3 grid = token_major_grid(p);
  switch (p.width) {
    case 2: backward ? conv_bwd_tm_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p)
                     : conv_fwd_tm_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: backward ? conv_bwd_tm_kernel<T, 3><<<grid, kThreads, 0, stream>>>(p)
                     : conv_fwd_tm_kernel<T, 3><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: backward ? conv_bwd_tm_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p)
                     : conv_fwd_tm_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t conv_bi_tm_launch(const ConvParams& f, const ConvParams& b, bool backward, cudaStream_t stream) {
  const dim3 grid = token_major_grid(f);
  switch (f.width) {
    case 2: backward ? conv_bi_bwd_tm_kernel<T, 2><<<grid, kThreads, 0, stream>>>(f, b)
                     : conv_bi_fwd_tm_kernel<T, 2><<<grid, kThreads, 0, stream>>>(f, b); break;
    case 3: backward ? conv_bi_bwd_tm_kernel<T, 3><<<grid, kThreads, 0, stream>>>(f, b)
                     : conv_bi_fwd_tm_kernel<T, 3><<<grid, kThreads, 0, stream>>>(f, b); break;
    case 4: backward ? conv_bi_bwd_tm_kernel<T, 4><<<grid, kThreads, 0, stream>>>(f, b)
                     : conv_bi_fwd_tm_kernel<T, 4><<<grid, kThreads, 0, stream>>>(f, b); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T, int kE>
cudaError_t conv_fwd_launch_e(const ConvParams& p, cudaStream_t stream) {
  dim3 grid(p.dim, p.splits);
  switch (p.width) {
    case 2: conv_fwd_kernel<T, 2, kE><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: conv_fwd_kernel<T, 3, kE><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: conv_fwd_kernel<T, 4, kE><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t conv_fwd_launch_impl(const ConvParams& p, cudaStream_t stream) {
  if (p.token_major) return conv_tm_launch<T>(p, false, stream);
  return p.seqlen >= 128 ? conv_fwd_launch_e<T, 8>(p, stream) : conv_fwd_launch_e<T, 2>(p, stream);
}

template <typename T, int kE>
cudaError_t conv_bwd_launch_e(const ConvParams& p, cudaStream_t stream) {
  dim3 grid(p.dim, p.splits);
  switch (p.width) {
    case 2: conv_bwd_kernel<T, 2, kE><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: conv_bwd_kernel<T, 3, kE><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: conv_bwd_kernel<T, 4, kE><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// The backward keeps kE = 2 for every length: kE = 8 was slower, most at long sequences; its register use
// halves the resident warps.
template <typename T>
cudaError_t conv_bwd_launch_impl(const ConvParams& p, cudaStream_t stream) {
  if (p.token_major) return conv_tm_launch<T>(p, true, stream);
  return conv_bwd_launch_e<T, 2>(p, stream);
}

}  // namespace causal_conv1d

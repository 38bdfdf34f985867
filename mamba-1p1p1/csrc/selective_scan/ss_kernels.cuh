// Selective scan, forward and backward.
//
// Per channel d and state n, in "logical" time s (s = position, or L-1-position when reverse):
//   dt_s = softplus(delta_s + bias_d) (or without softplus),  a_s = exp(dt_s * A[d,n]),
//   h_s = a_s * h_{s-1} + dt_s * B_s[n] * u_s,  y_s = sum_n C_s[n] h_s[n] + D_d u_s,
//   out_s = y_s * silu(z_s).
//
// Forward mapping. A block is one warp and owns 32 channels of one batch element (and one group, so
// B and C are shared by all of them); each lane runs one channel with all of its 16 states in
// registers: 16 independent chains per lane, B and C read from shared memory as broadcasts, no
// barriers and no shuffles. Element-wise stages hold a segment in registers, one position per array slot
// (the scan loop reads its dt and u from shared memory, a position per iteration): in the token-major
// layout (channel stride 1, as linear layers produce it) each load instruction reads one position of the
// 32 channels, contiguous; the channel-major layout goes through a transposing tile.
//
// Backward without O(L*N) storage: the forward saves the state before every chunk of kChunk
// positions (1/2 float per element at N = 16). The backward (mapping described in its section) walks
// the chunks in reverse; per chunk it recomputes the states at the start of each 8-position
// sub-chunk (phase A), then per sub-chunk, last first, recomputes its 8 states and decays into
// registers and runs the reverse recurrence g_s = dy_s C_s + a_{s+1} g_{s+1} over them (phase B).
// dB and dC (shared by all channels) are reduced over the block's channels in shared memory and
// added to global fp32 buffers with one atomic per (block, position, state).
#pragma once
#include <algorithm>
#include <type_traits>

#include "../common/dtype_convert.cuh"
#include "../common/fast_math.cuh"
#include "ss_common.h"

namespace ssm {

template <typename T>
constexpr bool kIsHalf = !std::is_same_v<T, float>;  // bf16 / fp16 inputs

constexpr int kCh = 32;           // channels per block (both mappings)
constexpr int kN = kMaxState;     // states per channel
constexpr int kFwdThreads = kCh;  // forward: one warp, one channel per lane
constexpr int kSeg = 16;          // forward: positions held in registers at a time
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kChunk % kSeg == 0 && kN == 16, "tile sizes");

// softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1]; also returns the sigmoid (softplus'
// derivative) from the same exp. The forward and the backward's recomputation use this same function.
// fp32 inputs: log1p(e) = 2 atanh(w), w = e / (2 + e) in (0, 1/3], by an odd series in w whose first
// omitted term is below 2e-8 relative (about half the instructions of log1pf(expf(x))).
// bf16/fp16 inputs (kHalf): log2(1 + e) by the hardware approximation, ~1e-7 absolute, far below what
// the inputs' own rounding moves x by (2^-9 of |x|), in 6 instructions instead of ~20.
template <bool kHalf>
__device__ __forceinline__ float softplus(float x, float& sig) {
  if constexpr (kHalf) {
    const float e = ex2(-fabsf(x) * kLog2e), one_plus_e = 1.f + e;
    sig = __fdividef(x >= 0.f ? 1.f : e, one_plus_e);
    return fmaf(lg2(one_plus_e), 0.6931471805599453f, fmaxf(x, 0.f));
  }
  const float e = expf(-fabsf(x));
  const float w = __fdividef(e, 2.f + e), w2 = w * w;
  float series = 1.f / 13.f;
  series = fmaf(series, w2, 1.f / 11.f);
  series = fmaf(series, w2, 1.f / 9.f);
  series = fmaf(series, w2, 1.f / 7.f);
  series = fmaf(series, w2, 1.f / 5.f);
  series = fmaf(series, w2, 1.f / 3.f);
  series = fmaf(series, w2, 1.f);
  sig = __fdividef(x >= 0.f ? 1.f : e, 1.f + e);
  return fmaxf(x, 0.f) + 2.f * w * series;
}

// Asks L2 for the line holding `at` (no registers, no wait).
__device__ __forceinline__ void prefetch_l2(const void* at) { asm volatile("prefetch.global.L2 [%0];" ::"l"(at)); }

// The lines of a row of `count` elements `stride` apart: those of its first and last element (a row of the
// model's tensors spans at most two 128-byte lines).
template <typename T>
__device__ __forceinline__ void prefetch_row(const T* first, int count, int64_t stride) {
  prefetch_l2(first);
  prefetch_l2(first + (count - 1) * stride);
}

__device__ __forceinline__ void unpack(float4 v, float* r) {
  r[0] = v.x;
  r[1] = v.y;
  r[2] = v.z;
  r[3] = v.w;
}

struct BlockGeo {
  int b, g, d0, nch;  // batch, group, first channel, valid channels (<= kCh)
};

__device__ __forceinline__ BlockGeo block_geo(const ScanParams& p) {
  const int dg = p.dim / p.ngroups;
  const int nblk = (dg + kCh - 1) / kCh;
  BlockGeo geo;
  geo.b = blockIdx.y;
  geo.g = blockIdx.x / nblk;
  const int cb = blockIdx.x % nblk;
  geo.d0 = geo.g * dg + cb * kCh;
  geo.nch = min(kCh, dg - cb * kCh);
  return geo;
}

__device__ __forceinline__ int phys(const ScanParams& p, int s) { return p.reverse ? p.seqlen - 1 - s : s; }

// Floats of the transposing tile that load_rows / store_rows use for kLen positions (channel-major only).
__host__ __device__ constexpr int tile_floats(int len) { return kCh * (len + 1); }

// This lane's channel of a (kCh x kLen) tile of a (batch, dim, seqlen) tensor (pointer at its batch)
// at logical positions s0 .. s0+kLen-1: v[j]. Past `len` and for channels past geo.nch the values are
// zero (channel-major) or repeats of valid ones (token-major): callers must not let them matter.
// Token-major (channel stride 1): one load instruction per position reads the 32 channels. Channel-major
// (position stride 1): lanes read along positions into `tile`, which hands each lane its row.
template <bool kTM, int kLen, typename T>
__device__ __forceinline__ void load_rows(const ScanParams& p, const T* base, int64_t dim_stride, int64_t seq_stride,
                                          const BlockGeo& geo, int s0, int len, float (&v)[kLen], float* tile) {
  const int lane = threadIdx.x;
  if constexpr (kTM) {
    // Addresses one signed position stride apart (no per-position index arithmetic). Padding lanes read
    // their block's last channel and padding positions the segment's last one, so every load is in
    // bounds and unpredicated; callers give padding dt = 0 (make_dt) and never store it.
    const T* at = base + geo.d0 + min(lane, geo.nch - 1) + int64_t(phys(p, s0)) * seq_stride;
    const int64_t step = p.reverse ? -seq_stride : seq_stride;
    if (len == kLen) {
#pragma unroll
      for (int j = 0; j < kLen; ++j, at += step) v[j] = to_float(*at);
    } else {
#pragma unroll
      for (int j = 0; j < kLen; ++j) v[j] = to_float(at[min(j, len - 1) * step]);
    }
  } else {
    constexpr int kRows = kCh / kLen;  // tile rows read per step
    const int j = lane % kLen, r0 = lane / kLen;
#pragma unroll
    for (int i = 0; i < kLen; ++i) {
      const int r = i * kRows + r0;
      tile[r * (kLen + 1) + j] =
          (r < geo.nch && j < len) ? to_float(base[int64_t(geo.d0 + r) * dim_stride + phys(p, s0 + j)]) : 0.f;
    }
    __syncwarp();
#pragma unroll
    for (int jj = 0; jj < kLen; ++jj) v[jj] = tile[lane * (kLen + 1) + jj];
    __syncwarp();
  }
}

// load_rows for a buffer in the output layout (y_acc_in): (batch, seqlen, dim) contiguous when
// token-major, else (batch, dim, seqlen) contiguous.
template <bool kTM, int kLen, typename T>
__device__ __forceinline__ void load_out_rows(const ScanParams& p, const T* t, const BlockGeo& geo, int s0, int len,
                                              float (&v)[kLen], float* tile) {
  const T* base = t + int64_t(geo.b) * p.dim * p.seqlen;
  load_rows<kTM, kLen>(p, base, int64_t(p.seqlen), int64_t(p.dim), geo, s0, len, v, tile);
}

// Writes v (this lane's channel, logical positions s0 ..) into an output-layout tensor; the inverse of
// load_out_rows, skipping positions past `len` and channels past geo.nch.
template <bool kTM, int kLen, typename T>
__device__ __forceinline__ void store_rows(const ScanParams& p, T* t, const BlockGeo& geo, int s0, int len,
                                           const float (&v)[kLen], float* tile) {
  const int lane = threadIdx.x;
  T* base = t + int64_t(geo.b) * p.dim * p.seqlen;
  if constexpr (kTM) {
    if (lane < geo.nch) {
      T* at = base + geo.d0 + lane + int64_t(phys(p, s0)) * p.dim;
      const int64_t step = p.reverse ? -int64_t(p.dim) : int64_t(p.dim);
#pragma unroll
      for (int j = 0; j < kLen; ++j, at += step)
        if (j < len) *at = from_float<T>(v[j]);
    }
  } else {
#pragma unroll
    for (int jj = 0; jj < kLen; ++jj) tile[lane * (kLen + 1) + jj] = v[jj];
    __syncwarp();
    constexpr int kRows = kCh / kLen;
    const int j = lane % kLen, r0 = lane / kLen;
#pragma unroll
    for (int i = 0; i < kLen; ++i) {
      const int r = i * kRows + r0;
      if (r < geo.nch && j < len)
        base[int64_t(geo.d0 + r) * p.seqlen + phys(p, s0 + j)] = from_float<T>(tile[r * (kLen + 1) + j]);
    }
    __syncwarp();
  }
}

// A thread's share of B and C at kLen logical positions, all states, for a block of kThreads: fetch()
// issues the global loads into registers, store() writes them to shared memory later, so that a kernel can
// put other work between the two (the forward fetches with its other loads of a segment).
template <typename T, int kThreads, int kLen>
struct BcTile {
  static constexpr int kPer = kLen * kN / kThreads;
  static_assert(kPer * kThreads == kLen * kN && kThreads % kN == 0 && kThreads % kLen == 0, "B/C tile split");
  float b[kPer], c[kPer];

  // This thread's elements; lanes run along the states when B's state stride is 1 (the model's x_proj
  // output), else along the positions.
  __device__ __forceinline__ static void first(const ScanParams& p, int& n0, int& j0, int& dn, int& dj) {
    const bool state_fast = p.B_state_stride == 1;
    const int t = threadIdx.x;
    n0 = state_fast ? t % kN : t / kLen;
    j0 = state_fast ? t / kN : t % kLen;
    dn = state_fast ? 0 : kThreads / kLen;
    dj = state_fast ? kThreads / kN : 0;
  }
  // Global loads of logical positions s0 .. s0+kLen-1 (zero past len and for n >= dstate), one fixed step
  // apart, without index arithmetic.
  __device__ __forceinline__ void fetch(const ScanParams& p, const BlockGeo& geo, int s0, int len) {
    int n0, j0, dn, dj;
    first(p, n0, j0, dn, dj);
    const int64_t dir = p.reverse ? -1 : 1;
    const int64_t pos0 = phys(p, s0 + j0);
    const T* Bq = reinterpret_cast<const T*>(p.B) + geo.b * p.B_batch_stride + geo.g * p.B_group_stride +
                  n0 * p.B_state_stride + pos0 * p.B_seq_stride;
    const T* Cq = reinterpret_cast<const T*>(p.C) + geo.b * p.C_batch_stride + geo.g * p.C_group_stride +
                  n0 * p.C_state_stride + pos0 * p.C_seq_stride;
    const int64_t B_step = dn * p.B_state_stride + dj * dir * p.B_seq_stride;
    const int64_t C_step = dn * p.C_state_stride + dj * dir * p.C_seq_stride;
    if (len == kLen && p.dstate == kN) {
      // A full segment (all but the last) needs no bounds: unpredicated loads. The guarded ones below
      // compile to a branch around each load.
#pragma unroll
      for (int i = 0; i < kPer; ++i, Bq += B_step, Cq += C_step) {
        b[i] = to_float(*Bq);
        c[i] = to_float(*Cq);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i, Bq += B_step, Cq += C_step) {
      const int n = n0 + i * dn, j = j0 + i * dj;
      b[i] = c[i] = 0.f;
      if (n < p.dstate && j < len) {
        b[i] = to_float(*Bq);
        c[i] = to_float(*Cq);
      }
    }
  }
  // Into shared-memory rows [position][kN].
  __device__ __forceinline__ void store(const ScanParams& p, float* B_rows, float* C_rows) const {
    int n0, j0, dn, dj;
    first(p, n0, j0, dn, dj);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int at = (j0 + i * dj) * kN + n0 + i * dn;
      B_rows[at] = b[i];
      C_rows[at] = c[i];
    }
  }
};

// B and C of logical positions s0 .. s0+kLen-1, all states, into shared-memory rows [position][kN] by a
// block of kThreads; zero past len and for n >= dstate. All loads are issued before the stores.
template <typename T, int kThreads, int kLen>
__device__ __forceinline__ void load_bc_tile(const ScanParams& p, const BlockGeo& geo, int s0, int len, float* B_rows,
                                             float* C_rows) {
  BcTile<T, kThreads, kLen> tile;
  tile.fetch(p, geo, s0, len);
  tile.store(p, B_rows, C_rows);
}

// dt from the raw delta (+ bias), zero where the lane or position is padding (so a = 1 and the state
// is unchanged there).
template <typename T, int kLen>
__device__ __forceinline__ void make_dt(const ScanParams& p, float bias, bool ok, int len, float (&dv)[kLen]) {
#pragma unroll
  for (int j = 0; j < kLen; ++j) {
    const float x = dv[j] + bias;
    float sig;
    const float sp = softplus<kIsHalf<T>>(x, sig);  // unconditionally: a branch per element costs more than it saves
    dv[j] = (ok && j < len) ? (p.delta_softplus ? sp : x) : 0.f;
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
// Fused delta projection (p.dt_low set): delta[d, t] = sum_k dt_proj[d, k] dt_low[k, t], formed from the
// block's rows of dt_proj (rank x kCh in dynamic shared memory, loaded once per direction) and the
// segment's dt_low (rank x kSeg, broadcast float4 reads), so the (batch, dim, seqlen) delta never exists.
__host__ __device__ constexpr int delta_proj_smem_floats(int rank) { return rank * (kCh + kSeg); }

struct FwdSmem {
  __align__(16) float B[kSeg * kN];
  __align__(16) float C[kSeg * kN];
  float tile[tile_floats(kSeg)];
  // The segment's dt and u by [position][lane], for the scan loop (u becomes y there).
  float dt[kSeg * kCh];
  float u[kSeg * kCh];
};

// The segment's dt_low (rank x kSeg) for the fused delta projection, into shared memory [rank][kSeg].
// Lanes run along the segment's positions and two ranks: lane = (k % 2) * kSeg + j; a lane's loads are
// one fixed step (2 ranks) apart. The first 16 ranks (all of Vim-tiny's 12) are fetched into registers
// with the segment's other loads; store() adds any further ones.
template <typename T>
struct DtLowTile {
  static_assert(kFwdThreads == 2 * kSeg, "dt_low tile: one lane per (position, rank parity)");
  static constexpr int kPer = 8;  // ranks per lane and batch of loads
  float v[kPer];

  // Ranks kb .. kb+15 into v.
  __device__ __forceinline__ void fetch(const ScanParams& p, const T* dt_low, int s0, int len, int kb = 0) {
    const int j = threadIdx.x % kSeg, k0 = threadIdx.x / kSeg;
    const T* q = dt_low + (kb + k0) * p.dt_low_rank_stride + int64_t(phys(p, s0 + j)) * p.dt_low_seq_stride;
    const int64_t step = 2 * p.dt_low_rank_stride;
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[i] = (j < len && kb + 2 * i + k0 < p.rank) ? to_float(q[i * step]) : 0.f;
  }
  __device__ __forceinline__ void store(const ScanParams& p, const T* dt_low, int s0, int len, float* sLow) {
    const int j = threadIdx.x % kSeg, k0 = threadIdx.x / kSeg;
    for (int kb = 0; kb < p.rank; kb += 2 * kPer) {
      if (kb > 0) fetch(p, dt_low, s0, len, kb);
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (kb + 2 * i + k0 < p.rank) sLow[(kb + 2 * i + k0) * kSeg + j] = v[i];
    }
  }
};

// The loads a segment starts from (u, B and C, the first ranks of dt_low), issued one segment ahead: the
// forward fetches the next segment's during the current one's scan, so their latency is hidden. Loading z
// and y_acc_in before the scan too (registers, or cp.async into shared memory) was slower (csrc/DESIGN.md).
template <typename T, bool kTM>
struct SegmentInputs {
  float u[kSeg];
  BcTile<T, kFwdThreads, kSeg> bc;
  DtLowTile<T> low;

  __device__ __forceinline__ void fetch(const ScanParams& p, const BlockGeo& geo, const T* u_base, const T* dt_low,
                                        int s0, float* tile) {
    const int len = min(kSeg, p.seqlen - s0);
    load_rows<kTM, kSeg>(p, u_base, p.u_dim_stride, p.u_seq_stride, geo, s0, len, u, tile);
    bc.fetch(p, geo, s0, len);
    if (dt_low != nullptr) low.fetch(p, dt_low, s0, len);
  }
};

// Token-major, bf16/fp16: asks L2 for the z and y_acc_in rows of logical positions s .. s+kSeg-1 (the next
// segment), which the segment reads after its scan; lane j < kSeg takes position j's z row, lane kSeg + j
// its y_acc_in row. (The segment's other inputs are loaded a segment ahead, SegmentInputs.)
template <typename T, typename TAcc>
__device__ __forceinline__ void prefetch_outputs(const ScanParams& p, const BlockGeo& geo, int s, const T* z) {
  const int lane = threadIdx.x;
  s += lane % kSeg;
  if (s >= p.seqlen) return;
  const int64_t pos = phys(p, s);
  if (lane < kSeg) {
    if (z != nullptr) prefetch_row(z + geo.d0 + pos * p.z_seq_stride, geo.nch, p.z_dim_stride);
  } else if (p.y_acc_in != nullptr) {
    prefetch_row(static_cast<const TAcc*>(p.y_acc_in) + (int64_t(geo.b) * p.seqlen + pos) * p.dim + geo.d0,
                 geo.nch, int64_t(1));
  }
}

// TAcc: the element type of y_acc_in / y_acc_out (float, or T in bf16/fp16 inference).
template <typename T, bool kTM, typename TAcc = float>
__device__ __forceinline__ void fwd_direction(const ScanParams& p, FwdSmem& sm, float* proj_smem) {
  const BlockGeo geo = block_geo(p);
  const int L = p.seqlen;
  const int lane = threadIdx.x;
  const int d = geo.d0 + lane;
  const bool ok = lane < geo.nch;

  float A2[kN], h[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A2[n] = (ok && n < p.dstate) ? p.A[int64_t(d) * p.dstate + n] * kLog2e : 0.f;
    h[n] = 0.f;
  }
  const float Dd = (ok && p.D != nullptr) ? p.D[d] : 0.f;
  const float bias = (ok && p.delta_bias != nullptr) ? p.delta_bias[d] : 0.f;

  // Fused conv (inference): taps right-aligned to the current position, zero-padded to width 4; the
  // last 3 inputs of a segment are the next segment's halo.
  const bool conv = p.conv_weight != nullptr;
  float taps[4] = {0.f, 0.f, 0.f, 0.f}, halo[3] = {0.f, 0.f, 0.f};
  float conv_bias = 0.f;
  if (conv && ok) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int k = m - (4 - p.conv_width);
      if (k >= 0) taps[m] = p.conv_weight[int64_t(d) * p.conv_width + k];
    }
    if (p.conv_bias != nullptr) conv_bias = p.conv_bias[d];
  }

  const bool fused_delta = p.dt_low != nullptr;
  float* sW = proj_smem;                // [rank][kCh]
  float* sLow = proj_smem + p.rank * kCh;  // [rank][kSeg]
  if (fused_delta) {
    for (int k = 0; k < p.rank; ++k) sW[k * kCh + lane] = ok ? p.dt_proj[int64_t(d) * p.rank + k] : 0.f;
  }

  const T* u = reinterpret_cast<const T*>(p.u) + int64_t(geo.b) * p.u_batch_stride;
  const T* delta =
      fused_delta ? nullptr : reinterpret_cast<const T*>(p.delta) + int64_t(geo.b) * p.delta_batch_stride;
  const T* z = p.z != nullptr ? reinterpret_cast<const T*>(p.z) + int64_t(geo.b) * p.z_batch_stride : nullptr;
  const T* dt_low =
      fused_delta ? reinterpret_cast<const T*>(p.dt_low) + int64_t(geo.b) * p.dt_low_batch_stride : nullptr;

  SegmentInputs<T, kTM> in;
  in.fetch(p, geo, u, dt_low, 0, sm.tile);
  for (int s0 = 0; s0 < L; s0 += kSeg) {
    const int len = min(kSeg, L - s0);
    if (p.ckpt != nullptr && ok && s0 % kChunk == 0) {
      float4* dst = reinterpret_cast<float4*>(p.ckpt + ((int64_t(geo.b) * p.dim + d) * p.nchunks + s0 / kChunk) * kN);
#pragma unroll
      for (int q = 0; q < kN / 4; ++q) dst[q] = make_float4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]);
    }

    float uv[kSeg], dv[kSeg];
#pragma unroll
    for (int j = 0; j < kSeg; ++j) uv[j] = in.u[j];
    if (conv) {
      const float next_halo[3] = {uv[kSeg - 3], uv[kSeg - 2], uv[kSeg - 1]};
      // Descending, so that uv[j-3 .. j] still hold the inputs when position j is formed.
#pragma unroll
      for (int j = kSeg - 1; j >= 0; --j) {
        float acc = conv_bias;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const int i = j - 3 + m;
          acc = fmaf(taps[m], i >= 0 ? uv[i] : halo[i + 3], acc);
        }
        const float act = silu<T>(acc);
        uv[j] = (ok && j < len) ? act : 0.f;
      }
#pragma unroll
      for (int m = 0; m < 3; ++m) halo[m] = next_halo[m];
    }
    if (fused_delta) {
      in.low.store(p, dt_low, s0, len, sLow);
      __syncwarp();
#pragma unroll
      for (int j = 0; j < kSeg; ++j) dv[j] = 0.f;
      for (int k = 0; k < p.rank; ++k) {
        const float w = sW[k * kCh + lane];
#pragma unroll
        for (int q = 0; q < kSeg / 4; ++q) {
          float l[4];
          unpack(*reinterpret_cast<const float4*>(&sLow[k * kSeg + 4 * q]), l);
#pragma unroll
          for (int i = 0; i < 4; ++i) dv[4 * q + i] = fmaf(w, l[i], dv[4 * q + i]);
        }
      }
    } else {
      load_rows<kTM, kSeg>(p, delta, p.delta_dim_stride, p.delta_seq_stride, geo, s0, len, dv, sm.tile);
    }
    make_dt<T>(p, bias, ok, len, dv);
    in.bc.store(p, sm.B, sm.C);
#pragma unroll
    for (int j = 0; j < kSeg; ++j) {
      sm.dt[j * kCh + lane] = dv[j];
      sm.u[j * kCh + lane] = uv[j];
    }
    __syncwarp();
    if (s0 + kSeg < L) in.fetch(p, geo, u, dt_low, s0 + kSeg, sm.tile);
    if constexpr (kTM && kIsHalf<T>) prefetch_outputs<T, TAcc>(p, geo, s0 + kSeg, z);

    // Scan, one position per iteration: a loop rather than unrolled, so that the code of the whole segment
    // stays in the instruction cache. Unrolling by 2 or 4 was slower.
#pragma unroll 1
    for (int j = 0; j < kSeg; ++j) {
      const float dt = sm.dt[j * kCh + lane], uj = sm.u[j * kCh + lane];
      const float du = dt * uj;
      float bb[kN], cc[kN];
#pragma unroll
      for (int q = 0; q < kN / 4; ++q) {
        unpack(*reinterpret_cast<const float4*>(&sm.B[j * kN + 4 * q]), bb + 4 * q);
        unpack(*reinterpret_cast<const float4*>(&sm.C[j * kN + 4 * q]), cc + 4 * q);
      }
      float y0 = 0.f, y1 = 0.f;
#pragma unroll
      for (int n = 0; n < kN; n += 2) {
        h[n] = fmaf(ex2(dt * A2[n]), h[n], du * bb[n]);
        h[n + 1] = fmaf(ex2(dt * A2[n + 1]), h[n + 1], du * bb[n + 1]);
        y0 = fmaf(cc[n], h[n], y0);
        y1 = fmaf(cc[n + 1], h[n + 1], y1);
      }
      sm.u[j * kCh + lane] = fmaf(Dd, uj, y0 + y1);
    }
    __syncwarp();

    // Outputs of the segment.
    float yv[kSeg];
#pragma unroll
    for (int j = 0; j < kSeg; ++j) yv[j] = sm.u[j * kCh + lane];
    if (p.y_acc_in != nullptr) {
      float acc[kSeg];
      load_out_rows<kTM, kSeg>(p, static_cast<const TAcc*>(p.y_acc_in), geo, s0, len, acc, sm.tile);
#pragma unroll
      for (int j = 0; j < kSeg; ++j) yv[j] += acc[j];
    }
    if (p.y_acc_out != nullptr) store_rows<kTM, kSeg>(p, static_cast<TAcc*>(p.y_acc_out), geo, s0, len, yv, sm.tile);
    if (p.out != nullptr) {
      if (z != nullptr) {
        float zv[kSeg];
        load_rows<kTM, kSeg>(p, z, p.z_dim_stride, p.z_seq_stride, geo, s0, len, zv, sm.tile);
#pragma unroll
        for (int j = 0; j < kSeg; ++j) yv[j] *= silu<T>(zv[j]);
      }
#pragma unroll
      for (int j = 0; j < kSeg; ++j) yv[j] *= p.out_scale;
      store_rows<kTM, kSeg>(p, reinterpret_cast<T*>(p.out), geo, s0, len, yv, sm.tile);
    }
    __syncwarp();  // the shared tiles are free for the next segment
  }
  if (p.last_state != nullptr && ok) {
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < p.dstate) p.last_state[(int64_t(geo.b) * p.dim + d) * p.dstate + n] = h[n];
  }
}

// 12 warps per SM: 168 registers per lane hold the 16 states, their decay rates and a segment's data
// without spills (at 16 warps, 128 registers, they spill).
template <typename T, bool kTM>
__global__ void __launch_bounds__(kFwdThreads, 12) ss_fwd_kernel(const ScanParams p) {
  __shared__ FwdSmem sm;
  extern __shared__ __align__(16) float fwd_proj_smem[];
  fwd_direction<T, kTM>(p, sm, fwd_proj_smem);
}

// Both directions of a bidirectional block in one launch: each warp runs the forward direction for its
// channels (y into the buffer y_acc_out), then the reverse direction, which adds that buffer before the gate.
// The buffer is written and read by the same warp (ordered by __syncwarp); in inference it is the output
// itself, each segment read before it is overwritten.
struct BiScanParams {
  ScanParams dir[2];  // the forward direction, then the reverse one
};

template <typename T, bool kTM, typename TAcc>
__global__ void __launch_bounds__(kFwdThreads, 12) ss_bifwd_kernel(const __grid_constant__ BiScanParams bp) {
  __shared__ FwdSmem sm;
  extern __shared__ __align__(16) float fwd_proj_smem[];
  if constexpr (kTM) {
    // A loop, not two inlined calls: one copy of the direction's code, about half the SASS, on which warps
    // waited less for instruction fetches.
#pragma unroll 1
    for (int i = 0; i < 2; ++i) {
      __syncwarp();
      fwd_direction<T, kTM, TAcc>(bp.dir[i], sm, fwd_proj_smem);
    }
  } else {  // channel-major: the loop spilled registers and ran 2.1x slower
    fwd_direction<T, kTM, TAcc>(bp.dir[0], sm, fwd_proj_smem);
    __syncwarp();
    fwd_direction<T, kTM, TAcc>(bp.dir[1], sm, fwd_proj_smem);
  }
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
// Mapping: a block of 128 threads owns 32 channels of one batch element (one group); each channel is
// run by 4 adjacent lanes that hold 4 states each (y and the per-channel sums need 2-step shuffle
// reductions). Element-wise stages stage (kCh x kT) tiles in shared memory with coalesced accesses.
// (A warp-per-32-channels backward with 16 states per lane, like the forward's, was slower: at 255
// registers it keeps 8 warps per SM and stays latency-bound; csrc/DESIGN.md.)
constexpr int kPart = 4;                          // threads per channel
constexpr int kSt = kN / kPart;                   // states per thread (4)
constexpr int kBwdThreads = kCh * kPart;          // 128
constexpr int kT = kChunk;                        // positions per chunk (= checkpoint interval)
constexpr int kSub = 8;                           // positions per sub-chunk
constexpr int kNSub = kT / kSub;                  // 4
constexpr int kRow = kT + 1;                      // padded row of the (channel x position) tiles
constexpr int kDbcRow = kCh * kN + 4;             // padded row of the dB/dC reduction buffer
constexpr int kElems = kCh * kT / kBwdThreads;    // elements per thread in element-wise stages (8)
static_assert(kT == 32, "element-wise stages map a warp's lanes to a 32-element tile row");

// Element (r = channel row, j = position) of a (kCh x kT) tile handled by this thread in step i of the
// element-wise stages: lanes run along positions (channel-major) or along channels (token-major, kTM),
// so global accesses are coalesced either way; the padded shared-memory rows keep both conflict-free.
template <bool kTM>
__device__ __forceinline__ void tile_elem(int i, int& r, int& j) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  r = kTM ? lane : warp + 4 * i;
  j = kTM ? warp + 4 * i : lane;
}

// Offsets of this thread's elements of a chunk (tile_elem's steps i = 0 .. kElems-1) in a tensor with the
// given strides: step i is at first + i * step (one position or one channel further each time, by 4),
// so the element-wise stages do no per-element index arithmetic. Offsets of padding elements are never
// dereferenced.
struct ElemWalk {
  int64_t first, step;
};

template <bool kTM>
__device__ __forceinline__ ElemWalk elem_walk(const ScanParams& p, const BlockGeo& geo, int s0, int64_t dim_stride,
                                              int64_t seq_stride) {
  int r, j;
  tile_elem<kTM>(0, r, j);
  ElemWalk w;
  w.first = int64_t(geo.d0 + r) * dim_stride + int64_t(phys(p, s0 + j)) * seq_stride;
  w.step = kTM ? (p.reverse ? -4 : 4) * seq_stride : 4 * dim_stride;
  return w;
}

struct BwdSmem {
  // Values read together share a float2 tile (one shared-memory access instead of two).
  float2 dtu[kCh * kRow];   // (dt, u), then (d(dt), du) (written by the scan once they are no longer needed)
  float2 dysig[kCh * kRow]; // (dout * silu(z), d dt / d(delta + bias))
  float zf[kCh * kRow];     // dout * silu'(z), then dz
  float bias[kCh];       // delta_bias of the block's channels
  __align__(16) float B[kT * kN];
  __align__(16) float C[kT * kN];
  __align__(16) float sub[kNSub][kBwdThreads * kSt];     // states at the sub-chunk starts
  __align__(16) float dbc[2][kSub][kDbcRow];          // per-channel dB / dC of one sub-chunk
};

// Token-major backward: the rows of the next chunk (logical positions s0 .. s0+kT-1) that its element
// and B/C loads read, asked for one chunk ahead, so that those loads find them in L2. Thread 32 q + j takes position j of u and B (q = 0), delta and C (1), z and
// ysum (2), dout (3).
template <typename T>
__device__ __forceinline__ void prefetch_chunk(const ScanParams& p, const BlockGeo& geo, int s0, const T* u,
                                               const T* delta, const T* z, const T* dout) {
  const int q = threadIdx.x / kT, j = threadIdx.x % kT;
  const int64_t pos = phys(p, s0 + j);
  const int64_t out_row = (int64_t(geo.b) * p.seqlen + pos) * p.dim + geo.d0;
  if (q == 0) {
    prefetch_row(u + geo.d0 + pos * p.u_seq_stride, geo.nch, p.u_dim_stride);
    prefetch_row(reinterpret_cast<const T*>(p.B) + geo.b * p.B_batch_stride + geo.g * p.B_group_stride +
                     pos * p.B_seq_stride, p.dstate, p.B_state_stride);
  } else if (q == 1) {
    prefetch_row(delta + geo.d0 + pos * p.delta_seq_stride, geo.nch, p.delta_dim_stride);
    prefetch_row(reinterpret_cast<const T*>(p.C) + geo.b * p.C_batch_stride + geo.g * p.C_group_stride +
                     pos * p.C_seq_stride, p.dstate, p.C_state_stride);
  } else if (q == 2) {
    if (z != nullptr) prefetch_row(z + geo.d0 + pos * p.z_seq_stride, geo.nch, p.z_dim_stride);
    if (p.ysum != nullptr) prefetch_row(p.ysum + out_row, geo.nch, int64_t(1));
  } else {
    prefetch_row(dout + out_row, geo.nch, int64_t(1));
  }
}

template <typename T, bool kTM>
__device__ __forceinline__ void ss_bwd_block(const ScanParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BwdSmem& sm = *reinterpret_cast<BwdSmem*>(smem_raw);

  const BlockGeo geo = block_geo(p);
  const int L = p.seqlen;
  const int tid = threadIdx.x;
  const int ch = tid / kPart, part = tid % kPart;
  const int d = geo.d0 + ch;
  const bool ch_ok = ch < geo.nch;
  const bool has_z = p.z != nullptr;
  const bool need_y = has_z && p.ysum == nullptr;  // dz from the recomputed y

  float A2[kSt], An[kSt], dA_acc[kSt], gc[kSt];
#pragma unroll
  for (int s = 0; s < kSt; ++s) {
    const int n = part * kSt + s;
    const bool ok = ch_ok && n < p.dstate;
    An[s] = ok ? p.A[int64_t(d) * p.dstate + n] : 0.f;
    A2[s] = An[s] * kLog2e;
    dA_acc[s] = 0.f;
    gc[s] = (ok && p.dlast != nullptr) ? p.dlast[(int64_t(geo.b) * p.dim + d) * p.dstate + n] : 0.f;
  }
  const float Dch = (p.D != nullptr && ch_ok) ? p.D[d] : 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;  // this thread's channel (lanes of a channel hold the same)
  if (tid < kCh) sm.bias[tid] = (p.delta_bias != nullptr && tid < geo.nch) ? p.delta_bias[geo.d0 + tid] : 0.f;

  const T* u = reinterpret_cast<const T*>(p.u) + int64_t(geo.b) * p.u_batch_stride;
  const T* delta = reinterpret_cast<const T*>(p.delta) + int64_t(geo.b) * p.delta_batch_stride;
  const T* z = has_z ? reinterpret_cast<const T*>(p.z) + int64_t(geo.b) * p.z_batch_stride : nullptr;
  const T* dout = reinterpret_cast<const T*>(p.dout);
  // The output-layout tensors (dout, ysum, du, ddelta, dz): (batch, seqlen, dim) or (batch, dim, seqlen).
  const int64_t out_batch = int64_t(geo.b) * p.dim * L;
  const int64_t out_dim_stride = kTM ? 1 : L, out_seq_stride = kTM ? p.dim : 1;
  __syncthreads();  // sm.bias

  for (int c = p.nchunks - 1; c >= 0; --c) {
    const int s0 = c * kT;
    const int len = min(kT, L - s0);
    if constexpr (kTM) {
      if (c > 0) prefetch_chunk(p, geo, s0 - kT, u, delta, z, dout);
    }
    const ElemWalk wu = elem_walk<kTM>(p, geo, s0, p.u_dim_stride, p.u_seq_stride);
    const ElemWalk wd = elem_walk<kTM>(p, geo, s0, p.delta_dim_stride, p.delta_seq_stride);
    const ElemWalk wz = elem_walk<kTM>(p, geo, s0, p.z_dim_stride, p.z_seq_stride);
    const ElemWalk wo = elem_walk<kTM>(p, geo, s0, out_dim_stride, out_seq_stride);
    const int64_t out_first = out_batch + wo.first;
    // All loads of the chunk's elements are issued before any of them is used.
    float uv[kElems], xv[kElems], zv[kElems], gv[kElems], ysv[kElems];
    // Unguarded (kGuarded false) for a full chunk of full channels: the bounds checks made the compiler branch
    // around each load.
    const auto load_elems = [&](auto guarded) {
      constexpr bool kGuarded = decltype(guarded)::value;
      int64_t ou = wu.first, od = wd.first, oz = wz.first, o = out_first;
#pragma unroll
      for (int i = 0; i < kElems; ++i, ou += wu.step, od += wd.step, oz += wz.step, o += wo.step) {
        int r, j;
        tile_elem<kTM>(i, r, j);
        const bool ok = !kGuarded || (r < geo.nch && j < len);
        uv[i] = ok ? to_float(u[ou]) : 0.f;
        xv[i] = ok ? to_float(delta[od]) : 0.f;
        gv[i] = ok ? to_float(dout[o]) * p.out_scale : 0.f;
        zv[i] = ok && has_z ? to_float(z[oz]) : 0.f;
        ysv[i] = ok && p.ysum != nullptr ? p.ysum[o] : 1.f;
      }
    };
    if (len == kT && geo.nch == kCh) {
      load_elems(std::false_type{});
    } else {
      load_elems(std::true_type{});
    }
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      int r, j;
      tile_elem<kTM>(i, r, j);
      // Padding (channels past nch, positions past len) gets zeros: dt = 0 leaves the state unchanged.
      const bool ok = r < geo.nch && j < len;
      const float draw = xv[i] + sm.bias[r];
      float dtv = draw, sgv = 1.f;
      if (p.delta_softplus) dtv = softplus<kIsHalf<T>>(draw, sgv);
      float dyv = gv[i], zfv = 0.f;
      if (has_z) {
        const float sz = sigmoid(zv[i]);
        dyv = gv[i] * zv[i] * sz;
        zfv = gv[i] * sz * (1.f + zv[i] * (1.f - sz)) * ysv[i];
      }
      sm.dtu[r * kRow + j] = make_float2(ok ? dtv : 0.f, uv[i]);
      sm.dysig[r * kRow + j] = make_float2(dyv, ok ? sgv : 0.f);
      sm.zf[r * kRow + j] = zfv;
    }
    load_bc_tile<T, kBwdThreads, kT>(p, geo, s0, len, sm.B, sm.C);
    float hs[kSt] = {0.f, 0.f, 0.f, 0.f};
    if (ch_ok) {
      const float4 v = *reinterpret_cast<const float4*>(
          p.ckpt + ((int64_t(geo.b) * p.dim + d) * p.nchunks + c) * kN + part * kSt);
      unpack(v, hs);
    }
    __syncthreads();

    // Phase A: states at the start of each sub-chunk (private to the thread: no barrier).
    for (int k = 0; k < kNSub; ++k) {
      *reinterpret_cast<float4*>(&sm.sub[k][tid * kSt]) = make_float4(hs[0], hs[1], hs[2], hs[3]);
      if (k == kNSub - 1) break;
#pragma unroll
      for (int jj = 0; jj < kSub; ++jj) {
        const int j = k * kSub + jj;
        const float2 e = sm.dtu[ch * kRow + j];
        const float dt = e.x, du = e.x * e.y;
        float bb[kSt];
        unpack(*reinterpret_cast<const float4*>(&sm.B[j * kN + part * kSt]), bb);
#pragma unroll
        for (int s = 0; s < kSt; ++s) hs[s] = fmaf(ex2(dt * A2[s]), hs[s], du * bb[s]);
      }
    }

    // Phase B: sub-chunks, last first.
    for (int k = kNSub - 1; k >= 0; --k) {
      float h0[kSt];
      unpack(*reinterpret_cast<const float4*>(&sm.sub[k][tid * kSt]), h0);
      float hh[kSub][kSt], aa[kSub][kSt];
#pragma unroll
      for (int jj = 0; jj < kSub; ++jj) {
        const int j = k * kSub + jj;
        const float2 e = sm.dtu[ch * kRow + j];
        const float dt = e.x, uv = e.y;
        const float du = dt * uv;
        float bb[kSt];
        unpack(*reinterpret_cast<const float4*>(&sm.B[j * kN + part * kSt]), bb);
#pragma unroll
        for (int s = 0; s < kSt; ++s) {
          aa[jj][s] = ex2(dt * A2[s]);
          hh[jj][s] = fmaf(aa[jj][s], jj == 0 ? h0[s] : hh[jj - 1][s], du * bb[s]);
        }
        if (need_y) {
          float cc[kSt];
          unpack(*reinterpret_cast<const float4*>(&sm.C[j * kN + part * kSt]), cc);
          float y = 0.f;
#pragma unroll
          for (int s = 0; s < kSt; ++s) y = fmaf(cc[s], hh[jj][s], y);
          y += __shfl_xor_sync(0xffffffffu, y, 1);
          y += __shfl_xor_sync(0xffffffffu, y, 2);
          if (part == 0) sm.zf[ch * kRow + j] *= fmaf(Dch, uv, y);
        }
      }
      // The reverse recurrence, with g = dL/dh_s = dy_s C_s + a_{s+1} g_{s+1} per state:
      //   dC_s = dy_s h_s, dB_s = g dt_s u_s, dA += g dt_s a_s h_{s-1},
      //   du_s = D dy_s + dt_s sum_n g B, d(dt_s) = u_s sum_n g B + sum_n A g a_s h_{s-1}.
#pragma unroll
      for (int jj = kSub - 1; jj >= 0; --jj) {
        const int j = k * kSub + jj;
        const float2 e = sm.dtu[ch * kRow + j], f = sm.dysig[ch * kRow + j];
        const float dt = e.x, uv = e.y, dy = f.x;
        const float du = dt * uv;
        float bb[kSt], cc[kSt], dBv[kSt], dCv[kSt];
        unpack(*reinterpret_cast<const float4*>(&sm.B[j * kN + part * kSt]), bb);
        unpack(*reinterpret_cast<const float4*>(&sm.C[j * kN + part * kSt]), cc);
        float gB = 0.f, gAh = 0.f;  // this thread's states' parts of sum_n g B and sum_n A g a h_{s-1}
#pragma unroll
        for (int s = 0; s < kSt; ++s) {
          const float hprev = jj == 0 ? h0[s] : hh[jj - 1][s];
          const float g = fmaf(dy, cc[s], gc[s]);
          dCv[s] = dy * hh[jj][s];
          dBv[s] = g * du;
          gB = fmaf(g, bb[s], gB);
          gc[s] = aa[jj][s] * g;  // dL/dh_{s-1}
          const float gah = gc[s] * hprev;
          dA_acc[s] = fmaf(gah, dt, dA_acc[s]);
          gAh = fmaf(gah, An[s], gAh);
        }
        *reinterpret_cast<float4*>(&sm.dbc[0][jj][ch * kN + part * kSt]) =
            make_float4(dBv[0], dBv[1], dBv[2], dBv[3]);
        *reinterpret_cast<float4*>(&sm.dbc[1][jj][ch * kN + part * kSt]) =
            make_float4(dCv[0], dCv[1], dCv[2], dCv[3]);
        gB += __shfl_xor_sync(0xffffffffu, gB, 1);
        gB += __shfl_xor_sync(0xffffffffu, gB, 2);
        gAh += __shfl_xor_sync(0xffffffffu, gAh, 1);
        gAh += __shfl_xor_sync(0xffffffffu, gAh, 2);
        // All 4 lanes of the channel have read u/dt at j (they took part in the shuffles).
        const float ddelta = fmaf(uv, gB, gAh) * f.y;
        dD_acc = fmaf(dy, uv, dD_acc);
        dbias_acc += ddelta;
        if (part == 0) sm.dtu[ch * kRow + j] = make_float2(ddelta, fmaf(Dch, dy, dt * gB));
      }
      __syncthreads();
      // dB / dC of the sub-chunk: sum over the block's channels (4 independent partial sums, to keep the
      // chain of dependent adds short), one atomic per (position, state).
      {
        const int n = tid >> 3, jj = tid & 7;
        const int t = s0 + k * kSub + jj;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int cch = 0; cch < kCh; ++cch) acc[cch % 4] += sm.dbc[q][jj][cch * kN + n];
          if (n < p.dstate && t < L) {
            float* dst = q == 0 ? p.dB : p.dC;
            atomicAdd(dst + ((int64_t(geo.b) * p.ngroups + geo.g) * p.dstate + n) * L + phys(p, t),
                      (acc[0] + acc[1]) + (acc[2] + acc[3]));
          }
        }
      }
      __syncthreads();
    }

    // Element-wise gradients of the chunk.
    int64_t o = out_first;
#pragma unroll
    for (int i = 0; i < kElems; ++i, o += wo.step) {
      int r, j;
      tile_elem<kTM>(i, r, j);
      if (r < geo.nch && j < len) {
        const float2 g = sm.dtu[r * kRow + j];
        reinterpret_cast<T*>(p.du)[o] = from_float<T>(g.y);
        reinterpret_cast<T*>(p.ddelta)[o] = from_float<T>(g.x);
        if (has_z && p.write_dz) reinterpret_cast<T*>(p.dz)[o] = from_float<T>(sm.zf[r * kRow + j]);
      }
    }
    __syncthreads();
  }

  // Per-channel parameter gradients.
#pragma unroll
  for (int s = 0; s < kSt; ++s) {
    const int n = part * kSt + s;
    if (ch_ok && n < p.dstate) atomicAdd(p.dA + int64_t(d) * p.dstate + n, dA_acc[s]);
  }
  if (ch_ok && part == 0) {
    if (p.dD != nullptr) atomicAdd(p.dD + d, dD_acc);
    if (p.ddelta_bias != nullptr) atomicAdd(p.ddelta_bias + d, dbias_acc);
  }
}

// 3 blocks (12 warps) per SM at 168 registers.
template <typename T, bool kTM>
__global__ void __launch_bounds__(kBwdThreads, 3) ss_bwd_kernel(const ScanParams p) {
  ss_bwd_block<T, kTM>(p);
}

// The two directions' backward passes are independent (only pf writes dz): blockIdx.z picks one, so
// twice as many blocks share the GPU.
template <typename T, bool kTM>
__global__ void __launch_bounds__(kBwdThreads, 3) ss_bibwd_kernel(const ScanParams pf, const ScanParams pb) {
  if (blockIdx.z == 0) {
    ss_bwd_block<T, kTM>(pf);
  } else {
    ss_bwd_block<T, kTM>(pb);
  }
}

inline dim3 scan_grid(const ScanParams& p) {
  const int dg = p.dim / p.ngroups;
  return dim3(p.ngroups * ((dg + kCh - 1) / kCh), p.batch);
}

inline int fwd_dynamic_smem(const ScanParams& p) {
  return p.dt_low != nullptr ? delta_proj_smem_floats(p.rank) * int(sizeof(float)) : 0;
}

template <typename T, bool kTM>
cudaError_t ss_fwd_launch_layout(const ScanParams& p, cudaStream_t stream) {
  ss_fwd_kernel<T, kTM><<<scan_grid(p), kFwdThreads, fwd_dynamic_smem(p), stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kTM>
cudaError_t ss_bwd_launch_layout(const ScanParams& p, cudaStream_t stream) {
  const int smem = int(sizeof(BwdSmem));
  cudaError_t err = cudaFuncSetAttribute(ss_bwd_kernel<T, kTM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  ss_bwd_kernel<T, kTM><<<scan_grid(p), kBwdThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kTM>
cudaError_t ss_bifwd_launch_layout(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream) {
  const int smem = std::max(fwd_dynamic_smem(pf), fwd_dynamic_smem(pb));
  // The accumulator's type as a template parameter, not a branch per segment: the branch's second code path
  // made the half-precision kernels larger and their inference forward slower.
  if constexpr (!std::is_same_v<T, float>) {
    if (!pf.acc_fp32) {
      ss_bifwd_kernel<T, kTM, T><<<scan_grid(pf), kFwdThreads, smem, stream>>>(BiScanParams{{pf, pb}});
      return cudaGetLastError();
    }
  }
  ss_bifwd_kernel<T, kTM, float><<<scan_grid(pf), kFwdThreads, smem, stream>>>(BiScanParams{{pf, pb}});
  return cudaGetLastError();
}

template <typename T, bool kTM>
cudaError_t ss_bibwd_launch_layout(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream) {
  const int smem = int(sizeof(BwdSmem));
  cudaError_t err = cudaFuncSetAttribute(ss_bibwd_kernel<T, kTM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  dim3 grid = scan_grid(pf);
  grid.z = 2;
  ss_bibwd_kernel<T, kTM><<<grid, kBwdThreads, smem, stream>>>(pf, pb);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ss_fwd_launch(const ScanParams& p, cudaStream_t stream) {
  return p.token_major ? ss_fwd_launch_layout<T, true>(p, stream) : ss_fwd_launch_layout<T, false>(p, stream);
}

template <typename T>
cudaError_t ss_bwd_launch(const ScanParams& p, cudaStream_t stream) {
  return p.token_major ? ss_bwd_launch_layout<T, true>(p, stream) : ss_bwd_launch_layout<T, false>(p, stream);
}

template <typename T>
cudaError_t ss_bifwd_launch(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream) {
  return pf.token_major ? ss_bifwd_launch_layout<T, true>(pf, pb, stream)
                        : ss_bifwd_launch_layout<T, false>(pf, pb, stream);
}

template <typename T>
cudaError_t ss_bibwd_launch(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream) {
  return pf.token_major ? ss_bibwd_launch_layout<T, true>(pf, pb, stream)
                        : ss_bibwd_launch_layout<T, false>(pf, pb, stream);
}

}  // namespace ssm

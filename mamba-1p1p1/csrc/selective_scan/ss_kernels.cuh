// Selective scan, forward and backward.
//
// Per channel d and state n, in "logical" time s (s = position, or L-1-position when reverse):
//   dt_s = softplus(delta_s + bias_d) (or without softplus),  a_s = exp(dt_s * A[d,n]),
//   h_s = a_s * h_{s-1} + dt_s * B_s[n] * u_s,  y_s = sum_n C_s[n] h_s[n] + D_d u_s,
//   out_s = y_s * silu(z_s).
//
// Mapping. A block of 128 threads owns 32 channels of one batch element (and one group, so
// that B and C are shared by all its channels); each channel is run by 4 adjacent lanes that
// hold 4 states each, so y needs a 2-step shuffle reduction. The sequence is processed in
// chunks of 32 positions: the block stages u, dt (softplus applied once per element), B and C
// of a chunk in shared memory with coalesced loads, scans it (one exp2 per element and
// state), and writes the outputs of the chunk with coalesced stores.
//
// Backward without O(L*N) storage: the forward saves the state before every chunk (1/2 float
// per element at N = 16). The backward walks the chunks in reverse; per chunk it recomputes
// the states at the start of each 8-position sub-chunk (phase A), then per sub-chunk, last
// first, recomputes its 8 states and decays into registers and runs the reverse recurrence
// g_s = dy_s C_s + a_{s+1} g_{s+1} over them (phase B). dB and dC (shared by all channels)
// are reduced over the block's channels in shared memory and added to global fp32 buffers
// with one atomic per (block, position, state).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "ss_common.h"

namespace ssm {

constexpr int kCh = 32;                   // channels per block
constexpr int kPart = 4;                  // threads per channel
constexpr int kSt = kMaxState / kPart;    // states per thread (4)
constexpr int kThreads = kCh * kPart;     // 128
constexpr int kT = kChunk;                // positions per chunk (32)
constexpr int kSub = 8;                   // backward sub-chunk
constexpr int kNSub = kT / kSub;          // 4
constexpr int kRow = kT + 1;              // padded row of the (channel x position) tiles
constexpr int kBRow = 20;                 // padded row of the (position x state) B/C tiles
constexpr int kDbcRow = kCh * kMaxState + 4;  // padded row of the dB/dC reduction buffer
constexpr int kElems = kCh * kT / kThreads;   // elements per thread in element-wise stages (8)
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kT == 32 && kCh == 32, "element-wise stages map a warp's lanes to a 32-element tile row");

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

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
// For the SiLU gate and its derivative: __expf and a fast reciprocal (a few ulp), not IEEE division.
__device__ __forceinline__ float sigmoid(float x) { return __frcp_rn(1.f + __expf(-x)); }

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

// Element (r = channel row, j = position) of a (kCh x kT) tile handled by this thread in step i of the
// element-wise stages: lanes run along positions (channel-major) or along channels (token-major, kTM),
// so global accesses are coalesced either way; the padded shared-memory rows keep both conflict-free.
// The layout is a template parameter: no run-time branches or general stride arithmetic per element.
template <bool kTM>
__device__ __forceinline__ void tile_elem(int i, int& r, int& j) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  r = kTM ? lane : warp + 4 * i;
  j = kTM ? warp + 4 * i : lane;
}

// Element (channel d, position pos) of an input row block: channel stride 1 (kTM) or position stride 1.
template <bool kTM, typename T>
__device__ __forceinline__ float load_seq(const T* base, int64_t dim_stride, int64_t seq_stride, int d, int pos) {
  return to_float(kTM ? base[d + pos * seq_stride] : base[d * dim_stride + pos]);
}

// Offset of (batch b, channel d, position pos) in the output-layout tensors (strides of empty_seq).
template <bool kTM>
__device__ __forceinline__ int64_t out_off(const ScanParams& p, int b, int d, int pos) {
  const int64_t row = int64_t(b) * p.dim * p.seqlen;
  return kTM ? row + int64_t(pos) * p.dim + d : row + int64_t(d) * p.seqlen + pos;
}

// B and C of one chunk, (position x state), zero past the end and for n >= dstate. Lane mapping:
// 8 consecutive positions x 4 states per warp (32-byte segments in global memory, conflict-free
// shared-memory stores with the row padding of 20). Loaded into registers first (prefetch).
constexpr int kBC = kT * kMaxState / kThreads;  // B (and C) values per thread per chunk (4)

__device__ __forceinline__ void bc_index(int i, int& j, int& n) {
  const int idx = threadIdx.x + i * kThreads;
  j = ((idx >> 5) & 3) * 8 + (idx & 7);
  n = (idx >> 7) * 4 + ((idx >> 3) & 3);
}

template <typename T>
__device__ __forceinline__ void load_bc_regs(const ScanParams& p, const BlockGeo& geo, int s0, int len,
                                             float (&pb)[kBC], float (&pc)[kBC]) {
  const T* Bp = reinterpret_cast<const T*>(p.B) + geo.b * p.B_batch_stride + geo.g * p.B_group_stride;
  const T* Cp = reinterpret_cast<const T*>(p.C) + geo.b * p.C_batch_stride + geo.g * p.C_group_stride;
#pragma unroll
  for (int i = 0; i < kBC; ++i) {
    int j, n;
    bc_index(i, j, n);
    pb[i] = pc[i] = 0.f;
    if (n < p.dstate && j < len) {
      const int64_t pos = phys(p, s0 + j);
      pb[i] = to_float(Bp[n * p.B_state_stride + pos * p.B_seq_stride]);
      pc[i] = to_float(Cp[n * p.C_state_stride + pos * p.C_seq_stride]);
    }
  }
}

__device__ __forceinline__ void store_bc(const float (&pb)[kBC], const float (&pc)[kBC], float* sB, float* sC) {
#pragma unroll
  for (int i = 0; i < kBC; ++i) {
    int j, n;
    bc_index(i, j, n);
    sB[j * kBRow + n] = pb[i];
    sC[j * kBRow + n] = pc[i];
  }
}

template <typename T>
__device__ __forceinline__ void load_bc(const ScanParams& p, const BlockGeo& geo, int s0, int len, float* sB,
                                        float* sC) {
  float pb[kBC], pc[kBC];
  load_bc_regs<T>(p, geo, s0, len, pb, pc);
  store_bc(pb, pc, sB, sC);
}

__device__ __forceinline__ void unpack(float4 v, float (&r)[4]) {
  r[0] = v.x;
  r[1] = v.y;
  r[2] = v.z;
  r[3] = v.w;
}

// Fused delta projection of the forward (p.dt_low set): delta[d, t] = sum_k dt_proj[d, k] dt_low[k, t] is
// formed per element from two shared-memory tiles, the block's rows of dt_proj (rank x kCh, loaded once)
// and the chunk's dt_low (rank x kRow), so the (batch, dim, seqlen) delta is never stored. (The backward
// takes delta recomputed by a matmul: forming it in the backward kernel pushed that kernel, already at its
// register limit, into spills and cost 17% of its time on an H200.) Dynamic shared memory.
__host__ __device__ constexpr int delta_proj_smem_floats(int rank) { return rank * (kCh + kRow); }

__device__ __forceinline__ void load_delta_proj_rows(const ScanParams& p, const BlockGeo& geo, float* w) {
  for (int idx = threadIdx.x; idx < p.rank * kCh; idx += kThreads) {
    const int k = idx / kCh, c = idx % kCh;
    w[idx] = c < geo.nch ? p.dt_proj[int64_t(geo.d0 + c) * p.rank + k] : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void load_dt_low(const ScanParams& p, const BlockGeo& geo, int s0, float* low) {
  const int len = min(kT, p.seqlen - s0);
  const T* src = reinterpret_cast<const T*>(p.dt_low) + geo.b * p.dt_low_batch_stride;
  for (int idx = threadIdx.x; idx < p.rank * kT; idx += kThreads) {
    const int k = idx % p.rank, j = idx / p.rank;
    low[k * kRow + j] =
        j < len ? to_float(src[k * p.dt_low_rank_stride + int64_t(phys(p, s0 + j)) * p.dt_low_seq_stride]) : 0.f;
  }
}

__device__ __forceinline__ float projected_delta(const float* w, const float* low, int rank, int r, int j) {
  float acc = 0.f;
  for (int k = 0; k < rank; ++k) acc = fmaf(w[k * kCh + r], low[k * kRow + j], acc);
  return acc;
}

// Fused causal conv of the forward (p.conv_weight set; inference): u holds the conv's input x, and
// u_s = silu(bias + sum_k w[k] x[s - (width-1) + k]) in logical time (anti-causal in positions when
// reverse), so the conv output never has to exist when the scan runs. Neighbours are L1 hits.
template <bool kTM, typename T>
__device__ __forceinline__ float conv_silu(const ScanParams& p, const T* x, int d, int s) {
  float acc = p.conv_bias != nullptr ? p.conv_bias[d] : 0.f;
  const float* w = p.conv_weight + int64_t(d) * p.conv_width;
  for (int k = 0; k < p.conv_width; ++k) {
    const int sk = s - (p.conv_width - 1) + k;
    if (sk >= 0) acc = fmaf(w[k], load_seq<kTM>(x, p.u_dim_stride, p.u_seq_stride, d, phys(p, sk)), acc);
  }
  return acc / (1.f + __expf(-acc));
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
template <typename T, bool kTM>
__device__ __forceinline__ void ss_fwd_block(const ScanParams& p) {
  __shared__ float sU[kCh * kRow], sDT[kCh * kRow], sY[kCh * kRow];
  __shared__ __align__(16) float sB[kT * kBRow];
  __shared__ __align__(16) float sC[kT * kBRow];

  const BlockGeo geo = block_geo(p);
  const int L = p.seqlen;
  const int tid = threadIdx.x;
  const int ch = tid / kPart, part = tid % kPart;
  const int d = geo.d0 + ch;
  const bool ch_ok = ch < geo.nch;

  float A2[kSt], h[kSt];
#pragma unroll
  for (int s = 0; s < kSt; ++s) {
    const int n = part * kSt + s;
    A2[s] = (ch_ok && n < p.dstate) ? p.A[int64_t(d) * p.dstate + n] * kLog2e : 0.f;
    h[s] = 0.f;
  }
  const T* u = reinterpret_cast<const T*>(p.u) + int64_t(geo.b) * p.u_batch_stride;
  const T* delta = reinterpret_cast<const T*>(p.delta) + int64_t(geo.b) * p.delta_batch_stride;
  const T* z = p.z != nullptr ? reinterpret_cast<const T*>(p.z) + int64_t(geo.b) * p.z_batch_stride : nullptr;
  extern __shared__ __align__(16) float fwd_delta_proj_smem[];
  const bool fused_delta = p.dt_low != nullptr;
  float* sWdt = fwd_delta_proj_smem;
  float* sLow = fwd_delta_proj_smem + p.rank * kCh;
  if (fused_delta) {
    load_delta_proj_rows(p, geo, sWdt);
    load_dt_low<T>(p, geo, 0, sLow);
    __syncthreads();
  }

  // (A register prefetch of the next chunk was tried: 168 registers, 3 blocks per SM, and 0.30 ms
  // instead of 0.23 ms for tiny@224 fp32 on an H200. Plain loads with 5 resident blocks win.)
  for (int c = 0; c < p.nchunks; ++c) {
    const int s0 = c * kT;
    const int len = min(kT, L - s0);
    if (p.ckpt != nullptr && ch_ok) {
      float* dst = p.ckpt + ((int64_t(geo.b) * p.dim + d) * p.nchunks + c) * kMaxState + part * kSt;
      *reinterpret_cast<float4*>(dst) = make_float4(h[0], h[1], h[2], h[3]);
    }
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      int r, j;
      tile_elem<kTM>(i, r, j);
      float uv = 0.f, dv = 0.f;
      if (r < geo.nch && j < len) {
        const int dr = geo.d0 + r, pos = phys(p, s0 + j);
        uv = p.conv_weight != nullptr ? conv_silu<kTM>(p, u, dr, s0 + j)
                                      : load_seq<kTM>(u, p.u_dim_stride, p.u_seq_stride, dr, pos);
        dv = fused_delta ? projected_delta(sWdt, sLow, p.rank, r, j)
                         : load_seq<kTM>(delta, p.delta_dim_stride, p.delta_seq_stride, dr, pos);
        if (p.delta_bias != nullptr) dv += p.delta_bias[dr];
        if (p.delta_softplus) dv = softplus(dv);
      }
      sU[r * kRow + j] = uv;
      sDT[r * kRow + j] = dv;
    }
    load_bc<T>(p, geo, s0, len, sB, sC);
    __syncthreads();

    // Scan. Padded positions have dt = u = B = 0: a = 1 and the state is unchanged.
#pragma unroll 4
    for (int j = 0; j < kT; ++j) {
      const float dt = sDT[ch * kRow + j];
      const float du = dt * sU[ch * kRow + j];
      float bb[kSt], cc[kSt];
      unpack(*reinterpret_cast<const float4*>(&sB[j * kBRow + part * kSt]), bb);
      unpack(*reinterpret_cast<const float4*>(&sC[j * kBRow + part * kSt]), cc);
      float y = 0.f;
#pragma unroll
      for (int s = 0; s < kSt; ++s) {
        const float a = ex2(dt * A2[s]);
        h[s] = fmaf(a, h[s], du * bb[s]);
        y = fmaf(cc[s], h[s], y);
      }
      y += __shfl_xor_sync(0xffffffffu, y, 1);
      y += __shfl_xor_sync(0xffffffffu, y, 2);
      if (part == 0) sY[ch * kRow + j] = y;
    }
    __syncthreads();

    // Outputs of the chunk.
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      int r, j;
      tile_elem<kTM>(i, r, j);
      if (r < geo.nch && j < len) {
        const int dr = geo.d0 + r;
        const int pos = phys(p, s0 + j);
        float y = sY[r * kRow + j];
        if (p.D != nullptr) y = fmaf(p.D[dr], sU[r * kRow + j], y);
        const int64_t o = out_off<kTM>(p, geo.b, dr, pos);
        if (p.y_acc_in != nullptr) y += p.y_acc_in[o];
        if (p.y_acc_out != nullptr) p.y_acc_out[o] = y;
        if (p.out != nullptr) {
          if (z != nullptr) {
            const float zv = load_seq<kTM>(z, p.z_dim_stride, p.z_seq_stride, dr, pos);
            y *= zv * sigmoid(zv);
          }
          reinterpret_cast<T*>(p.out)[o] = from_float<T>(y);
        }
      }
    }
    if (fused_delta && c + 1 < p.nchunks) load_dt_low<T>(p, geo, s0 + kT, sLow);  // read after the barrier
    __syncthreads();
  }
  if (p.last_state != nullptr && ch_ok) {
#pragma unroll
    for (int s = 0; s < kSt; ++s) {
      const int n = part * kSt + s;
      if (n < p.dstate) p.last_state[(int64_t(geo.b) * p.dim + d) * p.dstate + n] = h[s];
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
struct BwdSmem {
  float u[kCh * kRow];   // u, then du (written by the scan once u is no longer needed)
  float dt[kCh * kRow];  // dt, then d(dt)
  float dy[kCh * kRow];  // dout * silu(z)
  float zf[kCh * kRow];  // dout * silu'(z), then dz
  float sig[kCh * kRow]; // d dt / d(delta + bias)
  __align__(16) float B[kT * kBRow];
  __align__(16) float C[kT * kBRow];
  __align__(16) float sub[kNSub][kThreads * kSt];     // states at the sub-chunk starts
  __align__(16) float dbc[2][kSub][kDbcRow];          // per-channel dB / dC of one sub-chunk
};

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

  const T* u = reinterpret_cast<const T*>(p.u) + int64_t(geo.b) * p.u_batch_stride;
  const T* delta = reinterpret_cast<const T*>(p.delta) + int64_t(geo.b) * p.delta_batch_stride;
  const T* z = has_z ? reinterpret_cast<const T*>(p.z) + int64_t(geo.b) * p.z_batch_stride : nullptr;

  for (int c = p.nchunks - 1; c >= 0; --c) {
    const int s0 = c * kT;
    const int len = min(kT, L - s0);
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      int r, j;
      tile_elem<kTM>(i, r, j);
      float uv = 0.f, dtv = 0.f, dyv = 0.f, zfv = 0.f, sgv = 0.f;
      if (r < geo.nch && j < len) {
        const int dr = geo.d0 + r, pos = phys(p, s0 + j);
        uv = load_seq<kTM>(u, p.u_dim_stride, p.u_seq_stride, dr, pos);
        float draw = load_seq<kTM>(delta, p.delta_dim_stride, p.delta_seq_stride, dr, pos);
        if (p.delta_bias != nullptr) draw += p.delta_bias[dr];
        if (p.delta_softplus) {
          // softplus and its derivative (the sigmoid) from one exp.
          const float e = expf(draw);
          dtv = draw > 20.f ? draw : log1pf(e);
          sgv = draw > 20.f ? 1.f : e / (1.f + e);
        } else {
          dtv = draw;
          sgv = 1.f;
        }
        const int64_t o = out_off<kTM>(p, geo.b, dr, pos);
        const float go = to_float(reinterpret_cast<const T*>(p.dout)[o]);
        if (has_z) {
          const float zv = load_seq<kTM>(z, p.z_dim_stride, p.z_seq_stride, dr, pos);
          const float sz = sigmoid(zv);
          dyv = go * zv * sz;
          zfv = go * sz * (1.f + zv * (1.f - sz));
          if (p.ysum != nullptr) zfv *= p.ysum[o];
        } else {
          dyv = go;
        }
      }
      sm.sig[r * kRow + j] = sgv;
      sm.u[r * kRow + j] = uv;
      sm.dt[r * kRow + j] = dtv;
      sm.dy[r * kRow + j] = dyv;
      sm.zf[r * kRow + j] = zfv;
    }
    load_bc<T>(p, geo, s0, len, sm.B, sm.C);
    float hs[kSt] = {0.f, 0.f, 0.f, 0.f};
    if (ch_ok) {
      const float4 v = *reinterpret_cast<const float4*>(
          p.ckpt + ((int64_t(geo.b) * p.dim + d) * p.nchunks + c) * kMaxState + part * kSt);
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
        const float dt = sm.dt[ch * kRow + j];
        const float du = dt * sm.u[ch * kRow + j];
        float bb[kSt];
        unpack(*reinterpret_cast<const float4*>(&sm.B[j * kBRow + part * kSt]), bb);
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
        const float dt = sm.dt[ch * kRow + j];
        const float uv = sm.u[ch * kRow + j];
        const float du = dt * uv;
        float bb[kSt];
        unpack(*reinterpret_cast<const float4*>(&sm.B[j * kBRow + part * kSt]), bb);
#pragma unroll
        for (int s = 0; s < kSt; ++s) {
          aa[jj][s] = ex2(dt * A2[s]);
          hh[jj][s] = fmaf(aa[jj][s], jj == 0 ? h0[s] : hh[jj - 1][s], du * bb[s]);
        }
        if (need_y) {
          float cc[kSt];
          unpack(*reinterpret_cast<const float4*>(&sm.C[j * kBRow + part * kSt]), cc);
          float y = 0.f;
#pragma unroll
          for (int s = 0; s < kSt; ++s) y = fmaf(cc[s], hh[jj][s], y);
          y += __shfl_xor_sync(0xffffffffu, y, 1);
          y += __shfl_xor_sync(0xffffffffu, y, 2);
          if (part == 0) sm.zf[ch * kRow + j] *= fmaf(Dch, uv, y);
        }
      }
#pragma unroll
      for (int jj = kSub - 1; jj >= 0; --jj) {
        const int j = k * kSub + jj;
        const float dt = sm.dt[ch * kRow + j];
        const float uv = sm.u[ch * kRow + j];
        const float dy = sm.dy[ch * kRow + j];
        float bb[kSt], cc[kSt], dBv[kSt], dCv[kSt];
        unpack(*reinterpret_cast<const float4*>(&sm.B[j * kBRow + part * kSt]), bb);
        unpack(*reinterpret_cast<const float4*>(&sm.C[j * kBRow + part * kSt]), cc);
        float dup = 0.f, ddtp = 0.f;
#pragma unroll
        for (int s = 0; s < kSt; ++s) {
          const float hprev = jj == 0 ? h0[s] : hh[jj - 1][s];
          const float g = fmaf(dy, cc[s], gc[s]);  // dL/dh_s
          const float gdt = g * dt;
          dCv[s] = dy * hh[jj][s];
          dBv[s] = gdt * uv;
          dup = fmaf(gdt, bb[s], dup);
          const float ha = hprev * aa[jj][s];  // h_{s-1} a_s
          ddtp = fmaf(g, fmaf(bb[s], uv, ha * An[s]), ddtp);
          dA_acc[s] = fmaf(gdt, ha, dA_acc[s]);
          gc[s] = aa[jj][s] * g;
        }
        *reinterpret_cast<float4*>(&sm.dbc[0][jj][ch * kMaxState + part * kSt]) =
            make_float4(dBv[0], dBv[1], dBv[2], dBv[3]);
        *reinterpret_cast<float4*>(&sm.dbc[1][jj][ch * kMaxState + part * kSt]) =
            make_float4(dCv[0], dCv[1], dCv[2], dCv[3]);
        dup += __shfl_xor_sync(0xffffffffu, dup, 1);
        dup += __shfl_xor_sync(0xffffffffu, dup, 2);
        ddtp += __shfl_xor_sync(0xffffffffu, ddtp, 1);
        ddtp += __shfl_xor_sync(0xffffffffu, ddtp, 2);
        // All 4 lanes of the channel have read u/dt at j (they took part in the shuffles).
        const float ddelta = ddtp * sm.sig[ch * kRow + j];
        dD_acc = fmaf(dy, uv, dD_acc);
        dbias_acc += ddelta;
        if (part == 0) {
          sm.u[ch * kRow + j] = fmaf(Dch, dy, dup);
          sm.dt[ch * kRow + j] = ddelta;
        }
      }
      __syncthreads();
      // dB / dC of the sub-chunk: sum over the block's channels, one atomic per (position, state).
      {
        const int n = tid >> 3, jj = tid & 7;
        const int t = s0 + k * kSub + jj;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float acc = 0.f;
#pragma unroll 8
          for (int cch = 0; cch < kCh; ++cch) acc += sm.dbc[q][jj][cch * kMaxState + n];
          if (n < p.dstate && t < L) {
            float* dst = q == 0 ? p.dB : p.dC;
            atomicAdd(dst + ((int64_t(geo.b) * p.ngroups + geo.g) * p.dstate + n) * L + phys(p, t), acc);
          }
        }
      }
      __syncthreads();
    }

    // Element-wise gradients of the chunk.
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      int r, j;
      tile_elem<kTM>(i, r, j);
      if (r < geo.nch && j < len) {
        const int64_t o = out_off<kTM>(p, geo.b, geo.d0 + r, phys(p, s0 + j));
        reinterpret_cast<T*>(p.du)[o] = from_float<T>(sm.u[r * kRow + j]);
        reinterpret_cast<T*>(p.ddelta)[o] = from_float<T>(sm.dt[r * kRow + j]);
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

// Forward occupancy: 6 blocks per SM fit the token-major kernels in 80 registers without spills; the
// channel-major ones would spill there and keep 5.
template <typename T, bool kTM>
__global__ void __launch_bounds__(kThreads, kTM ? 6 : 5) ss_fwd_kernel(const ScanParams p) {
  ss_fwd_block<T, kTM>(p);
}

// Both directions of a bidirectional block in one launch: each block runs the forward direction
// for its channels (y into the fp32 buffer y_acc_out), then the reverse direction, which adds that
// buffer before the gate. The buffer is written and read by the same block (visible after the
// barrier) and mostly stays in L2.
template <typename T, bool kTM>
__global__ void __launch_bounds__(kThreads, kTM ? 6 : 5) ss_bifwd_kernel(const ScanParams pf, const ScanParams pb) {
  ss_fwd_block<T, kTM>(pf);
  __syncthreads();
  ss_fwd_block<T, kTM>(pb);
}

template <typename T, bool kTM>
__global__ void __launch_bounds__(kThreads, 3) ss_bwd_kernel(const ScanParams p) {
  ss_bwd_block<T, kTM>(p);
}

template <typename T, bool kTM>
__global__ void __launch_bounds__(kThreads, 3) ss_bibwd_kernel(const ScanParams pf, const ScanParams pb) {
  ss_bwd_block<T, kTM>(pf);
  __syncthreads();
  ss_bwd_block<T, kTM>(pb);
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
  ss_fwd_kernel<T, kTM><<<scan_grid(p), kThreads, fwd_dynamic_smem(p), stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kTM>
cudaError_t ss_bwd_launch_layout(const ScanParams& p, cudaStream_t stream) {
  const int smem = int(sizeof(BwdSmem));
  cudaError_t err = cudaFuncSetAttribute(ss_bwd_kernel<T, kTM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  ss_bwd_kernel<T, kTM><<<scan_grid(p), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kTM>
cudaError_t ss_bifwd_launch_layout(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream) {
  const int smem = std::max(fwd_dynamic_smem(pf), fwd_dynamic_smem(pb));
  ss_bifwd_kernel<T, kTM><<<scan_grid(pf), kThreads, smem, stream>>>(pf, pb);
  return cudaGetLastError();
}

template <typename T, bool kTM>
cudaError_t ss_bibwd_launch_layout(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream) {
  const int smem = int(sizeof(BwdSmem));
  cudaError_t err = cudaFuncSetAttribute(ss_bibwd_kernel<T, kTM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  ss_bibwd_kernel<T, kTM><<<scan_grid(pf), kThreads, smem, stream>>>(pf, pb);
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

// Inference front end of a bidirectional Vim block in bf16/fp16: both directions' causal convs (SiLU)
// of x and their x_proj products in one pass, x_dbl_dir = silu(conv_dir(x)) @ W_dir^T, without writing
// the conv outputs. Unfused, each direction's conv wrote a (batch, seqlen, dim) tensor that its x_proj
// matmul read back. The kernel is bound by its instructions and MUFU (the SiLUs), not by memory.
//
// A block of kThreads owns kTile positions of one batch element and loops over the channels in chunks of
// kChunkC: its threads form both convs of the chunk into shared memory (rounded to the input type, as the
// unfused conv's output was) while the chunk's weight rows arrive by asynchronous copies, then each warp
// multiplies its 16 positions by the chunk of both weights on tensor cores (mma m16n8k16, fp32
// accumulation), accumulating over the chunks in registers.
#include <type_traits>

#include "../common/dtype_convert.cuh"
#include "../common/fast_math.cuh"
#include "conv_x_proj.h"

namespace ssm {
namespace {

// 64 positions per block: 128 was slower (fewer, larger blocks overlap their load, conv and MMA phases less).
constexpr int kTile = 64;                  // positions per block
constexpr int kWarps = kTile / 16;         // one 16-row MMA tile per warp
constexpr int kThreads = 32 * kWarps;      // 128
constexpr int kChunkC = 64;                // channels per chunk (4 MMA k-steps): a channel pair per lane
constexpr int kRowH = kChunkC + 8;         // padded shared-memory row in halves: conflict-free fragments
constexpr int kConvRun = kTile / kWarps;   // conv positions per thread (a warp's 16 rows)
constexpr int kHalo = 3;                   // conv taps before / after a position (width <= 4)

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// 16 bytes global -> shared without registers; zeros instead when !valid (src must still be a valid address).
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(to), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

// Both convs (SiLU) of this thread's channel pair c, c+1 at the block's positions p0 + j0 .. + kConvRun-1,
// into the chunk's tiles u[dir][position][channel] at column cc. x (4-byte aligned pairs) is read at
// j0 - kHalo .. j0 + kConvRun - 1 + kHalo, zero outside the sequence; kEdge: the block has such positions
// (bounds checked per row), else every row is read unpredicated.
template <typename T, bool kEdge>
__device__ __forceinline__ void conv_pair(const ConvProjParams& p, const T* x, int p0, int j0, int c, int cc,
                                          T* u_f, T* u_b) {
  const bool c_ok = c < p.dim;  // dim % 8 == 0: both channels of a pair are valid or neither
  // Taps right-aligned (forward: x[t-3+m]; reverse, the conv of the flipped sequence: x[t+3-m]).
  float taps[2][2][4], bias[2][2];
#pragma unroll
  for (int dir = 0; dir < 2; ++dir) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int k = m - (4 - p.conv_width);
        taps[dir][e][m] = (c_ok && k >= 0) ? p.conv_weight[dir][int64_t(c + e) * p.conv_width + k] : 0.f;
      }
      bias[dir][e] = (c_ok && p.conv_bias[dir] != nullptr) ? p.conv_bias[dir][c + e] : 0.f;
    }
  }
  float2 xv[kConvRun + 2 * kHalo];
  const T* q = x + int64_t(p0 + j0 - kHalo) * p.x_seq_stride + c;
#pragma unroll
  for (int i = 0; i < kConvRun + 2 * kHalo; ++i, q += p.x_seq_stride) {
    const int pos = p0 + j0 - kHalo + i;
    xv[i] = (c_ok && (!kEdge || (pos >= 0 && pos < p.seqlen))) ? load_pair(q) : make_float2(0.f, 0.f);
  }
#pragma unroll
  for (int j = 0; j < kConvRun; ++j) {
    float f[2], r[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      f[e] = bias[0][e];
      r[e] = bias[1][e];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const float2 xf = xv[j + m], xr = xv[j + 2 * kHalo - m];
        f[e] = fmaf(taps[0][e][m], e == 0 ? xf.x : xf.y, f[e]);
        r[e] = fmaf(taps[1][e][m], e == 0 ? xr.x : xr.y, r[e]);
      }
    }
    store_pair(&u_f[(j0 + j) * kRowH + cc], silu<T>(f[0]), silu<T>(f[1]));
    store_pair(&u_b[(j0 + j) * kRowH + cc], silu<T>(r[0]), silu<T>(r[1]));
  }
}

// kNT: MMA n-tiles of 8 outputs (out_dim <= 8 * kNT).
template <typename T, int kNT>
struct ConvProjSmem {
  T u[2][kTile * kRowH];      // the chunk's conv outputs per direction, [position][channel]
  T w[2][kNT * 8 * kRowH];    // the chunk's x_proj rows per direction, [output][channel]
};

// 16 warps per SM (128 registers, no spills) with Vim-tiny's 48 accumulators; larger out_dims get 8 (their
// accumulators would spill at 128 registers).
template <typename T, int kNT>
__global__ void __launch_bounds__(kThreads, (kNT <= 6 ? 16 : 8) / kWarps) conv_x_proj_kernel(const ConvProjParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<ConvProjSmem<T, kNT>*>(smem_raw);
  const int b = blockIdx.y, p0 = blockIdx.x * kTile;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const T* x = static_cast<const T*>(p.x) + int64_t(b) * p.x_batch_stride;
  constexpr int kOut = kNT * 8;

  float acc[2][kNT][4];
#pragma unroll
  for (int dir = 0; dir < 2; ++dir)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[dir][nt][i] = 0.f;

  // Conv mapping: warp = the 16 rows it multiplies, lane = a channel pair (a warp reads 128 contiguous bytes).
  const int cc = 2 * lane, j0 = warp * kConvRun;
  const bool edge = p0 < kHalo || p0 + kTile + kHalo > p.seqlen;
  for (int c0 = 0; c0 < p.dim; c0 += kChunkC) {
    // The chunk's weight rows, 8 channels (16 bytes) per copy, zero past out_dim and dim: asynchronous copies
    // into shared memory (no registers) that arrive while the conv runs.
    for (int i = tid; i < 2 * kOut * (kChunkC / 8); i += kThreads) {
      const int dir = i / (kOut * (kChunkC / 8)), rest = i % (kOut * (kChunkC / 8));
      const int n = rest / (kChunkC / 8), k8 = (rest % (kChunkC / 8)) * 8;
      const T* w = static_cast<const T*>(dir == 0 ? p.proj_weight[0] : p.proj_weight[1]);
      const bool ok = n < p.out_dim && c0 + k8 < p.dim;
      copy16_async(&sm.w[dir][n * kRowH + k8], ok ? w + int64_t(n) * p.dim + c0 + k8 : w, ok);
    }
    asm volatile("cp.async.commit_group;");
    if (edge) {
      conv_pair<T, true>(p, x, p0, j0, c0 + cc, cc, sm.u[0], sm.u[1]);
    } else {
      conv_pair<T, false>(p, x, p0, j0, c0 + cc, cc, sm.u[0], sm.u[1]);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();

    // Fragments (PTX m16n8k16): g = lane / 4 is a row of A and a column of B, t = lane % 4 a pair of k.
    const int g = lane / 4, t = lane % 4, row = warp * 16 + g;
#pragma unroll
    for (int ks = 0; ks < kChunkC / 16; ++ks) {
      const int k = ks * 16 + 2 * t;
#pragma unroll
      for (int dir = 0; dir < 2; ++dir) {
        const T* u = sm.u[dir];
        uint32_t a[4];
        a[0] = *reinterpret_cast<const uint32_t*>(&u[row * kRowH + k]);
        a[1] = *reinterpret_cast<const uint32_t*>(&u[(row + 8) * kRowH + k]);
        a[2] = *reinterpret_cast<const uint32_t*>(&u[row * kRowH + k + 8]);
        a[3] = *reinterpret_cast<const uint32_t*>(&u[(row + 8) * kRowH + k + 8]);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const T* w = &sm.w[dir][(nt * 8 + g) * kRowH + k];
          Mma<T>::run(acc[dir][nt], a, *reinterpret_cast<const uint32_t*>(w),
                      *reinterpret_cast<const uint32_t*>(w + 8));
        }
      }
    }
    __syncthreads();  // the chunk's tiles are read before the next chunk overwrites them
  }

  // Accumulator (PTX m16n8k16): {0, 1} at row g, columns 2t, 2t+1 of the n-tile; {2, 3} at row g + 8.
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int dir = 0; dir < 2; ++dir) {
    T* out = static_cast<T*>(p.out[dir]) + int64_t(b) * p.seqlen * p.out_dim;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int pos = p0 + warp * 16 + g + 8 * half;
      if (pos >= p.seqlen) continue;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = nt * 8 + 2 * t + e;
          if (n < p.out_dim) out[int64_t(pos) * p.out_dim + n] = from_float<T>(acc[dir][nt][2 * half + e]);
        }
      }
    }
  }
}

template <typename T, int kNT>
cudaError_t launch(const ConvProjParams& p, cudaStream_t stream) {
  constexpr int smem = int(sizeof(ConvProjSmem<T, kNT>));
  static_assert(smem <= 48 * 1024, "within the default dynamic shared memory: no opt-in attribute per call");
  const dim3 grid((p.seqlen + kTile - 1) / kTile, p.batch);
  conv_x_proj_kernel<T, kNT><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <DType kDType>
cudaError_t conv_x_proj_cuda(const ConvProjParams& p, cudaStream_t stream) {
  using T = typename TypeOf<kDType>::type;
  static_assert(!std::is_same_v<T, float>, "tensor-core path: bf16 / fp16 only");
  // Accumulator registers sized to out_dim = rank + 2 * dstate: Vim-tiny 44, small 56, base 80.
  if (p.out_dim <= 48) return launch<T, 6>(p, stream);
  if (p.out_dim <= 64) return launch<T, 8>(p, stream);
  return launch<T, kMaxConvProjOut / 8>(p, stream);
}

template cudaError_t conv_x_proj_cuda<DType::kFloat16>(const ConvProjParams&, cudaStream_t);
template cudaError_t conv_x_proj_cuda<DType::kBFloat16>(const ConvProjParams&, cudaStream_t);

}  // namespace ssm

// Standalone timer of the fused kernels of a Vim block (both scan directions, forward and backward, and the
// conv + x_proj kernel) at the model's shapes and token-major layouts, without torch: a variant of a kernel
// is compared by building this file against two header folders (this tree's and, say, an older commit's
// `git archive`) and running both builds in one GPU call. The inputs are fixed pseudo-random values, so two
// builds' outputs can be compared byte for byte.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -I mamba-1p1p1/csrc/selective_scan -I mamba-1p1p1/csrc/conv_x_proj -o kernel_timer benchmarks/kernel_timer.cu
//   ./kernel_timer KERNEL BATCH DIM SEQLEN DTYPE ITERS [DUMP]
//
// KERNEL: scan-infer (inference forward: convs and delta projection fused, the directions summed in the
// output), scan-train (training forward: delta projection fused, checkpoints and the fp32 sum saved),
// scan-bwd (the backward of scan-train), conv-x-proj (bf16 only). DTYPE: bf16 or fp32. DIM is d_inner
// (Vim-tiny 384); Vim-tiny at 1248, batch 128: 128 384 6085; at 224: 128 384 197. Prints the median and
// minimum of ITERS CUDA-event timings and a checksum; DUMP receives the output's raw bytes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "conv_x_proj.cu"
#include "ss_kernels.cuh"

namespace timer {

using namespace ssm;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

__device__ float uniform01(uint64_t i, uint32_t seed) {  // splitmix64 of (i, seed)
  uint64_t x = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 29;
  return float((x >> 40) & 0xFFFFFF) / float(1 << 24);
}

template <typename T>
__global__ void fill_uniform(T* p, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = from_float<T>(lo + (hi - lo) * uniform01(i, seed));
}

// A device buffer of n values uniform in [lo, hi) (never freed: the program is short-lived).
template <typename T>
T* uniform(int64_t n, uint32_t seed, float lo, float hi) {
  T* p;
  check(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  fill_uniform<T><<<1024, 256>>>(p, n, seed, lo, hi);
  return p;
}
template <typename T>
T* uninitialised(int64_t n) {
  T* p;
  check(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  return p;
}
float* from_host(const std::vector<float>& v) {
  float* p = uninitialised<float>(int64_t(v.size()));
  check(cudaMemcpy(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  return p;
}

template <typename Launch>
void time_and_report(Launch launch, int iters, const void* out, int64_t out_bytes, bool bf16, const char* dump) {
  for (int i = 0; i < 3; ++i) check(launch(), "launch");
  check(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    cudaEventRecord(start);
    check(launch(), "launch");
    cudaEventRecord(stop);
    check(cudaEventSynchronize(stop), "timed launch");
    float t;
    cudaEventElapsedTime(&t, start, stop);
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  std::vector<unsigned char> host(out_bytes);
  check(cudaMemcpy(host.data(), out, out_bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  double sum = 0;
  if (bf16) {
    const auto* v = reinterpret_cast<const __nv_bfloat16*>(host.data());
    for (int64_t i = 0; i < out_bytes / 2; ++i) sum += double(__bfloat162float(v[i]));
  } else {
    const auto* v = reinterpret_cast<const float*>(host.data());
    for (int64_t i = 0; i < out_bytes / 4; ++i) sum += double(v[i]);
  }
  std::printf("median %.4f ms  min %.4f ms  checksum %.6e\n", ms[ms.size() / 2], ms[0], sum);
  if (dump != nullptr) {
    FILE* f = std::fopen(dump, "wb");
    if (f == nullptr || std::fwrite(host.data(), 1, host.size(), f) != host.size()) {
      std::fprintf(stderr, "cannot write %s\n", dump);
      std::exit(1);
    }
    std::fclose(f);
  }
}

// Both directions' parameters as the v2 mixer passes them: B, C and the low-rank dt sliced from one
// (batch, seqlen, rank + 2 * 16) x_proj output per direction; A = -(n + 1), dt = softplus(delta + bias)
// spread over [0.001, 0.1] across channels, D = 1.
template <typename T>
void direction_params(ScanParams (&p)[2], int batch, int dim, int seqlen) {
  constexpr int kStates = 16;
  const int rank = (dim / 2 + 15) / 16, row = rank + 2 * kStates;
  std::vector<float> A(int64_t(dim) * kStates), D(dim, 1.f), bias(dim);
  for (int d = 0; d < dim; ++d) {
    for (int n = 0; n < kStates; ++n) A[d * kStates + n] = -(n + 1) * (1.f + 0.01f * (d % 7));
    bias[d] = std::log(std::expm1(0.001f * std::pow(100.f, float(d % 97) / 96.f)));
  }
  for (int dir = 0; dir < 2; ++dir) {
    ScanParams& q = p[dir];
    std::memset(&q, 0, sizeof(q));
    q.batch = batch;
    q.dim = dim;
    q.seqlen = seqlen;
    q.dstate = kStates;
    q.ngroups = 1;
    q.nchunks = (seqlen + kChunk - 1) / kChunk;
    q.delta_softplus = true;
    q.reverse = dir == 1;
    q.out_scale = 1.f;
    q.token_major = true;
    T* x_dbl = uniform<T>(int64_t(batch) * seqlen * row, 10 + dir, -1.f, 1.f);
    q.dt_low = x_dbl;
    q.dt_low_batch_stride = int64_t(seqlen) * row;
    q.dt_low_rank_stride = 1;
    q.dt_low_seq_stride = row;
    q.dt_proj = uniform<float>(int64_t(dim) * rank, 20 + dir, -0.3f, 0.3f);
    q.rank = rank;
    q.B = x_dbl + rank;
    q.C = x_dbl + rank + kStates;
    q.B_batch_stride = q.C_batch_stride = q.B_group_stride = q.C_group_stride = int64_t(seqlen) * row;
    q.B_state_stride = q.C_state_stride = 1;
    q.B_seq_stride = q.C_seq_stride = row;
    q.A = from_host(A);
    q.D = from_host(D);
    q.delta_bias = from_host(bias);
  }
}

template <typename T>
void run_scan(const std::string& kernel, int batch, int dim, int seqlen, int iters, const char* dump) {
  constexpr bool kBf16 = !std::is_same_v<T, float>;
  const int64_t n = int64_t(batch) * seqlen * dim;
  ScanParams p[2];
  direction_params<T>(p, batch, dim, seqlen);
  T* out = uninitialised<T>(n);
  if (kernel == "scan-infer") {
    // x and z are the halves of one (batch, seqlen, 2 dim) in_proj output; the output holds the forward
    // direction's y until the reverse one adds it (as in bf16 inference; fp32 sums in fp32 either way).
    T* xz = uniform<T>(2 * n, 1, -2.f, 2.f);
    for (int dir = 0; dir < 2; ++dir) {
      ScanParams& q = p[dir];
      q.u = xz;
      q.u_batch_stride = int64_t(seqlen) * 2 * dim;
      q.u_dim_stride = 1;
      q.u_seq_stride = 2 * dim;
      q.conv_weight = uniform<float>(int64_t(dim) * 4, 30 + dir, -0.5f, 0.5f);
      q.conv_bias = uniform<float>(dim, 40 + dir, -0.2f, 0.2f);
      q.conv_width = 4;
      q.acc_fp32 = !kBf16;
    }
    p[1].z = xz + dim;
    p[1].z_batch_stride = int64_t(seqlen) * 2 * dim;
    p[1].z_dim_stride = 1;
    p[1].z_seq_stride = 2 * dim;
    p[0].y_acc_out = p[1].out = out;
    p[1].y_acc_in = out;
    p[1].out_scale = 0.5f;
    time_and_report([&] { return ss_bifwd_launch<T>(p[0], p[1], 0); }, iters, out, n * sizeof(T), kBf16, dump);
    return;
  }
  // Training: u is each direction's conv output, z the second half of the (batch, seqlen, 2 dim) in_proj
  // output; the forward saves checkpoints and the fp32 sum.
  float* ysum = uninitialised<float>(n);
  float* ckpt[2];
  const T* z = uniform<T>(2 * n, 60, -2.f, 2.f) + dim;
  for (int dir = 0; dir < 2; ++dir) {
    ScanParams& q = p[dir];
    q.u = uniform<T>(n, 50 + dir, -1.f, 1.f);
    q.u_batch_stride = int64_t(seqlen) * dim;
    q.u_dim_stride = 1;
    q.u_seq_stride = dim;
    q.z = z;
    q.z_batch_stride = int64_t(seqlen) * 2 * dim;
    q.z_dim_stride = 1;
    q.z_seq_stride = 2 * dim;
    ckpt[dir] = uninitialised<float>(int64_t(batch) * dim * q.nchunks * kMaxState);
    q.ckpt = ckpt[dir];
    q.acc_fp32 = true;
  }
  p[0].z = nullptr;  // the forward direction is not gated
  p[0].y_acc_out = p[1].y_acc_out = ysum;
  p[1].y_acc_in = ysum;
  p[1].out = out;
  p[1].out_scale = 0.5f;
  if (kernel == "scan-train") {
    time_and_report([&] { return ss_bifwd_launch<T>(p[0], p[1], 0); }, iters, out, n * sizeof(T), kBf16, dump);
    return;
  }
  check(ss_bifwd_launch<T>(p[0], p[1], 0), "training forward");
  // Backward: each direction's full-size delta (the training backward's input), both directions gated by z;
  // dz written once.
  T* dout = uniform<T>(n, 71, -1.f, 1.f);
  T* grads = uninitialised<T>(5 * n);  // du and ddelta of each direction, dz
  for (int dir = 0; dir < 2; ++dir) {
    ScanParams& q = p[dir];
    q.dt_low = nullptr;
    q.dt_proj = nullptr;
    q.rank = 0;
    q.delta = uniform<T>(n, 70 + dir, -3.f, 1.f);
    q.delta_batch_stride = int64_t(seqlen) * dim;
    q.delta_dim_stride = 1;
    q.delta_seq_stride = dim;
    q.z = z;
    q.dout = dout;
    q.ysum = ysum;
    q.out_scale = 0.5f;
    q.y_acc_in = nullptr;
    q.y_acc_out = q.out = nullptr;
    q.du = grads + 2 * dir * n;
    q.ddelta = grads + (2 * dir + 1) * n;
    q.dz = grads + 4 * n;
    q.write_dz = dir == 0;
    q.dA = uninitialised<float>(int64_t(dim) * q.dstate);
    q.dB = uninitialised<float>(int64_t(batch) * q.dstate * seqlen);
    q.dC = uninitialised<float>(int64_t(batch) * q.dstate * seqlen);
    q.dD = uninitialised<float>(dim);
    q.ddelta_bias = uninitialised<float>(dim);
  }
  // dA, dB, dC, dD and ddelta_bias accumulate by atomics in an order that varies: not part of the output.
  time_and_report([&] { return ss_bibwd_launch<T>(p[0], p[1], 0); }, iters, grads, 5 * n * sizeof(T), kBf16, dump);
}

void run_conv_x_proj(int batch, int dim, int seqlen, int iters, const char* dump) {
  using T = __nv_bfloat16;
  const int out_dim = (dim / 2 + 15) / 16 + 32;
  ConvProjParams p{};
  p.batch = batch;
  p.dim = dim;
  p.seqlen = seqlen;
  p.conv_width = 4;
  p.out_dim = out_dim;
  p.x = uniform<T>(int64_t(batch) * seqlen * 2 * dim, 1, -2.f, 2.f);  // x half of the in_proj output
  p.x_batch_stride = int64_t(seqlen) * 2 * dim;
  p.x_seq_stride = 2 * dim;
  T* out = uninitialised<T>(2 * int64_t(batch) * seqlen * out_dim);
  for (int dir = 0; dir < 2; ++dir) {
    p.conv_weight[dir] = uniform<float>(int64_t(dim) * 4, 30 + dir, -0.5f, 0.5f);
    p.conv_bias[dir] = uniform<float>(dim, 40 + dir, -0.2f, 0.2f);
    p.proj_weight[dir] = uniform<T>(int64_t(out_dim) * dim, 50 + dir, -0.1f, 0.1f);
    p.out[dir] = out + dir * int64_t(batch) * seqlen * out_dim;
  }
  time_and_report([&] { return conv_x_proj_cuda<DType::kBFloat16>(p, 0); }, iters, out,
                  2 * int64_t(batch) * seqlen * out_dim * sizeof(T), true, dump);
}

}  // namespace timer

int main(int argc, char** argv) {
  const std::string kernel = argc > 1 ? argv[1] : "";
  const bool known = kernel == "scan-infer" || kernel == "scan-train" || kernel == "scan-bwd" || kernel == "conv-x-proj";
  const std::string dtype = argc > 5 ? argv[5] : "";
  if (argc < 7 || !known || (dtype != "bf16" && dtype != "fp32") || (kernel == "conv-x-proj" && dtype != "bf16")) {
    std::fprintf(stderr,
                 "usage: %s scan-infer|scan-train|scan-bwd|conv-x-proj BATCH DIM SEQLEN bf16|fp32 ITERS [DUMP]\n"
                 "(conv-x-proj: bf16 only)\n",
                 argv[0]);
    return 2;
  }
  const int batch = std::atoi(argv[2]), dim = std::atoi(argv[3]), seqlen = std::atoi(argv[4]), iters = std::atoi(argv[6]);
  if (batch < 1 || dim < 1 || dim % 32 != 0 || seqlen < 1 || iters < 1) {
    std::fprintf(stderr, "BATCH, SEQLEN and ITERS must be positive, DIM a positive multiple of 32\n");
    return 2;
  }
  const char* dump = argc > 7 ? argv[7] : nullptr;
  if (kernel == "conv-x-proj") {
    timer::run_conv_x_proj(batch, dim, seqlen, iters, dump);
  } else if (dtype == "bf16") {
    timer::run_scan<__nv_bfloat16>(kernel, batch, dim, seqlen, iters, dump);
  } else {
    timer::run_scan<float>(kernel, batch, dim, seqlen, iters, dump);
  }
  return 0;
}

// Host side of the causal depthwise conv1d extension: argument checks, allocation and the
// launch on the current stream. The ops are registered in the `causal_conv1d_cuda` library
// (torch.ops.causal_conv1d_cuda.fwd / .bwd, and .bi_fwd / .bi_bwd for both convs of a Vim block); the
// Python package wraps them in differentiable torch.library custom ops (causal_conv1d::*). The module
// itself holds no Python functions.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>

#include "conv_common.h"
#include "seq_layout.h"

namespace causal_conv1d {
namespace {

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "causal_conv1d: x must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "causal_conv1d: ", what, " launch failed: ", cudaGetErrorString(err));
}

using seq_layout::empty_in_layout;
using seq_layout::is_token_major;

// `t` (same shape) with exactly the strides of `like`, keeping t's dtype; a copy only when they differ.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  at::Tensor r = at::empty_strided(like.sizes(), like.strides(), t.options());
  r.copy_(t);
  return r;
}

struct Prepared {
  at::Tensor x, weight, bias;  // weight / bias as contiguous fp32
  ConvParams p{};
};

Prepared prepare(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 bool silu, bool reverse) {
  TORCH_CHECK(x_in.is_cuda(), "causal_conv1d: x must be a CUDA tensor");
  TORCH_CHECK(x_in.dim() == 3, "causal_conv1d: x must be (batch, dim, seqlen), got ", x_in.sizes());
  TORCH_CHECK(weight.dim() == 2, "causal_conv1d: weight must be (dim, width), got ", weight.sizes());
  const int64_t batch = x_in.size(0), dim = x_in.size(1), seqlen = x_in.size(2), width = weight.size(1);
  TORCH_CHECK(weight.size(0) == dim, "causal_conv1d: weight has ", weight.size(0), " channels, x has ", dim);
  TORCH_CHECK(width >= 2 && width <= 4, "causal_conv1d: width must be 2, 3 or 4, got ", width);
  TORCH_CHECK(weight.device() == x_in.device(), "causal_conv1d: weight must be on x's device");
  Prepared r;
  const bool token_major = is_token_major(x_in);
  r.x = token_major || x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  r.weight = weight.to(at::kFloat).contiguous();
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == dim, "causal_conv1d: bias must be (dim,)");
    TORCH_CHECK(bias->device() == x_in.device(), "causal_conv1d: bias must be on x's device");
    r.bias = bias->to(at::kFloat).contiguous();
  }
  TORCH_CHECK(seqlen < (int64_t(1) << 30) && batch * dim < (int64_t(1) << 30), "causal_conv1d: x too large");
  ConvParams& p = r.p;
  p.x = r.x.data_ptr();
  p.weight = r.weight.data_ptr<float>();
  p.bias = r.bias.defined() ? r.bias.data_ptr<float>() : nullptr;
  p.x_batch_stride = r.x.stride(0);
  p.x_dim_stride = r.x.stride(1);
  p.x_seq_stride = r.x.stride(2);
  p.token_major = token_major;
  p.batch = int(batch);
  p.dim = int(dim);
  p.seqlen = int(seqlen);
  p.width = int(width);
  p.silu = silu;
  p.reverse = reverse;
  return r;
}

// Channel-major: one block per (channel, batch split), splitting the batch until there are ~1024
// blocks. Token-major: one partial per block of the (channel, seqlen, batch) grid.
int num_splits(const ConvParams& p) {
  if (p.token_major) {
    return p.batch * ((p.seqlen + kTokenMajorBlockPositions - 1) / kTokenMajorBlockPositions);
  }
  const int want = (1024 + std::max(p.dim, 1) - 1) / std::max(p.dim, 1);
  return std::max(1, std::min(p.batch, want));
}

// The (splits, dim, width + 1) partials summed over splits, in a fixed order (deterministic):
// (dweight (dim, width), dbias (dim,) or empty without a bias), fp32.
std::pair<at::Tensor, at::Tensor> finish_weight_grads(const at::Tensor& partial, bool has_bias) {
  const int64_t width = partial.size(2) - 1;
  at::Tensor sums = partial.sum(0);
  at::Tensor dweight = sums.narrow(1, 0, width).contiguous();
  at::Tensor dbias = has_bias ? sums.select(1, width).contiguous() : at::empty({0}, partial.options());
  return {dweight, dbias};
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    bool silu, bool reverse) {
  c10::cuda::CUDAGuard guard(x.device());
  Prepared r = prepare(x, weight, bias, silu, reverse);
  at::Tensor out = empty_in_layout(r.x);
  if (out.numel() == 0) return out;
  r.p.out = out.data_ptr();
  r.p.splits = num_splits(r.p);
  check_launch(conv_fwd_cuda(to_dtype(x), r.p, c10::cuda::getCurrentCUDAStream()), "forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& dout, bool silu, bool reverse) {
  c10::cuda::CUDAGuard guard(x.device());
  Prepared r = prepare(x, weight, bias, silu, reverse);
  TORCH_CHECK(dout.sizes() == x.sizes(), "causal_conv1d: dout must have x's shape");
  at::Tensor dx = empty_in_layout(r.x);
  at::Tensor dout_c = in_layout_of(dout.to(x.scalar_type()), dx);
  const int splits = num_splits(r.p);
  at::Tensor partial = at::empty({splits, r.p.dim, r.p.width + 1}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    partial.zero_();
  } else {
    r.p.dout = dout_c.data_ptr();
    r.p.dx = dx.data_ptr();
    r.p.dw_partial = partial.data_ptr<float>();
    r.p.splits = splits;
    check_launch(conv_bwd_cuda(to_dtype(x), r.p, c10::cuda::getCurrentCUDAStream()), "backward");
  }
  auto [dweight, dbias] = finish_weight_grads(partial, bias.has_value());
  return {dx, dweight, dbias};
}

// ---- Both directions of a Vim block over one token-major x: causal (f) and anti-causal (b) ----

std::pair<Prepared, Prepared> prepare_bi(const at::Tensor& x, const at::Tensor& weight_f,
                                         const std::optional<at::Tensor>& bias_f, const at::Tensor& weight_b,
                                         const std::optional<at::Tensor>& bias_b, bool silu) {
  Prepared f = prepare(x, weight_f, bias_f, silu, false);
  Prepared b = prepare(x, weight_b, bias_b, silu, true);  // the bidirectional kernels read no `reverse`
  TORCH_CHECK(f.p.token_major, "causal_conv1d: the bidirectional kernels take a token-major x (channel stride 1, "
              "e.g. a (batch, seqlen, dim) tensor transposed); got strides ", x.strides(),
              ": call causal_conv1d once per direction instead");
  TORCH_CHECK(f.p.width == b.p.width, "causal_conv1d: both directions' weights must have one width, got ",
              f.p.width, " and ", b.p.width);
  return {std::move(f), std::move(b)};
}

std::tuple<at::Tensor, at::Tensor> conv_bi_fwd(const at::Tensor& x, const at::Tensor& weight_f,
                                               const std::optional<at::Tensor>& bias_f, const at::Tensor& weight_b,
                                               const std::optional<at::Tensor>& bias_b, bool silu) {
  c10::cuda::CUDAGuard guard(x.device());
  auto [f, b] = prepare_bi(x, weight_f, bias_f, weight_b, bias_b, silu);
  at::Tensor out_f = empty_in_layout(f.x), out_b = empty_in_layout(f.x);
  if (out_f.numel() == 0) return {out_f, out_b};
  f.p.out = out_f.data_ptr();
  b.p.out = out_b.data_ptr();
  check_launch(conv_bi_fwd_cuda(to_dtype(x), f.p, b.p, c10::cuda::getCurrentCUDAStream()), "bidirectional forward");
  return {out_f, out_b};
}

// -> (dx, dweight_f, dbias_f, dweight_b, dbias_b); dx sums both directions' terms.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bi_bwd(
    const at::Tensor& x, const at::Tensor& weight_f, const std::optional<at::Tensor>& bias_f,
    const at::Tensor& weight_b, const std::optional<at::Tensor>& bias_b, const at::Tensor& dout_f,
    const at::Tensor& dout_b, bool silu) {
  c10::cuda::CUDAGuard guard(x.device());
  auto [f, b] = prepare_bi(x, weight_f, bias_f, weight_b, bias_b, silu);
  TORCH_CHECK(dout_f.sizes() == x.sizes() && dout_b.sizes() == x.sizes(), "causal_conv1d: dout must have x's shape");
  at::Tensor dx = empty_in_layout(f.x);
  at::Tensor dout_f_c = in_layout_of(dout_f.to(x.scalar_type()), dx);
  at::Tensor dout_b_c = in_layout_of(dout_b.to(x.scalar_type()), dx);
  const int splits = num_splits(f.p);
  at::Tensor partial_f = at::empty({splits, f.p.dim, f.p.width + 1}, x.options().dtype(at::kFloat));
  at::Tensor partial_b = at::empty_like(partial_f);
  if (x.numel() == 0) {
    partial_f.zero_();
    partial_b.zero_();
  } else {
    f.p.dout = dout_f_c.data_ptr();
    b.p.dout = dout_b_c.data_ptr();
    f.p.dx = dx.data_ptr();
    f.p.dw_partial = partial_f.data_ptr<float>();
    b.p.dw_partial = partial_b.data_ptr<float>();
    f.p.splits = b.p.splits = splits;
    check_launch(conv_bi_bwd_cuda(to_dtype(x), f.p, b.p, c10::cuda::getCurrentCUDAStream()), "bidirectional backward");
  }
  auto [dweight_f, dbias_f] = finish_weight_grads(partial_f, bias_f.has_value());
  auto [dweight_b, dbias_b] = finish_weight_grads(partial_b, bias_b.has_value());
  return {dx, dweight_f, dbias_f, dweight_b, dbias_b};
}

}  // namespace
}  // namespace causal_conv1d

TORCH_LIBRARY(causal_conv1d_cuda, m) {
  m.def("fwd(Tensor x, Tensor weight, Tensor? bias, bool silu, bool reverse) -> Tensor");
  m.def("bwd(Tensor x, Tensor weight, Tensor? bias, Tensor dout, bool silu, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def("bi_fwd(Tensor x, Tensor weight_f, Tensor? bias_f, Tensor weight_b, Tensor? bias_b, bool silu) "
        "-> (Tensor, Tensor)");
  m.def("bi_bwd(Tensor x, Tensor weight_f, Tensor? bias_f, Tensor weight_b, Tensor? bias_b, Tensor dout_f, "
        "Tensor dout_b, bool silu) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(causal_conv1d_cuda, CUDA, m) {
  m.impl("fwd", &causal_conv1d::conv_fwd);
  m.impl("bwd", &causal_conv1d::conv_bwd);
  m.impl("bi_fwd", &causal_conv1d::conv_bi_fwd);
  m.impl("bi_bwd", &causal_conv1d::conv_bi_bwd);
}

// Importing the module (import causal_conv1d_cuda) loads the library and so registers the ops.
static struct PyModuleDef causal_conv1d_module = {PyModuleDef_HEAD_INIT, "causal_conv1d_cuda",
                                                  "CUDA kernels of causal_conv1d (ops in torch.ops.causal_conv1d_cuda)",
                                                  -1, nullptr};
PyMODINIT_FUNC PyInit_causal_conv1d_cuda(void) { return PyModule_Create(&causal_conv1d_module); }

// Host side of the conv + x_proj op: argument checks, allocation and the launch on the current stream,
// registered as torch.ops.selective_scan_cuda.conv_x_proj (the module selective_scan_cuda carries it).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../common/host_checks.h"
#include "conv_x_proj.h"

namespace ssm {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Inference front end of a bidirectional block in bf16/fp16 (conv_x_proj.cu): both directions' convs
// (SiLU; the backward direction's anti-causal) of x and their x_proj products, without the conv outputs.
// x: (batch, dim, seqlen) token-major (channel stride 1, e.g. the x half of the in_proj output).
// -> (x_dbl_f, x_dbl_b), each (batch, seqlen, out_dim) contiguous in x's dtype.
std::tuple<at::Tensor, at::Tensor> conv_x_proj(const at::Tensor& x, const at::Tensor& conv_weight_f,
                                               const OptTensor& conv_bias_f, const at::Tensor& conv_weight_b,
                                               const OptTensor& conv_bias_b, const at::Tensor& proj_weight_f,
                                               const at::Tensor& proj_weight_b) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3, "conv_x_proj: x must be a (batch, dim, seqlen) CUDA tensor, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "conv_x_proj: x must be bfloat16 or float16 (tensor cores), got ", x.scalar_type());
  const int64_t dim = x.size(1);
  TORCH_CHECK(x.stride(1) == 1 || dim == 1, "conv_x_proj: x must be token-major (channel stride 1), got strides ",
              x.strides());
  TORCH_CHECK(dim % 8 == 0, "conv_x_proj: dim must be a multiple of 8, got ", dim);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0 && x.stride(0) % 2 == 0 && x.stride(2) % 2 == 0,
              "conv_x_proj: x must hold channel pairs 4-byte aligned (even strides, aligned start), got strides ",
              x.strides());
  TORCH_CHECK(x.size(0) <= 65535, "conv_x_proj: batch must be at most 65535 (the grid's y dimension), got ",
              x.size(0), "; run it on smaller batches");
  c10::cuda::CUDAGuard guard(x.device());
  ConvProjParams p{};
  p.batch = int(x.size(0));
  p.dim = int(dim);
  p.seqlen = int(x.size(2));
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_seq_stride = x.stride(2);
  const at::Tensor* conv_weights[2] = {&conv_weight_f, &conv_weight_b};
  const OptTensor* conv_biases[2] = {&conv_bias_f, &conv_bias_b};
  const at::Tensor* proj_weights[2] = {&proj_weight_f, &proj_weight_b};
  at::Tensor conv_w[2], conv_b[2], proj_w[2], out[2];  // hold what the raw pointers in p point into
  for (int dir = 0; dir < 2; ++dir) {
    const at::Tensor& w = *conv_weights[dir];
    TORCH_CHECK(w.dim() == 2 && w.size(0) == dim && w.size(1) >= 1 && w.size(1) <= 4,
                "conv_x_proj: conv weights must be (dim, width) with dim = ", dim, " and width <= 4, got ", w.sizes());
    TORCH_CHECK(dir == 0 || w.size(1) == p.conv_width, "conv_x_proj: both conv weights must have one width");
    p.conv_width = int(w.size(1));
    conv_w[dir] = f32_param(w, x, "conv_x_proj", "conv_weight", "x");
    p.conv_weight[dir] = conv_w[dir].data_ptr<float>();
    if (conv_biases[dir]->has_value()) {
      const at::Tensor& bias = **conv_biases[dir];
      TORCH_CHECK(bias.dim() == 1 && bias.size(0) == dim, "conv_x_proj: conv biases must be (dim,), got ", bias.sizes());
      conv_b[dir] = f32_param(bias, x, "conv_x_proj", "conv_bias", "x");
      p.conv_bias[dir] = conv_b[dir].data_ptr<float>();
    }
    const at::Tensor& pw = *proj_weights[dir];
    TORCH_CHECK(pw.dim() == 2 && pw.size(1) == dim && pw.size(0) >= 1 && pw.size(0) <= kMaxConvProjOut &&
                    pw.size(0) == proj_weight_f.size(0),
                "conv_x_proj: x_proj weights must both be (out_dim, dim) with dim = ", dim, " and out_dim <= ",
                kMaxConvProjOut, ", got ", proj_weight_f.sizes(), " and ", proj_weight_b.sizes());
    TORCH_CHECK(pw.device() == x.device(), "conv_x_proj: x_proj weights must be on x's device");
    proj_w[dir] = pw.to(x.scalar_type()).contiguous();
    // The kernel copies its rows 16 bytes at a time: a view that starts off that alignment is copied.
    if (reinterpret_cast<uintptr_t>(proj_w[dir].data_ptr()) % 16 != 0) proj_w[dir] = proj_w[dir].clone();
    p.proj_weight[dir] = proj_w[dir].data_ptr();
    p.out_dim = int(pw.size(0));
    out[dir] = at::empty({p.batch, p.seqlen, p.out_dim}, x.options());
    p.out[dir] = out[dir].data_ptr();
  }
  if (out[0].numel() > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    check_launch(x.scalar_type() == at::kHalf ? conv_x_proj_cuda<DType::kFloat16>(p, stream)
                                              : conv_x_proj_cuda<DType::kBFloat16>(p, stream),
                 "conv_x_proj", "kernel");
  }
  return {out[0], out[1]};
}

}  // namespace
}  // namespace ssm

TORCH_LIBRARY_FRAGMENT(selective_scan_cuda, m) {
  m.def(
      "conv_x_proj(Tensor x, Tensor conv_weight_f, Tensor? conv_bias_f, Tensor conv_weight_b, Tensor? conv_bias_b, "
      "Tensor proj_weight_f, Tensor proj_weight_b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(selective_scan_cuda, CUDA, m) { m.impl("conv_x_proj", &ssm::conv_x_proj); }

// Host side of the residual add + RMSNorm op: argument checks, allocation and the launch on the current
// stream, registered as torch.ops.selective_scan_cuda.add_rms_norm (the module selective_scan_cuda carries it).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../common/host_checks.h"
#include "rms_norm.h"

namespace ssm {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Inference residual add + RMSNorm over x's last dim: (out in x's dtype, stream = x + residual in fp32 when
// stream_fp32 else in x's dtype; stream empty unless return_stream).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const OptTensor& residual,
                                                const at::Tensor& weight, const OptTensor& bias, double eps,
                                                bool stream_fp32, bool return_stream) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1 && x.is_contiguous(), "add_rms_norm: x must be a contiguous CUDA tensor");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= kMaxNormHidden, "add_rms_norm: the last dim must be 1..", kMaxNormHidden,
              ", got ", hidden);
  const at::ScalarType stream_type = stream_fp32 ? at::kFloat : x.scalar_type();
  NormParams p{};
  p.rows = x.numel() / hidden;
  p.hidden = int(hidden);
  p.eps = float(eps);
  TORCH_CHECK(p.rows / kNormRowsPerBlock < (int64_t(1) << 31), "add_rms_norm: too many rows");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() && residual->scalar_type() == stream_type &&
                    residual->device() == x.device(),
                "add_rms_norm: residual must be contiguous, on x's device, with x's shape and the stream's dtype");
    p.residual = residual->data_ptr();
  }
  const at::Tensor w = f32_param(weight, x, "add_rms_norm", "weight", "x");
  TORCH_CHECK(w.numel() == hidden, "add_rms_norm: weight must have ", hidden, " elements, got ", w.numel());
  p.weight = w.data_ptr<float>();
  at::Tensor b;
  if (bias.has_value()) {
    b = f32_param(*bias, x, "add_rms_norm", "bias", "x");
    TORCH_CHECK(b.numel() == hidden, "add_rms_norm: bias must have ", hidden, " elements, got ", b.numel());
    p.bias = b.data_ptr<float>();
  }
  c10::cuda::CUDAGuard guard(x.device());
  p.x = x.data_ptr();
  at::Tensor out = at::empty(x.sizes(), x.options());
  p.out = out.data_ptr();
  at::Tensor stream = at::empty(return_stream ? x.sizes() : at::IntArrayRef{0}, x.options().dtype(stream_type));
  p.stream = return_stream ? stream.data_ptr() : nullptr;
  if (p.rows == 0) return {out, stream};
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaErrorInvalidValue;
  switch (x.scalar_type()) {
    case at::kFloat: err = add_rms_norm_cuda<DType::kFloat32, true>(p, s); break;
    case at::kHalf:
      err = stream_fp32 ? add_rms_norm_cuda<DType::kFloat16, true>(p, s) : add_rms_norm_cuda<DType::kFloat16, false>(p, s);
      break;
    case at::kBFloat16:
      err = stream_fp32 ? add_rms_norm_cuda<DType::kBFloat16, true>(p, s)
                        : add_rms_norm_cuda<DType::kBFloat16, false>(p, s);
      break;
    default: TORCH_CHECK(false, "add_rms_norm: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  check_launch(err, "add_rms_norm", "kernel");
  return {out, stream};
}

}  // namespace
}  // namespace ssm

TORCH_LIBRARY_FRAGMENT(selective_scan_cuda, m) {
  m.def(
      "add_rms_norm(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool stream_fp32, "
      "bool return_stream) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(selective_scan_cuda, CUDA, m) { m.impl("add_rms_norm", &ssm::add_rms_norm); }

// Argument and launch checks shared by the host bindings of the selective_scan_cuda extension.
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

namespace ssm {

inline void check_launch(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, op, ": ", what, " launch failed: ", cudaGetErrorString(err));
}

// A parameter as the kernels read it: contiguous fp32, on the device of the input `like` (named like_name).
inline at::Tensor f32_param(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name,
                            const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like_name, "'s device");
  return t.to(at::kFloat).contiguous();
}

}  // namespace ssm

// Backward instantiations (all dtypes and widths: the conv kernels are small).
#include "conv_kernels.cuh"

namespace causal_conv1d {
cudaError_t conv_bwd_cuda(DType dtype, const ConvParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return conv_bwd_launch_impl<float>(p, stream);
    case DType::kFloat16: return conv_bwd_launch_impl<__half>(p, stream);
    case DType::kBFloat16: return conv_bwd_launch_impl<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t conv_bi_bwd_cuda(DType dtype, const ConvParams& f, const ConvParams& b, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return conv_bi_tm_launch<float>(f, b, true, stream);
    case DType::kFloat16: return conv_bi_tm_launch<__half>(f, b, true, stream);
    case DType::kBFloat16: return conv_bi_tm_launch<__nv_bfloat16>(f, b, true, stream);
  }
  return cudaErrorInvalidValue;
}
}  // namespace causal_conv1d

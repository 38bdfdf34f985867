// Selective scan fwd, fp16 inputs: single direction and fused bidirectional (one file per dtype
// and direction, so that the build compiles them in parallel).
#include "ss_kernels.cuh"

namespace ssm {
template <>
cudaError_t ss_fwd_cuda<DType::kFloat16>(const ScanParams& p, cudaStream_t stream) {
  return ss_fwd_launch<TypeOf<DType::kFloat16>::type>(p, stream);
}
template <>
cudaError_t ss_bifwd_cuda<DType::kFloat16>(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream) {
  return ss_bifwd_launch<TypeOf<DType::kFloat16>::type>(pf, pb, stream);
}
}  // namespace ssm

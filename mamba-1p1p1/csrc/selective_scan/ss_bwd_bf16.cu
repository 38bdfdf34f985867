// Selective scan bwd, bf16 inputs: single direction and fused bidirectional (one file per dtype
// and direction, so that the build compiles them in parallel).
#include "ss_kernels.cuh"

namespace ssm {
template <>
cudaError_t ss_bwd_cuda<DType::kBFloat16>(const ScanParams& p, cudaStream_t stream) {
  return ss_bwd_launch<TypeOf<DType::kBFloat16>::type>(p, stream);
}
template <>
cudaError_t ss_bibwd_cuda<DType::kBFloat16>(const ScanParams& pf, const ScanParams& pb, cudaStream_t stream) {
  return ss_bibwd_launch<TypeOf<DType::kBFloat16>::type>(pf, pb, stream);
}
}  // namespace ssm

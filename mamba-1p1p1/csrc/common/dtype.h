// The element types the kernels are instantiated for, shared by the host bindings and the kernels.
#pragma once

namespace ssm {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace ssm

// The two layouts of (batch, dim, seqlen) tensors that both extensions (selective_scan_cuda and
// selective_scan_cpu) read and write. Token-major: channel stride 1 (a (batch, seqlen, dim) tensor seen
// as (batch, dim, seqlen), as a linear layer writes it); otherwise contiguous. The same rule as
// causal_conv1d.layout.is_token_major, which the ops' fake implementations use.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace seq_layout {

inline bool is_token_major(const at::Tensor& t) {
  return t.dim() == 3 && t.size(1) > 1 && t.size(2) > 1 && t.stride(1) == 1 && t.stride(2) != 1;
}

// A new (batch, dim, seqlen) tensor: (batch, seqlen, dim) contiguous, transposed, when token-major.
inline at::Tensor empty_seq(int64_t batch, int64_t dim, int64_t seqlen, bool token_major,
                            const at::TensorOptions& opt) {
  if (token_major) return at::empty({batch, seqlen, dim}, opt).transpose(1, 2);
  return at::empty({batch, dim, seqlen}, opt);
}

}  // namespace seq_layout

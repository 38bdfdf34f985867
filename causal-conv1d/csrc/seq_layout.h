// The token-major layout rule in C++, for every extension of both kernel packages (causal_conv1d_cuda,
// selective_scan_cuda, selective_scan_cpu; mamba-1p1p1 compiles against this folder). Its Python twin is
// causal_conv1d/layout.py, which the ops' fake implementations use.
// A (batch, dim, seqlen) tensor is token-major when its channel stride is 1 (a (batch, seqlen, dim) tensor
// seen as (batch, dim, seqlen), as a linear layer writes it); the kernels return new tensors in the layout
// of their main input, token-major or contiguous.
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

// A new tensor of like's (batch, dim, seqlen) shape and options, in like's layout.
inline at::Tensor empty_in_layout(const at::Tensor& like) {
  return empty_seq(like.size(0), like.size(1), like.size(2), is_token_major(like), like.options());
}

}  // namespace seq_layout

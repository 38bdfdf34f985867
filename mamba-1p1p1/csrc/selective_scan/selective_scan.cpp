// Host side of the selective-scan extension: argument checks, allocation and the launches on
// the current stream. Ops live in the `selective_scan_cuda` library (with the RMSNorm and conv + x_proj ops
// of ../rms_norm and ../conv_x_proj, which this module carries) (torch.ops.selective_scan_cuda.*);
// the Python package wraps them in differentiable torch.library custom ops (mamba_ssm::*).
// The module itself holds no Python functions: importing it registers the ops.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/host_checks.h"
#include "seq_layout.h"
#include "ss_common.h"

namespace ssm {
namespace {

using OptTensor = std::optional<at::Tensor>;
using seq_layout::empty_seq;
using seq_layout::is_token_major;

void check_launch(cudaError_t err, const char* what) { ssm::check_launch(err, "selective_scan", what); }

cudaError_t launch_fwd(at::ScalarType t, const ScanParams& p, cudaStream_t s) {
  switch (t) {
    case at::kFloat: return ss_fwd_cuda<DType::kFloat32>(p, s);
    case at::kHalf: return ss_fwd_cuda<DType::kFloat16>(p, s);
    case at::kBFloat16: return ss_fwd_cuda<DType::kBFloat16>(p, s);
    default: TORCH_CHECK(false, "selective_scan: u must be float32, float16 or bfloat16, got ", t);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_bwd(at::ScalarType t, const ScanParams& p, cudaStream_t s) {
  switch (t) {
    case at::kFloat: return ss_bwd_cuda<DType::kFloat32>(p, s);
    case at::kHalf: return ss_bwd_cuda<DType::kFloat16>(p, s);
    case at::kBFloat16: return ss_bwd_cuda<DType::kBFloat16>(p, s);
    default: TORCH_CHECK(false, "selective_scan: u must be float32, float16 or bfloat16, got ", t);
  }
  return cudaErrorInvalidValue;
}

// (batch, dim, seqlen) operand in u's dtype with unit stride along channels (token-major) or along
// positions (channel-major); copied only when it has neither.
at::Tensor seq_operand(const at::Tensor& t, const at::Tensor& u, bool token_major, const char* name) {
  TORCH_CHECK(t.sizes() == u.sizes(), "selective_scan: ", name, " must have u's shape ", u.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == u.device(), "selective_scan: ", name, " must be on u's device");
  at::Tensor r = t.scalar_type() == u.scalar_type() ? t : t.to(u.scalar_type());
  if (token_major) return r.stride(1) == 1 ? r : r.transpose(1, 2).contiguous().transpose(1, 2);
  return r.stride(2) == 1 ? r : r.contiguous();
}

// `t` (same shape) with exactly the strides of `like`, keeping t's dtype; a copy only when they differ.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  at::Tensor r = at::empty_strided(like.sizes(), like.strides(), t.options());
  r.copy_(t);
  return r;
}

at::Tensor f32_param(const at::Tensor& t, const at::Tensor& u, const char* name) {
  return ssm::f32_param(t, u, "selective_scan", name, "u");
}

// Holds the tensors that the raw pointers in `p` point into.
struct Prepared {
  at::Tensor u, delta, z, A, B, C, D, delta_bias, dt_proj, conv_weight, conv_bias;
  ScanParams p{};
};

// token_major: the layout the kernel runs in (that of u, or of the other direction's u). With dt_proj
// (dim, rank), `delta` is the low-rank dt (batch, rank, seqlen) and the kernels form delta themselves.
Prepared prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
                 bool delta_softplus, bool reverse, bool token_major, const OptTensor& dt_proj = std::nullopt) {
  TORCH_CHECK(u.is_cuda(), "selective_scan: u must be a CUDA tensor");
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be (batch, dim, seqlen), got ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "selective_scan: A must be (dim, dstate) with dim = ", dim,
              ", got ", A.sizes());
  TORCH_CHECK(!A.is_complex(), "selective_scan: complex A is not supported");
  const int64_t dstate = A.size(1);
  TORCH_CHECK(dstate >= 1 && dstate <= kMaxState, "selective_scan: dstate must be between 1 and ", kMaxState,
              " (the kernels hold at most ", kMaxState, " states per channel), got ", dstate);
  TORCH_CHECK(B.dim() == 4 && C.dim() == 4,
              "selective_scan: B and C must be (batch, groups, dstate, seqlen), got ", B.sizes(), " and ", C.sizes());
  const int64_t groups = B.size(1);
  TORCH_CHECK(B.size(0) == batch && B.size(2) == dstate && B.size(3) == seqlen && C.sizes() == B.sizes(),
              "selective_scan: B and C must be (", batch, ", groups, ", dstate, ", ", seqlen, "), got ", B.sizes(),
              " and ", C.sizes());
  TORCH_CHECK(groups >= 1 && dim % groups == 0, "selective_scan: dim ", dim, " is not divisible by groups ", groups);
  TORCH_CHECK(batch <= 65535, "selective_scan: batch must be at most 65535");
  TORCH_CHECK(seqlen < (int64_t(1) << 30) && dim < (int64_t(1) << 24), "selective_scan: input too large");

  Prepared r;
  r.u = seq_operand(u, u, token_major, "u");
  if (dt_proj.has_value()) {
    TORCH_CHECK(delta.dim() == 3 && delta.size(0) == batch && delta.size(2) == seqlen && delta.size(1) >= 1 &&
                    delta.size(1) <= kMaxDeltaRank,
                "bimamba_scan: with delta_proj_weight, delta must be the low-rank dt (batch, rank, seqlen) with "
                "rank <= ", kMaxDeltaRank, "; got ", delta.sizes());
    TORCH_CHECK(dt_proj->dim() == 2 && dt_proj->size(0) == dim && dt_proj->size(1) == delta.size(1),
                "bimamba_scan: delta_proj_weight must be (dim, rank) = (", dim, ", ", delta.size(1), "), got ",
                dt_proj->sizes());
    TORCH_CHECK(delta.device() == u.device(), "bimamba_scan: delta must be on u's device");
    r.delta = delta.to(u.scalar_type());
    r.dt_proj = f32_param(*dt_proj, u, "delta_proj_weight");
  } else {
    r.delta = seq_operand(delta, u, token_major, "delta");
  }
  if (z.has_value()) r.z = seq_operand(*z, u, token_major, "z");
  r.A = f32_param(A, u, "A");
  TORCH_CHECK(B.device() == u.device() && C.device() == u.device(), "selective_scan: B, C must be on u's device");
  r.B = B.to(u.scalar_type());
  r.C = C.to(u.scalar_type());
  if (D.has_value()) {
    TORCH_CHECK(D->numel() == dim, "selective_scan: D must be (dim,)");
    r.D = f32_param(*D, u, "D").view({dim});
  }
  if (delta_bias.has_value()) {
    TORCH_CHECK(delta_bias->numel() == dim, "selective_scan: delta_bias must be (dim,)");
    r.delta_bias = f32_param(*delta_bias, u, "delta_bias").view({dim});
  }
  ScanParams& p = r.p;
  p.batch = int(batch);
  p.dim = int(dim);
  p.seqlen = int(seqlen);
  p.dstate = int(dstate);
  p.ngroups = int(groups);
  p.nchunks = int((seqlen + kChunk - 1) / kChunk);
  p.delta_softplus = delta_softplus;
  p.reverse = reverse;
  p.out_scale = 1.f;
  p.token_major = token_major;
  p.u = r.u.data_ptr();
  p.u_batch_stride = r.u.stride(0);
  p.u_dim_stride = r.u.stride(1);
  p.u_seq_stride = r.u.stride(2);
  if (r.dt_proj.defined()) {
    p.dt_low = r.delta.data_ptr();
    p.dt_low_batch_stride = r.delta.stride(0);
    p.dt_low_rank_stride = r.delta.stride(1);
    p.dt_low_seq_stride = r.delta.stride(2);
    p.dt_proj = r.dt_proj.data_ptr<float>();
    p.rank = int(r.delta.size(1));
  } else {
    p.delta = r.delta.data_ptr();
    p.delta_batch_stride = r.delta.stride(0);
    p.delta_dim_stride = r.delta.stride(1);
    p.delta_seq_stride = r.delta.stride(2);
  }
  if (r.z.defined()) {
    p.z = r.z.data_ptr();
    p.z_batch_stride = r.z.stride(0);
    p.z_dim_stride = r.z.stride(1);
    p.z_seq_stride = r.z.stride(2);
  }
  p.B = r.B.data_ptr();
  p.B_batch_stride = r.B.stride(0);
  p.B_group_stride = r.B.stride(1);
  p.B_state_stride = r.B.stride(2);
  p.B_seq_stride = r.B.stride(3);
  p.C = r.C.data_ptr();
  p.C_batch_stride = r.C.stride(0);
  p.C_group_stride = r.C.stride(1);
  p.C_state_stride = r.C.stride(2);
  p.C_seq_stride = r.C.stride(3);
  p.A = r.A.data_ptr<float>();
  p.D = r.D.defined() ? r.D.data_ptr<float>() : nullptr;
  p.delta_bias = r.delta_bias.defined() ? r.delta_bias.data_ptr<float>() : nullptr;
  return r;
}

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options().dtype(at::kFloat)); }

// -> (out, last_state or empty, ckpt or empty)
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta,
                                                        const at::Tensor& A, const at::Tensor& B,
                                                        const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                                                        const OptTensor& delta_bias, bool delta_softplus,
                                                        bool return_last_state, bool save_ckpt, bool reverse) {
  c10::cuda::CUDAGuard guard(u.device());
  Prepared r = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, is_token_major(u));
  ScanParams& p = r.p;
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = empty_seq(p.batch, p.dim, p.seqlen, p.token_major, u.options());
  at::Tensor last = return_last_state ? at::empty({p.batch, p.dim, p.dstate}, f32) : empty0(u);
  at::Tensor ckpt = save_ckpt ? at::empty({p.batch, p.dim, p.nchunks, kMaxState}, f32) : empty0(u);
  if (out.numel() == 0) {
    if (return_last_state) last.zero_();
    return {out, last, ckpt};
  }
  p.out = out.data_ptr();
  p.last_state = return_last_state ? last.data_ptr<float>() : nullptr;
  p.ckpt = save_ckpt ? ckpt.data_ptr<float>() : nullptr;
  check_launch(launch_fwd(u.scalar_type(), p, c10::cuda::getCurrentCUDAStream()), "forward");
  return {out, last, ckpt};
}

// Gradient buffers of one direction; fills the backward fields of `p`.
struct Grads {
  at::Tensor du, ddelta, dA, dB, dC, dD, ddb;
};

Grads alloc_grads(ScanParams& p, const at::Tensor& u, bool has_D, bool has_bias) {
  const auto f32 = u.options().dtype(at::kFloat);
  Grads g;
  g.du = empty_seq(p.batch, p.dim, p.seqlen, p.token_major, u.options());
  g.ddelta = empty_seq(p.batch, p.dim, p.seqlen, p.token_major, u.options());
  g.dA = at::zeros({p.dim, p.dstate}, f32);
  g.dB = at::zeros({p.batch, p.ngroups, p.dstate, p.seqlen}, f32);
  g.dC = at::zeros({p.batch, p.ngroups, p.dstate, p.seqlen}, f32);
  g.dD = has_D ? at::zeros({p.dim}, f32) : empty0(u);
  g.ddb = has_bias ? at::zeros({p.dim}, f32) : empty0(u);
  p.du = g.du.data_ptr();
  p.ddelta = g.ddelta.data_ptr();
  p.dA = g.dA.data_ptr<float>();
  p.dB = g.dB.data_ptr<float>();
  p.dC = g.dC.data_ptr<float>();
  p.dD = has_D ? g.dD.data_ptr<float>() : nullptr;
  p.ddelta_bias = has_bias ? g.ddb.data_ptr<float>() : nullptr;
  return g;
}

at::Tensor check_ckpt(const at::Tensor& ckpt, const ScanParams& p) {
  TORCH_CHECK(ckpt.dim() == 4 && ckpt.size(0) == p.batch && ckpt.size(1) == p.dim && ckpt.size(2) == p.nchunks &&
                  ckpt.size(3) == kMaxState && ckpt.scalar_type() == at::kFloat,
              "selective_scan: ckpt must be the fp32 (batch, dim, nchunks, ", kMaxState,
              ") tensor saved by the forward, got ", ckpt.sizes());
  return ckpt.contiguous();
}

// -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); absent gradients are empty tensors.
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                                 const OptTensor& delta_bias, const at::Tensor& dout, const OptTensor& dlast,
                                 const at::Tensor& ckpt, bool delta_softplus, bool reverse) {
  c10::cuda::CUDAGuard guard(u.device());
  Prepared r = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, is_token_major(u));
  ScanParams& p = r.p;
  at::Tensor ckpt_c = check_ckpt(ckpt, p);
  TORCH_CHECK(dout.sizes() == u.sizes(), "selective_scan: dout must have u's shape");
  at::Tensor dlast_c;
  if (dlast.has_value()) {
    TORCH_CHECK(dlast->numel() == int64_t(p.batch) * p.dim * p.dstate, "selective_scan: dlast must be (batch, dim, dstate)");
    dlast_c = dlast->to(at::kFloat).contiguous();
  }
  Grads g = alloc_grads(p, u, D.has_value(), delta_bias.has_value());
  at::Tensor dout_c = in_layout_of(dout.to(u.scalar_type()), g.du);
  at::Tensor dz = z.has_value() ? empty_seq(p.batch, p.dim, p.seqlen, p.token_major, u.options()) : empty0(u);
  if (g.du.numel() > 0) {
    p.dout = dout_c.data_ptr();
    p.dlast = dlast_c.defined() ? dlast_c.data_ptr<float>() : nullptr;
    p.ckpt = ckpt_c.data_ptr<float>();
    p.write_dz = true;
    p.dz = z.has_value() ? dz.data_ptr() : nullptr;
    check_launch(launch_bwd(u.scalar_type(), p, c10::cuda::getCurrentCUDAStream()), "backward");
  }
  return {g.du, g.ddelta, g.dA, g.dB.to(u.scalar_type()), g.dC.to(u.scalar_type()), g.dD, dz, g.ddb};
}

// ---- Fused bidirectional scan: out = silu(z) * (y_f + y_b), direction b scanned from the end ----

// With conv_weight (dim, width) [and conv_bias (dim,)], the forward applies silu(conv(u)) itself.
void set_conv(Prepared& r, const at::Tensor& u, const OptTensor& weight, const OptTensor& bias) {
  if (!weight.has_value()) return;
  TORCH_CHECK(weight->dim() == 2 && weight->size(0) == u.size(1) && weight->size(1) >= 1 && weight->size(1) <= 4,
              "bimamba_scan: conv_weight must be (dim, width) with dim = ", u.size(1), " and width <= 4, got ",
              weight->sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == u.size(1)),
              "bimamba_scan: conv_bias must be (dim,)");
  r.conv_weight = f32_param(*weight, u, "conv_weight");
  r.p.conv_weight = r.conv_weight.data_ptr<float>();
  r.p.conv_width = int(weight->size(1));
  if (bias.has_value()) {
    r.conv_bias = f32_param(*bias, u, "conv_bias");
    r.p.conv_bias = r.conv_bias.data_ptr<float>();
  }
}

template <typename Fn>
cudaError_t dispatch_bi(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(std::integral_constant<DType, DType::kFloat32>{});
    case at::kHalf: return fn(std::integral_constant<DType, DType::kFloat16>{});
    case at::kBFloat16: return fn(std::integral_constant<DType, DType::kBFloat16>{});
    default: TORCH_CHECK(false, "bimamba_scan: u must be float32, float16 or bfloat16, got ", t);
  }
  return cudaErrorInvalidValue;
}

void check_pair(const Prepared& rf, const Prepared& rb, const at::Tensor& u_f, const at::Tensor& u_b) {
  TORCH_CHECK(u_f.sizes() == u_b.sizes() && u_f.scalar_type() == u_b.scalar_type(),
              "bimamba_scan: both directions need the same shapes and dtype");
  TORCH_CHECK(rf.p.dstate == rb.p.dstate && rf.p.ngroups == rb.p.ngroups,
              "bimamba_scan: both directions need the same dstate and groups");
}

// -> (out = silu(z) * ysum * out_scale, ysum = y_f + y_b in fp32 (ungated, unscaled, for the backward),
// ckpt_f, ckpt_b); ysum and the checkpoints are empty unless save_ckpt.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bi_fwd(
    const at::Tensor& u_f, const at::Tensor& delta_f, const at::Tensor& A_f, const at::Tensor& B_f,
    const at::Tensor& C_f, const OptTensor& D_f, const OptTensor& bias_f, const at::Tensor& u_b,
    const at::Tensor& delta_b, const at::Tensor& A_b, const at::Tensor& B_b, const at::Tensor& C_b,
    const OptTensor& D_b, const OptTensor& bias_b, const at::Tensor& z, const OptTensor& dt_proj_f,
    const OptTensor& dt_proj_b, const OptTensor& conv_weight_f, const OptTensor& conv_bias_f,
    const OptTensor& conv_weight_b, const OptTensor& conv_bias_b, bool delta_softplus, bool save_ckpt,
    double out_scale) {
  c10::cuda::CUDAGuard guard(u_f.device());
  TORCH_CHECK(!(save_ckpt && (conv_weight_f.has_value() || conv_weight_b.has_value())),
              "bimamba_scan: the fused conv is forward-only (inference); it cannot save checkpoints");
  const bool token_major = is_token_major(u_f);
  Prepared rf = prepare(u_f, delta_f, A_f, B_f, C_f, D_f, std::nullopt, bias_f, delta_softplus, false, token_major,
                        dt_proj_f);
  Prepared rb = prepare(u_b, delta_b, A_b, B_b, C_b, D_b, z, bias_b, delta_softplus, true, token_major, dt_proj_b);
  set_conv(rf, u_f, conv_weight_f, conv_bias_f);
  set_conv(rb, u_b, conv_weight_b, conv_bias_b);
  check_pair(rf, rb, u_f, u_b);
  ScanParams &pf = rf.p, &pb = rb.p;
  const auto f32 = u_f.options().dtype(at::kFloat);
  at::Tensor out = empty_seq(pf.batch, pf.dim, pf.seqlen, token_major, u_f.options());
  at::Tensor ysum = save_ckpt ? empty_seq(pf.batch, pf.dim, pf.seqlen, token_major, f32) : empty0(u_f);
  at::Tensor ck_f = save_ckpt ? at::empty({pf.batch, pf.dim, pf.nchunks, kMaxState}, f32) : empty0(u_f);
  at::Tensor ck_b = save_ckpt ? at::empty({pf.batch, pf.dim, pf.nchunks, kMaxState}, f32) : empty0(u_f);
  if (out.numel() == 0) return {out, ysum, ck_f, ck_b};
  // y_f goes to a buffer that the reverse pass adds to: the fp32 ysum when the backward needs it, else the
  // output itself. In bf16/fp16 inference y_f is then rounded to u's dtype once before the sum, and no fp32
  // buffer of the output's size exists (at high resolution the largest allocation of the forward).
  at::Tensor acc = save_ckpt ? ysum : out;
  pf.acc_fp32 = pb.acc_fp32 = acc.scalar_type() == at::kFloat;
  pf.y_acc_out = acc.data_ptr();
  pf.ckpt = save_ckpt ? ck_f.data_ptr<float>() : nullptr;
  pb.y_acc_in = acc.data_ptr();
  pb.y_acc_out = save_ckpt ? ysum.data_ptr() : nullptr;
  pb.out = out.data_ptr();
  pb.out_scale = float(out_scale);
  pb.ckpt = save_ckpt ? ck_b.data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dispatch_bi(u_f.scalar_type(), [&](auto t) { return ss_bifwd_cuda<decltype(t)::value>(pf, pb, stream); }),
               "bidirectional forward");
  return {out, ysum, ck_f, ck_b};
}

// -> [du_f, ddelta_f, dA_f, dB_f, dC_f, dD_f, ddelta_bias_f, (same for b), dz]; absent ones empty.
std::vector<at::Tensor> bi_bwd(const at::Tensor& u_f, const at::Tensor& delta_f, const at::Tensor& A_f,
                               const at::Tensor& B_f, const at::Tensor& C_f, const OptTensor& D_f,
                               const OptTensor& bias_f, const at::Tensor& u_b, const at::Tensor& delta_b,
                               const at::Tensor& A_b, const at::Tensor& B_b, const at::Tensor& C_b,
                               const OptTensor& D_b, const OptTensor& bias_b, const at::Tensor& z,
                               const at::Tensor& dout, const at::Tensor& ysum, const at::Tensor& ckpt_f,
                               const at::Tensor& ckpt_b, bool delta_softplus, double out_scale) {
  c10::cuda::CUDAGuard guard(u_f.device());
  const bool token_major = is_token_major(u_f);
  Prepared rf = prepare(u_f, delta_f, A_f, B_f, C_f, D_f, z, bias_f, delta_softplus, false, token_major);
  Prepared rb = prepare(u_b, delta_b, A_b, B_b, C_b, D_b, z, bias_b, delta_softplus, true, token_major);
  check_pair(rf, rb, u_f, u_b);
  ScanParams &pf = rf.p, &pb = rb.p;
  at::Tensor cf = check_ckpt(ckpt_f, pf), cb = check_ckpt(ckpt_b, pb);
  TORCH_CHECK(dout.sizes() == u_f.sizes() && ysum.sizes() == u_f.sizes() && ysum.scalar_type() == at::kFloat,
              "bimamba_scan: dout and ysum must have u's shape (ysum fp32)");
  Grads gf = alloc_grads(pf, u_f, D_f.has_value(), bias_f.has_value());
  Grads gb = alloc_grads(pb, u_b, D_b.has_value(), bias_b.has_value());
  at::Tensor dout_c = in_layout_of(dout.to(u_f.scalar_type()), gf.du);
  at::Tensor ysum_c = in_layout_of(ysum, gf.du);
  at::Tensor dz = empty_seq(pf.batch, pf.dim, pf.seqlen, token_major, u_f.options());
  if (dz.numel() > 0) {
    for (ScanParams* p : {&pf, &pb}) {
      p->dout = dout_c.data_ptr();
      p->ysum = ysum_c.data_ptr<float>();
      p->dz = dz.data_ptr();
      p->out_scale = float(out_scale);
    }
    pf.ckpt = cf.data_ptr<float>();
    pb.ckpt = cb.data_ptr<float>();
    pf.write_dz = true;  // dz = dout * ysum * silu'(z) is the same in both directions: written once
    pb.write_dz = false;
    auto stream = c10::cuda::getCurrentCUDAStream();
    check_launch(dispatch_bi(u_f.scalar_type(), [&](auto t) { return ss_bibwd_cuda<decltype(t)::value>(pf, pb, stream); }),
                 "bidirectional backward");
  }
  const auto dt = u_f.scalar_type();
  return {gf.du, gf.ddelta, gf.dA, gf.dB.to(dt), gf.dC.to(dt), gf.dD, gf.ddb,
          gb.du, gb.ddelta, gb.dA, gb.dB.to(dt), gb.dC.to(dt), gb.dD, gb.ddb, dz};
}

}  // namespace
}  // namespace ssm

TORCH_LIBRARY(selective_scan_cuda, m) {
  m.def(
      "fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool delta_softplus, bool return_last_state, bool save_ckpt, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "Tensor dout, Tensor? dlast, Tensor ckpt, bool delta_softplus, bool reverse) -> Tensor[]");
  m.def(
      "bi_fwd(Tensor u_f, Tensor delta_f, Tensor A_f, Tensor B_f, Tensor C_f, Tensor? D_f, Tensor? delta_bias_f, "
      "Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor? D_b, Tensor? delta_bias_b, "
      "Tensor z, Tensor? dt_proj_f, Tensor? dt_proj_b, Tensor? conv_weight_f, Tensor? conv_bias_f, "
      "Tensor? conv_weight_b, Tensor? conv_bias_b, bool delta_softplus, bool save_ckpt, float out_scale=1.0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bi_bwd(Tensor u_f, Tensor delta_f, Tensor A_f, Tensor B_f, Tensor C_f, Tensor? D_f, Tensor? delta_bias_f, "
      "Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor? D_b, Tensor? delta_bias_b, "
      "Tensor z, Tensor dout, Tensor ysum, Tensor ckpt_f, Tensor ckpt_b, bool delta_softplus, float out_scale=1.0) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(selective_scan_cuda, CUDA, m) {
  m.impl("fwd", &ssm::scan_fwd);
  m.impl("bwd", &ssm::scan_bwd);
  m.impl("bi_fwd", &ssm::bi_fwd);
  m.impl("bi_bwd", &ssm::bi_bwd);
}

static struct PyModuleDef selective_scan_module = {PyModuleDef_HEAD_INIT, "selective_scan_cuda",
                                                   "CUDA kernels of the selective scan (ops in torch.ops.selective_scan_cuda)",
                                                   -1, nullptr};
PyMODINIT_FUNC PyInit_selective_scan_cuda(void) { return PyModule_Create(&selective_scan_module); }

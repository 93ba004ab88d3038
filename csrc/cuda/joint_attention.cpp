// Entry points of the joint-attention CUDA kernels (host code): checks, outputs, operand layout and
// the choice of kernel; the kernels and their launchers: csrc/cuda/joint_attention.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common/attention.h"
#include "common/checks.h"
#include "cuda/joint_attention.h"

namespace cogvx {
namespace attention {
namespace gpu {

void check_tc_head_dim(const char* op, int64_t D, at::ScalarType st) {
  TORCH_CHECK(D == 64 || D == 128, op, " (CUDA): head dim D = ", D, " is not supported for ", st,
              " (the tensor-core kernels take D = 64 or 128)");
}

// t itself when its data pointer is 16-byte aligned and its (b, h, l) strides are multiples of 8
// elements (16 bytes) - what the 16-byte cp.async tile copies need - else a contiguous copy.
at::Tensor tc_operand(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i)
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) ok = false;
  if (ok) return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

void copy_strides3(const at::Tensor& t, int64_t (&s)[3]) {
  for (int i = 0; i < 3; ++i) s[i] = t.stride(i);
}

// q, k, v with their (b, h, l) strides, and the heads and lengths, into a kernel's parameters.
template <class Params>
Params qkv_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  using Ptr = decltype(Params::q);
  Params p{};
  p.q = static_cast<Ptr>(q.data_ptr());
  p.k = static_cast<Ptr>(k.data_ptr());
  p.v = static_cast<Ptr>(v.data_ptr());
  copy_strides3(q, p.qs);
  copy_strides3(k, p.ks);
  copy_strides3(v, p.vs);
  p.H = q.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  return p;
}

// The fp32 fallback's parameters, forward and backward.
FbParams fallback_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  FbParams p = qkv_params<FbParams>(q, k, v);
  p.B = q.size(0);
  p.D = q.size(3);
  p.scale = static_cast<float>(scale);
  return p;
}

inline const uint16_t* u16(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* u16m(const at::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); }

std::tuple<at::Tensor, at::Tensor> joint_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, double scale) {
  constexpr const char* op = "cogvx::joint_attention";
  checks::attention::forward_args(op, q, k, v);
  checks::cuda_tensor(op, "q", q);
  checks::kernel_dtype(op, "CUDA", "q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Lq, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (D == 0) {  // softmax over zero scores: uniform weights of nothing
    lse.fill_(std::log(static_cast<double>(Lk)));
    return {out, lse};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto st = q.scalar_type();
  if (st == at::kHalf || st == at::kBFloat16) {
    check_tc_head_dim(op, D, st);
    const at::Tensor q_ = tc_operand(q), k_ = tc_operand(k), v_ = tc_operand(v);
    FwdParams p = qkv_params<FwdParams>(q_, k_, v_);
    p.out = u16m(out);
    p.lse = lse.data_ptr<float>();
    p.scale_log2 = score_scale_log2(static_cast<float>(scale));
    launch_fwd(p, st, D, B, stream);
    return {out, lse};
  }
  TORCH_CHECK(D <= kFbMaxD, op, " (CUDA): head dim D = ", D, " exceeds ", kFbMaxD, " for ", st);
  FbParams p = fallback_params(q, k, v, scale);
  p.out = out.data_ptr();
  p.lse_out = lse.data_ptr<float>();
  launch_fp32_fwd(p, stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& grad_lse_in, double scale, bool deterministic) {
  constexpr const char* op = "cogvx::joint_attention_backward";
  checks::attention::backward_args(op, grad_out, q, k, v, out, lse_in, grad_lse_in);
  checks::cuda_tensor(op, "q", q);
  checks::kernel_dtype(op, "CUDA", "q", q);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  at::Tensor grad_lse;
  if (checks::given(grad_lse_in)) grad_lse = grad_lse_in->to(at::kFloat).contiguous();
  at::Tensor dq = at::empty({B, Lq, H, D}, q.options()).transpose(1, 2);
  at::Tensor dk = at::empty({B, Lk, H, D}, k.options()).transpose(1, 2);
  at::Tensor dv = at::empty({B, Lk, H, D}, v.options()).transpose(1, 2);
  if (B == 0 || H == 0 || D == 0) return {dq, dk, dv};
  if (Lq == 0 || Lk == 0) {  // nothing attends: zero gradients
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const auto st = q.scalar_type();
  const bool tc = st == at::kHalf || st == at::kBFloat16;
  if (tc) check_tc_head_dim(op, D, st);
  else TORCH_CHECK(D <= kFbMaxD, op, " (CUDA): head dim D = ", D, " exceeds ", kFbMaxD, " for ", st);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor delta = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  launch_bwd_delta(grad_out, out, grad_lse, delta, stream);

  if (tc) {
    const at::Tensor q_ = tc_operand(q), k_ = tc_operand(k), v_ = tc_operand(v), do_ = tc_operand(grad_out);
    at::Tensor dq_acc;
    if (!deterministic) dq_acc = at::zeros({B, Lq, H, D}, q.options().dtype(at::kFloat));
    BwdParams p = qkv_params<BwdParams>(q_, k_, v_);
    p.dout = u16(do_);
    copy_strides3(do_, p.dos);
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = u16m(dq);
    p.dk = u16m(dk);
    p.dv = u16m(dv);
    p.dq_acc = deterministic ? nullptr : dq_acc.data_ptr<float>();
    p.scale = static_cast<float>(scale);
    p.scale_log2 = score_scale_log2(static_cast<float>(scale));
    launch_bwd_dkdv(p, st, D, B, /*atomic_dq=*/!deterministic, stream);
    if (deterministic) {
      launch_bwd_dq(p, st, D, B, stream);
    } else {
      // dq (B, Lq, H, D) contiguous underneath its transposed view
      dq.transpose(1, 2).copy_(dq_acc.mul_(scale));
    }
    return {dq, dk, dv};
  }

  FbParams p = fallback_params(q, k, v, scale);
  p.dout = grad_out.data_ptr();
  copy_strides3(grad_out, p.dos);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  launch_fp32_bwd(p, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), stream);
  return {dq, dk, dv};
}

}  // namespace gpu
}  // namespace attention
}  // namespace cogvx

TORCH_LIBRARY_IMPL(cogvx, CUDA, m) {
  m.impl("joint_attention", &cogvx::attention::gpu::joint_attention_cuda);
  m.impl("joint_attention_backward", &cogvx::attention::gpu::joint_attention_backward_cuda);
}

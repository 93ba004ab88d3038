// Argument checks of the raw ops (torch.ops.cogvx.*), shared by the CPU and CUDA implementations so
// that both refuse the same inputs: the kernels index with these shapes and integers, so a mismatch
// would read or write out of bounds. Checked: every tensor's rank and shape against the others, dtype
// and device agreement, the integer arguments (grid, positions, padding), and no internal overlap of
// what is written in place; and the limits the backends share (the kernels' dtypes, CUDA tensors).
// Limits of one backend (int32 extents, head dims) stay with it. Host code only. The public Python
// wrappers check the same with friendlier messages.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/safe_numerics.h>

#include <optional>

namespace cogvx {
namespace checks {

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void rank(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* doc) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions ", doc, ", got shape ", t.sizes());
}

inline void shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                  const char* doc) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " ", doc, ", got ", t.sizes());
}

inline void same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void same_dtype_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  same_device(op, name, t, ref_name, ref);
}

inline void float32(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// A tensor written in place must not have two elements at one address (an expanded, stride-0
// view): concurrent writes would race. As torch's own in-place ops, only a certain overlap is refused.
inline void no_internal_overlap(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " is written in place but has overlapping memory (strides ", t.strides(),
              "): unsupported operation: more than one element of the written-to tensor refers to a single "
              "memory location. Please clone() the tensor before performing the operation.");
}

// t has a dtype the kernels are built for (COGVX_DISPATCH_FLOAT_HALF_BF16): float32, bfloat16, float16.
inline void kernel_dtype(const char* op, const char* backend, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, " (", backend, "): ", name,
              " must be float32, bfloat16 or float16, got ", st);
}

inline void cuda_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
}

// ---- causal_conv3d ------------------------------------------------------------------------------
namespace conv {

// Output extent n + 2·pad − k + 1 along one axis; false when it overflows int64.
inline bool output_extent(int64_t n, int64_t k, int64_t pad, int64_t* out) {
  int64_t twice = 0, padded = 0;
  if (c10::mul_overflows<int64_t>(pad, 2, &twice) || c10::add_overflows<int64_t>(n, twice, &padded)) return false;
  *out = padded - k + 1;
  return true;
}

// x (B, C_in, T, H, W); weight (C_out, C_in, kt, kh, kw) with kt, kh, kw >= 1; bias (C_out,) and halo
// (B, C_in, kt-1, H, W) optional; all of x's dtype and device; pad_h, pad_w >= 0 and the padded
// frame at least the kernel.
inline void args(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& halo, int64_t pad_h, int64_t pad_w) {
  rank(op, "x", x, 5, "(B, C_in, T, H, W)");
  rank(op, "weight", weight, 5, "(C_out, C_in, kt, kh, kw)");
  same_dtype_device(op, "weight", weight, "x", x);
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(3), W = x.size(4);
  const int64_t Cout = weight.size(0), kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  TORCH_CHECK(weight.size(1) == Cin, op, ": weight must have C_in = ", Cin, " input channels like x, got weight of shape ",
              weight.sizes());
  TORCH_CHECK(kt >= 1 && kh >= 1 && kw >= 1, op, ": weight must have a non-empty kernel (kt, kh, kw >= 1), got shape ",
              weight.sizes());
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, op, ": pad_h and pad_w must be >= 0, got (", pad_h, ", ", pad_w, ")");
  int64_t Ho = 0, Wo = 0;
  TORCH_CHECK(output_extent(H, kh, pad_h, &Ho) && output_extent(W, kw, pad_w, &Wo) && Ho >= 1 && Wo >= 1, op,
              ": the padded frame (H + 2·pad_h, W + 2·pad_w) must be at least the kernel (", kh, ", ", kw,
              "), got H = ", H, ", W = ", W, ", pad = (", pad_h, ", ", pad_w, ")");
  if (given(bias)) {
    shape(op, "bias", *bias, {Cout}, "(C_out,)");
    same_dtype_device(op, "bias", *bias, "x", x);
  }
  if (given(halo)) {
    shape(op, "halo", *halo, {B, Cin, kt - 1, H, W}, "(B, C_in, kt-1, H, W): the kt-1 frames before x");
    same_dtype_device(op, "halo", *halo, "x", x);
  }
}

// grad_out: the forward's output shape (B, C_out, T, Ho, Wo), x's dtype and device (after args()).
inline void grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                     int64_t pad_h, int64_t pad_w) {
  int64_t Ho = 0, Wo = 0;
  output_extent(x.size(3), weight.size(3), pad_h, &Ho);
  output_extent(x.size(4), weight.size(4), pad_w, &Wo);
  shape(op, "grad_out", grad_out, {x.size(0), weight.size(0), x.size(2), Ho, Wo}, "(B, C_out, T, Ho, Wo)");
  same_dtype_device(op, "grad_out", grad_out, "x", x);
}

}  // namespace conv

// ---- rope3d, qk_norm_rope3d -----------------------------------------------------------------------
namespace rope {

// x (B, heads, L, D); axes_dim three even entries >= 0 summing to D; text_len and the grid >= 0 with
// L = text_len + T·H·W (no overflow); tables fp32 (2, T+H+W, D/2) on x's device (any strides).
inline void args(const char* op, const at::Tensor& x, const at::Tensor& tables, int64_t text_len, int64_t T,
                 int64_t H, int64_t W, at::IntArrayRef axes_dim) {
  rank(op, "x", x, 4, "(B, heads, L, D)");
  const int64_t L = x.size(2), D = x.size(3);
  TORCH_CHECK(axes_dim.size() == 3, op, ": axes_dim must have 3 entries (d_t, d_h, d_w), got ", axes_dim);
  for (int64_t a : axes_dim)
    TORCH_CHECK(a >= 0 && a <= D && a % 2 == 0, op, ": axes_dim entries must be even and in [0, D = ", D, "], got ",
                axes_dim);
  TORCH_CHECK(axes_dim[0] + axes_dim[1] + axes_dim[2] == D, op, ": axes_dim must sum to the head dim D = ", D,
              ", got ", axes_dim);
  TORCH_CHECK(text_len >= 0, op, ": text_len must be >= 0, got ", text_len);
  TORCH_CHECK(T >= 0 && H >= 0 && W >= 0, op, ": grid_t, grid_h, grid_w must be >= 0, got (", T, ", ", H, ", ", W, ")");
  int64_t hw = 0, thw = 0, rows = 0;
  const bool overflow = c10::mul_overflows<int64_t>(H, W, &hw) || c10::mul_overflows<int64_t>(T, hw, &thw) ||
                        c10::add_overflows<int64_t>(T, H, &rows) || c10::add_overflows<int64_t>(rows, W, &rows);
  TORCH_CHECK(!overflow && L - text_len == thw, op, ": x has L = ", L,
              " tokens but text_len + grid_t·grid_h·grid_w = ", text_len, " + ", T, "·", H, "·", W,
              overflow ? " (overflows int64)" : "");
  shape(op, "tables", tables, {2, rows, D / 2}, "(2, T+H+W, D/2): cos and sin per grid row");
  float32(op, "tables", tables);
  same_device(op, "tables", tables, "x", x);
}

// The in-place rope3d_: args() and no overlap in x.
inline void inplace_args(const char* op, const at::Tensor& x, const at::Tensor& tables, int64_t text_len, int64_t T,
                         int64_t H, int64_t W, at::IntArrayRef axes_dim) {
  args(op, x, tables, text_len, T, H, W, axes_dim);
  no_internal_overlap(op, "x", x);
}

// LayerNorm weight or bias: (D,), x's dtype or float32, on x's device; None allowed.
inline void affine(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!given(t)) return;
  shape(op, name, *t, {x.size(3)}, "(D,)");
  TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, op, ": ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", t->scalar_type());
  same_device(op, name, *t, "x", x);
}

inline void norm_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& tables, int64_t text_len, int64_t T,
                      int64_t H, int64_t W, at::IntArrayRef axes_dim) {
  args(op, x, tables, text_len, T, H, W, axes_dim);
  affine(op, "weight", weight, x);
  affine(op, "bias", bias, x);
}

// Backward: grad_out like x; mean, rstd fp32 (B, heads, L) on x's device; weight given when has_weight.
inline void norm_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
                               const at::Tensor& tables, int64_t text_len, int64_t T, int64_t H, int64_t W,
                               at::IntArrayRef axes_dim, bool has_weight) {
  norm_args(op, x, weight, std::nullopt, tables, text_len, T, H, W, axes_dim);
  shape(op, "grad_out", grad_out, x.sizes(), "(x's shape)");
  same_dtype_device(op, "grad_out", grad_out, "x", x);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"rstd", &rstd}}) {
    shape(op, name, *t, {x.size(0), x.size(1), x.size(2)}, "(B, heads, L)");
    float32(op, name, *t);
    same_device(op, name, *t, "x", x);
  }
  TORCH_CHECK(!has_weight || given(weight), op, ": has_weight is true but weight is None");
}

}  // namespace rope

// ---- joint_attention ------------------------------------------------------------------------------
namespace attention {

inline void unit_last_stride(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have a unit stride in its last (head-dim) dimension, got strides ", t.strides());
}

// q (B, heads, Lq, D); k, v (B, heads, Lk, D); one dtype and device; unit last-dim strides.
inline void qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  rank(op, "q", q, 4, "(B, heads, Lq, D)");
  rank(op, "k", k, 4, "(B, heads, Lk, D)");
  rank(op, "v", v, 4, "(B, heads, Lk, D)");
  same_dtype_device(op, "k", k, "q", q);
  same_dtype_device(op, "v", v, "q", q);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k must have q's batch, heads and head dim (", q.size(0), ", ", q.size(1), ", Lk, ", q.size(3),
              "), got ", k.sizes());
  shape(op, "v", v, k.sizes(), "(k's shape)");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}})
    unit_last_stride(op, name, *t);
}

// The forward: qkv() and at least one key wherever there is a query row to normalise.
inline void forward_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  qkv(op, q, k, v);
  TORCH_CHECK(q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0 || k.size(2) > 0, op,
              ": k and v must hold at least one key (Lk = 0)");
}

// Backward: qkv(), grad_out and out of q's shape, dtype and device with unit last-dim strides; lse and
// grad_lse (optional) (B, heads, Lq) on q's device.
inline void backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const std::optional<at::Tensor>& grad_lse) {
  qkv(op, q, k, v);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    shape(op, name, *t, q.sizes(), "(q's shape)");
    same_dtype_device(op, name, *t, "q", q);
    unit_last_stride(op, name, *t);
  }
  const at::IntArrayRef rows{q.sizes().data(), 3};
  shape(op, "lse", lse, rows, "(B, heads, Lq)");
  same_device(op, "lse", lse, "q", q);
  if (given(grad_lse)) {
    shape(op, "grad_lse", *grad_lse, rows, "(B, heads, Lq)");
    same_device(op, "grad_lse", *grad_lse, "q", q);
  }
}

}  // namespace attention

}  // namespace checks
}  // namespace cogvx

// C++ CPU kernels of the 3D RoPE ops: rope3d (+ in place) and the fused per-head LayerNorm + RoPE
// (qk_norm_rope3d) with its backward. One task handles a range of (b, head, token) rows; each row
// is read once through x's strides (the head-split view needs no copy), normalised and rotated in
// fp32 registers/stack, and written once. Angles come from the (2, T+H+W, D/2) per-axis tables via
// the index helpers of csrc/common/rope3d.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/rope3d.h"

namespace cogvx {
namespace {

namespace rp = rope3d;

// (B, heads, L, D) strided view of a tensor, row r = (b·heads + h)·L + l.
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t heads, L, D, sb, sh, sl, sd;
  scalar_t* row(int64_t r) const {
    const int64_t l = r % L, h = (r / L) % heads, b = r / (L * heads);
    return data + b * sb + h * sh + l * sl;
  }
  int64_t token(int64_t r) const { return r % L; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

rp::Grid make_grid(int64_t text_len, int64_t T, int64_t H, int64_t W, at::IntArrayRef axes_dim) {
  return {text_len, T, H, W, axes_dim[0] / 2, axes_dim[1] / 2};
}

// Rotates the fp32 row v (D values) of a video token in place.
inline void rotate_row(float* v, int64_t D, const rp::Grid& g, int64_t token, const float* cos_t,
                       const float* sin_t, bool inverse) {
  int64_t t, h, w;
  rp::video_coords(g, token, &t, &h, &w);
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t row = rp::table_row(g, i, t, h, w);
    rp::rotate_pair(v[2 * i], v[2 * i + 1], cos_t[row * half + i], sin_t[row * half + i], inverse, &v[2 * i],
                    &v[2 * i + 1]);
  }
}

template <typename scalar_t>
void rope_kernel(const at::Tensor& x, const at::Tensor& tables, const rp::Grid& g, bool inverse, at::Tensor& out) {
  const auto src = rows_of<scalar_t>(x);
  const auto dst = rows_of<scalar_t>(out);
  const int64_t D = x.size(3), half = D / 2;
  const float* cos_t = tables.data_ptr<float>();
  const float* sin_t = cos_t + tables.size(1) * half;
  const int64_t n_rows = x.size(0) * x.size(1) * x.size(2);
  at::parallel_for(0, n_rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> v(D);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = src.row(r);
      scalar_t* d = dst.row(r);
      const int64_t token = src.token(r);
      for (int64_t c = 0; c < D; ++c) v[c] = static_cast<float>(s[c * src.sd]);
      if (token >= g.text_len) rotate_row(v.data(), D, g, token, cos_t, sin_t, inverse);
      for (int64_t c = 0; c < D; ++c) d[c * dst.sd] = static_cast<scalar_t>(v[c]);
    }
  });
}

at::Tensor rope3d_cpu(const at::Tensor& x, const at::Tensor& tables_in, int64_t text_len, int64_t grid_t,
                      int64_t grid_h, int64_t grid_w, at::IntArrayRef axes_dim, bool inverse) {
  checks::rope::args("cogvx::rope3d", x, tables_in, text_len, grid_t, grid_h, grid_w, axes_dim);
  const rp::Grid g = make_grid(text_len, grid_t, grid_h, grid_w, axes_dim);
  const at::Tensor tables = tables_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rope3d_cpu", [&] { rope_kernel<scalar_t>(x, tables, g, inverse, out); });
  return out;
}

void rope3d_inplace_cpu(const at::Tensor& x, const at::Tensor& tables_in, int64_t text_len, int64_t grid_t,
                        int64_t grid_h, int64_t grid_w, at::IntArrayRef axes_dim, bool inverse) {
  checks::rope::inplace_args("cogvx::rope3d_", x, tables_in, text_len, grid_t, grid_h, grid_w, axes_dim);
  const rp::Grid g = make_grid(text_len, grid_t, grid_h, grid_w, axes_dim);
  const at::Tensor tables = tables_in.contiguous();
  at::Tensor out = x;  // each row is read whole before it is written
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rope3d_cpu", [&] { rope_kernel<scalar_t>(x, tables, g, inverse, out); });
}

std::vector<float> fp32_vector(const std::optional<at::Tensor>& t, int64_t D, float fill) {
  std::vector<float> v(D, fill);
  if (t) {
    auto f = t->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + D, v.begin());
  }
  return v;
}

template <typename scalar_t>
void qk_norm_rope_kernel(const at::Tensor& x, const std::vector<float>& weight, const std::vector<float>& bias,
                         const at::Tensor& tables, const rp::Grid& g, double eps, at::Tensor& out,
                         at::Tensor& mean, at::Tensor& rstd) {
  const auto src = rows_of<scalar_t>(x);
  const auto dst = rows_of<scalar_t>(out);
  const int64_t D = x.size(3), half = D / 2;
  const float* cos_t = tables.data_ptr<float>();
  const float* sin_t = cos_t + tables.size(1) * half;
  float* mean_p = mean.data_ptr<float>();
  float* rstd_p = rstd.data_ptr<float>();
  const int64_t n_rows = x.size(0) * x.size(1) * x.size(2);
  at::parallel_for(0, n_rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> v(D);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = src.row(r);
      float sum = 0.f;
      for (int64_t c = 0; c < D; ++c) sum += (v[c] = static_cast<float>(s[c * src.sd]));
      const float mu = sum / D;
      float var = 0.f;
      for (int64_t c = 0; c < D; ++c) var += (v[c] - mu) * (v[c] - mu);
      const float inv = 1.f / std::sqrt(var / D + static_cast<float>(eps));
      for (int64_t c = 0; c < D; ++c) v[c] = (v[c] - mu) * inv * weight[c] + bias[c];
      const int64_t token = src.token(r);
      if (token >= g.text_len) rotate_row(v.data(), D, g, token, cos_t, sin_t, false);
      scalar_t* d = dst.row(r);
      for (int64_t c = 0; c < D; ++c) d[c * dst.sd] = static_cast<scalar_t>(v[c]);
      mean_p[r] = mu;
      rstd_p[r] = inv;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& tables_in, int64_t text_len, int64_t grid_t, int64_t grid_h, int64_t grid_w,
    at::IntArrayRef axes_dim, double eps) {
  checks::rope::norm_args("cogvx::qk_norm_rope3d", x, weight, bias, tables_in, text_len, grid_t, grid_h, grid_w,
                          axes_dim);
  const rp::Grid g = make_grid(text_len, grid_t, grid_h, grid_w, axes_dim);
  const at::Tensor tables = tables_in.contiguous();
  const int64_t D = x.size(3);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mean = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  const auto w = fp32_vector(weight, D, 1.f), b = fp32_vector(bias, D, 0.f);
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "qk_norm_rope3d_cpu", [&] {
    qk_norm_rope_kernel<scalar_t>(x, w, b, tables, g, eps, out, mean, rstd);
  });
  return {out, mean, rstd};
}

// Backward: un-rotate the incoming gradient, then the LayerNorm backward. Weight/bias gradients are
// summed per task into fp32 partials and reduced in task order (deterministic).
template <typename scalar_t>
void qk_norm_rope_backward_kernel(const at::Tensor& gy, const at::Tensor& x, const std::vector<float>& weight,
                                  const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& tables,
                                  const rp::Grid& g, at::Tensor& gx, std::vector<float>& gw, std::vector<float>& gb) {
  const auto grad = rows_of<scalar_t>(gy);
  const auto src = rows_of<scalar_t>(x);
  const auto dst = rows_of<scalar_t>(gx);
  const int64_t D = x.size(3), half = D / 2;
  const float* cos_t = tables.data_ptr<float>();
  const float* sin_t = cos_t + tables.size(1) * half;
  const float* mean_p = mean.data_ptr<float>();
  const float* rstd_p = rstd.data_ptr<float>();
  const int64_t n_rows = x.size(0) * x.size(1) * x.size(2);
  constexpr int64_t kChunk = 1024;
  const int64_t chunks = (n_rows + kChunk - 1) / kChunk;
  std::vector<float> partial_w(chunks * D, 0.f), partial_b(chunks * D, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u(D), xhat(D);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* pw = partial_w.data() + chunk * D;
      float* pb = partial_b.data() + chunk * D;
      for (int64_t r = chunk * kChunk; r < std::min(n_rows, (chunk + 1) * kChunk); ++r) {
        const scalar_t* gr = grad.row(r);
        const scalar_t* xr = src.row(r);
        for (int64_t c = 0; c < D; ++c) u[c] = static_cast<float>(gr[c * grad.sd]);
        const int64_t token = grad.token(r);
        if (token >= g.text_len) rotate_row(u.data(), D, g, token, cos_t, sin_t, true);
        float mean_g = 0.f, mean_gx = 0.f;
        for (int64_t c = 0; c < D; ++c) {
          xhat[c] = (static_cast<float>(xr[c * src.sd]) - mean_p[r]) * rstd_p[r];
          pw[c] += u[c] * xhat[c];
          pb[c] += u[c];
          const float gc = u[c] * weight[c];
          mean_g += gc;
          mean_gx += gc * xhat[c];
        }
        mean_g /= D;
        mean_gx /= D;
        scalar_t* d = dst.row(r);
        for (int64_t c = 0; c < D; ++c)
          d[c * dst.sd] = static_cast<scalar_t>(rstd_p[r] * (u[c] * weight[c] - mean_g - xhat[c] * mean_gx));
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t c = 0; c < D; ++c) {
      gw[c] += partial_w[chunk * D + c];
      gb[c] += partial_b[chunk * D + c];
    }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& tables_in, int64_t text_len, int64_t grid_t,
    int64_t grid_h, int64_t grid_w, at::IntArrayRef axes_dim, bool has_weight, bool has_bias) {
  checks::rope::norm_backward_args("cogvx::qk_norm_rope3d_backward", grad_out, x, weight, mean, rstd, tables_in,
                                   text_len, grid_t, grid_h, grid_w, axes_dim, has_weight);
  const rp::Grid g = make_grid(text_len, grid_t, grid_h, grid_w, axes_dim);
  const at::Tensor tables = tables_in.contiguous();
  const int64_t D = x.size(3);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const auto w = fp32_vector(weight, D, 1.f);
  std::vector<float> gw(D, 0.f), gb(D, 0.f);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "qk_norm_rope3d_backward_cpu", [&] {
    qk_norm_rope_backward_kernel<scalar_t>(grad_out, x, w, mean_c, rstd_c, tables, g, gx, gw, gb);
  });
  auto fp32 = x.options().dtype(at::kFloat);
  at::Tensor grad_w = has_weight ? at::from_blob(gw.data(), {D}, fp32).clone() : at::empty({0}, fp32);
  at::Tensor grad_b = has_bias ? at::from_blob(gb.data(), {D}, fp32).clone() : at::empty({0}, fp32);
  return {gx, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(cogvx, CPU, m) {
  m.impl("rope3d", &rope3d_cpu);
  m.impl("rope3d_", &rope3d_inplace_cpu);
  m.impl("qk_norm_rope3d", &qk_norm_rope3d_cpu);
  m.impl("qk_norm_rope3d_backward", &qk_norm_rope3d_backward_cpu);
}

}  // namespace cogvx

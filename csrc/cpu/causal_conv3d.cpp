// C++ CPU kernel of the temporally causal 3D convolution.
//
// Method: im2col-free implicit GEMM by kernel tap. One task computes one output row
// (C_out × W') as a sum over the kt·kh·kw taps of W_tap (C_out × C_in) · X_row (C_in × len), where
// X_row is a strided view straight into x or the halo (lda = channel stride), so nothing of the
// padded activation is ever copied; border columns that would read zero padding are simply left
// out of the GEMM range (valid_output_range). Each GEMM is oneDNN's fp32 batch-reduce GEMM micro-kernel
// that ATen exports (at::native::cpublas::brgemm); bf16/fp16 rows are widened to fp32 one row at
// a time (oneDNN's bf16 brgemm needs VNNI-packed operands), so accumulation is always fp32. Rows are spread over threads with
// at::parallel_for; the index math lives in csrc/common/causal_conv3d.h, shared with the CUDA file.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <vector>

#include "common/causal_conv3d.h"

namespace cogvx {
namespace {

namespace cc = causal_conv3d;

// C (M×N, row-major, ld_c, fp32) += A (M×K, ld_a) · B (K×N, ld_b), all fp32. oneDNN's batch-reduce
// GEMM micro-kernel (exported by ATen) where torch has it, a plain loop otherwise.
void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B,
              int64_t ld_b, float* C, int64_t ld_c) {
  if (M <= 0 || N <= 0 || K <= 0) return;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(M, N, K, ld_a, ld_b, ld_c, /*add_C=*/true, A, B, C, /*is_vnni=*/false);
#else
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * ld_a + k];
      for (int64_t n = 0; n < N; ++n) C[m * ld_c + n] += a * B[k * ld_b + n];
    }
#endif
}

void gemm_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(false);
#endif
}

// AT_DISPATCH_FLOATING_TYPES_AND2 without double (brgemm has no fp64 kernel).
#define COGVX_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Strided 5-D frames (B, C, T, H, W) with a unit innermost stride.
template <typename scalar_t>
struct Frames {
  const scalar_t* data;
  int64_t sb, sc, st, sh;
  const scalar_t* row(int64_t b, int64_t t, int64_t h) const { return data + b * sb + t * st + h * sh; }
};

template <typename scalar_t>
Frames<scalar_t> frames_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Unit stride along W (and a channel stride that can serve as a GEMM leading dimension) lets every
// row be a GEMM operand in place; other layouts (channels_last_3d) get one contiguous copy.
at::Tensor with_unit_row_stride(const at::Tensor& t) {
  const bool rows_ok = (t.size(4) <= 1 || t.stride(4) == 1) && t.stride(1) >= t.size(4);
  return rows_ok ? t : t.contiguous();
}

// One row (C × n, channel stride sc) as an fp32 GEMM operand with its leading dimension: the row
// itself for fp32, else converted into `buf` (fp32 accumulation for bf16/fp16 inputs).
template <typename scalar_t>
std::pair<const float*, int64_t> fp32_row(const scalar_t* row, int64_t sc, int64_t C, int64_t n,
                                          std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {row, sc};
  } else {
    buf.resize(C * n);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < n; ++i) buf[c * n + i] = static_cast<float>(row[c * sc + i]);
    return {buf.data(), n};
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& w_taps, const at::Tensor* bias,
                    const at::Tensor* halo, int64_t kt, int64_t kh, int64_t kw, int64_t pad_h,
                    int64_t pad_w, at::Tensor& y) {
  const int64_t B = x.size(0), Cin = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Cout = y.size(1), Ho = y.size(3), Wo = y.size(4);
  const auto xs = frames_of<scalar_t>(x);
  const auto hs = halo ? frames_of<scalar_t>(*halo) : xs;
  const float* wp = w_taps.data_ptr<float>();  // (kt, kh, kw, Cout, Cin)
  const bool has_halo = halo != nullptr;
  std::vector<float> bias_f(Cout, 0.f);
  if (bias) {
    auto bf = bias->to(at::kFloat).contiguous();
    std::copy(bf.data_ptr<float>(), bf.data_ptr<float>() + Cout, bias_f.begin());
  }
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t ysb = y.stride(0), ysc = y.stride(1), yst = y.stride(2), ysh = y.stride(3);

  at::parallel_for(0, B * T * Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out(Cout * Wo);  // one output row (Cout × Wo)
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t oh = task % Ho, t = (task / Ho) % T, b = task / (Ho * T);
      for (int64_t co = 0; co < Cout; ++co)
        std::fill(out.begin() + co * Wo, out.begin() + (co + 1) * Wo, bias_f[co]);
      for (int64_t dt = 0; dt < kt; ++dt) {
        const cc::FrameSource src = cc::padded_frame_source(t + dt, kt, has_halo);
        const auto& f = src.from_halo ? hs : xs;
        for (int64_t dh = 0; dh < kh; ++dh) {
          const int64_t ih = cc::input_coord(oh, dh, pad_h);
          if (!cc::in_bounds(ih, H)) continue;
          const auto [xrow, ldx] = fp32_row(f.row(b, src.index, ih), f.sc, Cin, W, buf);
          for (int64_t dw = 0; dw < kw; ++dw) {
            int64_t lo, hi;
            cc::valid_output_range(dw, pad_w, W, Wo, &lo, &hi);
            const float* wt = wp + ((dt * kh + dh) * kw + dw) * Cout * Cin;
            // out[:, lo:hi] += W_tap (Cout × Cin) · x[:, lo+dw-pw : hi+dw-pw]
            gemm_acc(Cout, hi - lo, Cin, wt, Cin, xrow + cc::input_coord(lo, dw, pad_w), ldx,
                     out.data() + lo, Wo);
          }
        }
      }
      scalar_t* yrow = yp + b * ysb + t * yst + oh * ysh;
      for (int64_t co = 0; co < Cout; ++co)
        for (int64_t ow = 0; ow < Wo; ++ow) yrow[co * ysc + ow] = static_cast<scalar_t>(out[co * Wo + ow]);
    }
    gemm_release();
  });
}

// Gradient of the time-padded input folded onto the stored frames: each task owns one row of one
// stored frame (halo or x), so no two tasks write the same element.
template <typename scalar_t>
void grad_input_kernel(const at::Tensor& gy, const at::Tensor& w_taps_t, bool has_halo, int64_t kt,
                       int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w, at::Tensor& gx,
                       at::Tensor* ghalo) {
  const int64_t B = gx.size(0), Cin = gx.size(1), T = gx.size(2), H = gx.size(3), W = gx.size(4);
  const int64_t Cout = gy.size(1), Ho = gy.size(3), Wo = gy.size(4);
  const int64_t lead = has_halo ? kt - 1 : 0;  // halo frames that get their own gradient
  const auto gs = frames_of<scalar_t>(gy);
  const float* wp = w_taps_t.data_ptr<float>();  // (kt, kh, kw, Cin, Cout)

  at::parallel_for(0, B * (lead + T) * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out(Cin * W);  // one input row (Cin × W)
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ih = task % H, s = (task / H) % (lead + T), b = task / (H * (lead + T));
      const bool is_halo = s < lead;
      const int64_t index = is_halo ? s : s - lead;
      int64_t j_lo, j_hi;
      cc::padded_frames_of_source(is_halo, index, kt, has_halo, &j_lo, &j_hi);
      std::fill(out.begin(), out.end(), 0.f);
      for (int64_t j = j_lo; j < j_hi; ++j) {
        for (int64_t dt = 0; dt < kt; ++dt) {
          const int64_t t = j - dt;
          if (!cc::in_bounds(t, T)) continue;
          for (int64_t dh = 0; dh < kh; ++dh) {
            const int64_t oh = ih - dh + pad_h;  // the output row whose tap dh reads row ih
            if (!cc::in_bounds(oh, Ho)) continue;
            const auto [grow, ldg] = fp32_row(gs.row(b, t, oh), gs.sc, Cout, Wo, buf);
            for (int64_t dw = 0; dw < kw; ++dw) {
              int64_t lo, hi;
              cc::valid_input_range(dw, pad_w, W, Wo, &lo, &hi);
              const float* wt = wp + ((dt * kh + dh) * kw + dw) * Cin * Cout;
              // out[:, lo:hi] += W_tap^T (Cin × Cout) · gy[:, lo-dw+pw : hi-dw+pw]
              gemm_acc(Cin, hi - lo, Cout, wt, Cout, grow + (lo - dw + pad_w), ldg, out.data() + lo, W);
            }
          }
        }
      }
      at::Tensor& dst = is_halo ? *ghalo : gx;
      scalar_t* drow = dst.data_ptr<scalar_t>() + b * dst.stride(0) + index * dst.stride(2) + ih * dst.stride(3);
      for (int64_t ci = 0; ci < Cin; ++ci)
        for (int64_t iw = 0; iw < W; ++iw) drow[ci * dst.stride(1) + iw] = static_cast<scalar_t>(out[ci * W + iw]);
    }
    gemm_release();
  });
}

// Gradient of the weight: one task per kernel tap, reducing over every output row.
template <typename scalar_t>
void grad_weight_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor* halo, int64_t kt,
                        int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w, at::Tensor& gw_taps) {
  const int64_t B = x.size(0), Cin = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Cout = gy.size(1), Ho = gy.size(3), Wo = gy.size(4);
  const auto xs = frames_of<scalar_t>(x);
  const auto hs = halo ? frames_of<scalar_t>(*halo) : xs;
  const auto gs = frames_of<scalar_t>(gy);
  float* gwp = gw_taps.data_ptr<float>();  // (kt, kh, kw, Cout, Cin)

  at::parallel_for(0, kt * kh * kw, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xt, buf;
    for (int64_t tap = begin; tap < end; ++tap) {
      const int64_t dw = tap % kw, dh = (tap / kw) % kh, dt = tap / (kw * kh);
      float* d = gwp + tap * Cout * Cin;
      int64_t lo, hi;
      cc::valid_output_range(dw, pad_w, W, Wo, &lo, &hi);
      const int64_t len = hi - lo;
      xt.resize(std::max<int64_t>(len, 1) * Cin);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const cc::FrameSource src = cc::padded_frame_source(t + dt, kt, halo != nullptr);
          const auto& f = src.from_halo ? hs : xs;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const int64_t ih = cc::input_coord(oh, dh, pad_h);
            if (!cc::in_bounds(ih, H) || len <= 0) continue;
            // x[:, lo+dw-pw : hi+dw-pw] transposed to (len × Cin), in fp32
            const scalar_t* xrow = f.row(b, src.index, ih) + cc::input_coord(lo, dw, pad_w);
            for (int64_t ci = 0; ci < Cin; ++ci)
              for (int64_t i = 0; i < len; ++i) xt[i * Cin + ci] = static_cast<float>(xrow[ci * f.sc + i]);
            const auto [grow, ldg] = fp32_row(gs.row(b, t, oh), gs.sc, Cout, Wo, buf);
            // dW_tap (Cout × Cin) += gy[:, lo:hi] (Cout × len) · x^T (len × Cin)
            gemm_acc(Cout, Cin, len, grow + lo, ldg, xt.data(), Cin, d, Cin);
          }
        }
    }
    gemm_release();
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& halo) {
  TORCH_CHECK(x.dim() == 5 && weight.dim() == 5, "cogvx::causal_conv3d: x and weight must be 5-D");
  TORCH_CHECK(x.size(1) == weight.size(1), "cogvx::causal_conv3d: channel mismatch");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "cogvx::causal_conv3d: dtype mismatch");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "cogvx::causal_conv3d (CPU): float32, bfloat16 or float16 expected");
  if (halo) {
    TORCH_CHECK(halo->dim() == 5 && halo->size(2) == weight.size(2) - 1,
                "cogvx::causal_conv3d: halo must hold kt-1 frames");
    TORCH_CHECK(halo->scalar_type() == x.scalar_type(), "cogvx::causal_conv3d: halo dtype mismatch");
  }
}

at::Tensor causal_conv3d_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& halo_in,
                             int64_t pad_h, int64_t pad_w) {
  check_inputs(x_in, weight, halo_in);
  const int64_t kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  const at::Tensor x = with_unit_row_stride(x_in);
  std::optional<at::Tensor> halo;
  if (halo_in && kt > 1) halo = with_unit_row_stride(*halo_in);
  const int64_t Ho = cc::output_extent(x.size(3), kh, pad_h), Wo = cc::output_extent(x.size(4), kw, pad_w);
  at::Tensor y = at::empty({x.size(0), weight.size(0), x.size(2), Ho, Wo}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor w_taps = weight.permute({2, 3, 4, 0, 1}).to(at::kFloat).contiguous();
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_cpu", [&] {
    forward_kernel<scalar_t>(x, w_taps, bias ? &*bias : nullptr, halo ? &*halo : nullptr, kt, kh, kw,
                             pad_h, pad_w, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv3d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& halo_in, int64_t pad_h, int64_t pad_w, bool has_bias) {
  check_inputs(x_in, weight, halo_in);
  const int64_t kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  const at::Tensor x = with_unit_row_stride(x_in);
  const at::Tensor gy = grad_out.contiguous();
  const bool has_halo = halo_in.has_value() && kt > 1;
  std::optional<at::Tensor> halo;
  if (has_halo) halo = with_unit_row_stride(*halo_in);

  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor ghalo = halo_in ? at::zeros(halo_in->sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw_taps = at::zeros({kt, kh, kw, weight.size(0), weight.size(1)}, weight.options().dtype(at::kFloat));
  at::Tensor gb = has_bias ? gy.sum({0, 2, 3, 4}, false, at::kFloat).to(weight.scalar_type())
                           : at::empty({0}, weight.options());
  if (gy.numel() == 0 || x.numel() == 0) {
    gx.zero_();
  } else {
    const at::Tensor w_taps_t = weight.permute({2, 3, 4, 1, 0}).to(at::kFloat).contiguous();
    COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_backward_cpu", [&] {
      grad_input_kernel<scalar_t>(gy, w_taps_t, has_halo, kt, kh, kw, pad_h, pad_w, gx,
                                  has_halo ? &ghalo : nullptr);
      grad_weight_kernel<scalar_t>(gy, x, halo ? &*halo : nullptr, kt, kh, kw, pad_h, pad_w, gw_taps);
    });
  }
  at::Tensor gw = gw_taps.permute({3, 4, 0, 1, 2}).to(weight.scalar_type()).contiguous();
  return {gx, gw, gb, ghalo};
}

}  // namespace

TORCH_LIBRARY_IMPL(cogvx, CPU, m) {
  m.impl("causal_conv3d", &causal_conv3d_cpu);
  m.impl("causal_conv3d_backward", &causal_conv3d_backward_cpu);
}

}  // namespace cogvx

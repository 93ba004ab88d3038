// Entry points of the causal conv3d CUDA kernels (host code): checks, geometry, outputs and weight
// layouts; the kernels and their launchers: csrc/cuda/causal_conv3d.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/causal_conv3d.h"
#include "common/checks.h"
#include "cuda/causal_conv3d.h"

namespace cogvx {
namespace causal_conv3d {
namespace gpu {

// The arguments were checked by checks::conv (csrc/common/checks.h): the geometry and its int32 limit.
inline Geom make_geom(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& halo, int64_t pad_h, int64_t pad_w) {
  Geom g{};
  g.B = x.size(0);
  g.Cin = x.size(1);
  g.T = x.size(2);
  g.H = x.size(3);
  g.W = x.size(4);
  g.Cout = weight.size(0);
  g.kt = weight.size(2);
  g.kh = weight.size(3);
  g.kw = weight.size(4);
  g.ph = pad_h;
  g.pw = pad_w;
  g.Ho = output_extent(g.H, g.kh, pad_h);
  g.Wo = output_extent(g.W, g.kw, pad_w);
  TORCH_CHECK(g.B < INT32_MAX && g.T < INT32_MAX && g.H < INT32_MAX && g.W < INT32_MAX &&
                  g.Ho < INT32_MAX && g.Wo < INT32_MAX && g.kt * g.kh * g.kw < INT32_MAX,
              "causal_conv3d: an extent exceeds int32");
  g.taps = g.kt * g.kh * g.kw;
  g.has_halo = halo.has_value() && halo->defined();
  return g;
}

at::Tensor causal_conv3d_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& halo, int64_t pad_h, int64_t pad_w) {
  constexpr const char* op = "cogvx::causal_conv3d";
  checks::conv::args(op, x, weight, bias, halo, pad_h, pad_w);
  const Geom g = make_geom(x, weight, halo, pad_h, pad_w);
  checks::cuda_tensor(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({g.B, g.Cout, g.T, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor b;
  if (checks::given(bias)) b = bias->contiguous();
  // (C_out, kt, kh, kw, C_in): one K step reads BK consecutive input channels of one tap.
  const at::Tensor w = weight.permute({0, 2, 3, 4, 1}).contiguous();
  launch_fwd(g, x, g.has_halo ? *halo : at::Tensor(), w, b, out, at::cuda::getCurrentCUDAStream());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv3d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& halo, int64_t pad_h, int64_t pad_w, bool has_bias) {
  constexpr const char* op = "cogvx::causal_conv3d_backward";
  checks::conv::args(op, x, weight, std::nullopt, halo, pad_h, pad_w);
  checks::conv::grad_out(op, grad_out, x, weight, pad_h, pad_w);
  const Geom g = make_geom(x, weight, halo, pad_h, pad_w);
  checks::cuda_tensor(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor hl = g.has_halo ? *halo : at::Tensor();

  // Contiguous like the fake implementation and the CPU kernel (the kernels write through strides).
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_h = g.has_halo ? at::empty(hl.sizes(), hl.options()) : at::empty({0}, x.options());
  at::Tensor grad_b = has_bias ? at::sum(grad_out, {0, 2, 3, 4}, /*keepdim=*/false, at::kFloat).to(weight.scalar_type())
                               : at::empty({0}, weight.options());
  // input gradient: grad_x and grad_halo, every element written once
  if (grad_x.numel() > 0 || grad_h.numel() > 0) {
    // (C_in, kt, kh, kw, C_out): one K step reads BK consecutive output channels of one tap.
    launch_dgrad(g, grad_out, weight.permute({1, 2, 3, 4, 0}).contiguous(), grad_x, grad_h, stream);
  }
  // weight gradient: split-K over output pixels, fixed split order -> deterministic
  if (grad_w.numel() > 0) launch_wgrad(g, grad_out, x, hl, grad_w, stream);
  return {grad_x, grad_w, grad_b, grad_h};
}

}  // namespace gpu
}  // namespace causal_conv3d
}  // namespace cogvx

TORCH_LIBRARY_IMPL(cogvx, CUDA, m) {
  m.impl("causal_conv3d", &cogvx::causal_conv3d::gpu::causal_conv3d_cuda);
  m.impl("causal_conv3d_backward", &cogvx::causal_conv3d::gpu::causal_conv3d_backward_cuda);
}

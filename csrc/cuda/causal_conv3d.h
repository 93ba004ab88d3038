// CUDA kernels of the temporally causal 3D convolution (CogVideoX VAE): forward, input gradient
// and weight gradient, each an implicit GEMM that reads the halo frames (or the repeated first
// frame) and the zero spatial border directly through the index helpers of
// common/causal_conv3d.h. No padded, concatenated or contiguous copy of any activation is made:
// x, halo and grad_out are read through their (int64) strides, so contiguous, channels_last_3d and
// time-slice views all work as they are. Only the (small) weight is re-laid out once per call.
//
// GEMM shapes (K order: channel block outer, kernel tap inner, so that one K step of a block reads
// one tap of BK consecutive channels and each thread computes one source address per step):
//   forward      M = B*T*Ho*Wo output pixels        N = C_out   K = C_in x (kt*kh*kw)
//   input grad   M = B*T*H*W (+ B*(kt-1)*H*W halo)  N = C_in    K = C_out x (J*kt*kh*kw)
//                (a transposed gather: padded frame j of input pixel (s, ih, iw) collects
//                 grad_out[t = j - dt, ih + ph - dh, iw + pw - dw]; every stored frame sums over the
//                 padded frames that read it (padded_frames_of_source): J = kt for blocks holding a
//                 frame 0 without halo, else 1. Each grad_x / grad_halo element is written once.)
//   weight grad  M = C_out   N = C_in (one tap per block)   K = B*T*Ho*Wo output pixels,
//                split-K over pixels into an fp32 workspace, then a deterministic reduction.
//   bias grad    at::sum in fp32, cast to the weight dtype.
//
// Tiles: 256 threads, a 128 (M) x 64 (N) block tile, two shared-memory stages. Global loads of
// step s+1 are issued into registers before the MMAs of step s and stored to the other stage after
// them (register-staged double buffering; cp.async is not used because the A tile is a gather of
// 2-byte elements with per-element halo/border predicates, below cp.async's 4-byte minimum).
//   bf16 / fp16: K step 32, tensor cores through `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}`
//                (fp32 accumulation) fed by `ldmatrix.x4`; 8 warps of 32x32. The same mma.sync (HMMA)
//                path runs on sm_80 and sm_90 (no wgmma on sm_90).
//   fp32:        CUDA-core FMA fallback (K step 16), 8x4 outputs per thread, fp32 accumulation.
//
// Files, split by kernel family (they compile in parallel):
//   causal_conv3d.h            this header: the geometry and the launchers of the kernel files
//   causal_conv3d.cuh          device code the kernels share: tiles, loaders of the forward and input
//                              gradient, warp tiles, main loop, epilogues
//   causal_conv3d_fwd.cu       forward
//   causal_conv3d_dgrad.cu     input gradient (grad_x, grad_halo)
//   causal_conv3d_wgrad.cu     weight gradient (split-K, deterministic reduction)
//   causal_conv3d.cpp          the entry points: checks, geometry, outputs, weight layouts
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cogvx {
namespace causal_conv3d {
namespace gpu {

struct Geom {
  int64_t B, Cin, Cout, T, H, W, Ho, Wo;
  int64_t kt, kh, kw, ph, pw, taps;
  bool has_halo;
};

// Launchers. w_perm: the weight as (C_out, kt, kh, kw, C_in) (forward) or (C_in, kt, kh, kw, C_out)
// (input gradient), contiguous; halo undefined without one; outputs contiguous like the entry
// points allocate them.
void launch_fwd(const Geom& g, const at::Tensor& x, const at::Tensor& halo, const at::Tensor& w_perm,
                const at::Tensor& bias, const at::Tensor& out, cudaStream_t stream);
void launch_dgrad(const Geom& g, const at::Tensor& grad_out, const at::Tensor& w_perm, const at::Tensor& grad_x,
                  const at::Tensor& grad_halo, cudaStream_t stream);
void launch_wgrad(const Geom& g, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& halo,
                  const at::Tensor& grad_w, cudaStream_t stream);

}  // namespace gpu
}  // namespace causal_conv3d
}  // namespace cogvx

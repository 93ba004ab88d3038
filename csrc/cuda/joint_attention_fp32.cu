// Joint attention on CUDA cores, fp32 (a test path: backend choice runs it only when backend="cuda" is
// named): one warp per query or key row, one key / query at a time, fp32 accumulation, any
// D <= kFbMaxD. csrc/cuda/joint_attention.h.
#include "cuda/joint_attention.cuh"

namespace cogvx {
namespace attention {
namespace gpu {

constexpr int kFbPer = kFbMaxD / 32;  // channels per lane

template <typename T, typename A>
__device__ __forceinline__ void fb_load_row(A (&x)[kFbPer], const T* src, int64_t D, int lane) {
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) {
    const int64_t d = lane + 32 * c;
    x[c] = d < D ? static_cast<A>(src[d]) : A(0);
  }
}
template <typename T, typename A>
__device__ __forceinline__ A fb_dot(const A (&x)[kFbPer], const T* src, int64_t D, int lane) {
  A acc = A(0);
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) acc += x[c] * static_cast<A>(src[d]);
  }
  return warp_sum(acc);
}
template <typename T, typename A>
__device__ __forceinline__ void fb_store_row(T* dst, const A (&x)[kFbPer], A mul, int64_t D, int lane) {
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) dst[d] = static_cast<T>(x[c] * mul);
  }
}

// Forward: online softmax over one key at a time.
__global__ void __launch_bounds__(256) joint_attention_fwd_fallback_kernel(const FbParams p) {
  using T = float;
  using A = float;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= p.B * p.H * p.Lq) return;
  const int64_t i = row % p.Lq, bh = row / p.Lq, h = bh % p.H, b = bh / p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
  const T* k = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* v = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];
  A qv[kFbPer], acc[kFbPer];
  fb_load_row(qv, q, p.D, lane);
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) acc[c] = A(0);
  const A sl2 = static_cast<A>(p.scale) * kLog2e;
  A m = -INFINITY, l = A(0);
  for (int64_t j = 0; j < p.Lk; ++j) {
    const A s2 = fb_dot(qv, k + j * p.ks[2], p.D, lane) * sl2;
    const A m_new = s2 > m ? s2 : m;
    const A alpha = rescale(m, m_new);
    const A pr = prob(s2, m_new);
    m = m_new;
    l = l * alpha + pr;
    const T* vr = v + j * p.vs[2];
#pragma unroll
    for (int c = 0; c < kFbPer; ++c) {
      const int64_t d = lane + 32 * c;
      acc[c] = acc[c] * alpha + (d < p.D ? pr * static_cast<A>(vr[d]) : A(0));
    }
  }
  T* out = static_cast<T*>(p.out) + ((b * p.Lq + i) * p.H + h) * p.D;
  fb_store_row(out, acc, A(1) / l, p.D, lane);
  if (lane == 0) p.lse_out[row] = static_cast<float>(lse_natural(m, l));
}

// dQ: one warp per query row, one key at a time.
__global__ void __launch_bounds__(256) joint_attention_bwd_dq_fallback_kernel(const FbParams p) {
  using T = float;
  using A = float;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= p.B * p.H * p.Lq) return;
  const int64_t i = row % p.Lq, bh = row / p.Lq, h = bh % p.H, b = bh / p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
  const T* dout = static_cast<const T*>(p.dout) + b * p.dos[0] + h * p.dos[1] + i * p.dos[2];
  const T* k = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* v = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];
  A qv[kFbPer], dov[kFbPer], acc[kFbPer];
  fb_load_row(qv, q, p.D, lane);
  fb_load_row(dov, dout, p.D, lane);
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) acc[c] = A(0);
  const A sl2 = static_cast<A>(p.scale) * kLog2e;
  const A lse2 = static_cast<A>(p.lse[row]) * kLog2e;
  const A del = p.delta[row];
  for (int64_t j = 0; j < p.Lk; ++j) {
    const T* kr = k + j * p.ks[2];
    const A pr = prob_from_lse(fb_dot(qv, kr, p.D, lane) * sl2, lse2);
    const A ds = grad_score(pr, fb_dot(dov, v + j * p.vs[2], p.D, lane), del);
#pragma unroll
    for (int c = 0; c < kFbPer; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < p.D) acc[c] += ds * static_cast<A>(kr[d]);
    }
  }
  T* dq = static_cast<T*>(p.out) + ((b * p.Lq + i) * p.H + h) * p.D;
  fb_store_row(dq, acc, static_cast<A>(p.scale), p.D, lane);
}

// dK, dV: one warp per key row, one query at a time.
__global__ void __launch_bounds__(256) joint_attention_bwd_dkdv_fallback_kernel(const FbParams p) {
  using T = float;
  using A = float;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= p.B * p.H * p.Lk) return;
  const int64_t j = row % p.Lk, bh = row / p.Lk, h = bh % p.H, b = bh / p.H;
  const T* kr = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1] + j * p.ks[2];
  const T* vr = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1] + j * p.vs[2];
  const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.dos[0] + h * p.dos[1];
  const float* lse = p.lse + bh * p.Lq;
  const A* delta = p.delta + bh * p.Lq;
  A kv[kFbPer], vv[kFbPer], dk[kFbPer], dv[kFbPer];
  fb_load_row(kv, kr, p.D, lane);
  fb_load_row(vv, vr, p.D, lane);
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) dk[c] = dv[c] = A(0);
  const A sl2 = static_cast<A>(p.scale) * kLog2e;
  for (int64_t i = 0; i < p.Lq; ++i) {
    const T* qr = q + i * p.qs[2];
    const T* dor = dout + i * p.dos[2];
    const A pr = prob_from_lse(fb_dot(kv, qr, p.D, lane) * sl2, static_cast<A>(lse[i]) * kLog2e);
    const A ds = grad_score(pr, fb_dot(vv, dor, p.D, lane), delta[i]);
#pragma unroll
    for (int c = 0; c < kFbPer; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < p.D) {
        dv[c] += pr * static_cast<A>(dor[d]);
        dk[c] += ds * static_cast<A>(qr[d]);
      }
    }
  }
  const int64_t o = ((b * p.Lk + j) * p.H + h) * p.D;
  fb_store_row(static_cast<T*>(p.out) + o, dk, static_cast<A>(p.scale), p.D, lane);
  fb_store_row(static_cast<T*>(p.out2) + o, dv, A(1), p.D, lane);
}

unsigned fallback_blocks(int64_t rows, const char* op) {
  const int64_t blocks = ceil_div(rows, 8);
  TORCH_CHECK(blocks <= INT32_MAX, op, " (CUDA): problem too large");
  return static_cast<unsigned>(blocks);
}

void launch_fp32_fwd(const FbParams& p, cudaStream_t stream) {
  joint_attention_fwd_fallback_kernel<<<fallback_blocks(p.B * p.H * p.Lq, "cogvx::joint_attention"), 256, 0,
                                        stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_fp32_bwd(FbParams p, void* dq, void* dk, void* dv, cudaStream_t stream) {
  constexpr const char* op = "cogvx::joint_attention_backward";
  p.out = dq;
  joint_attention_bwd_dq_fallback_kernel<<<fallback_blocks(p.B * p.H * p.Lq, op), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.out = dk;
  p.out2 = dv;
  joint_attention_bwd_dkdv_fallback_kernel<<<fallback_blocks(p.B * p.H * p.Lk, op), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gpu
}  // namespace attention
}  // namespace cogvx

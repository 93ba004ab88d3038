// Causal conv3d input gradient (grad_x, grad_halo): csrc/cuda/causal_conv3d.h.
#include "cuda/causal_conv3d.cuh"

namespace cogvx {
namespace causal_conv3d {
namespace gpu {

template <typename T>
struct DgradParams {
  Geom g;
  const T* go;  // grad_out (B, C_out, T, Ho, Wo), strided
  int64_t gs[5];
  const T* w;  // (C_in, taps, C_out) contiguous
  bool w_vec;  // C_out is a multiple of the weight-tile vector width
  T* gx;       // grad_x (written through its strides)
  int64_t gxs[5];
  T* gh;  // grad_halo (or null)
  int64_t ghs[5];
  int64_t Mx, M;  // rows of grad_x, rows of grad_x + grad_halo
};

// ---------------------------------------------------------------------------------------------
// Input-gradient loader. Row m is a stored input pixel (b, s, ih, iw) of x (m < Mx) or of the
// halo; padded_frames_of_source gives the padded frames [lo, hi) that read it.
//   A[m, (jj, tap, n)] = grad_out[b, n, lo + jj - dt, ih + ph - dh, iw + pw - dw]  (jj < hi - lo)
//   B[(jj, tap, n), c] = w[c, tap, n]
// ---------------------------------------------------------------------------------------------
struct DgradRow {
  bool ok, is_halo;
  int64_t b, s, ih, iw, lo, hi;
};
COGVX_HD DgradRow dgrad_row(const Geom& g, int64_t Mx, int64_t M, int64_t m) {
  DgradRow r{};
  r.ok = m < M;
  if (!r.ok) return r;
  r.is_halo = m >= Mx;
  const int64_t frames = r.is_halo ? g.kt - 1 : g.T;
  const int64_t mm = r.is_halo ? m - Mx : m;
  const int64_t hw = g.H * g.W;
  r.b = mm / (frames * hw);
  int64_t q = mm - r.b * (frames * hw);
  r.s = q / hw;
  q -= r.s * hw;
  r.ih = q / g.W;
  r.iw = q - r.ih * g.W;
  padded_frames_of_source(r.is_halo, r.s, g.kt, g.has_halo, &r.lo, &r.hi);
  return r;
}

template <typename T>
struct DgradLoader {
  using Tr = Traits<T>;
  using Ti = Tiles<T>;
  const DgradParams<T>& p;
  int row, kof;
  DgradRow r;
  int64_t J;  // padded frames gathered per row in this block (kt or 1)
  KStep ks;
  ARegs<T> ar;
  WeightTile<T> wt;

  COGVX_HD DgradLoader(const DgradParams<T>& p_, int64_t m0, int64_t n0, int tid) : p(p_), J(1) {
    row = tid % kBM;
    kof = (tid / kBM) * ARegs<T>::EPT;
    r = dgrad_row(p.g, p.Mx, p.M, m0 + row);
    wt.init(p.w, p.g.Cin, p.g.Cout, p.g.taps, p.w_vec, n0, tid);
  }
  // True when this row reads more than one padded frame (frame 0 of x without halo).
  COGVX_HD bool multi_frame() const { return r.ok && r.hi - r.lo > 1; }
  COGVX_HD int64_t steps() const { return (p.g.Cout + Tr::BK - 1) / Tr::BK * J * p.g.taps; }
  // Loads K step `step` = the next one (steps are loaded in order from 0).
  COGVX_HD void load(int64_t /*step*/) {
    const Geom& g = p.g;
    const int64_t t = r.lo + ks.jj - ks.dt;  // output frame that read padded frame lo + jj via dt
    const int64_t oh = output_coord(r.ih, ks.dh, g.ph);
    const int64_t ow = output_coord(r.iw, ks.dw, g.pw);
    const bool ok = r.ok && ks.jj < r.hi - r.lo && in_bounds(t, g.T) && in_bounds(oh, g.Ho) &&
                    in_bounds(ow, g.Wo);
    const T* src = ok ? p.go + r.b * p.gs[0] + t * p.gs[2] + oh * p.gs[3] + ow * p.gs[4] : p.go;
    ar.load(ok, src, p.gs[1], int64_t{ks.cb} * Tr::BK + kof, g.Cout);
    wt.load(ks.cb, ks.tap);
    ks.next(g, J);
  }
  COGVX_HD void store(typename Ti::U& sm, int buf) const {
    ar.store(sm.ab.a[buf], row, kof);
    wt.store(sm.ab.b[buf]);
  }
};

template <typename T>
COGVX_HD RowOut<T> dgrad_row_out(const DgradParams<T>& p, int64_t m) {
  const DgradRow r = dgrad_row(p.g, p.Mx, p.M, m);
  if (!r.ok) return {nullptr, 0};
  if (r.is_halo)
    return {p.gh + r.b * p.ghs[0] + r.s * p.ghs[2] + r.ih * p.ghs[3] + r.iw * p.ghs[4], p.ghs[1]};
  return {p.gx + r.b * p.gxs[0] + r.s * p.gxs[2] + r.ih * p.gxs[3] + r.iw * p.gxs[4], p.gxs[1]};
}

template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks) causal_conv3d_dgrad_kernel(const DgradParams<T> p) {
  __shared__ typename Tiles<T>::U sm;
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  Acc<T> acc;
  acc.zero();
  {
    DgradLoader<T> ld(p, m0, n0, tid);
    // Blocks holding a frame 0 without halo gather kt padded frames per row, all others one.
    ld.J = __syncthreads_or(ld.multi_frame()) ? p.g.kt : 1;
    mainloop<T>(ld, acc, sm, 0, ld.steps(), tid);
  }
  if constexpr (Traits<T>::kTC) {
    stage_tile<T>(sm, acc, tid, nullptr, n0, p.g.Cin);
    __syncthreads();
    store_staged<T>(sm, tid, dgrad_row_out(p, m0 + tid % kBM), n0, p.g.Cin);
  } else {
    store_direct<T>(acc, tid, [&](int row) { return dgrad_row_out(p, m0 + row); }, nullptr, n0, p.g.Cin);
  }
}

// Input-gradient operands. w_perm: weight as (C_in, kt, kh, kw, C_out) contiguous.
template <typename T>
DgradParams<T> dgrad_params(const Geom& g, const at::Tensor& grad_out, const at::Tensor& w_perm,
                            const at::Tensor& grad_x, const at::Tensor& grad_halo) {
  TORCH_CHECK(w_perm.is_contiguous(), "causal_conv3d_backward: internal layout error");
  DgradParams<T> p{};
  p.g = g;
  p.go = grad_out.data_ptr<T>();
  copy_strides(grad_out, p.gs);
  p.w = w_perm.data_ptr<T>();
  p.w_vec = weight_vec_ok<T>(w_perm, g.Cout);
  p.gx = grad_x.data_ptr<T>();
  copy_strides(grad_x, p.gxs);
  p.gh = g.has_halo ? grad_halo.data_ptr<T>() : nullptr;
  if (g.has_halo) copy_strides(grad_halo, p.ghs);
  p.Mx = g.B * g.T * g.H * g.W;
  p.M = p.Mx + (g.has_halo ? g.B * (g.kt - 1) * g.H * g.W : 0);
  return p;
}

void launch_dgrad(const Geom& g, const at::Tensor& grad_out, const at::Tensor& w_perm, const at::Tensor& grad_x,
                  const at::Tensor& grad_halo, cudaStream_t stream) {
  COGVX_DISPATCH_FLOAT_HALF_BF16(grad_out.scalar_type(), "causal_conv3d_backward_cuda", [&] {
    const DgradParams<scalar_t> p = dgrad_params<scalar_t>(g, grad_out, w_perm, grad_x, grad_halo);
    const int64_t mblocks = ceil_div(p.M, kBM);
    const int64_t nblocks = ceil_div(g.Cin, kBN);
    TORCH_CHECK(mblocks <= INT32_MAX && nblocks <= 65535, "causal_conv3d_backward: problem too large");
    const dim3 grid(static_cast<unsigned>(mblocks), static_cast<unsigned>(nblocks));
    causal_conv3d_dgrad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gpu
}  // namespace causal_conv3d
}  // namespace cogvx

// Causal conv3d forward: csrc/cuda/causal_conv3d.h.
#include "cuda/causal_conv3d.cuh"

namespace cogvx {
namespace causal_conv3d {
namespace gpu {

template <typename T>
struct FwdParams {
  Geom g;
  const T* x;
  const T* halo;
  int64_t xs[5], hs[5];
  const T* w;  // (C_out, taps, C_in) contiguous
  bool w_vec;  // C_in is a multiple of the weight-tile vector width
  const T* bias;
  T* out;  // (B, C_out, T, Ho, Wo) contiguous
  int64_t M;
};

// ---------------------------------------------------------------------------------------------
// Forward loader: A[m, (tap, c)] = x_pad[b, c, t + dt, oh + dh - ph, ow + dw - pw],
//                 B[(tap, c), n] = w[n, tap, c].
// ---------------------------------------------------------------------------------------------
template <typename T>
struct FwdLoader {
  using Tr = Traits<T>;
  using Ti = Tiles<T>;
  const FwdParams<T>& p;
  int row, kof;
  bool row_ok;
  int64_t b;
  int t, oh, ow;  // each extent < 2^31 (checked on the host)
  KStep ks;
  ARegs<T> ar;
  WeightTile<T> wt;

  COGVX_HD FwdLoader(const FwdParams<T>& p_, int64_t m0, int64_t n0, int tid) : p(p_) {
    const Geom& g = p.g;
    row = tid % kBM;
    kof = (tid / kBM) * ARegs<T>::EPT;
    const int64_t m = m0 + row;
    row_ok = m < p.M;
    const int64_t hw = g.Ho * g.Wo;
    const int64_t mm = row_ok ? m : 0;
    b = mm / (g.T * hw);
    int64_t r = mm - b * (g.T * hw);
    t = static_cast<int>(r / hw);
    r -= t * hw;
    oh = static_cast<int>(r / g.Wo);
    ow = static_cast<int>(r - oh * g.Wo);
    wt.init(p.w, g.Cout, g.Cin, g.taps, p.w_vec, n0, tid);
  }
  COGVX_HD int64_t steps() const { return (p.g.Cin + Tr::BK - 1) / Tr::BK * p.g.taps; }
  // Loads K step `step` = the next one (steps are loaded in order from 0).
  COGVX_HD void load(int64_t /*step*/) {
    const Geom& g = p.g;
    const T* src = nullptr;
    int64_t cs = 0;
    const bool ok = row_ok && source_pixel(g, p.x, p.xs, p.halo, p.hs, b, t + ks.dt,
                                           input_coord(oh, ks.dh, g.ph),
                                           input_coord(ow, ks.dw, g.pw), &src, &cs);
    ar.load(ok, src, cs, int64_t{ks.cb} * Tr::BK + kof, g.Cin);
    wt.load(ks.cb, ks.tap);
    ks.next(g, 1);
  }
  COGVX_HD void store(typename Ti::U& sm, int buf) const {
    ar.store(sm.ab.a[buf], row, kof);
    wt.store(sm.ab.b[buf]);
  }
};

template <typename T>
COGVX_HD RowOut<T> fwd_row_out(const FwdParams<T>& p, int64_t m) {
  if (m >= p.M) return {nullptr, 0};
  const int64_t P = p.g.T * p.g.Ho * p.g.Wo;
  const int64_t b = m / P;
  return {p.out + b * p.g.Cout * P + (m - b * P), P};
}

template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks) causal_conv3d_fwd_kernel(const FwdParams<T> p) {
  __shared__ typename Tiles<T>::U sm;
  const int tid = threadIdx.x;
  // output-channel blocks vary fastest: the blocks that read one pixel tile of x run together, so x
  // comes from DRAM about once instead of once per kBN output channels
  const int64_t nblocks = ceil_div(p.g.Cout, kBN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) / nblocks * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) % nblocks * kBN;
  Acc<T> acc;
  acc.zero();
  {
    FwdLoader<T> ld(p, m0, n0, tid);
    mainloop<T>(ld, acc, sm, 0, ld.steps(), tid);
  }
  if constexpr (Traits<T>::kTC) {
    // mainloop ends with __syncthreads(): the operand tiles may be overwritten
    stage_tile<T>(sm, acc, tid, p.bias, n0, p.g.Cout);
    __syncthreads();
    store_staged<T>(sm, tid, fwd_row_out(p, m0 + tid % kBM), n0, p.g.Cout);
  } else {
    store_direct<T>(acc, tid, [&](int row) { return fwd_row_out(p, m0 + row); }, p.bias, n0, p.g.Cout);
  }
}

// Forward operands. w_perm: weight as (C_out, kt, kh, kw, C_in) contiguous.
template <typename T>
FwdParams<T> fwd_params(const Geom& g, const at::Tensor& x, const at::Tensor& halo,
                        const at::Tensor& w_perm, const at::Tensor& bias, const at::Tensor& out) {
  TORCH_CHECK(w_perm.is_contiguous() && out.is_contiguous() && (!bias.defined() || bias.is_contiguous()),
              "causal_conv3d: internal layout error");
  FwdParams<T> p{};
  p.g = g;
  p.x = x.data_ptr<T>();
  copy_strides(x, p.xs);
  p.halo = g.has_halo ? halo.data_ptr<T>() : nullptr;
  if (g.has_halo) copy_strides(halo, p.hs);
  p.w = w_perm.data_ptr<T>();
  p.w_vec = weight_vec_ok<T>(w_perm, g.Cin);
  p.bias = bias.defined() ? bias.data_ptr<T>() : nullptr;
  p.out = out.data_ptr<T>();
  p.M = g.B * g.T * g.Ho * g.Wo;
  return p;
}

void launch_fwd(const Geom& g, const at::Tensor& x, const at::Tensor& halo, const at::Tensor& w_perm,
                const at::Tensor& bias, const at::Tensor& out, cudaStream_t stream) {
  const int64_t mblocks = ceil_div(g.B * g.T * g.Ho * g.Wo, kBM);
  const int64_t nblocks = ceil_div(g.Cout, kBN);
  TORCH_CHECK(mblocks * nblocks <= INT32_MAX, "causal_conv3d: problem too large");
  const dim3 grid(static_cast<unsigned>(mblocks * nblocks));
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_cuda", [&] {
    const FwdParams<scalar_t> p = fwd_params<scalar_t>(g, x, halo, w_perm, bias, out);
    causal_conv3d_fwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gpu
}  // namespace causal_conv3d
}  // namespace cogvx

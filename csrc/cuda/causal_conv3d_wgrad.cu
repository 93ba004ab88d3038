// Causal conv3d weight gradient: split-K over output pixels into an fp32 workspace, then a
// deterministic reduction: csrc/cuda/causal_conv3d.h.
#include <algorithm>

#include "cuda/causal_conv3d.cuh"

namespace cogvx {
namespace causal_conv3d {
namespace gpu {

struct Tap {
  int dt, dh, dw;
};
COGVX_HD Tap tap_of(const Geom& g, int64_t tap) {  // tap = (dt*kh + dh)*kw + dw
  const int kw = static_cast<int>(g.kw), kh = static_cast<int>(g.kh);
  const int tp = static_cast<int>(tap);
  const int r = tp / kw;
  return {r / kh, r % kh, tp - r * kw};
}

template <typename T>
struct WgradParams {
  Geom g;
  const T* go;
  int64_t gs[5];
  const T* x;
  const T* halo;
  int64_t xs[5], hs[5];
  typename Traits<T>::acc_t* ws;  // (splits, C_out, C_in, kt, kh, kw)
  int64_t P;                      // output pixels: B*T*Ho*Wo
  int64_t ksteps, steps_per_split, n_cblocks;
};

// ---------------------------------------------------------------------------------------------
// Weight-gradient loader. Block (tap, C_in block, C_out block, split); K = output pixels q.
//   A[n, q] = grad_out[b, n, t, oh, ow]
//   B[c, q] = x_pad[b, c, t + dt, oh + dh - ph, ow + dw - pw]        (q = (b, t, oh, ow))
// Thread: one pixel column (tid % BK) of both tiles, rows tid / BK + NG*i.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct WgradLoader {
  using Tr = Traits<T>;
  using Ti = Tiles<T>;
  using S = typename Tr::smem_t;
  static constexpr int NG = kThreads / Tr::BK;  // row groups
  static constexpr int AR = kBM / NG;            // A rows per thread
  static constexpr int BR = kBN / NG;            // B rows per thread
  static_assert(kThreads % Tr::BK == 0 && kBM % NG == 0 && kBN % NG == 0, "wgrad mapping");

  const WgradParams<T>& p;
  int px, rg;
  int64_t n0, c0;
  Tap d;
  int64_t q;          // pixel of the next load, = (b, t, oh, ow)
  int b, t, oh, ow;   // each extent < 2^31 (checked on the host)
  // TC: two 16-bit elements per register (rows 2i and 2i+1 of the thread), else one element.
  static constexpr int AW = Tr::kTC ? AR / 2 : AR;
  static constexpr int BW = Tr::kTC ? BR / 2 : BR;
  std::conditional_t<Tr::kTC, uint32_t, T> av[AW];
  std::conditional_t<Tr::kTC, uint32_t, T> bv[BW];

  COGVX_HD WgradLoader(const WgradParams<T>& p_, int64_t tap, int64_t n0_, int64_t c0_,
                       int64_t step0, int tid)
      : p(p_), n0(n0_), c0(c0_) {
    const Geom& g = p.g;
    px = tid % Tr::BK;
    rg = tid / Tr::BK;
    d = tap_of(g, tap);
    q = step0 * Tr::BK + px;
    const int64_t hw = g.Ho * g.Wo;
    const int64_t bb = p.P > 0 ? q / (g.T * hw) : 0;  // P == 0: no step is loaded
    int64_t r = q - bb * (g.T * hw);
    b = static_cast<int>(bb);
    t = static_cast<int>(r / hw);
    r -= t * hw;
    oh = static_cast<int>(r / g.Wo);
    ow = static_cast<int>(r - oh * g.Wo);
  }
  // Loads the next K step (steps are loaded in order).
  COGVX_HD void load(int64_t /*step*/) {
    const Geom& g = p.g;
    const bool ok = q < p.P;
    const T* src = nullptr;
    int64_t cs = 0;
    const bool bok = ok && source_pixel(g, p.x, p.xs, p.halo, p.hs, b, t + d.dt,
                                        input_coord(oh, d.dh, g.ph),
                                        input_coord(ow, d.dw, g.pw), &src, &cs);
    const T* gop = ok ? p.go + b * p.gs[0] + t * p.gs[2] + oh * p.gs[3] + ow * p.gs[4] : p.go;
    // Rows n0 + rg + NG*i of grad_out and c0 + rg + NG*i of x; addresses advance by NG rows per
    // element (see ARegs::load), rows i < *valid are in range.
    const int a_valid = ok ? static_cast<int>(clamp_count(g.Cout - (n0 + rg), kBM)) : 0;
    const int b_valid = bok ? static_cast<int>(clamp_count(g.Cin - (c0 + rg), kBN)) : 0;
    const T* qa = ok ? gop + (n0 + rg) * p.gs[1] : p.go;
    const T* qb = bok ? src + (c0 + rg) * cs : p.go;
    const int64_t da = NG * p.gs[1], db = NG * cs;
    if constexpr (Tr::kTC) {
#pragma unroll
      for (int i = 0; i < AW; ++i) {
        const uint32_t lo = NG * (2 * i) < a_valid ? load_ro(reinterpret_cast<const uint16_t*>(qa)) : 0u;
        qa += da;
        const uint32_t hi = NG * (2 * i + 1) < a_valid ? load_ro(reinterpret_cast<const uint16_t*>(qa)) : 0u;
        qa += da;
        av[i] = lo | (hi << 16);
      }
#pragma unroll
      for (int i = 0; i < BW; ++i) {
        const uint32_t lo = NG * (2 * i) < b_valid ? load_ro(reinterpret_cast<const uint16_t*>(qb)) : 0u;
        qb += db;
        const uint32_t hi = NG * (2 * i + 1) < b_valid ? load_ro(reinterpret_cast<const uint16_t*>(qb)) : 0u;
        qb += db;
        bv[i] = lo | (hi << 16);
      }
    } else {
#pragma unroll
      for (int i = 0; i < AR; ++i) {
        av[i] = NG * i < a_valid ? load_ro(qa) : T(0);
        qa += da;
      }
#pragma unroll
      for (int i = 0; i < BR; ++i) {
        bv[i] = NG * i < b_valid ? load_ro(qb) : T(0);
        qb += db;
      }
    }
    // advance to the pixel BK further on
    q += Tr::BK;
    ow += Tr::BK;
    while (ow >= g.Wo) {
      ow -= g.Wo;
      if (++oh == g.Ho) {
        oh = 0;
        if (++t == g.T) {
          t = 0;
          ++b;
        }
      }
    }
  }
  COGVX_HD void store(typename Ti::U& sm, int buf) const {
    if constexpr (Tr::kTC) {
#pragma unroll
      for (int i = 0; i < AW; ++i) {
        sm.ab.a[buf][rg + NG * (2 * i)][px] = static_cast<uint16_t>(av[i] & 0xffffu);
        sm.ab.a[buf][rg + NG * (2 * i + 1)][px] = static_cast<uint16_t>(av[i] >> 16);
      }
#pragma unroll
      for (int i = 0; i < BW; ++i) {
        sm.ab.b[buf][rg + NG * (2 * i)][px] = static_cast<uint16_t>(bv[i] & 0xffffu);
        sm.ab.b[buf][rg + NG * (2 * i + 1)][px] = static_cast<uint16_t>(bv[i] >> 16);
      }
    } else {
#pragma unroll
      for (int i = 0; i < AR; ++i) sm.ab.a[buf][rg + NG * i][px] = av[i];
#pragma unroll
      for (int i = 0; i < BR; ++i) sm.ab.b[buf][rg + NG * i][px] = bv[i];
    }
  }
};

// Weight-gradient epilogue: the partial sums of this split, in grad_weight's (n, c, tap) order.
template <typename T>
COGVX_HD void wgrad_store(const WgradParams<T>& p, const Acc<T>& acc, int tid, int64_t tap,
                          int64_t n0, int64_t c0, int64_t split) {
  const Geom& g = p.g;
  typename Traits<T>::acc_t* ws = p.ws + split * (g.Cout * g.Cin * g.taps);
  acc.for_each(tid, [&](int row, int col, typename Traits<T>::acc_t v) {
    const int64_t n = n0 + row, c = c0 + col;
    if (n < g.Cout && c < g.Cin) ws[(n * g.Cin + c) * g.taps + tap] = v;
  });
}
// Block coordinates of the weight-gradient grid: x = tap * n_cblocks + C_in block, y = C_out
// block, z = split.
struct WgradBlock {
  int64_t tap, c0, n0, split, s_begin, s_end;
};
template <typename T>
COGVX_HD WgradBlock wgrad_block(const WgradParams<T>& p, int64_t bx, int64_t by, int64_t bz) {
  WgradBlock w;
  w.tap = bx / p.n_cblocks;
  w.c0 = (bx - w.tap * p.n_cblocks) * kBN;
  w.n0 = by * kBM;
  w.split = bz;
  w.s_begin = bz * p.steps_per_split;
  w.s_end = w.s_begin + p.steps_per_split < p.ksteps ? w.s_begin + p.steps_per_split : p.ksteps;
  return w;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks) causal_conv3d_wgrad_kernel(const WgradParams<T> p) {
  __shared__ typename Tiles<T>::U sm;
  const int tid = threadIdx.x;
  const WgradBlock wb = wgrad_block(p, blockIdx.x, blockIdx.y, blockIdx.z);
  Acc<T> acc;
  acc.zero();
  {
    WgradLoader<T> ld(p, wb.tap, wb.n0, wb.c0, wb.s_begin, tid);
    mainloop<T>(ld, acc, sm, wb.s_begin, wb.s_end, tid);
  }
  wgrad_store<T>(p, acc, tid, wb.tap, wb.n0, wb.c0, wb.split);
}

// grad_weight[i] = sum over splits of the workspace, in split order (deterministic).
template <typename T, typename A>
__global__ void __launch_bounds__(256) wgrad_reduce_kernel(const A* __restrict__ ws, int64_t splits,
                                                           int64_t count, T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = ws[i];
    for (int64_t k = 1; k < splits; ++k) s += ws[k * count + i];
    out[i] = static_cast<T>(s);
  }
}

// Split-K of the weight gradient: the fewest splits whose blocks fill the GPU's resident-block slots
// (`slots`: SMs × blocks per SM, from the occupancy calculator) to at least 90 % over at most 4
// waves, else the best-filling count; at least `min_steps` K steps per split, workspace <= 256 MiB.
// Depends only on the shapes and the GPU (its SM count and the kernel's occupancy there), so
// results are deterministic on a given GPU.
struct WgradSplit {
  int64_t splits, steps_per_split, ksteps, n_cblocks;
};
template <typename T>
WgradSplit wgrad_split(const Geom& g, int64_t slots, int64_t min_steps = 16) {
  using acc_t = typename Traits<T>::acc_t;
  WgradSplit s{};
  const int64_t P = g.B * g.T * g.Ho * g.Wo;
  const int64_t count = g.Cout * g.Cin * g.taps;
  s.n_cblocks = ceil_div(g.Cin, kBN);
  s.ksteps = ceil_div(P, Traits<T>::BK);
  const int64_t tiles = std::max<int64_t>(g.taps * s.n_cblocks * ceil_div(g.Cout, kBM), 1);
  slots = std::max<int64_t>(slots, 1);
  const int64_t ws_cap = (int64_t{256} << 20) / std::max<int64_t>(count * int64_t(sizeof(acc_t)), 1);
  const int64_t max_splits = std::max<int64_t>(
      1, std::min<int64_t>({s.ksteps / std::max<int64_t>(min_steps, 1), ws_cap, 65535, 4 * slots / tiles}));
  const auto fill = [&](int64_t splits) {  // busy fraction of the slots over the waves `splits` takes
    const int64_t blocks = tiles * splits;
    return static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, slots) * slots);
  };
  int64_t splits = 1;
  for (int64_t k = 1; k <= max_splits; ++k) {
    if (fill(k) > fill(splits)) splits = k;
    if (tiles * k >= slots && fill(k) >= 0.9) {
      splits = k;
      break;
    }
  }
  s.steps_per_split = s.ksteps > 0 ? ceil_div(s.ksteps, splits) : 0;
  s.splits = s.ksteps > 0 ? ceil_div(s.ksteps, s.steps_per_split) : 1;  // no empty split
  return s;
}

template <typename T>
WgradParams<T> wgrad_params(const Geom& g, const WgradSplit& s, const at::Tensor& grad_out,
                            const at::Tensor& x, const at::Tensor& halo, const at::Tensor& ws) {
  using acc_t = typename Traits<T>::acc_t;
  TORCH_CHECK(ws.is_contiguous() && ws.numel() == s.splits * g.Cout * g.Cin * g.taps,
              "causal_conv3d_backward: internal workspace error");
  WgradParams<T> p{};
  p.g = g;
  p.go = grad_out.data_ptr<T>();
  copy_strides(grad_out, p.gs);
  p.x = x.data_ptr<T>();
  copy_strides(x, p.xs);
  p.halo = g.has_halo ? halo.data_ptr<T>() : nullptr;
  if (g.has_halo) copy_strides(halo, p.hs);
  p.ws = ws.data_ptr<acc_t>();
  p.P = g.B * g.T * g.Ho * g.Wo;
  p.ksteps = s.ksteps;
  p.steps_per_split = s.steps_per_split;
  p.n_cblocks = s.n_cblocks;
  return p;
}

void launch_wgrad(const Geom& g, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& halo,
                  const at::Tensor& grad_w, cudaStream_t stream) {
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_backward_cuda", [&] {
    using acc_t = typename Traits<scalar_t>::acc_t;
    const int64_t count = grad_w.numel();
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, causal_conv3d_wgrad_kernel<scalar_t>,
                                                                 kThreads, 0));
    const WgradSplit s = wgrad_split<scalar_t>(g, sms * std::max(per_sm, 1));
    const int64_t xblocks = g.taps * s.n_cblocks, yblocks = ceil_div(g.Cout, kBM);
    TORCH_CHECK(xblocks <= INT32_MAX && yblocks <= 65535 && s.splits <= 65535,
                "causal_conv3d_backward: problem too large");
    at::Tensor ws = at::empty({s.splits, count}, x.options().dtype(at::kFloat));
    const WgradParams<scalar_t> p = wgrad_params<scalar_t>(g, s, grad_out, x, halo, ws);
    const dim3 grid(static_cast<unsigned>(xblocks), static_cast<unsigned>(yblocks),
                    static_cast<unsigned>(s.splits));
    causal_conv3d_wgrad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t rblocks = std::min<int64_t>(ceil_div(count, 256), 8 * sms);
    wgrad_reduce_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rblocks), 256, 0, stream>>>(
        p.ws, s.splits, count, grad_w.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gpu
}  // namespace causal_conv3d
}  // namespace cogvx

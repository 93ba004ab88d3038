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
//                No fp64 kernels: no backend declares float64 (it runs on the reference).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/causal_conv3d.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "cuda/mma.cuh"

namespace cogvx {
namespace causal_conv3d {
namespace gpu {

constexpr int kThreads = 256;
constexpr int kBM = 128;  // rows of a block tile: output pixels (fwd), input pixels (dgrad), C_out (wgrad)
constexpr int kBN = 64;   // columns of a block tile: C_out (fwd), C_in (dgrad, wgrad)

// ---------------------------------------------------------------------------------------------
// Per-type configuration
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Traits {  // fp32: CUDA-core fallback
  static_assert(std::is_same_v<T, float>, "causal_conv3d CUDA kernels: float32, float16, bfloat16");
  static constexpr bool kTC = false;
  using acc_t = float;
  using smem_t = float;
  static constexpr int BK = 16;
  static constexpr int PAD = 1;  // row stride BK+1 words: conflict-free column reads
  static constexpr int kMinBlocks = 2;
};
template <>
struct Traits<c10::Half> {
  static constexpr bool kTC = true;
  using acc_t = float;
  using smem_t = uint16_t;  // raw bits
  static constexpr int BK = 32;
  static constexpr int PAD = 8;  // row stride 80 B: conflict-free ldmatrix and 16-byte stores
  static constexpr int kMinBlocks = 2;  // <= 128 registers: two blocks (16 warps) per SM
};
template <>
struct Traits<c10::BFloat16> : Traits<c10::Half> {};

template <typename T>
struct Tiles {
  using Tr = Traits<T>;
  using S = typename Tr::smem_t;
  static constexpr int LDK = Tr::BK + Tr::PAD;
  static constexpr int LDC = kBM + 8;  // staging row stride (elements) of the TC epilogue
  union alignas(16) U {
    struct {
      S a[2][kBM][LDK];  // A tile, K contiguous
      S b[2][kBN][LDK];  // B tile, K contiguous ("col-major" B of mma .row.col)
    } ab;
    uint16_t c[kBN][LDC];  // TC epilogue: output tile as bits of T, [n][m]
  };
};

// Read-only global load (plain load on the host, for emulation).
template <typename U>
COGVX_HD U load_ro(const U* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// v clamped to [0, hi] (an element count that fits in int).
COGVX_HD int64_t clamp_count(int64_t v, int64_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

template <typename T>
COGVX_HD uint16_t to_bits(float v) {
  return T(v).x;
}
template <typename T>
COGVX_HD T from_bits(uint16_t b) {
  return T(b, T::from_bits());
}

// ---------------------------------------------------------------------------------------------
// Geometry and the source of a padded input pixel
// ---------------------------------------------------------------------------------------------
struct Geom {
  int64_t B, Cin, Cout, T, H, W, Ho, Wo;
  int64_t kt, kh, kw, ph, pw, taps;
  bool has_halo;
};

struct Tap {
  int dt, dh, dw;
};
COGVX_HD Tap tap_of(const Geom& g, int64_t tap) {  // tap = (dt*kh + dh)*kw + dw
  const int kw = static_cast<int>(g.kw), kh = static_cast<int>(g.kh);
  const int tp = static_cast<int>(tap);
  const int r = tp / kw;
  return {r / kh, r % kh, tp - r * kw};
}


// Where channel 0 of the time-padded input at (b, padded frame j, ih, iw) is stored. Returns false
// for the zero spatial border. Halo frames / the repeated first frame come from padded_frame_source.
template <typename T>
COGVX_HD bool source_pixel(const Geom& g, const T* x, const int64_t (&xs)[5], const T* halo,
                           const int64_t (&hs)[5], int64_t b, int64_t j, int64_t ih, int64_t iw,
                           const T** ptr, int64_t* cstride) {
  if (!in_bounds(ih, g.H) || !in_bounds(iw, g.W)) return false;
  const FrameSource f = padded_frame_source(j, g.kt, g.has_halo);
  if (f.from_halo) {
    *ptr = halo + b * hs[0] + f.index * hs[2] + ih * hs[3] + iw * hs[4];
    *cstride = hs[1];
  } else {
    *ptr = x + b * xs[0] + f.index * xs[2] + ih * xs[3] + iw * xs[4];
    *cstride = xs[1];
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Kernel parameters
// ---------------------------------------------------------------------------------------------
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
// B tile of the forward / input-gradient GEMMs: w[(row0 + row), tap, cb*BK + k] of a contiguous
// (rows, taps, cred) weight. Each thread loads 16 bytes.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct WeightTile {
  using Tr = Traits<T>;
  using S = typename Tr::smem_t;
  static constexpr int EPT = kBN * Tr::BK / kThreads;
  static constexpr int TPR = Tr::BK / EPT;  // threads per tile row
  static_assert(EPT * sizeof(T) == 16, "weight tile: one 16-byte vector per thread");
  static_assert(kBN * TPR == kThreads, "weight tile: thread mapping");

  const T* w;
  int64_t nrows, cred, taps, row;
  int rl, kof;
  bool vec;
  uint4 pk;                    // TC: 8 x 16 bit
  T v[Tr::kTC ? 1 : EPT];      // fallback

  COGVX_HD void init(const T* w_, int64_t nrows_, int64_t cred_, int64_t taps_, bool vec_,
                     int64_t row0, int tid) {
    w = w_;
    nrows = nrows_;
    cred = cred_;
    taps = taps_;
    vec = vec_;
    rl = tid / TPR;
    kof = (tid % TPR) * EPT;
    row = row0 + rl;
  }
  COGVX_HD void load(int64_t cb, int64_t tap) {
    const int64_t k0 = cb * Tr::BK + kof;
    const bool rok = row < nrows;
    const T* p = w + (row * taps + tap) * cred + k0;  // dereferenced only where in range
    if constexpr (Tr::kTC) {
      if (vec) {  // cred % 8 == 0 and k0 % 8 == 0: the 8 elements are all in or all out
        pk = (rok && k0 < cred) ? load_ro(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
      } else {
        const uint16_t* pb = reinterpret_cast<const uint16_t*>(p);
        uint32_t q[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t lo = (rok && k0 + 2 * i < cred) ? load_ro(pb + 2 * i) : 0u;
          const uint32_t hi = (rok && k0 + 2 * i + 1 < cred) ? load_ro(pb + 2 * i + 1) : 0u;
          q[i] = lo | (hi << 16);
        }
        pk = make_uint4(q[0], q[1], q[2], q[3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < EPT; ++i) v[i] = (rok && k0 + i < cred) ? load_ro(p + i) : T(0);
    }
  }
  COGVX_HD void store(S (*b)[Tiles<T>::LDK]) const {
    if constexpr (Tr::kTC) {
      *reinterpret_cast<uint4*>(&b[rl][kof]) = pk;
    } else {
#pragma unroll
      for (int i = 0; i < EPT; ++i) b[rl][kof + i] = v[i];
    }
  }
};

// A-tile registers of the forward / input-gradient loaders: EPT consecutive channels of one pixel.
template <typename T>
struct ARegs {
  using Tr = Traits<T>;
  using S = typename Tr::smem_t;
  static constexpr int EPT = kBM * Tr::BK / kThreads;
  static_assert(kBM * (Tr::BK / EPT) == kThreads, "A tile: thread mapping");
  uint32_t pk[Tr::kTC ? EPT / 2 : 1];
  T v[Tr::kTC ? 1 : EPT];

  // Loads element i from p[c*cs] for channels c = c0 + i < climit (zero elsewhere or if !ok).
  // (The address is advanced by cs per element rather than computed as c*cs, which keeps the
  // compiler from hoisting EPT loop-invariant 64-bit products into registers.)
  COGVX_HD void load(bool ok, const T* p, int64_t cs, int64_t c0, int64_t climit) {
    // elements i < nvalid are in range (clamped to int: 32-bit compares in the unrolled loop)
    const int nvalid = ok ? static_cast<int>(clamp_count(climit - c0, EPT)) : 0;
    const T* q = ok ? p + c0 * cs : p;
    if constexpr (Tr::kTC) {
#pragma unroll
      for (int i = 0; i < EPT / 2; ++i) {
        const uint32_t lo = 2 * i < nvalid ? load_ro(reinterpret_cast<const uint16_t*>(q)) : 0u;
        q += cs;
        const uint32_t hi = 2 * i + 1 < nvalid ? load_ro(reinterpret_cast<const uint16_t*>(q)) : 0u;
        q += cs;
        pk[i] = lo | (hi << 16);
      }
    } else {
#pragma unroll
      for (int i = 0; i < EPT; ++i) {
        v[i] = i < nvalid ? load_ro(q) : T(0);
        q += cs;
      }
    }
  }
  COGVX_HD void store(S (*a)[Tiles<T>::LDK], int row, int kof) const {
    if constexpr (Tr::kTC) {
#pragma unroll
      for (int i = 0; i < EPT / 8; ++i)
        *reinterpret_cast<uint4*>(&a[row][kof + 8 * i]) =
            make_uint4(pk[4 * i], pk[4 * i + 1], pk[4 * i + 2], pk[4 * i + 3]);
    } else {
#pragma unroll
      for (int i = 0; i < EPT; ++i) a[row][kof + i] = v[i];
    }
  }
};

// K-step position of the forward / input-gradient loaders. Steps are loaded in order from 0, so
// step = (((cb*J + jj)*kt + dt)*kh + dh)*kw + dw is advanced like an odometer instead of divided.
struct KStep {
  int cb = 0, jj = 0, dt = 0, dh = 0, dw = 0, tap = 0;  // tap = (dt*kh + dh)*kw + dw
  COGVX_HD void next(const Geom& g, int64_t J) {
    ++tap;
    if (++dw < g.kw) return;
    dw = 0;
    if (++dh < g.kh) return;
    dh = 0;
    if (++dt < g.kt) return;
    dt = 0;
    tap = 0;
    if (++jj < J) return;
    jj = 0;
    ++cb;
  }
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

// ---------------------------------------------------------------------------------------------
// Tensor-core warp tile (bf16/fp16): warp w computes rows 32*(w%4).., columns 32*(w/4).. of the
// 128x64 block tile as 2x4 mma.m16n8k16 fragments. Lane coordinates are shared with the host
// emulation used to check them.
// ---------------------------------------------------------------------------------------------
COGVX_HD int warp_row0(int tid) { return ((tid >> 5) & 3) * 32; }
COGVX_HD int warp_col0(int tid) { return ((tid >> 5) >> 2) * 32; }
// ldmatrix.x4 address of this lane for A fragment mi (16 rows) of k16 slice kk: matrices
// (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3.
COGVX_HD int a_ldm_row(int tid, int mi) { return warp_row0(tid) + mi * 16 + (tid & 15); }
COGVX_HD int a_ldm_col(int tid, int kk) { return kk * 16 + ((tid & 31) >> 4) * 8; }
// ldmatrix.x4 address for B fragments 2nj, 2nj+1 (n8 each): matrices (n 0-7, k 0-7),
// (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of 2nj, b0, b1 of 2nj+1.
COGVX_HD int b_ldm_row(int tid, int nj) {
  return warp_col0(tid) + nj * 16 + (tid & 7) + (((tid & 31) >> 4) << 3);
}
COGVX_HD int b_ldm_col(int tid, int kk) { return kk * 16 + (((tid >> 3) & 1) << 3); }
// Accumulator element e (0..3) of fragment (mi, ni).
COGVX_HD int c_frag_row(int tid, int mi, int e) {
  return warp_row0(tid) + mi * 16 + ((tid & 31) >> 2) + ((e >> 1) << 3);
}
COGVX_HD int c_frag_col(int tid, int ni, int e) {
  return warp_col0(tid) + ni * 8 + ((tid & 3) << 1) + (e & 1);
}

#if defined(__CUDACC__)
using mma::ldmatrix_x4;
using mma::mma_16816;
#endif

template <typename T>
struct AccTC {
  float c[2][4][4];
  COGVX_HD void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[i][j][e] = 0.f;
  }
#if defined(__CUDACC__)
  __device__ __forceinline__ void compute(const typename Tiles<T>::U& sm, int buf, int tid) {
#pragma unroll
    for (int kk = 0; kk < Traits<T>::BK / 16; ++kk) {
      uint32_t a[2][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(a[mi], &sm.ab.a[buf][a_ldm_row(tid, mi)][a_ldm_col(tid, kk)]);
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4(r, &sm.ab.b[buf][b_ldm_row(tid, nj)][b_ldm_col(tid, kk)]);
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<T>(c[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  }
#endif
  // Calls f(row, col, value) for every accumulator of this thread (block-tile coordinates).
  template <class F>
  COGVX_HD void for_each(int tid, F&& f) const {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          f(c_frag_row(tid, mi, e), c_frag_col(tid, ni, e), c[mi][ni][e]);
  }
};

// CUDA-core tile (fp32): thread computes rows tm + 16*i (i < 8), columns tn + 16*j (j < 4).
template <typename T>
struct AccSIMT {
  using acc_t = typename Traits<T>::acc_t;
  acc_t c[8][4];
  COGVX_HD void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[i][j] = acc_t(0);
  }
  COGVX_HD void compute(const typename Tiles<T>::U& sm, int buf, int tid) {
    const int tm = tid & 15, tn = tid >> 4;
#pragma unroll
    for (int k = 0; k < Traits<T>::BK; ++k) {
      acc_t a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = sm.ab.a[buf][tm + 16 * i][k];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sm.ab.b[buf][tn + 16 * j][k];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c[i][j] += a[i] * b[j];
    }
  }
  template <class F>
  COGVX_HD void for_each(int tid, F&& f) const {
    const int tm = tid & 15, tn = tid >> 4;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) f(tm + 16 * i, tn + 16 * j, c[i][j]);
  }
};

template <typename T>
using Acc = std::conditional_t<Traits<T>::kTC, AccTC<T>, AccSIMT<T>>;

#if defined(__CUDACC__)
// Register-staged double buffering: global loads of step s+1 are in flight during the MMAs of s.
template <typename T, class L>
__device__ __forceinline__ void mainloop(L& ld, Acc<T>& acc, typename Tiles<T>::U& sm,
                                         int64_t s_begin, int64_t s_end, int tid) {
  if (s_begin >= s_end) return;  // uniform over the block
  ld.load(s_begin);
  ld.store(sm, 0);
  __syncthreads();
  int buf = 0;
  for (int64_t s = s_begin; s < s_end; ++s) {
    const bool more = s + 1 < s_end;
    if (more) ld.load(s + 1);
    acc.compute(sm, buf, tid);
    if (more) ld.store(sm, buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Epilogues. Output rows: (pointer to channel 0, channel stride), null when out of range.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct RowOut {
  T* ptr;
  int64_t cs;
};

template <typename T>
COGVX_HD RowOut<T> fwd_row_out(const FwdParams<T>& p, int64_t m) {
  if (m >= p.M) return {nullptr, 0};
  const int64_t P = p.g.T * p.g.Ho * p.g.Wo;
  const int64_t b = m / P;
  return {p.out + b * p.g.Cout * P + (m - b * P), P};
}

template <typename T>
COGVX_HD RowOut<T> dgrad_row_out(const DgradParams<T>& p, int64_t m) {
  const DgradRow r = dgrad_row(p.g, p.Mx, p.M, m);
  if (!r.ok) return {nullptr, 0};
  if (r.is_halo)
    return {p.gh + r.b * p.ghs[0] + r.s * p.ghs[2] + r.ih * p.ghs[3] + r.iw * p.ghs[4], p.ghs[1]};
  return {p.gx + r.b * p.gxs[0] + r.s * p.gxs[2] + r.ih * p.gxs[3] + r.iw * p.gxs[4], p.gxs[1]};
}

// TC epilogue, phase 1: accumulators (+ bias) -> T bits in the staging tile c[n][m].
template <typename T>
COGVX_HD void stage_tile(typename Tiles<T>::U& sm, const AccTC<T>& acc, int tid, const T* bias,
                         int64_t n0, int64_t N) {
  acc.for_each(tid, [&](int row, int col, float v) {
    if (bias != nullptr && n0 + col < N) v += static_cast<float>(bias[n0 + col]);
    sm.c[col][row] = to_bits<T>(v);
  });
}
// TC epilogue, phase 2: thread writes row tid % kBM, columns tid / kBM + 2*i (coalesced along m).
template <typename T>
COGVX_HD void store_staged(const typename Tiles<T>::U& sm, int tid, RowOut<T> ro, int64_t n0,
                           int64_t N) {
  if (ro.ptr == nullptr) return;
  const int row = tid % kBM;
  constexpr int kCols = kThreads / kBM;
#pragma unroll 4
  for (int col = tid / kBM; col < kBN; col += kCols) {
    if (n0 + col < N) ro.ptr[(n0 + col) * ro.cs] = from_bits<T>(sm.c[col][row]);
  }
}
// Fallback epilogue: every accumulator straight to global memory (+ bias).
template <typename T, class RowFn>
COGVX_HD void store_direct(const AccSIMT<T>& acc, int tid, RowFn&& row_out, const T* bias,
                           int64_t n0, int64_t N) {
  using acc_t = typename Traits<T>::acc_t;
  acc.for_each(tid, [&](int row, int col, acc_t v) {
    const int64_t n = n0 + col;
    const RowOut<T> ro = row_out(row);
    if (ro.ptr == nullptr || n >= N) return;
    if (bias != nullptr) v += static_cast<acc_t>(bias[n]);
    ro.ptr[n * ro.cs] = static_cast<T>(v);
  });
}
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

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks) causal_conv3d_fwd_kernel(const FwdParams<T> p) {
  __shared__ typename Tiles<T>::U sm;
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
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
#endif  // __CUDACC__

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
inline void copy_strides(const at::Tensor& t, int64_t (&s)[5]) {
  for (int i = 0; i < 5; ++i) s[i] = t.stride(i);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

template <typename T>
bool weight_vec_ok(const at::Tensor& w_perm, int64_t cred) {
  return cred % WeightTile<T>::EPT == 0 && reinterpret_cast<uintptr_t>(w_perm.data_ptr()) % 16 == 0;
}

// Forward operands. w_perm: weight as (C_out, kt, kh, kw, C_in) contiguous.
template <typename T>
FwdParams<T> fwd_params(const Geom& g, const at::Tensor& x, const at::Tensor& halo,
                        const at::Tensor& w_perm, const at::Tensor& bias, at::Tensor& out) {
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

// Input-gradient operands. w_perm: weight as (C_in, kt, kh, kw, C_out) contiguous.
template <typename T>
DgradParams<T> dgrad_params(const Geom& g, const at::Tensor& grad_out, const at::Tensor& w_perm,
                            at::Tensor& grad_x, at::Tensor& grad_halo) {
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

// Split-K of the weight gradient: enough blocks for ~4 waves of `sms` multiprocessors, at least
// `min_steps` K steps per split, workspace <= 256 MiB. Depends only on the shapes and the SM count,
// so results are deterministic on a given GPU.
struct WgradSplit {
  int64_t splits, steps_per_split, ksteps, n_cblocks;
};
template <typename T>
WgradSplit wgrad_split(const Geom& g, int64_t sms, int64_t min_steps = 16) {
  using acc_t = typename Traits<T>::acc_t;
  WgradSplit s{};
  const int64_t P = g.B * g.T * g.Ho * g.Wo;
  const int64_t count = g.Cout * g.Cin * g.taps;
  s.n_cblocks = ceil_div(g.Cin, kBN);
  s.ksteps = ceil_div(P, Traits<T>::BK);
  const int64_t tiles = g.taps * s.n_cblocks * ceil_div(g.Cout, kBM);
  int64_t splits = ceil_div(4 * sms, std::max<int64_t>(tiles, 1));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, s.ksteps / std::max<int64_t>(min_steps, 1)));
  const int64_t ws_cap = (int64_t{256} << 20) / std::max<int64_t>(count * int64_t(sizeof(acc_t)), 1);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, ws_cap, 65535}));
  s.steps_per_split = s.ksteps > 0 ? ceil_div(s.ksteps, splits) : 0;
  s.splits = s.ksteps > 0 ? ceil_div(s.ksteps, s.steps_per_split) : 1;  // no empty split
  return s;
}

template <typename T>
WgradParams<T> wgrad_params(const Geom& g, const WgradSplit& s, const at::Tensor& grad_out,
                            const at::Tensor& x, const at::Tensor& halo, at::Tensor& ws) {
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


#if defined(__CUDACC__)
at::Tensor causal_conv3d_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& halo, int64_t pad_h, int64_t pad_w) {
  checks::conv::args("cogvx::causal_conv3d", x, weight, bias, halo, pad_h, pad_w);
  const Geom g = make_geom(x, weight, halo, pad_h, pad_w);
  TORCH_CHECK(x.is_cuda(), "causal_conv3d_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({g.B, g.Cout, g.T, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor b;
  if (checks::given(bias)) b = bias->contiguous();
  // (C_out, kt, kh, kw, C_in): one K step reads BK consecutive input channels of one tap.
  const at::Tensor w = weight.permute({0, 2, 3, 4, 1}).contiguous();
  const at::Tensor hl = g.has_halo ? *halo : at::Tensor();
  const int64_t mblocks = ceil_div(g.B * g.T * g.Ho * g.Wo, kBM);
  const int64_t nblocks = ceil_div(g.Cout, kBN);
  TORCH_CHECK(mblocks <= INT32_MAX && nblocks <= 65535, "causal_conv3d: problem too large");
  const dim3 grid(static_cast<unsigned>(mblocks), static_cast<unsigned>(nblocks));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_cuda", [&] {
    const FwdParams<scalar_t> p = fwd_params<scalar_t>(g, x, hl, w, b, out);
    causal_conv3d_fwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv3d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& halo, int64_t pad_h, int64_t pad_w, bool has_bias) {
  constexpr const char* op = "cogvx::causal_conv3d_backward";
  checks::conv::args(op, x, weight, std::nullopt, halo, pad_h, pad_w);
  checks::conv::grad_out(op, grad_out, x, weight, pad_h, pad_w);
  const Geom g = make_geom(x, weight, halo, pad_h, pad_w);
  TORCH_CHECK(x.is_cuda(), "causal_conv3d_backward_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor hl = g.has_halo ? *halo : at::Tensor();

  // Contiguous like the fake implementation and the CPU kernel (the kernels write through strides).
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_h = g.has_halo ? at::empty(hl.sizes(), hl.options()) : at::empty({0}, x.options());
  at::Tensor grad_b = has_bias ? at::sum(grad_out, {0, 2, 3, 4}, /*keepdim=*/false,
                                         at::kFloat)
                                     .to(weight.scalar_type())
                               : at::empty({0}, weight.options());

  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_backward_cuda", [&] {
    using acc_t = typename Traits<scalar_t>::acc_t;
    // ---- input gradient: grad_x and grad_halo, every element written once ----
    if (grad_x.numel() > 0 || grad_h.numel() > 0) {
      // (C_in, kt, kh, kw, C_out): one K step reads BK consecutive output channels of one tap.
      const at::Tensor wt = weight.permute({1, 2, 3, 4, 0}).contiguous();
      const DgradParams<scalar_t> p = dgrad_params<scalar_t>(g, grad_out, wt, grad_x, grad_h);
      const int64_t mblocks = ceil_div(p.M, kBM);
      const int64_t nblocks = ceil_div(g.Cin, kBN);
      TORCH_CHECK(mblocks <= INT32_MAX && nblocks <= 65535, "causal_conv3d_backward: problem too large");
      const dim3 grid(static_cast<unsigned>(mblocks), static_cast<unsigned>(nblocks));
      causal_conv3d_dgrad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // ---- weight gradient: split-K over output pixels, fixed split order -> deterministic ----
    const int64_t count = grad_w.numel();
    if (count > 0) {
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const WgradSplit s = wgrad_split<scalar_t>(g, sms);
      const int64_t xblocks = g.taps * s.n_cblocks, yblocks = ceil_div(g.Cout, kBM);
      TORCH_CHECK(xblocks <= INT32_MAX && yblocks <= 65535 && s.splits <= 65535,
                  "causal_conv3d_backward: problem too large");
      at::Tensor ws = at::empty({s.splits, count}, x.options().dtype(at::kFloat));
      const WgradParams<scalar_t> p = wgrad_params<scalar_t>(g, s, grad_out, x, hl, ws);
      const dim3 grid(static_cast<unsigned>(xblocks), static_cast<unsigned>(yblocks),
                      static_cast<unsigned>(s.splits));
      causal_conv3d_wgrad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t rblocks = std::min<int64_t>(ceil_div(count, 256), 8 * sms);
      wgrad_reduce_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rblocks), 256, 0, stream>>>(
          p.ws, s.splits, count, grad_w.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_w, grad_b, grad_h};
}
#endif  // __CUDACC__

}  // namespace gpu
}  // namespace causal_conv3d
}  // namespace cogvx

#if defined(__CUDACC__)
TORCH_LIBRARY_IMPL(cogvx, CUDA, m) {
  m.impl("causal_conv3d", &cogvx::causal_conv3d::gpu::causal_conv3d_cuda);
  m.impl("causal_conv3d_backward", &cogvx::causal_conv3d::gpu::causal_conv3d_backward_cuda);
}
#endif

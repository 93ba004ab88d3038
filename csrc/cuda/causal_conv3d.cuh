// Device code shared by the causal conv3d kernels (csrc/cuda/causal_conv3d.h): tile shapes, the
// loaders of the forward and input-gradient GEMMs, warp tiles, the main loop, epilogues; and the
// host helpers of their launchers.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "common/causal_conv3d.h"
#include "common/dispatch.h"
#include "cuda/causal_conv3d.h"
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

// Read-only global load (a plain load in the host pass of COGVX_HD code).
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
// The source of a padded input pixel
// ---------------------------------------------------------------------------------------------
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
      // channels-last source (cs == 1), all EPT channels in range and 16-byte aligned (C_in a
      // multiple of 8): EPT / 8 vector loads instead of EPT 2-byte ones
      if (cs == 1 && nvalid == EPT && (reinterpret_cast<uintptr_t>(q) & 15) == 0) {
#pragma unroll
        for (int i = 0; i < EPT / 8; ++i) {
          const uint4 v = load_ro(reinterpret_cast<const uint4*>(q) + i);
          pk[4 * i] = v.x;
          pk[4 * i + 1] = v.y;
          pk[4 * i + 2] = v.z;
          pk[4 * i + 3] = v.w;
        }
        return;
      }
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
// Tensor-core warp tile (bf16/fp16): warp w computes rows 32*(w%4).., columns 32*(w/4).. of the
// 128x64 block tile as 2x4 mma.m16n8k16 fragments.
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

using mma::ldmatrix_x4;
using mma::mma_16816;

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

// ---------------------------------------------------------------------------------------------
// Epilogues. Output rows: (pointer to channel 0, channel stride), null when out of range.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct RowOut {
  T* ptr;
  int64_t cs;
};

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

// ---------------------------------------------------------------------------------------------
// Host side of the launchers
// ---------------------------------------------------------------------------------------------
inline void copy_strides(const at::Tensor& t, int64_t (&s)[5]) {
  for (int i = 0; i < 5; ++i) s[i] = t.stride(i);
}

template <typename T>
bool weight_vec_ok(const at::Tensor& w_perm, int64_t cred) {
  return cred % WeightTile<T>::EPT == 0 && reinterpret_cast<uintptr_t>(w_perm.data_ptr()) % 16 == 0;
}

}  // namespace gpu
}  // namespace causal_conv3d
}  // namespace cogvx

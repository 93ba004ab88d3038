// CUDA kernels of CogVideoX's 3D RoPE (rope3d, rope3d_) and of the fused per-head q/k LayerNorm +
// 3D RoPE (qk_norm_rope3d) with its backward. Memory-bound: every element is read once and written
// once, in fp32 registers in between; the angles come from the tiny (2, T+H+W, D/2) per-axis
// cos/sin tables (read through the read-only cache) via the index helpers of common/rope3d.h
// (Grid, video_coords, table_row, rotate_pair), shared with the CPU kernels.
//
// Work decomposition (all kernels): one warp per (b, head, token) row; lane l holds channel pairs
// p = l + 32k (k < PPL = ceil(D/64)), i.e. channels (2p, 2p+1), loaded/stored as one 2·sizeof(T)
// word (4 bytes for bf16/fp16): for D = 64 a warp reads a row as one 128-byte segment. Lanes past
// the last pair (D not a multiple of 64) repeat the last pair's loads and do not store.
// A warp's work item is one token and a chunk of `rpi` consecutive (b, head) rows of it: the video
// coordinates and cos/sin of the token are computed once per item and kept in registers for all
// its rows (they depend on neither b nor head), and in the head-split view (B, L, heads, D)
// .transpose(1, 2) those rows are adjacent in memory. Items are token-major
// (item = token·nchunk + chunk) and taken grid-stride by the warps. A warp processes its rows in
// steps of R (rows_per_step: 8 rows for D = 64 bf16/fp16): all loads of a step are issued before
// any use; row pointers advance by the operand's head stride (or to the next b), so every operand
// is read/written through its own 4 int64 strides (any layout, no copies); a pair is read as one
// vector when the channel stride is 1 and the pair is aligned (VEC), else as two scalars.
//
//   rope3d      out (contiguous) = rotation of the video tokens of x (inverse: by −angle); text
//               tokens copied bit-exactly.
//   rope3d_     same, written through x's strides; text tokens are not visited.
//   qk_norm     LayerNorm in fp32 (two-pass mean/variance from registers, warp-shuffle sums,
//               biased variance, rstd = rsqrt(var + eps)), · weight + bias (each optional, x's
//               dtype or fp32), rotation of video tokens; mean/rstd fp32 (B, heads, L) contiguous.
//   backward    u = inverse rotation of grad_out (video tokens), g = u·w, xhat = (x − mean)·rstd,
//               grad_x = rstd·(g − mean_D(g) − xhat·mean_D(g·xhat)). Σ u·xhat and Σ u: per lane
//               in shared memory (each lane owns its channels' slots), summed over the block's
//               warps in order into an fp32 workspace (blocks × 2D), then reduced over blocks in a
//               fixed order by param_grad_reduce_kernel (deterministic; no atomics).
//
// Launch: 256 threads (8 warps) per block; grid = min(ceil(items / 8), SMs × resident blocks per SM)
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor); nchunk is chosen for >= 16 items per resident
// warp (load balance) with rpi a multiple of R (<= 32 in the backward, whose lane j holds the
// mean/rstd of the item's row j). Register caps (__launch_bounds__ minimum blocks) keep 32 / 24 /
// 16 warps per SM resident for rope / forward / backward (VEC paths) with no spills.
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

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/rope3d.h"

namespace cogvx {
namespace rope3d {
namespace gpu {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxD = 256;  // PPL <= 4
// Rows a warp processes per step (all their loads issued before any use): 16 bytes of each input
// operand in flight per lane and step, i.e. 8 rows of a D=64 bf16/fp16 head.
template <typename T, int PPL>
constexpr int rows_per_step() {
  return 16 / (PPL * static_cast<int>(sizeof(T))) > 0 ? 16 / (PPL * static_cast<int>(sizeof(T))) : 1;
}

// Resident 256-thread blocks per SM requested from ptxas (__launch_bounds__), i.e. register caps
// of 64 (4 blocks), 80 (3), 128 (2), chosen per kernel so that nothing spills: as many warps as
// fit, each with its step's loads in flight, to cover the HBM latency. The strided (non-VEC)
// fallbacks get no cap.
template <typename T, int PPL, bool VEC>
constexpr int rope_min_blocks() {
  return VEC ? 4 : 1;
}
template <typename T, int PPL, bool VEC>
constexpr int fwd_min_blocks() {
  return VEC ? 3 : 1;
}
template <typename T, int PPL, bool VEC, bool PG>
constexpr int bwd_min_blocks() {
  return VEC ? 2 : 1;
}

// Geometry and work split shared by the kernels.
struct Work {
  Grid g;               // text_len, T, H, W, half_t, half_h
  int64_t L;            // tokens per (b, head)
  int64_t tok_begin;    // first token visited (text_len for the in-place rope, else 0)
  uint32_t items;       // (L - tok_begin) · nchunk (< 2^31)
  int heads, BH;        // heads, B·heads
  int D, half;          // head dim, D/2
  uint32_t nchunk;      // (b, head) chunks per token
  int rpi;              // rows per chunk
  const float* cos_t;   // tables[0]: (T+H+W, D/2)
  const float* sin_t;   // tables[1]
};

// Strides (elements) of a (B, heads, L, D) operand, and the step from row (b, h) to the next row
// of the same token: h (inc), or b − (heads−1)·h when h wraps to the next b (wrap).
struct Str4 {
  int64_t b, h, l, d;
  int64_t inc, wrap;
  COGVX_HD int64_t step(bool last_head) const { return last_head ? wrap : inc; }
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
// A channel pair (2p, 2p+1) as raw bits in one word of 2·sizeof(T) bytes (one vector load/store),
// with its fp32 values (lo = channel 2p) and the packing of two fp32 results.
template <typename T>
struct PairBits;

template <>
struct PairBits<c10::BFloat16> {
  using T = c10::BFloat16;
  using W = uint32_t;
  static __device__ __forceinline__ float lo(W w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(W w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ W pack(float a, float b) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);  // .x (low half) = a
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ W join(T a, T b) { return uint32_t(a.x) | (uint32_t(b.x) << 16); }
  static __device__ __forceinline__ T first(W w) { return T(static_cast<uint16_t>(w & 0xffffu), T::from_bits()); }
  static __device__ __forceinline__ T second(W w) { return T(static_cast<uint16_t>(w >> 16), T::from_bits()); }
};

template <>
struct PairBits<c10::Half> {
  using T = c10::Half;
  using W = uint32_t;
  static __device__ __forceinline__ float lo(W w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  static __device__ __forceinline__ float hi(W w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ W pack(float a, float b) {
    const __half2 v = __floats2half2_rn(a, b);  // .x (low half) = a
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ W join(T a, T b) { return uint32_t(a.x) | (uint32_t(b.x) << 16); }
  static __device__ __forceinline__ T first(W w) { return T(static_cast<uint16_t>(w & 0xffffu), T::from_bits()); }
  static __device__ __forceinline__ T second(W w) { return T(static_cast<uint16_t>(w >> 16), T::from_bits()); }
};

template <>
struct PairBits<float> {
  using T = float;
  using W = uint2;
  static __device__ __forceinline__ float lo(W w) { return __uint_as_float(w.x); }
  static __device__ __forceinline__ float hi(W w) { return __uint_as_float(w.y); }
  static __device__ __forceinline__ W pack(float a, float b) {
    return make_uint2(__float_as_uint(a), __float_as_uint(b));
  }
  static __device__ __forceinline__ W join(T a, T b) { return pack(a, b); }
  static __device__ __forceinline__ T first(W w) { return lo(w); }
  static __device__ __forceinline__ T second(W w) { return hi(w); }
};


// Hides a value's origin from the optimiser: what is computed from it afterwards is recomputed
// instead of being kept alive from before (fewer registers across the row reductions).
__device__ __forceinline__ void launder(uint32_t& v) { asm volatile("" : "+r"(v)); }
__device__ __forceinline__ void launder(uint2& v) { asm volatile("" : "+r"(v.x), "+r"(v.y)); }
__device__ __forceinline__ void launder(uint4& v) { asm volatile("" : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)); }

// Pair p of a row (channel stride cs): one 2·sizeof(T) access when VEC (cs == 1, pair aligned).
template <typename T, bool VEC>
__device__ __forceinline__ typename PairBits<T>::W load_word(const T* row, int64_t cs, int p) {
  using W = typename PairBits<T>::W;
  if constexpr (VEC) {
    return *reinterpret_cast<const W*>(row + 2 * p);
  } else {
    return PairBits<T>::join(row[static_cast<int64_t>(2 * p) * cs], row[static_cast<int64_t>(2 * p + 1) * cs]);
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_word(T* row, int64_t cs, int p, typename PairBits<T>::W v) {
  using W = typename PairBits<T>::W;
  if constexpr (VEC) {
    *reinterpret_cast<W*>(row + 2 * p) = v;
  } else {
    row[static_cast<int64_t>(2 * p) * cs] = PairBits<T>::first(v);
    row[static_cast<int64_t>(2 * p + 1) * cs] = PairBits<T>::second(v);
  }
}

// One work item: a token and the (b, head) rows [bh0, bh1) of it; (b0, h0) = (b, head) of row bh0.
struct Item {
  int64_t token;
  int bh0, bh1, b0, h0;
  bool video;
};

__device__ __forceinline__ Item make_item(const Work& w, uint32_t it) {
  Item r;
  const uint32_t q = it / w.nchunk;
  const int chunk = static_cast<int>(it - q * w.nchunk);
  r.token = w.tok_begin + q;
  r.bh0 = chunk * w.rpi;
  r.bh1 = min(w.BH, r.bh0 + w.rpi);
  r.b0 = r.bh0 / w.heads;
  r.h0 = r.bh0 - r.b0 * w.heads;
  r.video = r.token >= w.g.text_len;
  return r;
}

// Offset of the first row of an item in an operand with strides s.
__device__ __forceinline__ int64_t first_row(const Str4& s, const Item& item) {
  return static_cast<int64_t>(item.b0) * s.b + static_cast<int64_t>(item.h0) * s.h + item.token * s.l;
}

// Whether each of the next R rows is the last head of its b (h: head of the first; advanced by R).
template <int R>
__device__ __forceinline__ void group_wraps(int& h, int heads, bool (&wrap)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    wrap[r] = h == heads - 1;
    h = wrap[r] ? 0 : h + 1;
  }
}

// Pair k of a lane: lane + 32k. The VEC kernels run only when D is a multiple of 64, so every
// lane is live there (compile-time). Otherwise lanes past the last pair are clamped to it: they
// repeat its loads and arithmetic instead of branching, do not store (lane_live), are excluded
// from the row sums (lane_weight), and their parameter-gradient partials are never read.
template <bool VEC>
__device__ __forceinline__ int lane_pair(const Work& w, int lane, int k) {
  return VEC ? lane + 32 * k : min(lane + 32 * k, w.half - 1);
}
template <bool VEC>
__device__ __forceinline__ bool lane_live(const Work& w, int lane, int k) {
  return VEC || lane + 32 * k < w.half;
}
template <bool VEC>
__device__ __forceinline__ float lane_weight(const Work& w, int lane, int k) {
  return lane_live<VEC>(w, lane, k) ? 1.f : 0.f;
}

// cos/sin of the lane's pairs for a video token.
template <int PPL, bool VEC>
__device__ __forceinline__ void load_angles(const Work& w, const Item& item, int lane, float (&c)[PPL],
                                            float (&s)[PPL]) {
#pragma unroll
  for (int k = 0; k < PPL; ++k) {
    c[k] = 1.f;
    s[k] = 0.f;
  }
  if (!item.video) return;
  // video_coords(g, token) with the text offset taken out first: every quantity is then a
  // zero-extended 32-bit value (checked on the host), so the divisions compile to 32-bit ones.
  const auto u32 = [](int64_t v) { return static_cast<int64_t>(static_cast<uint32_t>(v)); };
  const Grid g{0, u32(w.g.T), u32(w.g.H), u32(w.g.W), w.g.half_t, w.g.half_h};
  int64_t t, h, wc;
  video_coords(g, u32(item.token - w.g.text_len), &t, &h, &wc);
#pragma unroll
  for (int k = 0; k < PPL; ++k) {
    const int p = lane_pair<VEC>(w, lane, k);
    const int64_t idx = table_row(g, p, t, h, wc) * w.half + p;
    c[k] = __ldg(w.cos_t + idx);
    s[k] = __ldg(w.sin_t + idx);
  }
}

__device__ __forceinline__ uint32_t global_warp() { return (blockIdx.x * kThreads + threadIdx.x) >> 5; }
__device__ __forceinline__ uint32_t warp_count() { return (gridDim.x * kThreads) >> 5; }

// Runs body(video, full, nrows) over the rows of an item in groups of R: `video` (the token is
// rotated) and `full` (all R rows exist) as compile-time constants, so that the common case has
// neither branches nor row predicates.
template <int R, typename F>
__device__ __forceinline__ void for_groups(const Item& item, F&& body) {
  auto run = [&](auto video) {
    int left = item.bh1 - item.bh0;
#pragma unroll 1
    for (; left >= R; left -= R) body(video, std::true_type{}, R);
    if (left > 0) body(video, std::false_type{}, left);
  };
  if (item.video) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------------
// rope3d / rope3d_: out[row] = R(±angle)·x[row] for video tokens, x[row] (bit-exact) for text.
// x and out may alias (in place): each element is read by the lane that writes it, before.
// ---------------------------------------------------------------------------------------------
template <typename T, int PPL, int R, bool VEC>
__global__ void __launch_bounds__(kThreads, rope_min_blocks<T, PPL, VEC>())
    rope3d_kernel(const Work w, const T* x, const Str4 xs, T* out, const Str4 os, const bool inverse) {
  using PB = PairBits<T>;
  using W = typename PB::W;
  const int lane = threadIdx.x & 31;
  const uint32_t nw = warp_count();
  for (uint32_t it = global_warp(); it < w.items; it += nw) {
    const Item item = make_item(w, it);
    float c[PPL], s[PPL];
    load_angles<PPL, VEC>(w, item, lane, c, s);
    const T* xr = x + first_row(xs, item);
    T* orow = out + first_row(os, item);
    int h = item.h0;
    for_groups<R>(item, [&](auto video, auto full, int nrows) {
      constexpr bool VIDEO = decltype(video)::value, FULL = decltype(full)::value;
      bool wrap[R];
      group_wraps<R>(h, w.heads, wrap);
      W v[R][PPL] = {};
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < PPL; ++k) {
          if (FULL || r < nrows) v[r][k] = load_word<T, VEC>(xr, xs.d, lane_pair<VEC>(w, lane, k));
        }
        xr += xs.step(wrap[r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < PPL; ++k) {
          if ((FULL || r < nrows) && lane_live<VEC>(w, lane, k)) {
            W o = v[r][k];
            if constexpr (VIDEO) {
              float a, b;
              rotate_pair(PB::lo(o), PB::hi(o), c[k], s[k], inverse, &a, &b);
              o = PB::pack(a, b);
            }
            store_word<T, VEC>(orow, os.d, lane_pair<VEC>(w, lane, k), o);
          }
        }
        orow += os.step(wrap[r]);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// qk_norm_rope3d forward
// ---------------------------------------------------------------------------------------------
// Per-channel fp32 affine parameter (x's dtype or fp32), `fill` when absent.
template <typename T>
__device__ __forceinline__ float param_at(const void* p, bool fp32, int64_t stride, int c, float fill) {
  if (p == nullptr) return fill;
  const int64_t i = static_cast<int64_t>(c) * stride;
  return fp32 ? __ldg(static_cast<const float*>(p) + i) : static_cast<float>(static_cast<const T*>(p)[i]);
}

struct Affine {
  const void* weight;
  const void* bias;
  int64_t w_stride, b_stride;
  bool w_fp32, b_fp32;
};

template <typename T, int PPL, bool VEC>
__device__ __forceinline__ void load_affine(const Affine& a, const Work& w, int lane, float (&wt)[PPL][2],
                                            float (&bs)[PPL][2]) {
#pragma unroll
  for (int k = 0; k < PPL; ++k) {
    const int p = lane_pair<VEC>(w, lane, k);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wt[k][j] = param_at<T>(a.weight, a.w_fp32, a.w_stride, 2 * p + j, 1.f);
      bs[k][j] = param_at<T>(a.bias, a.b_fp32, a.b_stride, 2 * p + j, 0.f);
    }
  }
}

template <typename T, int PPL, int R, bool VEC>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks<T, PPL, VEC>())
    qk_norm_rope3d_fwd_kernel(const Work w, const T* __restrict__ x, const Str4 xs, const Affine aff, const float eps,
                              T* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd) {
  using PB = PairBits<T>;
  using W = typename PB::W;
  const int lane = threadIdx.x & 31;
  const uint32_t nw = warp_count();
  const float inv_d = 1.f / static_cast<float>(w.D);
  float wt[PPL][2], bs[PPL][2], lw[PPL];
  load_affine<T, PPL, VEC>(aff, w, lane, wt, bs);
#pragma unroll
  for (int k = 0; k < PPL; ++k) lw[k] = lane_weight<VEC>(w, lane, k);
  for (uint32_t it = global_warp(); it < w.items; it += nw) {
    const Item item = make_item(w, it);
    float c[PPL], s[PPL];
    load_angles<PPL, VEC>(w, item, lane, c, s);
    const T* xr = x + first_row(xs, item);
    int64_t row = static_cast<int64_t>(item.bh0) * w.L + item.token;  // row of (B·heads, L), contiguous
    int h = item.h0;
    for_groups<R>(item, [&](auto video, auto full, int nrows) {
      constexpr bool VIDEO = decltype(video)::value, FULL = decltype(full)::value;
      bool wrap[R];
      group_wraps<R>(h, w.heads, wrap);
      W raw[R][PPL] = {};
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < PPL; ++k) {
          if (FULL || r < nrows) raw[r][k] = load_word<T, VEC>(xr, xs.d, lane_pair<VEC>(w, lane, k));
        }
        xr += xs.step(wrap[r]);
      }
      // fp32 values of pair k of row r (0 for missing rows), converted from the packed words at
      // each use; the words are laundered between the passes so that the fp32 values are not
      // kept alive across the reductions.
      auto val = [&](int r, int k, float& a, float& b) {
        const bool ok = FULL || r < nrows;
        a = ok ? PB::lo(raw[r][k]) : 0.f;
        b = ok ? PB::hi(raw[r][k]) : 0.f;
      };
      auto launder_all = [&] {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int k = 0; k < PPL; ++k) launder(raw[r][k]);
      };
      float mu[R], rs[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < PPL; ++k) {
          float a, b;
          val(r, k, a, b);
          sum += lw[k] * (a + b);
        }
        mu[r] = sum;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int r = 0; r < R; ++r) mu[r] += __shfl_xor_sync(0xffffffffu, mu[r], o);
      launder_all();
#pragma unroll
      for (int r = 0; r < R; ++r) {
        mu[r] *= inv_d;
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < PPL; ++k) {
          float a, b;
          val(r, k, a, b);
          const float d0 = a - mu[r], d1 = b - mu[r];
          sq += lw[k] * (d0 * d0 + d1 * d1);
        }
        rs[r] = sq;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int r = 0; r < R; ++r) rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], o);
      launder_all();
      // Lane r stores the mean/rstd of row r (R <= 32): two predicated stores per step.
      float my_mu = 0.f, my_rs = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        rs[r] = rsqrtf(rs[r] * inv_d + eps);
        my_mu = lane == r ? mu[r] : my_mu;
        my_rs = lane == r ? rs[r] : my_rs;
      }
      if (lane < (FULL ? R : nrows)) {
        mean[row + lane * w.L] = my_mu;
        rstd[row + lane * w.L] = my_rs;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (FULL || r < nrows) {
          T* orow = out + row * w.D;
#pragma unroll
          for (int k = 0; k < PPL; ++k) {
            float a, b;
            val(r, k, a, b);
            a = (a - mu[r]) * rs[r] * wt[k][0] + bs[k][0];
            b = (b - mu[r]) * rs[r] * wt[k][1] + bs[k][1];
            if constexpr (VIDEO) rotate_pair(a, b, c[k], s[k], false, &a, &b);
            if (lane_live<VEC>(w, lane, k)) store_word<T, true>(orow, 1, lane_pair<VEC>(w, lane, k), PB::pack(a, b));
          }
        }
        row += w.L;
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// qk_norm_rope3d backward
// ---------------------------------------------------------------------------------------------
struct Stats {
  const float* mean;
  const float* rstd;
  Str4 ms, rs;  // strides of mean / rstd (B, heads, L) in .b, .h, .l (.d unused)
};

// Backward rows per item are at most 32 (plan's max_rpi): lane j loads mean/rstd of row bh0 + j
// once per item, and each row takes them by shuffle.
constexpr int kBwdMaxRpi = 32;

template <typename T, int PPL, int R, bool VEC, bool PARAM_GRADS>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks<T, PPL, VEC, PARAM_GRADS>())
    qk_norm_rope3d_bwd_kernel(const Work w, const T* __restrict__ go, const Str4 gs, const T* __restrict__ x,
                              const Str4 xs, const Affine aff, const Stats st, T* __restrict__ gx,
                              float* __restrict__ ws) {
  using PB = PairBits<T>;
  using W = typename PB::W;
  const int lane = threadIdx.x & 31;
  const uint32_t nw = warp_count();
  const float inv_d = 1.f / static_cast<float>(w.D);
  float wt[PPL][2], unused[PPL][2], lw[PPL];
  load_affine<T, PPL, VEC>(Affine{aff.weight, nullptr, aff.w_stride, 0, aff.w_fp32, false}, w, lane, wt, unused);
#pragma unroll
  for (int k = 0; k < PPL; ++k) lw[k] = lane_weight<VEC>(w, lane, k);
  // Σ u·xhat ([0]) and Σ u ([1]) of this warp's rows, per channel; each lane owns the slots of its
  // pairs (no synchronisation until the block sum). Channel 2p+j, p = lane + 32k unclamped: the
  // duplicate lanes past the last pair land at channels >= D, which the block sum never reads.
  __shared__ float red[kWarps][2][PARAM_GRADS ? 64 * PPL : 1];
  const int warp = threadIdx.x >> 5;
  if constexpr (PARAM_GRADS) {
#pragma unroll
    for (int k = 0; k < PPL; ++k)
#pragma unroll
      for (int j = 0; j < 2; ++j) red[warp][0][2 * (lane + 32 * k) + j] = red[warp][1][2 * (lane + 32 * k) + j] = 0.f;
  }

  for (uint32_t it = global_warp(); it < w.items; it += nw) {
    const Item item = make_item(w, it);
    float c[PPL], s[PPL];
    load_angles<PPL, VEC>(w, item, lane, c, s);
    float mu_l = 0.f, rs_l = 0.f;  // stats of row bh0 + lane
    if (lane < item.bh1 - item.bh0) {
      const int hh = item.h0 + lane;
      const int bb = item.b0 + hh / w.heads, hr = hh - (hh / w.heads) * w.heads;
      mu_l = st.mean[static_cast<int64_t>(bb) * st.ms.b + static_cast<int64_t>(hr) * st.ms.h + item.token * st.ms.l];
      rs_l = st.rstd[static_cast<int64_t>(bb) * st.rs.b + static_cast<int64_t>(hr) * st.rs.h + item.token * st.rs.l];
    }
    const T* gr = go + first_row(gs, item);
    const T* xr = x + first_row(xs, item);
    T* grow = gx + (static_cast<int64_t>(item.bh0) * w.L + item.token) * w.D;
    int h = item.h0, j = 0;
    for_groups<R>(item, [&](auto video, auto full, int nrows) {
      constexpr bool VIDEO = decltype(video)::value, FULL = decltype(full)::value;
      bool wrap[R];
      group_wraps<R>(h, w.heads, wrap);
      W graw[R][PPL] = {}, xraw[R][PPL] = {};
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (FULL || r < nrows) {
#pragma unroll
          for (int k = 0; k < PPL; ++k) {
            graw[r][k] = load_word<T, VEC>(gr, gs.d, lane_pair<VEC>(w, lane, k));
            xraw[r][k] = load_word<T, VEC>(xr, xs.d, lane_pair<VEC>(w, lane, k));
          }
        }
        gr += gs.step(wrap[r]);
        xr += xs.step(wrap[r]);
      }
      float mu[R], rs[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        mu[r] = __shfl_sync(0xffffffffu, mu_l, (j + r) & 31);
        rs[r] = __shfl_sync(0xffffffffu, rs_l, (j + r) & 31);
      }
      // u = grad_out un-rotated, xh = xhat of pair k of row r (0 for missing rows); recomputed
      // from the packed inputs where needed rather than kept in registers.
      auto unpack = [&](int r, int k, float& u0, float& u1, float& x0, float& x1) {
        const bool ok = FULL || r < nrows;
        u0 = ok ? PB::lo(graw[r][k]) : 0.f;
        u1 = ok ? PB::hi(graw[r][k]) : 0.f;
        if constexpr (VIDEO) rotate_pair(u0, u1, c[k], s[k], true, &u0, &u1);
        x0 = ok ? (PB::lo(xraw[r][k]) - mu[r]) * rs[r] : 0.f;
        x1 = ok ? (PB::hi(xraw[r][k]) - mu[r]) * rs[r] : 0.f;
      };
      float s1[R], s2[R], acc_w[PPL][2], acc_b[PPL][2];  // acc: this group's Σ u·xhat, Σ u
#pragma unroll
      for (int k = 0; k < PPL; ++k) acc_w[k][0] = acc_w[k][1] = acc_b[k][0] = acc_b[k][1] = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s1[r] = s2[r] = 0.f;
#pragma unroll
        for (int k = 0; k < PPL; ++k) {
          float u0, u1, x0, x1;
          unpack(r, k, u0, u1, x0, x1);
          const float g0 = u0 * wt[k][0], g1 = u1 * wt[k][1];
          s1[r] += lw[k] * (g0 + g1);
          s2[r] += lw[k] * (g0 * x0 + g1 * x1);
          if constexpr (PARAM_GRADS) {
            acc_w[k][0] += u0 * x0;
            acc_w[k][1] += u1 * x1;
            acc_b[k][0] += u0;
            acc_b[k][1] += u1;
          }
        }
      }
      if constexpr (PARAM_GRADS) {
#pragma unroll
        for (int k = 0; k < PPL; ++k)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            red[warp][0][2 * (lane + 32 * k) + jj] += acc_w[k][jj];
            red[warp][1][2 * (lane + 32 * k) + jj] += acc_b[k][jj];
          }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          s1[r] += __shfl_xor_sync(0xffffffffu, s1[r], o);
          s2[r] += __shfl_xor_sync(0xffffffffu, s2[r], o);
        }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < PPL; ++k) {
          launder(graw[r][k]);
          launder(xraw[r][k]);
        }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (FULL || r < nrows) {
          const float mg = s1[r] * inv_d, mgx = s2[r] * inv_d;
#pragma unroll
          for (int k = 0; k < PPL; ++k) {
            float u0, u1, x0, x1;
            unpack(r, k, u0, u1, x0, x1);
            const float a = rs[r] * (u0 * wt[k][0] - mg - x0 * mgx);
            const float b = rs[r] * (u1 * wt[k][1] - mg - x1 * mgx);
            if (lane_live<VEC>(w, lane, k)) store_word<T, true>(grow, 1, lane_pair<VEC>(w, lane, k), PB::pack(a, b));
          }
        }
        grow += w.L * w.D;
      }
      j += R;
    });
  }

  if constexpr (PARAM_GRADS) {
    // Block partial: ws[block][0][c] = Σ u·xhat, ws[block][1][c] = Σ u, warps summed in order.
    __syncthreads();
    float* dst = ws + static_cast<int64_t>(blockIdx.x) * 2 * w.D;
    for (int i = threadIdx.x; i < 2 * w.D; i += kThreads) {
      const int which = i / w.D, ch = i - which * w.D;
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < kWarps; ++q) sum += red[q][which][ch];
      dst[i] = sum;
    }
  }
}

// out[j] = Σ_blocks ws[block][j] for j < 2·D, in a fixed order: a block of 8 warps handles 32
// columns; warp q sums blocks q, q+8, ... sequentially, then the 8 partials are added in warp order.
// grad_weight = out[0:D] (if requested), grad_bias = out[D:2D].
__global__ void __launch_bounds__(kThreads)
    param_grad_reduce_kernel(const float* __restrict__ ws, int64_t nblocks, int D, float* __restrict__ gw,
                             float* __restrict__ gb) {
  __shared__ float part[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = blockIdx.x * 32 + lane;
  const int cols = 2 * D;
  float sum = 0.f;
  if (col < cols) {
    for (int64_t blk = warp; blk < nblocks; blk += kWarps) sum += ws[blk * cols + col];
  }
  part[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int q = 0; q < kWarps; ++q) total += part[q][lane];
    if (col < D) {
      if (gw != nullptr) gw[col] = total;
    } else if (gb != nullptr) {
      gb[col - D] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
// Strides of a (B, heads, L[, D]) tensor and its row steps (see Str4).
inline Str4 strides_of(const at::Tensor& t) {
  const int64_t heads = t.size(1);
  Str4 s{t.stride(0), t.stride(1), t.stride(2), t.dim() > 3 ? t.stride(3) : 0, 0, 0};
  s.inc = s.h;
  s.wrap = s.b - (heads - 1) * s.h;
  return s;
}

// The pair (2p, 2p+1) of every row can be read as one aligned 2·sizeof(T) vector, and every lane
// holds live pairs (D a multiple of 64): the VEC kernels.
inline bool pair_vec_ok(const at::Tensor& t) {
  if (t.stride(3) != 1 || t.size(3) % 64 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (t.size(i) > 1 && t.stride(i) % 2 != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (2 * t.element_size()) == 0;
}

// Validates the common arguments and fills the geometry of `w` (not the split).
inline Work make_work(const char* op, const at::Tensor& x, const at::Tensor& tables_c, int64_t text_len,
                      int64_t grid_t, int64_t grid_h, int64_t grid_w, at::IntArrayRef axes_dim) {
  // the arguments themselves were checked by checks::rope (csrc/common/checks.h): CUDA limits here
  const int64_t B = x.size(0), heads = x.size(1), L = x.size(2), D = x.size(3);
  TORCH_CHECK(D > 0 && D <= kMaxD, op, ": head dim D must be in [2, ", kMaxD, "]; got ", D);
  TORCH_CHECK(B * heads * L < INT32_MAX && grid_t < INT32_MAX && grid_h < INT32_MAX && grid_w < INT32_MAX, op,
              ": B*heads*L and the grid sizes must be < 2^31");
  Work w{};
  w.g = Grid{text_len, grid_t, grid_h, grid_w, axes_dim[0] / 2, axes_dim[1] / 2};
  w.L = L;
  w.heads = static_cast<int>(heads);
  w.BH = static_cast<int>(B * heads);
  w.D = static_cast<int>(D);
  w.half = static_cast<int>(D / 2);
  w.cos_t = tables_c.data_ptr<float>();
  w.sin_t = w.cos_t + tables_c.size(1) * w.half;
  return w;
}

// Splits the rows of tokens [tok_begin, L) into items for `kernel` (R rows per step) and returns the
// grid size (0: nothing to do). >= 16 items per resident warp when there are enough rows.
template <typename K>
int plan(K kernel, Work& w, int64_t tok_begin, int R, int64_t max_rpi = INT32_MAX) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t max_blocks = sms * std::max(per_sm, 1);
  const int64_t ntok = w.L - tok_begin;
  w.tok_begin = tok_begin;
  if (ntok <= 0 || w.BH == 0) {
    w.items = 0;
    return 0;
  }
  const int64_t want_items = 16 * max_blocks * kWarps;
  int64_t nchunk = std::min<int64_t>(std::max<int64_t>(ceil_div(want_items, ntok), 1), ceil_div(w.BH, R));
  int64_t rpi = std::min(ceil_div(ceil_div(w.BH, nchunk), R) * R, max_rpi / R * R);
  nchunk = ceil_div(w.BH, rpi);
  w.nchunk = static_cast<uint32_t>(nchunk);
  w.rpi = static_cast<int>(rpi);
  w.items = static_cast<uint32_t>(ntok * nchunk);  // <= B·heads·L < 2^31
  return static_cast<int>(std::min<int64_t>(ceil_div(w.items, kWarps), max_blocks));
}

// Calls f(std::integral_constant<int, PPL>) for the pairs per lane of head dim D (<= 256).
template <typename F>
void dispatch_ppl(int D, F&& f) {
  if (D <= 64) {
    f(std::integral_constant<int, 1>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 4>{});
  }
}

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

void rope3d_launch(const char* op, const at::Tensor& x, const at::Tensor& tables, int64_t text_len,
                   int64_t grid_t, int64_t grid_h, int64_t grid_w, at::IntArrayRef axes_dim, bool inverse,
                   const at::Tensor& out, bool in_place) {
  const at::Tensor tables_c = tables.contiguous();
  Work w = make_work(op, x, tables_c, text_len, grid_t, grid_h, grid_w, axes_dim);
  if (x.numel() == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vec = pair_vec_ok(x) && pair_vec_ok(out);
  const Str4 xs = strides_of(x), os = strides_of(out);
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "rope3d_cuda", [&] {
    dispatch_ppl(w.D, [&](auto ppl) {
      constexpr int PPL = decltype(ppl)::value;
      constexpr int R = rows_per_step<scalar_t, PPL>();
      dispatch_bool(vec, [&](auto vc) {
        constexpr bool VEC = decltype(vc)::value;
        auto kernel = rope3d_kernel<scalar_t, PPL, R, VEC>;
        // In place, text tokens are left as they are: start at the first video token.
        const int grid = plan(kernel, w, in_place ? std::min(text_len, w.L) : 0, R);
        if (grid == 0) return;
        kernel<<<grid, kThreads, 0, stream>>>(w, x.const_data_ptr<scalar_t>(), xs, out.data_ptr<scalar_t>(), os,
                                              inverse);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor rope3d_cuda(const at::Tensor& x, const at::Tensor& tables, int64_t text_len, int64_t grid_t,
                       int64_t grid_h, int64_t grid_w, at::IntArrayRef axes_dim, bool inverse) {
  checks::rope::args("cogvx::rope3d", x, tables, text_len, grid_t, grid_h, grid_w, axes_dim);
  checks::cuda_tensor("cogvx::rope3d", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  rope3d_launch("rope3d_cuda", x, tables, text_len, grid_t, grid_h, grid_w, axes_dim, inverse, out, false);
  return out;
}

void rope3d_inplace_cuda(const at::Tensor& x, const at::Tensor& tables, int64_t text_len, int64_t grid_t,
                         int64_t grid_h, int64_t grid_w, at::IntArrayRef axes_dim, bool inverse) {
  checks::rope::inplace_args("cogvx::rope3d_", x, tables, text_len, grid_t, grid_h, grid_w, axes_dim);
  checks::cuda_tensor("cogvx::rope3d_", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  rope3d_launch("rope3d__cuda", x, tables, text_len, grid_t, grid_h, grid_w, axes_dim, inverse, x, true);
}

// weight/bias (D,) of x's dtype or fp32 (checked by checks::rope), read in place through their stride.
Affine make_affine(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  Affine a{nullptr, nullptr, 0, 0, false, false};
  auto one = [&](const std::optional<at::Tensor>& t, const void** ptr, int64_t* stride, bool* fp32) {
    if (!checks::given(t)) return;
    *ptr = t->const_data_ptr();
    *stride = t->stride(0);
    *fp32 = t->scalar_type() == at::kFloat;
  };
  one(weight, &a.weight, &a.w_stride, &a.w_fp32);
  one(bias, &a.bias, &a.b_stride, &a.b_fp32);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& tables, int64_t text_len, int64_t grid_t, int64_t grid_h, int64_t grid_w,
    at::IntArrayRef axes_dim, double eps) {
  const char* op = "qk_norm_rope3d_cuda";
  checks::rope::norm_args("cogvx::qk_norm_rope3d", x, weight, bias, tables, text_len, grid_t, grid_h, grid_w, axes_dim);
  checks::cuda_tensor("cogvx::qk_norm_rope3d", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor tables_c = tables.contiguous();
  Work w = make_work(op, x, tables_c, text_len, grid_t, grid_h, grid_w, axes_dim);
  const Affine aff = make_affine(weight, bias);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mean = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {out, mean, rstd};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vec = pair_vec_ok(x);
  const Str4 xs = strides_of(x);
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "qk_norm_rope3d_cuda", [&] {
    dispatch_ppl(w.D, [&](auto ppl) {
      constexpr int PPL = decltype(ppl)::value;
      constexpr int R = rows_per_step<scalar_t, PPL>();
      dispatch_bool(vec, [&](auto vc) {
        constexpr bool VEC = decltype(vc)::value;
        auto kernel = qk_norm_rope3d_fwd_kernel<scalar_t, PPL, R, VEC>;
        const int grid = plan(kernel, w, 0, R);
        if (grid == 0) return;
        kernel<<<grid, kThreads, 0, stream>>>(w, x.const_data_ptr<scalar_t>(), xs, aff, static_cast<float>(eps),
                                              out.data_ptr<scalar_t>(), mean.data_ptr<float>(),
                                              rstd.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& tables, int64_t text_len, int64_t grid_t,
    int64_t grid_h, int64_t grid_w, at::IntArrayRef axes_dim, bool has_weight, bool has_bias) {
  const char* op = "qk_norm_rope3d_backward_cuda";
  checks::rope::norm_backward_args("cogvx::qk_norm_rope3d_backward", grad_out, x, weight, mean, rstd, tables, text_len,
                                   grid_t, grid_h, grid_w, axes_dim, has_weight);
  checks::cuda_tensor("cogvx::qk_norm_rope3d_backward", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor tables_c = tables.contiguous();
  Work w = make_work(op, x, tables_c, text_len, grid_t, grid_h, grid_w, axes_dim);
  const Affine aff = make_affine(weight, std::nullopt);
  const int64_t D = x.size(3);
  auto fp32 = x.options().dtype(at::kFloat);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gw = at::empty({has_weight ? D : 0}, fp32);
  at::Tensor gb = at::empty({has_bias ? D : 0}, fp32);
  const bool param_grads = has_weight || has_bias;
  if (x.numel() == 0) {
    gw.zero_();
    gb.zero_();
    return {gx, gw, gb};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vec = pair_vec_ok(x) && pair_vec_ok(grad_out);
  const Str4 gs = strides_of(grad_out), xs = strides_of(x);
  const Stats st{mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), strides_of(mean), strides_of(rstd)};
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "qk_norm_rope3d_backward_cuda", [&] {
    dispatch_ppl(w.D, [&](auto ppl) {
      constexpr int PPL = decltype(ppl)::value;
      constexpr int R = rows_per_step<scalar_t, PPL>();
      dispatch_bool(vec, [&](auto vc) {
        constexpr bool VEC = decltype(vc)::value;
        dispatch_bool(param_grads, [&](auto pg) {
          constexpr bool PG = decltype(pg)::value;
          auto kernel = qk_norm_rope3d_bwd_kernel<scalar_t, PPL, R, VEC, PG>;
          const int grid = plan(kernel, w, 0, R, kBwdMaxRpi);
          if (grid == 0) return;  // (not reached: numel > 0)
          at::Tensor ws;
          if constexpr (PG) ws = at::empty({grid, 2 * D}, fp32);
          kernel<<<grid, kThreads, 0, stream>>>(w, grad_out.const_data_ptr<scalar_t>(), gs,
                                                x.const_data_ptr<scalar_t>(), xs, aff, st, gx.data_ptr<scalar_t>(),
                                                PG ? ws.data_ptr<float>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if constexpr (PG) {
            param_grad_reduce_kernel<<<static_cast<int>(ceil_div(2 * D, 32)), kThreads, 0, stream>>>(
                ws.const_data_ptr<float>(), grid, static_cast<int>(D), has_weight ? gw.data_ptr<float>() : nullptr,
                has_bias ? gb.data_ptr<float>() : nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
      });
    });
  });
  return {gx, gw, gb};
}

}  // namespace gpu
}  // namespace rope3d
}  // namespace cogvx

TORCH_LIBRARY_IMPL(cogvx, CUDA, m) {
  m.impl("rope3d", &cogvx::rope3d::gpu::rope3d_cuda);
  m.impl("rope3d_", &cogvx::rope3d::gpu::rope3d_inplace_cuda);
  m.impl("qk_norm_rope3d", &cogvx::rope3d::gpu::qk_norm_rope3d_cuda);
  m.impl("qk_norm_rope3d_backward", &cogvx::rope3d::gpu::qk_norm_rope3d_backward_cuda);
}

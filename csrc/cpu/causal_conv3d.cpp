// C++ CPU kernel of the temporally causal 3D convolution.
//
// Method: implicit GEMM over tiles of a few output rows, no im2col of the activation. A task owns
// a tile of R output rows (× up to 256 columns) of one frame and, for each temporal tap dt, packs the
// input window the tile reads, the "band" of R + kh - 1 rows × (cols + kw - 1) columns per channel,
// straight from x or the halo through their strides (any layout, no copy of the activation), zeros
// on the spatial padding. Laid out with the tile's pixels at band_w-strided rows, every spatial tap
// (dh, dw) is the same band shifted by dh·band_w + dw, so y_tile += W_tap (C_out × C_in) · band_shifted
// needs one packing for all kh·kw taps (the kw - 1 columns between rows are computed and dropped).
// The band is O(C_in · 6 · 92) floats per thread at 60×90, not a copy of x. The GEMM is oneDNN's
// fp32 batch-reduce micro-kernel exported by ATen (at::native::cpublas::brgemm); bf16/fp16 values
// are widened to fp32 while packing, so accumulation is always fp32. Tasks are spread with
// at::parallel_for; the halo/first-frame and border index math lives in csrc/common/causal_conv3d.h,
// shared with the CUDA file. Why not at::conv3d on views: the halo and the first kt-1 output
// frames would still need a concatenated copy, and oneDNN would re-layout the activation anyway.
// The backward still packs one copy per tap (pack_tap).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "common/causal_conv3d.h"

namespace cogvx {
namespace {

namespace cc = causal_conv3d;

// C (M×N, row-major, ld_c, fp32) += A (M×K, ld_a) · B (K×N, ld_b), all fp32: a plain loop for tiny
// products (oneDNN JIT-compiles a micro-kernel per new shape, which costs more than the work there).
void gemm_acc_loop(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B, int64_t ld_b,
                   float* C, int64_t ld_c) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * ld_a + k];
      for (int64_t n = 0; n < N; ++n) C[m * ld_c + n] += a * B[k * ld_b + n];
    }
}

// The same with oneDNN's batch-reduce GEMM micro-kernel (exported by ATen) where torch has it. The
// micro-kernel does no cache blocking of its own, so blocks of M and K stay cache-sized here
// (measured on AVX2: K 1152 in one call runs at about half the speed of K 256 blocks).
void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B,
              int64_t ld_b, float* C, int64_t ld_c) {
  if (M <= 0 || N <= 0 || K <= 0) return;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (M * N * K >= (1 << 18)) {
    constexpr int64_t kBlockM = 128, kBlockK = 256;
    for (int64_t m0 = 0; m0 < M; m0 += kBlockM)
      for (int64_t k0 = 0; k0 < K; k0 += kBlockK)
        at::native::cpublas::brgemm(std::min(kBlockM, M - m0), N, std::min(kBlockK, K - k0), ld_a, ld_b, ld_c,
                                    /*add_C=*/true, A + m0 * ld_a + k0, B + k0 * ld_b, C + m0 * ld_c,
                                    /*is_vnni=*/false);
    return;
  }
#endif
  gemm_acc_loop(M, N, K, A, ld_a, B, ld_b, C, ld_c);
}

void gemm_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(false);
#endif
}

// AT_DISPATCH_FLOATING_TYPES_AND2 without double (brgemm has no fp64 kernel).
// Strided 5-D frames (B, C, T, H, W).
template <typename scalar_t>
struct Frames {
  const scalar_t* data;
  int64_t sb, sc, st, sh, sw;
  const scalar_t* row(int64_t b, int64_t t, int64_t h) const { return data + b * sb + t * st + h * sh; }
};

template <typename scalar_t>
Frames<scalar_t> frames_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// Pixels (of one frame, flattened row-major) handled by one task: 256 makes a wide GEMM whose N is
// a multiple of 16 (the micro-kernel's sweet spot); fewer when that would leave threads idle.
int64_t pixels_per_task(int64_t pixels, int64_t outer_tasks) {
  int64_t n = 256;
  const int64_t threads = at::get_num_threads();
  while (n > 32 && outer_tasks * ((pixels + n - 1) / n) < 4 * threads) n /= 2;
  return std::min(n, pixels);
}

// Packs, for one source frame and one kernel tap (dh, dw), what pixels [p0, p0 + n) of a frame of
// `width` columns read through that tap, as the GEMM's B operand P (C × n, fp32):
//   P[c][p - p0] = frame[c, row_of(row(p), dh), col(column(p), dw)]
// and zero where the tap falls on the padding (row_of returns -1; range(dw) gives the columns
// [lo, hi) whose tap dw lands inside the frame). This is the GEMM's own operand packing of a
// 256-pixel panel (it stays in L2 next to its GEMM), not an im2col of the activation.
template <typename scalar_t, typename RowOf, typename Range, typename Col>
void pack_tap(const Frames<scalar_t>& f, int64_t b, int64_t frame, int64_t C, int64_t dh, int64_t dw,
              int64_t p0, int64_t n, int64_t width, RowOf row_of, Range range, Col col, float* P) {
  int64_t lo, hi;
  range(dw, &lo, &hi);
  for (int64_t c = 0; c < C; ++c) {
    float* dst = P + c * n - p0;  // dst[p] for p in [p0, p0 + n)
    for (int64_t p = p0; p < p0 + n;) {
      const int64_t row = p / width, first = p % width;
      const int64_t last = std::min(width, first + (p0 + n - p));  // columns [first, last) of this row
      const int64_t src_row = row_of(row, dh);
      float* d = dst + row * width;  // d[column]
      const int64_t l = src_row < 0 ? last : std::min(std::max(lo, first), last);
      const int64_t h = src_row < 0 ? last : std::max(std::min(hi, last), l);
      std::fill(d + first, d + l, 0.f);
      if (h > l) {
        const scalar_t* src = f.row(b, frame, src_row) + c * f.sc;
        if (f.sw == 1) {
          const scalar_t* s0 = src + col(l, dw) - l;
          for (int64_t o = l; o < h; ++o) d[o] = static_cast<float>(s0[o]);
        } else {
          for (int64_t o = l; o < h; ++o) d[o] = static_cast<float>(src[col(o, dw) * f.sw]);
        }
      }
      std::fill(d + h, d + last, 0.f);
      p += last - first;
    }
  }
}

// pack_tap in the forward direction: output pixels [p0, p0 + n) of a (·, Wo) output frame read
// input frame `frame` (H × W) through tap (dh, dw) (forward and weight gradient).
template <typename scalar_t>
void pack_input_tap(const Frames<scalar_t>& f, int64_t b, int64_t frame, int64_t C, int64_t dh, int64_t dw,
                    int64_t pad_h, int64_t pad_w, int64_t H, int64_t W, int64_t p0, int64_t n, int64_t Wo,
                    float* P) {
  pack_tap(f, b, frame, C, dh, dw, p0, n, Wo,
            [&](int64_t oh, int64_t dh) {
              const int64_t ih = cc::input_coord(oh, dh, pad_h);
              return cc::in_bounds(ih, H) ? ih : int64_t(-1);
            },
            [&](int64_t dw, int64_t* lo, int64_t* hi) { cc::valid_output_range(dw, pad_w, W, Wo, lo, hi); },
            [&](int64_t ow, int64_t dw) { return cc::input_coord(ow, dw, pad_w); }, P);
}

// Writes pixels [p0, p0 + n) of frame `frame` of dst (any strides) from the fp32 tile (C × n).
template <typename scalar_t>
void store_pixels(const std::vector<float>& tile, int64_t C, int64_t p0, int64_t n, at::Tensor& dst,
                  int64_t b, int64_t frame) {
  const int64_t width = dst.size(4);
  scalar_t* base = dst.data_ptr<scalar_t>() + b * dst.stride(0) + frame * dst.stride(2);
  for (int64_t c = 0; c < C; ++c) {
    const float* s = tile.data() + c * n - p0;
    scalar_t* d = base + c * dst.stride(1);
    for (int64_t p = p0; p < p0 + n; ++p)
      d[(p / width) * dst.stride(3) + (p % width) * dst.stride(4)] = static_cast<scalar_t>(s[p]);
  }
}

// The forward's unit of work: output rows [oh0, oh0 + rows) × columns [ow0, ow0 + cols) of one
// frame. The input window it reads through all kh×kw taps, the "band" (rows + kh - 1) × (cols + kw
// - 1) per channel, is packed once per temporal tap; output pixel (r, s) of the tile is GEMM column
// r·band_w + s, so tap (dh, dw) reads band column (r + dh)·band_w + (s + dw): each spatial tap's B
// operand is the same band shifted by dh·band_w + dw. Packing shrinks from kh·kw copies of the tile
// to one band; the kw - 1 columns between rows are computed and dropped (2/(cols+2) extra at kw 3).
struct ForwardTiling {
  int64_t rows, cols, row_tiles, col_tiles;
};

ForwardTiling forward_tiling(int64_t Ho, int64_t Wo, int64_t kw, int64_t frames) {
  // About 384 GEMM columns per tile: measured best at 64–128 channels (192 and 768 both slower), and
  // band plus accumulator stay in L2. Frames wider than 256 columns are split into column tiles.
  constexpr int64_t kTargetPixels = 384, kMaxCols = 256;
  const int64_t col_tiles = (Wo + kMaxCols - 1) / kMaxCols, cols = (Wo + col_tiles - 1) / col_tiles;
  const int64_t max_rows = std::clamp<int64_t>(kTargetPixels / (cols + kw - 1), 1, Ho);
  // Fewest rows per thread on the critical path (at::parallel_for hands each thread a contiguous
  // range of ⌈tasks / threads⌉ tasks), plus a quarter row of per-task overhead; ties → taller tiles.
  const int64_t threads = at::get_num_threads();
  int64_t best_rows = 1;
  double best_cost = 1e300;
  for (int64_t rows = 1; rows <= max_rows; ++rows) {
    const int64_t tasks = frames * col_tiles * ((Ho + rows - 1) / rows);
    const double cost = double((tasks + threads - 1) / threads) * (double(rows) + 0.25);
    if (cost <= best_cost) best_cost = cost, best_rows = rows;
  }
  return {best_rows, cols, (Ho + best_rows - 1) / best_rows, col_tiles};
}

// Packs the band of a tile (see ForwardTiling) from input frame `frame`: band[c][r][s] =
// frame[c, ih0 + r, iw0 + s] for r < band_rows, s < band_w, zero outside the frame; fp32.
template <typename scalar_t>
void pack_band(const Frames<scalar_t>& f, int64_t b, int64_t frame, int64_t C, int64_t ih0, int64_t iw0,
               int64_t band_rows, int64_t band_w, int64_t band_plane, int64_t H, int64_t W, float* band) {
  // The rows are short and a channel apart, too far for the hardware prefetcher: fetch the rows of
  // the channel 4 ahead while copying (measured 3-6% of the whole forward at 128ch@60×90).
  constexpr int64_t kPrefetchChannels = 4;
  const int64_t lo = std::clamp<int64_t>(-iw0, 0, band_w), hi = std::clamp<int64_t>(W - iw0, lo, band_w);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < band_rows; ++r) {
      float* d = band + c * band_plane + r * band_w;
      const int64_t ih = ih0 + r;
      if (!cc::in_bounds(ih, H)) {
        std::fill(d, d + band_w, 0.f);
        continue;
      }
      std::fill(d, d + lo, 0.f);
      const scalar_t* src = f.row(b, frame, ih) + c * f.sc + iw0 * f.sw;
      if (f.sw == 1) {
        if (c + kPrefetchChannels < C)
          for (int64_t s = lo; s < hi; s += 64 / sizeof(scalar_t)) __builtin_prefetch(src + kPrefetchChannels * f.sc + s);
        for (int64_t s = lo; s < hi; ++s) d[s] = static_cast<float>(src[s]);
      } else {
        for (int64_t s = lo; s < hi; ++s) d[s] = static_cast<float>(src[s * f.sw]);
      }
      std::fill(d + hi, d + band_w, 0.f);
    }
}

// y[b, :, t, tile] = bias + Σ_dt Σ_(dh,dw) W_tap (C_out × C_in) · band_dt shifted by (dh, dw).
template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor* bias,
                    const at::Tensor* halo, int64_t kt, int64_t kh, int64_t kw, int64_t pad_h,
                    int64_t pad_w, at::Tensor& y) {
  const int64_t B = x.size(0), Cin = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Cout = y.size(1), Ho = y.size(3), Wo = y.size(4);
  const auto xs = frames_of<scalar_t>(x);
  const auto hs = halo ? frames_of<scalar_t>(*halo) : xs;
  const auto ys = frames_of<scalar_t>(y);
  const float* wp = w_packed.data_ptr<float>();  // (kt, kh, kw, Cout, Cin): one contiguous matrix per tap
  const bool has_halo = halo != nullptr;
  std::vector<float> bias_f(Cout, 0.f);
  if (bias) {
    auto bf = bias->to(at::kFloat).contiguous();
    std::copy(bf.data_ptr<float>(), bf.data_ptr<float>() + Cout, bias_f.begin());
  }
  const ForwardTiling tiling = forward_tiling(Ho, Wo, kw, B * T);
  const int64_t band_w = tiling.cols + kw - 1, band_plane = (tiling.rows + kh - 1) * band_w;
  const int64_t ld_out = (tiling.rows - 1) * band_w + tiling.cols;  // GEMM columns of a full tile
  const int64_t tiles = tiling.row_tiles * tiling.col_tiles;

  at::parallel_for(0, B * T * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out(Cout * ld_out), band(Cin * band_plane);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % tiles, t = (task / tiles) % T, b = task / (tiles * T);
      const int64_t oh0 = (tile / tiling.col_tiles) * tiling.rows, ow0 = (tile % tiling.col_tiles) * tiling.cols;
      const int64_t rows = std::min(tiling.rows, Ho - oh0), cols = std::min(tiling.cols, Wo - ow0);
      const int64_t N = (rows - 1) * band_w + cols;
      for (int64_t co = 0; co < Cout; ++co) std::fill(&out[co * ld_out], &out[co * ld_out] + N, bias_f[co]);
      for (int64_t dt = 0; dt < kt; ++dt) {
        const cc::FrameSource src = cc::padded_frame_source(t + dt, kt, has_halo);
        pack_band(src.from_halo ? hs : xs, b, src.index, Cin, cc::input_coord(oh0, 0, pad_h),
                  cc::input_coord(ow0, 0, pad_w), rows + kh - 1, band_w, band_plane, H, W, band.data());
        for (int64_t tap = 0; tap < kh * kw; ++tap)
          gemm_acc(Cout, N, Cin, wp + (dt * kh * kw + tap) * Cout * Cin, Cin,
                   band.data() + (tap / kw) * band_w + tap % kw, band_plane, out.data(), ld_out);
      }
      for (int64_t co = 0; co < Cout; ++co)
        for (int64_t r = 0; r < rows; ++r) {
          const float* s = &out[co * ld_out + r * band_w];
          scalar_t* d = const_cast<scalar_t*>(ys.row(b, t, oh0 + r)) + co * ys.sc + ow0 * ys.sw;
          if (ys.sw == 1) {
            for (int64_t o = 0; o < cols; ++o) d[o] = static_cast<scalar_t>(s[o]);
          } else {
            for (int64_t o = 0; o < cols; ++o) d[o * ys.sw] = static_cast<scalar_t>(s[o]);
          }
        }
    }
    gemm_release();
  });
}

// Gradient of the time-padded input folded onto the stored frames: a task owns pixels of one stored
// frame (halo or x) and sums over every padded frame that reads it, so each element is written once.
// grad[b, :, s, pixels] = Σ_j Σ_dt Σ_tap W_tapᵀ (C_in × C_out) · P_tap, P_tap packed from grad_out frame j-dt.
template <typename scalar_t>
void grad_input_kernel(const at::Tensor& gy, const at::Tensor& w_packed_t, bool has_halo, int64_t kt,
                       int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w, at::Tensor& gx,
                       at::Tensor* ghalo) {
  const int64_t B = gx.size(0), Cin = gx.size(1), T = gx.size(2), H = gx.size(3), W = gx.size(4);
  const int64_t Cout = gy.size(1), Ho = gy.size(3), Wo = gy.size(4);
  const int64_t lead = has_halo ? kt - 1 : 0;  // halo frames that get their own gradient
  const auto gs = frames_of<scalar_t>(gy);
  const float* wp = w_packed_t.data_ptr<float>();  // (kt, kh, kw, Cin, Cout)
  const int64_t NB = pixels_per_task(H * W, B * (lead + T));
  const int64_t blocks = (H * W + NB - 1) / NB;

  at::parallel_for(0, B * (lead + T) * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out(Cin * NB), P(Cout * NB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p0 = (task % blocks) * NB, s = (task / blocks) % (lead + T), b = task / (blocks * (lead + T));
      const int64_t N = std::min(NB, H * W - p0);
      const bool is_halo = s < lead;
      const int64_t index = is_halo ? s : s - lead;
      int64_t j_lo, j_hi;
      cc::padded_frames_of_source(is_halo, index, kt, has_halo, &j_lo, &j_hi);
      std::fill(out.begin(), out.begin() + Cin * N, 0.f);
      for (int64_t j = j_lo; j < j_hi; ++j)
        for (int64_t dt = 0; dt < kt; ++dt) {
          const int64_t t = j - dt;
          if (!cc::in_bounds(t, T)) continue;
          for (int64_t tap = 0; tap < kh * kw; ++tap) {
            pack_tap(gs, b, t, Cout, tap / kw, tap % kw, p0, N, W,
                     [&](int64_t ih, int64_t dh) {
                       const int64_t oh = cc::output_coord(ih, dh, pad_h);
                       return cc::in_bounds(oh, Ho) ? oh : int64_t(-1);
                     },
                     [&](int64_t dw, int64_t* lo, int64_t* hi) { cc::valid_input_range(dw, pad_w, W, Wo, lo, hi); },
                     [&](int64_t iw, int64_t dw) { return cc::output_coord(iw, dw, pad_w); }, P.data());
            gemm_acc(Cin, N, Cout, wp + (dt * kh * kw + tap) * Cin * Cout, Cout, P.data(), N, out.data(), N);
          }
        }
      store_pixels<scalar_t>(out, Cin, p0, N, is_halo ? *ghalo : gx, b, index);
    }
    gemm_release();
  });
}

// Gradient of the weight: dW_tap (C_out × C_in) = Σ_pixels grad_out (C_out × N) · P_tapᵀ (N × C_in).
// Tasks split dt × blocks of C_out (deterministic: each task owns its slice of dW).
template <typename scalar_t>
void grad_weight_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor* halo, int64_t kt,
                        int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w, at::Tensor& gw_packed) {
  const int64_t B = x.size(0), Cin = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Cout = gy.size(1), Ho = gy.size(3), Wo = gy.size(4);
  const auto xs = frames_of<scalar_t>(x);
  const auto hs = halo ? frames_of<scalar_t>(*halo) : xs;
  const auto gs = frames_of<scalar_t>(gy);
  float* gwp = gw_packed.data_ptr<float>();  // (kt, kh, kw, Cout, Cin)
  const int64_t co_block = std::min<int64_t>(Cout, 64);
  const int64_t co_blocks = (Cout + co_block - 1) / co_block;
  const int64_t NB = std::min<int64_t>(Ho * Wo, 256);

  at::parallel_for(0, kt * co_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(Cin * NB), PT(NB * Cin), G(co_block * NB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t dt = task / co_blocks, co0 = (task % co_blocks) * co_block;
      const int64_t M = std::min(co_block, Cout - co0);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const cc::FrameSource src = cc::padded_frame_source(t + dt, kt, halo != nullptr);
          for (int64_t p0 = 0; p0 < Ho * Wo; p0 += NB) {
            const int64_t N = std::min(NB, Ho * Wo - p0);
            for (int64_t co = 0; co < M; ++co) {
              const scalar_t* g = gs.row(b, t, 0) + (co0 + co) * gs.sc;
              for (int64_t p = p0; p < p0 + N; ++p)
                G[co * N + p - p0] = static_cast<float>(g[(p / Wo) * gs.sh + (p % Wo) * gs.sw]);
            }
            for (int64_t tap = 0; tap < kh * kw; ++tap) {
              pack_input_tap(src.from_halo ? hs : xs, b, src.index, Cin, tap / kw, tap % kw, pad_h, pad_w, H, W,
                             p0, N, Wo, P.data());
              for (int64_t c = 0; c < Cin; ++c)  // Pᵀ: the micro-kernel takes row-major operands only
                for (int64_t n = 0; n < N; ++n) PT[n * Cin + c] = P[c * N + n];
              gemm_acc(M, Cin, N, G.data(), N, PT.data(), Cin, gwp + ((dt * kh * kw + tap) * Cout + co0) * Cin, Cin);
            }
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
  const at::Tensor& x = x_in;  // read through its strides: no copy for any layout
  std::optional<at::Tensor> halo;
  if (halo_in && kt > 1) halo = *halo_in;
  const int64_t Ho = cc::output_extent(x.size(3), kh, pad_h), Wo = cc::output_extent(x.size(4), kw, pad_w);
  at::Tensor y = at::empty({x.size(0), weight.size(0), x.size(2), Ho, Wo}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor w_packed = weight.permute({2, 3, 4, 0, 1}).to(at::kFloat).contiguous();
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_cpu", [&] {
    forward_kernel<scalar_t>(x, w_packed, bias ? &*bias : nullptr, halo ? &*halo : nullptr, kt, kh, kw,
                             pad_h, pad_w, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv3d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& halo_in, int64_t pad_h, int64_t pad_w, bool has_bias) {
  check_inputs(x_in, weight, halo_in);
  const int64_t kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  const at::Tensor& x = x_in;
  const at::Tensor& gy = grad_out;
  const bool has_halo = halo_in.has_value() && kt > 1;
  std::optional<at::Tensor> halo;
  if (has_halo) halo = *halo_in;

  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor ghalo = halo_in ? at::zeros(halo_in->sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw_packed = at::zeros({kt, kh, kw, weight.size(0), weight.size(1)}, weight.options().dtype(at::kFloat));
  at::Tensor gb = has_bias ? gy.sum({0, 2, 3, 4}, false, at::kFloat).to(weight.scalar_type())
                           : at::empty({0}, weight.options());
  if (gy.numel() == 0 || x.numel() == 0) {
    gx.zero_();
  } else {
    const at::Tensor w_packed_t = weight.permute({2, 3, 4, 1, 0}).to(at::kFloat).contiguous();
    COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_backward_cpu", [&] {
      grad_input_kernel<scalar_t>(gy, w_packed_t, has_halo, kt, kh, kw, pad_h, pad_w, gx,
                                  has_halo ? &ghalo : nullptr);
      grad_weight_kernel<scalar_t>(gy, x, halo ? &*halo : nullptr, kt, kh, kw, pad_h, pad_w, gw_packed);
    });
  }
  at::Tensor gw = gw_packed.permute({3, 4, 0, 1, 2}).to(weight.scalar_type()).contiguous();
  return {gx, gw, gb, ghalo};
}

}  // namespace

TORCH_LIBRARY_IMPL(cogvx, CPU, m) {
  m.impl("causal_conv3d", &causal_conv3d_cpu);
  m.impl("causal_conv3d_backward", &causal_conv3d_backward_cpu);
}

}  // namespace cogvx

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
// fp32 batch-reduce micro-kernel exported by ATen (csrc/cpu/gemm.h); bf16/fp16 values
// are widened to fp32 while packing, so accumulation is always fp32. Tasks are spread with
// at::parallel_for; the halo/first-frame and border index math lives in csrc/common/causal_conv3d.h,
// shared with the CUDA file. Why not at::conv3d on views: the halo and the first kt-1 output
// frames would still need a concatenated copy, and oneDNN would re-layout the activation anyway.
// The bf16/fp16 backward uses the same tiles and band: grad x is the same product with grad_out as
// the band and the taps mirrored, grad W takes the band as its left operand. The fp32 backward is
// oneDNN's (onednn_backward below).
// The forward of 3×3-spatial convs with enough channels and pixels per call runs Winograd
// F(2×2, 3×3) instead (see winograd_forward_kernel): the same tasks and bands, transformed, with
// 16 products per 2×2 output tile where the direct kernel does 36 (measured 1.4–2.0× the direct
// kernel at the VAE's 128–512-channel shapes on this CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common/causal_conv3d.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/gemm.h"

namespace cogvx {
namespace {

namespace cc = causal_conv3d;

// y += W · band products: blocks of 128 rows and 256 reductions (the micro-kernel does no cache
// blocking; measured on AVX2, K 1152 in one call runs at about half the speed of K 256 blocks), the
// plain loop for tiny products (the micro-kernel's JIT costs more than the work there).
constexpr cpu::GemmBlocks kGemmBlocks{.m = 128, .k = 256, .min_work = 1 << 18};

void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B, int64_t ld_b, float* C,
              int64_t ld_c) {
  cpu::gemm(kGemmBlocks, M, N, K, A, ld_a, B, ld_b, C, ld_c, /*add_C=*/true);
}

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

// Writes a tile (C × rows × cols at GEMM columns r·band_w + s of `tile`, fp32) to frame `frame` of
// dst at rows [h0, h0 + rows), columns [w0, w0 + cols).
template <typename scalar_t>
void store_tile(const float* tile, int64_t ld_tile, int64_t band_w, int64_t C, int64_t rows, int64_t cols,
                const Frames<scalar_t>& dst, int64_t b, int64_t frame, int64_t h0, int64_t w0) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const float* s = tile + c * ld_tile + r * band_w;
      scalar_t* d = const_cast<scalar_t*>(dst.row(b, frame, h0 + r)) + c * dst.sc + w0 * dst.sw;
      if (dst.sw == 1) {
        for (int64_t o = 0; o < cols; ++o) d[o] = static_cast<scalar_t>(s[o]);
      } else {
        for (int64_t o = 0; o < cols; ++o) d[o * dst.sw] = static_cast<scalar_t>(s[o]);
      }
    }
}

// The forward's weights as fp32 (C_out × C_in) matrices, one per plane of each temporal tap:
// u[s][plane][co][ci]. Slices s < kt hold tap dt = s; with `prefix`, slices kt + d - 1 hold the sum
// over dt ≤ d (d = 1..kt-1): without a halo the first frame stands in for the kt - 1 frames before
// it, so output frame t < kt - 1 reads x[0] through taps 0..kt-1-t, one product with their sum.
// `transform(g, Cin, out)` maps the kh·kw rows g[k][ci] of one temporal tap to `planes` rows out:
// the taps themselves for the direct kernel, their Winograd transforms for the other. Per output
// channel the weight block is read once through its strides and transposed to rows over C_in, so
// each step is an elementwise loop over C_in (vectorised) and the result rows are copied out whole
// (a permuted ATen copy, or 4-byte writes scattered over the planes, ran at a fraction of that).
template <typename scalar_t, typename Transform>
at::Tensor pack_weights(const at::Tensor& weight, bool prefix, int64_t planes, const Transform& transform) {
  const int64_t Cout = weight.size(0), Cin = weight.size(1), kt = weight.size(2), kh = weight.size(3),
                kw = weight.size(4), taps = kh * kw;
  const int64_t slices = prefix ? 2 * kt - 1 : kt;
  at::Tensor u = at::empty({slices, planes, Cout, Cin}, weight.options().dtype(at::kFloat));
  const scalar_t* src = weight.data_ptr<scalar_t>();
  std::vector<int64_t> tap_offset(kt * taps);  // element offset of tap (dt, dh, dw) in a (co, ci) block
  for (int64_t dt = 0; dt < kt; ++dt)
    for (int64_t k = 0; k < taps; ++k)
      tap_offset[dt * taps + k] = dt * weight.stride(2) + (k / kw) * weight.stride(3) + (k % kw) * weight.stride(4);
  float* dst = u.data_ptr<float>();
  at::parallel_for(0, Cout, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> g(kt * taps * Cin), rows(slices * planes * Cin);
    for (int64_t co = begin; co < end; ++co) {
      for (int64_t ci = 0; ci < Cin; ++ci) {
        const scalar_t* block = src + co * weight.stride(0) + ci * weight.stride(1);
        for (int64_t k = 0; k < kt * taps; ++k) g[k * Cin + ci] = static_cast<float>(block[tap_offset[k]]);
      }
      for (int64_t dt = 0; dt < kt; ++dt) {
        float* out = &rows[dt * planes * Cin];
        transform(&g[dt * taps * Cin], Cin, out);
        if (prefix && dt > 0) {
          const float* before = &rows[(dt == 1 ? 0 : kt + dt - 2) * planes * Cin];
          float* sum = &rows[(kt + dt - 1) * planes * Cin];
          for (int64_t e = 0; e < planes * Cin; ++e) sum[e] = before[e] + out[e];
        }
      }
      for (int64_t plane = 0; plane < slices * planes; ++plane)
        std::copy(&rows[plane * Cin], &rows[plane * Cin] + Cin, dst + (plane * Cout + co) * Cin);
    }
  });
  return u;
}

// y[b, :, t, tile] = bias + Σ_dt Σ_(dh,dw) W_tap (C_out × C_in) · band_dt shifted by (dh, dw).
template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                    const at::Tensor* halo, int64_t pad_h, int64_t pad_w, at::Tensor& y) {
  const int64_t kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  const int64_t B = x.size(0), Cin = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Cout = y.size(1), Ho = y.size(3), Wo = y.size(4);
  const auto xs = frames_of<scalar_t>(x);
  const auto hs = halo ? frames_of<scalar_t>(*halo) : xs;
  const auto ys = frames_of<scalar_t>(y);
  const bool has_halo = halo != nullptr, prefix = !has_halo && kt > 1;
  const int64_t taps = kh * kw;
  const at::Tensor w_packed = pack_weights<scalar_t>(
      weight, prefix, taps, [taps](const float* g, int64_t Cin, float* out) { std::copy(g, g + taps * Cin, out); });
  const float* wp = w_packed.data_ptr<float>();  // [slice][tap][co][ci]: one contiguous matrix per tap
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
      const int64_t first_dt = has_halo ? 0 : std::max<int64_t>(0, kt - 1 - t);  // taps before it read x[0] too
      for (int64_t dt = first_dt; dt < kt; ++dt) {
        const cc::FrameSource src = cc::padded_frame_source(t + dt, kt, has_halo);
        pack_band(src.from_halo ? hs : xs, b, src.index, Cin, cc::input_coord(oh0, 0, pad_h),
                  cc::input_coord(ow0, 0, pad_w), rows + kh - 1, band_w, band_plane, H, W, band.data());
        const int64_t slice = prefix && dt == first_dt && dt > 0 ? kt + dt - 1 : dt;
        const float* w_dt = wp + slice * taps * Cout * Cin;
        for (int64_t tap = 0; tap < kh * kw; ++tap)
          gemm_acc(Cout, N, Cin, w_dt + tap * Cout * Cin, Cin, band.data() + (tap / kw) * band_w + tap % kw,
                   band_plane, out.data(), ld_out);
      }
      store_tile(out.data(), ld_out, band_w, Cout, rows, cols, ys, b, t, oh0, ow0);
    }
    cpu::gemm_release();
  });
}

// ---- Winograd F(2×2, 3×3): the forward of 3×3-spatial convolutions ----
// Each 2×2 output tile of a frame is Aᵀ [Σ_dt Σ_ci U_dt[co,ci] ⊙ V_dt[ci]] A, with V = Bᵀ d B the
// transform of the 4×4 input patch d under the tile and U = G g Gᵀ the transform of each 3×3 tap
// slice g: per tile 16 products per (co, ci, dt) instead of 36, so the GEMMs (one per transform
// position ξ, M = C_out, K = C_in, N = tiles) do 4/9 of the direct kernel's work. Exact in exact
// arithmetic; in fp32 the transforms add a few ulps (F(2,3)'s constants are 0, ±1, ±½).
// The task layout is the direct kernel's: a band of tile rows × tile columns of one output frame,
// its input band packed once per temporal tap (pack_band) and transformed into V.
// Used where both channel counts are at least kWinogradMinChannels (below that the transforms
// cost more than the products they save) and the call computes at least 2·max(C_in, C_out) output
// pixels (B·T·H·W): the weight transform is a per-call cost; measured on this CPU at 512 channels,
// direct wins at ≤ 200 pixels per call (the VAE's small spatial tiles), Winograd from ~1000.
constexpr int64_t kWinogradMinChannels = 16;

bool winograd_applies(int64_t kh, int64_t kw, int64_t Cin, int64_t Cout, int64_t output_pixels) {
  return kh == 3 && kw == 3 && Cin >= kWinogradMinChannels && Cout >= kWinogradMinChannels &&
         output_pixels >= 2 * std::max(Cin, Cout);
}

// U[ξ][co][ci] = (G g Gᵀ)[ξ] of each 3×3 tap slice g, G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]: the
// Winograd transform given to pack_weights (rows g[k][ci], k = 3·row + column; 16 rows out).
void winograd_transform_taps(const float* g, int64_t Cin, float* out) {
  std::vector<float> gg(12 * Cin);  // G g: gg[(r·3 + c)][ci], row r of column c
  for (int64_t c = 0; c < 3; ++c) {
    const float *g0 = g + c * Cin, *g1 = g0 + 3 * Cin, *g2 = g0 + 6 * Cin;
    float *o0 = &gg[c * Cin], *o1 = o0 + 3 * Cin, *o2 = o1 + 3 * Cin, *o3 = o2 + 3 * Cin;
    for (int64_t ci = 0; ci < Cin; ++ci) {
      o0[ci] = g0[ci], o1[ci] = 0.5f * (g0[ci] + g1[ci] + g2[ci]);
      o2[ci] = 0.5f * (g0[ci] - g1[ci] + g2[ci]), o3[ci] = g2[ci];
    }
  }
  for (int64_t r = 0; r < 4; ++r) {  // (G g) Gᵀ: row r, columns l
    const float *a = &gg[(r * 3) * Cin], *b = a + Cin, *c = b + Cin;
    float* o = out + r * 4 * Cin;
    for (int64_t ci = 0; ci < Cin; ++ci) {
      o[ci] = a[ci], o[Cin + ci] = 0.5f * (a[ci] + b[ci] + c[ci]);
      o[2 * Cin + ci] = 0.5f * (a[ci] - b[ci] + c[ci]), o[3 * Cin + ci] = c[ci];
    }
  }
}

// V[ξ][c][i·tile_cols + j] = (Bᵀ d B)[ξ] of the 4×4 patch of channel c at band rows 2i.., columns
// 2j..; Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]. Row combinations first, over whole band rows
// (contiguous, vectorised), then column combinations per tile.
void winograd_input_transform(const float* band, int64_t C, int64_t band_plane, int64_t band_w, int64_t tile_rows,
                              int64_t tile_cols, int64_t ld_v, float* v, float* scratch) {
  const int64_t plane = C * ld_v;  // floats per ξ
  float* s[4] = {scratch, scratch + band_w, scratch + 2 * band_w, scratch + 3 * band_w};
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < tile_rows; ++i) {
      const float* r0 = band + c * band_plane + 2 * i * band_w;
      const float *r1 = r0 + band_w, *r2 = r1 + band_w, *r3 = r2 + band_w;
      for (int64_t x = 0; x < band_w; ++x) {
        s[0][x] = r0[x] - r2[x], s[1][x] = r1[x] + r2[x], s[2][x] = r2[x] - r1[x], s[3][x] = r1[x] - r3[x];
      }
      for (int64_t k = 0; k < 4; ++k) {
        const float* sk = s[k];
        float* out = v + 4 * k * plane + c * ld_v + i * tile_cols;
        for (int64_t j = 0; j < tile_cols; ++j) {
          const float a = sk[2 * j], b = sk[2 * j + 1], d = sk[2 * j + 2], e = sk[2 * j + 3];
          out[j] = a - d, out[plane + j] = b + d, out[2 * plane + j] = d - b, out[3 * plane + j] = b - e;
        }
      }
    }
}

// y tile rows = Aᵀ M A + bias, Aᵀ = [1 1 1 0; 0 1 -1 -1]; stores output rows [oh0, oh0 + rows) ×
// columns [ow0, ow0 + cols) of frame t (rows/cols may end mid-tile at odd extents).
template <typename scalar_t>
void winograd_output_transform(const float* m, int64_t Cout, int64_t ld_m, int64_t tile_rows, int64_t tile_cols,
                               const float* bias, const Frames<scalar_t>& dst, int64_t b, int64_t t, int64_t oh0,
                               int64_t ow0, int64_t rows, int64_t cols, float* scratch) {
  const int64_t plane = Cout * ld_m;
  float* y0 = scratch;                 // output row 2i, 2·tile_cols values
  float* y1 = scratch + 2 * tile_cols;  // output row 2i + 1
  for (int64_t co = 0; co < Cout; ++co)
    for (int64_t i = 0; i < tile_rows; ++i) {
      const float* p = m + co * ld_m + i * tile_cols;
      for (int64_t j = 0; j < tile_cols; ++j) {
        float a0[4], a1[4];
        for (int64_t l = 0; l < 4; ++l) {
          const float m0 = p[l * plane + j], m1 = p[(4 + l) * plane + j], m2 = p[(8 + l) * plane + j],
                      m3 = p[(12 + l) * plane + j];
          a0[l] = m0 + m1 + m2, a1[l] = m1 - m2 - m3;
        }
        y0[2 * j] = a0[0] + a0[1] + a0[2] + bias[co], y0[2 * j + 1] = a0[1] - a0[2] - a0[3] + bias[co];
        y1[2 * j] = a1[0] + a1[1] + a1[2] + bias[co], y1[2 * j + 1] = a1[1] - a1[2] - a1[3] + bias[co];
      }
      for (int64_t r = 0; r < 2 && 2 * i + r < rows; ++r) {
        const float* src = r == 0 ? y0 : y1;
        scalar_t* d = const_cast<scalar_t*>(dst.row(b, t, oh0 + 2 * i + r)) + co * dst.sc + ow0 * dst.sw;
        if (dst.sw == 1) {
          for (int64_t o = 0; o < cols; ++o) d[o] = static_cast<scalar_t>(src[o]);
        } else {
          for (int64_t o = 0; o < cols; ++o) d[o * dst.sw] = static_cast<scalar_t>(src[o]);
        }
      }
    }
}

template <typename scalar_t>
void winograd_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                             const at::Tensor* halo, int64_t pad_h, int64_t pad_w, at::Tensor& y) {
  const int64_t B = x.size(0), Cin = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Cout = y.size(1), Ho = y.size(3), Wo = y.size(4), kt = weight.size(2);
  const auto xs = frames_of<scalar_t>(x);
  const auto hs = halo ? frames_of<scalar_t>(*halo) : xs;
  const auto ys = frames_of<scalar_t>(y);
  const bool has_halo = halo != nullptr;
  // without a halo, output frame t < kt - 1 reads x[0] through taps 0..kt-1-t: one product with
  // their summed transforms, as in the direct kernel
  const bool prefix = !has_halo && kt > 1;
  const at::Tensor u = pack_weights<scalar_t>(weight, prefix, 16, winograd_transform_taps);
  const float* u_data = u.data_ptr<float>();
  std::vector<float> bias_f(Cout, 0.f);
  if (bias) {
    auto bf = bias->to(at::kFloat).contiguous();
    std::copy(bf.data_ptr<float>(), bf.data_ptr<float>() + Cout, bias_f.begin());
  }
  // Tiles of 2×2 output pixels; a task takes tile rows × up to kMaxTileCols tile columns of one frame,
  // about kTargetTiles in all (the GEMMs' N); fewer at wide channel counts so V and M (16 · C · N
  // floats each) stay near the L2 size.
  constexpr int64_t kMaxTileCols = 64;
  const int64_t target_tiles = std::clamp<int64_t>(32768 / std::max(Cin, Cout), 32, 256);
  const int64_t all_tile_rows = (Ho + 1) / 2, all_tile_cols = (Wo + 1) / 2;
  const int64_t col_blocks = (all_tile_cols + kMaxTileCols - 1) / kMaxTileCols;
  const int64_t tile_cols = (all_tile_cols + col_blocks - 1) / col_blocks;
  const int64_t max_rows = std::clamp<int64_t>(target_tiles / tile_cols, 1, all_tile_rows);
  const int64_t threads = at::get_num_threads();
  int64_t tile_rows = 1;
  double best_cost = 1e300;
  for (int64_t rows = 1; rows <= max_rows; ++rows) {  // fewest tile rows per thread, ties → taller
    const int64_t tasks = B * T * col_blocks * ((all_tile_rows + rows - 1) / rows);
    const double cost = double((tasks + threads - 1) / threads) * (double(rows) + 0.25);
    if (cost <= best_cost) best_cost = cost, tile_rows = rows;
  }
  const int64_t row_blocks = (all_tile_rows + tile_rows - 1) / tile_rows;
  const int64_t band_w = 2 * tile_cols + 2, band_plane = (2 * tile_rows + 2) * band_w;
  const int64_t ld = tile_rows * tile_cols;  // N of a full task
  const int64_t tasks_per_frame = row_blocks * col_blocks;

  at::parallel_for(0, B * T * tasks_per_frame, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> band(Cin * band_plane), v(16 * Cin * ld), m(16 * Cout * ld), scratch(4 * band_w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % tasks_per_frame, t = (task / tasks_per_frame) % T, b = task / (tasks_per_frame * T);
      const int64_t tr0 = (block / col_blocks) * tile_rows, tc0 = (block % col_blocks) * tile_cols;
      const int64_t trs = std::min(tile_rows, all_tile_rows - tr0), tcs = std::min(tile_cols, all_tile_cols - tc0);
      const int64_t oh0 = 2 * tr0, ow0 = 2 * tc0;
      std::fill(m.begin(), m.end(), 0.f);
      const int64_t first_dt = has_halo ? 0 : std::max<int64_t>(0, kt - 1 - t);
      for (int64_t dt = first_dt; dt < kt; ++dt) {
        const cc::FrameSource src = cc::padded_frame_source(t + dt, kt, has_halo);
        pack_band(src.from_halo ? hs : xs, b, src.index, Cin, cc::input_coord(oh0, 0, pad_h),
                  cc::input_coord(ow0, 0, pad_w), 2 * trs + 2, band_w, band_plane, H, W, band.data());
        winograd_input_transform(band.data(), Cin, band_plane, band_w, trs, tcs, ld, v.data(), scratch.data());
        const int64_t slice = prefix && dt == first_dt && dt > 0 ? kt + dt - 1 : dt;
        const float* u_dt = u_data + slice * 16 * Cout * Cin;
        for (int64_t xi = 0; xi < 16; ++xi)
          gemm_acc(Cout, trs * tcs, Cin, u_dt + xi * Cout * Cin, Cin, v.data() + xi * Cin * ld, ld,
                   m.data() + xi * Cout * ld, ld);
      }
      winograd_output_transform(m.data(), Cout, ld, trs, tcs, bias_f.data(), ys, b, t, oh0, ow0,
                                std::min(2 * trs, Ho - oh0), std::min(2 * tcs, Wo - ow0), scratch.data());
    }
    cpu::gemm_release();
  });
}

// Gradient of the time-padded input folded onto the stored frames: a task owns a tile of one stored
// frame (halo or x) and sums over every padded frame that reads it, so each element is written once.
// grad[b, :, s, tile] = Σ_j Σ_dt Σ_(dh,dw) W_tapᵀ (C_in × C_out) · band shifted by (kh-1-dh, kw-1-dw),
// the band packed from grad_out frame j-dt: the forward's tiling, with grad_out in the role of x.
template <typename scalar_t>
void grad_input_kernel(const at::Tensor& gy, const at::Tensor& w_packed_t, bool has_halo, int64_t kt,
                       int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w, at::Tensor& gx,
                       at::Tensor* ghalo) {
  const int64_t B = gx.size(0), Cin = gx.size(1), T = gx.size(2), H = gx.size(3), W = gx.size(4);
  const int64_t Cout = gy.size(1), Ho = gy.size(3), Wo = gy.size(4);
  const int64_t lead = has_halo ? kt - 1 : 0;  // halo frames that get their own gradient
  const auto gs = frames_of<scalar_t>(gy);
  const auto gxs = frames_of<scalar_t>(gx);
  const auto ghs = ghalo ? frames_of<scalar_t>(*ghalo) : gxs;
  const float* wp = w_packed_t.data_ptr<float>();  // (kt, kh, kw, Cin, Cout)
  const at::Tensor w_prefix = has_halo || kt == 1 ? w_packed_t : w_packed_t.cumsum(0);
  const float* wp_prefix = w_prefix.data_ptr<float>();
  const ForwardTiling tiling = forward_tiling(H, W, kw, B * (lead + T));
  const int64_t band_w = tiling.cols + kw - 1, band_plane = (tiling.rows + kh - 1) * band_w;
  const int64_t ld_out = (tiling.rows - 1) * band_w + tiling.cols;
  const int64_t tiles = tiling.row_tiles * tiling.col_tiles;

  at::parallel_for(0, B * (lead + T) * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out(Cin * ld_out), band(Cout * band_plane);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % tiles, s = (task / tiles) % (lead + T), b = task / (tiles * (lead + T));
      const int64_t ih0 = (tile / tiling.col_tiles) * tiling.rows, iw0 = (tile % tiling.col_tiles) * tiling.cols;
      const int64_t rows = std::min(tiling.rows, H - ih0), cols = std::min(tiling.cols, W - iw0);
      const int64_t N = (rows - 1) * band_w + cols;
      const bool is_halo = s < lead;
      const int64_t index = is_halo ? s : s - lead;
      int64_t j_lo, j_hi;
      cc::padded_frames_of_source(is_halo, index, kt, has_halo, &j_lo, &j_hi);
      for (int64_t ci = 0; ci < Cin; ++ci) std::fill(&out[ci * ld_out], &out[ci * ld_out] + N, 0.f);
      // grad_out frame t reaches this frame through the taps dt with j = t + dt in [j_lo, j_hi): one
      // tap, or (x[0] without a halo) taps 0..d_hi-1, summed in the prefix weights as in the forward
      for (int64_t t = std::max<int64_t>(0, j_lo - kt + 1); t < std::min(T, j_hi); ++t) {
        const int64_t d_lo = std::max<int64_t>(0, j_lo - t), d_hi = std::min(kt, j_hi - t);
        if (d_lo >= d_hi) continue;
        TORCH_INTERNAL_ASSERT(d_hi - d_lo == 1 || d_lo == 0);
        const float* w_dt = d_hi - d_lo == 1 ? wp + d_lo * kh * kw * Cin * Cout
                                             : wp_prefix + (d_hi - 1) * kh * kw * Cin * Cout;
        // band row 0 is the output row that input row ih0 reaches through the last tap row kh - 1
        pack_band(gs, b, t, Cout, cc::output_coord(ih0, kh - 1, pad_h), cc::output_coord(iw0, kw - 1, pad_w),
                  rows + kh - 1, band_w, band_plane, Ho, Wo, band.data());
        for (int64_t tap = 0; tap < kh * kw; ++tap)
          gemm_acc(Cin, N, Cout, w_dt + tap * Cin * Cout, Cout,
                   band.data() + (kh - 1 - tap / kw) * band_w + (kw - 1 - tap % kw), band_plane, out.data(), ld_out);
      }
      store_tile(out.data(), ld_out, band_w, Cin, rows, cols, is_halo ? ghs : gxs, b, index, ih0, iw0);
    }
    cpu::gemm_release();
  });
}

// Gradient of the weight, transposed: dW_tapᵀ (C_in × C_out) = Σ_tiles band shifted by (dh, dw)
// (C_in × N) · Gᵀ (N × C_out), with the forward's tiling and band (one packing for all kh·kw taps)
// and Gᵀ the grad_out tile packed pixel-major, zero on the dropped columns between rows (so they add
// nothing). Tasks split dt × blocks of C_in (deterministic: each task owns its slice of dWᵀ and
// packs only its channels of the band).
template <typename scalar_t>
void grad_weight_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor* halo, int64_t kt,
                        int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w, at::Tensor& gw_packed_t) {
  const int64_t B = x.size(0), Cin = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Cout = gy.size(1), Ho = gy.size(3), Wo = gy.size(4);
  const auto xs = frames_of<scalar_t>(x);
  const auto hs = halo ? frames_of<scalar_t>(*halo) : xs;
  const auto gs = frames_of<scalar_t>(gy);
  float* gwp = gw_packed_t.data_ptr<float>();  // (kt, kh, kw, Cin, Cout)
  // 64 channels per task, fewer when that leaves threads idle (kt = 3 tasks of 64 on 2 threads)
  const int64_t threads = at::get_num_threads();
  int64_t ci_block = std::min<int64_t>(Cin, 64);
  while (ci_block > 16 && kt * ((Cin + ci_block - 1) / ci_block) < 3 * threads) ci_block /= 2;
  const int64_t ci_blocks = (Cin + ci_block - 1) / ci_block;
  const ForwardTiling tiling = forward_tiling(Ho, Wo, kw, B * T);
  const int64_t band_w = tiling.cols + kw - 1, band_plane = (tiling.rows + kh - 1) * band_w;
  const int64_t ld_g = (tiling.rows - 1) * band_w + tiling.cols;

  at::parallel_for(0, kt * ci_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> band(ci_block * band_plane), gt(ld_g * Cout);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t dt = task / ci_blocks, ci0 = (task % ci_blocks) * ci_block;
      const int64_t M = std::min(ci_block, Cin - ci0);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const cc::FrameSource src = cc::padded_frame_source(t + dt, kt, halo != nullptr);
          const Frames<scalar_t>& f = src.from_halo ? hs : xs;
          for (int64_t tile = 0; tile < tiling.row_tiles * tiling.col_tiles; ++tile) {
            const int64_t oh0 = (tile / tiling.col_tiles) * tiling.rows, ow0 = (tile % tiling.col_tiles) * tiling.cols;
            const int64_t rows = std::min(tiling.rows, Ho - oh0), cols = std::min(tiling.cols, Wo - ow0);
            const int64_t N = (rows - 1) * band_w + cols;
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t s = 0; s < band_w && r * band_w + s < N; ++s) {
                float* d = &gt[(r * band_w + s) * Cout];
                if (s >= cols) {
                  std::fill(d, d + Cout, 0.f);
                  continue;
                }
                const scalar_t* g = gs.row(b, t, oh0 + r) + (ow0 + s) * gs.sw;
                for (int64_t co = 0; co < Cout; ++co) d[co] = static_cast<float>(g[co * gs.sc]);
              }
            const Frames<scalar_t> channels{f.data + ci0 * f.sc, f.sb, f.sc, f.st, f.sh, f.sw};
            pack_band(channels, b, src.index, M, cc::input_coord(oh0, 0, pad_h), cc::input_coord(ow0, 0, pad_w),
                      rows + kh - 1, band_w, band_plane, H, W, band.data());
            for (int64_t tap = 0; tap < kh * kw; ++tap)
              gemm_acc(M, Cout, N, band.data() + (tap / kw) * band_w + tap % kw, band_plane, gt.data(), Cout,
                       gwp + ((dt * kh * kw + tap) * Cin + ci0) * Cout, Cout);
          }
        }
    }
    cpu::gemm_release();
  });
}

// Where oneDNN's convolution (ATen's conv3d on the time-padded input, fp32) beats the direct
// kernel below the Winograd threshold: 3×3 convs with C_in·C_out ≥ 256·512 on few pixels (the VAE's
// 512-channel layers on 16×16 latents: ours 0.55× oneDNN on 2×16×16 while 256→256 is 1.34×; the
// direct kernel streams all 27·C_in·C_out weights per tile) and the RGB stem (C_in ≤ 4, C_out ≥ 64:
// ours 0.45×). Measured on AVX2 and AVX-512 alike (2 threads). The padded copy is small there.
bool onednn_applies(const at::Tensor& x, int64_t kh, int64_t kw, int64_t Cin, int64_t Cout) {
  return x.scalar_type() == at::kFloat && kh == 3 && kw == 3 &&
         (Cin * Cout >= 256 * 512 || (Cin <= 4 && Cout >= 64));
}

// ATen runs a conv3d whose N·C·D·H is at most 20480 on its im2col path, not oneDNN (use_mkldnn in
// ATen's ConvUtils: a 2D rule that leaves the last extent out), 6–11× oneDNN's time on one clip of a
// 16–32-channel layer at 17×64×64. The same convolution over the spatial axes reordered, the smallest
// extent last, is the same sum, and oneDNN takes it. `OneDnnAxes` picks that order and moves the
// tensors (N, C, T, H, W) and the padding into it and back.
constexpr int64_t kAtenNativeConvLimit = 20480;

struct OneDnnAxes {
  std::array<int64_t, 3> order{0, 1, 2};  // the positions of T, H, W in the order the conv runs them
  bool onednn = true;                     // whether ATen takes oneDNN for the conv in that order

  // the input as conv3d gets it: (N, C, T + kt − 1, H, W)
  OneDnnAxes(int64_t batch, int64_t channels, const std::array<int64_t, 3>& extents) {
    const auto takes_onednn = [&] {  // a batch of two or more always goes to oneDNN
      return batch > 1 || channels * extents[order[0]] * extents[order[1]] > kAtenNativeConvLimit;
    };
    if (takes_onednn()) return;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return extents[a] > extents[b]; });
    onednn = takes_onednn();
    if (!onednn) order = {0, 1, 2};  // the im2col path either way: no copies for nothing
  }
  explicit OneDnnAxes(const at::Tensor& padded)
      : OneDnnAxes(padded.size(0), padded.size(1), {padded.size(2), padded.size(3), padded.size(4)}) {}

  bool reordered() const { return order != std::array<int64_t, 3>{0, 1, 2}; }
  at::Tensor to_conv(const at::Tensor& t) const {
    return reordered() ? t.permute({0, 1, 2 + order[0], 2 + order[1], 2 + order[2]}) : t;
  }
  at::Tensor from_conv(const at::Tensor& t) const {
    if (!reordered()) return t;
    std::array<int64_t, 5> back{0, 1, 0, 0, 0};
    for (int64_t i = 0; i < 3; ++i) back[2 + order[i]] = 2 + i;
    return t.permute(back);
  }
  std::vector<int64_t> padding(int64_t pad_h, int64_t pad_w) const {
    const std::array<int64_t, 3> pads{0, pad_h, pad_w};
    return {pads[order[0]], pads[order[1]], pads[order[2]]};
  }
};

// Narrow layers (C_in, C_out ≤ 32: a tiny VAE's; CogVideoX's VAE has none but its RGB output) go
// to ATen's conv3d even where Winograd applies: there our Winograd/direct tiles run mostly empty,
// 2.4–3.6× oneDNN's time at 16–32 channels from 16×24 to 64×96, and ATen's im2col path is faster
// than ours too on small frames (≤ 16×16; the RGB stem) — except one clip with C_in of 16 on frames
// where even the reordered conv stays on the im2col path (32×32: ours 0.6× its time). Measured on
// AVX-512, 2 threads, fp32.
bool onednn_narrow(const at::Tensor& x, int64_t kt, int64_t kh, int64_t kw, int64_t Cin, int64_t Cout) {
  return x.scalar_type() == at::kFloat && kh == 3 && kw == 3 && Cin <= 32 && Cout <= 32 &&
         (Cin <= 4 || Cin == 32 || OneDnnAxes(x.size(0), Cin, {x.size(2) + kt - 1, x.size(3), x.size(4)}).onednn);
}

at::Tensor onednn_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& halo, int64_t pad_h, int64_t pad_w) {
  const int64_t lead = weight.size(2) - 1;
  at::Tensor front = halo ? *halo : x.narrow(2, 0, 1).expand({x.size(0), x.size(1), lead, x.size(3), x.size(4)});
  at::Tensor padded = lead > 0 ? at::cat({front, x}, 2) : x;
  const OneDnnAxes axes(padded);
  at::Tensor y = at::conv3d(axes.to_conv(padded), axes.to_conv(weight), bias, 1, axes.padding(pad_h, pad_w));
  return axes.reordered() ? axes.from_conv(y).contiguous(x.suggest_memory_format()) : y;
}

// The fp32 backward is oneDNN's convolution backward on the time-padded input: it matched or beat
// the direct kernel's at every VAE shape measured (README, "How the causal conv kernels work"). The
// gradient of the padding frames goes to the halo, or to the first frame when it was repeated.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> onednn_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& halo_in,
    int64_t pad_h, int64_t pad_w, bool has_bias) {
  const int64_t lead = weight.size(2) - 1, T = x.size(2);
  const bool has_halo = halo_in.has_value() && lead > 0;
  at::Tensor front = has_halo ? *halo_in
                              : x.narrow(2, 0, 1).expand({x.size(0), x.size(1), lead, x.size(3), x.size(4)});
  at::Tensor padded = lead > 0 ? at::cat({front, x}, 2) : x;
  const int64_t C_out = weight.size(0);
  const OneDnnAxes axes(padded);
  auto [gpad_conv, gw_conv, gb] = at::convolution_backward(
      axes.to_conv(gy), axes.to_conv(padded), axes.to_conv(weight),
      has_bias ? std::optional<at::IntArrayRef>(at::IntArrayRef(&C_out, 1)) : std::nullopt, {1, 1, 1},
      axes.padding(pad_h, pad_w), {1, 1, 1}, false, {0, 0, 0}, 1, {true, true, has_bias});
  const at::Tensor gpad = axes.from_conv(gpad_conv), gw = axes.from_conv(gw_conv);
  at::Tensor gx = gpad.narrow(2, lead, T).contiguous();
  at::Tensor ghalo = !halo_in ? at::empty({0}, x.options())
                     : has_halo ? gpad.narrow(2, 0, lead).contiguous()
                                : at::zeros(halo_in->sizes(), x.options());  // kt == 1: an unused (empty) halo
  if (!has_halo && lead > 0) gx.narrow(2, 0, 1).add_(gpad.narrow(2, 0, lead).sum(2, true));
  return {gx, gw.contiguous(), has_bias ? gb : at::empty({0}, weight.options()), ghalo};
}

at::Tensor causal_conv3d_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& halo_in,
                             int64_t pad_h, int64_t pad_w) {
  constexpr const char* op = "cogvx::causal_conv3d";
  checks::conv::args(op, x_in, weight, bias, halo_in, pad_h, pad_w);
  checks::kernel_dtype(op, "CPU", "x", x_in);
  const int64_t kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  const at::Tensor& x = x_in;  // read through its strides: no copy for any layout
  std::optional<at::Tensor> halo;
  if (halo_in && kt > 1) halo = *halo_in;
  const int64_t Ho = cc::output_extent(x.size(3), kh, pad_h), Wo = cc::output_extent(x.size(4), kw, pad_w);
  const int64_t output_pixels = x.size(0) * x.size(2) * Ho * Wo;
  const bool winograd = winograd_applies(kh, kw, x.size(1), weight.size(0), output_pixels);
  if (output_pixels > 0 && (onednn_narrow(x, kt, kh, kw, x.size(1), weight.size(0)) ||
                            (!winograd && onednn_applies(x, kh, kw, x.size(1), weight.size(0)))))
    return onednn_forward(x, weight, bias, halo, pad_h, pad_w);  // before allocating an output it would not use
  at::Tensor y = at::empty({x.size(0), weight.size(0), x.size(2), Ho, Wo}, x.options());
  if (y.numel() == 0) return y;
  if (winograd) {
    COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_cpu", [&] {
      winograd_forward_kernel<scalar_t>(x, weight, bias ? &*bias : nullptr, halo ? &*halo : nullptr, pad_h, pad_w, y);
    });
    return y;
  }
  COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_cpu", [&] {
    forward_kernel<scalar_t>(x, weight, bias ? &*bias : nullptr, halo ? &*halo : nullptr, pad_h, pad_w, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv3d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& halo_in, int64_t pad_h, int64_t pad_w, bool has_bias) {
  constexpr const char* op = "cogvx::causal_conv3d_backward";
  checks::conv::args(op, x_in, weight, std::nullopt, halo_in, pad_h, pad_w);
  checks::conv::grad_out(op, grad_out, x_in, weight, pad_h, pad_w);
  checks::kernel_dtype(op, "CPU", "x", x_in);
  const int64_t kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  const at::Tensor& x = x_in;
  const at::Tensor& gy = grad_out;
  const bool has_halo = halo_in.has_value() && kt > 1;
  std::optional<at::Tensor> halo;
  if (has_halo) halo = *halo_in;

  if (x.scalar_type() == at::kFloat && gy.numel() > 0 && x.numel() > 0)
    return onednn_backward(gy, x, weight, halo_in, pad_h, pad_w, has_bias);
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor ghalo = halo_in ? at::zeros(halo_in->sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw_packed_t = at::zeros({kt, kh, kw, weight.size(1), weight.size(0)}, weight.options().dtype(at::kFloat));
  at::Tensor gb = has_bias ? gy.sum({0, 2, 3, 4}, false, at::kFloat).to(weight.scalar_type())
                           : at::empty({0}, weight.options());
  if (gy.numel() == 0 || x.numel() == 0) {
    gx.zero_();
  } else {
    const at::Tensor w_packed_t = weight.permute({2, 3, 4, 1, 0}).to(at::kFloat).contiguous();
    COGVX_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv3d_backward_cpu", [&] {
      grad_input_kernel<scalar_t>(gy, w_packed_t, has_halo, kt, kh, kw, pad_h, pad_w, gx,
                                  has_halo ? &ghalo : nullptr);
      grad_weight_kernel<scalar_t>(gy, x, halo ? &*halo : nullptr, kt, kh, kw, pad_h, pad_w, gw_packed_t);
    });
  }
  at::Tensor gw = gw_packed_t.permute({4, 3, 0, 1, 2}).to(weight.scalar_type()).contiguous();
  return {gx, gw, gb, ghalo};
}

}  // namespace

TORCH_LIBRARY_IMPL(cogvx, CPU, m) {
  m.impl("causal_conv3d", &causal_conv3d_cpu);
  m.impl("causal_conv3d_backward", &causal_conv3d_backward_cpu);
}

}  // namespace cogvx

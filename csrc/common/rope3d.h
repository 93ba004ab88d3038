// Index math and numerics of the 3D RoPE kernels (rope3d, qk_norm_rope3d), shared by the C++ CPU
// kernels and the CUDA kernels so that the CPU tests exercise the code the GPU runs.
//
// Tables: `tables` is (2, T+H+W, D/2) fp32 — [0] cos, [1] sin — built in Python from the per-axis
// positions (cogvx_kernels/reference/rope3d.py: axis_tables). Rows [0, T) belong to time, [T, T+H)
// to height, [T+H, T+H+W) to width; channel pair i belongs to the axis whose block of
// axes_dim/2 pair columns holds i.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace cogvx {
namespace rope3d {

struct Grid {
  int64_t text_len, T, H, W;
  int64_t half_t, half_h;  // pair columns of the time and height blocks (axes_dim[0]/2, axes_dim[1]/2)
};

// The video coordinates (t, h, w) of token `token` (>= text_len).
COGVX_HD void video_coords(const Grid& g, int64_t token, int64_t* t, int64_t* h, int64_t* w) {
  const int64_t v = token - g.text_len;
  *w = v % g.W;
  *h = (v / g.W) % g.H;
  *t = v / (g.W * g.H);
}

// Row of the tables that holds the angle of channel pair i for a token at (t, h, w).
COGVX_HD int64_t table_row(const Grid& g, int64_t pair, int64_t t, int64_t h, int64_t w) {
  if (pair < g.half_t) return t;
  if (pair < g.half_t + g.half_h) return g.T + h;
  return g.T + g.H + w;
}

// Rotates pair (a, b) by the angle whose cos/sin are given; inverse rotates by −angle (backward).
COGVX_HD void rotate_pair(float a, float b, float c, float s, bool inverse, float* out_a, float* out_b) {
  if (inverse) s = -s;
  *out_a = a * c - b * s;
  *out_b = b * c + a * s;
}

}  // namespace rope3d
}  // namespace cogvx

// Index math of the temporally causal 3D convolution, shared by the C++ CPU kernel and the CUDA
// kernel so that the CPU tests exercise the exact code the GPU runs.
//
// Terms: the "time-padded input" is the (kt-1) halo frames followed by the T frames of x. Without a
// halo, the first frame of x stands in for each halo frame (CogVideoX's causal padding). Spatial
// borders are zero padding of (pad_h, pad_w). Nothing of this padded input is ever materialised.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace cogvx {
namespace causal_conv3d {

struct FrameSource {
  bool from_halo;  // read frame `index` of the halo tensor, else of x
  int64_t index;
};

// Padded frame j (0 <= j < kt-1+T) → which stored frame holds it.
COGVX_HD FrameSource padded_frame_source(int64_t j, int64_t kt, bool has_halo) {
  const int64_t lead = kt - 1;
  if (j >= lead) return {false, j - lead};
  if (has_halo) return {true, j};
  return {false, 0};  // no halo: the first frame is repeated kt-1 times
}

// Inverse of padded_frame_source: the padded frames [*lo, *hi) that read stored frame `index`
// (of the halo when `is_halo`, else of x). Used by the input-gradient kernels to gather.
COGVX_HD void padded_frames_of_source(bool is_halo, int64_t index, int64_t kt, bool has_halo,
                                      int64_t* lo, int64_t* hi) {
  const int64_t lead = kt - 1;
  if (is_halo) {
    *lo = index;
    *hi = index + 1;
  } else if (!has_halo && index == 0) {
    *lo = 0;  // the repeated first frame feeds every halo slot and its own slot
    *hi = lead + 1;
  } else {
    *lo = index + lead;
    *hi = index + lead + 1;
  }
}

// Output extent along a spatial axis of input extent n with kernel k and zero padding pad.
COGVX_HD int64_t output_extent(int64_t n, int64_t k, int64_t pad) { return n + 2 * pad - k + 1; }

// Input coordinate read by output coordinate o through kernel tap d.
COGVX_HD int64_t input_coord(int64_t o, int64_t d, int64_t pad) { return o + d - pad; }

// Output coordinate whose tap d reads input coordinate i (the inverse of input_coord; gradients).
COGVX_HD int64_t output_coord(int64_t i, int64_t d, int64_t pad) { return i + pad - d; }

COGVX_HD bool in_bounds(int64_t i, int64_t n) { return i >= 0 && i < n; }

// Output coordinates [*lo, *hi) whose tap d lands inside [0, n_in) (the rest read zero padding).
COGVX_HD void valid_output_range(int64_t d, int64_t pad, int64_t n_in, int64_t n_out, int64_t* lo,
                                 int64_t* hi) {
  int64_t l = pad - d;
  int64_t h = n_in + pad - d;
  if (l < 0) l = 0;
  if (h > n_out) h = n_out;
  if (h < l) h = l;
  *lo = l;
  *hi = h;
}

// Input coordinates [*lo, *hi) that tap d maps onto a valid output coordinate (for gradients).
COGVX_HD void valid_input_range(int64_t d, int64_t pad, int64_t n_in, int64_t n_out, int64_t* lo,
                                int64_t* hi) {
  int64_t l = d - pad;
  int64_t h = n_out + d - pad;
  if (l < 0) l = 0;
  if (h > n_in) h = n_in;
  if (h < l) h = l;
  *lo = l;
  *hi = h;
}

}  // namespace causal_conv3d
}  // namespace cogvx

// Numerics of the joint-attention kernels (online softmax, log-sum-exp, softmax backward), shared
// by the C++ CPU kernels and the CUDA kernels so that the CPU tests exercise the code the GPU runs.
//
// Scores are kept in base 2: s2 = (q·k) · scale · log2(e), so every exponential is one exp2.
// Per query row the online softmax keeps m (the running max of s2) and l (the running sum of
// 2^(s2 - m)); a new key block with block max b moves the max to max(m, b) and multiplies l and the
// output accumulator by rescale(m, max(m, b)). The natural-log LSE written out is (m + log2 l)·ln 2.
// Backward: p = 2^(s2 - lse2) with lse2 = lse·log2(e); dS = p·(dP - delta), delta = rowsum(dO∘O)
// minus the incoming gradient of the LSE (when the LSE is an output that was used).
#pragma once
#include <cmath>

#include "common/hd.h"

namespace cogvx {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

COGVX_HD float exp2_(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

COGVX_HD float log2_(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}

// The factor that turns (q·k) into a base-2 score.
COGVX_HD float score_scale_log2(float scale) { return scale * kLog2e; }

// Factor for l and the accumulator when the running max moves from m_old to m_new (>= m_old).
// A row that has seen no key yet (m_old = -inf) has nothing to rescale.
COGVX_HD float rescale(float m_old, float m_new) { return m_old == -INFINITY ? 0.f : exp2_(m_old - m_new); }

// Unnormalised probability of a base-2 score under the running max m.
COGVX_HD float prob(float s2, float m) { return exp2_(s2 - m); }

// Natural-log LSE of a finished row; l > 0 whenever the row saw at least one key.
COGVX_HD float lse_natural(float m, float l) { return (m + log2_(l)) * kLn2; }

// Normalised probability of a base-2 score given the row's natural-log LSE in base 2 (lse·log2 e).
COGVX_HD float prob_from_lse(float s2, float lse2) { return exp2_(s2 - lse2); }

// Gradient of the (unscaled) score: p·(dP − delta). Multiply by `scale` for dQ/dK.
COGVX_HD float grad_score(float p, float dp, float delta) { return p * (dp - delta); }

}  // namespace attention
}  // namespace cogvx

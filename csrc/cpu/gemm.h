// The fp32 GEMM of the C++ CPU kernels: C (M×N, ld_c) (+)= A (M×K, ld_a) · B (K×N, ld_b), row-major.
// Runs on oneDNN's batch-reduce micro-kernel exported by ATen (at::native::cpublas::brgemm) where
// torch has it and it works here (probed once: it throws where oneDNN's micro-kernels are missing,
// e.g. non-x86 builds), else on a plain loop. The micro-kernel does no cache blocking of its own and
// JIT-compiles (and caches) one kernel per new shape, so each caller states the blocks its products
// are cut into and the size below which the plain loop is cheaper (GemmBlocks).
#pragma once
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace cogvx {
namespace cpu {

struct GemmBlocks {
  static constexpr int64_t kAll = std::numeric_limits<int64_t>::max();
  int64_t m = kAll, n = kAll, k = kAll;  // largest M, N, K of one micro-kernel call
  int64_t min_work = 0;                  // M·N·K below which the plain loop runs
};

inline void gemm_loop(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B, int64_t ld_b,
                      float* C, int64_t ld_c, bool add_C) {
  for (int64_t m = 0; m < M; ++m) {
    float* c = C + m * ld_c;
    if (!add_C) std::fill(c, c + N, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * ld_a + k];
      const float* b = B + k * ld_b;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// Whether at::native::cpublas::brgemm runs fp32 here: probed once on a 1×1×1 product.
inline bool brgemm_available() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  static const bool ok = [] {
    try {
      float a = 1.f, b = 2.f, c = 0.f;
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c, false);
      at::native::cpublas::brgemm_release(false);
      return c == 2.f;
    } catch (...) {
      return false;
    }
  }();
  return ok;
#else
  return false;
#endif
}

inline void gemm(const GemmBlocks& blocks, int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a,
                 const float* B, int64_t ld_b, float* C, int64_t ld_c, bool add_C) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add_C)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ld_c, C + m * ld_c + N, 0.f);
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (M * N * K >= blocks.min_work && brgemm_available()) {
    // K blocks accumulate into C in order: the first one overwrites C unless add_C
    for (int64_t m0 = 0; m0 < M; m0 += blocks.m)
      for (int64_t n0 = 0; n0 < N; n0 += blocks.n)
        for (int64_t k0 = 0; k0 < K; k0 += blocks.k)
          at::native::cpublas::brgemm(std::min(blocks.m, M - m0), std::min(blocks.n, N - n0),
                                      std::min(blocks.k, K - k0), ld_a, ld_b, ld_c, add_C || k0 > 0,
                                      A + m0 * ld_a + k0, B + k0 * ld_b + n0, C + m0 * ld_c + n0,
                                      /*is_vnni=*/false);
    return;
  }
#endif
  gemm_loop(M, N, K, A, ld_a, B, ld_b, C, ld_c, add_C);
}

// Frees the micro-kernel's per-thread state: once per task loop, after its last gemm.
inline void gemm_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (brgemm_available()) at::native::cpublas::brgemm_release(false);
#endif
}

}  // namespace cpu
}  // namespace cogvx

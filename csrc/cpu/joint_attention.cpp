// C++ CPU kernels of joint attention (non-causal softmax(q·kᵀ·scale)·v) and its backward.
//
// Forward (flash-attention style, never an Lq×Lk matrix): a task owns one block of query rows of
// one (batch, head); it walks the keys in blocks: S = Q·Kᵀ in base 2 (Q is packed pre-multiplied
// by scale·log2 e), online softmax per row with the helpers of csrc/common/attention.h (running max
// m, running sum l, accumulator rescaled when m moves), O += P·V, and writes O/l and the
// natural-log LSE once. The products run on oneDNN's fp32 batch-reduce micro-kernel exported by
// ATen (at::native::cpublas::brgemm), which takes row-major operands only, so Kᵀ and V are packed
// as contiguous fp32 panels per head, once per thread: at::parallel_for hands each thread one
// contiguous range of tasks, consecutive tasks share a head and reuse the panels (the packing is
// O(L·D) per head against O(L²·D) of products; bf16/fp16 are widened to fp32 there, so every
// product accumulates in fp32). The exponentials, maxima and sums run on 8-wide AVX2 code (own
// exp2 polynomial) chosen at run time, with a scalar fallback that calls the shared helpers.
//
// Backward (recomputation from the saved LSE, no atomics): a task owns one (batch, head) and a
// contiguous range of key blocks (a "split", normally all of them); for the key blocks it loops
// over all query blocks in the transposed (key-major) domain, where every operand is row-major:
//   Sᵀ  = K_j · (Q_i·scale·log2e)ᵀ              Pᵀ = 2^(Sᵀ − lse2)        (lse2 = lse·log2 e)
//   dV_j += Pᵀ · dO_i                           dPᵀ = V_j · dO_iᵀ
//   dSᵀ = Pᵀ ∘ (dPᵀ − delta)                    delta = rowsum(dO∘O) − grad_lse
//   dK_j += dSᵀ · Q_i   (× scale at the end)    dQ_iᵀ += K_jᵀ · dSᵀ (× scale at the end)
// dK_j, dV_j are finished when the query loop ends; dQᵀ is accumulated in a per-task fp32 buffer.
// That is five products per tile (the minimum), not the seven of separate dK/dV and dQ passes
// that would each recompute P. When (batch × heads) alone cannot keep the threads busy the keys
// are cut into a few splits whose partial dQ are summed afterwards, in split order. Every output
// element is written by exactly one task with a fixed summation order, so results are
// bit-identical run to run for a given thread count: `deterministic` is accepted and always met.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define COGVX_ATTN_X86 1
#else
#define COGVX_ATTN_X86 0
#endif

#include "common/attention.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/gemm.h"

namespace cogvx {
namespace {

namespace at_ = attention;

// ---------------------------------------------------------------------------------------------
// Tile sizes (rows of queries / keys per block), tuned on a 2-core Zen 3 (AVX2).
constexpr int64_t kFwdBlockQ = 128;
constexpr int64_t kFwdBlockK = 128;
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 64;
constexpr int64_t kBwdGroup = 4;  // key blocks that share one pass over the query blocks

// Uninitialised fp32 scratch, aligned to cache lines (a 16-byte aligned panel makes every other
// 32-byte load of the micro-kernel straddle two lines).
struct Buffer {
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<float[], Free> p;
  explicit Buffer(int64_t n)
      : p(static_cast<float*>(::operator new[](sizeof(float) * std::max<int64_t>(n, 16), std::align_val_t(64)))) {}
  float* get() const { return p.get(); }
};

// The tile products (csrc/cpu/gemm.h): N and K cut into blocks of 128 (measured on AVX2, the
// micro-kernel runs at ~95 GFLOP/s while N and K stay <= 128 and drops to ~70 beyond), the plain loop
// for tiny products (the micro-kernel is JIT-compiled per shape).
constexpr cpu::GemmBlocks kGemmBlocks{.n = 128, .k = 128, .min_work = 2048};

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B, int64_t ld_b, float* C,
          int64_t ld_c, bool add_C) {
  cpu::gemm(kGemmBlocks, M, N, K, A, ld_a, B, ld_b, C, ld_c, add_C);
}

// ---------------------------------------------------------------------------------------------
// Row kernels: AVX2 + FMA + F16C when the CPU has them (run-time check), else scalar code that
// calls the shared helpers of common/attention.h. COGVX_CPU_SIMD=0 forces the scalar path (tests).

bool use_avx2() {
  static const bool on = [] {
    const char* env = std::getenv("COGVX_CPU_SIMD");
    if (env && env[0] == '0') return false;
#if COGVX_ATTN_X86 && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    // Every AVX2 CPU has F16C (Ivy Bridge / Piledriver onwards); not every compiler knows the name.
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return on;
}

#if COGVX_ATTN_X86 && (defined(__GNUC__) || defined(__clang__))
#define COGVX_HAVE_AVX2_PATH 1
#define COGVX_AVX2 __attribute__((target("avx2,fma,f16c")))

// 2^x for x <= 127 (our arguments are <= 0: scores minus a running max or an LSE): 2^n · p(x − n) with
// n = round(x) taken from the low mantissa bits of x + 1.5·2^23 and p a degree-6 fit of 2^f on
// [−½, ½] (relative error < 1e-7 evaluated in fp32, below fp32 rounding of the inputs); x < −127
// (and −inf) gives 0, NaN stays NaN.
COGVX_AVX2 inline __m256 exp2_ps(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12582912.f);  // 1.5·2^23
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);      // max returns its 2nd operand on NaN
  const __m256 t = _mm256_add_ps(x, magic);          // round(x) in the low mantissa bits
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
  __m256 p = _mm256_set1_ps(1.5345805149991065e-04f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399930903688073e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6184890717267990e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5503286421298980e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022646248340607e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718246459960e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  // bits(t) = 0x4B400000 + n; (bits + 127) << 23 = (n + 127) << 23 = 2^n (0 for n = −127).
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

COGVX_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

COGVX_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Mask with the first r (< 8) lanes set.
COGVX_AVX2 inline __m256i tail_mask(int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

COGVX_AVX2 inline float row_max_avx2(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + i + 16));
    m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + i + 24));
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
  float m = hmax(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = 2^(x[i] − m); returns the sum of the new values.
COGVX_AVX2 inline float exp2_sub_sum_avx2(float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 p0 = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    const __m256 p1 = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm));
    _mm256_storeu_ps(x + i, p0);
    _mm256_storeu_ps(x + i + 8, p1);
    s0 = _mm256_add_ps(s0, p0);
    s1 = _mm256_add_ps(s1, p1);
  }
  for (; i < n; i += 8) {
    const __m256i mask = tail_mask(std::min<int64_t>(8, n - i));
    const __m256 p = exp2_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, mask), vm));
    _mm256_maskstore_ps(x + i, mask, p);
    s0 = _mm256_add_ps(s0, _mm256_and_ps(p, _mm256_castsi256_ps(mask)));
  }
  return hsum(_mm256_add_ps(s0, s1));
}

// One key block of the online softmax of `rows` query rows (see softmax_block below).
COGVX_AVX2 void softmax_block_avx2(float* s, int64_t ld, int64_t rows, int64_t n, float* m, float* l, float* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    float* x = s + r * ld;
    const float m_new = std::max(m[r], row_max_avx2(x, n));
    const float sum = exp2_sub_sum_avx2(x, n, m_new);
    alpha[r] = m_new == m[r] ? 1.f : at_::rescale(m[r], m_new);
    l[r] = l[r] * alpha[r] + sum;
    m[r] = m_new;
  }
}

// x[i] = 2^(x[i] − sub[i]). The argument is <= 0 up to rounding for an LSE from the forward; it is
// capped at 127 so that an inconsistent LSE gives large values rather than exponent wrap-around.
COGVX_AVX2 void exp2_sub_vec_avx2(float* x, const float* sub, int64_t n) {
  const __m256 cap = _mm256_set1_ps(127.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(
        x + i, exp2_ps(_mm256_min_ps(cap, _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(sub + i)))));
  if (i < n) {
    const __m256i mask = tail_mask(n - i);
    const __m256 d = _mm256_sub_ps(_mm256_maskload_ps(x + i, mask), _mm256_maskload_ps(sub + i, mask));
    _mm256_maskstore_ps(x + i, mask, exp2_ps(_mm256_min_ps(cap, d)));
  }
}

// dp[i] = p[i]·(dp[i] − delta[i]).
COGVX_AVX2 void grad_score_avx2(const float* p, float* dp, const float* delta, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dp + i, _mm256_mul_ps(_mm256_loadu_ps(p + i),
                                           _mm256_sub_ps(_mm256_loadu_ps(dp + i), _mm256_loadu_ps(delta + i))));
  for (; i < n; ++i) dp[i] = at_::grad_score(p[i], dp[i], delta[i]);
}

COGVX_AVX2 void scale_avx2(float* x, int64_t n, float a) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), va));
  for (; i < n; ++i) x[i] *= a;
}
#else
#define COGVX_HAVE_AVX2_PATH 0
#endif

// One key block of the online softmax of query rows [0, rows): s (rows × n, row stride ld) holds
// base-2 scores and receives 2^(s − m_new) with m_new = max(m, row max); l becomes l·alpha + row sum
// and alpha[r] is the factor the caller applies to row r's accumulator (1 when the max stayed).
void softmax_block(float* s, int64_t ld, int64_t rows, int64_t n, float* m, float* l, float* alpha) {
#if COGVX_HAVE_AVX2_PATH
  if (use_avx2()) return softmax_block_avx2(s, ld, rows, n, m, l, alpha);
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float* x = s + r * ld;
    float m_new = m[r];
    for (int64_t i = 0; i < n; ++i) m_new = std::max(m_new, x[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += (x[i] = at_::prob(x[i], m_new));
    alpha[r] = m_new == m[r] ? 1.f : at_::rescale(m[r], m_new);
    l[r] = l[r] * alpha[r] + sum;
    m[r] = m_new;
  }
}

void exp2_sub_vec(float* x, const float* sub, int64_t n) {
#if COGVX_HAVE_AVX2_PATH
  if (use_avx2()) return exp2_sub_vec_avx2(x, sub, n);
#endif
  for (int64_t i = 0; i < n; ++i) x[i] = at_::prob_from_lse(x[i], sub[i]);
}

void grad_score_row(const float* p, float* dp, const float* delta, int64_t n) {
#if COGVX_HAVE_AVX2_PATH
  if (use_avx2()) return grad_score_avx2(p, dp, delta, n);
#endif
  for (int64_t i = 0; i < n; ++i) dp[i] = at_::grad_score(p[i], dp[i], delta[i]);
}

void scale_row(float* x, int64_t n, float a) {
#if COGVX_HAVE_AVX2_PATH
  if (use_avx2()) return scale_avx2(x, n, a);
#endif
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

// ---------------------------------------------------------------------------------------------
// Packing (widening to fp32) and stores.

// One (b, head) slice of a (B, heads, L, D) tensor with unit last-dim stride: row l at data + l·sl.
template <typename T>
struct Head {
  T* data;
  int64_t sl;
  T* row(int64_t l) const { return data + l * sl; }
};

template <typename T>
struct Heads {
  T* data;
  int64_t sb, sh, sl;
  Head<T> at(int64_t b, int64_t h) const { return {data + b * sb + h * sh, sl}; }
};

template <typename T>
Heads<T> heads_of(const at::Tensor& t) {
  return {const_cast<T*>(t.data_ptr<std::remove_const_t<T>>()), t.stride(0), t.stride(1), t.stride(2)};
}

#if COGVX_HAVE_AVX2_PATH
// 8 consecutive values widened to fp32.
COGVX_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
COGVX_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
COGVX_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// In-register transpose of the 8×8 block a[0..7] (rows) into columns.
COGVX_AVX2 inline void transpose8(__m256* a) {
  const __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
  const __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
  const __m256 t4 = _mm256_unpacklo_ps(a[4], a[5]), t5 = _mm256_unpackhi_ps(a[4], a[5]);
  const __m256 t6 = _mm256_unpacklo_ps(a[6], a[7]), t7 = _mm256_unpackhi_ps(a[6], a[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  a[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  a[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  a[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  a[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  a[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  a[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  a[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  a[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

template <typename T>
COGVX_AVX2 void pack_rows_avx2(const Head<const T>& src, int64_t r0, int64_t rows, int64_t D, float mul, float* dst,
                               int64_t ld) {
  const __m256 vm = _mm256_set1_ps(mul);
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src.row(r0 + r);
    float* d = dst + r * ld;
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) _mm256_storeu_ps(d + i, _mm256_mul_ps(load8(s + i), vm));
    for (; i < D; ++i) d[i] = static_cast<float>(s[i]) * mul;
  }
}

template <typename T>
COGVX_AVX2 void pack_cols_avx2(const Head<const T>& src, int64_t r0, int64_t rows, int64_t D, float mul, float* dst,
                               int64_t ld) {
  const __m256 vm = _mm256_set1_ps(mul);
  int64_t rb = 0;
  for (; rb + 8 <= rows; rb += 8) {
    const T* s[8];
    for (int j = 0; j < 8; ++j) s[j] = src.row(r0 + rb + j);
    int64_t d0 = 0;
    for (; d0 + 8 <= D; d0 += 8) {
      __m256 a[8];
      for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(load8(s[j] + d0), vm);
      transpose8(a);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (d0 + i) * ld + rb, a[i]);
    }
    for (; d0 < D; ++d0)
      for (int j = 0; j < 8; ++j) dst[d0 * ld + rb + j] = static_cast<float>(s[j][d0]) * mul;
  }
  for (; rb < rows; ++rb) {
    const T* s = src.row(r0 + rb);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + rb] = static_cast<float>(s[d]) * mul;
  }
}
#endif

// dst[r·ld + d] = src.row(r0 + r)[d] · mul for r < rows, d < D.
template <typename T>
void pack_rows(const Head<const T>& src, int64_t r0, int64_t rows, int64_t D, float mul, float* dst, int64_t ld) {
#if COGVX_HAVE_AVX2_PATH
  if (use_avx2()) return pack_rows_avx2(src, r0, rows, D, mul, dst, ld);
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src.row(r0 + r);
    float* d = dst + r * ld;
    for (int64_t i = 0; i < D; ++i) d[i] = static_cast<float>(s[i]) * mul;
  }
}

// Transposed: dst[d·ld + r] = src.row(r0 + r)[d] · mul for r < rows, d < D (8×8 blocks).
template <typename T>
void pack_cols(const Head<const T>& src, int64_t r0, int64_t rows, int64_t D, float mul, float* dst, int64_t ld) {
#if COGVX_HAVE_AVX2_PATH
  if (use_avx2()) return pack_cols_avx2(src, r0, rows, D, mul, dst, ld);
#endif
  for (int64_t rb = 0; rb < rows; rb += 8) {
    const int64_t rn = std::min<int64_t>(8, rows - rb);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < rn; ++r) dst[d * ld + rb + r] = static_cast<float>(src.row(r0 + rb + r)[d]) * mul;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Query rows per task: kFwdBlockQ, halved (down to 32) while that leaves threads without work.
int64_t forward_block_q(int64_t bh, int64_t Lq) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t bq = kFwdBlockQ;
  while (bq > 32 && bh * ((Lq + bq - 1) / bq) < 2 * threads) bq /= 2;
  return std::min(bq, Lq);
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out,
                    at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const int64_t BQ = forward_block_q(B * H, Lq), BK = std::min(kFwdBlockK, Lk);
  const int64_t nqb = (Lq + BQ - 1) / BQ, nkb = (Lk + BK - 1) / BK;
  const float qmul = at_::score_scale_log2(static_cast<float>(scale));
  const auto qs = heads_of<const scalar_t>(q), ks = heads_of<const scalar_t>(k), vs = heads_of<const scalar_t>(v);
  const auto os = heads_of<scalar_t>(out);
  float* lse_data = lse.data_ptr<float>();

  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    // Per head (packed once per thread and head): Kᵀ per key block (D × BK) and V (Lk × D), fp32,
    // contiguous (V too: rows of a (B, L, H, D) tensor are H·D apart, which thrashes L1 sets).
    Buffer KT(nkb * D * BK), Vp(Lk * D);
    // Per task: the query block (× scale·log2 e), the score/probability tile, the accumulator.
    Buffer Qp(BQ * D), S(BQ * BK), O(BQ * D), m(BQ), l(BQ), alpha(BQ);
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, bh = task / nqb, b = bh / H, h = bh % H;
      if (bh != packed) {
        const auto kh = ks.at(b, h);
        for (int64_t kb = 0; kb < nkb; ++kb)
          pack_cols(kh, kb * BK, std::min(BK, Lk - kb * BK), D, 1.f, KT.get() + kb * D * BK, BK);
        pack_rows(vs.at(b, h), 0, Lk, D, 1.f, Vp.get(), D);
        packed = bh;
      }
      const int64_t q0 = qb * BQ, nq = std::min(BQ, Lq - q0);
      pack_rows(qs.at(b, h), q0, nq, D, qmul, Qp.get(), D);
      float* mr = m.get();
      float* lr = l.get();
      std::fill(mr, mr + nq, -INFINITY);
      std::fill(lr, lr + nq, 0.f);
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t k0 = kb * BK, nk = std::min(BK, Lk - k0);
        gemm(nq, nk, D, Qp.get(), D, KT.get() + kb * D * BK, BK, S.get(), BK, false);
        softmax_block(S.get(), BK, nq, nk, mr, lr, alpha.get());
        if (kb > 0)
          for (int64_t r = 0; r < nq; ++r)
            if (alpha.get()[r] != 1.f) scale_row(O.get() + r * D, D, alpha.get()[r]);
        gemm(nq, D, nk, S.get(), BK, Vp.get() + k0 * D, D, O.get(), D, kb > 0);
      }
      const auto oh = os.at(b, h);
      float* lse_row = lse_data + bh * Lq + q0;
      for (int64_t r = 0; r < nq; ++r) {
        const float inv = 1.f / lr[r];
        const float* o = O.get() + r * D;
        scalar_t* dst = oh.row(q0 + r);
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
        lse_row[r] = at_::lse_natural(mr[r], lr[r]);
      }
    }
    cpu::gemm_release();
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Number of key splits per (batch, head): 1 unless B·H tasks would leave threads idle.
int64_t key_splits(int64_t bh, int64_t nkb) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  for (int64_t s = 1; s < nkb; ++s) {
    const int64_t tasks = bh * s;
    const int64_t rounds = (tasks + threads - 1) / threads;
    if (rounds * threads * 100 <= tasks * 115) return s;  // at most 15% idle
  }
  return nkb;
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor* grad_lse, double scale,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const int64_t BQ = std::min(kBwdBlockQ, Lq), BK = std::min(kBwdBlockK, Lk), G = kBwdGroup;
  const int64_t nqb = (Lq + BQ - 1) / BQ, nkb = (Lk + BK - 1) / BK;
  const int64_t LqP = nqb * BQ;  // query rows padded to whole blocks (blocked transposed panels)
  const float qmul = at_::score_scale_log2(static_cast<float>(scale));
  const float fscale = static_cast<float>(scale);
  const auto qs = heads_of<const scalar_t>(q), ks = heads_of<const scalar_t>(k), vs = heads_of<const scalar_t>(v);
  const auto dos = heads_of<const scalar_t>(dout), outs = heads_of<const scalar_t>(out);
  const auto dqs = heads_of<scalar_t>(dq), dks = heads_of<scalar_t>(dk), dvs = heads_of<scalar_t>(dv);
  const float* lse_data = lse.data_ptr<float>();  // contiguous (B, H, Lq)
  const float* glse = grad_lse ? grad_lse->data_ptr<float>() : nullptr;
  const int64_t splits = key_splits(B * H, nkb);
  const int64_t kb_per_split = (nkb + splits - 1) / splits;
  // Partial dQᵀ of every split when there are several (summed in split order afterwards).
  Buffer partial(splits > 1 ? B * H * splits * D * LqP : 0);

  at::parallel_for(0, B * H * splits, 1, [&](int64_t begin, int64_t end) {
    // Per head (packed once per thread and head, fp32): (Q·scale·log2e)ᵀ and dOᵀ blocked per query
    // block (D × BQ each), Q and dO rows, lse2 = lse·log2 e and delta = rowsum(dO∘O) − grad_lse.
    Buffer QT(LqP * D), dOT(LqP * D), Qr(Lq * D), dOr(Lq * D), lse2(LqP), delta(LqP), orow(D);
    // Per group of G key blocks: K, V rows, Kᵀ, and the dK, dV accumulators; the Pᵀ, dPᵀ tiles.
    Buffer Kr(G * BK * D), Vr(G * BK * D), KT(G * D * BK), dKa(G * BK * D), dVa(G * BK * D);
    Buffer PT(BK * BQ), dPT(BK * BQ);
    Buffer dQlocal(splits > 1 ? 0 : LqP * D);
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits, bh = task / splits, b = bh / H, h = bh % H;
      const auto kh = ks.at(b, h), vh = vs.at(b, h);
      if (bh != packed) {
        const auto qh = qs.at(b, h), doh = dos.at(b, h), oh = outs.at(b, h);
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t q0 = qb * BQ, nq = std::min(BQ, Lq - q0);
          pack_cols(qh, q0, nq, D, qmul, QT.get() + qb * D * BQ, BQ);
          pack_cols(doh, q0, nq, D, 1.f, dOT.get() + qb * D * BQ, BQ);
        }
        pack_rows(qh, 0, Lq, D, 1.f, Qr.get(), D);
        pack_rows(doh, 0, Lq, D, 1.f, dOr.get(), D);
        const float* lse_row = lse_data + bh * Lq;
        for (int64_t i = 0; i < Lq; ++i) {
          lse2.get()[i] = lse_row[i] * at_::kLog2e;
          pack_rows(oh, i, 1, D, 1.f, orow.get(), D);
          const float* g = dOr.get() + i * D;
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc += orow.get()[d] * g[d];
          delta.get()[i] = glse ? acc - glse[bh * Lq + i] : acc;
        }
        std::fill(lse2.get() + Lq, lse2.get() + LqP, 0.f);
        std::fill(delta.get() + Lq, delta.get() + LqP, 0.f);
        packed = bh;
      }

      float* dQT = splits > 1 ? partial.get() + task * D * LqP : dQlocal.get();
      std::fill(dQT, dQT + D * LqP, 0.f);
      const int64_t kb_begin = split * kb_per_split, kb_end = std::min(nkb, kb_begin + kb_per_split);
      // Key blocks go in groups of G: the query-side panels of a query block (Qᵀ, dOᵀ, Q, dO, dQᵀ)
      // are then reused G times while they sit in L2, and the group's K, V, dK, dV stay there too.
      for (int64_t g0 = kb_begin; g0 < kb_end; g0 += G) {
        const int64_t ng = std::min(G, kb_end - g0);
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t k0 = (g0 + g) * BK, nk = std::min(BK, Lk - k0);
          pack_rows(kh, k0, nk, D, 1.f, Kr.get() + g * BK * D, D);
          pack_rows(vh, k0, nk, D, 1.f, Vr.get() + g * BK * D, D);
          pack_cols(kh, k0, nk, D, 1.f, KT.get() + g * D * BK, BK);
        }
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t q0 = qb * BQ, nq = std::min(BQ, Lq - q0);
          const float* QTi = QT.get() + qb * D * BQ;
          const float* dOTi = dOT.get() + qb * D * BQ;
          const float* Qi = Qr.get() + q0 * D;
          const float* dOi = dOr.get() + q0 * D;
          float* dQTi = dQT + qb * D * BQ;
          for (int64_t g = 0; g < ng; ++g) {
            const int64_t k0 = (g0 + g) * BK, nk = std::min(BK, Lk - k0);
            const float* Kb = Kr.get() + g * BK * D;
            const float* Vb = Vr.get() + g * BK * D;
            float* dKb = dKa.get() + g * BK * D;
            float* dVb = dVa.get() + g * BK * D;
            // Sᵀ (nk × nq) in base 2, then Pᵀ = 2^(Sᵀ − lse2).
            gemm(nk, nq, D, Kb, D, QTi, BQ, PT.get(), BQ, false);
            for (int64_t r = 0; r < nk; ++r) exp2_sub_vec(PT.get() + r * BQ, lse2.get() + q0, nq);
            // dV_j += Pᵀ · dO_i
            gemm(nk, D, nq, PT.get(), BQ, dOi, D, dVb, D, qb > 0);
            // dPᵀ = V_j · dO_iᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ − delta)
            gemm(nk, nq, D, Vb, D, dOTi, BQ, dPT.get(), BQ, false);
            for (int64_t r = 0; r < nk; ++r)
              grad_score_row(PT.get() + r * BQ, dPT.get() + r * BQ, delta.get() + q0, nq);
            // dK_j += dSᵀ · Q_i ; dQ_iᵀ += K_jᵀ · dSᵀ
            gemm(nk, D, nq, dPT.get(), BQ, Qi, D, dKb, D, qb > 0);
            gemm(D, nq, nk, KT.get() + g * D * BK, BK, dPT.get(), BQ, dQTi, BQ, true);
          }
        }
        const auto dkh = dks.at(b, h), dvh = dvs.at(b, h);
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t k0 = (g0 + g) * BK, nk = std::min(BK, Lk - k0);
          for (int64_t r = 0; r < nk; ++r) {
            scalar_t* dkr = dkh.row(k0 + r);
            scalar_t* dvr = dvh.row(k0 + r);
            const float* ka = dKa.get() + (g * BK + r) * D;
            const float* va = dVa.get() + (g * BK + r) * D;
            for (int64_t d = 0; d < D; ++d) {
              dkr[d] = static_cast<scalar_t>(ka[d] * fscale);
              dvr[d] = static_cast<scalar_t>(va[d]);
            }
          }
        }
      }
      if (splits == 1) {
        const auto dqh = dqs.at(b, h);
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t q0 = qb * BQ, nq = std::min(BQ, Lq - q0);
          const float* blk = dQT + qb * D * BQ;
          for (int64_t r = 0; r < nq; ++r) {
            scalar_t* dst = dqh.row(q0 + r);
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(blk[d * BQ + r] * fscale);
          }
        }
      }
    }
    cpu::gemm_release();
  });

  if (splits > 1) {  // dQ = Σ_split partial, in split order
    at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
      Buffer acc(D * BQ);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t qb = task % nqb, bh = task / nqb, b = bh / H, h = bh % H;
        const int64_t q0 = qb * BQ, nq = std::min(BQ, Lq - q0);
        std::fill(acc.get(), acc.get() + D * BQ, 0.f);
        for (int64_t s = 0; s < splits; ++s) {
          const float* blk = partial.get() + (bh * splits + s) * D * LqP + qb * D * BQ;
          for (int64_t i = 0; i < D * BQ; ++i) acc.get()[i] += blk[i];
        }
        const auto dqh = dqs.at(b, h);
        for (int64_t r = 0; r < nq; ++r) {
          scalar_t* dst = dqh.row(q0 + r);
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc.get()[d * BQ + r] * fscale);
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points.

std::tuple<at::Tensor, at::Tensor> joint_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       double scale) {
  constexpr const char* op = "cogvx::joint_attention";
  checks::attention::forward_args(op, q, k, v);
  checks::kernel_dtype(op, "CPU", "q", q);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Lq, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (D == 0) {  // softmax over zero scores: uniform weights of nothing
    lse.fill_(std::log(static_cast<double>(Lk)));
    return {out, lse};
  }
  COGVX_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "joint_attention_cpu",
                                 [&] { forward_kernel<scalar_t>(q, k, v, scale, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& grad_lse_in, double scale, bool deterministic) {
  // `deterministic`: this kernel uses no atomics and a fixed summation order, so it always is.
  (void)deterministic;
  constexpr const char* op = "cogvx::joint_attention_backward";
  checks::attention::backward_args(op, grad_out, q, k, v, out, lse_in, grad_lse_in);
  checks::kernel_dtype(op, "CPU", "q", q);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  std::optional<at::Tensor> grad_lse;
  if (grad_lse_in && grad_lse_in->defined()) grad_lse = grad_lse_in->to(at::kFloat).contiguous();
  at::Tensor dq = at::empty({B, Lq, H, D}, q.options()).transpose(1, 2);
  at::Tensor dk = at::empty({B, Lk, H, D}, k.options()).transpose(1, 2);
  at::Tensor dv = at::empty({B, Lk, H, D}, v.options()).transpose(1, 2);
  if (B == 0 || H == 0 || D == 0) return {dq, dk, dv};
  if (Lq == 0 || Lk == 0) {  // nothing attends: zero gradients
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  COGVX_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "joint_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, q, k, v, out, lse, grad_lse ? &*grad_lse : nullptr, scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(cogvx, CPU, m) {
  m.impl("joint_attention", &joint_attention_cpu);
  m.impl("joint_attention_backward", &joint_attention_backward_cpu);
}

}  // namespace cogvx

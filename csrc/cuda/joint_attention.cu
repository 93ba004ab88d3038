// CUDA kernels of joint attention: non-causal softmax(q·kᵀ·scale)·v over the whole (text + video)
// sequence, forward and backward, FlashAttention-2 style (no Lq×Lk matrix in memory). The numerics
// (base-2 scores, online-softmax rescale, LSE, softmax backward) are the helpers of
// common/attention.h, shared with the C++ CPU kernels.
//
// Operands. q (B, H, Lq, D), k/v (B, H, Lk, D) and grad_out are read in place through their int64
// (b, h, l) strides; the head dim must have unit stride. The bf16/fp16 kernels copy tiles with
// 16-byte cp.async, so a view whose data pointer is not 16-byte aligned or whose b/h/l strides are
// not multiples of 8 elements is first copied to a contiguous tensor (never for the usual layouts).
// Tails (Lq, Lk not multiples of the tile sizes) are handled in the kernels: rows past the end are
// zero-filled in shared memory (cp.async with src-size 0) and keys past Lk get probability 0; no
// input is padded in memory. out, grad_q/k/v are written in the (B, L, H, D) memory layout (viewed
// as (B, H, L, D)), lse is fp32 (B, H, Lq) contiguous, natural log.
//
// bf16 / fp16: tensor cores through `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}` (fp32
// accumulation), operands fed by `ldmatrix.x4` (`.trans` where the operand is stored MN-major),
// K/V (forward, dQ kernel) or Q/dO (dK/dV kernel) tiles double-buffered with cp.async (the next
// tile is in flight during the products of the current one). The same mma.sync (HMMA) path runs
// on sm_80 and sm_90: no wgmma/TMA on sm_90 (FA3-style warp specialisation is left for later).
// Shared-memory rows are padded by 8 elements (16 bytes): every ldmatrix phase and every 16-byte
// cp.async / epilogue access is conflict-free. Warp tiles are 32 rows where registers allow, so
// that each fragment read from shared memory feeds two mma (shared-memory bandwidth, not the
// tensor cores, bounds 16-row warp tiles on H100).
//   forward   joint_attention_fwd_kernel<T, D>: block = 128 query rows of one (batch, head), 4 warps
//             of 32 rows (two m16 tiles); loops over key blocks of 64 (D = 64) / 32 (D = 128):
//             S = Q·Kᵀ (mma), base-2 online softmax in fp32 registers (row max / sum reduced over
//             the 4 lanes of a quad with __shfl_xor_sync), P converted to T in registers and used
//             directly as the A operand of O += P·V (the C fragment of S has the A-fragment
//             layout), O/l staged through shared memory for 16-byte coalesced stores. D = 64 keeps
//             the Q fragments in registers. Keys >= Lk score -inf.
//   backward  FA2 recomputation from the saved LSE:
//             1. joint_attention_bwd_delta_kernel: delta = rowsum(dO∘O) − grad_lse (fp32).
//             2. joint_attention_bwd_dkdv_kernel<T, D, ATOMIC_DQ>: block = one key block (128 keys
//                for D = 64, 64 for D = 128) of one (batch, head), 8 warps, looping over query
//                blocks of 64: S = Q·Kᵀ, dP = dO·Vᵀ, P = 2^(S·scale·log2e − lse·log2e) (0 for
//                padded rows / keys), dS = P∘(dP − delta); P and dS go to shared memory as T;
//                dV += Pᵀ·dO, dK += dSᵀ·Q (ldmatrix .trans of P / dS), and with ATOMIC_DQ
//                (deterministic = false) also dQ += dS·K by fp32 atomics (float2 on sm_90) into a
//                zeroed (B, Lq, H, D) workspace, scaled and cast afterwards.
//             3. deterministic = true: joint_attention_bwd_dq_kernel<T, D> instead of the atomics:
//                block = 128 query rows, 8 warps of 16 rows, looping over key blocks of 64: S, dP,
//                dS in registers, dQ += dS·K (dS used as the A operand like P in the forward). Every
//                dQ / dK / dV element is then written once by one thread with a fixed summation
//                order: the backward is bit-identical run to run.
//             D ∈ {64, 128} on this path (checked).
// fp32: CUDA-core fallback kernels (one warp per query or key row, one key / query at a time, fp32
//             accumulation); correct for any D <= 256, a test path: backend choice runs it only
//             when backend="cuda" is named (fp32 attention on CUDA goes to torch's SDPA kernels).
// Shared memory: the bf16/fp16 kernels need fwd_smem_bytes / dkdv_smem_bytes / dq_smem_bytes per
// block (dynamic); `smem_bytes` reports them to Python (cogvx_kernels._C.cuda_smem), where backend
// choice compares them with the device's opt-in limit before choosing this backend.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/attention.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "cuda/mma.cuh"

namespace cogvx {
namespace attention {
namespace gpu {

constexpr int kPad = 8;  // elements of padding per shared-memory row (16 bytes)

// ---------------------------------------------------------------------------------------------
// Tile configurations (bf16 / fp16)
// ---------------------------------------------------------------------------------------------
template <int D>
struct FwdCfg;
// MT m-tiles (16 rows) per warp: each K / V fragment read from shared memory feeds MT mma.
template <>
struct FwdCfg<64> {
  static constexpr int kWarps = 4, MT = 2, BM = 16 * MT * kWarps, BN = 64, kMinBlocks = 2;
  static constexpr bool kQInRegs = true;
};
template <>
struct FwdCfg<128> {
  static constexpr int kWarps = 4, MT = 2, BM = 16 * MT * kWarps, BN = 32, kMinBlocks = 2;
  static constexpr bool kQInRegs = false;
};

// dK/dV kernel: BN keys per block, BM queries per step; warp grids (rows x cols) of the three
// products: S/dP (BM x BN), dK/dV (BN x D), dQ (BM x D).
template <int D>
struct DkdvCfg;
template <>
struct DkdvCfg<64> {
  static constexpr int BN = 128, BM = 64, kWarps = 8, kMinBlocks = 1;
  static constexpr int SWM = 2, SWN = 4, KWM = 4, KWN = 2, QWM = 4, QWN = 2;
};
template <>
struct DkdvCfg<128> {
  static constexpr int BN = 64, BM = 64, kWarps = 8, kMinBlocks = 1;
  static constexpr int SWM = 4, SWN = 2, KWM = 2, KWN = 4, QWM = 2, QWN = 4;
};

// dQ kernel (deterministic path): BM = 16 rows per warp, BN keys per step.
template <int D>
struct DqCfg {
  static constexpr int BM = 128, BN = 64, kWarps = 8, kMinBlocks = 1;
};

template <int D>
constexpr int fwd_smem_bytes() {
  using C = FwdCfg<D>;
  return (C::BM + 4 * C::BN) * (D + kPad) * 2;
}
template <int D>
constexpr int dkdv_smem_bytes() {
  using C = DkdvCfg<D>;
  return (2 * C::BN + 4 * C::BM) * (D + kPad) * 2  // K, V, Q[2], dO[2]
         + 2 * C::BM * (C::BN + kPad) * 2          // P, dS
         + 4 * C::BM * 4;                          // lse[2], delta[2]
}
template <int D>
constexpr int dq_smem_bytes() {
  using C = DqCfg<D>;
  return (2 * C::BM + 4 * C::BN) * (D + kPad) * 2;
}

// ---------------------------------------------------------------------------------------------
// Kernel parameters (bf16/fp16 operands as raw 16-bit words)
// ---------------------------------------------------------------------------------------------
struct FwdParams {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  int64_t qs[3], ks[3], vs[3];  // (b, h, l) strides in elements
  uint16_t* out;                // (B, Lq, H, D) contiguous
  float* lse;                   // (B, H, Lq) contiguous
  int64_t H, Lq, Lk;
  float scale_log2;
};

struct BwdParams {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  const uint16_t* dout;
  int64_t qs[3], ks[3], vs[3], dos[3];
  const float* lse;    // (B, H, Lq) contiguous, natural log
  const float* delta;  // (B, H, Lq) contiguous
  uint16_t* dq;        // (B, Lq, H, D) contiguous (dq kernel)
  uint16_t* dk;        // (B, Lk, H, D) contiguous
  uint16_t* dv;        // (B, Lk, H, D) contiguous
  float* dq_acc;       // (B, Lq, H, D) fp32, zeroed (atomic path)
  int64_t H, Lq, Lk;
  float scale, scale_log2;
};

// ---------------------------------------------------------------------------------------------
// Lane coordinates of the mma.m16n8k16 / ldmatrix fragments (PTX ISA, "Matrix fragments for
// mma.m16n8k16"): g = lane / 4, t = lane % 4.
//   A (16x16, row-major): reg0 = (row g, k 2t..2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..),
//                         reg3 = (g+8, 2t+8..)
//   B (16x8, "col"):      reg0 = (k 2t..2t+1, col g), reg1 = (k 2t+8.., col g)
//   C (16x8, fp32):       c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// ldmatrix.x4: lane i gives the address of row i % 8 of 8x8 matrix i / 8; matrix j lands in reg j
// (non-trans: lane holds row g, cols 2t, 2t+1; .trans: rows 2t, 2t+1 of col g).
// An operand whose 16x16 fragment rows are the smem rows (A stored [m][k], B stored [k][n] for
// .trans) is addressed at (row lane % 16, col 8·(lane / 16)); one whose fragment rows are the smem
// columns (A stored [k][m] read with .trans, B stored [n][k]) at (row lane % 8 + 8·(lane / 16),
// col 8·((lane / 8) % 2)). For B the four registers are (b0, b1) of n-tile 2j and of n-tile 2j+1.
// ---------------------------------------------------------------------------------------------
COGVX_HD int ldm_row_major_r(int lane) { return lane & 15; }
COGVX_HD int ldm_row_major_c(int lane) { return (lane >> 4) << 3; }
COGVX_HD int ldm_col_major_r(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
COGVX_HD int ldm_col_major_c(int lane) { return ((lane >> 3) & 1) << 3; }
// Row / column (within a 16x8 C tile) of accumulator element e of this lane.
COGVX_HD int c_row(int lane, int e) { return (lane >> 2) + ((e >> 1) << 3); }
COGVX_HD int c_col(int lane, int e) { return ((lane & 3) << 1) + (e & 1); }

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------
using mma::ldmatrix_x4;
using mma::ldmatrix_x4_trans;
using mma::mma_16816;
using mma::smem_addr;

// 16-byte global -> shared copy; zero-fills the destination when !pred (no global read). The
// "memory" clobbers: the shared address travels as a 32-bit integer, so without them the compiler
// may move ordinary shared-memory accesses across the copy.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}


// Two floats -> two T (round to nearest even) in one 32-bit word, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------
// Rows [row0, row0 + ROWS) of a (nrows, W) 16-bit matrix with row stride ld_g (elements) into
// shared memory [ROWS][W + kPad] by cp.async; rows >= nrows are zero-filled. NT threads.
template <int ROWS, int W, int NT>
__device__ __forceinline__ void load_rows_async(uint16_t* s, const uint16_t* g, int64_t ld_g, int64_t row0,
                                                int64_t nrows, int tid) {
  constexpr int CPR = W / 8;  // 16-byte chunks per row
  constexpr int TOTAL = ROWS * CPR;
#pragma unroll
  for (int i = 0; i < (TOTAL + NT - 1) / NT; ++i) {
    const int c = tid + i * NT;
    if (TOTAL % NT != 0 && c >= TOTAL) break;
    const int r = c / CPR, cc = c % CPR;
    const int64_t row = row0 + r;
    const bool ok = row < nrows;
    const uint16_t* src = ok ? g + row * ld_g + cc * 8 : g;
    cp_async_16(s + r * (W + kPad) + cc * 8, src, ok);
  }
}

// Per-row fp32 values [row0, row0 + n) of v (zero past nrows) into s[0, n) by cp.async.
template <int N>
__device__ __forceinline__ void load_vec_async(float* s, const float* v, int64_t row0, int64_t nrows, int idx) {
  if (idx >= 0 && idx < N) {
    const bool ok = row0 + idx < nrows;
    cp_async_4(s + idx, ok ? v + row0 + idx : v, ok);
  }
}

// c[MT][NT] += A · B over K = 16·KT for the warp tile at (m0, n0): A is (M x K), B is (K x N),
// both in shared memory with row strides lda / ldb (elements).
//   A_T = false: A stored [m][k];  A_T = true: A stored [k][m] (read with ldmatrix .trans)
//   B_T = false: B stored [n][k];  B_T = true: B stored [k][n] (read with ldmatrix .trans)
template <typename T, int MT, int NT, int KT, bool A_T, bool B_T>
__device__ __forceinline__ void warp_gemm(float (&c)[MT][NT][4], const uint16_t* sa, int lda, int m0,
                                          const uint16_t* sb, int ldb, int n0, int lane) {
  static_assert(NT % 2 == 0, "warp_gemm: n-tiles come in pairs (ldmatrix.x4)");
  const uint16_t* pa = A_T ? sa + (ldm_col_major_r(lane)) * lda + m0 + ldm_col_major_c(lane)
                           : sa + (m0 + ldm_row_major_r(lane)) * lda + ldm_row_major_c(lane);
  const uint16_t* pb = B_T ? sb + (ldm_row_major_r(lane)) * ldb + n0 + ldm_row_major_c(lane)
                           : sb + (n0 + ldm_col_major_r(lane)) * ldb + ldm_col_major_c(lane);
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      if constexpr (A_T)
        ldmatrix_x4_trans(a[mi], pa + kk * 16 * lda + mi * 16);
      else
        ldmatrix_x4(a[mi], pa + mi * 16 * lda + kk * 16);
    }
#pragma unroll
    for (int nj = 0; nj < NT / 2; ++nj) {
      uint32_t b[4];
      if constexpr (B_T)
        ldmatrix_x4_trans(b, pb + kk * 16 * ldb + nj * 16);
      else
        ldmatrix_x4(b, pb + nj * 16 * ldb + kk * 16);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma_16816<T>(c[mi][2 * nj], a[mi], b[0], b[1]);
        mma_16816<T>(c[mi][2 * nj + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// c[MT][NT] += A · B for a warp tile of MT 16-row m-tiles with A given as C fragments of an
// (16·MT) x (16·KT) fp32 tile (`p`, n-tiles of 8 columns), converted to T in registers: the C
// fragment of n-tiles 2kk, 2kk+1 is exactly the A fragment of k-slice kk. B stored [k][n] in shared
// memory (row stride ldb), read with ldmatrix .trans; each B fragment feeds the MT m-tiles.
template <typename T, int MT, int NT, int KT>
__device__ __forceinline__ void warp_gemm_areg(float (&c)[MT][NT][4], const float (&p)[MT][2 * KT][4],
                                               const uint16_t* sb, int ldb, int lane) {
  static_assert(NT % 2 == 0, "warp_gemm_areg: n-tiles come in pairs");
  const uint16_t* pb = sb + ldm_row_major_r(lane) * ldb + ldm_row_major_c(lane);
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      a[mi][0] = pack2<T>(p[mi][2 * kk][0], p[mi][2 * kk][1]);
      a[mi][1] = pack2<T>(p[mi][2 * kk][2], p[mi][2 * kk][3]);
      a[mi][2] = pack2<T>(p[mi][2 * kk + 1][0], p[mi][2 * kk + 1][1]);
      a[mi][3] = pack2<T>(p[mi][2 * kk + 1][2], p[mi][2 * kk + 1][3]);
    }
#pragma unroll
    for (int nj = 0; nj < NT / 2; ++nj) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, pb + kk * 16 * ldb + nj * 16);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma_16816<T>(c[mi][2 * nj], a[mi], b[0], b[1]);
        mma_16816<T>(c[mi][2 * nj + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[j][e] = 0.f;
}
template <int MT, int NT>
__device__ __forceinline__ void zero(float (&c)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[i][j][e] = 0.f;
}

// A warp's 16 x D fp32 fragment tile (n-tiles of 8 columns) times `mul`, as T, into its shared
// memory rows s[16][D + kPad] (the warp's own rows), then to global rows row0.. (< nrows) of a
// matrix with row stride ld_g by 16-byte stores.
template <typename T, int D>
__device__ __forceinline__ void store_warp_rows(const float (&o)[D / 8][4], const float (&mul)[2], uint16_t* s,
                                                uint16_t* g, int64_t ld_g, int64_t row0, int64_t nrows,
                                                int lane) {
  constexpr int LD = D + kPad;
  __syncwarp();
#pragma unroll
  for (int di = 0; di < D / 8; ++di)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(s + c_row(lane, 2 * r) * LD + di * 8 + c_col(lane, 0)) =
          pack2<T>(o[di][2 * r] * mul[r], o[di][2 * r + 1] * mul[r]);
  __syncwarp();
  constexpr int CPR = D / 8;
#pragma unroll
  for (int i = 0; i < 16 * CPR / 32; ++i) {
    const int c = lane + 32 * i;
    const int r = c / CPR, cc = c % CPR;
    if (row0 + r < nrows)
      *reinterpret_cast<uint4*>(g + (row0 + r) * ld_g + cc * 8) =
          *reinterpret_cast<const uint4*>(s + r * LD + cc * 8);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward (bf16 / fp16)
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(FwdCfg<D>::kWarps * 32, FwdCfg<D>::kMinBlocks)
    joint_attention_fwd_kernel(const FwdParams p) {
  using C = FwdCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, MT = C::MT, NTH = C::kWarps * 32, LD = D + kPad;
  static_assert(BM == 16 * MT * C::kWarps, "forward: MT m-tiles of 16 query rows per warp");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);  // [BM][LD]
  uint16_t* sK = sQ + BM * LD;                            // [2][BN][LD]
  uint16_t* sV = sK + 2 * BN * LD;                        // [2][BN][LD]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t Lq = p.Lq, Lk = p.Lk;
  const uint16_t* qg = p.q + b * p.qs[0] + h * p.qs[1];
  const uint16_t* kg = p.k + b * p.ks[0] + h * p.ks[1];
  const uint16_t* vg = p.v + b * p.vs[0] + h * p.vs[1];
  const int nkb = static_cast<int>((Lk + BN - 1) / BN);

  load_rows_async<BM, D, NTH>(sQ, qg, p.qs[2], m0, Lq, tid);
  load_rows_async<BN, D, NTH>(sK, kg, p.ks[2], 0, Lk, tid);
  load_rows_async<BN, D, NTH>(sV, vg, p.vs[2], 0, Lk, tid);
  cp_async_commit();

  const int wrow0 = warp * 16 * MT;  // the warp's first row in the block
  const uint16_t* sQw = sQ + wrow0 * LD;
  uint32_t qf[C::kQInRegs ? MT : 1][C::kQInRegs ? D / 16 : 1][4];
  float o[MT][D / 8][4];
  zero(o);
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_run[mi][r] = -INFINITY;
      l_run[mi][r] = 0.f;
    }
  const float sl2 = p.scale_log2;

  for (int j = 0; j < nkb; ++j) {
    const int buf = j & 1;
    cp_async_wait_all();
    __syncthreads();  // block j landed for all threads; everyone is done with block j - 1
    if (j + 1 < nkb) {
      load_rows_async<BN, D, NTH>(sK + (buf ^ 1) * BN * LD, kg, p.ks[2], int64_t{j + 1} * BN, Lk, tid);
      load_rows_async<BN, D, NTH>(sV + (buf ^ 1) * BN * LD, vg, p.vs[2], int64_t{j + 1} * BN, Lk, tid);
    }
    cp_async_commit();
    if constexpr (C::kQInRegs) {
      if (j == 0) {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk)
            ldmatrix_x4(qf[mi][kk], sQw + (mi * 16 + ldm_row_major_r(lane)) * LD + kk * 16 + ldm_row_major_c(lane));
      }
    }
    const uint16_t* sKb = sK + buf * BN * LD;
    const uint16_t* sVb = sV + buf * BN * LD;

    // ---- S = Q·Kᵀ (16·MT x BN per warp) ----
    float s[MT][BN / 8][4];
    zero(s);
    if constexpr (C::kQInRegs) {
      const uint16_t* pb = sKb + ldm_col_major_r(lane) * LD + ldm_col_major_c(lane);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int nj = 0; nj < BN / 16; ++nj) {
          uint32_t bb[4];
          ldmatrix_x4(bb, pb + nj * 16 * LD + kk * 16);
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            mma_16816<T>(s[mi][2 * nj], qf[mi][kk], bb[0], bb[1]);
            mma_16816<T>(s[mi][2 * nj + 1], qf[mi][kk], bb[2], bb[3]);
          }
        }
    } else {
      warp_gemm<T, MT, BN / 8, D / 16, false, false>(s, sQw, LD, 0, sKb, LD, 0, lane);
    }

    // ---- base-2 scores, tail mask, online softmax (rows g and g + 8 of every m-tile) ----
    const int64_t n0 = int64_t{j} * BN;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < BN / 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][ni][e] *= sl2;
    if (n0 + BN > Lk) {
#pragma unroll
      for (int ni = 0; ni < BN / 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0 + ni * 8 + c_col(lane, e) >= Lk) {
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) s[mi][ni][e] = -INFINITY;
          }
    }
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int ni = 0; ni < BN / 8; ++ni) mx = fmaxf(mx, fmaxf(s[mi][ni][2 * r], s[mi][ni][2 * r + 1]));
        const float m_new = fmaxf(m_run[mi][r], quad_max(mx));  // finite: every block holds a valid key
        const float alpha = rescale(m_run[mi][r], m_new);
        m_run[mi][r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int ni = 0; ni < BN / 8; ++ni) {
          s[mi][ni][2 * r] = prob(s[mi][ni][2 * r], m_new);
          s[mi][ni][2 * r + 1] = prob(s[mi][ni][2 * r + 1], m_new);
          sum += s[mi][ni][2 * r] + s[mi][ni][2 * r + 1];
        }
        l_run[mi][r] = l_run[mi][r] * alpha + sum;  // per-lane partial sum; quad-reduced at the end
#pragma unroll
        for (int di = 0; di < D / 8; ++di) {
          o[mi][di][2 * r] *= alpha;
          o[mi][di][2 * r + 1] *= alpha;
        }
      }

    // ---- O += P·V (P as T straight from the S registers) ----
    warp_gemm_areg<T, MT, D / 8, BN / 16>(o, s, sVb, LD, lane);
  }

  // ---- epilogue: O / l, natural-log LSE ----
  const int64_t ld_out = p.H * D;
  uint16_t* outg = p.out + (b * Lq * p.H + h) * D;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_run[mi][r]);
      inv[r] = 1.f / l;
      const int64_t row = m0 + wrow0 + mi * 16 + c_row(lane, 2 * r);
      if ((lane & 3) == 0 && row < Lq) p.lse[(b * p.H + h) * Lq + row] = lse_natural(m_run[mi][r], l);
    }
    store_warp_rows<T, D>(o[mi], inv, sQ + (wrow0 + mi * 16) * LD, outg, ld_out, m0 + wrow0 + mi * 16, Lq, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward preprocess: delta = rowsum(dO∘O) − grad_lse, one warp per (b, h, row)
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256) joint_attention_bwd_delta_kernel(
    const T* __restrict__ dout, int64_t ds0, int64_t ds1, int64_t ds2, const T* __restrict__ out, int64_t os0,
    int64_t os1, int64_t os2, const float* __restrict__ grad_lse, float* __restrict__ delta, int64_t H, int64_t Lq,
    int64_t D, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
       row += nwarps) {
    const int64_t i = row % Lq, bh = row / Lq;
    const int64_t h = bh % H, b = bh / H;
    const T* dp = dout + b * ds0 + h * ds1 + i * ds2;
    const T* op = out + b * os0 + h * os1 + i * os2;
    float acc = 0.f;
    for (int64_t d = lane; d < D; d += 32) acc += static_cast<float>(dp[d]) * static_cast<float>(op[d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[row] = acc - (grad_lse != nullptr ? grad_lse[row] : 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward dK / dV (+ atomic dQ), bf16 / fp16
// ---------------------------------------------------------------------------------------------
template <typename T, int D, bool ATOMIC_DQ>
__global__ void __launch_bounds__(DkdvCfg<D>::kWarps * 32, DkdvCfg<D>::kMinBlocks)
    joint_attention_bwd_dkdv_kernel(const BwdParams p) {
  using C = DkdvCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, NTH = C::kWarps * 32, LD = D + kPad, LDS = BN + kPad;
  static_assert(C::SWM * C::SWN == C::kWarps && C::KWM * C::KWN == C::kWarps && C::QWM * C::QWN == C::kWarps,
                "dkdv: warp grids");
  constexpr int S_MT = BM / C::SWM / 16, S_NT = BN / C::SWN / 8;   // S / dP warp tile
  constexpr int KV_MT = BN / C::KWM / 16, KV_NT = D / C::KWN / 8;  // dK / dV warp tile
  constexpr int Q_MT = BM / C::QWM / 16, Q_NT = D / C::QWN / 8;    // dQ warp tile
  static_assert(2 * BM >= BN, "dkdv: the epilogue stages dK / dV in the Q / dO buffers");
  static_assert(NTH >= 2 * BM, "dkdv: one thread per lse / delta value");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);  // [BN][LD]
  uint16_t* sV = sK + BN * LD;                            // [BN][LD]
  uint16_t* sQ = sV + BN * LD;                            // [2][BM][LD]
  uint16_t* sdO = sQ + 2 * BM * LD;                       // [2][BM][LD]
  uint16_t* sP = sdO + 2 * BM * LD;                       // [BM][LDS]
  uint16_t* sdS = sP + BM * LDS;                          // [BM][LDS]
  float* sLse = reinterpret_cast<float*>(sdS + BM * LDS);  // [2][BM]
  float* sDel = sLse + 2 * BM;                             // [2][BM]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t Lq = p.Lq, Lk = p.Lk;
  const int64_t bh = b * p.H + h;
  const uint16_t* qg = p.q + b * p.qs[0] + h * p.qs[1];
  const uint16_t* kg = p.k + b * p.ks[0] + h * p.ks[1];
  const uint16_t* vg = p.v + b * p.vs[0] + h * p.vs[1];
  const uint16_t* dog = p.dout + b * p.dos[0] + h * p.dos[1];
  const float* lseg = p.lse + bh * Lq;
  const float* delg = p.delta + bh * Lq;
  const int nqb = static_cast<int>((Lq + BM - 1) / BM);

  auto load_q_block = [&](int i, int buf) {
    const int64_t r0 = int64_t{i} * BM;
    load_rows_async<BM, D, NTH>(sQ + buf * BM * LD, qg, p.qs[2], r0, Lq, tid);
    load_rows_async<BM, D, NTH>(sdO + buf * BM * LD, dog, p.dos[2], r0, Lq, tid);
    load_vec_async<BM>(sLse + buf * BM, lseg, r0, Lq, tid);
    load_vec_async<BM>(sDel + buf * BM, delg, r0, Lq, tid - BM);
  };
  load_rows_async<BN, D, NTH>(sK, kg, p.ks[2], n0, Lk, tid);
  load_rows_async<BN, D, NTH>(sV, vg, p.vs[2], n0, Lk, tid);
  load_q_block(0, 0);
  cp_async_commit();

  // warp tiles
  const int s_m0 = (warp % C::SWM) * (BM / C::SWM), s_n0 = (warp / C::SWM) * (BN / C::SWN);
  const int kv_m0 = (warp % C::KWM) * (BN / C::KWM), kv_n0 = (warp / C::KWM) * (D / C::KWN);
  const int q_m0 = (warp % C::QWM) * (BM / C::QWM), q_n0 = (warp / C::QWM) * (D / C::QWN);

  float dk[KV_MT][KV_NT][4], dv[KV_MT][KV_NT][4];
  zero(dk);
  zero(dv);
  const float sl2 = p.scale_log2;
  const bool key_tail = n0 + BN > Lk;

  for (int i = 0; i < nqb; ++i) {
    const int buf = i & 1;
    cp_async_wait_all();
    __syncthreads();  // block i landed; everyone is done with block i - 1 (its buffers, P, dS)
    if (i + 1 < nqb) load_q_block(i + 1, buf ^ 1);
    cp_async_commit();
    const uint16_t* sQb = sQ + buf * BM * LD;
    const uint16_t* sdOb = sdO + buf * BM * LD;
    const float* sLseb = sLse + buf * BM;
    const float* sDelb = sDel + buf * BM;
    const int64_t q0 = int64_t{i} * BM;

    // ---- S = Q·Kᵀ, dP = dO·Vᵀ (BM x BN) ----
    {
      float s[S_MT][S_NT][4], dp[S_MT][S_NT][4];
      zero(s);
      zero(dp);
      warp_gemm<T, S_MT, S_NT, D / 16, false, false>(s, sQb, LD, s_m0, sK, LD, s_n0, lane);
      warp_gemm<T, S_MT, S_NT, D / 16, false, false>(dp, sdOb, LD, s_m0, sV, LD, s_n0, lane);
      const bool tail = key_tail || q0 + BM > Lq;
#pragma unroll
      for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = s_m0 + mi * 16 + c_row(lane, 2 * r);
          const float lse2 = sLseb[row] * kLog2e;
          const float del = sDelb[row];
          const bool row_ok = q0 + row < Lq;
#pragma unroll
          for (int ni = 0; ni < S_NT; ++ni) {
            const int col = s_n0 + ni * 8 + c_col(lane, 0);
            float p0 = prob_from_lse(s[mi][ni][2 * r] * sl2, lse2);
            float p1 = prob_from_lse(s[mi][ni][2 * r + 1] * sl2, lse2);
            if (tail) {  // padded query rows and keys: probability 0 (their scores are of zeros)
              if (!row_ok || n0 + col >= Lk) p0 = 0.f;
              if (!row_ok || n0 + col + 1 >= Lk) p1 = 0.f;
            }
            const float g0 = grad_score(p0, dp[mi][ni][2 * r], del);
            const float g1 = grad_score(p1, dp[mi][ni][2 * r + 1], del);
            *reinterpret_cast<uint32_t*>(sP + row * LDS + col) = pack2<T>(p0, p1);
            *reinterpret_cast<uint32_t*>(sdS + row * LDS + col) = pack2<T>(g0, g1);
          }
        }
    }
    __syncthreads();

    // ---- dV += Pᵀ·dO, dK += dSᵀ·Q (BN x D; A = P / dS stored [query][key], read transposed) ----
    warp_gemm<T, KV_MT, KV_NT, BM / 16, true, true>(dv, sP, LDS, kv_m0, sdOb, LD, kv_n0, lane);
    warp_gemm<T, KV_MT, KV_NT, BM / 16, true, true>(dk, sdS, LDS, kv_m0, sQb, LD, kv_n0, lane);

    // ---- dQ += dS·K (BM x D) by fp32 atomics ----
    if constexpr (ATOMIC_DQ) {
      float dq[Q_MT][Q_NT][4];
      zero(dq);
      warp_gemm<T, Q_MT, Q_NT, BN / 16, false, true>(dq, sdS, LDS, q_m0, sK, LD, q_n0, lane);
      const int64_t ld_acc = p.H * D;
      float* accg = p.dq_acc + (b * Lq * p.H + h) * D;
#pragma unroll
      for (int mi = 0; mi < Q_MT; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t row = q0 + q_m0 + mi * 16 + c_row(lane, 2 * r);
          if (row >= Lq) continue;
          float* dst = accg + row * ld_acc + q_n0 + c_col(lane, 0);
#pragma unroll
          for (int ni = 0; ni < Q_NT; ++ni) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            atomicAdd(reinterpret_cast<float2*>(dst + ni * 8), make_float2(dq[mi][ni][2 * r], dq[mi][ni][2 * r + 1]));
#else
            atomicAdd(dst + ni * 8, dq[mi][ni][2 * r]);
            atomicAdd(dst + ni * 8 + 1, dq[mi][ni][2 * r + 1]);
#endif
          }
        }
    }
  }

  // ---- epilogue: dK·scale and dV through shared memory (the Q / dO buffers) ----
  __syncthreads();  // all reads of the operand tiles are done (no cp.async is pending)
  uint16_t* stK = sQ;   // [BN][LD] inside Q[2][BM][LD]
  uint16_t* stV = sdO;  // [BN][LD] inside dO[2][BM][LD]
#pragma unroll
  for (int mi = 0; mi < KV_MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < KV_NT; ++ni)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = kv_m0 + mi * 16 + c_row(lane, 2 * r);
        const int col = kv_n0 + ni * 8 + c_col(lane, 0);
        *reinterpret_cast<uint32_t*>(stK + row * LD + col) =
            pack2<T>(dk[mi][ni][2 * r] * p.scale, dk[mi][ni][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(stV + row * LD + col) = pack2<T>(dv[mi][ni][2 * r], dv[mi][ni][2 * r + 1]);
      }
  __syncthreads();
  constexpr int CPR = D / 8;
  static_assert(BN * CPR % NTH == 0, "dkdv: epilogue thread mapping");
  const int64_t ld_g = p.H * D;
  uint16_t* dkg = p.dk + (b * Lk * p.H + h) * D;
  uint16_t* dvg = p.dv + (b * Lk * p.H + h) * D;
#pragma unroll
  for (int it = 0; it < BN * CPR / NTH; ++it) {
    const int c = tid + it * NTH;
    const int r = c / CPR, cc = c % CPR;
    if (n0 + r < Lk) {
      *reinterpret_cast<uint4*>(dkg + (n0 + r) * ld_g + cc * 8) = *reinterpret_cast<const uint4*>(stK + r * LD + cc * 8);
      *reinterpret_cast<uint4*>(dvg + (n0 + r) * ld_g + cc * 8) = *reinterpret_cast<const uint4*>(stV + r * LD + cc * 8);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward dQ without atomics (deterministic), bf16 / fp16
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(DqCfg<D>::kWarps * 32, DqCfg<D>::kMinBlocks)
    joint_attention_bwd_dq_kernel(const BwdParams p) {
  using C = DqCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, NTH = C::kWarps * 32, LD = D + kPad;
  static_assert(BM == 16 * C::kWarps, "dq: 16 query rows per warp");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);  // [BM][LD]
  uint16_t* sdO = sQ + BM * LD;                           // [BM][LD]
  uint16_t* sK = sdO + BM * LD;                           // [2][BN][LD]
  uint16_t* sV = sK + 2 * BN * LD;                        // [2][BN][LD]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t Lq = p.Lq, Lk = p.Lk;
  const int64_t bh = b * p.H + h;
  const uint16_t* qg = p.q + b * p.qs[0] + h * p.qs[1];
  const uint16_t* kg = p.k + b * p.ks[0] + h * p.ks[1];
  const uint16_t* vg = p.v + b * p.vs[0] + h * p.vs[1];
  const uint16_t* dog = p.dout + b * p.dos[0] + h * p.dos[1];
  const int nkb = static_cast<int>((Lk + BN - 1) / BN);

  load_rows_async<BM, D, NTH>(sQ, qg, p.qs[2], m0, Lq, tid);
  load_rows_async<BM, D, NTH>(sdO, dog, p.dos[2], m0, Lq, tid);
  load_rows_async<BN, D, NTH>(sK, kg, p.ks[2], 0, Lk, tid);
  load_rows_async<BN, D, NTH>(sV, vg, p.vs[2], 0, Lk, tid);
  cp_async_commit();

  float lse2[2], del[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = m0 + warp * 16 + c_row(lane, 2 * r);
    const bool ok = row < Lq;
    lse2[r] = ok ? p.lse[bh * Lq + row] * kLog2e : 0.f;
    del[r] = ok ? p.delta[bh * Lq + row] : 0.f;
  }
  const uint16_t* sQw = sQ + warp * 16 * LD;
  const uint16_t* sdOw = sdO + warp * 16 * LD;
  float dq[1][D / 8][4];
  zero(dq);
  const float sl2 = p.scale_log2;

  for (int j = 0; j < nkb; ++j) {
    const int buf = j & 1;
    cp_async_wait_all();
    __syncthreads();
    if (j + 1 < nkb) {
      load_rows_async<BN, D, NTH>(sK + (buf ^ 1) * BN * LD, kg, p.ks[2], int64_t{j + 1} * BN, Lk, tid);
      load_rows_async<BN, D, NTH>(sV + (buf ^ 1) * BN * LD, vg, p.vs[2], int64_t{j + 1} * BN, Lk, tid);
    }
    cp_async_commit();
    const uint16_t* sKb = sK + buf * BN * LD;
    const uint16_t* sVb = sV + buf * BN * LD;

    float s[1][BN / 8][4], dp[1][BN / 8][4];
    zero(s);
    zero(dp);
    warp_gemm<T, 1, BN / 8, D / 16, false, false>(s, sQw, LD, 0, sKb, LD, 0, lane);
    warp_gemm<T, 1, BN / 8, D / 16, false, false>(dp, sdOw, LD, 0, sVb, LD, 0, lane);
    const int64_t n0 = int64_t{j} * BN;
    const bool tail = n0 + BN > Lk;
#pragma unroll
    for (int ni = 0; ni < BN / 8; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pr = prob_from_lse(s[0][ni][e] * sl2, lse2[e >> 1]);
        if (tail && n0 + ni * 8 + c_col(lane, e) >= Lk) pr = 0.f;
        s[0][ni][e] = grad_score(pr, dp[0][ni][e], del[e >> 1]);  // dS
      }
    // ---- dQ += dS·K (K stored [key][d]: B read transposed) ----
    warp_gemm_areg<T, 1, D / 8, BN / 16>(dq, s, sKb, LD, lane);
  }

  const float mul[2] = {p.scale, p.scale};
  store_warp_rows<T, D>(dq[0], mul, sQ + warp * 16 * LD, p.dq + (b * Lq * p.H + h) * D, p.H * D,
                        m0 + warp * 16, Lq, lane);
}

// ---------------------------------------------------------------------------------------------
// CUDA-core fallback (fp32, a test path): one warp per row, lane l holds channels l + 32·c
// ---------------------------------------------------------------------------------------------
constexpr int kFbMaxD = 256;
constexpr int kFbPer = kFbMaxD / 32;

struct FbParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  int64_t qs[3], ks[3], vs[3], dos[3];
  const float* lse;    // natural log (B, H, Lq)
  const float* delta;  // (B, H, Lq)
  void* out;          // (B, L, H, D) contiguous: out (forward), dq, or dk
  void* out2;         // dv
  float* lse_out;
  int64_t B, H, Lq, Lk, D;
  float scale;
};

template <typename T, typename A>
__device__ __forceinline__ void fb_load_row(A (&x)[kFbPer], const T* src, int64_t D, int lane) {
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) {
    const int64_t d = lane + 32 * c;
    x[c] = d < D ? static_cast<A>(src[d]) : A(0);
  }
}
template <typename T, typename A>
__device__ __forceinline__ A fb_dot(const A (&x)[kFbPer], const T* src, int64_t D, int lane) {
  A acc = A(0);
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) acc += x[c] * static_cast<A>(src[d]);
  }
  return warp_sum(acc);
}
template <typename T, typename A>
__device__ __forceinline__ void fb_store_row(T* dst, const A (&x)[kFbPer], A mul, int64_t D, int lane) {
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) dst[d] = static_cast<T>(x[c] * mul);
  }
}

// Forward: online softmax over one key at a time.
__global__ void __launch_bounds__(256) joint_attention_fwd_fallback_kernel(const FbParams p) {
  using T = float;
  using A = float;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= p.B * p.H * p.Lq) return;
  const int64_t i = row % p.Lq, bh = row / p.Lq, h = bh % p.H, b = bh / p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
  const T* k = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* v = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];
  A qv[kFbPer], acc[kFbPer];
  fb_load_row(qv, q, p.D, lane);
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) acc[c] = A(0);
  const A sl2 = static_cast<A>(p.scale) * kLog2e;
  A m = -INFINITY, l = A(0);
  for (int64_t j = 0; j < p.Lk; ++j) {
    const A s2 = fb_dot(qv, k + j * p.ks[2], p.D, lane) * sl2;
    const A m_new = s2 > m ? s2 : m;
    const A alpha = rescale(m, m_new);
    const A pr = prob(s2, m_new);
    m = m_new;
    l = l * alpha + pr;
    const T* vr = v + j * p.vs[2];
#pragma unroll
    for (int c = 0; c < kFbPer; ++c) {
      const int64_t d = lane + 32 * c;
      acc[c] = acc[c] * alpha + (d < p.D ? pr * static_cast<A>(vr[d]) : A(0));
    }
  }
  T* out = static_cast<T*>(p.out) + ((b * p.Lq + i) * p.H + h) * p.D;
  fb_store_row(out, acc, A(1) / l, p.D, lane);
  if (lane == 0) p.lse_out[row] = static_cast<float>(lse_natural(m, l));
}

// dQ: one warp per query row, one key at a time.
__global__ void __launch_bounds__(256) joint_attention_bwd_dq_fallback_kernel(const FbParams p) {
  using T = float;
  using A = float;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= p.B * p.H * p.Lq) return;
  const int64_t i = row % p.Lq, bh = row / p.Lq, h = bh % p.H, b = bh / p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
  const T* dout = static_cast<const T*>(p.dout) + b * p.dos[0] + h * p.dos[1] + i * p.dos[2];
  const T* k = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* v = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];
  A qv[kFbPer], dov[kFbPer], acc[kFbPer];
  fb_load_row(qv, q, p.D, lane);
  fb_load_row(dov, dout, p.D, lane);
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) acc[c] = A(0);
  const A sl2 = static_cast<A>(p.scale) * kLog2e;
  const A lse2 = static_cast<A>(p.lse[row]) * kLog2e;
  const A del = p.delta[row];
  for (int64_t j = 0; j < p.Lk; ++j) {
    const T* kr = k + j * p.ks[2];
    const A pr = prob_from_lse(fb_dot(qv, kr, p.D, lane) * sl2, lse2);
    const A ds = grad_score(pr, fb_dot(dov, v + j * p.vs[2], p.D, lane), del);
#pragma unroll
    for (int c = 0; c < kFbPer; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < p.D) acc[c] += ds * static_cast<A>(kr[d]);
    }
  }
  T* dq = static_cast<T*>(p.out) + ((b * p.Lq + i) * p.H + h) * p.D;
  fb_store_row(dq, acc, static_cast<A>(p.scale), p.D, lane);
}

// dK, dV: one warp per key row, one query at a time.
__global__ void __launch_bounds__(256) joint_attention_bwd_dkdv_fallback_kernel(const FbParams p) {
  using T = float;
  using A = float;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= p.B * p.H * p.Lk) return;
  const int64_t j = row % p.Lk, bh = row / p.Lk, h = bh % p.H, b = bh / p.H;
  const T* kr = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1] + j * p.ks[2];
  const T* vr = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1] + j * p.vs[2];
  const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.dos[0] + h * p.dos[1];
  const float* lse = p.lse + bh * p.Lq;
  const A* delta = p.delta + bh * p.Lq;
  A kv[kFbPer], vv[kFbPer], dk[kFbPer], dv[kFbPer];
  fb_load_row(kv, kr, p.D, lane);
  fb_load_row(vv, vr, p.D, lane);
#pragma unroll
  for (int c = 0; c < kFbPer; ++c) dk[c] = dv[c] = A(0);
  const A sl2 = static_cast<A>(p.scale) * kLog2e;
  for (int64_t i = 0; i < p.Lq; ++i) {
    const T* qr = q + i * p.qs[2];
    const T* dor = dout + i * p.dos[2];
    const A pr = prob_from_lse(fb_dot(kv, qr, p.D, lane) * sl2, static_cast<A>(lse[i]) * kLog2e);
    const A ds = grad_score(pr, fb_dot(vv, dor, p.D, lane), delta[i]);
#pragma unroll
    for (int c = 0; c < kFbPer; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < p.D) {
        dv[c] += pr * static_cast<A>(dor[d]);
        dk[c] += ds * static_cast<A>(qr[d]);
      }
    }
  }
  const int64_t o = ((b * p.Lk + j) * p.H + h) * p.D;
  fb_store_row(static_cast<T*>(p.out) + o, dk, static_cast<A>(p.scale), p.D, lane);
  fb_store_row(static_cast<T*>(p.out2) + o, dv, A(1), p.D, lane);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The shapes, dtypes and devices are checked by checks::attention (csrc/common/checks.h).
void check_cuda_dtype(const char* op, const at::Tensor& q) {
  const auto st = q.scalar_type();
  TORCH_CHECK(q.is_cuda(), op, " (CUDA): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, op,
              " (CUDA): q must be float16, bfloat16 or float32 (the fp32 test path), got ", st);
}

void check_tc_head_dim(const char* op, int64_t D, at::ScalarType st) {
  TORCH_CHECK(D == 64 || D == 128, op, " (CUDA): head dim D = ", D, " is not supported for ", st,
              " (the tensor-core kernels take D = 64 or 128)");
}

// t itself when its data pointer is 16-byte aligned and its (b, h, l) strides are multiples of 8
// elements (16 bytes) - what the 16-byte cp.async tile copies need - else a contiguous copy.
at::Tensor tc_operand(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i)
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) ok = false;
  if (ok) return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

void copy_strides3(const at::Tensor& t, int64_t (&s)[3]) {
  for (int i = 0; i < 3; ++i) s[i] = t.stride(i);
}

dim3 grid3(int64_t blocks, int64_t H, int64_t B, const char* op) {
  TORCH_CHECK(blocks <= INT32_MAX && H <= 65535 && B <= 65535, op, " (CUDA): problem too large (blocks ", blocks,
              ", heads ", H, ", batch ", B, ")");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(H), static_cast<unsigned>(B));
}

// Opts the kernel in to `bytes` of dynamic shared memory (> 48 KiB needs it), after checking the
// device allows that much per block (sm_80: 163 KiB, sm_90: 227 KiB; sm_86/89 only 99 KiB).
template <class Kernel>
void set_smem(Kernel kernel, int bytes, const char* op) {
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= optin, op, " (CUDA): the kernel needs ", bytes, " bytes of shared memory per block, the device allows ",
              optin, " (the bf16/fp16 kernels target sm_80 / sm_90)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

inline const uint16_t* u16(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* u16m(const at::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); }

template <typename T, int D>
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out,
                at::Tensor& lse, cudaStream_t stream) {
  using C = FwdCfg<D>;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  FwdParams p{};
  p.q = u16(q);
  p.k = u16(k);
  p.v = u16(v);
  copy_strides3(q, p.qs);
  copy_strides3(k, p.ks);
  copy_strides3(v, p.vs);
  p.out = u16m(out);
  p.lse = lse.data_ptr<float>();
  p.H = H;
  p.Lq = Lq;
  p.Lk = Lk;
  p.scale_log2 = score_scale_log2(static_cast<float>(scale));
  const dim3 grid = grid3(ceil_div(Lq, C::BM), H, B, "cogvx::joint_attention");
  auto kernel = joint_attention_fwd_kernel<T, D>;
  constexpr int smem = fwd_smem_bytes<D>();
  set_smem(kernel, smem, "cogvx::joint_attention");
  kernel<<<grid, C::kWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_bwd(const BwdParams& p, int64_t B, bool deterministic, cudaStream_t stream) {
  const char* op = "cogvx::joint_attention_backward";
  {
    using C = DkdvCfg<D>;
    const dim3 grid = grid3(ceil_div(p.Lk, C::BN), p.H, B, op);
    constexpr int smem = dkdv_smem_bytes<D>();
    if (deterministic) {
      auto kernel = joint_attention_bwd_dkdv_kernel<T, D, false>;
      set_smem(kernel, smem, op);
      kernel<<<grid, C::kWarps * 32, smem, stream>>>(p);
    } else {
      auto kernel = joint_attention_bwd_dkdv_kernel<T, D, true>;
      set_smem(kernel, smem, op);
      kernel<<<grid, C::kWarps * 32, smem, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (deterministic) {
    using C = DqCfg<D>;
    const dim3 grid = grid3(ceil_div(p.Lq, C::BM), p.H, B, op);
    constexpr int smem = dq_smem_bytes<D>();
    auto kernel = joint_attention_bwd_dq_kernel<T, D>;
    set_smem(kernel, smem, op);
    kernel<<<grid, C::kWarps * 32, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

unsigned fallback_blocks(int64_t rows, const char* op) {
  const int64_t blocks = ceil_div(rows, 8);
  TORCH_CHECK(blocks <= INT32_MAX, op, " (CUDA): problem too large");
  return static_cast<unsigned>(blocks);
}

std::tuple<at::Tensor, at::Tensor> joint_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, double scale) {
  constexpr const char* op = "cogvx::joint_attention";
  checks::attention::qkv(op, q, k, v);
  check_cuda_dtype(op, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Lq, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  TORCH_CHECK(Lk > 0, op, ": k and v must hold at least one key (Lk = 0)");
  if (D == 0) {  // softmax over zero scores: uniform weights of nothing
    lse.fill_(std::log(static_cast<double>(Lk)));
    return {out, lse};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto st = q.scalar_type();
  if (st == at::kHalf || st == at::kBFloat16) {
    check_tc_head_dim(op, D, st);
    const at::Tensor q_ = tc_operand(q), k_ = tc_operand(k), v_ = tc_operand(v);
    AT_DISPATCH_SWITCH(st, "joint_attention_cuda", AT_DISPATCH_CASE(at::kHalf, [&] {
                         if (D == 64) launch_fwd<scalar_t, 64>(q_, k_, v_, scale, out, lse, stream);
                         else launch_fwd<scalar_t, 128>(q_, k_, v_, scale, out, lse, stream);
                       }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                         if (D == 64) launch_fwd<scalar_t, 64>(q_, k_, v_, scale, out, lse, stream);
                         else launch_fwd<scalar_t, 128>(q_, k_, v_, scale, out, lse, stream);
                       }));
    return {out, lse};
  }
  TORCH_CHECK(D <= kFbMaxD, op, " (CUDA): head dim D = ", D, " exceeds ", kFbMaxD, " for ", st);
  FbParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides3(q, p.qs);
  copy_strides3(k, p.ks);
  copy_strides3(v, p.vs);
  p.out = out.data_ptr();
  p.lse_out = lse.data_ptr<float>();
  p.B = B;
  p.H = H;
  p.Lq = Lq;
  p.Lk = Lk;
  p.D = D;
  p.scale = static_cast<float>(scale);
  joint_attention_fwd_fallback_kernel<<<fallback_blocks(B * H * Lq, op), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& grad_lse_in, double scale, bool deterministic) {
  constexpr const char* op = "cogvx::joint_attention_backward";
  checks::attention::backward_args(op, grad_out, q, k, v, out, lse_in, grad_lse_in);
  check_cuda_dtype(op, q);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  at::Tensor grad_lse;
  if (grad_lse_in && grad_lse_in->defined()) {
    grad_lse = grad_lse_in->to(at::kFloat).contiguous();
  }
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
  const auto st = q.scalar_type();
  const bool tc = st == at::kHalf || st == at::kBFloat16;
  if (tc) check_tc_head_dim(op, D, st);
  else TORCH_CHECK(D <= kFbMaxD, op, " (CUDA): head dim D = ", D, " exceeds ", kFbMaxD, " for ", st);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // ---- delta = rowsum(dO∘O) − grad_lse ----
  const at::Tensor delta = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  {
    const int64_t rows = B * H * Lq;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, 8), sms * 16));
    const float* gl = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
    COGVX_DISPATCH_FLOAT_HALF_BF16(st, "joint_attention_bwd_delta", [&] {
      joint_attention_bwd_delta_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
          out.data_ptr<scalar_t>(), out.stride(0), out.stride(1), out.stride(2), gl, delta.data_ptr<float>(), H, Lq, D,
          rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  if (tc) {
    const at::Tensor q_ = tc_operand(q), k_ = tc_operand(k), v_ = tc_operand(v), do_ = tc_operand(grad_out);
    at::Tensor dq_acc;
    if (!deterministic) dq_acc = at::zeros({B, Lq, H, D}, q.options().dtype(at::kFloat));
    BwdParams p{};
    p.q = u16(q_);
    p.k = u16(k_);
    p.v = u16(v_);
    p.dout = u16(do_);
    copy_strides3(q_, p.qs);
    copy_strides3(k_, p.ks);
    copy_strides3(v_, p.vs);
    copy_strides3(do_, p.dos);
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = u16m(dq);
    p.dk = u16m(dk);
    p.dv = u16m(dv);
    p.dq_acc = deterministic ? nullptr : dq_acc.data_ptr<float>();
    p.H = H;
    p.Lq = Lq;
    p.Lk = Lk;
    p.scale = static_cast<float>(scale);
    p.scale_log2 = score_scale_log2(static_cast<float>(scale));
    AT_DISPATCH_SWITCH(st, "joint_attention_backward_cuda", AT_DISPATCH_CASE(at::kHalf, [&] {
                         if (D == 64) launch_bwd<scalar_t, 64>(p, B, deterministic, stream);
                         else launch_bwd<scalar_t, 128>(p, B, deterministic, stream);
                       }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                         if (D == 64) launch_bwd<scalar_t, 64>(p, B, deterministic, stream);
                         else launch_bwd<scalar_t, 128>(p, B, deterministic, stream);
                       }));
    if (!deterministic) {
      // dq (B, Lq, H, D) contiguous underneath its transposed view
      dq.transpose(1, 2).copy_(dq_acc.mul_(scale));
    }
    return {dq, dk, dv};
  }

  FbParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = grad_out.data_ptr();
  copy_strides3(q, p.qs);
  copy_strides3(k, p.ks);
  copy_strides3(v, p.vs);
  copy_strides3(grad_out, p.dos);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.B = B;
  p.H = H;
  p.Lq = Lq;
  p.Lk = Lk;
  p.D = D;
  p.scale = static_cast<float>(scale);
  p.out = dq.data_ptr();
  joint_attention_bwd_dq_fallback_kernel<<<fallback_blocks(B * H * Lq, op), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.out = dk.data_ptr();
  p.out2 = dv.data_ptr();
  joint_attention_bwd_dkdv_fallback_kernel<<<fallback_blocks(B * H * Lk, op), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

// Shared memory per block of the bf16/fp16 kernels at head dim D (64 or 128): forward, backward
// dK/dV, backward dQ (deterministic path). Read by ops.cpp into cogvx_kernels._C.cuda_smem.
void smem_bytes(int D, int (&out)[3]) {
  out[0] = D == 64 ? fwd_smem_bytes<64>() : fwd_smem_bytes<128>();
  out[1] = D == 64 ? dkdv_smem_bytes<64>() : dkdv_smem_bytes<128>();
  out[2] = D == 64 ? dq_smem_bytes<64>() : dq_smem_bytes<128>();
}

}  // namespace gpu
}  // namespace attention
}  // namespace cogvx

TORCH_LIBRARY_IMPL(cogvx, CUDA, m) {
  m.impl("joint_attention", &cogvx::attention::gpu::joint_attention_cuda);
  m.impl("joint_attention_backward", &cogvx::attention::gpu::joint_attention_backward_cuda);
}

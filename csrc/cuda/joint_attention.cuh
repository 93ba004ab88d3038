// Device building blocks of the bf16/fp16 joint-attention kernels (fragment layouts, PTX wrappers,
// tile copies, warp GEMMs, epilogue) and the host helpers of their launchers. The design:
// csrc/cuda/joint_attention.h.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "common/attention.h"
#include "cuda/joint_attention.h"
#include "cuda/mma.cuh"

namespace cogvx {
namespace attention {
namespace gpu {

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
// Host side of the launchers
// ---------------------------------------------------------------------------------------------
inline dim3 grid3(int64_t blocks, int64_t H, int64_t B, const char* op) {
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

// Launches a tensor-core kernel: `blocks` row blocks × heads × batch, `smem` bytes of dynamic shared
// memory per block.
template <class Kernel, class Params>
void launch_tc(Kernel kernel, int64_t blocks, int threads, int smem, const Params& p, int64_t B, cudaStream_t stream,
               const char* op) {
  const dim3 grid = grid3(blocks, p.H, B, op);
  set_smem(kernel, smem, op);
  kernel<<<grid, threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gpu
}  // namespace attention
}  // namespace cogvx

// Joint-attention forward, bf16 / fp16 (tensor cores): csrc/cuda/joint_attention.h.
#include "cuda/joint_attention.cuh"

namespace cogvx {
namespace attention {
namespace gpu {

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

void launch_fwd(const FwdParams& p, at::ScalarType st, int64_t D, int64_t B, cudaStream_t stream) {
  dispatch_tc(st, D, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int kD = decltype(d)::value;
    using C = FwdCfg<kD>;
    launch_tc(joint_attention_fwd_kernel<T, kD>, ceil_div(p.Lq, C::BM), C::kWarps * 32, fwd_smem_bytes<kD>(), p, B,
              stream, "cogvx::joint_attention");
  });
}

}  // namespace gpu
}  // namespace attention
}  // namespace cogvx

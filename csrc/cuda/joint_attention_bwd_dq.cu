// Joint-attention backward: dQ without atomics (the deterministic path), bf16 / fp16 (tensor cores):
// csrc/cuda/joint_attention.h.
#include "cuda/joint_attention.cuh"

namespace cogvx {
namespace attention {
namespace gpu {

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

void launch_bwd_dq(const BwdParams& p, at::ScalarType st, int64_t D, int64_t B, cudaStream_t stream) {
  dispatch_tc(st, D, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int kD = decltype(d)::value;
    using C = DqCfg<kD>;
    launch_tc(joint_attention_bwd_dq_kernel<T, kD>, ceil_div(p.Lq, C::BM), C::kWarps * 32, dq_smem_bytes<kD>(), p, B,
              stream, "cogvx::joint_attention_backward");
  });
}

}  // namespace gpu
}  // namespace attention
}  // namespace cogvx

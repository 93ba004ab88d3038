// Joint-attention backward: the delta preprocess (every dtype) and the dK / dV kernel (+ atomic dQ),
// bf16 / fp16 (tensor cores): csrc/cuda/joint_attention.h.
#include <algorithm>

#include "common/dispatch.h"
#include "cuda/joint_attention.cuh"

namespace cogvx {
namespace attention {
namespace gpu {

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

void launch_bwd_delta(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& grad_lse,
                      const at::Tensor& delta, cudaStream_t stream) {
  const int64_t H = out.size(1), Lq = out.size(2), D = out.size(3), rows = out.size(0) * H * Lq;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, 8), sms * 16));
  const float* gl = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
  COGVX_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "joint_attention_bwd_delta", [&] {
    joint_attention_bwd_delta_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        out.data_ptr<scalar_t>(), out.stride(0), out.stride(1), out.stride(2), gl, delta.data_ptr<float>(), H, Lq, D,
        rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_bwd_dkdv(const BwdParams& p, at::ScalarType st, int64_t D, int64_t B, bool atomic_dq,
                     cudaStream_t stream) {
  dispatch_tc(st, D, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int kD = decltype(d)::value;
    using C = DkdvCfg<kD>;
    launch_tc(atomic_dq ? joint_attention_bwd_dkdv_kernel<T, kD, true> : joint_attention_bwd_dkdv_kernel<T, kD, false>,
              ceil_div(p.Lk, C::BN), C::kWarps * 32, dkdv_smem_bytes<kD>(), p, B, stream,
              "cogvx::joint_attention_backward");
  });
}

}  // namespace gpu
}  // namespace attention
}  // namespace cogvx

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
//
// Files, split by kernel family (they compile in parallel):
//   joint_attention.h            this header: tile configurations, shared memory, kernel parameters,
//                                the launchers of the kernel files (host and device code include it)
//   joint_attention.cuh          device building blocks of the kernels (PTX wrappers, warp GEMMs)
//   joint_attention_fwd.cu       forward, bf16 / fp16
//   joint_attention_bwd_dkdv.cu  backward: delta (every dtype), dK / dV (+ atomic dQ), bf16 / fp16
//   joint_attention_bwd_dq.cu    backward: dQ without atomics (deterministic), bf16 / fp16
//   joint_attention_fp32.cu      fp32 fallback, forward and backward
//   joint_attention.cpp          the entry points: checks, outputs, operand layout, kernel choice
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

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

// Shared memory per block of the bf16/fp16 kernels at head dim D (64 or 128): forward, backward
// dK/dV, backward dQ (deterministic path). Read by ops.cpp into cogvx_kernels._C.cuda_smem.
inline void smem_bytes(int D, int (&out)[3]) {
  out[0] = D == 64 ? fwd_smem_bytes<64>() : fwd_smem_bytes<128>();
  out[1] = D == 64 ? dkdv_smem_bytes<64>() : dkdv_smem_bytes<128>();
  out[2] = D == 64 ? dq_smem_bytes<64>() : dq_smem_bytes<128>();
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

// fp32 fallback: one warp per row, lane l holds channels l + 32·c, so D <= kFbMaxD.
constexpr int kFbMaxD = 256;

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

// Calls f(T{}, std::integral_constant<int, D>{}) for the tensor-core kernels' dtype st (float16,
// bfloat16) and head dim D (64, 128).
template <class F>
void dispatch_tc(at::ScalarType st, int64_t D, const F& f) {
  const auto by_dim = [&](auto t) {
    if (D == 64) f(t, std::integral_constant<int, 64>{});
    else f(t, std::integral_constant<int, 128>{});
  };
  if (st == at::kHalf) by_dim(c10::Half{});
  else by_dim(c10::BFloat16{});
}

// Launchers (B: the batch; the rest of the problem is in the parameters).
void launch_fwd(const FwdParams& p, at::ScalarType st, int64_t D, int64_t B, cudaStream_t stream);
// delta = rowsum(grad_out∘out) − grad_lse (undefined: 0), fp32 (B, H, Lq) contiguous; any dtype.
void launch_bwd_delta(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& grad_lse,
                      const at::Tensor& delta, cudaStream_t stream);
void launch_bwd_dkdv(const BwdParams& p, at::ScalarType st, int64_t D, int64_t B, bool atomic_dq,
                     cudaStream_t stream);
void launch_bwd_dq(const BwdParams& p, at::ScalarType st, int64_t D, int64_t B, cudaStream_t stream);
void launch_fp32_fwd(const FbParams& p, cudaStream_t stream);
void launch_fp32_bwd(FbParams p, void* dq, void* dk, void* dv, cudaStream_t stream);

}  // namespace gpu
}  // namespace attention
}  // namespace cogvx

"""Triton flash attention of CogVideoX's joint (text + video) attention, forward and backward.

Semantics (ground truth: ``cogvx_kernels.reference.joint_attention``; numerics:
``csrc/common/attention.h``): q (B, heads, Lq, D), k / v (B, heads, Lk, D), non-causal

    out = softmax(q·kᵀ·scale)·v,   lse = logsumexp(q·kᵀ·scale) (natural log, fp32 (B, heads, Lq))

for any Lq, Lk >= 1 (Lq may differ from Lk), D in {16, 32, 64, 128} (64 and 128 are CogVideoX's),
fp16 / bf16 (and fp32, for tests). Inputs may have any strides with a unit last-dim stride (the
head-split view (B, L, heads, D).transpose(1, 2) is read in place); out, dq, dk, dv are allocated
with the memory layout (B, L, heads, D) and returned as the (B, heads, L, D) view.

Method (FlashAttention-2): nothing of size L × L is ever stored.

* forward (``attn_fwd_kernel``): a program owns BLOCK_M query rows of one (batch, head) and loops
  over the keys in BLOCK_N blocks, keeping the online-softmax statistics in base 2 (scores
  s2 = q·k · scale·log2 e, one exp2 per score): running max m, running sum l and an fp32
  accumulator, rescaled by exp2(m_old - m_new) when the max moves. P is cast to v's dtype (bf16
  stays bf16) for the P·V tensor-core dot, accumulated in fp32. At the end out = acc / l and
  lse = (m + log2 l)·ln 2. The keys are visited as whole blocks without masks, then one masked
  tail block (scores of keys >= Lk set to -inf) when BLOCK_N does not divide Lk; the query tail is
  handled by masked loads / stores. Huge logits are safe: every exponent is <= 0.
* backward (recomputation from the saved lse, three kernels, all deterministic):
  1. ``attn_bwd_preprocess_kernel``: delta = rowsum(dO∘O) in fp32, minus grad_lse (the gradient
     reaching the lse output, e.g. from ring attention) when given.
  2. ``attn_bwd_dkdv_kernel``: a program owns BLOCK_N keys (k, v tiles held for the whole loop)
     and loops over the query blocks, in the transposed orientation (the keys are the MMA rows):
     sᵀ = k·qᵀ, pᵀ = exp2(sᵀ·scale·log2 e - lse·log2 e), dV += pᵀ·dO, dPᵀ = v·dOᵀ,
     dSᵀ = pᵀ∘(dPᵀ - delta), dK += dSᵀ·q; dK is scaled by `scale` at the end. Padded query rows
     load lse = +inf, so their p is exactly 0 (no masking in the math).
  3. ``attn_bwd_dq_kernel``: a program owns BLOCK_M queries (q, dO, lse, delta held) and loops
     over the key blocks: p, dP = dO·vᵀ, dS = p∘(dP - delta), dQ += dS·k, scaled at the end.
  dQ by its own kernel costs two extra matmuls (7 instead of 5) but needs no atomics and no fp32
  workspace, and gives bit-reproducible gradients; ``deterministic`` is accepted for the contract
  of the op but both values take this path (an fp32-atomic dQ variant could not be benchmarked
  without a GPU, so it was not adopted).

Offsets: batch and head offsets and the per-block row offsets are int64 scalars; in-tile offsets
(rows of one block × stride + channel) are int32. The launchers call ``_unit_last`` (a copy only
when the last-dim stride is not 1).

Configs: on GPUs, the dot kernels are wrapped lazily (first call) in ``triton.autotune`` over a
small per-arch table (``_CONFIGS``: sm_90 for compute capability 9.x, sm_80 for the rest), keyed
by a power-of-two bucket of Lq and Lk (``tune_lq`` / ``tune_lk``, arguments the kernels ignore),
D and, implicitly, the dtype. Every 16-bit config of the tables is listed by ``aot_specs()`` and
compiles without spills to mma.sync (sm_80) / wgmma (sm_90). fp32 uses TF32 tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is set (like torch.matmul), IEEE otherwise.

Interpreter (TRITON_INTERPRET=1, CPU tensors; @triton.autotune cannot run there): the raw jit
kernels with one small fixed config (``_INTERPRET``), the dot operands upcast to fp32 (the
interpreter mishandles bf16 dots; P is first rounded to v's dtype, so the numerics match the GPU's)
and an explicit round-to-nearest-even before bf16 conversions (the interpreter truncates).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreted

__all__ = ["forward", "backward", "aot_specs"]

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(LOG2E)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

# Triton's interpreter converts fp32 to bf16 by truncation where GPUs round to nearest even: under
# the interpreter the kernels round to bf16 precision explicitly first. Folded away when compiled.
_INTERPRET_RTNE_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _cvt(x, ty: tl.constexpr):
    """x (fp32) converted to `ty`, rounding to nearest even."""
    if _INTERPRET_RTNE_BF16:
        if ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(ty)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a·b (fp32 accumulation); DOT_FP32 (interpreter): operands upcast to fp32 first."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_ptr, v_ptr, k_off, v_off, n_ok, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax: k / v tiles (BLOCK_N, D) at k_ptr + k_off / v_ptr +
    v_off; MASK: keys with n_ok False are read as 0 and their scores set to -inf."""
    if MASK:
        k = tl.load(k_ptr + k_off, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptr + v_off, mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + k_off)
        v = tl.load(v_ptr + v_off)
    s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, PRECISION)
    s = s * qk_scale
    if MASK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(_cvt(p, v.dtype), v, acc * alpha[:, None], DOT_FP32, PRECISION)
    return acc, l_i, m_new


@triton.jit
def attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
        NH, Lq, Lk, qk_scale, tune_lq, tune_lk,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """out / lse of BLOCK_M query rows of one (batch, head); grid (cdiv(Lq, BLOCK_M), B·heads).
    qk_scale = scale·log2 e. lse: (B, heads, Lq) contiguous. tune_lq / tune_lk: autotune keys only."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_ok = start_m + offs_m < Lq

    q = tl.load(q_ptr + (b * sqb + h * sqh + start_m.to(tl.int64) * sql) + (offs_m[:, None] * sql + offs_d[None, :]),
                mask=m_ok[:, None], other=0.0)
    k_base = k_ptr + (b * skb + h * skh)
    v_base = v_ptr + (b * svb + h * svh)
    k_off = offs_n[:, None] * skl + offs_d[None, :]
    v_off = offs_n[:, None] * svl + offs_d[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    n_full = Lk // BLOCK_N
    for j in range(0, n_full):
        n0 = tl.cast(j, tl.int64) * BLOCK_N
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base + n0 * skl, v_base + n0 * svl, k_off, v_off, offs_n,
                                  qk_scale, BLOCK_M, BLOCK_N, False, DOT_FP32, PRECISION)
    if n_full * BLOCK_N < Lk:
        n0 = tl.cast(n_full, tl.int64) * BLOCK_N
        n_ok = offs_n < Lk - n_full * BLOCK_N
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base + n0 * skl, v_base + n0 * svl, k_off, v_off, n_ok,
                                  qk_scale, BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)

    lse = (m_i + tl.math.log2(l_i)) * _LN2
    out = acc / l_i[:, None]
    tl.store(o_ptr + (b * sob + h * soh + start_m.to(tl.int64) * sol) + (offs_m[:, None] * sol + offs_d[None, :]),
             _cvt(out, o_ptr.dtype.element_ty), mask=m_ok[:, None])
    tl.store(lse_ptr + (bh.to(tl.int64) * Lq + start_m) + offs_m, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def attn_bwd_preprocess_kernel(
        o_ptr, do_ptr, glse_ptr, delta_ptr,
        sob, soh, sol, sdob, sdoh, sdol,
        NH, Lq,
        D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_GLSE: tl.constexpr):
    """delta = rowsum(dO∘O) (fp32) - grad_lse (when HAS_GLSE) of BLOCK_M rows of one (batch, head);
    grid (cdiv(Lq, BLOCK_M), B·heads). grad_lse / delta: (B, heads, Lq) contiguous fp32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_ok = start_m + offs_m < Lq
    row0 = start_m.to(tl.int64)
    o = tl.load(o_ptr + (b * sob + h * soh + row0 * sol) + (offs_m[:, None] * sol + offs_d[None, :]),
                mask=m_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + (b * sdob + h * sdoh + row0 * sdol) + (offs_m[:, None] * sdol + offs_d[None, :]),
                 mask=m_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_lin = bh.to(tl.int64) * Lq + start_m
    if HAS_GLSE:
        delta -= tl.load(glse_ptr + row_lin + offs_m, mask=m_ok, other=0.0)
    tl.store(delta_ptr + row_lin + offs_m, delta, mask=m_ok)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, q_off, do_off, offs_m, m_ok, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One query block of the dK / dV loop (transposed orientation: keys are the rows). MASK:
    query rows with m_ok False read q = dO = 0, delta = 0 and lse = +inf (so p = 0)."""
    if MASK:
        q = tl.load(q_ptr + q_off, mask=m_ok[:, None], other=0.0)
        do = tl.load(do_ptr + do_off, mask=m_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
    else:
        q = tl.load(q_ptr + q_off)
        do = tl.load(do_ptr + do_off)
        lse = tl.load(lse_ptr + offs_m)
        delta = tl.load(delta_ptr + offs_m)
    s_t = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_FP32, PRECISION)
    p_t = tl.math.exp2(s_t * qk_scale - (lse * _LOG2E)[None, :])
    dv = _dot(_cvt(p_t, do.dtype), do, dv, DOT_FP32, PRECISION)
    dp_t = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_FP32, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(_cvt(ds_t, q.dtype), q, dk, DOT_FP32, PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
        sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
        NH, Lq, Lk, qk_scale, sm_scale, tune_lq, tune_lk,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """dK / dV of BLOCK_N keys of one (batch, head), looping over all query blocks; grid
    (cdiv(Lk, BLOCK_N), B·heads). lse / delta: (B, heads, Lq) contiguous fp32 (natural-log lse)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_ok = start_n + offs_n < Lk
    row_n = start_n.to(tl.int64)
    k = tl.load(k_ptr + (b * skb + h * skh + row_n * skl) + (offs_n[:, None] * skl + offs_d[None, :]),
                mask=n_ok[:, None], other=0.0)
    v = tl.load(v_ptr + (b * svb + h * svh + row_n * svl) + (offs_n[:, None] * svl + offs_d[None, :]),
                mask=n_ok[:, None], other=0.0)
    q_base = q_ptr + (b * sqb + h * sqh)
    do_base = do_ptr + (b * sdob + h * sdoh)
    stat_base = bh.to(tl.int64) * Lq
    q_off = offs_m[:, None] * sql + offs_d[None, :]
    do_off = offs_m[:, None] * sdol + offs_d[None, :]

    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    m_full = Lq // BLOCK_M
    for i in range(0, m_full):
        m0 = tl.cast(i, tl.int64) * BLOCK_M
        dk, dv = _dkdv_step(dk, dv, k, v, q_base + m0 * sql, do_base + m0 * sdol, lse_ptr + (stat_base + m0),
                            delta_ptr + (stat_base + m0), q_off, do_off, offs_m, offs_m, qk_scale,
                            BLOCK_M, BLOCK_N, False, DOT_FP32, PRECISION)
    if m_full * BLOCK_M < Lq:
        m0 = tl.cast(m_full, tl.int64) * BLOCK_M
        m_ok = offs_m < Lq - m_full * BLOCK_M
        dk, dv = _dkdv_step(dk, dv, k, v, q_base + m0 * sql, do_base + m0 * sdol, lse_ptr + (stat_base + m0),
                            delta_ptr + (stat_base + m0), q_off, do_off, offs_m, m_ok, qk_scale,
                            BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)
    dk = dk * sm_scale
    tl.store(dk_ptr + (b * sdkb + h * sdkh + row_n * sdkl) + (offs_n[:, None] * sdkl + offs_d[None, :]),
             _cvt(dk, dk_ptr.dtype.element_ty), mask=n_ok[:, None])
    tl.store(dv_ptr + (b * sdvb + h * sdvh + row_n * sdvl) + (offs_n[:, None] * sdvl + offs_d[None, :]),
             _cvt(dv, dv_ptr.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, k_off, v_off, n_ok, qk_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
             DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the dQ loop; MASK: keys with n_ok False read as 0, their p set to 0."""
    if MASK:
        k = tl.load(k_ptr + k_off, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptr + v_off, mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + k_off)
        v = tl.load(v_ptr + v_off)
    s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, PRECISION)
    s = s * qk_scale - lse2[:, None]
    if MASK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    p = tl.math.exp2(s)
    dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, PRECISION)
    ds = p * (dp - delta[:, None])
    return _dot(_cvt(ds, k.dtype), k, dq, DOT_FP32, PRECISION)


@triton.jit
def attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sdqb, sdqh, sdql,
        NH, Lq, Lk, qk_scale, sm_scale, tune_lq, tune_lk,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of BLOCK_M queries of one (batch, head), looping over all key blocks; grid
    (cdiv(Lq, BLOCK_M), B·heads)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_ok = start_m + offs_m < Lq
    row_m = start_m.to(tl.int64)
    q = tl.load(q_ptr + (b * sqb + h * sqh + row_m * sql) + (offs_m[:, None] * sql + offs_d[None, :]),
                mask=m_ok[:, None], other=0.0)
    do = tl.load(do_ptr + (b * sdob + h * sdoh + row_m * sdol) + (offs_m[:, None] * sdol + offs_d[None, :]),
                 mask=m_ok[:, None], other=0.0)
    stat = bh.to(tl.int64) * Lq + start_m
    lse2 = tl.load(lse_ptr + stat + offs_m, mask=m_ok, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + stat + offs_m, mask=m_ok, other=0.0)
    k_base = k_ptr + (b * skb + h * skh)
    v_base = v_ptr + (b * svb + h * svh)
    k_off = offs_n[:, None] * skl + offs_d[None, :]
    v_off = offs_n[:, None] * svl + offs_d[None, :]

    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    n_full = Lk // BLOCK_N
    for j in range(0, n_full):
        n0 = tl.cast(j, tl.int64) * BLOCK_N
        dq = _dq_step(dq, q, do, lse2, delta, k_base + n0 * skl, v_base + n0 * svl, k_off, v_off, offs_n,
                      qk_scale, BLOCK_M, BLOCK_N, False, DOT_FP32, PRECISION)
    if n_full * BLOCK_N < Lk:
        n0 = tl.cast(n_full, tl.int64) * BLOCK_N
        n_ok = offs_n < Lk - n_full * BLOCK_N
        dq = _dq_step(dq, q, do, lse2, delta, k_base + n0 * skl, v_base + n0 * svl, k_off, v_off, n_ok,
                      qk_scale, BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + (b * sdqb + h * sdqh + row_m * sdql) + (offs_m[:, None] * sdql + offs_d[None, :]),
             _cvt(dq, dq_ptr.dtype.element_ty), mask=m_ok[:, None])


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Tile of a dot kernel: BLOCK_M query rows × BLOCK_N keys per step."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Autotuned per-arch tables of the 16-bit dot kernels, by (arch, D group: 64 for D <= 64, else 128).
# The MMA rows are the queries (BLOCK_M) in fwd / dq and the keys (BLOCK_N) in dkdv: >= 64 per
# warpgroup there, so that sm_90 uses wgmma. Every entry is an AOT spec (no spills, tensor cores);
# all archs have the same number of entries per kernel (the AOT specs are named by index).
_CONFIGS = {
    "fwd": {
        (90, 64): (Config(128, 128, 8, 3), Config(128, 64, 4, 3)),
        (90, 128): (Config(128, 128, 8, 3), Config(128, 64, 8, 3)),
        (80, 64): (Config(128, 128, 8, 3), Config(64, 64, 4, 3)),
        (80, 128): (Config(128, 64, 8, 3), Config(128, 32, 8, 3)),
    },
    "dkdv": {
        (90, 64): (Config(64, 128, 8, 3), Config(64, 64, 4, 3)),
        (90, 128): (Config(32, 128, 8, 2), Config(32, 64, 4, 3)),
        (80, 64): (Config(64, 128, 8, 3), Config(32, 64, 4, 3)),
        # D = 128 on sm_80: dK, dV accumulators and the k, v operands fill the registers; only
        # 16-query steps over 128 keys with 8 warps compile without spills
        (80, 128): (Config(16, 128, 8, 2), Config(16, 128, 8, 3)),
    },
    "dq": {
        (90, 64): (Config(128, 64, 8, 3), Config(128, 32, 4, 3)),
        (90, 128): (Config(128, 64, 8, 2), Config(64, 64, 4, 3)),
        (80, 64): (Config(128, 64, 8, 3), Config(64, 64, 4, 3)),
        (80, 128): (Config(128, 32, 8, 3), Config(128, 16, 8, 2)),
    },
}
# fp32 inputs (tests): small tiles (fp32 tiles take twice the shared memory), any arch.
_CONFIGS_FP32 = {
    "fwd": (Config(64, 32, 4, 2),),
    "dkdv": (Config(32, 64, 4, 2),),
    "dq": (Config(64, 32, 4, 2),),
}
# Under TRITON_INTERPRET=1: one small fixed tile (each tl op costs ~0.1 ms in the interpreter);
# blocks of 32 exercise the key / query loops and their masked tails at the test lengths.
_INTERPRET = {"fwd": Config(32, 32, 4, 1), "dkdv": Config(32, 32, 4, 1), "dq": Config(32, 32, 4, 1)}
_INTERPRET_PRE_ROWS = 64
# delta preprocess: rows per program × D = 8192 elements, 4 warps, compiled for every arch.
_PRE_TILE = 8192
_PRE_WARPS = 4

_KERNELS = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}


def _arch_of(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80  # sm_8x and anything else: the conservative sm_80 table


def _d_group(D: int) -> int:
    return 64 if D <= 64 else 128


def configs(kind: str, arch: int, D: int, dtype: torch.dtype) -> tuple[Config, ...]:
    """The autotune candidates of kernel `kind` ("fwd", "dkdv", "dq") on sm_<arch>."""
    if dtype == torch.float32:
        return _CONFIGS_FP32[kind]
    return _CONFIGS[kind][(arch, _d_group(D))]


def _pre_rows(D: int) -> int:
    return max(16, _PRE_TILE // D)


def _bucket(n: int) -> int:
    """Autotune key of a sequence length: the next power of two, clamped to [64, 32768]."""
    return min(max(triton.next_power_of_2(max(int(n), 1)), 64), 32768)


_TUNED: dict = {}


def _tuned(kind: str, arch: int, D: int, dtype: torch.dtype):
    """The autotuned wrapper of kernel `kind` for its (arch, D, dtype) table, built on first use
    (never under the interpreter, where @triton.autotune cannot run)."""
    table = configs(kind, arch, D, dtype)
    key = (kind, table)
    fn = _TUNED.get(key)
    if fn is None:
        cfgs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                              num_stages=c.num_stages) for c in table]
        fn = triton.autotune(configs=cfgs, key=["tune_lq", "tune_lk", "D"])(_KERNELS[kind])
        _TUNED[key] = fn
    return fn


def _launch(kind: str, args: tuple, n_rows: int, n_bh: int, D: int, dtype: torch.dtype, device) -> None:
    """Launches kernel `kind` over (cdiv(n_rows, block rows), n_bh) programs: block rows = BLOCK_M
    (fwd, dq) or BLOCK_N (dkdv). Interpreter: the fixed small config; GPU: the autotuned table."""
    kernel = _KERNELS[kind]
    row_key = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if interpreted(kernel):
        cfg = _INTERPRET[kind]
        meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        kernel[(triton.cdiv(n_rows, meta[row_key]), n_bh)](
            *args, D=D, DOT_FP32=True, PRECISION="ieee", **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    fn = _tuned(kind, _arch_of(device), D, dtype)
    with torch.cuda.device(device):
        fn[lambda meta: (triton.cdiv(n_rows, meta[row_key]), n_bh)](*args, D=D, DOT_FP32=False, PRECISION=precision)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _blhd(B: int, NH: int, L: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """An empty (B, heads, L, D) tensor with the memory layout (B, L, heads, D)."""
    return torch.empty((B, L, NH, D), device=like.device, dtype=like.dtype).transpose(1, 2)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride()[:3])


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(out, lse) = joint attention of q (B, heads, Lq, D) over k, v (B, heads, Lk, D), any strides
    (unit last-dim stride, else copied). out: q's dtype, memory layout (B, Lq, heads, D), returned
    as the (B, heads, Lq, D) view; lse: fp32 (B, heads, Lq) contiguous, natural log. The arguments
    are those `ops.joint_attention` validated, on a head dim and grid its registry entry accepts."""
    B, NH, Lq, D = q.shape
    Lk = k.shape[2]
    out = _blhd(B, NH, Lq, D, q)
    lse = torch.empty((B, NH, Lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if Lk == 0:  # softmax over no key: out 0, lse -inf (as the reference)
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    args = (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            NH, Lq, Lk, float(scale) * LOG2E, _bucket(Lq), _bucket(Lk))
    _launch("fwd", args, Lq, B * NH, D, q.dtype, q.device)
    return out, lse


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, grad_lse: torch.Tensor | None, scale: float, deterministic: bool = True):
    """(dq, dk, dv) of `forward` by recomputation from the saved (out, lse). grad_out, out: (B, heads,
    Lq, D), any strides; lse, grad_lse (or None: the lse output was unused): fp32 (B, heads, Lq).
    dq / dk / dv: the input dtype, memory layout (B, L, heads, D) viewed as (B, heads, L, D).
    Always deterministic (dQ by its own kernel, no atomics), whatever `deterministic` says."""
    del deterministic  # both paths are the deterministic one (see the module docstring)
    B, NH, Lq, D = q.shape
    Lk = k.shape[2]
    dq, dk, dv = _blhd(B, NH, Lq, D, q), _blhd(B, NH, Lk, D, q), _blhd(B, NH, Lk, D, q)
    if B * NH == 0 or Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dev = q.device
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    grad_out = _unit_last(grad_out.to(q.dtype))
    out = _unit_last(out.to(q.dtype))
    lse = lse.to(torch.float32).contiguous()
    n_bh = B * NH

    # 1. delta = rowsum(dO∘O) - grad_lse
    delta = torch.empty((B, NH, Lq), device=dev, dtype=torch.float32)
    has_glse = grad_lse is not None
    glse = grad_lse.to(torch.float32).contiguous() if has_glse else delta
    kernel = attn_bwd_preprocess_kernel
    rows = _INTERPRET_PRE_ROWS if interpreted(kernel) else _pre_rows(D)
    pre_args = (out, grad_out, glse, delta, *_strides(out), *_strides(grad_out), NH, Lq)
    if interpreted(kernel):
        kernel[(triton.cdiv(Lq, rows), n_bh)](*pre_args, D=D, BLOCK_M=rows, HAS_GLSE=has_glse, num_warps=_PRE_WARPS)
    else:
        with torch.cuda.device(dev):
            kernel[(triton.cdiv(Lq, rows), n_bh)](*pre_args, D=D, BLOCK_M=rows, HAS_GLSE=has_glse,
                                                  num_warps=_PRE_WARPS)

    qk_scale = float(scale) * LOG2E
    tune = (_bucket(Lq), _bucket(Lk))
    # 2. dK, dV: a program per key block
    args = (q, k, v, grad_out, lse, delta, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            NH, Lq, Lk, qk_scale, float(scale), *tune)
    _launch("dkdv", args, Lk, n_bh, D, q.dtype, dev)
    # 3. dQ: a program per query block
    args = (q, k, v, grad_out, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
            NH, Lq, Lk, qk_scale, float(scale), *tune)
    _launch("dq", args, Lq, n_bh, D, q.dtype, dev)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# AOT specs (see cogvx_kernels.triton.aot)
# ---------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_specs() -> list[dict]:
    """Production compile specs for cogvx_kernels.triton.aot: every autotune candidate of the three
    dot kernels (``_CONFIGS``, named by index c0, c1, ...) × arch (80, 90) × fp16 / bf16 × D = 64,
    128, and the delta preprocess (no dot: every arch) × dtype × D. As the JIT sees the head-split
    views: channel strides constexpr 1; pointers and the other strides 16-divisible (heads × D);
    lengths, strides, scales as runtime scalars."""
    from .aot import signature

    specs = []
    fp32_scalars = {"qk_scale": "fp32", "sm_scale": "fp32"}
    for dtype, ty in _TL_DTYPE.items():
        p = f"*{ty}"
        for D in (64, 128):
            const = dict(D=D, BLOCK_M=_pre_rows(D), HAS_GLSE=True)
            ptrs = dict(o_ptr=p, do_ptr=p, glse_ptr="*fp32", delta_ptr="*fp32")
            kernel = attn_bwd_preprocess_kernel
            specs.append(dict(
                name=f"joint_attention_bwd_pre_d{D}_{ty}", kernel=kernel,
                signature=signature(kernel, ptrs, const), constexprs=const,
                options=dict(num_warps=_PRE_WARPS, num_stages=1), uses_dot=False,
                attrs={n: 16 for n in (*ptrs, "sob", "soh", "sol", "sdob", "sdoh", "sdol")}))
            for arch in (80, 90):
                for kind, kernel in _KERNELS.items():
                    if kind == "fwd":
                        ptrs = dict(q_ptr=p, k_ptr=p, v_ptr=p, o_ptr=p, lse_ptr="*fp32")
                    elif kind == "dkdv":
                        ptrs = dict(q_ptr=p, k_ptr=p, v_ptr=p, do_ptr=p, lse_ptr="*fp32", delta_ptr="*fp32",
                                    dk_ptr=p, dv_ptr=p)
                    else:
                        ptrs = dict(q_ptr=p, k_ptr=p, v_ptr=p, do_ptr=p, lse_ptr="*fp32", delta_ptr="*fp32",
                                    dq_ptr=p)
                    strides = tuple(n for n in kernel.arg_names if n.startswith("s") and n != "sm_scale")
                    for index, cfg in enumerate(configs(kind, arch, D, dtype)):
                        const = dict(D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_FP32=False,
                                     PRECISION="ieee")
                        specs.append(dict(
                            name=f"joint_attention_{kind}_d{D}_{ty}_c{index}_sm{arch}", kernel=kernel,
                            signature=signature(kernel, ptrs, const, fp32_scalars), constexprs=const,
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), uses_dot=True,
                            arch=arch, attrs={n: 16 for n in (*ptrs, *strides)}))
    return specs

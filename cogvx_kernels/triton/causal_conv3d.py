"""Triton kernels of the temporally causal 3D convolution (CogVideoX VAE), forward and backward.

Semantics (ground truth: ``cogvx_kernels.reference.causal_conv3d``): x (B, C_in, T, H, W), weight
(C_out, C_in, kt, kh, kw), stride 1. The "time-padded input" is the kt-1 halo frames (or, without a
halo, the first frame of x repeated kt-1 times) followed by the T frames of x; zero spatial padding
(pad_h, pad_w). Output (B, C_out, T, H', W') with H' = H + 2 pad_h - kh + 1 (same for W').

Method: implicit GEMM, nothing of the padded activation is ever materialised (no padded or
concatenated copy, in the kernels or the launchers; only the small weight is repacked per tap).

* forward: a program computes y[b, :, t] for BLOCK_N output channels × BLOCK_M output pixels of
  one frame, as W (C_out × K) · X (K × pixels), K = (dt, dh, dw) taps × C_in blocks in one flat
  loop. The padded frame t+dt is read straight from the halo (or, without one, from frame 0 of x
  through a zero frame stride) or from x: since a program covers one output frame the source is
  uniform per tap, so the flat K range is split in two loops, taps reading the halo then taps
  reading x. The spatial border is handled by load masks.
* grad_x: the transposed convolution, again an implicit GEMM: a program computes BLOCK_N input
  channels × BLOCK_M input pixels of one *stored* frame (a halo frame or an x frame), summing
  W[dt]^T · grad_out[t = j - dt] over the padded frames j that read that stored frame: j itself for
  halo and x frames, and j = 0 .. kt-1 for frame 0 of x without a halo (the first frame stands in
  for every virtual halo frame, so it receives all their gradients). One flat loop over
  (j, dt, spatial tap, C_out block).
* grad_weight: per tap, an implicit GEMM C_out × C_in reducing over output pixels. The pixel axis is
  split over (batch, pixel chunk) programs writing fp32 partials that are summed afterwards
  (deterministic, no atomics).
* grad_bias: an fp32 torch sum of grad_out.

The pixel axis is the last (fastest) axis of the gathered activation / grad_out tiles, so NCTHW
tensors are read coalesced along W, while channels_last_3d ones (unit channel stride) are read as
16-byte vectors along C. Those gathers carry per-element masks and, for NCTHW, are 2-byte loads
that cp.async cannot take, so they are prefetched by hand one K step ahead in registers; the
contiguous weight tiles go through triton's cp.async pipeline (num_stages).

All kernels accumulate in fp32 and store in the element type of the output pointer (bf16 stays
bf16). fp32 inputs use TF32 tensor cores on GPUs when torch.backends.cudnn.allow_tf32 is set (like
torch's own conv3d; IEEE otherwise); the interpreter always computes in IEEE fp32.

Any strides are accepted for x / halo / grad_out (contiguous, channels_last_3d, time slices, stride
0 from expand); strides that are 1 get specialised by the JIT. Batch, frame and channel-block
offsets are int64 scalars; in-tile offsets are int32 unless the launcher finds a tile could span
2^31 elements (OFF64).

Interpreter (TRITON_INTERPRET=1, CPU tensors): small fixed configs, and the dot operands are
upcast to fp32 first (triton's interpreter multiplies bf16 bit patterns as integers otherwise).
Compiled: per-arch config tables (sm_80, sm_90), see ``_CONFIGS``; ``aot_specs()`` lists them for
``cogvx_kernels.triton.aot``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreted

__all__ = ["forward", "backward", "aot_specs", "block_config"]


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_x_tile(base, k, k_hi, n_cb, s_t64, kstep, ch_off, s_h, s_w, ohp, owp, offs_k, C_in, H, W,
                KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile of flat step k (tap-major, channel block minor): [BLOCK_K channels, BLOCK_M pixels];
    all zero (and nothing read) when k >= k_hi."""
    KHW: tl.constexpr = KH * KW
    tap = k // n_cb
    cb = k % n_cb
    r = tap % KHW
    ih = ohp + r // KW
    iw = owp + r % KW
    pix_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    k_ok = (offs_k < C_in - cb * BLOCK_K) & (k < k_hi)
    return tl.load(base + ((tap // KHW) * s_t64 + cb * kstep) + (ch_off[:, None] + (ih * s_h + iw * s_w)[None, :]),
                   mask=k_ok[:, None] & pix_ok[None, :], other=0.0)


@triton.jit
def _fwd_taps(acc, src_ptr, w_ptr, b, frame0, dt_lo, dt_hi,
              s_b, s_c, s_t, s_h, s_w,
              ohp, owp, offs_k, offs_n, n_ok, C_in, w_tap, H, W,
              KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, OFF64: tl.constexpr,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc[n, m] += sum over taps dt in [dt_lo, dt_hi) (all dh, dw) and all C_in of
    W[dt, dh, dw][n, :] · src[b, :, frame0 + dt, ohp[m] + dh, owp[m] + dw] (zero outside the frame).

    ohp/owp: output pixel coordinates minus the padding (rows past the tile's valid pixels hold
    a row index that fails the bounds check). The activation tile is gathered with per-element
    masks (2-byte loads for NCTHW, which cp.async cannot take), so it is prefetched by hand one
    step ahead in registers; the weight tile is contiguous and left to the pipeliner (cp.async)."""
    KHW: tl.constexpr = KH * KW
    n_cb = tl.cdiv(C_in, BLOCK_K)
    # scalar base of frame dt = 0, channel block 0; int64 steps per frame and per channel block;
    # in-tile offsets (channel within the block + pixel) are int32 unless OFF64
    base = src_ptr + b.to(tl.int64) * s_b + frame0.to(tl.int64) * s_t
    s_t64 = tl.cast(s_t, tl.int64)
    kstep = tl.cast(s_c, tl.int64) * BLOCK_K
    if OFF64:
        ch_off = offs_k.to(tl.int64) * s_c
    else:
        ch_off = offs_k * s_c
    w_off = offs_n[:, None] * C_in + offs_k[None, :]
    k_lo = dt_lo * KHW * n_cb
    k_hi = dt_hi * KHW * n_cb
    xa = _fwd_x_tile(base, k_lo, k_hi, n_cb, s_t64, kstep, ch_off, s_h, s_w, ohp, owp, offs_k, C_in, H, W,
                     KH, KW, BLOCK_K)
    for k in range(k_lo, k_hi):
        tap = k // n_cb
        cb = k % n_cb
        k_ok = offs_k < C_in - cb * BLOCK_K
        # B: W[tap] as [BLOCK_N C_out, BLOCK_K C_in]
        wt = tl.load(w_ptr + (tap * w_tap + cb * BLOCK_K) + w_off, mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0)
        xa_next = _fwd_x_tile(base, k + 1, k_hi, n_cb, s_t64, kstep, ch_off, s_h, s_w, ohp, owp, offs_k,
                              C_in, H, W, KH, KW, BLOCK_K)
        if DOT_FP32:
            acc = tl.dot(wt.to(tl.float32), xa.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(wt, xa, acc, input_precision=PRECISION)
        xa = xa_next
    return acc


@triton.jit
def causal_conv3d_fwd_kernel(
        x_ptr, h_ptr, w_ptr, bias_ptr, y_ptr,
        C_in, C_out, T, H, W, Ho, Wo, pad_h, pad_w,
        sxb, sxc, sxt, sxh, sxw,
        shb, shc, sht, shh, shw,
        syb, syc, syt,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OFF64: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """y[b, n, t, m]: a BLOCK_N (C_out) × BLOCK_M (pixels of output frame (b, t)) tile, computed as
    W (C_out × K) · X (K × pixels); grid (cdiv(C_out, BLOCK_N), cdiv(Ho*Wo, BLOCK_M), B*T).

    w_ptr: weight repacked as (kt, kh, kw, C_out, C_in) contiguous. h_ptr: the halo, or x itself
    with a zero frame stride (frame 0 repeated) when there is none. y: (syh, syw) = (Wo, 1)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bt = tl.program_id(2)
    b = pid_bt // T
    t = pid_bt % T
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Ho * Wo
    ohp = tl.where(m_ok, offs_m // Wo - pad_h, -KH - 1)
    owp = offs_m % Wo - pad_w
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    offs_k = tl.arange(0, BLOCK_K)
    w_tap = C_out * C_in
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # padded frame t + dt: halo frame t + dt while t + dt < KT - 1, else x frame t + dt - (KT - 1)
    dt_x = tl.maximum(KT - 1 - t, 0)
    acc = _fwd_taps(acc, h_ptr, w_ptr, b, t, 0, dt_x, shb, shc, sht, shh, shw,
                    ohp, owp, offs_k, offs_n, n_ok, C_in, w_tap, H, W,
                    KH, KW, BLOCK_K, OFF64, DOT_FP32, PRECISION)
    acc = _fwd_taps(acc, x_ptr, w_ptr, b, t - (KT - 1), dt_x, KT, sxb, sxc, sxt, sxh, sxw,
                    ohp, owp, offs_k, offs_n, n_ok, C_in, w_tap, H, W,
                    KH, KW, BLOCK_K, OFF64, DOT_FP32, PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[:, None]
    # int64 scalar base of the tile, int32 in-tile offsets unless OFF64
    if OFF64:
        rows = tl.arange(0, BLOCK_N).to(tl.int64) * syc
    else:
        rows = tl.arange(0, BLOCK_N) * syc
    y = (y_ptr + b.to(tl.int64) * syb + t.to(tl.int64) * syt + (pid_n * BLOCK_N).to(tl.int64) * syc
         + (rows[:, None] + offs_m[None, :]))
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _dx_step(k, n_cb, n_dt, dt_lo, j_lo, KHW: tl.constexpr):
    """Flat step k of the grad_x loop -> (weight tap index, channel block, output frame t); the
    order is (padded frame j, dt, spatial tap, channel block), channel block fastest."""
    q_tap = k // n_cb
    q = q_tap // KHW
    dt = dt_lo + q % n_dt
    return dt * KHW + q_tap % KHW, k % n_cb, j_lo + q // n_dt - dt


@triton.jit
def _dx_g_tile(base, k, k_hi, n_cb, n_dt, dt_lo, j_lo, T, sgt64, kstep, ch_off, sgh, sgw, ohp, owp, offs_k,
               C_out, Ho, Wo, KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_out tile of flat step k: frame t, pixels (ohp - dh, owp - dw), channel block cb:
    [BLOCK_K C_out, BLOCK_M pixels]; zero (nothing read) when k >= k_hi or t is outside [0, T)."""
    KHW: tl.constexpr = KH * KW
    tap, cb, t = _dx_step(k, n_cb, n_dt, dt_lo, j_lo, KHW)
    r = tap % KHW
    oh = ohp - r // KW
    ow = owp - r % KW
    pix_ok = (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
    k_ok = (offs_k < C_out - cb * BLOCK_K) & ((k < k_hi) & (t >= 0) & (t < T))
    return tl.load(base + (t * sgt64 + cb * kstep) + (ch_off[:, None] + (oh * sgh + ow * sgw)[None, :]),
                   mask=k_ok[:, None] & pix_ok[None, :], other=0.0)


@triton.jit
def causal_conv3d_bwd_dx_kernel(
        g_ptr, w_ptr, gx_ptr, gh_ptr,
        C_in, C_out, T, H, W, Ho, Wo, pad_h, pad_w, NF,
        sgb, sgc, sgt, sgh, sgw,
        HAS_HALO: tl.constexpr, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OFF64: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Gradient of one stored frame (b, f): a BLOCK_N (C_in) × BLOCK_M (input pixels) tile, as
    W^T (C_in × K) · grad_out (K × pixels); grid (cdiv(C_in, BLOCK_N), cdiv(H*W, BLOCK_M), B*NF).

    Stored frames f: with a halo, f < KT-1 are halo frames and f >= KT-1 x frames f-(KT-1)
    (NF = KT-1+T); without, f are x frames (NF = T) and frame 0 also gathers padded frames
    0..KT-2. Padded frame j collects grad_out[t = j - dt] · W[dt] over 0 <= j - dt < T.
    w_ptr: weight repacked as (kt, kh, kw, C_in, C_out) contiguous. gx/gh contiguous."""
    KHW: tl.constexpr = KH * KW
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bf = tl.program_id(2)
    b = pid_bf // NF
    f = pid_bf % NF
    if HAS_HALO:
        j_lo = f
        j_hi = f
    else:
        j_hi = f + (KT - 1)
        j_lo = tl.where(f == 0, 0, j_hi)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < H * W
    # grad_out pixel read by input pixel (ih, iw) through tap (dh, dw): (ih + pad_h - dh, iw + pad_w - dw)
    ohp = tl.where(m_ok, offs_m // W + pad_h, -KH - Ho)
    owp = offs_m % W + pad_w
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_in
    offs_k = tl.arange(0, BLOCK_K)
    n_cb = tl.cdiv(C_out, BLOCK_K)
    base = g_ptr + b.to(tl.int64) * sgb
    sgt64 = tl.cast(sgt, tl.int64)
    kstep = tl.cast(sgc, tl.int64) * BLOCK_K
    if OFF64:
        ch_off = offs_k.to(tl.int64) * sgc
    else:
        ch_off = offs_k * sgc
    w_off = offs_n[:, None] * C_out + offs_k[None, :]
    w_tap = C_in * C_out
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # one flat loop over (padded frame j in [j_lo, j_hi], dt, spatial tap, C_out block): the dt range
    # [dt_lo, dt_hi) is where t = j - dt is in [0, T) for a single j; for frame 0 without a halo
    # (several j) some (j, dt) pairs fall outside and load nothing. The grad_out tile is
    # prefetched one step ahead in registers; the weight tile goes through the pipeliner.
    dt_lo = tl.maximum(j_lo - T + 1, 0)
    n_dt = tl.minimum(j_hi + 1, KT) - dt_lo
    k_hi = (j_hi - j_lo + 1) * n_dt * KHW * n_cb
    ga = _dx_g_tile(base, 0, k_hi, n_cb, n_dt, dt_lo, j_lo, T, sgt64, kstep, ch_off, sgh, sgw, ohp, owp,
                    offs_k, C_out, Ho, Wo, KH, KW, BLOCK_K)
    for k in range(0, k_hi):
        tap, cb, t = _dx_step(k, n_cb, n_dt, dt_lo, j_lo, KHW)
        k_ok = offs_k < C_out - cb * BLOCK_K
        # B: W[tap]^T as [BLOCK_N C_in, BLOCK_K C_out]
        wt = tl.load(w_ptr + (tap * w_tap + cb * BLOCK_K) + w_off,
                     mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        ga_next = _dx_g_tile(base, k + 1, k_hi, n_cb, n_dt, dt_lo, j_lo, T, sgt64, kstep, ch_off, sgh, sgw,
                             ohp, owp, offs_k, C_out, Ho, Wo, KH, KW, BLOCK_K)
        if DOT_FP32:
            acc = tl.dot(wt.to(tl.float32), ga.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(wt, ga, acc, input_precision=PRECISION)
        ga = ga_next
    # gx (B, C_in, T, H, W) and gh (B, C_in, KT-1, H, W) are contiguous:
    # offset = ((b * C_in + n) * frames + frame) * H * W + pixel
    HW = H * W
    if HAS_HALO:
        to_halo = f < KT - 1
        frames = tl.where(to_halo, KT - 1, T)
        frame = tl.where(to_halo, f, f - (KT - 1))
        dst = tl.where(to_halo, gh_ptr, gx_ptr)
    else:
        frames = T
        frame = f
        dst = gx_ptr
    # int64 scalar base of the tile, int32 in-tile offsets unless OFF64
    if OFF64:
        rows = tl.arange(0, BLOCK_N).to(tl.int64) * (frames * HW)
    else:
        rows = tl.arange(0, BLOCK_N) * (frames * HW)
    out = (dst + ((b.to(tl.int64) * C_in + pid_n * BLOCK_N) * frames + frame) * HW
           + (rows[:, None] + offs_m[None, :]))
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _dw_tiles(g_base, src_base, g_ch, s_ch, k, k_hi, nb, p0, dhp, dwp, sgt64, sgh, sgw, s_t64, s_h, s_w,
              m_ok, n_ok, H, W, Ho, Wo, BLOCK_K: tl.constexpr):
    """Tiles of flat step k (frame t = k // nb, pixel block k % nb): grad_out [BLOCK_M C_out,
    BLOCK_K pixels] and the source [BLOCK_N C_in, BLOCK_K pixels shifted by (dhp, dwp)]; zero (nothing
    read) when k >= k_hi."""
    t = k // nb
    p = p0 + (k % nb) * BLOCK_K
    p_ok = (p < Ho * Wo) & (k < k_hi)
    oh = p // Wo
    ow = p % Wo
    ih = oh + dhp
    iw = ow + dwp
    x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ga = tl.load(g_base + t * sgt64 + (g_ch[:, None] + (oh * sgh + ow * sgw)[None, :]),
                 mask=m_ok[:, None] & p_ok[None, :], other=0.0)
    xb = tl.load(src_base + t * s_t64 + (s_ch[:, None] + (ih * s_h + iw * s_w)[None, :]),
                 mask=n_ok[:, None] & x_ok[None, :], other=0.0)
    return ga, xb


@triton.jit
def _dw_frames(acc, g_base, src_base, g_ch, s_ch, t_lo, t_hi, pb_lo, nb, dhp, dwp,
               sgt, sgh, sgw, s_t, s_h, s_w,
               m_ok, n_ok, H, W, Ho, Wo,
               BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc[co, ci] += sum over output frames t in [t_lo, t_hi) and pixel blocks [pb_lo, pb_lo+nb) of
    grad_out[co, t, p] · src[ci, t, p shifted by (dhp, dwp)].

    g_base / src_base: scalar pointers of frame 0 of grad_out / of the source (already shifted by
    the tap's frame offset); g_ch [BLOCK_M] / s_ch [BLOCK_N]: channel offsets. Both tiles are
    gathered with per-element masks, so they are prefetched by hand one step ahead."""
    sgt64 = tl.cast(sgt, tl.int64)
    s_t64 = tl.cast(s_t, tl.int64)
    p0 = pb_lo * BLOCK_K + tl.arange(0, BLOCK_K)
    k_lo = t_lo * nb
    k_hi = t_hi * nb
    ga, xb = _dw_tiles(g_base, src_base, g_ch, s_ch, k_lo, k_hi, nb, p0, dhp, dwp, sgt64, sgh, sgw,
                       s_t64, s_h, s_w, m_ok, n_ok, H, W, Ho, Wo, BLOCK_K)
    for k in range(k_lo, k_hi):
        ga_next, xb_next = _dw_tiles(g_base, src_base, g_ch, s_ch, k + 1, k_hi, nb, p0, dhp, dwp, sgt64,
                                     sgh, sgw, s_t64, s_h, s_w, m_ok, n_ok, H, W, Ho, Wo, BLOCK_K)
        if DOT_FP32:
            acc = tl.dot(ga.to(tl.float32), tl.trans(xb.to(tl.float32)), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(ga, tl.trans(xb), acc, input_precision=PRECISION)
        ga = ga_next
        xb = xb_next
    return acc


@triton.jit
def causal_conv3d_bwd_dw_kernel(
        g_ptr, x_ptr, h_ptr, part_ptr,
        C_in, C_out, T, H, W, Ho, Wo, pad_h, pad_w, S_PIX, BLK_PER_SPLIT,
        sgb, sgc, sgt, sgh, sgw,
        sxb, sxc, sxt, sxh, sxw,
        shb, shc, sht, shh, shw,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OFF64: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 partial grad_weight of one tap: BLOCK_M C_out × BLOCK_N C_in, reduced over the output
    pixels of batch b, all frames, pixel blocks of chunk `chunk`; grid (m*n tiles, taps, B*S_PIX).
    part: (B*S_PIX, taps, C_out, C_in) fp32 contiguous."""
    KHW: tl.constexpr = KH * KW
    pid_mn = tl.program_id(0)
    tap = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_tiles_n = tl.cdiv(C_in, BLOCK_N)
    pid_m = pid_mn // n_tiles_n
    pid_n = pid_mn % n_tiles_n
    b = pid_s // S_PIX
    chunk = pid_s % S_PIX
    n_pb = tl.cdiv(Ho * Wo, BLOCK_K)
    pb_lo = chunk * BLK_PER_SPLIT
    nb = tl.maximum(tl.minimum(pb_lo + BLK_PER_SPLIT, n_pb) - pb_lo, 1)  # the launcher keeps chunks non-empty
    dt = tap // KHW
    r = tap % KHW
    dhp = r // KW - pad_h
    dwp = r % KW - pad_w
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < C_out
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_in
    b64 = b.to(tl.int64)
    # channel offsets of the tile: tile start in int64 in the base, in-tile part int32 unless OFF64
    ci0 = (pid_n * BLOCK_N).to(tl.int64)
    if OFF64:
        g_ch = tl.arange(0, BLOCK_M).to(tl.int64) * sgc
        x_ch = tl.arange(0, BLOCK_N).to(tl.int64) * sxc
        h_ch = tl.arange(0, BLOCK_N).to(tl.int64) * shc
    else:
        g_ch = tl.arange(0, BLOCK_M) * sgc
        x_ch = tl.arange(0, BLOCK_N) * sxc
        h_ch = tl.arange(0, BLOCK_N) * shc
    g_base = g_ptr + b64 * sgb + (pid_m * BLOCK_M).to(tl.int64) * sgc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # output frame t reads padded frame t + dt: halo frame t + dt while t + dt < KT - 1, else
    # x frame t + dt - (KT - 1)
    t_x = tl.minimum(tl.maximum(KT - 1 - dt, 0), T)
    h_base = h_ptr + b64 * shb + dt.to(tl.int64) * sht + ci0 * shc
    acc = _dw_frames(acc, g_base, h_base, g_ch, h_ch, 0, t_x, pb_lo, nb, dhp, dwp,
                     sgt, sgh, sgw, sht, shh, shw, m_ok, n_ok, H, W, Ho, Wo,
                     BLOCK_K, DOT_FP32, PRECISION)
    x_base = x_ptr + b64 * sxb + (dt - (KT - 1)).to(tl.int64) * sxt + ci0 * sxc
    acc = _dw_frames(acc, g_base, x_base, g_ch, x_ch, t_x, T, pb_lo, nb, dhp, dwp,
                     sgt, sgh, sgw, sxt, sxh, sxw, m_ok, n_ok, H, W, Ho, Wo,
                     BLOCK_K, DOT_FP32, PRECISION)
    out = (part_ptr + (pid_s.to(tl.int64) * (KT * KHW) + tap) * C_out * C_in
           + (offs_m[:, None] * C_in + offs_n[None, :]))
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Production tables, keyed by kernel, then by (arch, dtype class): "16" = bf16/fp16, "32" = fp32
# (TF32 dots). GEMM roles (MMA rows x MMA columns x reduction):
#   fwd: block_n C_out      x block_m output pixels of a frame x block_k C_in (per tap)
#   dx:  block_n C_in       x block_m input pixels of a frame  x block_k C_out (per tap)
#   dw:  block_m C_out      x block_n C_in                     x block_k output pixels
# The activation / grad_out tiles are gathered with per-element masks (for NCTHW tensors 2-byte
# loads that cp.async cannot take), so they are prefetched in registers and the register budget
# decides the tiles: fwd/dx at 128 x 64 x 32 use <= 128 registers with 8 warps (two CTAs per SM,
# one gathering while the other runs its MMAs); on sm_90 the 8 warps are two warpgroups of
# 64-row wgmma. dw gathers both operands; 128 x 128 x 16 (x 64 for fp32) keeps it spill-free.
# Only the weight tiles go through the cp.async pipeline (num_stages).
_CONFIGS = {
    "fwd": {
        (90, "16"): Config(64, 128, 32, 8, 3),
        (90, "32"): Config(64, 128, 16, 8, 3),
        (80, "16"): Config(64, 128, 32, 8, 4),
        (80, "32"): Config(64, 128, 16, 8, 3),
    },
    "dx": {
        (90, "16"): Config(64, 128, 32, 8, 3),
        (90, "32"): Config(64, 128, 16, 8, 3),
        (80, "16"): Config(64, 128, 32, 8, 4),
        (80, "32"): Config(64, 128, 16, 8, 3),
    },
    "dw": {
        (90, "16"): Config(128, 128, 16, 8, 3),
        (90, "32"): Config(128, 64, 16, 8, 3),
        (80, "16"): Config(128, 128, 16, 8, 4),
        (80, "32"): Config(128, 64, 16, 8, 3),
    },
}
# Which config field is the MMA row dimension (wgmma needs 64 rows per warpgroup on sm_90).
_MMA_ROWS = {"fwd": "block_n", "dx": "block_n", "dw": "block_m"}
# Under TRITON_INTERPRET=1: tiles >= 16 (tl.dot) that hold a whole small test frame, so that few
# programs and loop iterations run (the interpreter costs ~0.1 ms per tl operation).
_INTERPRET_CONFIGS = {
    "fwd": Config(128, 32, 32, 4, 1),
    "dx": Config(128, 32, 32, 4, 1),
    "dw": Config(32, 32, 128, 4, 1),
}


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "16"
    if dtype == torch.float32:
        return "32"
    raise TypeError(f"cogvx triton causal_conv3d: unsupported dtype {dtype} (float32, bfloat16, float16)")


def _arch_of(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80  # sm_8x and anything else: the conservative sm_80 table




def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def block_config(kind: str, arch: int | None, cls: str, m: int, n: int, k: int | None) -> Config:
    """The config the launchers run: the table entry of (arch, dtype class) -- the interpreter's
    when arch is None -- with blocks shrunk (to powers of two >= 16) for small GEMM extents m/n/k
    (k=None: not shrunk). On sm_90 the MMA row block stays >= 64 so that wgmma applies."""
    cfg = _INTERPRET_CONFIGS[kind] if arch is None else _CONFIGS[kind][(arch, cls)]
    lo = {f: 16 for f in ("block_m", "block_n", "block_k")}
    if arch == 90:
        lo[_MMA_ROWS[kind]] = 64
    bm = min(cfg.block_m, _pow2_at_least(m, lo["block_m"]))
    bn = min(cfg.block_n, _pow2_at_least(n, lo["block_n"]))
    bk = cfg.block_k if k is None else min(cfg.block_k, _pow2_at_least(k, lo["block_k"]))
    return Config(bm, bn, bk, cfg.num_warps, cfg.num_stages)


def _launch_config(kind: str, kernel, dtype: torch.dtype, device: torch.device,
                   m: int, n: int, k: int | None) -> tuple[Config, bool, str]:
    """(config, DOT_FP32, PRECISION) for a launch; m/n/k as in block_config."""
    cls = _dtype_class(dtype)
    if interpreted(kernel):
        return block_config(kind, None, cls, m, n, k), True, "ieee"
    precision = "tf32" if (cls == "32" and torch.backends.cudnn.allow_tf32) else "ieee"
    return block_config(kind, _arch_of(device), cls, m, n, k), False, precision


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _off64(*spans: int) -> bool:
    """Whether an in-tile offset (sum of index * stride over a tile) can reach 2^31."""
    return max(spans) >= 2 ** 31 - 1


def _halo_args(x: torch.Tensor, halo: torch.Tensor | None, kt: int):
    """(tensor, strides) that the kernels read the kt-1 leading padded frames from: the halo, or x
    with a zero frame stride (its frame 0 repeated)."""
    if halo is not None and kt > 1:
        return halo, tuple(halo.stride())
    sb, sc, _, sh, sw = x.stride()
    return x, (sb, sc, 0, sh, sw)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            halo: torch.Tensor | None, pad_h: int, pad_w: int) -> torch.Tensor:
    """y = causal_conv3d(x, weight, bias, halo, padding=(pad_h, pad_w)); contiguous, dtype of x. The
    arguments are those `ops.causal_conv3d` validated."""
    B, C_in, T, H, W = x.shape
    C_out, _, kt, kh, kw = weight.shape
    Ho, Wo = H + 2 * pad_h - kh + 1, W + 2 * pad_w - kw + 1
    y = torch.empty((B, C_out, T, max(Ho, 0), max(Wo, 0)), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    kernel = causal_conv3d_fwd_kernel
    cfg, dot_fp32, precision = _launch_config("fwd", kernel, x.dtype, x.device, Ho * Wo, C_out, C_in)
    w_taps = weight.to(x.dtype).permute(2, 3, 4, 0, 1).contiguous()  # (kt, kh, kw, C_out, C_in)
    h_t, h_s = _halo_args(x, halo, kt)
    off64 = _off64(*[(cfg.block_k - 1) * s[1] + (H - 1) * s[3] + (W - 1) * s[4] for s in (x.stride(), h_s)],
                   cfg.block_n * y.stride(1))
    grid = (triton.cdiv(C_out, cfg.block_n), triton.cdiv(Ho * Wo, cfg.block_m), B * T)
    kernel[grid](
        x, h_t, w_taps, bias if bias is not None else w_taps, y,
        C_in, C_out, T, H, W, Ho, Wo, pad_h, pad_w,
        *x.stride(), *h_s, y.stride(0), y.stride(1), y.stride(2),
        KT=kt, KH=kh, KW=kw, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, OFF64=off64,
        DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def _dw_splits(B: int, tiles: int, n_pb: int, T: int, C_out: int, C_in: int, taps: int,
               device: torch.device, interpreted: bool) -> int:
    """Pixel chunks per batch element for grad_weight: enough programs to fill the GPU, at least
    ~32 K-iterations each, partial buffer under 512 MB."""
    if interpreted:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(4 * sms, max(tiles * B, 1))
    by_work = max(1, (n_pb * T) // 32)
    by_mem = max(1, (512 << 20) // (4 * taps * C_out * C_in * B))
    return max(1, min(want, by_work, by_mem, n_pb))


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None,
             pad_h: int, pad_w: int, has_bias: bool):
    """(grad_x, grad_weight, grad_bias, grad_halo), the contract of cogvx::causal_conv3d_backward.

    grad_x: like x (contiguous, dtype of x). grad_weight: like weight. grad_bias: (C_out,) in the
    weight dtype, or an empty (0,) tensor when has_bias is False. grad_halo: like halo (contiguous),
    or an empty (0,) tensor when halo is None."""
    return _backward(grad_out, x, weight, halo, pad_h, pad_w, has_bias)


def _backward(grad_out, x, weight, halo, pad_h, pad_w, has_bias, dw_splits: int | None = None):
    B, C_in, T, H, W = x.shape
    C_out, _, kt, kh, kw = weight.shape
    Ho, Wo = H + 2 * pad_h - kh + 1, W + 2 * pad_w - kw + 1
    dev = x.device
    grad_out = grad_out.to(x.dtype)
    has_halo = halo is not None and kt > 1
    grad_x = torch.empty((B, C_in, T, H, W), device=dev, dtype=x.dtype)
    if halo is not None:
        grad_halo = (torch.empty(tuple(halo.shape), device=dev, dtype=x.dtype) if has_halo
                     else torch.zeros(tuple(halo.shape), device=dev, dtype=x.dtype))
    else:
        grad_halo = torch.empty((0,), device=dev, dtype=x.dtype)
    grad_bias = (grad_out.sum(dim=(0, 2, 3, 4), dtype=torch.float32).to(weight.dtype) if has_bias
                 else torch.empty((0,), device=dev, dtype=weight.dtype))
    if grad_out.numel() == 0:
        grad_x.zero_()
        grad_halo.zero_()
        return grad_x, torch.zeros_like(weight, memory_format=torch.contiguous_format), grad_bias, grad_halo

    # ---- grad_x (and grad_halo) ----
    kernel = causal_conv3d_bwd_dx_kernel
    cfg, dot_fp32, precision = _launch_config("dx", kernel, x.dtype, dev, H * W, C_in, C_out)
    w_t = weight.to(x.dtype).permute(2, 3, 4, 1, 0).contiguous()  # (kt, kh, kw, C_in, C_out)
    gs = grad_out.stride()
    off64 = _off64((cfg.block_k - 1) * gs[1] + (Ho - 1) * gs[3] + (Wo - 1) * gs[4],
                   cfg.block_n * max(T, kt - 1) * H * W)
    NF = T + kt - 1 if has_halo else T
    grid = (triton.cdiv(C_in, cfg.block_n), triton.cdiv(H * W, cfg.block_m), B * NF)
    kernel[grid](
        grad_out, w_t, grad_x, grad_halo if has_halo else grad_x,
        C_in, C_out, T, H, W, Ho, Wo, pad_h, pad_w, NF,
        *grad_out.stride(),
        HAS_HALO=has_halo, KT=kt, KH=kh, KW=kw,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, OFF64=off64,
        DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    # ---- grad_weight: fp32 partials over (batch, pixel chunk), summed deterministically ----
    kernel = causal_conv3d_bwd_dw_kernel
    cfg, dot_fp32, precision = _launch_config("dw", kernel, x.dtype, dev, C_out, C_in, None)
    taps = kt * kh * kw
    n_pb = triton.cdiv(Ho * Wo, cfg.block_k)
    tiles = triton.cdiv(C_out, cfg.block_m) * triton.cdiv(C_in, cfg.block_n)
    s_pix = dw_splits or _dw_splits(B, tiles * taps, n_pb, T, C_out, C_in, taps, dev, interpreted(kernel))
    s_pix = max(1, min(s_pix, n_pb))
    blk_per_split = triton.cdiv(n_pb, s_pix)
    s_pix = triton.cdiv(n_pb, blk_per_split)
    part = torch.empty((B * s_pix, taps, C_out, C_in), device=dev, dtype=torch.float32)
    h_t, h_s = _halo_args(x, halo, kt)
    off64 = _off64((cfg.block_m - 1) * gs[1] + (Ho - 1) * gs[3] + (Wo - 1) * gs[4],
                   *[(cfg.block_n - 1) * s[1] + (H - 1) * s[3] + (W - 1) * s[4] for s in (x.stride(), h_s)])
    grid = (tiles, taps, B * s_pix)
    kernel[grid](
        grad_out, x, h_t, part,
        C_in, C_out, T, H, W, Ho, Wo, pad_h, pad_w, s_pix, blk_per_split,
        *grad_out.stride(), *x.stride(), *h_s,
        KT=kt, KH=kh, KW=kw,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, OFF64=off64,
        DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    gw = part[0] if part.shape[0] == 1 else part.sum(dim=0)
    grad_weight = (gw.view(kt, kh, kw, C_out, C_in).permute(3, 4, 0, 1, 2)
                   .to(weight.dtype).contiguous())
    return grad_x, grad_weight, grad_bias, grad_halo


# ---------------------------------------------------------------------------------------------
# AOT specs (see cogvx_kernels.triton.aot)
# ---------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def aot_specs() -> list[dict]:
    """Production compile specs for cogvx_kernels.triton.aot: every kernel x arch (80, 90) x dtype
    (bf16, fp16, fp32 as TF32) with the config the launcher picks (``block_config``) for a 3x3x3
    kernel and 128..512 channels, on contiguous (NCTHW) tensors: unit innermost strides are
    constexpr 1 as the JIT specialises them, batch strides are i64 (they pass 2^31 for 512-channel
    videos), pointers and channel counts are 16-divisible. The forward is also compiled for
    channels_last_3d input (unit channel stride), and for bf16 every kernel also for the 3-channel
    first (conv_in: C_in = 3) and last (conv_out: C_out = 3) layers, whose blocks shrink.

    Each spec: name, kernel, signature, constexprs, options, uses_dot, arch, attrs (argument name
    -> divisibility)."""
    from .aot import signature

    specs = []
    # (suffix, C_in, C_out)
    channel_cases = {"": (512, 512), "_cin3": (3, 128), "_cout3": (128, 3)}
    pixels = 60 * 90
    for arch in (80, 90):
        for dtype, ty in _TL_DTYPE.items():
            cls = _dtype_class(dtype)
            p = f"*{ty}"
            for case, (c_in, c_out) in channel_cases.items():
                if case and dtype != torch.bfloat16:
                    continue
                divisible = tuple(name for name, c in (("C_in", c_in), ("C_out", c_out)) if c % 16 == 0)
                gemm = {"fwd": (pixels, c_out, c_in), "dx": (pixels, c_in, c_out), "dw": (c_out, c_in, None)}

                def add(kind, kernel, pointers, extra_const, i64, layout="", div_strides=()):
                    cfg = block_config(kind, arch, cls, *gemm[kind])
                    constexprs = dict(KT=3, KH=3, KW=3, OFF64=False, DOT_FP32=False,
                                      PRECISION="tf32" if cls == "32" else "ieee",
                                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                      **extra_const)
                    specs.append(dict(
                        name=f"causal_conv3d_{kind}{layout}{case}_{ty}_sm{arch}",
                        kernel=kernel,
                        signature=signature(kernel, pointers, constexprs, dict.fromkeys(i64, "i64")),
                        constexprs=constexprs,
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                        uses_dot=True,
                        arch=arch,
                        attrs={name: 16 for name in (*pointers, *divisible, *div_strides)},
                    ))

                fwd_ptrs = dict(x_ptr=p, h_ptr=p, w_ptr=p, bias_ptr=p, y_ptr=p)
                add("fwd", causal_conv3d_fwd_kernel, fwd_ptrs, dict(HAS_BIAS=True, sxw=1, shw=1),
                    ("sxb", "shb", "syb"))
                if not case:
                    # channels_last_3d: every stride but the channel one is a multiple of C
                    add("fwd", causal_conv3d_fwd_kernel, fwd_ptrs, dict(HAS_BIAS=True, sxc=1, shc=1),
                        ("sxb", "shb", "syb"), layout="_cl",
                        div_strides=("sxb", "sxt", "sxh", "sxw", "shb", "sht", "shh", "shw"))
                add("dx", causal_conv3d_bwd_dx_kernel, dict(g_ptr=p, w_ptr=p, gx_ptr=p, gh_ptr=p),
                    dict(HAS_HALO=True, sgw=1), ("sgb",))
                add("dw", causal_conv3d_bwd_dw_kernel, dict(g_ptr=p, x_ptr=p, h_ptr=p, part_ptr="*fp32"),
                    dict(sgw=1, sxw=1, shw=1), ("sgb", "sxb", "shb"))
    return specs

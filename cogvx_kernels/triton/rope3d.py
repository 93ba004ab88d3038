"""Triton kernels of CogVideoX's 3D RoPE and of the fused per-head q/k LayerNorm + 3D RoPE, forward
and backward.

Semantics (ground truth: ``cogvx_kernels.reference.rope3d``; index math: ``csrc/common/rope3d.h``):
x is (B, heads, L, D) with any strides (typically the head-split view ``(B, L, heads, D).transpose(1,
2)``, read in place, never copied), L = text_len + T·H·W. Text tokens [0, text_len) pass through;
video token l (v = l - text_len = (t·H + h)·W + w) rotates channel pair i (channels 2i, 2i+1):

    out[2i] = a·c - b·s,  out[2i+1] = b·c + a·s,   (c, s) = tables[:, row, i]

with row = t for the first axes_dim[0]/2 pairs, T + h for the next axes_dim[1]/2, T + H + w for the
rest; ``inverse`` negates s (the backward of the rotation). ``tables`` is the (2, T+H+W, D/2) fp32
(cos, sin) of ``reference.rope3d.axis_tables``: looked up per (token, pair), no (L, D) table is built.

Method: a program owns BLOCK_ROWS consecutive tokens of one (batch, head) × all D channels. The tile
is loaded once, contiguous along D (coalesced, vectorised when the channel stride is 1), viewed as
(BLOCK_ROWS, BLOCK_D/2, 2) and split into the even and odd channels (a register-only reshape), which
gives the pairs without a second load. Programs are ordered head-fastest (pid = block·B·heads + bh),
so concurrently running programs read the same tokens of neighbouring heads (contiguous memory in the
head-split layout) and the same table rows. The (cos, sin) of a token come from its three table
rows (t, T + h, T + H + w), each loaded whole (vectorised, L1-resident: the tables are a few KiB)
and selected per pair column. All math is fp32; results are cast to the element type of the output
pointer (rounded to nearest even). Tiles: 4096 elements forward (64 rows at D = 64, 32 at D = 128),
2048 in the backward; 4 warps; no register spills on sm_80 / sm_90.

* ``rope3d``: rotation (or copy for text tokens); ``out`` may be x itself (every program loads its
  whole tile before storing, and tiles are disjoint).
* ``qk_norm_rope3d``: LayerNorm over D of every row (biased variance, rstd = 1/sqrt(var + eps)),
  times weight plus bias (each optional), then the rotation for video tokens; also stores the fp32
  per-row mean and rstd for the backward.
* ``qk_norm_rope3d_backward``: grad_out is un-rotated (inverse rotation) for video tokens, then the
  LayerNorm backward. A fixed number of programs (a multiple of the SM count) each loops over a
  contiguous range of row blocks, prefetching the next block's tiles into registers while it
  computes the current one; grad_weight / grad_bias: (BLOCK_ROWS, D/2) fp32 partials accumulate in
  registers, are reduced once per program into an fp32 workspace (programs, 2, D), and torch sums
  that (deterministic, no atomics).

Offsets that can exceed 2^31 (batch, head and token strides times indices) are int64; the
in-row channel offsets and the table offsets are int32.

Interpreter (TRITON_INTERPRET=1, CPU tensors): the same fixed configuration (no autotuning), fewer
backward programs so that the loop over row blocks is exercised, and an explicit round-to-nearest
before bf16 stores (the interpreter's fp32 -> bf16 conversion truncates; GPUs round to nearest). ``aot_specs()`` lists the
production configurations (bf16, D = 64 and 128, sm_80 / sm_90) for ``cogvx_kernels.triton.aot``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import interpreted

__all__ = ["rope3d", "rope3d_", "qk_norm_rope3d", "qk_norm_rope3d_backward", "aot_specs"]


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tile_coords(pid, n_bh, NH, BLOCK_ROWS: tl.constexpr):
    """(batch, head, flat batch·head, token indices of the tile) of program / flat block `pid`:
    head-fastest order."""
    bh = pid % n_bh
    blk = pid // n_bh
    b = bh // NH
    hd = bh % NH
    tok = blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return b, hd, bh, tok


@triton.jit
def _cos_sin(tab_ptr, tok, row_ok, pairs, text_len, T, H, W, half_t, half_th,
             HALF_D: tl.constexpr, INVERSE: tl.constexpr):
    """(is_video (R,), cos (R, P), sin (R, P)) of tokens `tok` (R,) and channel pairs `pairs` (P,)
    (the pair axis may be padded past HALF_D): cos 1 / sin 0 where nothing rotates (text tokens,
    masked rows, padding pairs). INVERSE negates sin.

    The three table rows of a token (t, T + h, T + H + w) are each loaded whole (contiguous along
    the pairs, so the loads vectorise and share the layout of the data tiles) and the pair columns
    select among them: no per-element gather."""
    v = tok - text_len
    is_video = (v >= 0) & row_ok
    v = tl.maximum(v, 0)
    w = v % W
    vh = v // W
    h = vh % H
    t = vh // H
    p = pairs[None, :]
    m = is_video[:, None] & (p < HALF_D)
    off_t = (t * HALF_D)[:, None] + p
    off_h = ((T + h) * HALF_D)[:, None] + p
    off_w = ((T + H + w) * HALF_D)[:, None] + p
    sin_ptr = tab_ptr + (T + H + W) * HALF_D
    in_t = p < half_t
    in_h = p < half_th
    c = tl.where(in_t, tl.load(tab_ptr + off_t, mask=m, other=1.0),
                 tl.where(in_h, tl.load(tab_ptr + off_h, mask=m, other=1.0),
                          tl.load(tab_ptr + off_w, mask=m, other=1.0)))
    s = tl.where(in_t, tl.load(sin_ptr + off_t, mask=m, other=0.0),
                 tl.where(in_h, tl.load(sin_ptr + off_h, mask=m, other=0.0),
                          tl.load(sin_ptr + off_w, mask=m, other=0.0)))
    if INVERSE:
        s = -s
    return is_video, c, s


@triton.jit
def _load_pairs(ptr, row_off, cols, mask, BLOCK_ROWS: tl.constexpr, HALF: tl.constexpr):
    """Loads a (BLOCK_ROWS, 2·HALF) tile (coalesced along the channels) as fp32 and splits it into
    the even channels and the odd channels, (BLOCK_ROWS, HALF) each."""
    x = tl.load(ptr + (row_off[:, None] + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (BLOCK_ROWS, HALF, 2)))


# Triton's interpreter converts fp32 to bf16 by truncation (round toward zero) where GPUs round to
# nearest even; under the interpreter the kernels round to bf16 precision explicitly first (exact
# RTNE, then the truncating conversion is exact), so interpreted results match the GPU's. Folded
# away when compiled.
_INTERPRET_RTNE_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _to_out(y, ty: tl.constexpr):
    """y (fp32) converted to the element type `ty`, rounding to nearest even."""
    if _INTERPRET_RTNE_BF16:
        if ty == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    return y.to(ty)


@triton.jit
def _store_pairs(ptr, row_off, cols, mask, a, b, BLOCK_ROWS: tl.constexpr, HALF: tl.constexpr):
    """Interleaves the even (a) and odd (b) channels back and stores the tile in ptr's type."""
    y = tl.reshape(tl.join(a, b), (BLOCK_ROWS, 2 * HALF))
    tl.store(ptr + (row_off[:, None] + cols[None, :]), _to_out(y, ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope3d_kernel(x_ptr, tab_ptr, out_ptr,
                  NH, n_bh, L, text_len, T, H, W, half_t, half_th,
                  sxb, sxh, sxl, sxd, sob, soh, sol, sod,
                  D: tl.constexpr, INVERSE: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, hd, l, :] = rope(x[b, hd, l, :]) for BLOCK_ROWS tokens l; grid (n_bh · cdiv(L, BLOCK_ROWS),)."""
    HALF: tl.constexpr = BLOCK_D // 2
    b, hd, bh, tok = _tile_coords(tl.program_id(0), n_bh, NH, BLOCK_ROWS)
    row_ok = tok < L
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    tok64 = tok.to(tl.int64)
    x_base = x_ptr + (b.to(tl.int64) * sxb + hd.to(tl.int64) * sxh)
    a, bb = _load_pairs(x_base, tok64 * sxl, cols * sxd, mask, BLOCK_ROWS, HALF)
    is_video, c, s = _cos_sin(tab_ptr, tok, row_ok, tl.arange(0, HALF), text_len, T, H, W, half_t, half_th,
                              D // 2, INVERSE)
    vid = is_video[:, None]
    oa = tl.where(vid, a * c - bb * s, a)
    ob = tl.where(vid, bb * c + a * s, bb)
    o_base = out_ptr + (b.to(tl.int64) * sob + hd.to(tl.int64) * soh)
    _store_pairs(o_base, tok64 * sol, cols * sod, mask, oa, ob, BLOCK_ROWS, HALF)


@triton.jit
def qk_norm_rope3d_fwd_kernel(x_ptr, w_ptr, b_ptr, tab_ptr, out_ptr, mean_ptr, rstd_ptr,
                              NH, n_bh, L, text_len, T, H, W, half_t, half_th, eps,
                              sxb, sxh, sxl, sxd,
                              D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                              BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """LayerNorm over D + RoPE of BLOCK_ROWS tokens of one (batch, head); out contiguous (B, NH, L, D),
    mean / rstd fp32 contiguous (B, NH, L). Grid (n_bh · cdiv(L, BLOCK_ROWS),)."""
    HALF: tl.constexpr = BLOCK_D // 2
    b, hd, bh, tok = _tile_coords(tl.program_id(0), n_bh, NH, BLOCK_ROWS)
    row_ok = tok < L
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    tok64 = tok.to(tl.int64)
    x_base = x_ptr + (b.to(tl.int64) * sxb + hd.to(tl.int64) * sxh)
    a, bb = _load_pairs(x_base, tok64 * sxl, cols * sxd, mask, BLOCK_ROWS, HALF)

    pairs = tl.arange(0, HALF)
    pair_ok = (pairs < D // 2)[None, :]
    mean = (tl.sum(a, axis=1) + tl.sum(bb, axis=1)) / D
    da = tl.where(pair_ok, a - mean[:, None], 0.0)
    db = tl.where(pair_ok, bb - mean[:, None], 0.0)
    var = (tl.sum(da * da, axis=1) + tl.sum(db * db, axis=1)) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    ya = da * rstd[:, None]
    yb = db * rstd[:, None]
    if HAS_W:
        ya = ya * tl.load(w_ptr + 2 * pairs, mask=pairs < D // 2, other=0.0).to(tl.float32)[None, :]
        yb = yb * tl.load(w_ptr + 2 * pairs + 1, mask=pairs < D // 2, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        ya = ya + tl.load(b_ptr + 2 * pairs, mask=pairs < D // 2, other=0.0).to(tl.float32)[None, :]
        yb = yb + tl.load(b_ptr + 2 * pairs + 1, mask=pairs < D // 2, other=0.0).to(tl.float32)[None, :]

    is_video, c, s = _cos_sin(tab_ptr, tok, row_ok, pairs, text_len, T, H, W, half_t, half_th, D // 2, False)
    vid = is_video[:, None]
    oa = tl.where(vid, ya * c - yb * s, ya)
    ob = tl.where(vid, yb * c + ya * s, yb)

    row_lin = bh.to(tl.int64) * L + tok64  # (b, head, token) of the contiguous (B, NH, L) layouts
    _store_pairs(out_ptr, row_lin * D, cols, mask, oa, ob, BLOCK_ROWS, HALF)
    tl.store(mean_ptr + row_lin, mean, mask=row_ok)
    tl.store(rstd_ptr + row_lin, rstd, mask=row_ok)


@triton.jit
def _bwd_load(g_ptr, x_ptr, mean_ptr, rstd_ptr, f, f_hi, n_bh, NH, L, cols, col_ok,
              sgb, sgh, sgl, sgd, sxb, sxh, sxl, sxd, BLOCK_ROWS: tl.constexpr):
    """The grad_out and x tiles (storage type) and the mean / rstd of flat row block f; all zero
    (nothing read) when f >= f_hi."""
    b, hd, bh, tok = _tile_coords(f, n_bh, NH, BLOCK_ROWS)
    row_ok = (tok < L) & (f < f_hi)
    mask = row_ok[:, None] & col_ok
    tok64 = tok.to(tl.int64)
    g_base = g_ptr + (b.to(tl.int64) * sgb + hd.to(tl.int64) * sgh)
    x_base = x_ptr + (b.to(tl.int64) * sxb + hd.to(tl.int64) * sxh)
    g = tl.load(g_base + ((tok64 * sgl)[:, None] + (cols * sgd)[None, :]), mask=mask, other=0.0)
    x = tl.load(x_base + ((tok64 * sxl)[:, None] + (cols * sxd)[None, :]), mask=mask, other=0.0)
    row_lin = bh.to(tl.int64) * L + tok64
    mean = tl.load(mean_ptr + row_lin, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + row_lin, mask=row_ok, other=0.0)
    return g, x, mean, rstd


@triton.jit
def qk_norm_rope3d_bwd_kernel(g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, tab_ptr, gx_ptr, part_ptr,
                              NH, n_bh, L, text_len, T, H, W, half_t, half_th, n_blocks, blocks_per_prog,
                              sgb, sgh, sgl, sgd, sxb, sxh, sxl, sxd,
                              D: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
                              NEED_DB: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p handles the flat row blocks [p·blocks_per_prog, (p+1)·blocks_per_prog) ∩ [0, n_blocks)
    (flat block f: batch·head f % n_bh, token block f // n_bh). grad_x contiguous (B, NH, L, D) in
    gx's type; part (programs, 2, D) fp32: [p, 0] sum of un-rotated grad · xhat, [p, 1] sum of
    un-rotated grad, over the program's rows (written when NEED_DW / NEED_DB)."""
    HALF: tl.constexpr = BLOCK_D // 2
    pid = tl.program_id(0)
    pairs = tl.arange(0, HALF)
    pair_ok = pairs < D // 2
    cols = tl.arange(0, BLOCK_D)
    col_ok = (cols < D)[None, :]
    if HAS_W:
        wa = tl.load(w_ptr + 2 * pairs, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
        wb = tl.load(w_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
    acc_wa = tl.zeros((BLOCK_ROWS, HALF), dtype=tl.float32)
    acc_wb = tl.zeros((BLOCK_ROWS, HALF), dtype=tl.float32)
    acc_ba = tl.zeros((BLOCK_ROWS, HALF), dtype=tl.float32)
    acc_bb = tl.zeros((BLOCK_ROWS, HALF), dtype=tl.float32)
    f_lo = pid * blocks_per_prog
    f_hi = tl.minimum(f_lo + blocks_per_prog, n_blocks)
    # the loads of block f + 1 are issued before block f is computed (a register double buffer, in
    # the storage type): twice the bytes in flight per program
    g_nxt, x_nxt, mean_nxt, rstd_nxt = _bwd_load(g_ptr, x_ptr, mean_ptr, rstd_ptr, f_lo, f_hi, n_bh, NH, L, cols,
                                                 col_ok, sgb, sgh, sgl, sgd, sxb, sxh, sxl, sxd, BLOCK_ROWS)
    for f in range(f_lo, f_hi):
        g_cur, x_cur, mean, rstd = g_nxt, x_nxt, mean_nxt[:, None], rstd_nxt[:, None]
        g_nxt, x_nxt, mean_nxt, rstd_nxt = _bwd_load(g_ptr, x_ptr, mean_ptr, rstd_ptr, f + 1, f_hi, n_bh, NH, L,
                                                     cols, col_ok, sgb, sgh, sgl, sgd, sxb, sxh, sxl, sxd,
                                                     BLOCK_ROWS)
        b, hd, bh, tok = _tile_coords(f, n_bh, NH, BLOCK_ROWS)
        row_ok = tok < L
        mask = row_ok[:, None] & col_ok
        row_lin = bh.to(tl.int64) * L + tok.to(tl.int64)
        ga, gb = tl.split(tl.reshape(g_cur.to(tl.float32), (BLOCK_ROWS, HALF, 2)))
        xa, xb = tl.split(tl.reshape(x_cur.to(tl.float32), (BLOCK_ROWS, HALF, 2)))

        # un-rotate the gradient (the transpose of the rotation: the inverse rotation)
        is_video, c, s = _cos_sin(tab_ptr, tok, row_ok, pairs, text_len, T, H, W, half_t, half_th, D // 2, True)
        vid = is_video[:, None]
        ua = tl.where(vid, ga * c - gb * s, ga)
        ub = tl.where(vid, gb * c + ga * s, gb)

        # LayerNorm backward (masked rows / padding channels: x, grad, mean, rstd all 0 -> 0)
        xha = tl.where(pair_ok[None, :], (xa - mean) * rstd, 0.0)
        xhb = tl.where(pair_ok[None, :], (xb - mean) * rstd, 0.0)
        if HAS_W:
            pa = ua * wa
            pb = ub * wb
        else:
            pa = ua
            pb = ub
        c1 = ((tl.sum(pa * xha, axis=1) + tl.sum(pb * xhb, axis=1)) / D)[:, None]
        c2 = ((tl.sum(pa, axis=1) + tl.sum(pb, axis=1)) / D)[:, None]
        dxa = rstd * (pa - c2 - xha * c1)
        dxb = rstd * (pb - c2 - xhb * c1)
        _store_pairs(gx_ptr, row_lin * D, cols, mask, dxa, dxb, BLOCK_ROWS, HALF)
        if NEED_DW:
            acc_wa += ua * xha
            acc_wb += ub * xhb
        if NEED_DB:
            acc_ba += ua
            acc_bb += ub
    part = part_ptr + pid.to(tl.int64) * (2 * D)
    if NEED_DW:
        dw = tl.reshape(tl.join(tl.sum(acc_wa, axis=0), tl.sum(acc_wb, axis=0)), (BLOCK_D,))
        tl.store(part + cols, dw, mask=cols < D)
    if NEED_DB:
        dbias = tl.reshape(tl.join(tl.sum(acc_ba, axis=0), tl.sum(acc_bb, axis=0)), (BLOCK_D,))
        tl.store(part + D + cols, dbias, mask=cols < D)


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

NUM_WARPS = 4
# elements (rows × BLOCK_D) of a program's tile: forward kernels, backward (which holds two input
# tiles and up to four fp32 partial accumulators per iteration)
_FWD_TILE = 4096
_BWD_TILE = 2048
# backward programs per SM (each loops over row blocks; 24 = whole waves at 2, 3, 4, 6 or 8
# resident programs per SM: ~156-168 registers per thread -> 3) and, under the interpreter,
# programs in all
_BWD_PROGRAMS_PER_SM = 24
_INTERPRET_BWD_PROGRAMS = 3


def _block_d(D: int) -> int:
    return max(2, triton.next_power_of_2(D))


def _block_rows(D: int, tile: int) -> int:
    return max(1, min(128, tile // _block_d(D)))




# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _grid_args(x: torch.Tensor, tables: torch.Tensor, axes_dim) -> tuple:
    """(tables fp32 contiguous, B, NH, L, D, half_t, half_th) of arguments that `ops.rope3d` /
    `ops.qk_norm_rope3d` validated and built."""
    B, NH, L, D = x.shape
    return tables.to(torch.float32).contiguous(), B, NH, L, D, axes_dim[0] // 2, (axes_dim[0] + axes_dim[1]) // 2


def _safe_grid(v: int) -> int:
    # the kernels divide by W and H: keep them >= 1 (with T·H·W = 0 no token is video anyway)
    return max(int(v), 1)


def rope3d(x: torch.Tensor, tables: torch.Tensor, text_len: int, grid_t: int, grid_h: int, grid_w: int,
           axes_dim, inverse: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """3D RoPE of x (B, heads, L, D) (any strides; text tokens copied), by the (cos, sin) `tables`
    (2, T+H+W, D/2) fp32; `inverse` rotates by minus the angle. Returns a new contiguous tensor of
    x's dtype, or writes into `out` (any strides, same shape; may be x itself) and returns it."""
    tables, B, NH, L, D, half_t, half_th = _grid_args(x, tables, axes_dim)
    if out is None:
        out = torch.empty((B, NH, L, D), device=x.device, dtype=x.dtype)
    elif tuple(out.shape) != tuple(x.shape) or out.device != x.device:
        raise ValueError(f"rope3d: out must be like x {tuple(x.shape)}; got {tuple(out.shape)} on {out.device}")
    if x.numel() == 0:
        return out
    br = _block_rows(D, _FWD_TILE)
    n_bh = B * NH
    grid = (n_bh * triton.cdiv(L, br),)
    rope3d_kernel[grid](
        x, tables, out,
        NH, n_bh, L, text_len, grid_t, _safe_grid(grid_h), _safe_grid(grid_w), half_t, half_th,
        *x.stride(), *out.stride(),
        D=D, INVERSE=bool(inverse), BLOCK_ROWS=br, BLOCK_D=_block_d(D), num_warps=NUM_WARPS)
    return out


def rope3d_(x: torch.Tensor, tables: torch.Tensor, text_len: int, grid_t: int, grid_h: int, grid_w: int,
            axes_dim, inverse: bool) -> None:
    """In-place `rope3d` (the contract of cogvx::rope3d_)."""
    rope3d(x, tables, text_len, grid_t, grid_h, grid_w, axes_dim, inverse, out=x)


def qk_norm_rope3d(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, tables: torch.Tensor,
                   text_len: int, grid_t: int, grid_h: int, grid_w: int, axes_dim, eps: float):
    """(out, mean, rstd): LayerNorm over D of every (b, head, token) row of x (any strides), times
    weight plus bias (each (D,) or None), then the 3D RoPE of the video tokens, in fp32. out:
    contiguous, x's dtype; mean / rstd: fp32 (B, heads, L) contiguous."""
    tables, B, NH, L, D, half_t, half_th = _grid_args(x, tables, axes_dim)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty((B, NH, L, D), device=x.device, dtype=x.dtype)
    mean = torch.empty((B, NH, L), device=x.device, dtype=torch.float32)
    rstd = torch.empty((B, NH, L), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return out, mean, rstd
    br = _block_rows(D, _FWD_TILE)
    n_bh = B * NH
    grid = (n_bh * triton.cdiv(L, br),)
    qk_norm_rope3d_fwd_kernel[grid](
        x, weight if weight is not None else x, bias if bias is not None else x, tables, out, mean, rstd,
        NH, n_bh, L, text_len, grid_t, _safe_grid(grid_h), _safe_grid(grid_w), half_t, half_th, float(eps),
        *x.stride(),
        D=D, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_ROWS=br, BLOCK_D=_block_d(D),
        num_warps=NUM_WARPS)
    return out, mean, rstd


def _bwd_programs(n_blocks: int, device: torch.device, interpreted: bool) -> int:
    if interpreted:
        return max(1, min(n_blocks, _INTERPRET_BWD_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, _BWD_PROGRAMS_PER_SM * sms))


def qk_norm_rope3d_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                            mean: torch.Tensor, rstd: torch.Tensor, tables: torch.Tensor, text_len: int,
                            grid_t: int, grid_h: int, grid_w: int, axes_dim, has_weight: bool, has_bias: bool,
                            programs: int | None = None):
    """(grad_x, grad_weight, grad_bias) of `qk_norm_rope3d` (the contract of
    cogvx::qk_norm_rope3d_backward). grad_out / x: any strides; grad_x contiguous in x's dtype;
    grad_weight / grad_bias fp32 (D,), or empty (0,) when has_weight / has_bias is False.
    `programs` (tests): the number of programs the rows are split over (default: 24 per SM)."""
    tables, B, NH, L, D, half_t, half_th = _grid_args(x, tables, axes_dim)
    weight = weight.contiguous() if has_weight and weight is not None else None
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    dev = x.device
    grad_x = torch.empty((B, NH, L, D), device=dev, dtype=x.dtype)
    # grad_weight / grad_bias never alias each other (nor anything else): custom ops require it
    def empty():
        return torch.empty((0,), device=dev, dtype=torch.float32)

    if x.numel() == 0:
        def zeros():
            return torch.zeros((D,), device=dev, dtype=torch.float32)
        return grad_x, zeros() if has_weight else empty(), zeros() if has_bias else empty()
    kernel = qk_norm_rope3d_bwd_kernel
    br = _block_rows(D, _BWD_TILE)
    n_bh = B * NH
    n_blocks = n_bh * triton.cdiv(L, br)
    n_prog = programs or _bwd_programs(n_blocks, dev, interpreted(kernel))
    n_prog = max(1, min(int(n_prog), n_blocks))
    per_prog = triton.cdiv(n_blocks, n_prog)
    n_prog = triton.cdiv(n_blocks, per_prog)
    need = has_weight or has_bias
    part = torch.empty((n_prog if need else 1, 2, D), device=dev, dtype=torch.float32)
    kernel[(n_prog,)](
        grad_out, x, weight if weight is not None else x, mean, rstd, tables, grad_x, part,
        NH, n_bh, L, text_len, grid_t, _safe_grid(grid_h), _safe_grid(grid_w), half_t, half_th, n_blocks, per_prog,
        *grad_out.stride(), *x.stride(),
        D=D, HAS_W=weight is not None, NEED_DW=bool(has_weight), NEED_DB=bool(has_bias),
        BLOCK_ROWS=br, BLOCK_D=_block_d(D), num_warps=NUM_WARPS)
    if need:
        sums = part[0] if n_prog == 1 else part.sum(dim=0)
    grad_weight = sums[0].clone() if has_weight else empty()
    grad_bias = sums[1].clone() if has_bias else empty()
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# AOT specs (see cogvx_kernels.triton.aot)
# ---------------------------------------------------------------------------------------------

def aot_specs() -> list[dict]:
    """Production compile specs: the three kernels in bf16 for D = 64 and 128 (CogVideoX-2B / -5B
    head dims), every arch (no `arch` key: sm_80 and sm_90), with the launchers' fixed tiles and 4
    warps, for the head-split view of q/k (channel stride constexpr 1 as the JIT specialises it;
    token / head / batch strides i32 multiples of 16, as for 48 heads × D); rope3d forward and
    inverse; LayerNorm with weight and bias."""
    from .aot import signature

    specs = []
    bf16 = "*bf16"
    for D in (64, 128):
        bd = _block_d(D)
        fwd_rows = _block_rows(D, _FWD_TILE)
        bwd_rows = _block_rows(D, _BWD_TILE)
        options = dict(num_warps=NUM_WARPS, num_stages=1)

        for inverse in (False, True):
            const = dict(D=D, INVERSE=inverse, BLOCK_ROWS=fwd_rows, BLOCK_D=bd, sxd=1, sod=1)
            ptrs = dict(x_ptr=bf16, tab_ptr="*fp32", out_ptr=bf16)
            specs.append(dict(
                name=f"rope3d{'_inv' if inverse else ''}_d{D}_bf16", kernel=rope3d_kernel,
                signature=signature(rope3d_kernel, ptrs, const), constexprs=const, options=options,
                uses_dot=False,
                attrs={n: 16 for n in (*ptrs, "sxb", "sxh", "sxl", "sob", "soh", "sol")}))

        const = dict(D=D, HAS_W=True, HAS_B=True, BLOCK_ROWS=fwd_rows, BLOCK_D=bd, sxd=1)
        ptrs = dict(x_ptr=bf16, w_ptr=bf16, b_ptr=bf16, tab_ptr="*fp32", out_ptr=bf16, mean_ptr="*fp32",
                    rstd_ptr="*fp32")
        specs.append(dict(
            name=f"qk_norm_rope3d_fwd_d{D}_bf16", kernel=qk_norm_rope3d_fwd_kernel,
            signature=signature(qk_norm_rope3d_fwd_kernel, ptrs, const, {"eps": "fp32"}), constexprs=const,
            options=options, uses_dot=False,
            attrs={n: 16 for n in (*ptrs, "sxb", "sxh", "sxl")}))

        const = dict(D=D, HAS_W=True, NEED_DW=True, NEED_DB=True, BLOCK_ROWS=bwd_rows, BLOCK_D=bd, sgd=1, sxd=1)
        ptrs = dict(g_ptr=bf16, x_ptr=bf16, w_ptr=bf16, mean_ptr="*fp32", rstd_ptr="*fp32", tab_ptr="*fp32",
                    gx_ptr=bf16, part_ptr="*fp32")
        specs.append(dict(
            name=f"qk_norm_rope3d_bwd_d{D}_bf16", kernel=qk_norm_rope3d_bwd_kernel,
            signature=signature(qk_norm_rope3d_bwd_kernel, ptrs, const), constexprs=const, options=options,
            uses_dot=False,
            attrs={n: 16 for n in (*ptrs, "sgb", "sgh", "sgl", "sxb", "sxh", "sxl")}))
    return specs

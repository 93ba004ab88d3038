"""`rope3d` and `qk_norm_rope3d`: CogVideoX's 3D rotary embedding, alone or fused with the
per-head q/k LayerNorm.

The public functions validate, turn the per-axis positions into tiny cos/sin tables
(`reference.rope3d.axis_tables`, (2, T+H+W, D/2) fp32: never an (L, D) table) and call the chosen
backend. Every backend takes (x, tables, text_len, T, H, W, axes_dim, ...) so parity is checked on
identical inputs.
"""
from __future__ import annotations

import torch

from .. import _registry
from ..reference import rope3d as reference
from ._checks import check_fp32_positive, check_like, check_tensor, is_int
from ._declare import declare

AXES_DIM = (16, 24, 24)


def rope3d(x: torch.Tensor, *, text_len: int, pos_t, pos_h, pos_w, axes_dim=AXES_DIM, theta: float = 10000.0,
           inplace: bool = False, backend: str | None = None) -> torch.Tensor:
    """3D RoPE of the video tokens of x (B, heads, text_len + T·H·W, D), any strides.

    pos_t, pos_h, pos_w: 1-D float positions per axis (or an int n for arange(n)); channels split
    into axes_dim = (d_t, d_h, d_w) blocks; pair (2i, 2i+1) of block a turns by pos_a · θ^(−2i/d_a).
    Text tokens pass through. theta: a normal positive fp32 (the tables are fp32). Returns a new tensor
    (x untouched) unless inplace=True (inference; x must not be an expanded view: its elements must
    not share memory).
    """
    positions, grid, theta = check_rope_args(x, text_len, pos_t, pos_h, pos_w, axes_dim, theta)
    if inplace and x.requires_grad and torch.is_grad_enabled():
        raise ValueError("rope3d(inplace=True) is for inference: x requires grad; use inplace=False")
    tables = reference.axis_tables(*positions, tuple(axes_dim), theta)
    impl = _registry.select("rope3d", backend, x.device, x.dtype)
    args = (tables, text_len, *grid, list(axes_dim), False)
    if inplace:  # refused where x's elements share memory (the in-place op checks it)
        _ROPE_INPLACE[impl.backend](x, *args)
        return x
    return impl.fn(x, *args)


def qk_norm_rope3d(q: torch.Tensor, k: torch.Tensor, norm_q_weight=None, norm_q_bias=None, norm_k_weight=None,
                   norm_k_bias=None, *, eps: float = 1e-6, text_len: int, pos_t, pos_h, pos_w, axes_dim=AXES_DIM,
                   theta: float = 10000.0, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head LayerNorm over D of q and k (all tokens), then 3D RoPE of their video tokens: one
    pass over q and one over k. Weights/biases are (D,) or None (no affine)."""
    positions, grid, theta = check_rope_args(q, text_len, pos_t, pos_h, pos_w, axes_dim, theta, name="q")
    tables = reference.axis_tables(*positions, tuple(axes_dim), theta)
    return _qk_norm_call(q, k, norm_q_weight, norm_q_bias, norm_k_weight, norm_k_bias, eps, tables, text_len, grid,
                         axes_dim, backend)


def _qk_norm_call(q, k, norm_q_weight, norm_q_bias, norm_k_weight, norm_k_bias, eps, tables, text_len, grid,
                  axes_dim, backend):
    check_tensor("k", k, dim=4, shape_doc="(B, heads, L, D)")
    check_like("k", k, "q", q)
    if k.shape[2:] != q.shape[2:] or k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch, length and head dim {tuple(q.shape[:1])}…{tuple(q.shape[2:])}; "
                         f"got {tuple(k.shape)}")
    D = q.shape[-1]
    for name, t in (("norm_q_weight", norm_q_weight), ("norm_q_bias", norm_q_bias),
                    ("norm_k_weight", norm_k_weight), ("norm_k_bias", norm_k_bias)):
        if t is not None:
            check_tensor(name, t, dim=1, shape_doc=f"(D,) = ({D},)")
            if t.shape[0] != D or t.device != q.device:
                raise ValueError(f"{name} must have shape ({D},) on {q.device}; got {tuple(t.shape)} on {t.device}")
            if t.dtype not in (q.dtype, torch.float32):  # what the kernels read
                raise TypeError(f"{name} must have q's dtype ({q.dtype}) or float32; got {t.dtype}")
    eps = check_fp32_positive("eps", eps, "the LayerNorm adds it to the variance in fp32")
    impl = _registry.select("qk_norm_rope3d", backend, q.device, q.dtype)
    args = (tables, text_len, *grid, list(axes_dim), eps)
    return impl.fn(q, norm_q_weight, norm_q_bias, *args)[0], impl.fn(k, norm_k_weight, norm_k_bias, *args)[0]


def qk_norm_rope3d_token_tables(q: torch.Tensor, k: torch.Tensor, norm_q_weight=None, norm_q_bias=None,
                                norm_k_weight=None, norm_k_bias=None, *, eps: float = 1e-6, text_len: int,
                                cos: torch.Tensor, sin: torch.Tensor,
                                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`qk_norm_rope3d` with per-token rotary tables instead of positions: cos, sin (N, D), one row
    per video token with each value repeated for the two channels of its pair (diffusers'
    `image_rotary_emb`). The same kernels read them, de-interleaved to (2, N, D/2), as a one-axis
    grid (1, 1, N) whose single block spans all D channels; the result equals rotating by the
    per-axis tables those rows were built from."""
    check_tensor("q", q, dim=4, shape_doc="(B, heads, L, D)")
    B, _, L, D = q.shape
    N = L - text_len if is_int(text_len) else -1
    if not 0 < N <= L:
        raise ValueError(f"text_len must be an int in [0, L={L}) (at least one video token); got {text_len!r}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dim=2, shape_doc="(video tokens, D)")
        if tuple(t.shape) != (N, D) or t.device != q.device:
            raise ValueError(f"{name} must have shape (L - text_len, D) = ({N}, {D}) on {q.device}: one row per "
                             f"video token; got {tuple(t.shape)} on {t.device}")
    if D % 2:
        raise ValueError(f"the head dim D must be even (channels rotate in pairs); got {D}")
    # the one-axis grid (1, 1, N): rows 0 and 1 (time, height) are never read, rows 2.. hold the tokens
    pad = cos.new_zeros((2, D // 2), dtype=torch.float32)
    tables = torch.stack([torch.cat([pad, cos[:, ::2].float()]), torch.cat([pad, sin[:, ::2].float()])])
    return _qk_norm_call(q, k, norm_q_weight, norm_q_bias, norm_k_weight, norm_k_bias, eps, tables, text_len,
                         (1, 1, N), (0, 0, D), backend)


def check_rope_args(x, text_len, pos_t, pos_h, pos_w, axes_dim, theta, name="x"):
    check_tensor(name, x, dim=4, shape_doc="(B, heads, L, D)")
    if x.dtype == torch.float64:
        raise TypeError(f"{name} must be float32, bfloat16 or float16; got {x.dtype}")
    D = x.shape[-1]
    if (not isinstance(axes_dim, (tuple, list)) or len(axes_dim) != 3
            or not all(is_int(d) and d > 0 for d in axes_dim)):
        raise ValueError(f"axes_dim must be three positive ints (d_t, d_h, d_w); got {axes_dim!r}")
    if any(d % 2 for d in axes_dim):
        raise ValueError(f"axes_dim must all be even (channels rotate in pairs); got {tuple(axes_dim)}")
    if sum(axes_dim) != D:
        raise ValueError(f"sum(axes_dim) must equal the head dim D={D}; got axes_dim={tuple(axes_dim)} "
                         f"(sum {sum(axes_dim)}); D=128 uses e.g. (32, 48, 48)")
    theta = check_fp32_positive("theta", theta, "the rotary tables are computed in fp32 as theta^(-2i/d)")
    positions = []
    for axis, pos in (("pos_t", pos_t), ("pos_h", pos_h), ("pos_w", pos_w)):
        if is_int(pos):
            if pos <= 0:
                raise ValueError(f"{axis} must be a positive int or a 1-D float tensor; got {pos}")
            pos = torch.arange(pos, dtype=torch.float32, device=x.device)
        if not isinstance(pos, torch.Tensor):
            raise TypeError(f"{axis} must be a 1-D float tensor (or an int n for arange(n)); got {type(pos).__name__}")
        if not pos.is_floating_point():
            raise TypeError(f"{axis} must be a floating tensor of positions; got {pos.dtype}")
        if pos.dim() != 1 or pos.numel() == 0:
            raise ValueError(f"{axis} must be a non-empty 1-D tensor; got shape {tuple(pos.shape)}")
        if pos.device != x.device:
            raise ValueError(f"{axis} must be on {name}'s device ({x.device}); got {pos.device}")
        positions.append(pos)
    if not is_int(text_len) or text_len < 0:
        raise ValueError(f"text_len must be a non-negative int; got {text_len!r}")
    grid = tuple(p.numel() for p in positions)
    L = x.shape[2]
    if text_len + grid[0] * grid[1] * grid[2] != L:
        raise ValueError(f"{name} has L={L} tokens but text_len + len(pos_t)·len(pos_h)·len(pos_w) = "
                         f"{text_len} + {grid[0]}·{grid[1]}·{grid[2]} = {text_len + grid[0] * grid[1] * grid[2]}")
    return positions, grid, theta


# ---- declaration -------------------------------------------------------------------------------

_GRID = "Tensor tables, SymInt text_len, SymInt T, SymInt H, SymInt W, SymInt[] axes_dim"
ROPE_SCHEMA = f"(Tensor x, {_GRID}, bool inverse) -> Tensor"
ROPE_INPLACE_SCHEMA = f"(Tensor(a0!) x, {_GRID}, bool inverse) -> ()"
NORM_SCHEMA = f"(Tensor x, Tensor? weight, Tensor? bias, {_GRID}, float eps) -> (Tensor, Tensor, Tensor)"
NORM_BACKWARD_SCHEMA = (f"(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, {_GRID}, "
                        "bool has_weight, bool has_bias) -> (Tensor, Tensor, Tensor)")


def _rope_fake(x, tables, text_len, T, H, W, axes_dim, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_setup(ctx, inputs, output):
    _, tables, text_len, T, H, W, axes_dim, inverse = inputs
    ctx.args = (tables, text_len, T, H, W, axes_dim, not inverse)


def _rope_backward(rope_op, ctx, grad):
    return (rope_op(grad, *ctx.args),)  # the rotation is orthogonal: its gradient rotates by minus the angle


def _reference_inplace(x, *args):
    x.copy_(reference.rope3d_tables(x, *args))


def _norm_fake(x, weight, bias, tables, text_len, T, H, W, axes_dim, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _norm_backward_fake(grad_out, x, weight, mean, rstd, tables, text_len, T, H, W, axes_dim, has_weight, has_bias):
    D = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((D if has_weight else 0,), dtype=torch.float32),
            x.new_empty((D if has_bias else 0,), dtype=torch.float32))


def _norm_setup(ctx, inputs, output):
    x, weight, bias, tables, text_len, T, H, W, axes_dim, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd, tables)
    ctx.grid = (text_len, T, H, W, axes_dim)
    ctx.has = (weight is not None, bias is not None)
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _norm_backward(backward_op, ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd, tables = ctx.saved_tensors
    grad_x, grad_w, grad_b = backward_op(grad_out.contiguous(), x, weight, mean, rstd, tables, *ctx.grid, *ctx.has)
    return grad_x, grad_w.to(ctx.dtypes[0]) if ctx.has[0] else None, grad_b.to(ctx.dtypes[1]) if ctx.has[1] else None


# float64 is refused by the argument checks (the tables are fp32). Every backward is deterministic
# (the parameter gradients are reduced in a fixed order, no atomics); the CUDA kernels' static shared
# memory fits every GPU.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON = ".triton.rope3d"
declare("rope3d", ROPE_SCHEMA, _rope_fake, backward=_rope_backward, setup_context=_rope_setup, backends={
    "reference": dict(fn=reference.rope3d_tables, dtypes=_DTYPES), "cpu": dict(dtypes=_DTYPES),
    "cuda": dict(dtypes=_DTYPES), "triton": dict(kernels=(_TRITON, "rope3d"), dtypes=_DTYPES)})
# the in-place variant of the backend chosen for rope3d (inference only: no autograd)
_ROPE_INPLACE = declare("rope3d_", ROPE_INPLACE_SCHEMA, lambda x, *args: None, register=False, backends={
    "reference": dict(fn=_reference_inplace), "cpu": {}, "cuda": {}, "triton": dict(kernels=(_TRITON, "rope3d_"))})
# every backend returns a tuple whose first element is the output (the ops' also mean and rstd)
declare("qk_norm_rope3d", NORM_SCHEMA, _norm_fake, backward=_norm_backward, setup_context=_norm_setup,
        backward_schema=NORM_BACKWARD_SCHEMA, backward_fake=_norm_backward_fake, backends={
            "reference": dict(fn=lambda *args: (reference.qk_norm_rope3d_tables(*args),), dtypes=_DTYPES),
            "cpu": dict(dtypes=_DTYPES), "cuda": dict(dtypes=_DTYPES),
            "triton": dict(kernels=(_TRITON, "qk_norm_rope3d", "qk_norm_rope3d_backward"), dtypes=_DTYPES)})

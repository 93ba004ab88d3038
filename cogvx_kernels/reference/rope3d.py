"""3D rotary position embedding (CogVideoX) in plain PyTorch: the ground truth of the rope kernels.

Channels of a head (D) split into blocks of `axes_dim` = (d_t, d_h, d_w), in that order. Video token
n = (t·H + h)·W + w (after `text_len` text tokens, which pass through) rotates channel pair
(2i, 2i+1) of block a by angle pos_a[coord_a] · θ^(−2i/d_a): interleaved pairs, as diffusers'
`apply_rotary_emb(use_real_unbind_dim=-1)`.

The kernels do not take angles per token: they read `axis_tables`, per-axis cos/sin tables of
shape (2, T+H+W, D/2) (a few KiB), computed here exactly as diffusers computes its frequencies.
"""
from __future__ import annotations

import torch


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """θ^(−2i/dim) for i < dim/2, in fp32, as diffusers' get_1d_rotary_pos_embed computes it."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim))


def axis_tables(pos_t: torch.Tensor, pos_h: torch.Tensor, pos_w: torch.Tensor, axes_dim, theta: float) -> torch.Tensor:
    """(2, T+H+W, D/2) fp32: [0] cos, [1] sin. Row T0+c of axis a (T0 = its row offset) holds, in the
    pair columns of that axis, the angles of coordinate c; other columns are unused (zero)."""
    positions = (pos_t, pos_h, pos_w)
    rows = sum(p.numel() for p in positions)
    half = sum(axes_dim) // 2
    angles = torch.zeros(rows, half, dtype=torch.float32, device=pos_t.device)
    row = col = 0
    for pos, dim in zip(positions, axes_dim):
        angles[row:row + pos.numel(), col:col + dim // 2] = torch.outer(pos.float(), inverse_frequencies(dim, theta, pos.device))
        row += pos.numel()
        col += dim // 2
    return torch.stack([angles.cos(), angles.sin()])


def token_cos_sin(pos_t, pos_h, pos_w, axes_dim, theta):
    """Per-token (T·H·W, D) cos and sin, repeat-interleaved over pairs: diffusers' layout (only the
    reference materialises these)."""
    cos, sin = [], []
    sizes = (pos_t.numel(), pos_h.numel(), pos_w.numel())
    for axis, (pos, dim) in enumerate(zip((pos_t, pos_h, pos_w), axes_dim)):
        angle = torch.outer(pos.float(), inverse_frequencies(dim, theta, pos.device))  # (n_a, dim/2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = sizes[axis]
        angle = angle.reshape(shape).expand(*sizes, dim // 2)
        cos.append(angle.cos())
        sin.append(angle.sin())
    cos = torch.cat(cos, -1).reshape(-1, sum(axes_dim) // 2).repeat_interleave(2, dim=-1)
    sin = torch.cat(sin, -1).reshape(-1, sum(axes_dim) // 2).repeat_interleave(2, dim=-1)
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rot(x)·sin with rot(x)[2i] = −x[2i+1], rot(x)[2i+1] = x[2i], in fp32."""
    x = x.float()
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def rope3d(x, text_len, pos_t, pos_h, pos_w, axes_dim=(16, 24, 24), theta=10000.0):
    cos, sin = token_cos_sin(pos_t, pos_h, pos_w, axes_dim, theta)
    video = rotate(x[:, :, text_len:], cos, sin).to(x.dtype)
    return torch.cat([x[:, :, :text_len], video], dim=2)


def qk_norm_rope3d(q, k, norm_q_weight, norm_q_bias, norm_k_weight, norm_k_bias, eps=1e-6, *, text_len,
                   pos_t, pos_h, pos_w, axes_dim=(16, 24, 24), theta=10000.0):
    """Per-head LayerNorm over D of q and k (all tokens), then RoPE on the video tokens; fp32 math
    throughout, rounded to the input dtype once at the end."""
    cos, sin = token_cos_sin(pos_t, pos_h, pos_w, axes_dim, theta)

    def one(x, weight, bias):
        y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                                           None if bias is None else bias.float(), eps)
        video = rotate(y[:, :, text_len:], cos, sin)
        return torch.cat([y[:, :, :text_len], video], dim=2).to(x.dtype)

    return one(q, norm_q_weight, norm_q_bias), one(k, norm_k_weight, norm_k_bias)


# ---- the registry's reference backend: same inputs as the kernels (per-axis tables) -------------

def expand_tables(tables: torch.Tensor, T: int, H: int, W: int, axes_dim) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (T·H·W, D) cos and sin from the per-axis tables (what the kernels look up)."""
    h_t, h_h = axes_dim[0] // 2, axes_dim[1] // 2
    out = []
    for table in tables:  # cos, then sin
        t = table[:T, :h_t][:, None, None].expand(T, H, W, -1)
        h = table[T:T + H, h_t:h_t + h_h][None, :, None].expand(T, H, W, -1)
        w = table[T + H:, h_t + h_h:][None, None].expand(T, H, W, -1)
        out.append(torch.cat([t, h, w], -1).reshape(T * H * W, -1).repeat_interleave(2, dim=-1))
    return out[0], out[1]


def rope3d_tables(x, tables, text_len, T, H, W, axes_dim, inverse=False):
    cos, sin = expand_tables(tables, T, H, W, axes_dim)
    video = rotate(x[:, :, text_len:], cos, -sin if inverse else sin).to(x.dtype)
    return torch.cat([x[:, :, :text_len], video], dim=2)


def qk_norm_rope3d_tables(x, weight, bias, tables, text_len, T, H, W, axes_dim, eps):
    cos, sin = expand_tables(tables, T, H, W, axes_dim)
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    return torch.cat([y[:, :, :text_len], rotate(y[:, :, text_len:], cos, sin)], dim=2).to(x.dtype)

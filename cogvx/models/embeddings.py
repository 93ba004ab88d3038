"""What turns the transformer's inputs into tokens: the timestep embedding, the patch embedding of
video latents and text, and CogVideoX-2B's 3D sin-cos positions.

Every formula follows diffusers 0.42 operation by operation (same dtypes, same order), so the
checkpoints it trained give the same numbers here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in fp32: frequencies max_period^(-i / (dim/2 - freq_shift)),
    [cos, sin] halves when flip_sin_to_cos (DDPM's timestep embedding)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    angles = timesteps[:, None].float() * torch.exp(exponent / (half - freq_shift))[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos
                    else [torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on a sinusoidal embedding (diffusers' TimestepEmbedding keys)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin, cos] table, in float64 as diffusers computes it."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    angles = torch.outer(positions.reshape(-1), 1.0 / 10000 ** omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_positions_3d(dim: int, frames: int, grid_h: int, grid_w: int, *, spatial_scale: float = 1.0,
                        temporal_scale: float = 1.0, device=None) -> torch.Tensor:
    """CogVideoX-2B's absolute 3D positions: (frames·grid_h·grid_w, dim) float64, tokens ordered
    (t, h, w); channels [time (dim/4) | width (3·dim/8) | height (3·dim/8)]."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4; got {dim}")
    dim_t, dim_s = dim // 4, 3 * dim // 4
    h = torch.arange(grid_h, dtype=torch.float32, device=device) / spatial_scale
    w = torch.arange(grid_w, dtype=torch.float32, device=device) / spatial_scale
    spatial = torch.cat([_sincos_1d(dim_s // 2, w.repeat(grid_h)),
                         _sincos_1d(dim_s // 2, h.repeat_interleave(grid_w))], dim=1)       # (h·w, dim_s)
    temporal = _sincos_1d(dim_t, torch.arange(frames, dtype=torch.float32, device=device) / temporal_scale)
    table = torch.cat([temporal[:, None].expand(-1, grid_h * grid_w, -1),
                       spatial[None].expand(frames, -1, -1)], dim=-1)
    return table.reshape(frames * grid_h * grid_w, dim)


class PatchEmbed(nn.Module):
    """Video latents (B, F, C, H, W) into tokens, patchified only spatially (p×p Conv2d: time is not
    patchified, so images and videos share the model) or, for CogVideoX 1.5, over p_t×p×p through a
    Linear on (C, p_t, p, p) features; text embeddings projected to the same width.
    Returns the joint sequence [text, video] (B, T + F'·H/p·W/p, dim) before positions are added
    (the model adds them: sin-cos or, with `learned_positions`, the `pos_embedding` table)."""

    def __init__(self, in_channels: int, dim: int, text_dim: int, *, patch_size: int, patch_size_t: int | None,
                 bias: bool = True, learned_positions: int | None = None):
        super().__init__()
        if learned_positions:  # CogVideoX-5B-I2V: a trained (1, text + video tokens, dim) table
            self.register_buffer("pos_embedding", torch.zeros(1, learned_positions, dim))
        self.patch_size, self.patch_size_t = patch_size, patch_size_t
        if patch_size_t is None:
            self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        else:
            self.proj = nn.Linear(in_channels * patch_size * patch_size * patch_size_t, dim)
        self.text_proj = nn.Linear(text_dim, dim)

    def video_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        b, f, c, h, w = latents.shape
        p = self.patch_size
        if self.patch_size_t is None:
            tokens = self.proj(latents.reshape(b * f, c, h, w))                  # (B·F, dim, h/p, w/p)
            return tokens.reshape(b, f, tokens.shape[1], -1).transpose(2, 3).flatten(1, 2)
        pt = self.patch_size_t
        patches = latents.reshape(b, f // pt, pt, c, h // p, p, w // p, p).permute(0, 1, 4, 6, 3, 2, 5, 7)
        return self.proj(patches.flatten(4).flatten(1, 3))

    def forward(self, text: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.text_proj(text), self.video_tokens(latents)], dim=1)

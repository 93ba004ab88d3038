"""Drop-in 3D-RoPE module: positions from the transformer config and the input size, then the
fused rope3d / qk_norm_rope3d ops (callers never pass rotary tables)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.rope3d import qk_norm_rope3d, rope3d


def resize_crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int):
    """The region of the base grid that a (grid_h, grid_w) grid maps onto, keeping its aspect ratio
    and centring it ((top, left), (bottom, right)); CogVideoX 1.0 spreads positions over it. Uses
    Python's round (banker's rounding), as CogVideoX does."""
    if grid_h / grid_w > base_h / base_w:
        height, width = base_h, int(round(base_h / grid_h * grid_w))
    else:
        width, height = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - height) / 2.0)), int(round((base_w - width) / 2.0))
    return (top, left), (top + height, left + width)


class Rope3D(nn.Module):
    """CogVideoX's 3D rotary embedding for q/k of shape (B, heads, text_len + F·h·w, head_dim).

    head_dim splits 2/8 time, 3/8 height, 3/8 width. `sample_height`/`sample_width` are the latent
    sample size of the config and `patch_size` its spatial patch. CogVideoX 1.0 (patch_size_t None)
    spreads positions over the crop region of its base grid (fractional positions away from the
    native size); 1.5 (patch_size_t set) uses integer positions, a slice of the base grid.
    """

    def __init__(self, head_dim: int, *, sample_height: int, sample_width: int, patch_size: int = 2,
                 patch_size_t: int | None = None, theta: float = 10000.0, backend: str | None = None):
        super().__init__()
        if head_dim % 8:
            raise ValueError(f"head_dim must be a multiple of 8 (2/8, 3/8, 3/8 split); got {head_dim}")
        self.axes_dim = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
        self.base_h, self.base_w = sample_height // patch_size, sample_width // patch_size
        self.patch_size, self.patch_size_t = patch_size, patch_size_t
        self.theta, self.backend = theta, backend

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> "Rope3D":
        return cls(config["attention_head_dim"], sample_height=config["sample_height"],
                   sample_width=config["sample_width"], patch_size=config["patch_size"],
                   patch_size_t=config.get("patch_size_t"), **kwargs)

    def positions(self, frames: int, height: int, width: int, device=None):
        """(pos_t, pos_h, pos_w) for `frames` latent frames of height × width latent pixels."""
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if self.patch_size_t is None:
            (top, left), (bottom, right) = resize_crop_region(grid_h, grid_w, self.base_h, self.base_w)
            pos_t = torch.linspace(0, frames * (frames - 1) / frames, frames, device=device)
            pos_h = torch.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, device=device)
            pos_w = torch.linspace(left, right * (grid_w - 1) / grid_w, grid_w, device=device)
            return pos_t, pos_h, pos_w
        if grid_h > self.base_h or grid_w > self.base_w:
            raise ValueError(f"a {height}×{width} latent ({grid_h}×{grid_w} patches) exceeds the model's "
                             f"{self.base_h}×{self.base_w} position grid")
        steps = (frames + self.patch_size_t - 1) // self.patch_size_t
        return tuple(torch.arange(n, dtype=torch.float32, device=device) for n in (steps, grid_h, grid_w))

    def _kwargs(self, x, text_len, frames, height, width):
        pos_t, pos_h, pos_w = self.positions(frames, height, width, x.device)
        return dict(text_len=text_len, pos_t=pos_t, pos_h=pos_h, pos_w=pos_w, axes_dim=self.axes_dim,
                    theta=self.theta, backend=self.backend)

    def forward(self, x: torch.Tensor, *, text_len: int, frames: int, height: int, width: int) -> torch.Tensor:
        return rope3d(x, **self._kwargs(x, text_len, frames, height, width))

    def qk(self, q: torch.Tensor, k: torch.Tensor, norm_q: nn.LayerNorm, norm_k: nn.LayerNorm, *, text_len: int,
           frames: int, height: int, width: int):
        """Per-head LayerNorm (the model's norm_q / norm_k modules) then RoPE, fused."""
        if norm_q.eps != norm_k.eps:
            raise ValueError(f"norm_q and norm_k must share eps; got {norm_q.eps} and {norm_k.eps}")
        return qk_norm_rope3d(q, k, norm_q.weight, norm_q.bias, norm_k.weight, norm_k.bias, eps=norm_q.eps,
                              **self._kwargs(q, text_len, frames, height, width))

    def extra_repr(self) -> str:
        return (f"axes_dim={self.axes_dim}, base_grid=({self.base_h}, {self.base_w}), patch_size={self.patch_size}, "
                f"patch_size_t={self.patch_size_t}")

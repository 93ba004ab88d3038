"""Drop-in causal 3D convolution module with diffusers' `CogVideoXCausalConv3d` state-dict keys."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.causal_conv3d import causal_conv3d

TIME_PADDINGS = ("first_frame", "zeros")


def _triple(k) -> tuple[int, int, int]:
    return (k, k, k) if isinstance(k, int) else tuple(k)


class CausalConv3d(nn.Module):
    """Temporally causal 3D convolution over (B, C, T, H, W), stride 1.

    time_padding="first_frame" (default) repeats the first frame kt-1 times in front of a video and
    zero-pads H and W (diffusers' `pad_mode="constant"` of the CogVideoX VAE); "zeros" puts kt-1 zero
    frames in front instead. `forward(x, cache)` returns `(y, new_cache)`: `new_cache` holds the last
    kt-1 frames of the time-padded input, so feeding a video chunk by chunk equals feeding it whole.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, bias: bool = True,
                 time_padding: str = "first_frame", backend: str | None = None):
        super().__init__()
        if time_padding not in TIME_PADDINGS:
            raise ValueError(f"time_padding must be one of {TIME_PADDINGS}; got {time_padding!r}")
        self.kernel_size = _triple(kernel_size)
        kt, kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"kernel_size must have odd spatial extents; got {self.kernel_size}")
        self.time_padding = time_padding
        self.backend = backend
        # nn.Conv3d only holds the parameters (keys conv.weight / conv.bias, as in diffusers).
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel_size, bias=bias)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, *, update_cache: bool = False):
        """update_cache=True writes the new history into `cache` itself and returns it (no new
        allocation: for a caller that owns the cache, without autograd)."""
        kt = self.kernel_size[0]
        if update_cache and cache is not None and torch.is_grad_enabled() and (x.requires_grad or cache.requires_grad):
            raise ValueError("update_cache=True overwrites the cache in place: not under autograd")
        halo = cache
        if halo is None and self.time_padding == "zeros" and kt > 1:
            halo = x.new_zeros(x.shape[0], x.shape[1], kt - 1, *x.shape[3:])
        y = causal_conv3d(x, self.conv.weight, self.conv.bias, halo, backend=self.backend)
        return y, self._next_cache(x, halo, kt, cache if update_cache else None)

    @staticmethod
    def _next_cache(x: torch.Tensor, halo: torch.Tensor | None, kt: int,
                    into: torch.Tensor | None = None) -> torch.Tensor | None:
        lead = kt - 1
        if lead == 0:
            return None
        if into is not None:
            kept = lead - min(x.shape[2], lead)  # frames of the old history that stay in it
            for i in range(kept):  # ascending: each source frame is read before it is overwritten
                into[:, :, i].copy_(into[:, :, i + lead - kept])
            into[:, :, kept:].copy_(x[:, :, x.shape[2] - (lead - kept):])
            return into
        if x.shape[2] >= lead:
            return x[:, :, -lead:].clone()  # a copy: a view would keep the whole chunk alive
        front = halo if halo is not None else x[:, :, :1].expand(-1, -1, lead, -1, -1)
        return torch.cat([front, x], dim=2)[:, :, -lead:].contiguous()

    def extra_repr(self) -> str:
        return f"{self.conv.in_channels}, {self.conv.out_channels}, kernel_size={self.kernel_size}, time_padding={self.time_padding!r}"

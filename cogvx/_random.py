"""Gaussian draws made the way diffusers' randn_tensor makes them, so seeded runs agree."""
from __future__ import annotations

import torch


def randn(shape, generator: torch.Generator | None, device, dtype: torch.dtype) -> torch.Tensor:
    """One draw on the generator's device (a CPU generator draws on the CPU even for a GPU run), in
    `dtype` (a bf16 draw differs from an fp32 draw cast to bf16), then moved to `device`."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)

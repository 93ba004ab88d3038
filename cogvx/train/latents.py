"""What the transformer trains on: clean latents (sampled from the VAE's posterior, × the VAE's
scaling_factor) and T5 text embeddings, from either kind of batch:

- clips: {"video": (B, 3, F, H, W) in [-1, 1], "caption": [str] * B}, encoded now through our
  CausalVAE and TextEncoder (no gradients);
- a latent cache's: {"latent_mean", "latent_std": (B, C, F', h, w), the unscaled posterior,
  "text": (B, L, D), "caption": [str] * B}, written ahead by `cogvx cache-latents`; no VAE or T5.

Either way the posterior is sampled as mean + std · ε with ε from `generator` (one per sample for a
list: a sample's draw then depends on its generator alone, not on its batch-mates or rank).
"""
from __future__ import annotations

import torch

from .._random import randn


def _noise(shape: tuple, generator, device) -> torch.Tensor:
    """fp32 standard normal noise of `shape` (B, ...): one draw per sample from its generator, or
    one draw for the batch from a single generator (or the global RNG for None)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([randn(shape[1:], g, device, torch.float32) for g in generator])
    return randn(shape, generator, device, torch.float32)


def _captions(batch: dict, size: int) -> list[str]:
    captions = batch.get("caption")
    if not isinstance(captions, (list, tuple)) or len(captions) != size or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"batch['caption'] must be a list of {size} strings")
    return list(captions)


def training_inputs(batch: dict, *, vae=None, text_encoder=None, scaling_factor: float,
                    generator: torch.Generator | list[torch.Generator] | None = None,
                    device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (B, C, F', h, w) fp32, already × scaling_factor, text embeddings (B, L, D) fp32) of a
    batch of clips (needs `vae` and `text_encoder`) or of cached latents (needs neither), on
    `device` (default: the VAE's, else the cached tensors')."""
    if "latent_mean" in batch:
        mean, std, text = batch["latent_mean"], batch.get("latent_std"), batch.get("text")
        if std is None or text is None:
            raise ValueError("a cached batch needs 'latent_mean', 'latent_std' and 'text'")
        if mean.dim() != 5 or std.shape != mean.shape:
            raise ValueError(f"latent_mean and latent_std must both be (B, C, F', h, w); got {tuple(mean.shape)} "
                             f"and {tuple(std.shape)}")
        if text.dim() != 3 or text.shape[0] != mean.shape[0]:
            raise ValueError(f"text must be (B={mean.shape[0]}, L, D); got {tuple(text.shape)}")
        _captions(batch, mean.shape[0])
        device = torch.device(device) if device is not None else mean.device
        mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
        text = text.to(device, torch.float32)
    elif "video" in batch:
        video = batch["video"]
        if vae is None or text_encoder is None:
            raise ValueError("a batch of clips needs the VAE and the text encoder to encode it")
        if video is None or video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"batch['video'] must be (B, 3, F, H, W); got "
                             f"{None if video is None else tuple(video.shape)}")
        captions = _captions(batch, video.shape[0])
        weight = next(vae.parameters())
        device = torch.device(device) if device is not None else weight.device
        with torch.no_grad():
            posterior = vae.encode(video.to(weight.device, weight.dtype))
            text = text_encoder.encode(captions, device=device, dtype=torch.float32)
        mean, std = posterior.mean.to(device, torch.float32), posterior.std.to(device, torch.float32)
    else:
        raise ValueError(f"a training batch holds 'video' (clips) or 'latent_mean' (a latent cache); got keys "
                         f"{sorted(batch)}")
    latents = (mean + std * _noise(tuple(mean.shape), generator, device)) * scaling_factor
    return latents, text

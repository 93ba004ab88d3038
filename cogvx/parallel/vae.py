"""Context parallelism for the 3D causal VAE: ranks hold consecutive frame slices of one video.

Before every causal conv with a temporal extent kt > 1, a rank sends the last kt-1 frames of that
conv's input to the next rank (point to point: the same frames a chunk's conv cache would hold) and
receives its own kt-1 frames of history from the previous one; rank 0 pads with its first frame as
usual. GroupNorm statistics are combined over ranks (per-rank mean, variance and count, gathered
and merged in float64), so a context-parallel encode/decode equals the single-process one with the
whole video as one chunk (`CausalVAE(chunking="whole")`): SAT's training-time behaviour.

Communication per layer and rank boundary: a 3×3×3 causal conv sends 2 frames of its input
(2 · C · H · W elements); a GroupNorm all-gathers 3 numbers per (batch, group); 1×1×1 convs and the
resamplers need nothing (slices are aligned to the time pairs the resamplers pool or repeat). For
the CogVideoX decoder at 480×720 (bf16), that is 2·512·60·90·2 B ≈ 11 MB per conv at the latent
resolution, rising to 2·128·480·720·2 B ≈ 177 MB per conv in the last stage, per boundary.

Within a rank, layers run in slices of frames as in one process (`FrameContext`): the history for
the next rank is sent before the first slice is convolved, the received one feeds the first slice.

Splitting: rank 0 holds the first latent frame and an odd or even count as the whole video has
(the first frame of an odd count is upsampled/pooled on its own), every other rank an even count,
as evenly as possible (`latent_counts`); the encoder's video slices are the matching frames
(rank 0: 1 + 4·(n0 − 1), others 4·n_r).

Run under torchrun (gloo on CPU, NCCL on GPU); every rank calls `decode`/`encode` with the whole
latents/video (they are replicated; each rank takes its slice) and gets the whole result back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.vae import CausalVAE, DiagonalGaussian, SLICE_ELEMENTS, FrameContext, merge_moments


def latent_counts(latent_frames: int, world: int) -> list[int]:
    """Latent frames per rank: every rank after the first an even count (≥ 2), rank 0 the rest with
    the parity of the total (≥ 1); pairs spread evenly, the spare ones to the later ranks (rank 0
    already holds the odd frame)."""
    pairs, odd = divmod(latent_frames, 2)
    if pairs < world - 1 + (0 if odd else 1):
        raise ValueError(f"{latent_frames} latent frames cannot be split over {world} ranks (every rank after "
                         f"the first needs an even count of at least 2, rank 0 at least 1 frame)")
    per_rank = [pairs // world + (1 if r >= world - pairs % world else 0) for r in range(world)]
    return [2 * p + (odd if r == 0 else 0) for r, p in enumerate(per_rank)]


class ContextParallel(FrameContext):
    """Frame context over ranks: conv history from the previous rank, GroupNorm statistics of all."""

    def __init__(self, group=None, slice_elements: int = SLICE_ELEMENTS):
        super().__init__(slice_elements)
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def conv_slices(self, conv, x: torch.Tensor, slices, inputs):
        lead = conv.kernel_size[0] - 1
        if lead == 0 or self.world == 1:
            yield from super().conv_slices(conv, x, slices, inputs)
            return
        frames, last, sending = x.shape[2], self.rank == self.world - 1, None
        if not last and frames >= lead:  # the next rank's history is ours alone: send it while we wait
            history = inputs(frames - lead, frames).contiguous()
            sending = dist.isend(history, self._peer(self.rank + 1), group=self.group)
        self.caches[conv] = None
        if self.rank > 0:
            self.caches[conv] = x.new_empty(*x.shape[:2], lead, *x.shape[3:])
            dist.recv(self.caches[conv], self._peer(self.rank - 1), group=self.group)
        yield from super().conv_slices(conv, x, slices, inputs)  # the cache: last kt-1 frames of [halo, x]
        if not last and sending is None:  # fewer frames than the history: it includes received frames
            dist.send(self.caches[conv], self._peer(self.rank + 1), group=self.group)
        if sending is not None:
            sending.wait()

    def group_moments(self, x: torch.Tensor, groups: int, slices) -> torch.Tensor:
        local = super().group_moments(x, groups, slices)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local, group=self.group)
        return merge_moments(torch.stack(gathered))


def _slices(counts: list[int], scale_first, scale_rest) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for r, n in enumerate(counts):
        size = scale_first(n) if r == 0 else scale_rest(n)
        bounds.append((start, start + size))
        start += size
    return bounds


def _gather(part: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """All ranks' frame slices, concatenated (padded to the longest for the collective, then cut)."""
    longest = max(sizes)
    padded = part.new_zeros(*part.shape[:2], longest, *part.shape[3:])
    padded[:, :, :part.shape[2]] = part
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:, :, :n] for p, n in zip(parts, sizes)], dim=2)


def decode(vae: CausalVAE, latents: torch.Tensor, group=None) -> torch.Tensor:
    """Context-parallel decode of the whole latents (B, C, F', h, w), replicated on every rank; each
    rank decodes its slice and all get the whole video, equal to `vae.decode` with chunking="whole"."""
    decoder = vae._require("decoder")
    vae._check(latents, "latents", vae.config.latent_channels, 1)
    ctx = ContextParallel(group, vae.slice_elements)
    counts = latent_counts(latents.shape[2], ctx.world)
    start, end = _slices(counts, lambda n: n, lambda n: n)[ctx.rank]
    frames = decoder(latents[:, :, start:end], ctx)
    return _gather(frames, [vae.decoded_frames(n) for n in counts], group)


def encode(vae: CausalVAE, video: torch.Tensor, group=None) -> DiagonalGaussian:
    """Context-parallel encode of the whole video (B, 3, 1 + 4k, H, W), replicated on every rank;
    equal to `vae.encode` with chunking="whole"."""
    encoder = vae._require("encoder")
    vae._check(video, "video", vae.config.in_channels, vae.config.spatial_factor)
    ratio = int(vae.config.temporal_compression_ratio)
    if (video.shape[2] - 1) % ratio:
        raise ValueError(f"video must have 1 + {ratio}·k frames; got {video.shape[2]}")
    ctx = ContextParallel(group, vae.slice_elements)
    counts = latent_counts(1 + (video.shape[2] - 1) // ratio, ctx.world)
    start, end = _slices(counts, lambda n: 1 + ratio * (n - 1), lambda n: ratio * n)[ctx.rank]
    moments = encoder(video[:, :, start:end], ctx)
    return DiagonalGaussian(_gather(moments, counts, group))

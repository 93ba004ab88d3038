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

Inference: `encode`/`decode` take the whole video/latents, replicated on every rank (each rank takes
its slice), and give every rank the whole result.

Training (stage 2: long clips, frames split over the ranks of `group`; under autograd): each rank
holds only its own frames, split once by `local_frames`, and runs

    video = local_frames(clip, group)                        # this rank's frames of (B, 3, F, H, W)
    posterior = encode_local(vae, video, group)              # DiagonalGaussian of its latent frames
    z = sample_local(posterior, generator, group)            # the whole latent's noise, sliced
    reconstruction = decode_local(vae, z, group)             # its frames of the reconstruction
    share = frame_share(video, group)                        # its fraction of the clip's frames
    loss = share * F.mse_loss(reconstruction, video) + kl_weight * posterior.kl().mean()
    loss.backward()
    sum_gradients(vae, group)                                # then clip, step

- The halo exchange is an autograd function (`_Halo`): forward as above; backward sends the
  gradient of the received halo back to the rank that owns those frames, which adds it to its own
  frames' gradient. GroupNorm statistics are all-reduced as float64 sums (n·mean, n·E[x²], n) with
  a differentiable all-reduce (`_AllReduceSum`, backward: the all-reduced gradient), so each
  normalisation's backward sees the statistics' dependence on every rank's frames.
- Losses: each rank's loss is its share of the whole clip's, so the ranks' losses add up to the
  one-process loss: a mean over elements (L2, L1, LPIPS over frames) times `frame_share`; the KL
  (summed over latent elements, mean over the batch) of the local posterior as it is.
- Parameter gradients: `sum_gradients` all-reduces them (SUM) over the group after backward (then
  every rank holds the one-process gradient; clip and step after it). Not DDP over the CP group: its
  hooks would all-reduce during backward, interleaved with the halo and statistics traffic on the
  same group, and it averages where a sum is needed. Data parallelism across CP groups comes on top
  (average over the data-parallel group after this sum). A gradient taken with torch.autograd.grad
  (e.g. at the decoder's last layer for the adaptive GAN weight) is this rank's share as well:
  all-reduce it (SUM) before taking its norm.
- A discriminator or other loss that looks across frames sees only this rank's frames: not the
  one-process loss at the slice boundaries (the reconstruction, LPIPS and KL terms above are).
- Noise: `sample_local` draws the whole latent's noise from `generator` and takes this rank's slice,
  so a generator seeded alike on every rank of the group gives the one-process sample.
- Backward runs the same collectives in the same order on every rank (the graphs are the same), so
  gradient checkpointing per ResNet block (non-reentrant) works too: the rerun exchanges again.
- A reconstruction has the input's frame count only for an odd latent count (1 + 8k video frames);
  an even count decodes to 4 frames per latent frame, as in one process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cogvx_kernels.nn import CausalConv3d

from .._random import randn
from ..models.vae import CausalVAE, DiagonalGaussian
from ..models.vae_execution import SLICE_ELEMENTS, FrameContext, merge_moments


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
    """Frame context over ranks: conv history from the previous rank, GroupNorm statistics of all.
    Under autograd (one slice per layer) the exchange and the statistics are differentiable."""

    local_statistics = False  # GroupNorm statistics over every rank's frames

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
        if torch.is_grad_enabled():  # one slice (FrameContext.slices)
            (start, end), = slices
            h, halo = _Halo.apply(inputs(start, end), lead, self)
            y, _ = conv(h, halo if self.rank > 0 else None)
            yield start, end, y
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
        if torch.is_grad_enabled():  # as sums, through a differentiable all-reduce (float64: E[x²] − mean² keeps
            mean, var, count = local  # ~1e-16 · mean²/var relative error, far below fp32's)
            s1, s2, n = _AllReduceSum.apply(torch.stack([count * mean, count * (var + mean * mean), count]),
                                            self.group)
            mean = s1 / n
            return torch.stack([mean, s2 / n - mean * mean, n])
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local, group=self.group)
        return merge_moments(torch.stack(gathered))


class _Halo(torch.autograd.Function):
    """x (this rank's frames of a causal conv's input, B, C, T, H, W) -> (x, halo): halo is the
    previous rank's last `lead` frames of that input (empty on rank 0, whose conv pads with its first
    frame). Forward sends this rank's last `lead` frames on to the next rank (of [halo, x] when T <
    lead: the history then includes received frames). Backward sends the halo's gradient back to the
    previous rank, and adds what the next rank sends back (the gradient of the frames it received
    from us) to x's gradient. x is returned too so that every rank's backward runs (rank 0 has no
    halo but must receive its frames' gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lead: int, cp: ContextParallel):
        ctx.lead, ctx.cp, ctx.frames = lead, cp, x.shape[2]
        first, last = cp.rank == 0, cp.rank == cp.world - 1
        halo = x.new_empty(*x.shape[:2], 0 if first else lead, *x.shape[3:])
        history, sending = None, None
        if not last and x.shape[2] >= lead:  # ours alone: sent while we wait for the previous rank
            history = x[:, :, x.shape[2] - lead:].contiguous()
            sending = dist.isend(history, cp._peer(cp.rank + 1), group=cp.group)
        if not first:
            dist.recv(halo, cp._peer(cp.rank - 1), group=cp.group)
        if not last and sending is None:
            history = CausalConv3d._next_cache(x, None if first else halo, lead + 1)
            dist.send(history, cp._peer(cp.rank + 1), group=cp.group)
        if sending is not None:
            sending.wait()
        return x, halo

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_halo: torch.Tensor):
        cp, lead, frames = ctx.cp, ctx.lead, ctx.frames
        first, last = cp.rank == 0, cp.rank == cp.world - 1
        sending = None
        if not first and (frames >= lead or last):  # the halo's gradient is final: send it while we wait
            grad_halo = grad_halo.contiguous()
            sending = dist.isend(grad_halo, cp._peer(cp.rank - 1), group=cp.group)
        if not last:
            sent = grad_x.new_empty(*grad_x.shape[:2], lead, *grad_x.shape[3:])
            dist.recv(sent, cp._peer(cp.rank + 1), group=cp.group)
            grad_x = grad_x.clone()
            if frames >= lead:
                grad_x[:, :, frames - lead:] += sent
            else:  # `sent` is the gradient of the last `lead` frames of [front, x]: front's last lead − T, then x
                grad_x += sent[:, :, lead - frames:]
                if first:  # front: the first frame repeated
                    grad_x[:, :, :1] += sent[:, :, :lead - frames].sum(2, keepdim=True)
                else:  # front: the halo, whose gradient then goes on to the previous rank
                    grad_halo = grad_halo.clone()
                    grad_halo[:, :, frames:] += sent[:, :, :lead - frames]
                    dist.send(grad_halo.contiguous(), cp._peer(cp.rank - 1), group=cp.group)
        if sending is not None:
            sending.wait()
        return grad_x, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group's ranks; the gradient of each rank's input is the sum of the ranks'
    output gradients (every rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


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
    start, end = _video_bounds(video.shape[2], ctx.world, ratio)[ctx.rank]
    moments = encoder(video[:, :, start:end], ctx)
    return DiagonalGaussian(_gather(moments, counts, group))


# ---- training: every rank holds only its own frames ------------------------------------------

def _world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _all_counts(local: torch.Tensor, group) -> list[int]:
    """Every rank's frame count of its `local` slice (one small all-gather)."""
    world = dist.get_world_size(group)
    count = torch.tensor([local.shape[2]], dtype=torch.int64, device=local.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    return [int(c.item()) for c in counts]


def _video_bounds(frames: int, world: int, ratio: int) -> list[tuple[int, int]]:
    if frames < 1 or (frames - 1) % ratio:
        raise ValueError(f"video must have 1 + {ratio}·k frames; got {frames}")
    return _slices(latent_counts(1 + (frames - 1) // ratio, world), lambda n: 1 + ratio * (n - 1), lambda n: ratio * n)


def local_frames(video: torch.Tensor, group=None, ratio: int = 4) -> torch.Tensor:
    """This rank's frames of the whole clip (B, C, 1 + ratio·k, H, W) (`ratio`: the VAE's temporal
    compression): rank 0 1 + ratio·(n0 − 1), rank r ratio·n_r frames for the latent split
    `latent_counts`. A view; the trainer calls it once per clip (on any rank holding the clip)."""
    rank, world = _world(group)
    start, end = _video_bounds(video.shape[2], world, ratio)[rank]
    return video[:, :, start:end]


def local_latent_frames(latents: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's frames of a whole latent tensor (B, C, F', h, w) (e.g. a whole latent's noise)."""
    rank, world = _world(group)
    start, end = _slices(latent_counts(latents.shape[2], world), lambda n: n, lambda n: n)[rank]
    return latents[:, :, start:end]


def _check_split(local_latent_counts: list[int], what: str, local: list[int]) -> None:
    expected = latent_counts(sum(local_latent_counts), len(local_latent_counts))
    if local_latent_counts != expected:
        raise ValueError(f"{what}: the ranks hold {local} frames; this clip's split over "
                         f"{len(local)} ranks is {expected} latent frames (take the slices with local_frames)")


def encode_local(vae: CausalVAE, local_video: torch.Tensor, group=None) -> DiagonalGaussian:
    """The posterior of this rank's latent frames, given its frames of the clip (`local_frames`);
    differentiable (halo gradients return to their owner). Concatenated over ranks, the moments
    equal `vae.encode(clip)` with chunking="whole"."""
    encoder = vae._require("encoder")
    vae._check(local_video, "local_video", vae.config.in_channels, vae.config.spatial_factor)
    ratio = int(vae.config.temporal_compression_ratio)
    counts = _all_counts(local_video, group)
    if (counts[0] - 1) % ratio or any(n % ratio for n in counts[1:]):
        raise ValueError(f"local_video: the ranks hold {counts} frames; rank 0 needs 1 + {ratio}·k, the others "
                         f"{ratio}·k (take the slices with local_frames)")
    _check_split([1 + (counts[0] - 1) // ratio] + [n // ratio for n in counts[1:]], "local_video", counts)
    return DiagonalGaussian(encoder(local_video, ContextParallel(group, vae.slice_elements)))


def decode_local(vae: CausalVAE, local_latents: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's frames of the decoded video, given its latent frames (e.g. `sample_local`);
    differentiable. Concatenated over ranks, equal to `vae.decode(latents)` with chunking="whole"."""
    decoder = vae._require("decoder")
    vae._check(local_latents, "local_latents", vae.config.latent_channels, 1)
    counts = _all_counts(local_latents, group)
    _check_split(counts, "local_latents", counts)
    return decoder(local_latents, ContextParallel(group, vae.slice_elements))


def sample_local(posterior: DiagonalGaussian, generator: torch.Generator | None = None, group=None) -> torch.Tensor:
    """mean + std·ε on this rank's latent frames, ε this rank's slice of the whole latent's noise drawn
    from `generator` as one process draws it (`DiagonalGaussian.sample`): with a generator seeded
    alike on every rank of the group, the samples concatenated are the one-process sample."""
    counts = _all_counts(posterior.mean, group)
    rank = dist.get_rank(group)
    shape = (posterior.mean.shape[0], posterior.mean.shape[1], sum(counts), *posterior.mean.shape[3:])
    noise = randn(shape, generator, posterior.mean.device, posterior.mean.dtype)
    start = sum(counts[:rank])
    return posterior.mean + posterior.std * noise[:, :, start:start + counts[rank]]


def frame_share(local: torch.Tensor, group=None) -> float:
    """The fraction of the clip's frames this rank holds (local frames / all ranks' frames, dim 2):
    a mean over this rank's elements times it is this rank's share of the mean over the clip."""
    counts = _all_counts(local, group)
    return local.shape[2] / sum(counts)


def sum_gradients(module: torch.nn.Module, group=None) -> None:
    """Sum every parameter's gradient over the group's ranks (in place; one all-reduce of a flat
    buffer per dtype). Each rank's loss being its share of the clip's, the sum is the one-process
    gradient. A parameter with a gradient on some ranks only gets zeros for it on the others; one
    with none on any rank keeps None."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    with_grad = [p for p, h in zip(params, has.tolist()) if h]
    for p in with_grad:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in with_grad:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():  # one all-reduce per dtype (one in all, for an fp32 model)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

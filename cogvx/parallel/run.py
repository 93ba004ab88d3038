"""A multi-rank inference run as the pipeline uses it: plan, mesh, transformer runner, VAE groups.

    run = ParallelRun.start("cfg=2,ulysses=2", device, heads=30)   # checked before anything loads
    run.attach(transformer)                                          # -> run.transformer (a ParallelTransformer)
    run.check_call(guided=True, video_tokens=17550)
    generator = run.shared_generator(generator)
    video = run.decode(vae, latents)                                 # context parallel, every rank gets it

The VAE runs context parallel over as many ranks as its frame split allows (`latent_counts`: every
rank after the first at least 2 latent frames; 13 latent frames: up to 7 ranks); ranks left out get
the result by broadcast. Its result equals the one-process one with chunking="whole".
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from ..loading import resolve_device
from ..models.vae import CausalVAE, DiagonalGaussian
from . import runtime, vae as cp
from .plan import ParallelPlan
from .transformer import ParallelTransformer


def vae_ranks(latent_frames: int, world: int) -> int:
    """How many ranks (the first ones) share a VAE pass over `latent_frames` latent frames: the most,
    up to `world`, that `latent_counts` can split them over."""
    for ranks in range(world, 1, -1):
        try:
            cp.latent_counts(latent_frames, ranks)
            return ranks
        except ValueError:
            continue
    return 1


class ParallelRun:
    """See the module docstring. `world` 1 (a plan of ones without a launcher) runs nothing in parallel."""

    def __init__(self, plan: ParallelPlan, mesh, device: torch.device):
        self.plan, self.mesh, self.device = plan, mesh, device
        self.world = plan.world
        self.rank = dist.get_rank() if mesh is not None else 0
        self.transformer: ParallelTransformer | None = None
        self._vae_groups: dict[int, object] = {}

    @classmethod
    def start(cls, plan: str | ParallelPlan, device=None, *, heads: int) -> "ParallelRun":
        """Check `plan` against the launch's world size and the transformer's head count (PlanError,
        before anything loads), then initialise the process group (unless it is) and the mesh.
        `device` as the pipeline takes it (None: the CPU); "cuda" without an index is this rank's GPU
        (LOCAL_RANK)."""
        plan = ParallelPlan.parse(plan)
        world = dist.get_world_size() if dist.is_initialized() else runtime.world_size()
        plan.check(world=world, heads=heads)
        device = resolve_device(device)
        if device.type == "cuda" and device.index is None:  # "cuda": this rank's GPU
            device = resolve_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world == 1:
            return cls(plan, None, device)
        runtime.init_process_group(device.type)
        mesh = plan.mesh(device.type)
        for name in ("cfg", "ring", "ulysses"):
            runtime.set_timeout(mesh.get_group(name))
        return cls(plan, mesh, device)

    def attach(self, transformer) -> "ParallelRun":
        self.transformer = ParallelTransformer(transformer, self.plan, self.mesh)
        return self

    def check_call(self, *, guided: bool, video_tokens: int) -> None:
        """PlanError (a ValueError) when this call cannot run on the plan: cfg=2 without guidance, fewer
        video tokens than sequence ranks."""
        self.plan.check(world=self.world, guided=guided, video_tokens=video_tokens)

    def shared_generator(self, generator: torch.Generator | None) -> torch.Generator:
        """The generator every rank draws from: a given one must be in the same state on every rank
        (ValueError otherwise: the ranks' noise would differ); None becomes a CPU generator seeded from
        rank 0's random seed."""
        if generator is None:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if self.rank == 0 else torch.zeros(1, dtype=torch.int64)
            seed = seed.to(self._collective_device())
            dist.broadcast(seed, 0)
            return torch.Generator("cpu").manual_seed(int(seed.item()))
        digest = hashlib.sha256(generator.get_state().cpu().numpy().tobytes()).digest()[:8]
        mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64,
                            device=self._collective_device())
        states = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(states, mine)
        if len({int(s.item()) for s in states}) > 1:
            raise ValueError("generator: every rank must pass a generator in the same state (seed it alike on every "
                             "rank), or None")
        return generator

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _vae_group(self, ranks: int):
        """The group of ranks 0..ranks-1 (the default group when that is all of them); made once per
        size, by every rank (new_group is collective)."""
        if ranks == self.world:
            return None
        if ranks not in self._vae_groups:
            self._vae_groups[ranks] = dist.new_group(list(range(ranks)), timeout=runtime.timeout())
        return self._vae_groups[ranks]

    def decode(self, vae: CausalVAE, latents: torch.Tensor) -> torch.Tensor:
        """Context-parallel decode of latents (B, C, F', h, w) given alike on every rank -> the video
        (B, 3, F, H, W) on every rank. A tiled VAE decodes on every rank alone (tiles are spatial)."""
        ranks = vae_ranks(latents.shape[2], self.world)
        if ranks == 1 or vae.tiling is not None:
            return vae.decode(latents)
        group = self._vae_group(ranks)
        video = cp.decode(vae, latents, group) if self.rank < ranks else None
        if ranks < self.world:
            shape = (latents.shape[0], 3, vae.decoded_frames(latents.shape[2]),
                     latents.shape[3] * vae.config.spatial_factor, latents.shape[4] * vae.config.spatial_factor)
            video = self._broadcast(video, shape, latents)
        return video

    def encode(self, vae: CausalVAE, video: torch.Tensor) -> DiagonalGaussian:
        """Context-parallel encode of a video (B, 3, F, H, W) given alike on every rank -> its posterior
        on every rank. A single frame (image-to-video) or a tiled VAE encodes on every rank alone."""
        latent_frames = 1 + (video.shape[2] - 1) // int(vae.config.temporal_compression_ratio)
        ranks = vae_ranks(latent_frames, self.world)
        if ranks == 1 or vae.tiling is not None:
            return vae.encode(video)
        group = self._vae_group(ranks)
        moments = None
        if self.rank < ranks:
            posterior = cp.encode(vae, video, group)
            moments = torch.cat([posterior.mean, posterior.logvar], dim=1)
        if ranks < self.world:
            shape = (video.shape[0], 2 * vae.config.latent_channels, latent_frames,
                     video.shape[3] // vae.config.spatial_factor, video.shape[4] // vae.config.spatial_factor)
            moments = self._broadcast(moments, shape, video)
        return DiagonalGaussian(moments)

    def _broadcast(self, tensor, shape, like: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` of `shape` to every rank."""
        tensor = like.new_empty(shape) if tensor is None else tensor.contiguous()
        dist.broadcast(tensor, 0)
        return tensor

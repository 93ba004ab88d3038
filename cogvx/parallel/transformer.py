"""The transformer on a (cfg, ring, ulysses) mesh: CFG parallelism and sequence parallelism.

    runner = ParallelTransformer(model, plan, mesh)
    velocity = runner(latents, text_embeddings, timestep, ofs)   # as model(...), on every rank

- CFG: with cfg=2 the batch [unconditional; conditional] (the pipeline's layout) is split in two
  halves, cfg rank 0 the first; the results are combined by the final all-gather.
- Sequence: the joint sequence [text, video] is embedded as in one process; each sequence rank keeps
  the text tokens and its slice of the video tokens (`token_split`) and runs the model's blocks on
  them with `SequenceParallelAttention` installed as every block's attention processor, and the
  model's head on its video tokens. RoPE uses each slice's own global positions; additive positions
  (2B's sin-cos, 5B-I2V's learned table) are added before the split.
- One all-gather over the world of every rank's output patches (B/cfg, n_mine, p²·C, a few values
  per token) gives every rank the whole result.

The model is the model: its blocks are untouched, the processors are installed for the duration of
a call only, and the weights are replicated on every rank.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from .attention import LocalTokens, SequenceParallelAttention, local_rope_tables, token_split
from .plan import ParallelPlan


class ParallelTransformer:
    """Runs a `Transformer3D` over the ranks of `mesh` (a DeviceMesh with dims cfg, ring, ulysses,
    `ParallelPlan.mesh`) as `plan` says; called like the model, it returns the whole output on every
    rank."""

    def __init__(self, model, plan: ParallelPlan, mesh):
        self.model, self.plan, self.mesh = model, plan, mesh
        heads = model.config.num_attention_heads
        plan.check(world=dist.get_world_size(), heads=heads)
        self.cfg_rank = mesh.get_local_rank("cfg")
        self.sequence_rank = mesh.get_local_rank("ring") * plan.ulysses + mesh.get_local_rank("ulysses")
        self.processor = SequenceParallelAttention(
            mesh.get_group("ulysses") if plan.ulysses > 1 else None, mesh.get_group("ring") if plan.ring > 1 else None)
        # (cfg rank, sequence rank) of every global rank, for assembling the gathered pieces
        coordinates = {}
        for c in range(plan.cfg):
            for r in range(plan.ring):
                for j in range(plan.ulysses):
                    coordinates[int(mesh.mesh[c, r, j])] = (c, r * plan.ulysses + j)
        self.coordinates = [coordinates[w] for w in range(dist.get_world_size())]
        first = model.transformer_blocks[0].attn1
        self.axes_dim, self.theta = first.axes_dim, first.theta

    @property
    def config(self):
        return self.model.config

    def __call__(self, latents: torch.Tensor, text_embeddings: torch.Tensor, timestep, ofs=None) -> torch.Tensor:
        latents, text_embeddings, timestep = self._cfg_half(latents, text_embeddings, timestep)
        model, text_len = self.model, text_embeddings.shape[1]
        x, temb, positions = model.embed(latents, text_embeddings, timestep, ofs)
        if self.plan.sequence == 1:  # CFG only: the one-process blocks on this rank's half
            patches = model.head(model.run_blocks(x, text_len, temb, positions)[:, text_len:], temb)
            return model.unpatchify(self._gather(patches, [patches.shape[1]]), (latents.shape[0] * self.plan.cfg,
                                                                                 *latents.shape[1:]))
        sizes = token_split(x.shape[1] - text_len, self.plan.sequence)
        start = text_len + sum(sizes[:self.sequence_rank])
        x = torch.cat([x[:, :text_len], x[:, start:start + sizes[self.sequence_rank]]], dim=1)
        cos = sin = None
        if positions is not None:
            cos, sin = local_rope_tables(positions, self.axes_dim, self.theta, start - text_len,
                                         start - text_len + sizes[self.sequence_rank])
        with self._processors():
            x = model.run_blocks(x, text_len, temb, LocalTokens(cos, sin, sizes))
        patches = model.head(x[:, text_len:], temb)
        whole = self._gather(patches, sizes)
        shape = (whole.shape[0], *latents.shape[1:])
        return model.unpatchify(whole, shape)

    def _cfg_half(self, latents, text_embeddings, timestep):
        if self.plan.cfg == 1:
            return latents, text_embeddings, timestep
        batch = latents.shape[0]
        if batch % 2:
            raise ValueError(f"cfg=2 splits the batch [unconditional; conditional] in halves: it must be even; got "
                             f"{batch}")
        half = slice(self.cfg_rank * batch // 2, (self.cfg_rank + 1) * batch // 2)
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.dim() == 1 and timestep.shape[0] == batch:
            timestep = timestep[half]
        return latents[half], text_embeddings[half], timestep

    @contextmanager
    def _processors(self):
        attentions = [block.attn1 for block in self.model.transformer_blocks]
        for attn in attentions:
            attn.processor = self.processor
        try:
            yield
        finally:
            for attn in attentions:
                attn.processor = None

    def _gather(self, patches: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's (B/cfg, n_r, P) patches -> (B, N, P) on every rank (one all-gather; the slices
        padded to the longest)."""
        longest = max(sizes)
        padded = patches.new_zeros(patches.shape[0], longest, patches.shape[2])
        padded[:, :patches.shape[1]] = patches
        pieces = [torch.empty_like(padded) for _ in self.coordinates]
        dist.all_gather(pieces, padded)
        rows = [[None] * self.plan.sequence for _ in range(self.plan.cfg)]
        for piece, (c, s) in zip(pieces, self.coordinates):
            rows[c][s] = piece[:, :sizes[s]]
        return torch.cat([torch.cat(row, dim=1) for row in rows], dim=0)

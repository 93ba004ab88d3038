"""Sequence-parallel joint attention: the video tokens split over ranks, the text tokens on every rank.

`SequenceParallelAttention` is a `JointAttention.processor`: the model's blocks call it in place of
the one-process attention (the blocks themselves are unchanged). Each rank holds the text tokens and
its slice of the video tokens (`token_split`: contiguous, balanced to within one token, in the
model's (t, h, w) order); its `positions` argument is a `LocalTokens`: the rotary tables of this
rank's video tokens only (`local_rope_tables`, global positions), so RoPE is applied before any
exchange, each rank to its own slice.

Two schemes, composable (the sequence ranks form a ring × ulysses grid, ulysses the inner one):

- Ulysses: one all-to-all turns (all heads, my tokens) into (heads/u, the tokens of the u ranks of my
  Ulysses group) for q, k and v; attention runs on whole sequences of a head subset; a second
  all-to-all turns the output back, carrying each rank's text-token output to every rank (the text
  queries are replicated: every rank needs all heads of them).
- Ring: the video keys/values of the g ring positions are passed around the ring with
  `batch_isend_irecv` (the next block travels while the current one is attended to); each block
  gives a partial output and its log-sum-exp (`joint_attention(..., return_lse=True)`), merged
  exactly in fp32: out = Σ_b exp(lse_b − lse)·out_b with lse = log Σ_b exp(lse_b). The text keys and
  values, held by every rank, enter once: with the rank's own block only.

Traffic per attention layer and rank, in elements, for batch B, heads H, head dim D, N video and
T text tokens, u·g sequence ranks (see docs/parallelism.md): Ulysses sends 3·B·H·D·N/(u·g)·(u−1)/u
(q, k, v) and receives the output back plus the text outputs of the other heads,
B·H·D·(N/(u·g) + T)·(u−1)/u; ring sends (g−1)·2·B·(H/u)·D·N/g (k and v of every other block).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cogvx_kernels.ops.joint_attention import joint_attention
from cogvx_kernels.ops.rope3d import qk_norm_rope3d_token_tables
from cogvx_kernels.reference.rope3d import axis_tables


def token_split(tokens: int, parts: int) -> list[int]:
    """Video tokens per sequence rank: contiguous, the first tokens % parts ranks one more."""
    if tokens < parts:
        raise ValueError(f"{tokens} video tokens cannot be split over {parts} sequence-parallel ranks "
                         f"(at least one token each)")
    base, extra = divmod(tokens, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def local_rope_tables(positions, axes_dim, theta: float, start: int, end: int):
    """(cos, sin), each (end − start, D): the rotary tables of video tokens start..end−1 of the (t, h, w)
    grid that `positions` (pos_t, pos_h, pos_w) spans, in the per-token layout of
    `qk_norm_rope3d_token_tables` (each value repeated over its channel pair). Gathered from the
    same per-axis fp32 tables the one-process kernels read, so the rotation is the same."""
    pos_t, pos_h, pos_w = positions
    frames, height, width = pos_t.numel(), pos_h.numel(), pos_w.numel()
    tables = axis_tables(pos_t, pos_h, pos_w, tuple(axes_dim), theta)  # (2, F+H+W, D/2)
    index = torch.arange(start, end, device=pos_t.device)
    t, h, w = index // (height * width), (index // width) % height, index % width
    d_t, d_h = axes_dim[0] // 2, axes_dim[1] // 2
    half = torch.cat([tables[:, t, :d_t], tables[:, frames + h, d_t:d_t + d_h],
                      tables[:, frames + height + w, d_t + d_h:]], dim=-1)           # (2, n, D/2)
    cos, sin = half.repeat_interleave(2, dim=-1)
    return cos, sin


@dataclass
class LocalTokens:
    """What a block's attention receives as `positions` under sequence parallelism: this rank's video
    tokens' rotary tables (None without RoPE) and the video tokens of every sequence rank
    (ring-major: sequence rank = ring rank · ulysses + ulysses rank)."""
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    sizes: list[int]


class SequenceParallelAttention:
    """`JointAttention.processor` for the sequence ranks of a (ring, ulysses) grid: `ulysses_group`
    holds the ranks of this rank's Ulysses group, `ring_group` those of its ring (None: degree 1)."""

    def __init__(self, ulysses_group=None, ring_group=None):
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.u = dist.get_world_size(ulysses_group) if ulysses_group is not None else 1
        self.g = dist.get_world_size(ring_group) if ring_group is not None else 1
        self.j = dist.get_rank(ulysses_group) if ulysses_group is not None else 0   # Ulysses rank
        self.r = dist.get_rank(ring_group) if ring_group is not None else 0          # ring rank
        if self.g > 1:
            self.next_peer = dist.get_global_rank(ring_group, (self.r + 1) % self.g)
            self.prev_peer = dist.get_global_rank(ring_group, (self.r - 1) % self.g)

    def __call__(self, attn, x: torch.Tensor, text_len: int, local: LocalTokens) -> torch.Tensor:
        if not isinstance(local, LocalTokens):
            raise TypeError("sequence-parallel attention needs its LocalTokens as positions (run the model through "
                            "cogvx.parallel.ParallelTransformer)")
        heads, T = attn.heads, text_len
        if heads % self.u:
            raise ValueError(f"ulysses={self.u} must divide the attention heads ({heads})")

        def split_heads(t):  # (B, L, heads·D) -> (B, heads, L, D), a view
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)

        q, k, v = split_heads(attn.to_q(x)), split_heads(attn.to_k(x)), split_heads(attn.to_v(x))
        q, k = self._qk(attn, q, k, T, local)
        if self.u > 1:
            q, k, v = self._to_head_split(q, k, v, T, local.sizes)
        out = self._ring(q, k, v, T, local.sizes, attn.backend) if self.g > 1 else \
            joint_attention(q, k, v, backend=attn.backend)
        if self.u > 1:
            out = self._to_sequence_split(out, T, local.sizes)          # (B, T + n, heads·D)
        else:
            out = out.transpose(1, 2).flatten(2)
        for layer in attn.to_out:
            out = layer(out)
        return out

    # -- per-head norm and RoPE on this rank's tokens ------------------------------------------------
    @staticmethod
    def _qk(attn, q, k, text_len, local):
        if local.cos is None:
            return (attn.norm_q(q), attn.norm_k(k)) if attn.norm_q is not None else (q, k)
        if attn.norm_q is None:
            raise ValueError("sequence-parallel RoPE runs fused with the q/k LayerNorm (every CogVideoX has it)")
        return qk_norm_rope3d_token_tables(q, k, attn.norm_q.weight, attn.norm_q.bias, attn.norm_k.weight,
                                           attn.norm_k.bias, eps=attn.norm_q.eps, text_len=text_len, cos=local.cos,
                                           sin=local.sin, backend=attn.backend)

    # -- Ulysses -------------------------------------------------------------------------------------
    def _group_sizes(self, sizes: list[int]) -> list[int]:
        """Video tokens of each rank of this rank's Ulysses group."""
        return sizes[self.r * self.u:(self.r + 1) * self.u]

    def _to_head_split(self, q, k, v, T: int, sizes: list[int]):
        """(B, H, T + n_mine, D) q, k, v -> (B, H/u, T + N_group, D): my head chunk, my group's tokens."""
        u, j = self.u, self.j
        B, H, _, D = q.shape
        h = H // u
        group = self._group_sizes(sizes)
        mine = group[j]
        text = torch.stack([t[:, j * h:(j + 1) * h, :T] for t in (q, k, v)])            # (3, B, h, T, D)
        video = torch.stack([t[:, :, T:] for t in (q, k, v)])                           # (3, B, H, n, D)
        send = video.unflatten(2, (u, h)).permute(2, 0, 1, 3, 4, 5).contiguous()       # (u, 3, B, h, n, D)
        unit = 3 * B * h * D
        received = send.new_empty(unit * sum(group))
        dist.all_to_all_single(received, send.reshape(-1), output_split_sizes=[unit * n for n in group],
                               input_split_sizes=[unit * mine] * u, group=self.ulysses_group)
        parts = [part.view(3, B, h, n, D) for part, n in zip(received.split([unit * n for n in group]), group)]
        q, k, v = torch.cat([text, *parts], dim=3).unbind(0)
        return q, k, v

    def _to_sequence_split(self, out, T: int, sizes: list[int]) -> torch.Tensor:
        """(B, H/u, T + N_group, D) -> (B, T + n_mine, H·D): the text and each rank's own tokens go back
        to it, every head chunk of them."""
        u = self.u
        B, h, _, D = out.shape
        group = self._group_sizes(sizes)
        mine = group[self.j]
        starts = [T + sum(group[:i]) for i in range(u)]
        send = torch.cat([torch.cat([out[:, :, :T], out[:, :, s:s + n]], dim=2).reshape(-1)
                          for s, n in zip(starts, group)])
        unit = B * h * D
        received = send.new_empty(u * unit * (T + mine))
        dist.all_to_all_single(received, send, output_split_sizes=[unit * (T + mine)] * u,
                               input_split_sizes=[unit * (T + n) for n in group], group=self.ulysses_group)
        # (u, B, h, L, D) -> (B, L, u·h·D): head chunk i of the output came from Ulysses rank i
        return received.view(u, B, h, T + mine, D).permute(1, 3, 0, 2, 4).reshape(B, T + mine, u * h * D)

    # -- ring ----------------------------------------------------------------------------------------
    def _ring(self, q, k, v, T: int, sizes: list[int], backend):
        """Attention of q over the text keys and every ring position's video keys: this rank's block
        ([text, own video]) first, then the others as they arrive; the partial outputs merged with
        their log-sum-exp in fp32. Returns (B, h, Lq, D) in q's dtype."""
        u, g = self.u, self.g
        block_tokens = [sum(sizes[p * u:(p + 1) * u]) for p in range(g)]
        current = torch.stack([k[:, :, T:], v[:, :, T:]])                    # (2, B, h, N_block, D)
        pending = self._pass_on(current, block_tokens[(self.r - 1) % g])
        out, lse = joint_attention(q, k, v, return_lse=True, backend=backend)
        out = out.float()
        for step in range(1, g):
            received, requests = pending
            for request in requests:
                request.wait()
            current = received
            pending = self._pass_on(current, block_tokens[(self.r - step - 1) % g]) if step < g - 1 else None
            block_out, block_lse = joint_attention(q, current[0], current[1], return_lse=True, backend=backend)
            merged = torch.logaddexp(lse, block_lse)
            out = out * torch.exp(lse - merged)[..., None] + block_out.float() * torch.exp(block_lse - merged)[..., None]
            lse = merged
        return out.to(q.dtype)

    def _pass_on(self, block: torch.Tensor, incoming_tokens: int):
        """Send `block` to the next ring position and receive the previous one's (of incoming_tokens
        video tokens), asynchronously: (receive buffer, requests)."""
        received = block.new_empty(block.shape[0], block.shape[1], block.shape[2], incoming_tokens, block.shape[4])
        ops = [dist.P2POp(dist.isend, block, self.next_peer, self.ring_group),
               dist.P2POp(dist.irecv, received, self.prev_peer, self.ring_group)]
        return received, dist.batch_isend_irecv(ops)

"""What a parallel plan costs per denoising step: bytes each rank sends, FLOPs each rank computes,
and a speed-up estimate from link bandwidth and kernel throughput (docs/parallelism.md).

    python -m cogvx.parallel.cost        # the tables of docs/parallelism.md

The byte counts follow the code exactly (tests/test_parallel.py measures them on every rank):
per transformer call (one denoising step), with B the batch of a cfg rank (2 with guidance and
cfg=1, else 1), L layers, H heads of D channels, T text and N video tokens split over S = u·g
sequence ranks (n_r tokens on rank r; n_R the Ulysses group's, N_q the ring position's):

- Ulysses, per layer: q, k, v out (3·B·(H/u)·D·n_r to each of the u−1 others) and the output back
  with the text (B·(H/u)·D·(T + n_j) to each other rank j): B·(H/u)·D·Σ_{j≠me}(3·n_r + T + n_j).
- Ring, per layer: the video keys and values of g−1 ring blocks, 2·B·(H/u)·D·N_q each (the blocks
  this rank passes on: its own and those it received, all but its successor's).
- The final all-gather: the output patches, B·max(n)·P values, to each of the world−1 others.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

from .attention import token_split
from .plan import ParallelPlan


@dataclass(frozen=True)
class ModelShape:
    """A transformer at a video size: what the traffic and FLOPs depend on."""
    name: str
    layers: int
    heads: int
    head_dim: int
    video_tokens: int
    text_tokens: int = 226
    patch_values: int = 64    # output values per video token: p·p·p_t·C_out

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


# 49 frames at 480×720: 13 latent frames of 60×90, 2×2 patches -> 13·30·45 = 17550 tokens.
# CogVideoX 1.5 at 81 frames, 768×1360: 21 latent frames padded to 22, 2×2×2 patches -> 11·48·85 = 44880.
SHAPES = {
    "2b": ModelShape("CogVideoX-2B, 49×480×720", 30, 30, 64, 17550),
    "5b": ModelShape("CogVideoX-5B, 49×480×720", 42, 48, 64, 17550),
    "1.5": ModelShape("CogVideoX1.5-5B, 81×768×1360", 42, 48, 64, 44880, patch_values=128),
}


def _coordinates(plan: ParallelPlan, rank: int) -> tuple[int, int, int]:
    """(cfg, ring, ulysses) coordinates of a global rank on ParallelPlan.mesh's layout."""
    return rank // plan.sequence, (rank % plan.sequence) // plan.ulysses, rank % plan.ulysses


def traffic(plan: ParallelPlan | str, shape: ModelShape, *, guided: bool = True, itemsize: int = 2,
            rank: int | None = None) -> dict[str, float]:
    """Bytes `rank` sends in one denoising step (None: the most any rank sends), by kind:
    ulysses, ring, gather, and their total."""
    plan = ParallelPlan.parse(plan)
    if rank is None:
        per_rank = [traffic(plan, shape, guided=guided, itemsize=itemsize, rank=r) for r in range(plan.world)]
        return max(per_rank, key=lambda t: t["total"])
    u, g = plan.ulysses, plan.ring
    batch = (2 if guided else 1) // plan.cfg
    sizes = token_split(shape.video_tokens, plan.sequence)
    _, r, j = _coordinates(plan, rank)
    group = sizes[r * u:(r + 1) * u]                     # video tokens of my Ulysses group's ranks
    unit = batch * (shape.heads // u) * shape.head_dim    # elements per token and head chunk
    T = shape.text_tokens
    ulysses = sum(3 * group[j] + T + group[i] for i in range(u) if i != j) * unit * shape.layers
    blocks = [sum(sizes[q * u:(q + 1) * u]) for q in range(g)]
    ring = sum(2 * unit * blocks[q] for q in range(g) if q != (r + 1) % g) * shape.layers if g > 1 else 0
    gather = (plan.world - 1) * batch * max(sizes) * shape.patch_values
    out = dict(ulysses=ulysses * itemsize, ring=ring * itemsize, gather=gather * itemsize)
    out["total"] = sum(out.values())
    return out


def flops(plan: ParallelPlan | str, shape: ModelShape, *, guided: bool = True) -> dict[str, float]:
    """FLOPs one rank computes in a denoising step (the largest slice): the linear layers (q, k, v,
    out, the 4× FFN: 24·d² per token, text tokens on every rank) and attention (4·D per query-key
    pair and head: the rank's H/u heads, its text + Ulysses-group queries, all keys)."""
    plan = ParallelPlan.parse(plan)
    batch = (2 if guided else 1) // plan.cfg
    n = -(-shape.video_tokens // plan.sequence)
    T, N, d = shape.text_tokens, shape.video_tokens, shape.width
    linear = 24 * d * d * batch * (T + n) * shape.layers
    attention = 4 * batch * (shape.heads // plan.ulysses) * shape.head_dim * (T + plan.ulysses * n) * (T + N)
    return dict(linear=linear, attention=attention * shape.layers)


@dataclass(frozen=True)
class Hardware:
    """Throughputs of one GPU and its link (assumptions: see docs/parallelism.md)."""
    name: str
    gemm: float        # achieved bf16 GEMM FLOP/s
    attention: float   # achieved bf16 attention FLOP/s at head dim 64
    link: float        # achieved bytes/s one GPU sends (all-to-all, P2P, all-gather over NVLink)


H100_NVLINK = Hardware("8×H100 SXM, NVLink 4 (NVSwitch)", gemm=700e12, attention=450e12, link=360e9)


def step_time(plan: ParallelPlan | str, shape: ModelShape, hw: Hardware = H100_NVLINK,
              *, guided: bool = True) -> dict[str, float]:
    """Seconds per denoising step on one rank: compute, Ulysses all-to-alls (on the critical path:
    attention waits for them), the ring's exposed transfer time (a block's transfer overlaps the
    attention over the previous block: only what exceeds it counts), the final gather."""
    plan = ParallelPlan.parse(plan)
    f, t = flops(plan, shape, guided=guided), traffic(plan, shape, guided=guided)
    attention = f["attention"] / hw.attention
    ring_blocks = attention * (plan.ring - 1) / plan.ring  # the attention over received blocks
    out = dict(compute=f["linear"] / hw.gemm + attention, ulysses=t["ulysses"] / hw.link,
               ring=max(0.0, t["ring"] / hw.link - ring_blocks), gather=t["gather"] / hw.link)
    out["total"] = sum(out.values())
    return out


def speedup(plan: ParallelPlan | str, shape: ModelShape, hw: Hardware = H100_NVLINK) -> float:
    """One GPU's step time over the plan's."""
    return step_time("cfg=1", shape, hw)["total"] / step_time(plan, shape, hw)["total"]


PLANS_8 = {  # plans for 8 GPUs that each model's head count allows (2B: 30 heads, ulysses 1, 2 of 1..8)
    "2b": ["cfg=2,ulysses=2,ring=2", "cfg=2,ring=4", "ulysses=2,ring=4", "ring=8"],
    "5b": ["cfg=2,ulysses=4", "ulysses=8", "cfg=2,ulysses=2,ring=2", "cfg=2,ring=4", "ring=8"],
    "1.5": ["cfg=2,ulysses=4", "ulysses=8", "cfg=2,ulysses=2,ring=2", "cfg=2,ring=4", "ring=8"],
}


@contextmanager
def sent_bytes():
    """Count the bytes this process sends through the collectives cogvx.parallel uses, while active:
    yields a dict ulysses (all_to_all_single: the input splits for the other ranks), ring
    (batch_isend_irecv: the isend tensors), gather (all_gather: the input, once per other rank).
    Wraps the torch.distributed functions (looked up at call time by cogvx.parallel)."""
    counts = dict(ulysses=0, ring=0, gather=0)
    original = {name: getattr(dist, name) for name in ("all_to_all_single", "batch_isend_irecv", "all_gather")}

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        world, me = dist.get_world_size(group), dist.get_rank(group)
        splits = input_split_sizes or [input.shape[0] // world] * world
        row = input[0].numel() * input.element_size() if input.dim() else input.element_size()
        counts["ulysses"] += sum(n for i, n in enumerate(splits) if i != me) * row
        return original["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group, **kw)

    def batch_isend_irecv(ops):
        counts["ring"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops
                              if getattr(op.op, "__name__", "") == "isend")
        return original["batch_isend_irecv"](ops)

    def all_gather(tensor_list, tensor, group=None, **kw):
        counts["gather"] += (dist.get_world_size(group) - 1) * tensor.numel() * tensor.element_size()
        return original["all_gather"](tensor_list, tensor, group, **kw)

    for name, wrapper in (("all_to_all_single", all_to_all_single), ("batch_isend_irecv", batch_isend_irecv),
                          ("all_gather", all_gather)):
        setattr(dist, name, wrapper)
    try:
        yield counts
    finally:
        for name, function in original.items():
            setattr(dist, name, function)


def _tables() -> str:
    mb = 1e6
    lines = ["| model | plan | Ulysses MB | ring MB | gather MB | total MB/step/rank | compute s | exposed comm s "
             "| step s | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, shape in SHAPES.items():
        one = step_time("cfg=1", shape)
        lines.append(f"| {key} | 1 GPU | – | – | – | – | {one['compute']:.3f} | – | {one['total']:.3f} | 1.00 |")
        for text in ["cfg=2"] + PLANS_8[key]:
            t, s = traffic(text, shape), step_time(text, shape)
            comm = s["ulysses"] + s["ring"] + s["gather"]
            lines.append(f"| {key} | {text} | {t['ulysses'] / mb:.0f} | {t['ring'] / mb:.0f} | {t['gather'] / mb:.1f} "
                         f"| {t['total'] / mb:.0f} | {s['compute']:.3f} | {comm:.3f} | {s['total']:.3f} "
                         f"| {speedup(text, shape):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_tables())

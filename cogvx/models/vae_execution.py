"""How the 3D causal VAE's layers (`cogvx.models.vae`) run over a video: diffusers' frame chunks
(`run_chunks`) and spatial tiles (`tiled`), with its numbers; slices of a chunk's frames and
recomputation in backward, which bound memory and change no number.

Every causal conv and GroupNorm goes through a `FrameContext` (`ctx.conv_slices`,
`ctx.group_moments`), which decides how frames outside the ones at hand reach them: in one process
each conv's cache is carried from one chunk (or slice) to the next; `cogvx.parallel.vae.ContextParallel`
exchanges them between ranks holding consecutive frame slices and all-reduces GroupNorm statistics.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from cogvx_kernels.nn import CausalConv3d

from .._progress import progress_bar

SLICE_ELEMENTS = 2 ** 21  # elements of a layer's input per slice of frames without autograd (8 MiB in fp32)


class FrameContext:
    """Chunked processing in one process: each causal conv keeps the last kt-1 frames of its input
    (its cache) for the next chunk; GroupNorm statistics are those of the chunk.

    Without autograd, a norm -> SiLU -> conv runs over slices of about `slice_elements` input
    elements (whole frames): the GroupNorm statistics are taken over the chunk first, then each
    slice is normalised and convolved, its history reaching the next slice through the conv cache as
    between chunks. Only a slice of the normalised input exists at a time, and the same numbers come
    out."""

    local_statistics = True  # GroupNorm statistics come from this process's frames alone

    def __init__(self, slice_elements: int = SLICE_ELEMENTS):
        self.caches: dict[nn.Module, torch.Tensor | None] = {}
        self.slice_elements = slice_elements
        self.final = False  # the last chunk: no later chunk reads a cache, so each goes after its last use

    def slices(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """Frame ranges [start, end) of x to process at a time (all of it under autograd)."""
        frames = x.shape[2]
        if torch.is_grad_enabled() or frames == 0:
            return [(0, frames)]
        step = max(1, self.slice_elements // max(x[:, :, 0].numel(), 1))
        return [(start, min(start + step, frames)) for start in range(0, frames, step)]

    def conv_slices(self, conv: CausalConv3d, x: torch.Tensor, slices, inputs):
        """conv over the frames of x given slice by slice: `inputs(start, end)` makes the conv's input
        for x's frames [start, end) (same shape as them); yields (start, end, output frames)."""
        update = not torch.is_grad_enabled()  # the caches are ours: history written over the old one
        slices = list(slices)
        for i, (start, end) in enumerate(slices):
            y, self.caches[conv] = conv(inputs(start, end), self.caches.get(conv), update_cache=update)
            if self.final and i == len(slices) - 1:
                del self.caches[conv]  # freed before the later (larger) layers allocate
            yield start, end, y
            del y  # not held while the next slice's conv allocates its output

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        (_, _, y), = self.conv_slices(conv, x, [(0, x.shape[2])], lambda start, end: x[:, :, start:end])
        return y

    def group_moments(self, x: torch.Tensor, groups: int, slices) -> torch.Tensor:
        """(mean, variance, count) of each (batch, group) of x over the chunk: (3, B, groups), float64."""
        return merge_moments(torch.stack([_moments(x[:, :, start:end], groups) for start, end in slices]))

    def checkpointed(self, block: nn.Module, x: torch.Tensor, zq: torch.Tensor | None):
        """block(x, self, zq) keeping only its inputs for backward, which runs it again (gradient
        checkpointing). The rerun must see the conv histories the first run saw: the caches of the
        block's causal convs are put back."""
        before = {conv: self.caches.get(conv) for conv in block.modules() if isinstance(conv, CausalConv3d)}

        def run(x, zq):
            self.caches.update(before)
            return block(x, self, zq)
        return torch.utils.checkpoint.checkpoint(run, x, zq, use_reentrant=False)


def _moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Moments (3, B, groups) of x's channel groups: per (batch, channel) over contiguous rows (a time
    slice of a contiguous tensor flattens without a copy), then merged over each group's channels."""
    rows = x.flatten(2).float()  # float32 statistics for half-precision inputs, as GroupNorm
    mean = rows.mean(-1, keepdim=True)  # two passes: 4× faster than var_mean's Welford on the CPU
    var = torch.linalg.vector_norm(rows - mean, dim=-1).double() ** 2 / rows.shape[-1]
    per_channel = torch.stack([mean[..., 0].double(), var, torch.full_like(var, rows.shape[-1])])
    return merge_moments(per_channel.unflatten(2, (groups, -1)).permute(3, 0, 1, 2))


def merge_moments(parts: torch.Tensor) -> torch.Tensor:
    """Moments (N, 3, ...) of N disjoint parts -> the moments (3, ...) of their union."""
    means, variances, counts = parts.unbind(1)
    total = counts.sum(0)
    mean = (means * counts).sum(0) / total
    return torch.stack([mean, ((variances + (means - mean) ** 2) * counts).sum(0) / total, total])


def group_normalizer(norm: nn.GroupNorm, x: torch.Tensor, ctx: FrameContext, slices):
    """GroupNorm of x with statistics over the chunk (ctx), as a function of a frame range
    (start, end) -> normalised frames: x · a + b with a, b per (batch, channel), computed in float32
    and rounded once, as GroupNorm does. Under autograd in one process: the fused GroupNorm (its
    forward and backward are two native ops, where the statistics by hand are many small ones)."""
    if torch.is_grad_enabled() and ctx.local_statistics:  # one slice under autograd: the whole chunk
        return lambda start, end: F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)[:, :, start:end]
    mean, var, _ = ctx.group_moments(x, norm.num_groups, slices)
    per_group = x.shape[1] // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, 1)
    shift = -mean.repeat_interleave(per_group, 1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    lift = (slice(None), slice(None)) + (None,) * (x.dim() - 2)
    scale, shift = scale.float()[lift], shift.float()[lift]
    return lambda start, end: torch.addcmul(shift, x[:, :, start:end], scale).to(x.dtype)


def norm_act_conv(normalize, conv: CausalConv3d, x: torch.Tensor, ctx: FrameContext, slices,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv(SiLU(normalize(x))) (+ residual), slice by slice (see FrameContext). Without autograd
    the residual is added in place (the sum is returned in it)."""
    inplace = not torch.is_grad_enabled()
    activated = lambda start, end: F.silu(normalize(start, end), inplace=inplace)  # noqa: E731
    if not inplace and ctx.local_statistics and x.numel() * x.element_size() >= RECOMPUTE_MIN_BYTES:
        activated = partial(_recomputed, activated)
    pieces = ctx.conv_slices(conv, x, slices, activated)
    if not inplace:  # one slice (autograd)
        (_, _, y), = pieces
        return y if residual is None else y + residual
    out = residual
    for start, end, y in pieces:  # consumed to the end (a context may communicate after the last slice)
        if residual is not None:
            out[:, :, start:end] += y
        elif len(slices) == 1:
            out = y
        else:
            if out is None:
                out = y.new_empty(*y.shape[:2], x.shape[2], *y.shape[3:])
            out[:, :, start:end] = y
        del y
    return out


# Smaller activations are kept: there the recompute's per-call cost outweighs the memory it saves
# (4 % of a tiny VAE's training step at 2×9×32×32, for 16 MiB more).
RECOMPUTE_MIN_BYTES = 4 << 20


def _recomputed(activated, start: int, end: int) -> torch.Tensor:
    """activated(start, end) under autograd keeping none of its intermediates (the norm's output, the
    modulated output, the activation's input): backward recomputes them from the norm's input, which
    the previous layer's backward keeps anyway. Elementwise work traded for two to three activations
    per norm. Not under context parallelism, whose norms communicate."""
    return torch.utils.checkpoint.checkpoint(activated, start, end, use_reentrant=False)


def modulate_(f: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """f · nearest(scale) + nearest(shift), with scale and shift at their own (lower) resolution:
    repeated along the width only (contiguous inner loops), then broadcast over views of f along time
    and rows, so no full-resolution copy of them is made (nor kept for backward under autograd).
    Without autograd in place on f."""
    factors = tuple(b // s for s, b in zip(scale.shape[2:], f.shape[2:]))  # integer nearest-resize factors
    if any(s * k != b for s, k, b in zip(scale.shape[2:], factors, f.shape[2:])):
        size = f.shape[2:]
        return f * F.interpolate(scale, size=size) + F.interpolate(shift, size=size)
    (b, c, t, h, w), (kt, kh, kw) = f.shape, factors
    if kw > 1:
        scale, shift = scale.repeat_interleave(kw, dim=-1), shift.repeat_interleave(kw, dim=-1)
    view = f.view(b, c, t // kt, kt, h // kh, kh, w)

    def lift(x):
        return x[:, :, :, None, :, None, :]

    if torch.is_grad_enabled():
        return (view * lift(scale) + lift(shift)).view(f.shape)
    view.mul_(lift(scale)).add_(lift(shift))
    return f


def frame_chunks(frames: int, size: int) -> list[tuple[int, int]]:
    """diffusers' chunking: max(frames // size, 1) chunks of `size`, the remainder in the first."""
    count, rest = max(frames // size, 1), frames % size
    return [(0 if i == 0 else size * i + rest, min(size * (i + 1) + rest, frames)) for i in range(count)]


def run_chunks(part: nn.Module, x: torch.Tensor, chunks: list[tuple[int, int]], out_frames, ctx: FrameContext,
               progress: bool, what: str) -> torch.Tensor:
    """part (encoder or decoder) over x's frame chunks in order, through one context (conv caches
    carried from chunk to chunk); `out_frames(n)`: the frames it makes of a chunk of n. The chunks'
    outputs go into one preallocated tensor (no concatenated copy)."""
    out = None
    for start, end in progress_bar(chunks, progress, f"{what} chunks"):
        ctx.final = end == chunks[-1][1]
        y = part(x[:, :, start:end], ctx)
        if out is None:
            out = y.new_empty(*y.shape[:2], sum(out_frames(e - s) for s, e in chunks), *y.shape[3:])
            done = 0
        out[:, :, done:done + y.shape[2]] = y
        done += y.shape[2]
        del y
    return out


def tile_steps_by_latents(size: int, frac: float, factor: int) -> bool:
    """Whether tiles of `size` pixels overlapping by `frac` advance by exactly what each keeps, in
    latent and in pixel units (else the tiled result grows or shrinks, as in diffusers)."""
    latent = size // factor
    return size % factor == 0 and latent > 0 and int(latent * (1 - frac)) * factor == size - int(size * frac) \
        and int(size * (1 - frac)) == (latent - int(latent * frac)) * factor


def nearest_tile(target: int, frac: float, factor: int, limit: int) -> int:
    """The valid tile size (multiple of `factor`, at most `limit`) nearest `target`."""
    candidates = [size for size in range(factor, max(limit, factor) + 1, factor)
                  if tile_steps_by_latents(size, frac, factor)]
    if not candidates:
        raise ValueError(f"no tile size up to {limit} pixels steps by whole latents with overlap {frac:.4g}")
    return min(candidates, key=lambda size: (abs(size - target), size))


def _blend_(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """b's first `extent` slices along dim ramped linearly from a's last ones (in place on b)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64, device=b.device) / extent
    shape = [1] * b.dim()
    shape[dim] = extent
    into, keep = (1 - ramp).to(b.dtype).reshape(shape), ramp.to(b.dtype).reshape(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * into + head * keep)


def tiled(x: torch.Tensor, run, tile: tuple[int, int], tile_out: tuple[int, int], overlap: tuple[float, float],
          progress: bool, what: str) -> torch.Tensor:
    """diffusers' spatial tiling: tiles of `tile` (h, w) pixels of x overlapping by the fractions
    `overlap`, each through `run` into `tile_out` pixels; each output tile's top/left overlap
    ramped from its upper/left neighbour (in row-major order, in place, as diffusers does), and the
    rest kept. An x no larger than one tile goes through `run` whole."""
    if x.shape[3] <= tile[0] and x.shape[4] <= tile[1]:
        return run(x, progress)
    stride = [int(size * (1 - frac)) for size, frac in zip(tile, overlap)]
    blend = [int(size * frac) for size, frac in zip(tile_out, overlap)]
    keep = [size - extent for size, extent in zip(tile_out, blend)]
    starts = [(i, j) for i in range(0, x.shape[3], stride[0]) for j in range(0, x.shape[4], stride[1])]
    outs = {}
    for i, j in progress_bar(starts, progress, f"{what} tiles"):
        outs[i, j] = run(x[:, :, :, i:i + tile[0], j:j + tile[1]])
    rows_i, cols_j = sorted({i for i, _ in starts}), sorted({j for _, j in starts})
    rows = []
    for a, i in enumerate(rows_i):
        for b, j in enumerate(cols_j):
            if a > 0:
                _blend_(outs[rows_i[a - 1], j], outs[i, j], blend[0], dim=3)
            if b > 0:
                _blend_(outs[i, cols_j[b - 1]], outs[i, j], blend[1], dim=4)
        rows.append(torch.cat([outs[i, j][:, :, :, :keep[0], :keep[1]] for j in cols_j], dim=4))
    return torch.cat(rows, dim=3)

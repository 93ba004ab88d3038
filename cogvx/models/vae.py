"""CogVideoX's 3D causal VAE: video (B, 3, F, H, W) in [-1, 1] ⇄ a diagonal-Gaussian latent
(B, 16, 1 + (F-1)/4, H/8, W/8), temporally causal convolutions (our `CausalConv3d`), ResNet blocks
with GroupNorm (decoder: SpatialNorm3D conditioned on the latent), processed in frame chunks with
conv caches as diffusers does, so results match its `AutoencoderKLCogVideoX`.

Parameter names are diffusers'; `cogvx.loading` reads its folders. How the layers run over a video
(frame chunks and their conv caches, slices, tiles, recomputation in backward) is
`cogvx.models.vae_execution`: every causal conv and GroupNorm here goes through its `FrameContext`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cogvx_kernels import causal_conv3d
from cogvx_kernels.nn import CausalConv3d

from .. import loading
from .._random import randn
from .vae_execution import (SLICE_ELEMENTS, FrameContext, frame_chunks, group_normalizer, modulate_, nearest_tile,
                            norm_act_conv, run_chunks, tile_steps_by_latents, tiled)

DIFFUSERS_CLASS = "AutoencoderKLCogVideoX"


@dataclass(frozen=True)
class VAEConfig(loading.DiffusersConfig):
    """diffusers' `AutoencoderKLCogVideoX` config (same keys and defaults)."""
    in_channels: loading.PositiveInt = 3
    out_channels: loading.PositiveInt = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[loading.PositiveInt, ...] = (128, 256, 256, 512)
    latent_channels: loading.PositiveInt = 16
    layers_per_block: loading.PositiveInt = 3
    act_fn: str = "silu"
    norm_eps: loading.PositiveFloat = 1e-6
    norm_num_groups: loading.PositiveInt = 32
    temporal_compression_ratio: loading.PositiveFloat = 4
    sample_height: loading.PositiveInt = 480
    sample_width: loading.PositiveInt = 720
    scaling_factor: loading.PositiveFloat = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # diffusers annotates float, writes true
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    MODEL = "VAE"

    def problems(self) -> list[str]:
        problems = []
        if self.act_fn != "silu":
            problems.append(f"act_fn must be 'silu'; got {self.act_fn!r}")
        if set(self.down_block_types) - {"CogVideoXDownBlock3D"} or set(self.up_block_types) - {"CogVideoXUpBlock3D"}:
            problems.append("block types must be CogVideoXDownBlock3D / CogVideoXUpBlock3D")
        if len(self.up_block_types) != len(self.block_out_channels) or len(self.down_block_types) != len(
                self.block_out_channels):
            problems.append("down_block_types, up_block_types and block_out_channels must have the same length")
        if self.use_quant_conv or self.use_post_quant_conv:
            problems.append("use_quant_conv / use_post_quant_conv are not used by CogVideoX and not supported")
        if any(ch % self.norm_num_groups for ch in self.block_out_channels):
            problems.append(f"block_out_channels {list(self.block_out_channels)} must be multiples of norm_num_groups "
                            f"({self.norm_num_groups}): GroupNorm splits channels into equal groups")
        return problems


    @property
    def temporal_levels(self) -> int:  # how many stages halve (encoder) / double (decoder) time
        return int(math.log2(self.temporal_compression_ratio))

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian:
    """The encoder's posterior: mean and log-variance (clamped to [-30, 20]) over channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std · ε, ε drawn like diffusers' randn_tensor (on the generator's device, then moved)."""
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over every latent element: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


def _per_frame(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A Conv2d applied to every frame of (B, C, T, H, W), as a (1, kh, kw) 3D conv: no transposes.
    Our causal_conv3d at stride 1; torch's conv3d for a strided one (which ours has not)."""
    weight = conv.weight[:, :, None]
    if conv.stride == (1, 1):
        return causal_conv3d(x, weight, conv.bias, padding=conv.padding)
    return F.conv3d(x, weight, conv.bias, stride=(1, *conv.stride), padding=(0, *conv.padding))


def _latent_frame_index(frames: int, latent_frames: int) -> torch.Tensor:
    """The latent frame that conditions each of `frames` frames: nearest resizing in time (what
    diffusers' F.interpolate picks), the first frame on its own when `frames` is odd and > 1."""
    def nearest(first: int, count: int, size: int) -> torch.Tensor:
        index = torch.arange(first, first + count, dtype=torch.float32).view(1, 1, -1)
        return F.interpolate(index, size=size).flatten().long()

    if frames > 1 and frames % 2 == 1:
        return torch.cat([nearest(0, 1, 1), nearest(1, latent_frames - 1, frames - 1)])
    return nearest(0, latent_frames, frames)


class SpatialNorm3D(nn.Module):
    """GroupNorm of f, then scaled and shifted by 1×1×1 convs of the latent zq resized (nearest) to
    f's size, the first frame on its own when f has an odd frame count > 1 (the causal layout).
    The 1×1×1 convs commute with nearest resizing, so they run at the latent's resolution."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_y = CausalConv3d(zq_channels, channels, 1)
        self.conv_b = CausalConv3d(zq_channels, channels, 1)

    def normalizer(self, f: torch.Tensor, zq: torch.Tensor, ctx: FrameContext, slices):
        """As `group_normalizer`: (start, end) -> f's frames [start, end) normalised and modulated."""
        normalize = group_normalizer(self.norm_layer, f, ctx, slices)
        scale, shift = ctx.conv(self.conv_y, zq), ctx.conv(self.conv_b, zq)
        index = _latent_frame_index(f.shape[2], zq.shape[2]).to(zq.device)

        def normalized(start: int, end: int) -> torch.Tensor:
            frames = index[start:end]
            return modulate_(normalize(start, end), scale.index_select(2, frames), shift.index_select(2, frames))
        return normalized


class ResnetBlock3D(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> causal conv, plus a (1×1×1 conv) shortcut.
    Norms are GroupNorm (encoder) or SpatialNorm3D on the latent (decoder, `zq_channels`)."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, eps: float, zq_channels: int | None = None):
        super().__init__()
        if zq_channels is None:
            self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
            self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, zq_channels, groups)
            self.norm2 = SpatialNorm3D(out_channels, zq_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.gradient_checkpointing = False  # CausalVAE.enable_gradient_checkpointing

    def _normalizer(self, norm, x: torch.Tensor, zq: torch.Tensor | None, ctx: FrameContext, slices):
        return group_normalizer(norm, x, ctx, slices) if zq is None else norm.normalizer(x, zq, ctx, slices)

    def forward(self, x: torch.Tensor, ctx: FrameContext, zq: torch.Tensor | None = None) -> torch.Tensor:
        slices = ctx.slices(x)
        h = norm_act_conv(self._normalizer(self.norm1, x, zq, ctx, slices), self.conv1, x, ctx, slices)
        shortcut = x if self.conv_shortcut is None else causal_conv3d(x, self.conv_shortcut.weight,
                                                                      self.conv_shortcut.bias)
        slices = ctx.slices(h)
        return norm_act_conv(self._normalizer(self.norm2, h, zq, ctx, slices), self.conv2, h, ctx, slices,
                             residual=shortcut)


class Downsample3D(nn.Module):
    """Optional 2× time compression (keep the first frame of an odd count, average the rest in
    pairs), then a stride-2 3×3 conv per frame with zero padding on the bottom/right. The frames
    are written straight into the padded tensor the conv reads (no transposed or concatenated copy)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        keep = t % 2 if self.compress_time else t  # frames passed on as they are
        padded = x.new_empty(b, c, keep + (t - keep) // 2, h + 1, w + 1)
        padded[:, :, :, h].zero_()
        padded[:, :, :, :h, w].zero_()
        padded[:, :, :keep, :h, :w] = x[:, :, :keep]
        if keep < t:  # the mean of each pair: (a + b) · ½ rounds as avg_pool does (halving is exact),
            # and also runs in bf16/fp16 on CPU, where avg_pool3d has no kernel
            pairs = padded[:, :, keep:, :h, :w]
            if torch.is_grad_enabled():  # out= has no autograd: the same sum, then copied in
                pairs.copy_(x[:, :, keep::2] + x[:, :, keep + 1::2]).mul_(0.5)
            else:
                torch.add(x[:, :, keep::2], x[:, :, keep + 1::2], out=pairs).mul_(0.5)
        return _per_frame(self.conv, padded)


class Upsample3D(nn.Module):
    """Nearest 2× upsampling in space (and in time when compress_time, the first frame of an odd
    count kept single), then a 3×3 conv per frame. The conv acts on each frame alone, so it runs
    before the time doubling, on half the frames, and its output frames are repeated instead (the
    same numbers as doubling first)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _per_frame(self.conv, F.interpolate(x, scale_factor=(1.0, 2.0, 2.0)))
        b, c, t, h, w = y.shape
        if not self.compress_time or t == 1:
            return y
        single = t % 2  # an odd count keeps its first frame single (the causal layout)
        out = y.new_empty(b, c, single + 2 * (t - single), h, w)
        out[:, :, :single] = y[:, :, :single]
        out[:, :, single:].view(b, c, t - single, 2, h, w).copy_(y[:, :, single:, None])
        return out


class Stage(nn.Module):
    """ResNet blocks then an optional resampler: one of the four encoder/decoder stages (and, without
    resampler, the mid block)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, *, groups: int, eps: float,
                 zq_channels: int | None = None, resample: str | None = None, compress_time: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=eps,
                          zq_channels=zq_channels) for i in range(layers))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample3D(out_channels, compress_time)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample3D(out_channels, compress_time)])

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *getattr(self, "downsamplers", []), *getattr(self, "upsamplers", [])]


def _through_stages(stages: list[Stage], x: torch.Tensor, ctx: FrameContext, zq: torch.Tensor | None = None):
    """x through every layer of the stages in order. A layer at a time (not Stage modules calling
    their layers): a module call holds its input until it returns, so a stage's input would stay
    alive through all its ResNet blocks (a full-resolution activation in the first encoder stage and
    the last decoder stage). Callers pass a temporary, not a variable they keep."""
    for stage in stages:
        for layer in stage.layers():
            if not isinstance(layer, ResnetBlock3D):
                x = layer(x)
            elif layer.gradient_checkpointing and torch.is_grad_enabled():
                x = ctx.checkpointed(layer, x, zq)
            else:
                x = layer(x, ctx, zq)
    return x


class Encoder3D(nn.Module):
    """conv_in, four down stages (2× space except the last, 2× time in the first
    log2(temporal_compression_ratio)), mid block, GroupNorm, SiLU, conv_out to 2·latent channels."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, eps = c.block_out_channels, c.norm_num_groups, c.norm_eps
        self.conv_in = CausalConv3d(c.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], c.layers_per_block, groups=g, eps=eps,
                  resample="down" if i < len(ch) - 1 else None, compress_time=i < c.temporal_levels)
            for i in range(len(ch)))
        self.mid_block = Stage(ch[-1], ch[-1], 2, groups=g, eps=eps)
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * c.latent_channels, 3)

    def forward(self, video: torch.Tensor, ctx: FrameContext) -> torch.Tensor:
        x = _through_stages([*self.down_blocks, self.mid_block], ctx.conv(self.conv_in, video), ctx)
        slices = ctx.slices(x)
        return norm_act_conv(group_normalizer(self.norm_out, x, ctx, slices), self.conv_out, x, ctx, slices)


class Decoder3D(nn.Module):
    """conv_in, mid block, four up stages (layers_per_block + 1 ResNets each, 2× space except the
    last, 2× time in the first log2(ratio)), SpatialNorm3D, SiLU, conv_out; every norm conditioned on
    the latent chunk."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, eps, z = list(reversed(c.block_out_channels)), c.norm_num_groups, c.norm_eps, c.latent_channels
        self.conv_in = CausalConv3d(z, ch[0], 3)
        self.mid_block = Stage(ch[0], ch[0], 2, groups=g, eps=eps, zq_channels=z)
        self.up_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, groups=g, eps=eps, zq_channels=z,
                  resample="up" if i < len(ch) - 1 else None, compress_time=i < c.temporal_levels)
            for i in range(len(ch)))
        self.norm_out = SpatialNorm3D(ch[-1], z, g)
        self.conv_out = CausalConv3d(ch[-1], c.out_channels, 3)

    def forward(self, z: torch.Tensor, ctx: FrameContext) -> torch.Tensor:
        x = _through_stages([self.mid_block, *self.up_blocks], ctx.conv(self.conv_in, z), ctx, z)
        slices = ctx.slices(x)
        return norm_act_conv(self.norm_out.normalizer(x, z, ctx, slices), self.conv_out, x, ctx, slices)


class CausalVAE(nn.Module):
    """CogVideoX's 3D causal VAE (diffusers' AutoencoderKLCogVideoX layouts: video (B, C, F, H, W)).

    encode(video) -> DiagonalGaussian; decode(latents) -> video tensor. chunking="diffusers" (default)
    processes frames in diffusers' chunks (encode 8 video frames, decode 2 latent frames, remainder
    first; GroupNorm statistics per chunk); "whole" takes the whole video as one chunk.
    `scaling_factor` is the pipeline's business, not applied here.
    """

    PARTS = ("encoder", "decoder")

    def __init__(self, config: VAEConfig | dict | None = None, *, chunking: str = "diffusers",
                 parts: tuple[str, ...] = PARTS):
        super().__init__()
        config = VAEConfig.of(config)
        if not parts or set(parts) - set(self.PARTS):
            raise ValueError(f"parts must be a non-empty subset of {self.PARTS}; got {parts}")
        self.config = config
        self.encoder = Encoder3D(config) if "encoder" in parts else None
        self.decoder = Decoder3D(config) if "decoder" in parts else None
        self.set_chunking(chunking)
        self.tiling: tuple[int, int, float, float] | None = None

    def set_chunking(self, chunking: str, *, encode_frames: int = 8, decode_latents: int = 2,
                     slice_elements: int = SLICE_ELEMENTS) -> "CausalVAE":
        """Frame chunks (GroupNorm statistics per chunk, conv caches between them): "diffusers" or
        "whole"; `slice_elements` bounds the slices a chunk's layers run in without autograd (memory
        only: the numbers do not depend on it; 1 = a frame at a time)."""
        if chunking not in ("diffusers", "whole"):
            raise ValueError(f"chunking must be 'diffusers' or 'whole'; got {chunking!r}")
        if encode_frames < 1 or decode_latents < 1 or slice_elements < 1:
            raise ValueError("encode_frames, decode_latents and slice_elements must be positive")
        self.chunking, self.encode_frames, self.decode_latents = chunking, encode_frames, decode_latents
        self.slice_elements = slice_elements
        return self

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype | str | None = None, device=None,
                        chunking: str = "diffusers", parts: tuple[str, ...] = PARTS) -> "CausalVAE":
        """Load a diffusers-format VAE folder (or a pipeline root with vae/); see Transformer3D.
        parts=("decoder",) reads only the decoder's weights (a decode-only use never holds the encoder)."""
        dtype, device = loading.resolve_dtype(dtype), loading.resolve_device(device)
        folder = loading.component_folder(folder, "vae")
        config = loading.read_config(folder, VAEConfig, DIFFUSERS_CLASS)
        with torch.device("meta"):
            model = cls(config, chunking=chunking, parts=parts)
        skip = tuple(f"{part}." for part in cls.PARTS if part not in parts)
        loading.load_weights(model, folder, dtype=dtype, device=device, skip_prefixes=skip)
        return model.eval()

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "CausalVAE":
        """Under autograd, keep only each ResNet block's input and recompute the block in backward
        (training memory: the activations of one block at a time instead of all)."""
        for module in self.modules():
            if isinstance(module, ResnetBlock3D):
                module.gradient_checkpointing = enabled
        return self

    def _require(self, part: str):
        module = getattr(self, part)
        if module is None:
            raise RuntimeError(f"this CausalVAE was loaded without its {part} (parts=...): it cannot "
                               f"{'encode' if part == 'encoder' else 'decode'}")
        return module

    def save_pretrained(self, folder: str | Path, *, max_shard_size: int = 10 * 2**30,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        loading.save_pretrained(self, folder, self.config.to_dict(), DIFFUSERS_CLASS, max_shard_size=max_shard_size,
                                state_dict=state_dict)

    def _check(self, x: torch.Tensor, name: str, channels: int, multiple: int):
        if x.dim() != 5:
            raise ValueError(f"{name} must be (batch, channels, frames, height, width); got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{name} must have {channels} channels (dim 1 of (B, C, F, H, W)); got {x.shape[1]}")
        if x.shape[3] % multiple or x.shape[4] % multiple:
            raise ValueError(f"{name} height and width must be multiples of {multiple}; got {x.shape[3]}×{x.shape[4]}")
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise ValueError(f"{name} is {x.dtype} but the VAE is {dtype}")
        if not x.is_meta and not torch.isfinite(x).all():  # one cheap pass: NaN would spread through every GroupNorm
            raise ValueError(f"{name} contains NaN or infinite values")

    def enable_tiling(self, tile_height: int | None = None, tile_width: int | None = None,
                      overlap: float | tuple[float, float] | None = None) -> "CausalVAE":
        """Process spatial tiles of tile_height × tile_width video pixels overlapping by the fraction
        `overlap` (default 1/6 of the height, 1/5 of the width), blended linearly across the overlap:
        diffusers' tiling, same numbers. A frame larger than one tile is then encoded/decoded tile by
        tile, each tile frame-chunk by chunk. Tiles must step by whole latents; without sizes, the
        valid size nearest half the config's sample size is taken (diffusers' default for CogVideoX)."""
        c, f = self.config, self.config.spatial_factor
        fh, fw = (1 / 6, 1 / 5) if overlap is None else (overlap, overlap) if isinstance(overlap, (int, float)) \
            else overlap
        if not (0 <= fh < 1 and 0 <= fw < 1):
            raise ValueError(f"overlaps must be in [0, 1); got ({fh}, {fw})")
        height = tile_height or nearest_tile(c.sample_height // 2, fh, f, c.sample_height)
        width = tile_width or nearest_tile(c.sample_width // 2, fw, f, c.sample_width)
        for size, frac in ((height, fh), (width, fw)):
            if not tile_steps_by_latents(size, frac, f):
                raise ValueError(f"tile size {size} with overlap {frac:.4g} does not step by whole latents "
                                 f"(tile and overlap must be multiples of {f} pixels, e.g. 240×360 with "
                                 f"(1/6, 1/5), CogVideoX's default at 480×720)")
        self.tiling = (height, width, fh, fw)
        return self

    def disable_tiling(self) -> "CausalVAE":
        self.tiling = None
        return self

    def encode(self, video: torch.Tensor, *, progress: bool = False) -> DiagonalGaussian:
        """Video (B, 3, 1 + 4k, H, W) -> the posterior over latents (B, C, 1 + k, H/8, W/8), chunk by
        chunk (tile by tile when tiling is on and the frame is larger than a tile)."""
        self._require("encoder")
        self._check(video, "video", self.config.in_channels, self.config.spatial_factor)
        ratio = int(self.config.temporal_compression_ratio)
        if video.shape[2] != 1 and (video.shape[2] - 1) % ratio:
            raise ValueError(f"video must have 1 + {ratio}·k frames (causal layout: the first frame alone); "
                             f"got {video.shape[2]}")
        time_ratio = 2 ** self.config.temporal_levels  # each halving keeps an odd count's first frame: ceil(n / 2)
        return DiagonalGaussian(self._run(self.encoder, video, self.encode_frames, lambda n: -(-n // time_ratio),
                                          progress, "encode"))

    def decode(self, latents: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
        """Latents (B, C, F', h, w) -> video (B, 3, F, 8h, 8w), chunk by chunk (tile by tile when
        tiling is on and the frame is larger than a tile); `progress` shows a tqdm bar."""
        self._require("decoder")
        self._check(latents, "latents", self.config.latent_channels, 1)
        return self._run(self.decoder, latents, self.decode_latents, self.decoded_frames, progress, "decode")

    def _run(self, part: nn.Module, x: torch.Tensor, chunk_frames: int, out_frames, progress: bool, what: str):
        """part (encoder or decoder) over x in frame chunks of `chunk_frames` (one with chunking="whole"),
        in spatial tiles when tiling is on (the encoder's in video pixels, the decoder's in latents)."""
        def run(x: torch.Tensor, progress: bool = False) -> torch.Tensor:
            chunks = [(0, x.shape[2])] if self.chunking == "whole" else frame_chunks(x.shape[2], chunk_frames)
            return run_chunks(part, x, chunks, out_frames, FrameContext(self.slice_elements), progress, what)
        if self.tiling is None:
            return run(x, progress)
        height, width, fh, fw = self.tiling
        video, latent = (height, width), (height // self.config.spatial_factor, width // self.config.spatial_factor)
        tile, tile_out = (video, latent) if part is self.encoder else (latent, video)
        return tiled(x, run, tile, tile_out, (fh, fw), progress, what)

    def decoded_frames(self, latent_frames: int) -> int:
        """Video frames the decoder makes of one chunk of latent frames (an odd count keeps its first
        frame single: 1 + r·(n - 1); an even count: r·n)."""
        ratio = 2 ** self.config.temporal_levels
        return 1 + ratio * (latent_frames - 1) if latent_frames % 2 else ratio * latent_frames

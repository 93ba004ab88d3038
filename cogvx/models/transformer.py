"""CogVideoX's expert transformer: text and video tokens in one sequence, expert adaptive LayerNorm
(separate modulation for text and video tokens), joint attention with per-head q/k LayerNorm and
3D-RoPE, tanh-GELU FFN, then a final adaptive LayerNorm and the unpatchify.

Parameter names are diffusers' `CogVideoXTransformer3DModel` names, so its checkpoints load as they
are (`cogvx.loading`); the numerics follow it operation by operation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cogvx_kernels import _registry
from cogvx_kernels.nn import JointAttention, Rope3D

from .. import loading
from .embeddings import PatchEmbed, TimestepMLP, sincos_positions_3d, timestep_embedding

DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"


def check_backend(backend: str | None) -> str | None:
    """A kernel backend name every op of the model has, or None (automatic)."""
    return _registry.check_common_backend(backend)


@dataclass(frozen=True)
class TransformerConfig(loading.DiffusersConfig):
    """diffusers' `CogVideoXTransformer3DModel` config (same keys, same defaults: CogVideoX-2B's)."""
    num_attention_heads: loading.PositiveInt = 30
    attention_head_dim: loading.PositiveInt = 64
    in_channels: loading.PositiveInt = 16
    out_channels: loading.PositiveInt | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: loading.PositiveInt = 512
    ofs_embed_dim: loading.NonNegativeInt | None = None  # 0, like None, means no ofs embedding (as in diffusers)
    text_embed_dim: loading.PositiveInt = 4096
    num_layers: loading.PositiveInt = 30
    dropout: loading.UnitFloat = 0.0
    attention_bias: bool = True
    sample_width: loading.PositiveInt = 90
    sample_height: loading.PositiveInt = 60
    sample_frames: loading.PositiveInt = 49
    patch_size: loading.PositiveInt = 2
    patch_size_t: loading.PositiveInt | None = None
    temporal_compression_ratio: loading.PositiveInt = 4
    max_text_seq_length: loading.PositiveInt = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: loading.PositiveFloat = 1e-5
    spatial_interpolation_scale: loading.PositiveFloat = 1.875
    temporal_interpolation_scale: loading.PositiveFloat = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    MODEL = "transformer"

    def problems(self) -> list[str]:
        problems = []
        if self.activation_fn != "gelu-approximate":
            problems.append(f"activation_fn must be 'gelu-approximate' (CogVideoX's tanh GELU); got {self.activation_fn!r}")
        if self.timestep_activation_fn != "silu":
            problems.append(f"timestep_activation_fn must be 'silu'; got {self.timestep_activation_fn!r}")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            problems.append("use_learned_positional_embeddings needs use_rotary_positional_embeddings (as in 5B-I2V)")
        if self.patch_size_t is not None and not self.use_rotary_positional_embeddings:
            problems.append("patch_size_t (CogVideoX 1.5) needs use_rotary_positional_embeddings")
        if self.ofs_embed_dim and self.ofs_embed_dim != self.time_embed_dim:
            problems.append(f"ofs_embed_dim ({self.ofs_embed_dim}) must equal time_embed_dim ({self.time_embed_dim}): "
                            "the ofs embedding is added to the time embedding")
        if self.attention_head_dim % 8 and self.use_rotary_positional_embeddings:
            problems.append(f"attention_head_dim must be a multiple of 8 for 3D-RoPE; got {self.attention_head_dim}")
        if self.use_rotary_positional_embeddings and min(self.sample_height, self.sample_width) < self.patch_size:
            problems.append(f"sample_height and sample_width ({self.sample_height}, {self.sample_width}) must be at "
                            f"least patch_size ({self.patch_size}): 3D-RoPE's base grid is their quotient")
        return problems


    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels


# The public checkpoints' transformer configs, as changes to TransformerConfig's defaults (2B's):
# a model built from a layout has the checkpoint's shapes (training from scratch, tests)
LAYOUTS = {
    "2b": {},
    "5b": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
    "1.5": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True, patch_size_t=2,
                patch_bias=False, sample_frames=81, sample_height=300, sample_width=300),
}


class ExpertAdaLayerNorm(nn.Module):
    """One LayerNorm shared by all tokens, modulated separately for text and video tokens (the
    "experts"): a linear of SiLU(time embedding) gives shift, scale, gate for video, then for text.
    forward(x = [text, video], text_len, temb) -> (modulated x, text gate, video gate)."""

    def __init__(self, time_dim: int, dim: int, *, eps: float, affine: bool = True):
        super().__init__()
        self.linear = nn.Linear(time_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor, text_len: int, temb: torch.Tensor):
        shift, scale, gate, text_shift, text_scale, text_gate = self.linear(F.silu(temb))[:, None].chunk(6, dim=-1)
        normed = self.norm(x)
        text, video = normed[:, :text_len], normed[:, text_len:]
        if torch.is_grad_enabled():
            normed = torch.cat([text * (1 + text_scale) + text_shift, video * (1 + scale) + shift], dim=1)
        else:  # inference: modulate the fresh normalised tensor in place, same operations
            text.mul_(1 + text_scale).add_(text_shift)
            video.mul_(1 + scale).add_(shift)
        return normed, text_gate, gate


def gated_residual(x: torch.Tensor, out: torch.Tensor, text_gate: torch.Tensor, video_gate: torch.Tensor,
                   text_len: int) -> torch.Tensor:
    """x + gate · out with the text gate on the first text_len tokens and the video gate on the rest."""
    if torch.is_grad_enabled():
        return torch.cat([x[:, :text_len] + text_gate * out[:, :text_len],
                          x[:, text_len:] + video_gate * out[:, text_len:]], dim=1)
    x[:, :text_len] += text_gate * out[:, :text_len]  # inference: in place, no new sequence-sized tensor
    x[:, text_len:] += video_gate * out[:, text_len:]
    return x


class TanhGELU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> 4·dim tanh-GELU -> dim. Without autograd the tokens go through in chunks of
    `chunk_tokens`, so the 4·dim intermediate never exists for the whole sequence at once."""

    def __init__(self, dim: int, *, dropout: float = 0.0, chunk_tokens: int = 4096):
        super().__init__()
        self.net = nn.Sequential(TanhGELU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))
        self.chunk_tokens = chunk_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.shape[1] <= self.chunk_tokens:
            return self.net(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[1], self.chunk_tokens):
            out[:, start:start + self.chunk_tokens] = self.net(x[:, start:start + self.chunk_tokens])
        return out


class ExpertBlock(nn.Module):
    """One expert transformer block: expert adaLN -> joint attention -> gated residual, then expert
    adaLN -> FFN -> gated residual, over the joint sequence [text, video]."""

    def __init__(self, config: TransformerConfig, backend: str | None = None):
        super().__init__()
        dim, c = config.inner_dim, config
        self.norm1 = ExpertAdaLayerNorm(c.time_embed_dim, dim, eps=c.norm_eps, affine=c.norm_elementwise_affine)
        self.attn1 = JointAttention(dim, c.num_attention_heads, c.attention_head_dim, qk_norm=True, eps=1e-6,
                                    bias=c.attention_bias, out_bias=True, backend=backend)
        self.norm2 = ExpertAdaLayerNorm(c.time_embed_dim, dim, eps=c.norm_eps, affine=c.norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=c.dropout)

    def forward(self, x: torch.Tensor, text_len: int, temb: torch.Tensor, positions=None) -> torch.Tensor:
        normed, text_gate, video_gate = self.norm1(x, text_len, temb)
        x = gated_residual(x, self.attn1.joint(normed, text_len, positions), text_gate, video_gate, text_len)
        normed, text_gate, video_gate = self.norm2(x, text_len, temb)
        return gated_residual(x, self.ff(normed), text_gate, video_gate, text_len)


class FinalAdaLayerNorm(nn.Module):
    """LayerNorm then (1 + scale)·x + shift from SiLU(time embedding) (shift first, as CogVideoX)."""

    def __init__(self, time_dim: int, dim: int, *, eps: float, affine: bool = True):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class Transformer3D(nn.Module):
    """The CogVideoX diffusion transformer (2B, 5B, 5B-I2V, 1.5-5B, 1.5-5B-I2V).

    model(latents (B, F, C, H, W), text_embeddings (B, T, text_dim), timestep (B,) or scalar,
    ofs=None) -> (B, F, C_out, H, W), diffusers' layouts. Positions come from the config and the
    input size: 3D sin-cos (2B), 3D-RoPE (5B, 1.5) and the learned table of 5B-I2V.
    `backend` picks the attention / RoPE kernels (None: the best for the device).
    """

    def __init__(self, config: TransformerConfig | dict | None = None, *, backend: str | None = None):
        super().__init__()
        backend = check_backend(backend)
        self.config = c = TransformerConfig.of(config)
        dim = c.inner_dim
        learned = None
        if c.use_learned_positional_embeddings:
            learned = c.max_text_seq_length + self._native_latent_frames * (c.sample_height // c.patch_size) * (
                c.sample_width // c.patch_size)
        self.patch_embed = PatchEmbed(c.in_channels, dim, c.text_embed_dim, patch_size=c.patch_size,
                                      patch_size_t=c.patch_size_t, bias=c.patch_bias, learned_positions=learned)
        self.embedding_dropout = nn.Dropout(c.dropout)
        self.time_embedding = TimestepMLP(dim, c.time_embed_dim)
        self.ofs_embedding = TimestepMLP(c.ofs_embed_dim, c.ofs_embed_dim) if c.ofs_embed_dim else None
        self.rope = Rope3D.from_config(c.to_dict(), backend=backend) if c.use_rotary_positional_embeddings else None
        self.transformer_blocks = nn.ModuleList(ExpertBlock(c, backend) for _ in range(c.num_layers))
        self.norm_final = nn.LayerNorm(dim, eps=c.norm_eps, elementwise_affine=c.norm_elementwise_affine)
        self.norm_out = FinalAdaLayerNorm(c.time_embed_dim, dim, eps=c.norm_eps, affine=c.norm_elementwise_affine)
        self.proj_out = nn.Linear(dim, c.patch_size ** 2 * (c.patch_size_t or 1) * c.output_channels)
        self.gradient_checkpointing = False
        self._sincos_cache: tuple[tuple, torch.Tensor] | None = None

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype | str | None = None, device=None,
                        backend: str | None = None) -> "Transformer3D":
        """Load a diffusers-format folder (config.json + safetensors, sharded or not; a pipeline
        root with a transformer/ subfolder works too). dtype None keeps the checkpoint's dtype
        (names such as "bf16" are accepted: `loading.resolve_dtype`). The model is built on the meta
        device and takes the loaded tensors as they are: the weights are never held twice."""
        dtype, device = loading.resolve_dtype(dtype), loading.resolve_device(device)
        folder = loading.component_folder(folder, "transformer")
        config = loading.read_config(folder, TransformerConfig, DIFFUSERS_CLASS)
        with torch.device("meta"):
            model = cls(config, backend=backend)
        loading.load_weights(model, folder, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, folder: str | Path, *, max_shard_size: int = 10 * 2**30,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json + diffusion_pytorch_model*.safetensors, readable by diffusers
        (`state_dict`: other tensors of this model's names, e.g. gathered from a sharded copy)."""
        loading.save_pretrained(self, folder, self.config.to_dict(), DIFFUSERS_CLASS, max_shard_size=max_shard_size,
                                state_dict=state_dict)

    def set_backend(self, backend: str | None) -> "Transformer3D":
        backend = check_backend(backend)
        for module in self.modules():
            if isinstance(module, (JointAttention, Rope3D)):
                module.backend = backend
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "Transformer3D":
        self.gradient_checkpointing = enabled
        return self

    # -- forward -----------------------------------------------------------------------------------
    @property
    def _native_latent_frames(self) -> int:
        # sample_frames counts video frames (49), not latent frames (13)
        return (self.config.sample_frames - 1) // self.config.temporal_compression_ratio + 1

    def forward(self, latents: torch.Tensor, text_embeddings: torch.Tensor, timestep, ofs=None) -> torch.Tensor:
        x, temb, positions = self.embed(latents, text_embeddings, timestep, ofs)
        text_len = text_embeddings.shape[1]
        x = self.run_blocks(x, text_len, temb, positions)
        return self.unpatchify(self.head(x[:, text_len:], temb), latents.shape)

    # the forward's steps, also run one by one by execution schemes outside the model (cogvx.parallel)
    def embed(self, latents: torch.Tensor, text_embeddings: torch.Tensor, timestep, ofs=None):
        """-> (x, temb, positions): the joint sequence [text, video] (B, T + N, dim) with its additive
        positions, the time embedding (B, time_dim), and the video tokens' RoPE positions (pos_t,
        pos_h, pos_w) or None. Video tokens are ordered (t, h, w) over the patch grid."""
        batch, frames, _, height, width = self._check_inputs(latents, text_embeddings)
        text_len = text_embeddings.shape[1]
        temb = self.time_embedding(self._sinusoid(timestep, "timestep", batch, latents).to(latents.dtype))
        if self.ofs_embedding is not None:
            if ofs is None:
                raise ValueError("ofs is required: this model (CogVideoX 1.5 I2V) has an ofs embedding")
            temb = temb + self.ofs_embedding(self._sinusoid(ofs, "ofs", batch, latents).to(latents.dtype))
        elif ofs is not None:
            raise ValueError("ofs was given but this model has no ofs embedding (ofs_embed_dim is not set)")

        x = self.patch_embed(text_embeddings, latents)
        table = self._additive_positions(text_len, frames, height, width, x)
        if table is not None:
            x = x + table
        x = self.embedding_dropout(x)
        positions = self.rope.positions(frames, height, width, x.device) if self.rope is not None else None
        return x, temb, positions

    def run_blocks(self, x: torch.Tensor, text_len: int, temb: torch.Tensor, positions) -> torch.Tensor:
        """The expert blocks over x = [text, video]; `positions` goes to every block's attention."""
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, text_len, temb, positions, use_reentrant=False)
            else:
                x = block(x, text_len, temb, positions)
        return x

    def head(self, video: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Video tokens (B, n, dim) -> their patches (B, n, p·p·p_t·C_out): final norms, projection."""
        return self.proj_out(self.norm_out(self.norm_final(video), temb))

    def unpatchify(self, patches: torch.Tensor, latent_shape) -> torch.Tensor:
        """(B, N, p·p·p_t·C_out) patches of all video tokens -> (B, F, C_out, H, W) for latents of
        `latent_shape` (B, F, C, H, W)."""
        batch, frames, _, height, width = latent_shape
        return self._unpatchify(patches, batch, frames, height, width)

    def _sinusoid(self, t, name: str, batch: int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device)
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a scalar or of shape ({batch},) or (1,) for a batch of {batch}; "
                             f"got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(batch)  # one row per sample, whichever form was given
        dim = self.config.inner_dim if name == "timestep" else self.config.ofs_embed_dim
        return timestep_embedding(t, dim, flip_sin_to_cos=self.config.flip_sin_to_cos,
                                  freq_shift=self.config.freq_shift)

    def _additive_positions(self, text_len: int, frames: int, height: int, width: int, x: torch.Tensor):
        """The (1, T + N, dim) table added to the joint sequence, or None (RoPE only). 5B-I2V's learned
        table serves only its native size; 2B's sin-cos table (zero text rows) any size."""
        c = self.config
        if c.use_rotary_positional_embeddings and not c.use_learned_positional_embeddings:
            return None
        if c.use_learned_positional_embeddings:
            if (height, width) != (c.sample_height, c.sample_width):
                raise ValueError(f"this model's learned positions (5B-I2V) only serve {c.sample_height}×{c.sample_width} "
                                 f"latents; got {height}×{width}")
            if text_len != c.max_text_seq_length:
                raise ValueError(f"text_embeddings must have {c.max_text_seq_length} tokens (the learned position "
                                 f"table covers them); got {text_len}")
            if frames == self._native_latent_frames:
                return self.patch_embed.pos_embedding.to(x.dtype)
        key = (text_len, frames, height, width, x.device, x.dtype)
        if self._sincos_cache is not None and self._sincos_cache[0] == key:
            return self._sincos_cache[1]
        video = sincos_positions_3d(c.inner_dim, frames, height // c.patch_size, width // c.patch_size,
                                    spatial_scale=c.spatial_interpolation_scale,
                                    temporal_scale=c.temporal_interpolation_scale, device=x.device)
        table = torch.cat([video.new_zeros(text_len, c.inner_dim), video])[None].to(x.dtype)
        if not torch.compiler.is_compiling():
            self._sincos_cache = (key, table)
        return table

    def _unpatchify(self, out: torch.Tensor, batch: int, frames: int, height: int, width: int) -> torch.Tensor:
        p, pt = self.config.patch_size, self.config.patch_size_t
        if pt is None:
            out = out.reshape(batch, frames, height // p, width // p, -1, p, p)
            return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        out = out.reshape(batch, frames // pt, height // p, width // p, -1, pt, p, p)
        return out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)

    def _check_inputs(self, latents: torch.Tensor, text: torch.Tensor):
        c = self.config
        if latents.dim() != 5:
            raise ValueError(f"latents must be (batch, frames, channels, height, width); got shape {tuple(latents.shape)}")
        batch, frames, channels, height, width = latents.shape
        if channels != c.in_channels:
            raise ValueError(f"latents must have {c.in_channels} channels (dim 2 of (B, F, C, H, W)); got {channels}")
        if height % c.patch_size or width % c.patch_size:
            raise ValueError(f"latent height and width must be multiples of patch_size {c.patch_size}; "
                             f"got {height}×{width}")
        if c.patch_size_t and frames % c.patch_size_t:
            raise ValueError(f"latent frames must be a multiple of patch_size_t {c.patch_size_t} (pad at the front, "
                             f"as the pipeline does); got {frames}")
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != c.text_embed_dim:
            raise ValueError(f"text_embeddings must be (batch={batch}, tokens, {c.text_embed_dim}); "
                             f"got shape {tuple(text.shape)}")
        if latents.dtype != text.dtype:
            raise ValueError(f"latents ({latents.dtype}) and text_embeddings ({text.dtype}) must share a dtype")
        weight_dtype = self.proj_out.weight.dtype
        if latents.dtype != weight_dtype:
            raise ValueError(f"latents are {latents.dtype} but the model is {weight_dtype}: cast one to the other")
        return batch, frames, channels, height, width

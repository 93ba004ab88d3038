"""Our kernels inside diffusers' CogVideoX.

    from cogvx_kernels.integrations.diffusers import accelerate
    accelerate(pipe)            # attention processor in the transformer, causal conv in the VAE

or only the attention: `pipe.transformer.set_attn_processor(CogVideoXAttnProcessor())`.

`CogVideoXAttnProcessor` replaces diffusers' `CogVideoXAttnProcessor2_0`: same projections and
layout, then the fused per-head q/k LayerNorm + 3D-RoPE kernel and our flash attention.

Rotary tables: diffusers hands every attention layer the pipeline's precomputed per-token
`image_rotary_emb = (cos, sin)`, each (N, D). We apply those tables as given (so whatever positions
the pipeline chose are honoured, 1.0 crop grid or 1.5 slice grid) with the table-reading form of
the fused kernel (`qk_norm_rope3d_token_tables`: the tables de-interleaved to (2, N, D/2) and read
as a one-axis grid), rather than recomputing positions: nothing in the pipeline needs wrapping.

The processor only duck-types diffusers' `Attention` (to_q/to_k/to_v/to_out, heads, norm_q/norm_k):
importing this module does not import diffusers.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _registry
from ..nn.attention import joint_attend
from ..nn.causal_conv3d import CausalConv3d
from ..ops.rope3d import qk_norm_rope3d_token_tables
from ..reference.rope3d import rotate


def _fused_norms(attn) -> bool:
    """Whether attn's q/k norms are the LayerNorms the fused kernel implements."""
    nq, nk = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    return (isinstance(nq, nn.LayerNorm) and isinstance(nk, nn.LayerNorm) and nq.eps == nk.eps
            and len(nq.normalized_shape) == 1 and nq.elementwise_affine == nk.elementwise_affine)


class CogVideoXAttnProcessor:
    """Attention processor for diffusers' CogVideoX transformers (2B, 5B, 1.5, I2V) on cogvx kernels.

    `backend` picks the kernels (None: the best available for the tensors' device, see
    `cogvx_kernels.available("joint_attention", device)`).
    """

    def __init__(self, backend: str | None = None):
        self.backend = _registry.check_common_backend(backend)  # it runs attention and the q/k norm + RoPE

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if attention_mask is not None:
            raise ValueError("CogVideoXAttnProcessor: attention_mask is not supported (CogVideoX attends over "
                             "the whole text + video sequence); pass attention_mask=None")
        if getattr(attn, "is_cross_attention", False):
            raise ValueError("CogVideoXAttnProcessor handles CogVideoX's joint self-attention, not cross-attention")
        if encoder_hidden_states is None:
            raise ValueError("CogVideoXAttnProcessor needs encoder_hidden_states (the text tokens)")
        text_len = encoder_hidden_states.shape[1]
        out = joint_attend(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1), text_len,
                           self._qk_transform(attn, image_rotary_emb), self.backend)
        return out[:, text_len:], out[:, :text_len]

    def _qk_transform(self, attn, image_rotary_emb):
        def transform(q, k, text_len):
            if image_rotary_emb is not None and _fused_norms(attn):
                cos, sin = image_rotary_emb
                nq, nk = attn.norm_q, attn.norm_k
                return qk_norm_rope3d_token_tables(q, k, nq.weight, nq.bias, nk.weight, nk.bias, eps=nq.eps,
                                                   text_len=text_len, cos=cos, sin=sin, backend=self.backend)
            # configurations outside CogVideoX's (no qk LayerNorm): the modules, then the rotation
            if attn.norm_q is not None:
                q, k = attn.norm_q(q), attn.norm_k(k)
            if image_rotary_emb is not None:
                cos, sin = image_rotary_emb
                q = torch.cat([q[:, :, :text_len], rotate(q[:, :, text_len:], cos, sin).to(q.dtype)], dim=2)
                k = torch.cat([k[:, :, :text_len], rotate(k[:, :, text_len:], cos, sin).to(k.dtype)], dim=2)
            return q, k
        return transform


class DiffusersCausalConv3d(CausalConv3d):
    """Our causal conv behind diffusers' `CogVideoXCausalConv3d` interface (`conv_cache=` keyword),
    holding the very same nn.Conv3d (its parameters are not copied)."""

    def __init__(self, conv: nn.Conv3d, backend: str | None = None):
        with torch.device("meta"):  # the placeholder parameters are replaced by `conv` at once
            super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, bias=conv.bias is not None,
                             backend=backend)
        self.conv = conv

    def forward(self, inputs: torch.Tensor, conv_cache: torch.Tensor | None = None):
        return super().forward(inputs, conv_cache)


def _swap_causal_convs(module: nn.Module, backend: str | None) -> int:
    """Replace every CogVideoXCausalConv3d inside `module` (zero-padded, stride 1: all of CogVideoX's)."""
    swapped = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "CogVideoXCausalConv3d" and child.pad_mode != "replicate" \
                and tuple(child.conv.stride) == (1, 1, 1) and tuple(child.conv.dilation) == (1, 1, 1):
            setattr(module, name, DiffusersCausalConv3d(child.conv, backend))
            swapped += 1
        else:
            swapped += _swap_causal_convs(child, backend)
    return swapped


def _is_a(module, class_name: str) -> bool:
    """Whether module is diffusers' `class_name` or a subclass (by name: diffusers is not imported here)."""
    return any(cls.__name__ == class_name for cls in type(module).__mro__)


def accelerate(pipe, *, backend: str | None = None):
    """Put cogvx kernels into a diffusers CogVideoX pipeline (CogVideoXPipeline, ...ImageToVideo,
    ...VideoToVideo) in place, without touching weights: our attention processor (fused q/k
    LayerNorm + 3D-RoPE, flash attention) in its transformer and our causal conv in its VAE.
    Only the CogVideoX parts present are swapped (diffusers lets a pipeline hold None for a part).
    Returns the pipeline."""
    transformer, vae = getattr(pipe, "transformer", None), getattr(pipe, "vae", None)
    transformer = transformer if _is_a(transformer, "CogVideoXTransformer3DModel") else None
    vae = vae if _is_a(vae, "AutoencoderKLCogVideoX") else None
    if transformer is None and vae is None:
        raise ValueError("accelerate(pipe) expects a diffusers CogVideoX pipeline with a CogVideoX transformer "
                         f"or VAE; got transformer={type(getattr(pipe, 'transformer', None)).__name__}, "
                         f"vae={type(getattr(pipe, 'vae', None)).__name__}")
    if transformer is not None:
        transformer.set_attn_processor(CogVideoXAttnProcessor(backend=backend))
    if vae is not None:
        _swap_causal_convs(vae, backend)
    return pipe

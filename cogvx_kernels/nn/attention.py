"""Drop-in joint attention: text and video tokens concatenated into one sequence, q/k/v projections,
per-head q/k LayerNorm fused with 3D-RoPE on the video tokens, flash attention, output projection.

Parameter names follow diffusers' `Attention` as CogVideoX builds it (to_q, to_k, to_v, norm_q,
norm_k, to_out.0), so its state dicts load unchanged; `joint_attend` is the computation, shared with
the diffusers attention processor (cogvx_kernels.integrations.diffusers).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..ops.joint_attention import joint_attention
from ..ops.rope3d import qk_norm_rope3d, rope3d

# (q, k, text_len) -> (q, k): the per-head normalisation and rotation applied before attention
QKTransform = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def joint_attend(attn: nn.Module, x: torch.Tensor, text_len: int, qk_transform: QKTransform,
                 backend: str | None = None) -> torch.Tensor:
    """Attention of `attn` (to_q/to_k/to_v/to_out and `heads`) over the joint sequence
    x = [text, video] (B, text_len + N, dim) -> (B, text_len + N, dim)."""
    def split_heads(t):  # (B, L, heads·D) -> (B, heads, L, D), a view: the kernels read strides
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q, k, v = split_heads(attn.to_q(x)), split_heads(attn.to_k(x)), split_heads(attn.to_v(x))
    q, k = qk_transform(q, k, text_len)
    out = joint_attention(q, k, v, backend=backend).transpose(1, 2).flatten(2)  # free: (B, L, heads, D) memory
    for layer in attn.to_out:
        out = layer(out)
    return out


class JointAttention(nn.Module):
    """CogVideoX's attention over the concatenated text + video sequence.

    forward(hidden_states (B, N, dim) video, encoder_hidden_states (B, text_len, dim), positions)
    -> (video out, text out); `joint(x, text_len, positions)` takes the concatenated [text, video]. `positions` is (pos_t, pos_h, pos_w) of the video tokens (as
    `Rope3D.positions` gives them) for 3D-RoPE, head dims split 2/8, 3/8, 3/8; None: no rotation.

    `processor`: None, or a callable (attn, x, text_len, positions) -> out that `joint` calls instead
    of the one-process computation (an execution scheme kept outside the model, e.g. the
    sequence-parallel attention of cogvx.parallel, which gives `positions` its own meaning). A plain
    attribute: not a submodule, not in the state dict.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, qk_norm: bool = True, eps: float = 1e-6,
                 bias: bool = True, out_bias: bool = True, theta: float = 10000.0, backend: str | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.theta, self.backend = heads, head_dim, theta, backend
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.norm_k = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias)])
        self.axes_dim = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
        self.processor = None

    def _qk_transform(self, positions) -> QKTransform:
        def transform(q, k, text_len):
            if positions is None:
                return (self.norm_q(q), self.norm_k(k)) if self.norm_q is not None else (q, k)
            rope = dict(text_len=text_len, pos_t=positions[0], pos_h=positions[1], pos_w=positions[2],
                        axes_dim=self.axes_dim, theta=self.theta, backend=self.backend)
            if self.norm_q is not None:
                return qk_norm_rope3d(q, k, self.norm_q.weight, self.norm_q.bias, self.norm_k.weight,
                                      self.norm_k.bias, eps=self.norm_q.eps, **rope)
            return rope3d(q, **rope), rope3d(k, **rope)
        return transform

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, positions=None):
        text_len = encoder_hidden_states.shape[1]
        out = self.joint(torch.cat([encoder_hidden_states, hidden_states], dim=1), text_len, positions)
        return out[:, text_len:], out[:, :text_len]

    def joint(self, x: torch.Tensor, text_len: int, positions=None) -> torch.Tensor:
        """The same attention on the already concatenated sequence x = [text, video] (B, L, dim)."""
        if self.processor is not None:
            return self.processor(self, x, text_len, positions)
        return joint_attend(self, x, text_len, self._qk_transform(positions), self.backend)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, qk_norm={self.norm_q is not None}"

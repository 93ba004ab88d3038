"""Reference joint attention: plain PyTorch, the ground truth of every backend.

Non-causal softmax(q·kᵀ·scale)·v over the whole (text + video) sequence, computed in fp32 (fp64 for
fp64 inputs) with the full score matrix, plus the natural-log log-sum-exp of every query row.
Its backward is torch's autograd through these formulas.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q (B, heads, Lq, D); k, v (B, heads, Lk, D). Returns (out in q's dtype, lse fp32 (B, heads, Lq))."""
    ct = _compute_dtype(q.dtype)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(ct))
    return out.to(q.dtype), lse.float()


"""Reference joint attention: plain PyTorch, the ground truth of every backend.

Non-causal softmax(q·kᵀ·scale)·v over the whole (text + video) sequence, computed in fp32 (fp64 for
fp64 inputs) with the full score matrix, plus the natural-log log-sum-exp of every query row.
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


def joint_attention_backward(grad_out, q, k, v, out, lse, grad_lse, scale: float, deterministic: bool = True):
    """(grad_q, grad_k, grad_v) by recomputing the probabilities from the saved LSE (the scheme the
    kernels use); grad_lse (B, heads, Lq) or None is the gradient reaching the LSE output."""
    dtype, ct = q.dtype, _compute_dtype(q.dtype)
    q, k, v, out, grad_out = (t.to(ct) for t in (q, k, v, out, grad_out))
    probs = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * scale - lse.to(ct).unsqueeze(-1))
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
    grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
    delta = (grad_out * out).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(ct)
    grad_scores = probs * (grad_probs - delta.unsqueeze(-1)) * scale
    grad_q = torch.matmul(grad_scores, k)
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
    return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype)

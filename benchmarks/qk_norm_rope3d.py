"""Benchmark of `cogvx_kernels.qk_norm_rope3d` (per-head LayerNorm of q and k + 3D RoPE, fused).
Baseline: the eager formula (LayerNorm, then per-token cos/sin and apply_rotary_emb's math).
Shapes as benchmarks/rope3d.py. Interface: benchmarks/_interface.py."""
from __future__ import annotations

import torch

import cogvx_kernels

from .rope3d import SHAPE_SETS, _positions, label, make_inputs, shapes, tokens  # noqa: F401  (same shapes)

OP = "qk_norm_rope3d"


def forward(backend: str, inputs: dict):
    x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
    text_len = x.shape[2] - inputs["pos"][0].numel() * inputs["pos"][1].numel() * inputs["pos"][2].numel()
    return cogvx_kernels.qk_norm_rope3d(x, x, w, b, w, b, text_len=text_len, **_positions(inputs), backend=backend)


def forward_backward(backend: str, inputs: dict):
    q, k = forward(backend, inputs)
    return torch.autograd.grad([q, k], [inputs["x"], inputs["weight"], inputs["bias"]],
                               [inputs["grad_out"], inputs["grad_out"]])


def flops(shape: dict, backward: bool) -> int:
    return 0  # memory-bound: judged by GB/s


def bytes_moved(shape: dict, dtype: torch.dtype, backward: bool) -> int:
    """q and k: each read once and written once (backward: grad_out and x read, grad_x written)."""
    elems = shape["B"] * shape["heads"] * tokens(shape) * shape["D"]
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * elems * size * (5 if backward else 2)

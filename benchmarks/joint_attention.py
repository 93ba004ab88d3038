"""Benchmark of `cogvx_kernels.joint_attention` (flash attention over text + video tokens).

Baselines: torch's scaled_dot_product_attention, each of its GPU backends separately (flash,
efficient, cuDNN; the first one is what speedups are measured against), on the CPU its default
(ATen's CPU flash attention). The eager reference (an L × L score matrix) does not run: at the
model's 17,776 tokens it would need ~120 GB. Interface: benchmarks/_interface.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cogvx_kernels

OP = "joint_attention"

# 49 frames at 480×720: 226 text + 13·30·45 video tokens; CFG batch 2. 2B: 30 heads, 5B: 48 heads.
_GPU = [dict(B=2, heads=30, L=17776, D=64, stage="2B 49x480x720"),
        dict(B=2, heads=48, L=17776, D=64, stage="5B 49x480x720")]
# CPU: a reduced sequence (226 text + 2·15·22 video tokens) at the real head dim. NOT the model's shape.
_CPU = [dict(B=1, heads=4, L=886, D=64, stage="scaled 5B"), dict(B=1, heads=2, L=2206, D=64, stage="scaled 5B long")]
_TINY = [dict(B=1, heads=2, L=80, D=64, stage="tiny (test)")]

_SDPA_GPU = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
             "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def baselines(device, dtype) -> list[str]:
    if torch.device(device).type == "cuda":
        return list(_SDPA_GPU) if dtype != torch.float32 else ["sdpa-efficient"]
    return ["sdpa"]


def shapes(device, quick: bool, tiny: bool = False) -> list[dict]:
    if tiny:
        return list(_TINY)
    chosen = _GPU if torch.device(device).type == "cuda" else _CPU
    return chosen[-1:] if quick else list(chosen)


SHAPE_SETS = {
    "cuda": "real CogVideoX shapes: B 2 (CFG), 226 + 13x30x45 = 17,776 tokens, 2B 30 heads / 5B 48 heads x 64",
    "cpu": "scaled-down CPU set, NOT the model's shape: 4 heads x 64, 886 tokens; 2 heads, 2206 tokens",
}


def label(shape: dict) -> str:
    s = shape
    return f"B{s['B']} {s['heads']}h x{s['D']} L{s['L']}"


def make_inputs(shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict:
    s = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # the head-split view (B, L, heads, D).transpose(1, 2) that the projections produce
    q, k, v = (torch.randn(s["B"], s["L"], s["heads"], s["D"], generator=gen).to(device=device, dtype=dtype)
               .transpose(1, 2).requires_grad_(backward) for _ in range(3))
    inputs = dict(q=q, k=k, v=v)
    if backward:
        inputs["grad_out"] = torch.randn(s["B"], s["heads"], s["L"], s["D"], generator=gen).to(device=device,
                                                                                                dtype=dtype)
    return inputs


def forward(backend: str, inputs: dict):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend in _SDPA_GPU:
        with sdpa_kernel(_SDPA_GPU[backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return cogvx_kernels.joint_attention(q, k, v, backend=backend)


def forward_backward(backend: str, inputs: dict):
    out = forward(backend, inputs)
    if backend in _SDPA_GPU:  # the backward runs the backend the forward chose
        with sdpa_kernel(_SDPA_GPU[backend]):
            return torch.autograd.grad(out, (inputs["q"], inputs["k"], inputs["v"]), inputs["grad_out"])
    return torch.autograd.grad(out, (inputs["q"], inputs["k"], inputs["v"]), inputs["grad_out"])


def flops(shape: dict, backward: bool) -> int:
    """Forward: two L×L×D matmuls (4·B·heads·L²·D); backward 2.5× that (five matmuls), as
    FlashAttention counts (recomputation not counted)."""
    fwd = 4 * shape["B"] * shape["heads"] * shape["L"] ** 2 * shape["D"]
    return int(fwd * 3.5) if backward else fwd


def bytes_moved(shape: dict, dtype: torch.dtype, backward: bool) -> int:
    """q, k, v read and out written (backward: also out, dO read, dq, dk, dv written)."""
    elems = shape["B"] * shape["heads"] * shape["L"] * shape["D"]
    size = torch.empty((), dtype=dtype).element_size()
    return elems * size * (4 + 6 if backward else 4)

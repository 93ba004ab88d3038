"""Benchmark of `cogvx_kernels.rope3d` (3D RoPE of q or k). The baseline `reference` backend is the
eager diffusers formula: per-token cos/sin tables and apply_rotary_emb's math in fp32. Interface:
benchmarks/_interface.py."""
from __future__ import annotations

import torch

import cogvx_kernels

OP = "rope3d"

# CogVideoX-5B at 49×480×720: 48 heads of 64, 226 text + 13·30·45 video tokens, CFG batch 2.
_GPU = [dict(B=2, heads=48, D=64, text_len=226, T=13, H=30, W=45, stage="5B 49x480x720")]
# CPU: the same layout scaled down (fewer heads, a quarter of the grid). NOT the model's shape.
_CPU = [dict(B=1, heads=8, D=64, text_len=226, T=7, H=15, W=22, stage="scaled 5B")]
_TINY = [dict(B=1, heads=2, D=64, text_len=4, T=2, H=3, W=4, stage="tiny (test)")]


def shapes(device, quick: bool, tiny: bool = False) -> list[dict]:
    if tiny:
        return list(_TINY)
    return list(_GPU if torch.device(device).type == "cuda" else _CPU)


SHAPE_SETS = {
    "cuda": "real CogVideoX-5B shape: B 2 (CFG), 48 heads x 64, 226 + 13x30x45 tokens",
    "cpu": "scaled-down CPU set, NOT the model's shape: 8 heads x 64, 226 + 7x15x22 tokens",
}


def label(shape: dict) -> str:
    s = shape
    return f"B{s['B']} {s['heads']}h x{s['D']} text{s['text_len']} {s['T']}x{s['H']}x{s['W']}"


def tokens(shape: dict) -> int:
    return shape["text_len"] + shape["T"] * shape["H"] * shape["W"]


def make_inputs(shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict:
    s = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # the head-split view (B, L, heads, D).transpose(1, 2), as attention produces it
    x = torch.randn(s["B"], tokens(s), s["heads"], s["D"], generator=gen).to(device=device, dtype=dtype)
    x = x.transpose(1, 2)
    weight = torch.ones(s["D"], device=device, dtype=dtype)
    bias = torch.zeros(s["D"], device=device, dtype=dtype)
    inputs = dict(x=x, weight=weight, bias=bias,
                  pos=tuple(torch.arange(n, dtype=torch.float32, device=device) for n in (s["T"], s["H"], s["W"])))
    if backward:
        for name in ("x", "weight", "bias"):
            inputs[name].requires_grad_(True)
        inputs["grad_out"] = torch.randn(s["B"], s["heads"], tokens(s), s["D"], generator=gen).to(device=device, dtype=dtype)
    return inputs


def _positions(inputs):
    pos_t, pos_h, pos_w = inputs["pos"]
    return dict(pos_t=pos_t, pos_h=pos_h, pos_w=pos_w)


def forward(backend: str, inputs: dict) -> torch.Tensor:
    s_text = inputs["x"].shape[2] - inputs["pos"][0].numel() * inputs["pos"][1].numel() * inputs["pos"][2].numel()
    return cogvx_kernels.rope3d(inputs["x"], text_len=s_text, **_positions(inputs), backend=backend)


def forward_backward(backend: str, inputs: dict):
    return torch.autograd.grad(forward(backend, inputs), [inputs["x"]], inputs["grad_out"])


def flops(shape: dict, backward: bool) -> int:
    return 0  # memory-bound: judged by GB/s


def bytes_moved(shape: dict, dtype: torch.dtype, backward: bool) -> int:
    """Read x once, write the output once (backward: read grad_out, write grad_x)."""
    elems = shape["B"] * shape["heads"] * tokens(shape) * shape["D"]
    size = torch.empty((), dtype=dtype).element_size()
    return elems * size * (4 if backward else 2)

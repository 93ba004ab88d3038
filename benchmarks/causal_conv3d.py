"""Benchmark of `cogvx_kernels.causal_conv3d` (the causal 3x3x3 conv of the CogVideoX VAE).
Interface: benchmarks/_interface.py."""
from __future__ import annotations

import math

import torch

import cogvx_kernels

OP = "causal_conv3d"

# ---- shapes -------------------------------------------------------------------------------------
# CogVideoX-2b/5b VAE decoder on 480x720 video: latent 60x90, then three 2x spatial upsamplings,
# 512 channels in the first two stages, 256 and 128 in the last two. The decoder runs in time
# chunks; a chunk after the first gets the kt-1 = 2 preceding frames as a halo (the conv cache),
# the first chunk repeats its first frame instead. Time chunks: 3 frames (steady state, with halo)
# and 9 frames (a long first chunk after temporal upsampling, no halo).
_GPU_STAGES = [(512, 60, 90), (512, 120, 180), (256, 240, 360), (128, 480, 720)]
_GPU_CHUNKS = [(3, True), (9, False)]
# CPU: the same structure scaled down (channels / 4 at the first two stages and halved resolution,
# so that the full set runs in a few minutes on a couple of cores). NOT the model's shapes.
_CPU_STAGES = [(128, 30, 45), (128, 60, 90), (64, 120, 180)]
_CPU_CHUNKS = [(2, True), (3, False)]
_TINY = [dict(B=1, C_in=8, C_out=8, T=2, H=8, W=12, kernel=(3, 3, 3), halo=True)]


def _shape(C, H, W, T, halo, stage):
    return dict(B=1, C_in=C, C_out=C, T=T, H=H, W=W, kernel=(3, 3, 3), halo=halo, stage=stage)


def shapes(device, quick: bool, tiny: bool = False) -> list[dict]:
    device = torch.device(device)
    if tiny:
        return [dict(s, stage="tiny (test)") for s in _TINY]
    if device.type == "cuda":
        stages, chunks = _GPU_STAGES, _GPU_CHUNKS
        names = ["latent 60x90", "up1 120x180", "up2 240x360", "up3 480x720"]
    else:
        stages, chunks = _CPU_STAGES, _CPU_CHUNKS
        names = ["scaled latent", "scaled up1", "scaled up2"]
    out = [_shape(C, H, W, T, halo, name) for (C, H, W), name in zip(stages, names) for T, halo in chunks]
    if quick:  # the first and the last stage, steady-state chunk (with halo)
        out = [out[0], out[-len(chunks)]]
    return out


SHAPE_SETS = {
    "cuda": ("real CogVideoX VAE decoder shapes, 480x720 video (512ch@60x90, 512ch@120x180, "
             "256ch@240x360, 128ch@480x720; T=3 with halo, T=9 without)"),
    "cpu": ("scaled-down CPU set, NOT the model's shapes (128ch@30x45, 128ch@60x90, 64ch@120x180; "
            "T=2 with halo, T=3 without)"),
}


def label(shape: dict) -> str:
    s = shape
    k = "x".join(map(str, s["kernel"]))
    t = f"T{s['T']}" + ("+halo" if s["halo"] else "")
    return f"C{s['C_in']}->{s['C_out']} {s['H']}x{s['W']} {t}" + (f" B{s['B']}" if s["B"] != 1 else "") \
        + (f" k{k}" if k != "3x3x3" else "")


def _out_hw(shape):
    kt, kh, kw = shape["kernel"]
    return shape["H"] + 2 * (kh // 2) - kh + 1, shape["W"] + 2 * (kw // 2) - kw + 1


# ---- inputs and calls -------------------------------------------------------------------------------

def make_inputs(shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict:
    s = shape
    kt, kh, kw = s["kernel"]
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size, scale=1.0):
        # generated on the CPU in fp32 for the same values on every device, then moved
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    x = randn(s["B"], s["C_in"], s["T"], s["H"], s["W"])
    weight = randn(s["C_out"], s["C_in"], kt, kh, kw, scale=1.0 / math.sqrt(s["C_in"] * kt * kh * kw))
    bias = randn(s["C_out"], scale=0.1)
    halo = randn(s["B"], s["C_in"], kt - 1, s["H"], s["W"]) if s["halo"] and kt > 1 else None
    inputs = dict(x=x, weight=weight, bias=bias, halo=halo)
    if backward:
        for t in inputs.values():
            if t is not None:
                t.requires_grad_(True)
        H_out, W_out = _out_hw(s)
        inputs["grad_out"] = randn(s["B"], s["C_out"], s["T"], H_out, W_out)
    return inputs


def forward(backend: str, inputs: dict) -> torch.Tensor:
    return cogvx_kernels.causal_conv3d(inputs["x"], inputs["weight"], inputs["bias"], inputs["halo"],
                                       backend=backend)


def forward_backward(backend: str, inputs: dict):
    wrt = [t for t in (inputs["x"], inputs["weight"], inputs["bias"], inputs["halo"]) if t is not None]
    out = forward(backend, inputs)
    return torch.autograd.grad(out, wrt, inputs["grad_out"])


# ---- work -------------------------------------------------------------------------------------------

def flops(shape: dict, backward: bool) -> int:
    """2 * B * C_out * T * H' * W' * C_in * kt * kh * kw for the forward (padding MACs included);
    the backward (grad input + grad weight) is twice that, so forward + backward is 3x."""
    s = shape
    kt, kh, kw = s["kernel"]
    H_out, W_out = _out_hw(s)
    fwd = 2 * s["B"] * s["C_out"] * s["T"] * H_out * W_out * s["C_in"] * kt * kh * kw
    return fwd * 3 if backward else fwd


def bytes_moved(shape: dict, dtype: torch.dtype, backward: bool) -> int:
    """Minimal traffic: each input read once and each output written once (no re-reads)."""
    s = shape
    kt, kh, kw = s["kernel"]
    H_out, W_out = _out_hw(s)
    x = s["B"] * s["C_in"] * s["T"] * s["H"] * s["W"]
    halo = s["B"] * s["C_in"] * (kt - 1) * s["H"] * s["W"] if s["halo"] else 0
    w = s["C_out"] * s["C_in"] * kt * kh * kw
    b = s["C_out"]
    out = s["B"] * s["C_out"] * s["T"] * H_out * W_out
    elems = x + halo + w + b + out                       # forward: read x, halo, w, b; write out
    if backward:
        elems += out + x + halo + w                      # backward reads grad_out, x, halo, w
        elems += x + halo + w + b                        # and writes grad_x, grad_halo, grad_w, grad_b
    return elems * torch.empty((), dtype=dtype).element_size()

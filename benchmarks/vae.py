"""Benchmark of the model layer's 3D causal VAE: encode and decode, cogvx vs diffusers'
`AutoencoderKLCogVideoX` in the same run, at the real channel config (128/256/256/512, 3 ResNets
per encoder stage, 4 per decoder stage, random weights), both with diffusers' default frame
chunking (tiling off), inference.

Models load lazily inside the first call (from a diffusers-format folder saved once under
$COGVX_BENCH_CACHE, default ~/.cache/cogvx-bench); ours loads only the part it runs
(`parts=("decoder",)` to decode, as the CLI does; diffusers maps the whole file and pages in what
it touches). On the CPU, "peak MiB" is load + first call in a fresh process, "warm MiB" a second
call: the encode's/decode's own memory (peak RSS during the call minus RSS just before it); "1st
MiB" one call after `load` in a fresh process with default malloc settings, as a user's process
makes it, and "load+1st" the peak of load and call (see benchmarks/_memory.py). Interface:
benchmarks/_interface.py.
"""
from __future__ import annotations

import torch

import cogvx

from ._checkpoints import cached_folder, diffusers_contenders, save_module

OP = "vae"
INFERENCE_ONLY = True
CONFIG = dict(block_out_channels=[128, 256, 256, 512], latent_channels=16, layers_per_block=3, norm_num_groups=32)

# GPU: 49 frames at 480×720 (13 latent frames of 60×90)
_GPU = [dict(kind="decode", B=1, F=49, H=480, W=720), dict(kind="encode", B=1, F=49, H=480, W=720),
        dict(kind="decode", B=1, F=49, H=480, W=720, tile=[240, 360])]
# CPU: 9 frames at 128×128 (3 latent frames of 16×16: one decode chunk), 17 frames (5 latent
# frames: two decode chunks), and the same decode in
# spatial tiles of 48×80 pixels with diffusers' overlaps (both contenders tiled alike). NOT the model's size.
_CPU = [dict(kind="decode", B=1, F=9, H=128, W=128),
        dict(kind="decode", B=1, F=17, H=128, W=128), dict(kind="encode", B=1, F=17, H=128, W=128),
        dict(kind="decode", B=1, F=17, H=128, W=128, tile=[48, 80])]
_TINY = [dict(kind="decode", B=1, F=5, H=16, W=16, tiny=True), dict(kind="encode", B=1, F=5, H=16, W=16, tiny=True)]


def contenders(device, dtype) -> list[str]:
    return diffusers_contenders("VAE", _diffusers_class)


def shapes(device, quick: bool, tiny: bool = False) -> list[dict]:
    if tiny:
        return list(_TINY)
    chosen = _GPU if torch.device(device).type == "cuda" else _CPU
    return chosen[:1] if quick else list(chosen)


SHAPE_SETS = {
    "cuda": "real size: 49 frames at 480x720 (13 latent frames 60x90), real channels, random weights",
    "cpu": "scaled-down CPU set, NOT the model's size: 9 and 17 frames at 128x128 (3 and 5 latent frames), "
           "real channels",
}


def label(shape: dict) -> str:
    tiles = f" tiles {shape['tile'][0]}x{shape['tile'][1]}" if shape.get("tile") else ""
    return f"{shape['kind']} {shape['F']}x{shape['H']}x{shape['W']} B{shape['B']}{tiles}"


def config(shape: dict) -> dict:
    if shape.get("tiny"):
        return dict(block_out_channels=[32, 32, 64, 64], latent_channels=4, layers_per_block=1, norm_num_groups=8)
    return dict(CONFIG)


def _diffusers_class():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX


def make_inputs(shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict:
    if backward:
        raise ValueError("the VAE benchmark is inference only (no --backward)")
    s, cfg = shape, config(shape)
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(shape=s, config=cfg, device=torch.device(device), dtype=dtype, models={})
    if s["kind"] == "decode":
        latent_frames = (s["F"] - 1) // 4 + 1
        inputs["x"] = torch.randn(s["B"], cfg["latent_channels"], latent_frames, s["H"] // 8, s["W"] // 8,
                                  generator=gen).to(device=device, dtype=dtype)
    else:
        inputs["x"] = (torch.rand(s["B"], 3, s["F"], s["H"], s["W"], generator=gen) * 2 - 1).to(device=device,
                                                                                                 dtype=dtype)
    try:
        build = _diffusers_class()
    except ImportError:
        build = cogvx.CausalVAE
    inputs["folder"] = cached_folder("vae", cfg, lambda folder: save_module(build(**cfg) if build is not cogvx.CausalVAE
                                                                            else build(cfg), folder))
    return inputs


def load(backend: str, inputs: dict):
    if backend not in inputs["models"]:
        device, dtype = inputs["device"], inputs["dtype"]
        tile = inputs["shape"].get("tile")
        if backend == "diffusers":
            model = _diffusers_class().from_pretrained(inputs["folder"], torch_dtype=dtype).to(device)
            if tile:
                model.enable_tiling(tile_sample_min_height=tile[0], tile_sample_min_width=tile[1])
        else:
            part = "decoder" if inputs["shape"]["kind"] == "decode" else "encoder"
            model = cogvx.CausalVAE.from_pretrained(inputs["folder"], dtype=dtype, device=device, parts=(part,))
            if tile:
                model.enable_tiling(*tile)
        inputs["models"][backend] = model.eval()
    return inputs["models"][backend]


def forward(backend: str, inputs: dict):
    model, kind, x = load(backend, inputs), inputs["shape"]["kind"], inputs["x"]
    with torch.no_grad():
        if backend == "diffusers":
            return model.decode(x).sample if kind == "decode" else model.encode(x).latent_dist.mean
        return model.decode(x) if kind == "decode" else model.encode(x).mean


def flops(shape: dict, backward: bool) -> int:
    """Not counted (a conv-by-conv tally of the VAE is not worth its upkeep): reported as 0."""
    return 0


def bytes_moved(shape: dict, dtype: torch.dtype, backward: bool) -> int:
    """The video read or written once (a lower bound)."""
    return shape["B"] * 3 * shape["F"] * shape["H"] * shape["W"] * torch.empty((), dtype=dtype).element_size()

"""The activations a VAE training step keeps for its backward, counted without running the step: the
bytes of every tensor autograd saves in encode -> sample -> decode (parameters left out, each
storage once), on the meta device, so the GPU entry's size (17×256²) can be counted on any machine.
cogvx's VAE (chunking="whole", as `cogvx train-vae`) against diffusers' `AutoencoderKLCogVideoX`
with the frame batching of benchmarks/vae_train.py.

On the meta device our causal conv runs its reference (plain PyTorch, which saves the padded input
where the C++ and CUDA ops save the input and the halo), so cogvx's count is an upper bound of what
those ops keep. `--dtype bf16` gives weights and input that dtype: it stands for autocast, which
also keeps GroupNorm in fp32 (so a bf16 run keeps somewhat more than counted here, in both).

    python benchmarks/vae_train_activations.py [--model real|tiny] [--frames 17] [--size 256] [--dtype fp32|bf16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: benchmarks/ is a package of the project root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cogvx  # noqa: E402
from benchmarks import vae_train  # noqa: E402

CONTENDERS = ("diffusers", "cogvx")


def saved_bytes(model: nn.Module, step: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves while `step()` runs (its output keeps them alive until
    they are counted), each storage once, `model`'s parameters left out."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}  # _cdata: a storage's identity, on meta too
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()  # noqa: F841 (holds the graph, and so every saved storage, until the sum)
        return sum(saved.values())


def count(contender: str, model: str, frames: int, size: int, dtype: torch.dtype, batch: int = 1) -> int:
    """The saved activations of one contender's encode -> sample -> decode at (batch, 3, frames, size, size)."""
    shape = dict(model=model, B=batch, F=frames, H=size, W=size)
    config = vae_train.config(shape)
    with torch.device("meta"):
        if contender == "cogvx":
            vae = cogvx.CausalVAE(config, chunking="whole")
        else:
            vae = vae_train._diffusers_class()(**config)
            vae.disable_tiling()
            vae.disable_slicing()
        vae = nn.Module.to(vae, dtype).train()  # (diffusers' own `to` warns about fp32 modules it has none of)
        video = torch.empty(batch, 3, frames, size, size, dtype=dtype)
        noise = torch.empty(batch, config["latent_channels"], 1 + (frames - 1) // 4, size // 8, size // 8)
    return saved_bytes(vae, lambda: vae_train._autoencode(contender, vae, video, noise))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("real", "tiny"), default="real")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    if (args.frames - 1) % 4 or args.frames < 1:
        parser.error(f"--frames must be 1 + 4k; got {args.frames}")
    if args.size % 8 or args.size < 8:
        parser.error(f"--size must be a positive multiple of 8; got {args.size}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1; got {args.batch}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    counts = {c: count(c, args.model, args.frames, args.size, dtype, args.batch) for c in CONTENDERS}
    print(f"saved activations, {args.model} VAE, {args.batch}×{args.frames}×{args.size}², {args.dtype}:")
    for c, n in counts.items():
        print(f"  {c:9s} {n / 2 ** 20:10.1f} MiB  ({n / counts['diffusers']:.2f}×)")


if __name__ == "__main__":
    main()

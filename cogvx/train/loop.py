"""Pieces both training loops share (cogvx/train/vae.py and transformer.py): the device and the
process group under torchrun, the output folder's resume rules, bf16 autocast, AdamW, the LR schedule,
EMA of the weights, per-sample random draws that do not depend on how a batch is split over ranks,
and averages over ranks."""
from __future__ import annotations

import contextlib
import copy
import math
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt


# -- set-up -------------------------------------------------------------------------------------------
def distributed(device_kind: str) -> tuple[int, int, bool]:
    """(rank, world, whether we initialised the process group): from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def training_device(kind: str) -> torch.device:
    """"auto" / "cpu" / "cuda" (under torchrun: this rank's GPU, LOCAL_RANK)."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def resume_point(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); a fresh run into a folder that has
    checkpoints, or --resume without one, is a CheckpointError."""
    latest = ckpt.latest_checkpoint(out_dir)
    if resume and latest is None:
        raise ckpt.CheckpointError(f"--resume: no checkpoint in {out_dir} to resume from")
    if not resume and latest is not None:
        raise ckpt.CheckpointError(f"{out_dir} already has checkpoints (latest {latest.name}): pass --resume "
                                   f"to continue that run, or choose another output folder")
    return latest


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 autocast on a GPU when asked for; nothing otherwise (the config refuses bf16 on the CPU)."""
    if device.type == "cuda" and mixed_precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# torch has fused AdamW kernels for these devices (the CPU's since torch 2.4)
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(params, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW, fused where torch has the kernel for the parameters' device: one pass over each
    parameter and its moments, without the for-each default's full-size temporaries (on this project's
    CPU 0.08 s vs 0.65 s a step for CogVideoX's VAE: docs/benchmarks.md). Same update, rounding aside."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def lr_lambda(warmup: int, total: int, schedule: str):
    """Linear warm-up over `warmup` steps, then 1 (constant) or a cosine from 1 to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return factor


# -- randomness per sample ------------------------------------------------------------------------------
def sample_generator(seed: int, step: int, micro: int, index: int) -> torch.Generator:
    """A CPU generator for one sample: seeded by (seed, step, micro-batch, the sample's index in the
    global batch, i.e. all ranks' samples in the order one process would hold them), so its draws
    depend neither on how the batch is split over ranks nor on where a run was resumed."""
    key = int(np.random.SeedSequence([seed, step, micro, index]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(key)


def sample_noise(shape, seed: int, step: int, micro: int, indices: list[int], device, dtype) -> torch.Tensor:
    """Standard normal noise (B, ...) for the samples at `indices` of the global batch, each drawn
    from its own `sample_generator`."""
    out = [torch.randn(shape[1:], generator=sample_generator(seed, step, micro, i), dtype=torch.float32)
           for i in indices]
    return torch.stack(out).to(device=device, dtype=dtype)


def mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values


# -- EMA ----------------------------------------------------------------------------------------------
class EMA:
    """An exponential moving average of a model's weights: ema ← decay·ema + (1 − decay)·weights,
    kept in a whole copy of the model (the VAE: small, and validated as a model)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)


class ParameterEMA:
    """An exponential moving average of a model's trainable parameters only, held as tensors like
    the parameters themselves (FSDP shards included): the transformer's, where a whole copy would
    double a frozen base (LoRA) or need its own sharding. `swapped(model)` runs a block with the
    averages in place of the weights (validation)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def swapped(self, model: nn.Module):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, average in self.shadow.items():
                held = params[name].detach().clone()
                params[name].copy_(average)
                average.copy_(held)  # the shadow holds the weights meanwhile
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, weights in self.shadow.items():
                    average = params[name].detach().clone()
                    params[name].copy_(weights)
                    weights.copy_(average)

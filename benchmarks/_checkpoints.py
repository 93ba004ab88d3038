"""Shared by the model benchmarks (cogvx vs diffusers): their contenders, and random-weight
checkpoints written once and reused by every process (the memory children only read them)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable


FORMAT = 2  # bump when what is written changes: old cache entries are then ignored


def diffusers_contenders(what: str, probe: Callable) -> list[str]:
    """["diffusers", "cogvx"] (the baseline first), or only cogvx when `probe` cannot import diffusers."""
    try:
        probe()
    except ImportError:
        print(f"   note: diffusers is not importable: the {what} benchmark times cogvx alone")
        return ["cogvx"]
    return ["diffusers", "cogvx"]


def cached_folder(name: str, key, write: Callable[[Path], None]) -> Path:
    """$COGVX_BENCH_CACHE (default ~/.cache/cogvx-bench)/<name>-<hash of key>, filled once by
    write(folder) with the random generator seeded to 0."""
    root = Path(os.environ.get("COGVX_BENCH_CACHE", Path.home() / ".cache" / "cogvx-bench"))
    digest = hashlib.sha1(json.dumps([FORMAT, key], sort_keys=True).encode()).hexdigest()[:12]
    folder = root / f"{name}-{digest}"
    done = folder / "complete"
    if not done.exists():
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        write(folder)
        done.write_text("ok")
    return folder


def save_module(module, folder: Path) -> None:
    """A model's save_pretrained, or a bare module's state dict as weights.safetensors."""
    from safetensors.torch import save_file

    if hasattr(module, "save_pretrained"):
        module.save_pretrained(folder)
    else:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / "weights.safetensors")

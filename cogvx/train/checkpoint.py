"""Training checkpoints: `OUT/checkpoint-{step}/` holding

- one entry per named model part: a diffusers-format folder `NAME/` for a model with
  `save_pretrained` and a `config` (the VAE and its EMA, `vae/` and `vae_ema/`, which diffusers'
  `AutoencoderKLCogVideoX` loads; the fine-tuned transformer, `transformer/`), else a
  `NAME.safetensors` file of its `state_dict()` (the discriminator; LoRA adapters as
  `pytorch_lora_weights.safetensors`, the file diffusers' `load_lora_weights` reads, with the
  part's `safetensors_metadata`);
- `training_state.pt`: step, data position, world size, the optimisers' and LR schedules' states
  and the RNG states of every rank (torch CPU and CUDA, numpy, Python `random`), gathered to rank 0;
- `train_config.json`: the training config used.

Parts and optimisers may be FSDP2-sharded: every rank takes part in gathering their full tensors
(`DTensor.full_tensor`, or `ShardedOptimizer` for an optimiser's state), rank 0 writes; loading
gives every rank the full tensors and each keeps its shard. A checkpoint is written into a
temporary folder beside it and renamed into place by rank 0 (the other ranks wait at a barrier), so
a `checkpoint-N` folder is always complete: the latest is the highest N found by scanning. The last
`keep` are kept; older ones are removed only after a newer one is in place. Loading checks
compatibility first (configs, tensor names and shapes, optimiser groups, world size) and raises
`CheckpointError` naming what differs; nothing on disk is touched by loading.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from .._atomic import atomic_folder
from ..loading import weight_files

STATE = "training_state.pt"
CONFIG = "train_config.json"
FORMAT = 1
_NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing files, or a model/optimiser that differs."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in out_dir, (step, folder) by increasing step. Folders being written
    have a temporary name (`.checkpoint-N.XXXX`), so every `checkpoint-N` here is whole; one without
    its training state (made by hand?) is not a checkpoint."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if (m := _NAME.fullmatch(p.name)) and (p / STATE).is_file()]
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


# -- RNG states ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states, as tensors and plain Python values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's: one device per rank
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gathered_rng_states() -> list[dict]:
    rank, world = _rank_world()
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())  # small: a few KiB per rank
    return states


# -- sharded tensors --------------------------------------------------------------------------------
def _is_folder(part) -> bool:
    """Whether a part is written as a diffusers-format folder (else as NAME.safetensors)."""
    return hasattr(part, "save_pretrained") and hasattr(part, "config")


def full_state_dict(part) -> dict[str, torch.Tensor]:
    """A part's state with FSDP shards gathered (every rank must call it: gathering is collective);
    rank 0 gets the tensors (gathered ones on the CPU), the other ranks an empty dict."""
    rank, _ = _rank_world()
    out = {}
    for name, tensor in part.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor().cpu()  # one tensor at a time: the device holds one more at most
        if rank == 0:
            out[name] = tensor.detach()
    return out


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into `target`, or into this rank's shard of it for an FSDP DTensor (every
    rank holds `full`: each takes its part, no communication)."""
    if isinstance(target, DTensor):
        local = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(full)


def load_full_state_dict(part, state: dict[str, torch.Tensor]) -> None:
    """Full tensors into a part: its own load_state_dict, or for an FSDP-sharded module each of its
    tensors' shard taken from the full one."""
    current = part.state_dict()
    if isinstance(part, nn.Module) and any(isinstance(t, DTensor) for t in current.values()):
        for name, tensor in current.items():
            copy_full_into(tensor, state[name])
    else:
        part.load_state_dict(state)


class ShardedOptimizer:
    """An optimiser over FSDP-sharded parameters as checkpoints see it: its state as full tensors
    keyed by parameter name, gathered to rank 0 (torch.distributed.checkpoint.state_dict), and loaded
    back into each rank's shards. Every rank calls both."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def differences(self, name: str, saved: dict) -> list[str]:
        """What keeps `saved` (a state_dict() of another run) from loading here: other parameters or
        other shapes."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        now = [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
        groups = [list(g["params"]) for g in saved["param_groups"]]
        if now != groups:
            return [f"optimizer {name!r}: parameters {sum(map(len, groups))} in the checkpoint, {sum(map(len, now))} "
                    f"now, or other names"]
        shapes = dict((n, tuple(p.shape)) for n, p in self.model.named_parameters())
        bad = [p for p, s in saved["state"].items() if "exp_avg" in s and tuple(s["exp_avg"].shape) != shapes.get(p)]
        return [f"optimizer {name!r}: state of {len(bad)} parameters has other shapes"] if bad else []


# -- saving -------------------------------------------------------------------------------------------
def _config_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, default=str))  # Paths and tuples as JSON has them


def _write(folder: Path, step, models, states, optimizers, schedulers, data_position, config, rngs):
    for name, part in models.items():
        if _is_folder(part):
            part.save_pretrained(folder / name, state_dict=states[name])
        else:
            tensors = {k: v.detach().contiguous() for k, v in states[name].items()}
            metadata = {"format": "pt", **getattr(part, "safetensors_metadata", {})}
            save_file(tensors, str(folder / f"{name}.safetensors"), metadata=metadata)
    torch.save({"format": FORMAT, "step": step, "data_position": data_position, "world_size": len(rngs),
                "optimizers": optimizers, "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
                "rng": rngs}, folder / STATE)
    (folder / CONFIG).write_text(json.dumps(_config_dict(config), indent=2, sort_keys=True))


def _remove(folder: Path) -> None:
    """Rename out of the checkpoint namespace first, so a half-removed folder never looks complete."""
    doomed = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.removing."))
    os.replace(folder, doomed / folder.name)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(out_dir: str | Path, step: int, *, models: dict, optimizers: dict, schedulers: dict,
                    data_position: int, config, keep: int = 3) -> Path:
    """Write `out_dir/checkpoint-{step}` (see the module docstring); every rank calls it (shards and
    RNG states are gathered), rank 0 writes. `models` maps names to parts (modules unwrapped from
    DDP; FSDP modules as they are); `optimizers`/`schedulers` map names to objects with
    state_dict(). Keeps the newest `keep` checkpoints. Returns the folder."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1; got {keep}")
    rank, _ = _rank_world()
    states = {name: full_state_dict(part) for name, part in models.items()}
    optimizer_states = {name: opt.state_dict() for name, opt in optimizers.items()}
    rngs = _gathered_rng_states()
    folder = Path(out_dir) / f"checkpoint-{step}"
    if rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write = lambda tmp: _write(tmp, step, models, states, optimizer_states, schedulers,  # noqa: E731
                                   data_position, config, rngs)
        if os.path.lexists(folder):  # the same step again (a resumed run's last step): replaced whole
            fresh = Path(out_dir) / f".checkpoint-{step}.new"
            shutil.rmtree(fresh, ignore_errors=True)
            atomic_folder(fresh, write)
            _remove(folder)
            os.rename(fresh, folder)
        else:
            atomic_folder(folder, write)
        for _, old in checkpoints(out_dir)[:-keep]:
            if old != folder:
                _remove(old)
    _barrier()
    return folder


# -- loading ------------------------------------------------------------------------------------------
def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k, '(absent)')!r}, now {current.get(k, '(absent)')!r}"
            for k in keys if not k.startswith("_") and saved.get(k) != current.get(k)]


def _shape_differences(what: str, saved: dict, current: dict) -> list[str]:
    out = [f"{what} {k} missing from the checkpoint" for k in sorted(current.keys() - saved.keys())]
    out += [f"{what} {k} in the checkpoint is not in the model" for k in sorted(saved.keys() - current.keys())]
    out += [f"{what} {k}: checkpoint {tuple(saved[k].shape)}, now {tuple(current[k].shape)}"
            for k in sorted(saved.keys() & current.keys()) if saved[k].shape != current[k].shape]
    return out


def _optimizer_differences(name: str, saved: dict, opt) -> list[str]:
    if hasattr(opt, "differences"):  # ShardedOptimizer: by parameter name
        return opt.differences(name, saved)
    groups, now = saved["param_groups"], opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in now]:
        return [f"optimizer {name!r}: parameter groups of {[len(g['params']) for g in groups]} tensors in the "
                f"checkpoint, {[len(g['params']) for g in now]} now"]
    shapes = {p: tuple(opt.param_groups[i]["params"][j].shape)
              for i, g in enumerate(now) for j, p in enumerate(g["params"])}
    bad = [p for p, s in saved["state"].items() if "exp_avg" in s and p in shapes
           and tuple(s["exp_avg"].shape) != shapes[p]]
    return [f"optimizer {name!r}: state of {len(bad)} parameters has other shapes"] if bad else []


def _read_part(folder: Path, name: str, part) -> tuple[dict | None, dict]:
    """(the saved config or None, the saved tensors) of one part."""
    if _is_folder(part):
        config = json.loads((folder / name / "config.json").read_text())
        tensors = {}
        for path in weight_files(folder / name):
            tensors.update(load_file(str(path)))
        return config, tensors
    return None, load_file(str(folder / f"{name}.safetensors"))


def _entry(name: str, part) -> str:
    return f"{name}/config.json" if _is_folder(part) else f"{name}.safetensors"


def load_checkpoint(folder: str | Path, *, models: dict, optimizers: dict, schedulers: dict) -> dict:
    """Restore what save_checkpoint wrote into the given objects (weights copied into the existing
    parameters, so optimisers, DDP and FSDP keep theirs; every rank calls it) and this rank's RNG
    states. Returns {"step", "data_position", "config"}. Checks everything before changing anything:
    an incompatible checkpoint raises CheckpointError listing every difference, and leaves the
    objects as they were."""
    folder = Path(folder)
    missing = [_entry(name, part) for name, part in models.items() if not (folder / _entry(name, part)).is_file()]
    missing += [STATE] if not (folder / STATE).is_file() else []
    if missing:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in (STATE, CONFIG))
        raise CheckpointError(f"checkpoint {folder} is incomplete or of another kind of run: missing "
                              f"{', '.join(missing)} (it holds {', '.join(held) or 'nothing else'})")
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        saved = {name: _read_part(folder, name, part) for name, part in models.items()}
    except Exception as exc:  # unreadable: name the file and the cause
        raise CheckpointError(f"checkpoint {folder} cannot be read: {type(exc).__name__}: {exc}") from exc
    rank, world = _rank_world()
    problems = []
    for name, part in models.items():
        config, tensors = saved[name]
        if config is not None:
            problems += [f"{name} config {d}" for d in _differences(config, part.config.to_dict())]
        shapes = _shape_differences(f"{name} tensor", tensors, part.state_dict())
        problems += shapes[:5] + ([f"… and {len(shapes) - 5} more {name} tensors"] if len(shapes) > 5 else [])
    if state.get("format") != FORMAT:
        problems.append(f"training state format {state.get('format')!r}, this version reads {FORMAT}")
    if state.get("world_size") != world:
        problems.append(f"world size: checkpoint {state.get('world_size')} ranks, now {world} (the data "
                        f"position and RNG states are per rank)")
    for kind, given in (("optimizers", optimizers), ("schedulers", schedulers)):
        if set(state.get(kind, {})) != set(given):
            problems.append(f"{kind}: checkpoint {sorted(state.get(kind, {}))}, now {sorted(given)}")
    problems += [p for name, opt in optimizers.items() if name in state.get("optimizers", {})
                 for p in _optimizer_differences(name, state["optimizers"][name], opt)]
    if problems:
        raise CheckpointError(f"cannot resume from {folder}: " + "; ".join(problems))
    for name, part in models.items():
        load_full_state_dict(part, saved[name][1])
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, sched in schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    set_rng_state(state["rng"][rank])
    config_path = folder / CONFIG
    return {"step": state["step"], "data_position": state["data_position"],
            "config": json.loads(config_path.read_text()) if config_path.is_file() else None}

"""diffusers-format folders ⇄ our modules: config.json plus safetensors weights (one file, or shards
listed by an index), read and written with `safetensors` directly (no diffusers at run time).

Loading builds nothing twice: the model is constructed on the meta device, each tensor is read from
its file straight onto the target device, converted to the target dtype on its own, and assigned to
the module (`load_state_dict(assign=True)`), so the weights exist once, plus at most one tensor in
conversion.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._atomic import atomic_write

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DIFFUSERS_VERSION = "0.42.0"  # the diffusers version whose format and numerics we follow
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class DiffusersConfig:
    """Base of our frozen dataclasses that mirror a diffusers config.json (same keys and defaults):
    `from_dict` ignores '_'-prefixed metadata and refuses unknown keys; `problems()` lists what the
    model cannot do with the values (raised at construction)."""
    MODEL = "model"

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError(f"unsupported {self.MODEL} config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        return []

    @classmethod
    def of(cls, config=None):
        """A config from None (the defaults), a config.json dict, or an instance (as is)."""
        return cls() if config is None else cls.from_dict(config) if isinstance(config, dict) else config

    @classmethod
    def from_dict(cls, config: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"config has keys a CogVideoX {cls.MODEL} does not know: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def component_folder(folder: str | Path, component: str) -> Path:
    """`folder` itself when it holds a config.json, else its `component` subfolder (a pipeline root)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist or is not a directory")
    if not (folder / "config.json").is_file() and (folder / component / "config.json").is_file():
        return folder / component
    return folder


def read_config(folder: Path, class_name: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json: expected a diffusers-format {class_name} folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
    found = config.get("_class_name")
    if found is not None and found != class_name:
        raise ValueError(f"{str(path)!r} describes a {found}, not a {class_name}")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index lists, or the single weights file."""
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(index)!r} lists shards that are missing: {missing}")
        return [folder / n for n in names]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) == 1:
        return [folder / others[0]]
    hint = " (PyTorch .bin weights are not read: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
    raise FileNotFoundError(f"{str(folder)!r} has no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, folder: Path, *, dtype: torch.dtype | None = None, device=None,
                 skip_prefixes: tuple[str, ...] = ()) -> None:
    """Fill a meta-device `model` with the folder's weights, on `device` (default CPU) in `dtype`
    (default: the checkpoint's floating dtype); tensors whose names start with `skip_prefixes` are
    not read (parts the model was built without). Missing, unexpected or misshapen tensors raise,
    listing the names."""
    device = torch.device(device if device is not None else "cpu")
    expected = model.state_dict()  # meta tensors: names and shapes only
    files = weight_files(folder)
    located: dict[str, Path] = {}
    stored: dict[torch.dtype, int] = {}  # floating elements per stored dtype: the default target dtype
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if not key.startswith(skip_prefixes):
                    located[key] = path
                view = f.get_slice(key)
                if view.get_dtype() in _SAFETENSORS_DTYPES:
                    kind = _SAFETENSORS_DTYPES[view.get_dtype()]
                    stored[kind] = stored.get(kind, 0) + max(1, math.prod(view.get_shape()))
    missing, unexpected = expected.keys() - located.keys(), located.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"the weights in {str(folder)!r} do not match the model: "
                         + "; ".join(part for part in (f"missing {_listing(missing)}" if missing else "",
                                                       f"unexpected {_listing(unexpected)}" if unexpected else "")
                                     if part))
    if dtype is None:
        dtype = max(stored, key=stored.get) if stored else torch.float32
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key not in located:
                    continue
                tensor = f.get_tensor(key)
                if tensor.shape != expected[key].shape:
                    raise ValueError(f"{key} in {path.name} has shape {tuple(tensor.shape)}; the config implies "
                                     f"{tuple(expected[key].shape)}")
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, assign=True, strict=True)
    _page_in(state.values())
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors not filled by the checkpoint: {_listing(left)}")


def _page_in(tensors) -> None:
    """Read one byte per 4 KiB (the smallest page size) of each CPU tensor: one kept in its stored
    dtype is still the file's mapped pages (shared with the page cache, reclaimable), which are then
    resident when loading returns, so the model's memory is paid at load, not by whatever call
    first touches each weight (which then looked as if it allocated the whole model)."""
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.numel():
            tensor.reshape(-1).view(torch.uint8)[::4096].max()


def save_pretrained(model: nn.Module, folder: str | Path, config: dict, class_name: str, *,
                    max_shard_size: int = 10 * 2**30) -> None:
    """config.json + safetensors (sharded with an index above `max_shard_size` bytes), each file
    written to a temporary name and renamed, so an interrupted save leaves no partial file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for stale in [folder / WEIGHTS_NAME, folder / INDEX_NAME, *folder.glob("diffusion_pytorch_model-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(folder / name, lambda p, shard=shard: save_file(shard, p, metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(folder / INDEX_NAME, lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))

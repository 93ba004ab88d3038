"""diffusers-format folders ⇄ our modules: config.json plus safetensors weights (one file, or shards
listed by an index), read and written with `safetensors` directly (no diffusers at run time).

Loading builds nothing twice: the model is constructed on the meta device, each tensor is read from
its file straight onto the target device, converted to the target dtype on its own, and assigned to
the module (`load_state_dict(assign=True)`), so the weights exist once, plus at most one tensor in
conversion. Everything a folder can get wrong (config types and ranges, index, unreadable files,
names and shapes) is found before the first tensor reaches the target device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._atomic import atomic_write

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DIFFUSERS_VERSION = "0.42.0"  # the diffusers version whose format and numerics we follow
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# -- config values: types and ranges from the dataclass annotations -----------------------------------
@dataclasses.dataclass(frozen=True)
class Bound:
    """A range a config number must lie in, attached to its field's type: Annotated[int, POSITIVE].
    `text` says it with {} for the kind of number."""
    text: str
    holds: Callable[[float], bool]


POSITIVE = Bound("a positive {}", lambda v: v > 0)
NON_NEGATIVE = Bound("a non-negative {}", lambda v: v >= 0)
UNIT = Bound("a {} in [0, 1]", lambda v: 0 <= v <= 1)
PositiveInt = Annotated[int, POSITIVE]         # channels, layers, heads, dims, sizes, patches
NonNegativeInt = Annotated[int, NON_NEGATIVE]
PositiveFloat = Annotated[float, POSITIVE]     # eps, scales
UnitFloat = Annotated[float, UNIT]             # probabilities, betas

_NOUNS = {int: "integer", float: "number", bool: "boolean", str: "string"}
_NO = object()  # "does not fit", distinct from every JSON value


def _expected(hint) -> str:
    """What a field takes, as an error says it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return args[1].text.format(_NOUNS[args[0]])
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_expected(a) for a in args)
    if origin is tuple or hint is tuple:
        return f"a list of items each {_expected(args[0])}" if args else "a list"
    if hint is type(None):
        return "null"
    return ("a finite " if hint is float else "an " if hint is int else "a ") + _NOUNS[hint]


def _conform(hint, value):
    """`value` as a field of type `hint` holds it (JSON arrays as tuples), or _NO. JSON's numbers:
    an integer serves where a number is declared; a boolean is never a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        value = _conform(args[0], value)
        return value if value is not _NO and args[1].holds(value) else _NO
    if origin in (types.UnionType, typing.Union):
        return next((v for v in (_conform(a, value) for a in args) if v is not _NO), _NO)
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            return _NO
        items = [_conform(args[0], v) for v in value] if args else list(value)
        return _NO if any(v is _NO for v in items) else tuple(items)
    if hint is type(None):
        return value if value is None else _NO
    if isinstance(value, bool) and hint is not bool:
        return _NO
    if hint is float:
        return value if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)) else _NO
    return value if isinstance(value, hint) else _NO


def _json_kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


class ConfigError(ValueError):
    """A config whose values a CogVideoX model cannot take; names the file when read from one."""

    def __init__(self, model: str, problems: list[str], source: str | Path | None = None):
        self.model, self.problems = model, problems
        where = f" in {str(source)!r}" if source is not None else ""
        super().__init__(f"invalid {model} config{where}: " + "; ".join(problems))


def conform_fields(instance, label: Callable[[str], str], expected: Callable[[object], str]) -> list[str]:
    """Check every field of a frozen dataclass against its annotation, storing the conformed values
    (JSON arrays as tuples); returns one problem per field that does not fit, worded as
    "{label(name)} must be {expected(hint)}; got {value!r}"."""
    hints = typing.get_type_hints(type(instance), include_extras=True)
    problems = []
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        conformed = _conform(hints[field.name], value)
        if conformed is _NO:
            problems.append(f"{label(field.name)} must be {expected(hints[field.name])}; got {value!r}")
        else:
            object.__setattr__(instance, field.name, conformed)
    return problems


class DiffusersConfig:
    """Base of our frozen dataclasses that mirror a diffusers config.json (same keys and defaults).
    Construction checks every value against its field's annotation (type; range via Annotated
    bounds; JSON arrays stored as tuples), then `problems()`: what the model cannot do with
    well-typed values. `from_dict` ignores '_'-prefixed metadata and refuses unknown keys."""
    MODEL = "model"

    def __post_init__(self):
        problems = conform_fields(self, lambda name: repr(name), _expected)
        problems = problems or self.problems()  # problems() may rely on the types
        if problems:
            raise ConfigError(self.MODEL, problems)

    def problems(self) -> list[str]:
        return []

    @classmethod
    def of(cls, config=None):
        """A config from None (the defaults), a config.json dict, or an instance (as is)."""
        return cls() if config is None else config if isinstance(config, cls) else cls.from_dict(config)

    @classmethod
    def from_dict(cls, config: dict, source: str | Path | None = None):
        """The config of a config.json's dict; `source` (its path) is named by every error."""
        if not isinstance(config, dict):
            raise ConfigError(cls.MODEL, [f"expected a JSON object of keys and values; got {_json_kind(config)}"],
                              source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ConfigError(cls.MODEL, [f"keys a CogVideoX {cls.MODEL} does not know: {unknown}"], source)
        try:
            return cls(**{k: v for k, v in config.items() if k in known})
        except ConfigError as exc:
            raise ConfigError(cls.MODEL, exc.problems, source) from None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# -- arguments shared by the from_pretrained of every model ------------------------------------------
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype the models run in, from itself or a name ("bf16", "float16", "torch.half"...); None
    stays None (the checkpoint's dtype). Not float64: the attention and RoPE kernels refuse it."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    accepted = ", ".join(f"torch.{str(d).split('.')[1]}" for d in dict.fromkeys(DTYPES.values()))
    raise ValueError(f"dtype must be one of {accepted}, one of the names {', '.join(DTYPES)}, or None; got {dtype!r}")


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """A torch.device from itself, a device string ("cuda:1") or a CUDA index; None is the CPU. A
    CUDA device this machine lacks is refused here rather than at the first tensor."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device must be a torch.device, a device string such as 'cuda:0', or None; "
                        f"got {device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a device torch knows: {exc}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
    return resolved


# -- folders ---------------------------------------------------------------------------------------
def component_folder(folder: str | Path, component: str) -> Path:
    """`folder` itself when it holds a config.json, else its `component` subfolder (a pipeline root)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist or is not a directory")
    if not (folder / "config.json").is_file() and (folder / component / "config.json").is_file():
        return folder / component
    return folder


def read_json(path: Path) -> dict:
    """A JSON object from a UTF-8 file; anything else raises naming the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object of keys and values; got {_json_kind(data)}")
    return data


def read_config(folder: Path, config_class: type[DiffusersConfig], class_name: str) -> DiffusersConfig:
    """The folder's config.json as `config_class`, checked to describe a diffusers `class_name`."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json: expected a diffusers-format {class_name} folder")
    config = read_json(path)
    found = config.get("_class_name")
    if found is not None and found != class_name:
        raise ValueError(f"{str(path)!r} describes a {found}, not a {class_name}")
    return config_class.from_dict(config, source=path)


def _regular_file(path: Path, what: str) -> Path:
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory, not a safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is missing")
    return path


def _shard_names(index: Path) -> list[str]:
    """The distinct shard file names of an index, each a relative path that stays in its folder."""
    weight_map = read_json(index).get("weight_map", _NO)
    if weight_map is _NO:
        raise ValueError(f"{str(index)!r} has no 'weight_map' (tensor name → shard file)")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{str(index)!r}: 'weight_map' must be an object of tensor name → shard file name; "
                         f"got {_json_kind(weight_map)}")
    names = sorted(set(weight_map.values()))
    # judged on the name, not on where the file resolves: hub caches link shards to blobs elsewhere
    escaping = [n for n in names if os.path.isabs(n) or os.path.normpath(n).split(os.sep)[0] == ".." or n in ("", ".")]
    if escaping:
        raise ValueError(f"{str(index)!r} lists shards outside its folder: {escaping}; shard names must be "
                         "relative paths inside it")
    return names


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index lists (diffusers' index, or the one
    index of another name, as transformers writes for T5), or the single weights file."""
    indexes = [folder / INDEX_NAME] if (folder / INDEX_NAME).is_file() else sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        index = indexes[0]
        return [_regular_file(folder / name, f"shard of {str(index)!r}") for name in _shard_names(index)]
    if (folder / WEIGHTS_NAME).exists():
        return [_regular_file(folder / WEIGHTS_NAME, "weights file")]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) == 1:
        return [_regular_file(folder / others[0], "weights file")]
    hint = " (PyTorch .bin weights are not read: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
    raise FileNotFoundError(f"{str(folder)!r} has no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def _survey(path: Path, skip_prefixes: tuple[str, ...], located: dict, stored: dict) -> None:
    """Record where each tensor of a file is and how many floating elements each dtype has; a file
    safetensors cannot read (truncated, garbage header) raises naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                if not key.startswith(skip_prefixes):
                    located[key] = path, tuple(view.get_shape())
                if view.get_dtype() in _SAFETENSORS_DTYPES:
                    kind = _SAFETENSORS_DTYPES[view.get_dtype()]
                    stored[kind] = stored.get(kind, 0) + max(1, math.prod(view.get_shape()))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None


def stored_elements(folder: Path, skip_prefixes: tuple[str, ...] = ()) -> int:
    """How many values the folder's weights hold (tensors named with `skip_prefixes` left out),
    from the safetensors headers alone; unreadable files raise naming them, as at load."""
    located: dict[str, tuple[Path, tuple]] = {}
    for path in weight_files(folder):
        _survey(path, skip_prefixes, located, {})
    return sum(math.prod(shape) for _, shape in located.values())


def load_weights(model: nn.Module, folder: Path, *, dtype: torch.dtype | None = None, device=None,
                 skip_prefixes: tuple[str, ...] = ()) -> None:
    """Fill a meta-device `model` with the folder's weights, on `device` (default CPU) in `dtype`
    (default: the checkpoint's floating dtype); tensors whose names start with `skip_prefixes` are
    not read (parts the model was built without). Missing, unexpected or misshapen tensors raise,
    listing the names. `dtype` and `device` as `resolve_dtype` / `resolve_device` give them."""
    device = torch.device(device if device is not None else "cpu")
    expected = model.state_dict()  # meta tensors: names and shapes only
    files = weight_files(folder)
    located: dict[str, tuple[Path, tuple]] = {}  # name: (file, shape)
    stored: dict[torch.dtype, int] = {}  # floating elements per stored dtype: the default target dtype
    for path in files:
        _survey(path, skip_prefixes, located, stored)
    missing, unexpected = expected.keys() - located.keys(), located.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"the weights in {str(folder)!r} do not match the model: "
                         + "; ".join(part for part in (f"missing {_listing(missing)}" if missing else "",
                                                       f"unexpected {_listing(unexpected)}" if unexpected else "")
                                     if part))
    misshapen = [f"{key} in {path.name} has shape {shape}; the config implies {tuple(expected[key].shape)}"
                 for key, (path, shape) in located.items() if shape != tuple(expected[key].shape)]
    if misshapen:
        raise ValueError(f"the weights in {str(folder)!r} do not match the model: " + "; ".join(misshapen[:20]))
    if dtype is None:
        dtype = max(stored, key=stored.get) if stored else torch.float32
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key not in located:
                    continue
                tensor = f.get_tensor(key)
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
                    max_shard_size: int = 10 * 2**30, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + safetensors (sharded with an index above `max_shard_size` bytes), each file
    written to a temporary name and renamed, so an interrupted save leaves no partial file.
    `state_dict` replaces the model's own (e.g. the full tensors gathered from a sharded model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous() for k, v in state_dict.items()}
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

"""Training configs: a TOML file (tomllib) read into frozen dataclasses, one per section.

Every value is checked against its field's annotation with cogvx.loading's typed-config machinery
(`loading.conform_fields`: types, `Annotated` bounds), then across fields (frames 1 + 8k: the VAE's
4× temporal compression with an odd latent count, which alone decodes back to the clip's length; sizes multiples
of its spatial factor; LPIPS needing its backbone...). An unknown section or key, a wrong type or
an impossible value raises `ConfigError` naming the file and `section.key`, before anything is
built. All problems of a file are reported at once.

Deviation from the first plan: data.frames is 1 + 8k, not 1 + 4k (see `VAETrainConfig.problems`).

Paths (`model.pretrained`, `data.source`, `loss.lpips_backbone`) are read relative to the TOML
file's folder (`~` expanded); `train.out` is the default output folder, relative to where the
trainer runs (the command line's --out replaces it). Whether those files exist is checked by
`VAETrainConfig.check_files()` (the trainer calls it before training), not at load, so a config
can be read and checked on a machine that lacks the data.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from ..loading import (NON_NEGATIVE, Bound, ConfigError, NonNegativeInt, PositiveFloat, PositiveInt,
                       _expected, component_folder, conform_fields, read_config)
from ..models.vae import DIFFUSERS_CLASS, VAEConfig

WHAT = "VAE training"
SYNTHETIC = ("synthetic:shapes",)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1, the backbone lpips uses


def one_of(*choices: str) -> Bound:
    """A string field that takes one of `choices`: Annotated[str, one_of("l2", "l1")]."""
    return Bound(" or ".join(repr(c) for c in choices), lambda v: v in choices)


NonNegativeFloat = Annotated[float, NON_NEGATIVE]  # loss weights, decay
OPEN_UNIT = Bound("a {} in (0, 1)", lambda v: 0 < v < 1)


def lpips_help(problem: str) -> str:
    """What to do when LPIPS has no backbone file: which file, where users have it, how to name it."""
    return (f"{problem}: LPIPS needs torchvision's VGG16 ImageNet weights, the file {VGG16_FILE} (torchvision saves "
            f"it in ~/.cache/torch/hub/checkpoints/ the first time torchvision.models.vgg16(weights='IMAGENET1K_V1') "
            f"runs on a machine with internet access; it cannot be downloaded here). Copy that file to this "
            f"machine and name it in the config's [loss] section: lpips_backbone = \"/path/to/{VGG16_FILE}\" "
            f"(a relative path is read from the config file's folder), or set lpips_weight = 0 to train without "
            f"LPIPS")


def _describe(hint) -> str:
    """What a field takes, for errors: cogvx.loading's wording plus paths and nested configs."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    parts = []
    for arg in args:
        if arg is type(None):
            continue  # TOML has no null: absent is the only way to say None
        parts.append("a path" if arg is Path else f"a table of {arg.MODEL} config keys" if hasattr(arg, "MODEL")
                     else _expected(arg))
    return " or ".join(parts)


def _kept(value: str, kept: tuple[str, ...]) -> bool:
    """Whether a path field's string is one of its non-path values (a name, or a prefix ending ':')."""
    return value in kept or any(k.endswith(":") and value.startswith(k) for k in kept)


class Section:
    """Base of the sections: construction checks every field against its annotation, then
    `problems()` (values the trainer cannot use, given well-typed fields). Errors say `section.key`.
    `PATHS`: fields given as path strings, with the strings that are not paths ("random", or a
    prefix such as "synthetic:")."""
    NAME = ""
    PATHS: dict[str, tuple[str, ...]] = {}
    FILE_RELATIVE = True  # paths relative to the TOML file's folder (train.out: to the working directory)

    def __post_init__(self):
        problems = conform_fields(self, lambda name: f"{self.NAME}.{name}", _describe)
        problems = problems or self.problems()
        if problems:
            raise ConfigError(WHAT, problems)

    def problems(self) -> list[str]:
        return []

    @classmethod
    def from_dict(cls, data: dict, base: Path | None) -> "Section":
        """The section from its TOML table; path strings resolved against `base` (the file's folder)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        problems = [f"unknown key {cls.NAME}.{k}; [{cls.NAME}] takes {', '.join(known)}"
                    for k in data if k not in known]
        problems += [f"{cls.NAME}.{name} is required" for name, f in known.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        values = {}
        for key, value in data.items():
            if key in cls.PATHS and isinstance(value, str) and not _kept(value, cls.PATHS[key]):
                if not value.strip():
                    problems.append(f"{cls.NAME}.{key} must not be empty")
                    continue
                value = Path(value).expanduser()
                if base is not None and cls.FILE_RELATIVE and not value.is_absolute():
                    value = base / value
            values[key] = value
        if problems:
            raise ConfigError(WHAT, problems)
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        """The section as TOML-able values (paths as strings, tuples as lists, None left out)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = (str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple)
                           else value.to_dict() if hasattr(value, "to_dict") else value)
        return out


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """Where the VAE starts: a diffusers-format VAE folder (or a pipeline root with vae/), or from
    scratch with the `vae` table's VAEConfig keys (empty: CogVideoX's own VAE)."""
    pretrained: Path | None = None
    vae: VAEConfig | None = None  # None when `pretrained` is given

    NAME = "model"
    PATHS = {"pretrained": ()}

    @classmethod
    def from_dict(cls, data: dict, base: Path | None) -> "ModelConfig":
        data = dict(data)
        if "vae" in data:
            if not isinstance(data["vae"], dict):
                raise ConfigError(WHAT, [f"model.vae must be a table of VAE config keys; got {data['vae']!r}"])
            if "pretrained" in data:
                raise ConfigError(WHAT, ["model.vae and model.pretrained exclude each other: the pretrained "
                                         "folder's config.json describes its VAE"])
            try:
                data["vae"] = VAEConfig.from_dict(data["vae"])
            except ConfigError as exc:
                raise ConfigError(WHAT, [f"model.vae: {p}" for p in exc.problems]) from None
        elif "pretrained" not in data:
            data["vae"] = VAEConfig()
        return super().from_dict(data, base)


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Clips of `frames` frames at height × width from a captioned folder or `synthetic:shapes`.
    `batch_size` is per rank (DDP); under context parallelism every rank holds the same clips."""
    source: Path | Annotated[str, one_of(*SYNTHETIC)]
    frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    batch_size: PositiveInt = 1
    num_workers: NonNegativeInt = 0
    seed: NonNegativeInt = 0
    validation_clips: NonNegativeInt = 2  # held out from training, reconstructed at validation
    length: PositiveInt = 1024  # clips of a synthetic source

    NAME = "data"
    PATHS = {"source": ("synthetic:",)}

    @property
    def synthetic(self) -> bool:
        return isinstance(self.source, str)

    def problems(self) -> list[str]:
        problems = []
        if self.synthetic and self.validation_clips >= self.length:
            problems.append(f"data.validation_clips ({self.validation_clips}) must be less than data.length "
                            f"({self.length}): some clips must be left to train on")
        return problems


@dataclass(frozen=True, kw_only=True)
class LossConfig(Section):
    """The weighted sum: reconstruction + KL + LPIPS + GAN (from `gan_start_step` on, with LDM's
    adaptive weight at the decoder's last layer, clamped to adaptive_weight_max) + R1 penalty."""
    reconstruction: Annotated[str, one_of("l2", "l1")] = "l2"
    reconstruction_weight: NonNegativeFloat = 1.0
    kl_weight: NonNegativeFloat = 1e-6
    lpips_weight: NonNegativeFloat = 0.1
    lpips_backbone: Path | Annotated[str, one_of("random")] | None = None  # "random": tests only
    gan_weight: NonNegativeFloat = 0.1
    gan_loss: Annotated[str, one_of("hinge", "non_saturating")] = "hinge"
    gan_start_step: NonNegativeInt = 10000
    adaptive_weight: bool = True
    adaptive_weight_max: PositiveFloat = 1e4
    gradient_penalty_weight: NonNegativeFloat = 0.0

    NAME = "loss"
    PATHS = {"lpips_backbone": ("random",)}

    def problems(self) -> list[str]:
        if self.lpips_weight > 0 and self.lpips_backbone is None:
            return [lpips_help(f"loss.lpips_backbone is required when loss.lpips_weight > 0 "
                               f"(it is {self.lpips_weight})")]
        return []


@dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig(Section):
    """The 3D PatchGAN: base channels and strided layers."""
    channels: PositiveInt = 64
    layers: PositiveInt = 3

    NAME = "discriminator"


@dataclass(frozen=True, kw_only=True)
class OptimConfig(Section):
    """AdamW for the VAE (lr) and the discriminator (disc_lr); linear warm-up, then constant or
    cosine (to 0 at train.steps); gradient clipping by norm (0: off); gradient accumulation."""
    lr: PositiveFloat = 1e-4
    disc_lr: PositiveFloat = 1e-4
    betas: tuple[Annotated[float, Bound("a {} in [0, 1)", lambda v: 0 <= v < 1)], ...] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.01
    warmup_steps: NonNegativeInt = 0
    schedule: Annotated[str, one_of("constant", "cosine")] = "constant"
    grad_clip: NonNegativeFloat = 1.0
    grad_accumulation: PositiveInt = 1

    NAME = "optim"

    def problems(self) -> list[str]:
        if len(self.betas) != 2:
            return [f"optim.betas must be two numbers [beta1, beta2]; got {list(self.betas)}"]
        return []


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    """The run: steps (optimiser updates), how often to checkpoint / validate / log, precision,
    memory savers, EMA, context parallelism along time (stage 2), device and output folder."""
    steps: PositiveInt
    checkpoint_every: PositiveInt = 1000
    validate_every: NonNegativeInt = 1000  # 0: only at the end
    log_every: PositiveInt = 1
    seed: NonNegativeInt = 0
    mixed_precision: Annotated[str, one_of("no", "bf16")] = "no"  # bf16 autocast on GPU only
    gradient_checkpointing: bool = False
    ema_decay: Annotated[float, OPEN_UNIT] | None = None
    context_parallel: bool = False
    device: Annotated[str, one_of("auto", "cpu", "cuda")] = "auto"
    out: Path = Path("runs/vae")

    NAME = "train"
    PATHS = {"out": ()}
    FILE_RELATIVE = False

    def problems(self) -> list[str]:
        if self.mixed_precision == "bf16" and self.device == "cpu":
            return ["train.mixed_precision = 'bf16' needs a GPU (bf16 autocast runs on CUDA only); "
                    "train.device is 'cpu'"]
        return []


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "discriminator": DiscriminatorConfig,
            "optim": OptimConfig, "train": TrainConfig}


@dataclass(frozen=True)
class VAETrainConfig:
    """A VAE training run, as a TOML file describes it; `source` is the file (None from a dict)."""
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    discriminator: DiscriminatorConfig
    optim: OptimConfig
    train: TrainConfig
    source: Path | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, data: dict, source: str | Path | None = None) -> "VAETrainConfig":
        """The config of a TOML document's dict; `source` (its file) is named by errors and is
        the folder relative paths are read from (without it: the working directory)."""
        source = Path(source) if source is not None else None
        if not isinstance(data, dict):
            raise ConfigError(WHAT, [f"expected a table of sections; got {data!r}"], source)
        problems = [f"unknown section [{name}]; a VAE training config has {', '.join(f'[{s}]' for s in SECTIONS)}"
                    for name in data if name not in SECTIONS]
        problems += [f"[{name}] must be a table of keys; got {data[name]!r}" for name in SECTIONS
                     if name in data and not isinstance(data[name], dict)]
        sections = {}
        base = source.parent if source is not None else None
        for name, section in SECTIONS.items():
            table = data.get(name, {})
            if not isinstance(table, dict):
                continue
            try:
                sections[name] = section.from_dict(table, base)
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(WHAT, problems, source)
        config = cls(**sections, source=source)
        problems = config.problems(config.model.vae)
        if problems:
            raise ConfigError(WHAT, problems, source)
        return config

    def problems(self, vae: VAEConfig | None) -> list[str]:
        """What the sections cannot do together; the VAE's factors when its config is known (the
        inline one at load; a pretrained folder's in check_files, CogVideoX's until then)."""
        vae = vae or VAEConfig()
        ratio, spatial = int(vae.temporal_compression_ratio), vae.spatial_factor
        data, problems = self.data, []
        period = 2 * ratio
        if (data.frames - 1) % period:
            below = 1 + (data.frames - 1) // period * period
            problems.append(f"data.frames must be 1 + {period}·k: the VAE keeps the first frame and compresses the "
                            f"rest {ratio}× in time, and decodes n latent frames back to 1 + {ratio}·(n - 1) frames "
                            f"only for an odd n (an even n gives {ratio}·n, not the clip's length): "
                            f"{below} or {below + period}, not {data.frames}")
        multiple = math.lcm(8, spatial)
        for key in ("height", "width"):
            size = getattr(data, key)
            if size % multiple:
                problems.append(f"data.{key} must be a multiple of {multiple} (the VAE's spatial factor "
                                f"{spatial}, and 8); got {size}")
        if self.train.context_parallel and not problems and 1 + (data.frames - 1) // ratio < 3:
            problems.append(f"train.context_parallel needs clips long enough to split over 2 ranks (3 latent "
                            f"frames: data.frames ≥ {1 + 2 * ratio}); data.frames is {data.frames}")
        return problems

    def vae_config(self) -> VAEConfig:
        """The VAE's config: the inline one, or the pretrained folder's config.json."""
        if self.model.vae is not None:
            return self.model.vae
        folder = component_folder(self.model.pretrained, "vae")
        return read_config(folder, VAEConfig, DIFFUSERS_CLASS)

    def check_files(self) -> None:
        """Before training: the pretrained folder has a VAE config the data fits, the data folder
        its captions.jsonl, and the LPIPS backbone file exists. Raises ConfigError naming the key."""
        problems = []
        vae = None
        if self.model.pretrained is not None:
            try:
                vae = self.vae_config()
            except (OSError, ValueError) as exc:
                problems.append(f"model.pretrained: {exc}")
            else:
                problems += self.problems(vae)
        if not self.data.synthetic and not (self.data.source / "captions.jsonl").is_file():
            problems.append(f"data.source: {str(self.data.source)!r} has no captions.jsonl (a folder of videos and "
                            f"images with one {{\"path\": ..., \"caption\": ...}} line per file)")
        backbone = self.loss.lpips_backbone
        if self.loss.lpips_weight > 0 and isinstance(backbone, Path) and not backbone.is_file():
            problems.append(lpips_help(f"loss.lpips_backbone: {str(backbone)!r} is not a file"))
        if problems:
            raise ConfigError(WHAT, problems, self.source)

    def check_world(self, world: int) -> None:
        """With context parallelism over `world` ranks, every rank must get its share of frames."""
        if not self.train.context_parallel or world == 1:
            return
        from ..parallel.vae import latent_counts
        ratio = int(self.vae_config().temporal_compression_ratio)
        try:
            latent_counts(1 + (self.data.frames - 1) // ratio, world)
        except ValueError as exc:
            raise ConfigError(WHAT, [f"data.frames = {self.data.frames} with train.context_parallel over "
                                     f"{world} ranks: {exc}"], self.source) from None

    def to_dict(self) -> dict:
        """The config as a TOML-able dict of sections (what a checkpoint records)."""
        return {name: getattr(self, name).to_dict() for name in SECTIONS}


def load_vae_config(path: str | Path) -> VAETrainConfig:
    """A VAE training config from a TOML file; errors name the file and `section.key`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"config file {str(path)!r} is a directory") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(WHAT, [f"not UTF-8 text: {exc}"], path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(WHAT, [f"not valid TOML: {exc}"], path) from None
    return VAETrainConfig.from_dict(data, source=path)

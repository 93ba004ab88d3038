"""Training configs: a TOML file (tomllib) read into frozen dataclasses, one per section:
`VAETrainConfig` (`load_vae_config`), `TransformerTrainConfig` (`load_transformer_config`: [model]
[lora] [data] [loss] [optim] [train] [validation]) and `CacheConfig` (`load_cache_config`: the
model.pipeline and [data] of a transformer config, what `cogvx cache-latents` reads). Sections both
trainers share start from one base ([data]: `ClipsConfig`, [optim]: `OptimBase`, [train]: `RunBase`).

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
`check_files()` (the trainers call it before training), not at load, so a config can be read and
checked on a machine that lacks the data and the models.
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

from ..loading import (NON_NEGATIVE, UNIT, Bound, ConfigError, NonNegativeInt, PositiveFloat, PositiveInt,
                       _expected, component_folder, conform_fields, read_config)
from ..models.transformer import DIFFUSERS_CLASS as TRANSFORMER_CLASS
from ..models.transformer import LAYOUTS, TransformerConfig
from ..models.vae import DIFFUSERS_CLASS, VAEConfig

WHAT = "VAE training"
TRANSFORMER_WHAT = "transformer training"
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
    WHAT = "VAE training"  # which trainer's config, for errors
    PATHS: dict[str, tuple[str, ...]] = {}
    FILE_RELATIVE = True  # paths relative to the TOML file's folder (train.out: to the working directory)

    def __post_init__(self):
        problems = conform_fields(self, lambda name: f"{self.NAME}.{name}", _describe)
        problems = problems or self.problems()
        if problems:
            raise ConfigError(self.WHAT, problems)

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
            raise ConfigError(cls.WHAT, problems)
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
class ClipsConfig(Section):
    """Clips from a captioned folder or `synthetic:shapes`: of one shape (`frames` frames at
    height × width) or of several, `buckets` = [[frames, height, width], ...] (every batch one
    bucket; 1-frame buckets hold images, taken in `image_ratio` of the batches, by default in
    proportion to the clips), optionally read from a latent `cache` folder (`cogvx cache-latents`).
    `batch_size` is per rank (DDP); under context parallelism every rank holds the same clips.
    Both trainers' [data] start from it."""
    source: Path | Annotated[str, one_of(*SYNTHETIC)]
    frames: PositiveInt | None = None
    height: PositiveInt | None = None
    width: PositiveInt | None = None
    buckets: tuple[tuple[PositiveInt, ...], ...] | None = None
    image_ratio: Annotated[float, UNIT] | None = None
    cache: Path | None = None
    batch_size: PositiveInt = 1
    num_workers: NonNegativeInt = 0
    seed: NonNegativeInt = 0
    length: PositiveInt = 1024  # clips of a synthetic source

    NAME = "data"
    PATHS = {"source": ("synthetic:",), "cache": ()}

    @property
    def synthetic(self) -> bool:
        return isinstance(self.source, str)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """The buckets (frames, height, width): `buckets`, or the one shape."""
        if self.buckets is not None:
            return [tuple(b) for b in self.buckets]
        return [(self.frames, self.height, self.width)]

    def problems(self) -> list[str]:
        problems = []
        shape = {k: getattr(self, k) for k in ("frames", "height", "width")}
        if self.buckets is None:
            missing = [k for k, v in shape.items() if v is None]
            if missing:
                problems.append(f"data.{', data.'.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                                f"(the clips' shape), or data.buckets = [[frames, height, width], ...]")
            if self.image_ratio is not None:
                problems.append("data.image_ratio needs data.buckets (with 1-frame buckets for the images)")
            return problems
        given = [k for k, v in shape.items() if v is not None]
        if given:
            problems.append(f"data.buckets and data.{', data.'.join(given)} exclude each other: each bucket is "
                            f"[frames, height, width]")
        if not self.buckets:
            problems.append("data.buckets must list at least one [frames, height, width]")
        bad = [list(b) for b in self.buckets if len(b) != 3]
        if bad:
            problems.append(f"data.buckets: each bucket is [frames, height, width]; got {bad}")
            return problems
        if len(set(self.buckets)) < len(self.buckets):
            problems.append(f"data.buckets must be distinct; got {[list(b) for b in self.buckets]}")
        images = [b for b in self.buckets if b[0] == 1]
        if self.image_ratio is not None and self.image_ratio > 0 and not images:
            problems.append(f"data.image_ratio = {self.image_ratio} needs a 1-frame bucket in data.buckets "
                            f"(e.g. [1, height, width]): images are 1-frame clips")
        if self.image_ratio is not None and self.image_ratio < 1 and len(images) == len(self.buckets):
            problems.append(f"data.image_ratio = {self.image_ratio} < 1 needs a video bucket (more than 1 frame) "
                            f"in data.buckets")
        if self.image_ratio == 0 and images:
            problems.append(f"data.image_ratio = 0 leaves the 1-frame buckets {[list(b) for b in images]} unused: "
                            f"remove them or raise the ratio")
        return problems


@dataclass(frozen=True, kw_only=True)
class DataConfig(ClipsConfig):
    """The VAE's clips, some held out for validation."""
    validation_clips: NonNegativeInt = 2  # held out from training, reconstructed at validation

    def problems(self) -> list[str]:
        problems = []
        if self.synthetic and self.validation_clips >= self.length:
            problems.append(f"data.validation_clips ({self.validation_clips}) must be less than data.length "
                            f"({self.length}): some clips must be left to train on")
        return problems + super().problems()


@dataclass(frozen=True, kw_only=True)
class LossConfig(Section):
    """The weighted sum: reconstruction + KL + LPIPS + GAN (from `gan_start_step` on, with LDM's
    adaptive weight at the decoder's last layer, clamped to adaptive_weight_max) + R1 penalty."""
    reconstruction: Annotated[str, one_of("l2", "l1")] = "l2"
    reconstruction_weight: NonNegativeFloat = 1.0
    kl_weight: NonNegativeFloat = 1e-6
    lpips_weight: NonNegativeFloat = 0.1
    lpips_backbone: Path | Annotated[str, one_of("random")] | None = None  # "random": tests only
    # LPIPS on frames of at most this many pixels at a time (0: all); default: one 256² frame's VGG activations
    lpips_chunk_pixels: NonNegativeInt = 65536
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
class OptimBase(Section):
    """AdamW (lr); linear warm-up, then constant or cosine (to 0 at train.steps); gradient clipping
    by norm (0: off); gradient accumulation. Both trainers' [optim] start from it."""
    lr: PositiveFloat = 1e-4
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
class OptimConfig(OptimBase):
    """The VAE's AdamW (lr) and the discriminator's (disc_lr)."""
    disc_lr: PositiveFloat = 1e-4


@dataclass(frozen=True, kw_only=True)
class RunBase(Section):
    """The run: steps (optimiser updates), how often to checkpoint / validate / log, precision,
    memory savers, EMA, device and output folder. Both trainers' [train] start from it."""
    steps: PositiveInt
    checkpoint_every: PositiveInt = 1000
    validate_every: NonNegativeInt = 1000  # 0: only at the end
    log_every: PositiveInt = 1
    seed: NonNegativeInt = 0
    mixed_precision: Annotated[str, one_of("no", "bf16")] = "no"  # bf16 autocast on GPU only
    gradient_checkpointing: bool = False
    ema_decay: Annotated[float, OPEN_UNIT] | None = None
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


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunBase):
    """The VAE's run, with context parallelism along time (stage 2)."""
    context_parallel: bool = False


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
        config = cls(**read_sections(data, SECTIONS, WHAT, source), source=source)
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
        other = [k for k in ("buckets", "image_ratio", "cache") if getattr(data, k) is not None]
        if other:  # the transformer trainer's keys
            return [f"data.{k}: the VAE trainer takes clips of one shape (data.frames, data.height, data.width), "
                    f"read from data.source" for k in other]
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


def read_sections(data: dict, sections: dict[str, type[Section]], what: str, source: Path | None) -> dict:
    """Each section of a TOML document's dict, built and checked; every problem of every section
    raised at once as one ConfigError naming `source`."""
    if not isinstance(data, dict):
        raise ConfigError(what, [f"expected a table of sections; got {data!r}"], source)
    problems = [f"unknown section [{name}]; a {what} config has {', '.join(f'[{s}]' for s in sections)}"
                for name in data if name not in sections]
    problems += [f"[{name}] must be a table of keys; got {data[name]!r}" for name in sections
                 if name in data and not isinstance(data[name], dict)]
    built = {}
    base = source.parent if source is not None else None
    for name, section in sections.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            continue
        try:
            built[name] = section.from_dict(table, base)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(what, problems, source)
    return built


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file's dict; a missing file, a folder, bad text or bad TOML raise naming the file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"config file {str(path)!r} is a directory") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(what, [f"not UTF-8 text: {exc}"], path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(what, [f"not valid TOML: {exc}"], path) from None


def load_vae_config(path: str | Path) -> VAETrainConfig:
    """A VAE training config from a TOML file; errors name the file and `section.key`."""
    return VAETrainConfig.from_dict(read_toml(path, WHAT), source=Path(path))


# -- the transformer's training config ----------------------------------------------------------------
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' CogVideoX trainer
PIPELINE_PARTS = ("vae", "scheduler", "text_encoder", "tokenizer")


@dataclass(frozen=True, kw_only=True)
class TransformerModelConfig(Section):
    """Where the transformer starts and what trains. `pretrained`: a diffusers-format transformer
    folder or a pipeline root (its transformer/); or a new transformer: `layout` ("2b", "5b", "1.5":
    the public checkpoints' shapes, 2B's without it) changed by the `transformer` table's
    TransformerConfig keys. `pipeline`: the folder holding vae/, text_encoder/, tokenizer/ and
    scheduler/ (default: `pretrained`, a pipeline root then). `finetune`: "full" or "lora" ([lora])."""
    pretrained: Path | None = None
    layout: Annotated[str, one_of(*LAYOUTS)] | None = None
    transformer: TransformerConfig | None = None  # the layout with the table's changes; None when pretrained
    pipeline: Path | None = None
    finetune: Annotated[str, one_of("full", "lora")] = "full"

    NAME = "model"
    WHAT = TRANSFORMER_WHAT
    PATHS = {"pretrained": (), "pipeline": ()}

    @classmethod
    def from_dict(cls, data: dict, base: Path | None) -> "TransformerModelConfig":
        data, problems = dict(data), []
        new = [k for k in ("layout", "transformer") if k in data]
        if "pretrained" in data and new:
            problems.append(f"model.{' and model.'.join(new)} and model.pretrained exclude each other: the "
                            "pretrained folder's config.json describes its transformer")
        elif "pretrained" not in data and not new:
            problems.append("model.pretrained (a diffusers-format transformer or pipeline folder) or model.layout "
                            "(a new transformer: 2b, 5b or 1.5) is required")
        if "pipeline" not in data and "pretrained" not in data:
            problems.append("model.pipeline is required (a folder with vae/, text_encoder/, tokenizer/ and "
                            "scheduler/, e.g. a CogVideoX pipeline folder) unless model.pretrained is one")
        if "transformer" in data and not isinstance(data["transformer"], dict):
            problems.append(f"model.transformer must be a table of transformer config keys; got {data['transformer']!r}")
        if problems:
            raise ConfigError(cls.WHAT, problems)
        if not new:
            return super().from_dict(data, base)
        layout = data.get("layout", "2b")
        if layout not in LAYOUTS:  # reported by the field's check
            data.pop("transformer", None)
            return super().from_dict(data, base)
        try:
            data["transformer"] = TransformerConfig.from_dict({**LAYOUTS[layout], **data.get("transformer", {})})
        except ConfigError as exc:
            raise ConfigError(cls.WHAT, [f"model.transformer: {p}" for p in exc.problems]) from None
        return super().from_dict(data, base)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("layout", None)  # the transformer table holds the layout's values
        return out


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(Section):
    """LoRA adapters (through peft) on the `target_modules` Linear layers of every block: rank,
    alpha (the update is scaled by alpha / rank) and dropout on the adapters' input."""
    rank: PositiveInt = 128
    alpha: PositiveFloat = 128.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    dropout: Annotated[float, Bound("a {} in [0, 1)", lambda v: 0 <= v < 1)] = 0.0

    NAME = "lora"
    WHAT = TRANSFORMER_WHAT

    def problems(self) -> list[str]:
        if not self.target_modules or not all(m.strip() for m in self.target_modules):
            return [f"lora.target_modules must name Linear layers of a block (e.g. {list(LORA_TARGETS)}); "
                    f"got {list(self.target_modules)}"]
        return []


@dataclass(frozen=True, kw_only=True)
class TransformerDataConfig(ClipsConfig):
    """The transformer's clips: `source` encoded through the VAE and T5 at every step, or, with
    `cache`, the latents and text embeddings `cogvx cache-latents --config` (this file) wrote there
    from `source` (the source need not be on the training machine then). `cogvx cache-latents`
    reads this section too."""
    WHAT = TRANSFORMER_WHAT


@dataclass(frozen=True, kw_only=True)
class DiffusionLossConfig(Section):
    """v-prediction MSE at timesteps drawn uniformly from [timestep_min, timestep_max] (default: the
    scheduler's whole range); each sample's text replaced by the empty prompt's with probability
    text_dropout (so classifier-free guidance has an unconditional model to use)."""
    text_dropout: Annotated[float, Bound("a {} in [0, 1)", lambda v: 0 <= v < 1)] = 0.1
    timestep_min: NonNegativeInt = 0
    timestep_max: NonNegativeInt | None = None

    NAME = "loss"
    WHAT = TRANSFORMER_WHAT

    def problems(self) -> list[str]:
        if self.timestep_max is not None and self.timestep_max < self.timestep_min:
            return [f"loss.timestep_max ({self.timestep_max}) must be at least loss.timestep_min ({self.timestep_min})"]
        return []


@dataclass(frozen=True, kw_only=True)
class TransformerOptimConfig(OptimBase):
    """The transformer's (or its LoRA adapters') AdamW."""
    WHAT = TRANSFORMER_WHAT


@dataclass(frozen=True, kw_only=True)
class TransformerRunConfig(RunBase):
    """The run; under torchrun `parallel` says how ranks share the model: "ddp" (a copy on every
    rank, gradients averaged) or "fsdp" (FSDP2's fully_shard per transformer block)."""
    parallel: Annotated[str, one_of("ddp", "fsdp")] = "ddp"
    out: Path = Path("runs/transformer")

    WHAT = TRANSFORMER_WHAT


@dataclass(frozen=True, kw_only=True)
class ValidationConfig(Section):
    """Videos of `prompts` generated with the current weights (our Pipeline, `steps` denoising steps,
    seeded) every train.validate_every steps, written beside the checkpoints. Sizes default to
    data's, else the transformer's sample size."""
    prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    frames: PositiveInt | None = None
    height: PositiveInt | None = None
    width: PositiveInt | None = None
    steps: PositiveInt = 20
    guidance_scale: NonNegativeFloat = 6.0
    seed: NonNegativeInt = 0
    fps: PositiveInt = 8

    NAME = "validation"
    WHAT = TRANSFORMER_WHAT

    def problems(self) -> list[str]:
        if not all(p.strip() for p in self.prompts):
            return [f"validation.prompts must be non-empty strings; got {list(self.prompts)}"]
        return []


TRANSFORMER_SECTIONS = {"model": TransformerModelConfig, "lora": LoRAConfig, "data": TransformerDataConfig,
                        "loss": DiffusionLossConfig, "optim": TransformerOptimConfig, "train": TransformerRunConfig,
                        "validation": ValidationConfig}


@dataclass(frozen=True)
class TransformerTrainConfig:
    """A transformer training run, as a TOML file describes it; `source` is the file (None from a dict)."""
    model: TransformerModelConfig
    lora: LoRAConfig
    data: TransformerDataConfig
    loss: DiffusionLossConfig
    optim: TransformerOptimConfig
    train: TransformerRunConfig
    validation: ValidationConfig
    source: Path | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, data: dict, source: str | Path | None = None) -> "TransformerTrainConfig":
        """As VAETrainConfig.from_dict: every section checked, then what they cannot do together."""
        source = Path(source) if source is not None else None
        sections = read_sections(data, TRANSFORMER_SECTIONS, TRANSFORMER_WHAT, source)
        config = cls(**sections, source=source)
        problems = []
        if data.get("lora") and config.model.finetune != "lora":
            problems.append("[lora] is set but model.finetune is 'full': set model.finetune = \"lora\" or remove [lora]")
        problems += config.problems(None, config.model.transformer)
        if problems:
            raise ConfigError(TRANSFORMER_WHAT, problems, source)
        return config

    # -- the folders' configs -----------------------------------------------------------------------
    @property
    def pipeline(self) -> Path:
        """The folder with vae/, text_encoder/, tokenizer/ and scheduler/."""
        return self.model.pipeline if self.model.pipeline is not None else self.model.pretrained

    def transformer_config(self) -> TransformerConfig:
        """The inline config (layout and changes), or the pretrained folder's config.json."""
        if self.model.transformer is not None:
            return self.model.transformer
        return read_config(component_folder(self.model.pretrained, "transformer"), TransformerConfig, TRANSFORMER_CLASS)

    def vae_config(self) -> VAEConfig:
        return read_config(self.pipeline / "vae", VAEConfig, DIFFUSERS_CLASS)

    def needs_text_encoder(self) -> bool:
        """T5 is loaded for clips encoded at every step and for validation prompts (once)."""
        return self.data.cache is None or bool(self.validation.prompts)

    def validation_size(self, transformer: TransformerConfig, vae: VAEConfig) -> tuple[int, int, int]:
        """(frames, height, width) of the validation videos: the section's, else the first video
        bucket's (or the first bucket's), else the transformer's sample size."""
        v, shapes = self.validation, self.data.shapes
        base = next((s for s in shapes if s[0] > 1), shapes[0]) if None not in shapes[0] else (
            transformer.sample_frames, transformer.sample_height * vae.spatial_factor,
            transformer.sample_width * vae.spatial_factor)
        return v.frames or base[0], v.height or base[1], v.width or base[2]

    def problems(self, vae: VAEConfig | None, transformer: TransformerConfig | None) -> list[str]:
        """What the sections cannot do with the models: frame counts the VAE encodes (1 + r·k), sizes
        the VAE and the patches divide, grids 1.5's RoPE covers, the VAE's latents being the
        transformer's input (when the VAE's config is known). Unknown configs (folders not read yet)
        are CogVideoX's."""
        known_vae = vae is not None
        vae, transformer = vae or VAEConfig(), transformer or TransformerConfig()
        ratio, spatial, patch = int(vae.temporal_compression_ratio), vae.spatial_factor, transformer.patch_size
        problems = []
        if None in self.data.shapes[0]:  # the [data] section reports a missing size
            return problems
        sizes = [("data.buckets " if self.data.buckets is not None else "data ", shape) for shape in self.data.shapes]
        for where, (frames, height, width) in [*sizes, ("validation ", self.validation_size(transformer, vae))]:
            at = f"{where}[{frames}, {height}, {width}]"
            if (frames - 1) % ratio:
                below = 1 + (frames - 1) // ratio * ratio
                problems.append(f"{at}: {frames} frames must be 1 + {ratio}·k (the VAE keeps the first frame and "
                                f"compresses the rest {ratio}× in time): {below} or {below + ratio}")
            multiple = spatial * patch
            for key, size in (("height", height), ("width", width)):
                if size % multiple:
                    problems.append(f"{at}: {key} {size} must be a multiple of {multiple} (the VAE's spatial "
                                    f"factor {spatial} × the transformer's patch size {patch})")
            grid = (height // spatial, width // spatial)
            if transformer.patch_size_t and (grid[0] > transformer.sample_height or grid[1] > transformer.sample_width):
                problems.append(f"{at}: a {grid[0]} × {grid[1]} latent grid, larger than this transformer's 3D-RoPE "
                                f"covers ({transformer.sample_height} × {transformer.sample_width}: sample_height × "
                                f"sample_width)")
        if not known_vae:
            return problems
        if transformer.in_channels == 2 * vae.latent_channels:
            problems.append("model: an image-to-video transformer (in_channels = 2 × the VAE's latent channels); "
                            "this trainer trains text-to-video transformers")
        elif transformer.in_channels != vae.latent_channels:
            problems.append(f"model: the transformer takes {transformer.in_channels} latent channels, the VAE "
                            f"gives {vae.latent_channels}")
        return problems

    def check_files(self) -> None:
        """Before training: the folders hold what they must (the pretrained transformer's config,
        the pipeline's VAE, scheduler and, when needed, T5 and its tokenizer), the scheduler is a
        v-prediction one whose range holds loss.timestep_max, the data (folder or cache) exists,
        and the sizes fit the models read. Raises ConfigError naming the key."""
        from ..schedulers import load_scheduler

        problems, transformer, vae = [], None, None
        if self.model.pretrained is not None:
            try:
                transformer = self.transformer_config()
            except (OSError, ValueError) as exc:
                problems.append(f"model.pretrained: {exc}")
        else:
            transformer = self.model.transformer
        key = "model.pipeline" if self.model.pipeline is not None else "model.pretrained"
        parts = PIPELINE_PARTS if self.needs_text_encoder() else PIPELINE_PARTS[:2]
        missing = [p for p in parts if not (self.pipeline / p).is_dir()]
        if missing:
            problems.append(f"{key}: {str(self.pipeline)!r} has no {', '.join(p + '/' for p in missing)} (a CogVideoX "
                            f"pipeline folder holds vae/, scheduler/, text_encoder/ and tokenizer/)")
        else:
            try:
                vae = self.vae_config()
            except (OSError, ValueError) as exc:
                problems.append(f"{key}: {exc}")
            try:
                scheduler = load_scheduler(self.pipeline / "scheduler")
            except (OSError, ValueError) as exc:
                problems.append(f"{key}: {exc}")
            else:
                problems += self._schedule_problems(scheduler.config, key)
            if self.needs_text_encoder() and transformer is not None:
                problems += self._text_problems(transformer, key)
        if self.data.cache is not None:  # what it holds is checked when it opens (LatentCache)
            if not (self.data.cache / "manifest.json").is_file():
                problems.append(f"data.cache: {str(self.data.cache)!r} is not a finished latent cache (no manifest.json):"
                                f" write it with `cogvx cache-latents --config {self.source or 'THIS.toml'}`")
        elif not self.data.synthetic and not (self.data.source / "captions.jsonl").is_file():
            problems.append(f"data.source: {str(self.data.source)!r} has no captions.jsonl (a folder of videos and "
                            f"images with one {{\"path\": ..., \"caption\": ...}} line per file)")
        if transformer is not None and vae is not None:
            problems += self.problems(vae, transformer)
        if problems:
            raise ConfigError(TRANSFORMER_WHAT, problems, self.source)

    def _schedule_problems(self, scheduler, key: str) -> list[str]:
        problems = []
        if scheduler.prediction_type != "v_prediction":
            problems.append(f"{key}: the scheduler predicts {scheduler.prediction_type!r}; this trainer trains "
                            "v-prediction (CogVideoX's): its scheduler_config.json must say \"v_prediction\"")
        last = scheduler.num_train_timesteps - 1
        for name in ("timestep_min", "timestep_max"):
            value = getattr(self.loss, name)
            if value is not None and value > last:
                problems.append(f"loss.{name} ({value}) must be at most {last} (the scheduler's "
                                f"num_train_timesteps - 1)")
        return problems

    def _text_problems(self, transformer: TransformerConfig, key: str) -> list[str]:
        from ..loading import read_json
        path = self.pipeline / "text_encoder" / "config.json"
        try:
            width = read_json(path).get("d_model")
        except (OSError, ValueError) as exc:
            return [f"{key}: {exc}"]
        if width != transformer.text_embed_dim:
            return [f"{key}: its T5 gives {width}-wide embeddings, the transformer takes {transformer.text_embed_dim} "
                    "(text_embed_dim)"]
        return []

    def to_dict(self) -> dict:
        """The config as a TOML-able dict of sections (what a checkpoint records; [lora] only for LoRA)."""
        return {name: getattr(self, name).to_dict() for name in TRANSFORMER_SECTIONS
                if name != "lora" or self.model.finetune == "lora"}


def load_transformer_config(path: str | Path) -> TransformerTrainConfig:
    """A transformer training config from a TOML file; errors name the file and `section.key`."""
    return TransformerTrainConfig.from_dict(read_toml(path, TRANSFORMER_WHAT), source=Path(path))


# -- latent caches: the [model] pipeline and the [data] of a transformer training config ------------
CACHE_WHAT = "transformer training"


@dataclass(frozen=True, kw_only=True)
class PipelineConfig(Section):
    """The CogVideoX pipeline folder (vae/, text_encoder/, tokenizer/, transformer/) the transformer
    trains in; its VAE and T5 encode the clips."""
    pipeline: Path

    NAME = "model"
    PATHS = {"pipeline": ()}


@dataclass(frozen=True)
class CacheConfig:
    """What `cogvx cache-latents` reads of a transformer training config: `model.pipeline` and the
    [data] section. The other sections, and the other keys of [model], belong to the trainer, whose
    loader checks them: they are ignored here."""
    model: PipelineConfig
    data: TransformerDataConfig
    source: Path | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, data: dict, source: str | Path | None = None) -> "CacheConfig":
        source = Path(source) if source is not None else None
        base = source.parent if source is not None else None
        if not isinstance(data, dict):
            raise ConfigError(CACHE_WHAT, [f"expected a table of sections; got {data!r}"], source)
        problems, sections = [], {}
        for name, section, keys in (("model", PipelineConfig, ("pipeline",)), ("data", TransformerDataConfig, None)):
            table = data.get(name, {})
            if not isinstance(table, dict):
                problems.append(f"[{name}] must be a table of keys; got {table!r}")
                continue
            if keys is not None:
                table = {k: v for k, v in table.items() if k in keys}
            try:
                sections[name] = section.from_dict(table, base)
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(CACHE_WHAT, problems, source)
        config = cls(**sections, source=source)
        problems = config.problems(VAEConfig(), 2)
        if problems:
            raise ConfigError(CACHE_WHAT, problems, source)
        return config

    def problems(self, vae: VAEConfig, patch: int) -> list[str]:
        """Buckets the VAE can encode and the transformer take: frames 1 + r·k (r the VAE's temporal
        compression), sizes multiples of the VAE's spatial factor × the transformer's patch size
        (CogVideoX's 4, 8 and 2 until the pipeline's configs are read, in check_files)."""
        ratio, multiple = int(vae.temporal_compression_ratio), vae.spatial_factor * patch
        problems = []
        where = "data.buckets " if self.data.buckets is not None else "data "
        for frames, height, width in self.data.shapes:
            at = f"{where}[{frames}, {height}, {width}]"
            if (frames - 1) % ratio:
                problems.append(f"{at}: {frames} frames must be 1 + {ratio}·k (the VAE keeps the first frame and "
                                f"compresses the rest {ratio}× in time)")
            for key, size in (("height", height), ("width", width)):
                if size % multiple:
                    problems.append(f"{at}: {key} {size} must be a multiple of {multiple} (the VAE's spatial "
                                    f"factor {vae.spatial_factor} × the transformer's patch size {patch})")
        return problems

    def check_files(self) -> None:
        """Before encoding: the pipeline folder has the parts, its configs take the buckets, and the
        data folder has its captions.jsonl. Raises ConfigError naming the key."""
        from ..models import transformer as transformer_module

        root, problems = self.model.pipeline, []
        missing = [part for part in ("vae", "text_encoder", "tokenizer") if not (root / part).is_dir()]
        if not root.is_dir() or missing:
            problems.append(f"model.pipeline: {str(root)!r} is not a CogVideoX pipeline folder (it needs vae/, "
                            f"text_encoder/, tokenizer/{'' if not root.is_dir() else '; no ' + ', '.join(missing)})")
        else:
            try:
                vae = read_config(root / "vae", VAEConfig, DIFFUSERS_CLASS)
                patch = 2
                if (root / "transformer" / "config.json").is_file():
                    patch = read_config(root / "transformer", transformer_module.TransformerConfig,
                                        transformer_module.DIFFUSERS_CLASS).patch_size
            except (OSError, ValueError) as exc:
                problems.append(f"model.pipeline: {exc}")
            else:
                problems += self.problems(vae, patch)
        if not self.data.synthetic and not (self.data.source / "captions.jsonl").is_file():
            problems.append(f"data.source: {str(self.data.source)!r} has no captions.jsonl (a folder of videos and "
                            f"images with one {{\"path\": ..., \"caption\": ...}} line per file)")
        if problems:
            raise ConfigError(CACHE_WHAT, problems, self.source)


def load_cache_config(path: str | Path) -> CacheConfig:
    """`model.pipeline` and [data] of a transformer training config (TOML); errors name the file
    and `section.key`."""
    path = Path(path)
    return CacheConfig.from_dict(read_toml(path, CACHE_WHAT), source=path)

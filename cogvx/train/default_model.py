"""The embedded default model, retrained from scratch: `cogvx train-default-model [--out DIR]
[--work DIR] [--seed N]` (`--out cogvx/assets/tiny-cogvideox` replaces the shipped one).

1. the VAE: configs/default-model-vae.toml on `synthetic:shapes` (`train_vae`), into WORK/vae;
2. the pipeline folder around it, WORK/base: the project's word-level tokenizer and frozen random T5
   (`cogvx.tiny`, drawn from the seed), the scheduler config, and stage 1's VAE with its
   scaling_factor set so that the training latents have unit standard deviation (as LDM does);
3. the latents: every clip of the transformer config's data through that VAE and T5, once
   (`cache_latents`), into WORK/cache;
4. the transformer: configs/default-model-transformer.toml on the cache (`train_transformer`), into
   WORK/transformer;
5. OUT: WORK/base with the transformer's EMA weights and `cogvx.json` (the vocabulary, example
   prompts and the generation settings `cogvx generate` takes by default: the validation section's),
   written beside OUT and renamed into place.

The tokenizer knows only the captions' words (`CAPTION_WORDS`): any other word is <unk>, and the
command line names it.

Every stage continues where an interrupted run stopped (checkpoints, whole cache shards) and a
finished one is skipped, so the same command finishes the job. Deterministic from the seed for a
given machine and thread count (CPU float sums depend on how threads split them).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import tiny
from . import checkpoint as ckpt
from .config import TransformerTrainConfig, VAETrainConfig, read_toml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VAE_CONFIG = CONFIGS / "default-model-vae.toml"
TRANSFORMER_CONFIG = CONFIGS / "default-model-transformer.toml"


MODEL_CARD = "cogvx.json"  # read by `cogvx generate` (cogvx.cli.MODEL_CARD); diffusers ignores it


def model_card(config: TransformerTrainConfig, words: tuple[str, ...]) -> dict:
    """What the trained model knows and how it is best sampled: the vocabulary, example prompts (the
    validation prompts and an image's caption) and the validation settings."""
    v = config.validation
    examples = [*v.prompts, " ".join(v.prompts[0].split()[:3])] if v.prompts else []
    return {"about": "the embedded default model of cogvx: a tiny CogVideoX trained on synthetic:shapes "
                     "(`cogvx train-default-model`)",
            "vocabulary": list(words), "examples": examples,
            "generate": {"steps": v.steps, "guidance": v.guidance_scale, "fps": v.fps}}


def _set_unit_scaling_factor(folder: Path, dataset, clips: int = 64) -> float:
    """scaling_factor = 1 / the standard deviation of posterior samples of the dataset's first clips
    (at its first bucket), from the posterior's mean and std (Var z = Var mean + E std²: no noise
    drawn), written into the VAE's config.json."""
    import torch

    from ..models import CausalVAE

    vae = CausalVAE.from_pretrained(folder).eval()
    means, variances = [], []
    with torch.no_grad():
        for start in range(0, min(clips, len(dataset)), 8):
            keys = range(start, min(start + 8, clips, len(dataset)))
            video = torch.stack([dataset[(i, 0) if len(dataset.buckets) > 1 else i]["video"] for i in keys])
            posterior = vae.encode(video)
            means.append(posterior.mean.double().flatten())
            variances.append(posterior.var.double().flatten())
    mean, var = torch.cat(means), torch.cat(variances)
    factor = float(f"{1 / (mean.var() + var.mean()).sqrt().item():.4g}")
    config = json.loads((folder / "config.json").read_text())
    config["scaling_factor"] = factor
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return factor


def _configs(vae_config: Path, transformer_config: Path, work: Path, seed: int):
    """Both stages' configs with their folders in `work` and the seed in every place that draws."""
    vae = read_toml(vae_config, "VAE training")
    vae["data"]["seed"] = vae["train"]["seed"] = seed
    vae["train"]["out"] = str(work / "vae")
    transformer = read_toml(transformer_config, "transformer training")
    transformer["model"]["pipeline"] = str(work / "base")
    transformer["data"]["cache"] = str(work / "cache")
    transformer["data"]["seed"] = transformer["train"]["seed"] = seed
    transformer["train"]["out"] = str(work / "transformer")
    return (VAETrainConfig.from_dict(vae, source=vae_config),
            TransformerTrainConfig.from_dict(transformer, source=transformer_config))


def _move_into_place(staging: Path, target: Path) -> None:
    """staging renamed to target; an existing target is moved aside first and removed after."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _last_part(out_dir: Path, *names: str) -> Path:
    """The first of `names` in the newest checkpoint of a finished stage."""
    latest = ckpt.latest_checkpoint(out_dir)
    for name in names:
        if latest is not None and (latest / name).is_dir():
            return latest / name
    raise ckpt.CheckpointError(f"{out_dir}: no checkpoint with {' or '.join(names)}/ after training")


def check_out(out: Path) -> None:
    """OUT is replaced at the end: it must be new, empty, or a pipeline folder (model_index.json),
    never another folder that would be moved aside and removed."""
    if out.resolve() == Path(out.resolve().anchor) or not out.resolve().name:
        raise ValueError(f"--out {out}: give a folder for the pipeline, not a file system root")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the pipeline")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ValueError(f"--out {out} is a folder that is not a pipeline folder (no model_index.json): it would be "
                         "replaced; give a new or empty folder, or a pipeline folder to replace")


def train_default_model(out: str | Path, *, work: str | Path = "runs/default-model", seed: int = 0,
                        vae_config: str | Path = VAE_CONFIG, transformer_config: str | Path = TRANSFORMER_CONFIG,
                        progress: bool = True) -> Path:
    from .cache import cache_latents
    from .data import CAPTION_WORDS, make_dataset
    from .transformer import train_transformer
    from .vae import train_vae

    out, work = Path(out), Path(work).resolve()  # the configs resolve relative paths against their own folder
    check_out(out)
    vae_config, transformer_config = Path(vae_config), Path(transformer_config)
    c_vae, c_transformer = _configs(vae_config, transformer_config, work, seed)
    work.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] VAE ({c_vae.train.steps} steps) -> {work / 'vae'}", flush=True)
    train_vae(c_vae, resume=ckpt.latest_checkpoint(work / "vae") is not None)

    print(f"[2/4] pipeline folder -> {work / 'base'}", flush=True)
    staging = work / ".base.partial"
    shutil.rmtree(staging, ignore_errors=True)
    transformer_layout = c_transformer.transformer_config().to_dict()
    tiny.build(staging, seed=seed, transformer=transformer_layout, vae=c_vae.vae_config().to_dict(),
               words=CAPTION_WORDS)
    shutil.rmtree(staging / "vae")
    shutil.copytree(_last_part(work / "vae", "vae"), staging / "vae")
    data = c_transformer.data
    dataset = make_dataset(data.source, buckets=data.shapes, seed=data.seed, length=data.length)
    _set_unit_scaling_factor(staging / "vae", dataset)
    _move_into_place(staging, work / "base")

    print(f"[3/4] latents and text embeddings -> {work / 'cache'}", flush=True)
    cache_latents(dataset, work / "base", work / "cache", progress=progress)

    print(f"[4/4] transformer ({c_transformer.train.steps} steps) -> {work / 'transformer'}", flush=True)
    train_transformer(c_transformer, resume=ckpt.latest_checkpoint(work / "transformer") is not None)

    staging = out.with_name(f".{out.name}.partial")  # beside out: the rename stays on one file system
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(work / "base", staging)
    shutil.rmtree(staging / "transformer")
    shutil.copytree(_last_part(work / "transformer", "transformer_ema", "transformer"), staging / "transformer")
    (staging / MODEL_CARD).write_text(json.dumps(model_card(c_transformer, CAPTION_WORDS), indent=2) + "\n")
    _move_into_place(staging, out)
    print(f"the default model is in {out}")
    return out

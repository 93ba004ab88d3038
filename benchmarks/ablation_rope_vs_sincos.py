"""The paper's position-encoding ablation, small: two tiny transformers identical but for the position
encoding — 3D-RoPE (as CogVideoX-5B) and 3D sinusoidal absolute positions (as 2B) — trained by
`cogvx train` on the same `synthetic:shapes` latents, with the same steps and seeds.

    python benchmarks/ablation_rope_vs_sincos.py [--steps 400] [--seeds 0 1 2] [--pipeline FOLDER]
        [--size H W]

Each (encoding, seed) run trains configs/transformer-tiny.toml's transformer on one latent cache of
the pipeline's VAE and T5 (default: the embedded model), seed s drawing the initial weights, the
data order, noise and timesteps for both encodings alike. Reported:
- the training loss curves (moving average over `--window` steps), mean ± standard deviation over
  the seeds, to OUT.csv and OUT.png;
- the held-out v-prediction loss of each run's final weights on clips of another data seed, at fixed
  timesteps and noise (the same for every run), mean ± standard deviation per encoding, their
  difference, and whether it exceeds the seed spread (|difference| > 2 × the larger deviation), to
  OUT.json and on stdout.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cogvx.models import Transformer3D  # noqa: E402
from cogvx.schedulers import load_scheduler  # noqa: E402
from cogvx.train.cache import LatentCache, cache_latents  # noqa: E402
from cogvx.train.config import TransformerTrainConfig, read_toml  # noqa: E402
from cogvx.train.data import make_dataset  # noqa: E402
from cogvx.train.log import read_log  # noqa: E402
from cogvx.train.losses import v_prediction_loss  # noqa: E402
from cogvx.train.transformer import train_transformer  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "transformer-tiny.toml"
ENCODINGS = {"3D-RoPE": True, "3D sin-cos": False}  # use_rotary_positional_embeddings
HELD_OUT_SEED = 10_000  # the held-out clips' data seed: none of them is a training clip


def run_config(pipeline: Path, cache: Path, out: Path, rope: bool, seed: int, steps: int,
               clips: int, size: tuple[int, int] | None = None) -> TransformerTrainConfig:
    data = read_toml(BASE_CONFIG, "transformer training")
    data["data"]["length"] = clips
    if size is not None:  # the config's buckets (clips and images) at another frame size
        data["data"]["buckets"] = [[frames, *size] for frames, _, _ in data["data"]["buckets"]]
    data["model"]["pipeline"] = str(pipeline)
    data["model"]["transformer"]["use_rotary_positional_embeddings"] = rope
    data["data"]["cache"] = str(cache)
    data["data"]["seed"] = data["train"]["seed"] = seed
    data["train"].update(steps=steps, checkpoint_every=steps, validate_every=0, out=str(out))
    data["optim"]["warmup_steps"] = min(data["optim"]["warmup_steps"], steps // 4)
    data["validation"]["prompts"] = []
    return TransformerTrainConfig.from_dict(data, source=BASE_CONFIG)


def build_cache(config: TransformerTrainConfig, folder: Path, seed: int, length: int) -> LatentCache:
    data = config.data
    dataset = make_dataset(data.source, buckets=data.shapes, seed=seed, length=length)
    cache_latents(dataset, config.pipeline, folder, progress=False)
    return LatentCache(folder)


@torch.no_grad()
def held_out_loss(checkpoint: Path, held_out: LatentCache, scaling_factor: float, alphas_cumprod) -> float:
    """Mean v-prediction loss over the held-out clips (posterior means), each at 8 timesteps spread
    over the schedule with noise drawn from a fixed seed."""
    model = Transformer3D.from_pretrained(checkpoint / "transformer", dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    steps = len(alphas_cumprod)
    for i in range(len(held_out)):
        item = held_out[i]
        latents = (item["latent_mean"].float() * scaling_factor)[None].transpose(1, 2)  # (1, F', C, h, w)
        text = item["text"].float()[None]
        for t in torch.linspace(0, steps - 1, 8).round().long():
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = t.view(1)
            a = alphas_cumprod[timesteps].float().view(1, 1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            prediction = model(noisy, text, timesteps)
            total += v_prediction_loss(prediction, latents, noise, timesteps, alphas_cumprod).item()
            count += 1
    return total / count


def smoothed(values: list[float], window: int) -> list[float]:
    out, running = [], 0.0
    for i, v in enumerate(values):
        running += v - (values[i - window] if i >= window else 0.0)
        out.append(running / min(i + 1, window))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pipeline", type=Path, default=ROOT / "cogvx" / "assets" / "tiny-cogvideox",
                   help="the VAE, T5 and scheduler whose latents the transformers learn")
    p.add_argument("--clips", type=int, default=1024, help="training clips (each at every bucket of the config)")
    p.add_argument("--held-out", type=int, default=32, help="held-out clips")
    p.add_argument("--window", type=int, default=50, help="moving-average window of the curves")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="frame size of the clips and images (default: the config's buckets, 32x32)")
    p.add_argument("--work", type=Path, default=Path("runs/ablation-rope-vs-sincos"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ablation_rope_vs_sincos",
                   help="OUT.csv, OUT.png and OUT.json are written")
    args = p.parse_args(argv)
    if len(args.seeds) < 3 or args.steps < 2:
        p.error("at least 3 seeds and 2 steps")
    args.work, args.pipeline = args.work.resolve(), args.pipeline.resolve()  # the config reads paths from its folder

    size = tuple(args.size) if args.size else None
    first = run_config(args.pipeline, args.work / "cache", args.work / "unused", True, args.seeds[0], args.steps,
                       args.clips, size)
    build_cache(first, args.work / "cache", first.data.seed, args.clips)
    held_out = build_cache(first, args.work / "held-out", HELD_OUT_SEED, args.held_out)
    schedule = load_scheduler(first.pipeline / "scheduler")
    scaling_factor = first.vae_config().scaling_factor

    curves, finals = {}, {}
    for name, rope in ENCODINGS.items():
        curves[name], finals[name] = [], []
        for seed in args.seeds:
            out = args.work / f"{'rope' if rope else 'sincos'}-seed{seed}"
            config = run_config(args.pipeline, args.work / "cache", out, rope, seed, args.steps, args.clips, size)
            result = train_transformer(config, resume=(out / f"checkpoint-{args.steps}").is_dir())
            _, rows = read_log(out / "log.csv")
            curves[name].append(smoothed([float(r["loss"]) for r in rows], args.window))
            finals[name].append(held_out_loss(Path(result["checkpoint"]), held_out, scaling_factor,
                                              schedule.alphas_cumprod))
            print(f"{name:11s} seed {seed}: held-out loss {finals[name][-1]:.4f}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    names = list(ENCODINGS)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [f"{n} {s}" for n in names for s in ("mean", "std")])
        for step in range(args.steps):
            row = [step + 1]
            for n in names:
                at = [c[step] for c in curves[n]]
                row += [f"{statistics.mean(at):.6f}", f"{statistics.stdev(at):.6f}"]
            w.writerow(row)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, args.steps + 1)
    for n in names:
        mean = [statistics.mean(c[i] for c in curves[n]) for i in range(args.steps)]
        std = [statistics.stdev([c[i] for c in curves[n]]) for i in range(args.steps)]
        ax.plot(steps, mean, label=f"{n} (held-out {statistics.mean(finals[n]):.4f} ± {statistics.stdev(finals[n]):.4f})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training v-loss (moving average of {args.window})")
    ax.set_title(f"tiny CogVideoX on synthetic shapes, {len(args.seeds)} seeds each (mean ± std)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)

    stats = {n: dict(mean=statistics.mean(finals[n]), std=statistics.stdev(finals[n]), runs=finals[n]) for n in names}
    difference = stats["3D-RoPE"]["mean"] - stats["3D sin-cos"]["mean"]
    spread = max(stats[n]["std"] for n in names)
    summary = dict(steps=args.steps, seeds=args.seeds, pipeline=str(args.pipeline), buckets=first.data.shapes,
                   held_out_clips=len(held_out),
                   held_out_loss=stats, rope_minus_sincos=difference, seed_spread=spread,
                   exceeds_spread=abs(difference) > 2 * spread)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    better = "3D-RoPE" if difference < 0 else "3D sin-cos"
    print(f"held-out loss: 3D-RoPE {stats['3D-RoPE']['mean']:.4f} ± {stats['3D-RoPE']['std']:.4f}, "
          f"3D sin-cos {stats['3D sin-cos']['mean']:.4f} ± {stats['3D sin-cos']['std']:.4f}; "
          f"difference {difference:+.4f} ({better} lower), seed spread {spread:.4f}: the difference "
          + ("exceeds" if summary["exceeds_spread"] else "does not exceed") + " twice the spread")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Multi-rank inference benchmark (`python benchmarks/run.py --distributed`): one denoising step of
the transformer (batch 2: guidance on) on 1 rank and on W ranks per parallel plan, each under
torchrun (gloo on CPU, NCCL on CUDA), with the bytes each rank sends measured
(cogvx.parallel.cost.sent_bytes) beside the formula of docs/parallelism.md (cost.traffic).

- CPU: W = 2 — cfg=2, ulysses=2, ring=2 — on a small random transformer (8 heads of 64, 2 layers, 672
  video + 226 text tokens). One rank runs os.cpu_count() threads (and, as a second baseline, the
  threads one of W ranks gets), W ranks cpu_count // W each: the same cores either way. On a small
  shared machine (2 cores) this checks that the schemes run and send what the formula says; the
  timings say little about GPUs (one process's threads and W processes share the cores differently,
  and other load on the machine hits them differently).
- CUDA with several GPUs: the CogVideoX-5B shape (42 layers, 48 heads, 49×480×720: 17,550 video
  tokens; random bf16 weights), W = the GPU count (2, 4 or 8), the plans of cost.PLANS_8 that fit.

Run by run.py; `torchrun ... benchmarks/distributed.py --worker SPEC` is one measurement.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MARK = "COGVX_BENCH_RESULT "

CPU_MODEL = dict(num_attention_heads=8, attention_head_dim=64, num_layers=2, latent=(7, 16, 24))
TINY_MODEL = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, latent=(3, 8, 12))
GPU_MODEL = dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, latent=(13, 60, 90))
TEXT = 226


def gpu_plans(world: int) -> list[str]:
    if world == 2:
        return ["cfg=2", "ulysses=2", "ring=2"]
    if world == 4:
        return ["cfg=2,ulysses=2", "cfg=2,ring=2", "ulysses=4", "ulysses=2,ring=2"]
    from cogvx.parallel.cost import PLANS_8

    return PLANS_8["5b"] if world == 8 else []


def _worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from cogvx.models import Transformer3D
    from cogvx.parallel import ParallelPlan, ParallelTransformer, runtime
    from cogvx.parallel.cost import sent_bytes

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec.get("threads") or max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        runtime.init_process_group(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif device.type == "cuda":
        torch.cuda.set_device(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = spec["model"]
    frames, height, width = m["latent"]
    config = dict(num_attention_heads=m["num_attention_heads"], attention_head_dim=m["attention_head_dim"],
                  num_layers=m["num_layers"], in_channels=16, out_channels=16, text_embed_dim=4096, time_embed_dim=512,
                  sample_frames=1 + 4 * (frames - 1), sample_height=height, sample_width=width,
                  use_rotary_positional_embeddings=True)
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(device):
        model = Transformer3D(config).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(latents=torch.randn(2, frames, 16, height, width, generator=g).to(device, dtype),
                  text_embeddings=torch.randn(2, TEXT, 4096, generator=g).to(device, dtype),
                  timestep=torch.tensor([500, 500], device=device))
    runner = model
    if world > 1:
        plan = ParallelPlan.parse(spec["plan"])
        runner = ParallelTransformer(model, plan, plan.mesh(device.type))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()

    times, sent = [], {}
    with torch.no_grad():
        runner(**inputs)  # warm-up
        with sent_bytes() as counts:
            runner(**inputs)
        sent = dict(counts)
        for _ in range(spec["reps"]):
            sync()
            start = time.perf_counter()
            runner(**inputs)
            sync()  # the step ends when the slowest rank ends
            times.append(time.perf_counter() - start)
    per_rank = [sent]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, sent)
    if world == 1 or dist.get_rank() == 0:
        print(MARK + json.dumps(dict(plan=spec["plan"], world=world, median_ms=1e3 * statistics.median(times),
                                     times_ms=[1e3 * t for t in times], sent=per_rank,
                                     threads=torch.get_num_threads() if device.type == "cpu" else None)), flush=True)
    if world > 1:
        dist.destroy_process_group()


def _launch(spec: dict, world: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.abspath(__file__), "--worker", json.dumps(spec)]
    threads = spec.get("threads") or max(1, (os.cpu_count() or 1) // world)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{spec['plan']} on {world} ranks failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    line = next(line for line in r.stdout.splitlines() if line.startswith(MARK))
    return json.loads(line[len(MARK):])


def run(device: str = "cpu", *, tiny: bool = False, reps: int = 5) -> dict:
    """The measurements: one row per (plan, world), the bytes per rank measured and by formula."""
    import torch

    from cogvx.parallel.cost import ModelShape, traffic

    if device == "cuda":
        world = torch.cuda.device_count()
        if world < 2:
            raise RuntimeError(f"--distributed on cuda needs several GPUs; this machine has {world}")
        world = 8 if world >= 8 else 4 if world >= 4 else 2
        model, plans = GPU_MODEL, gpu_plans(world)
    else:
        world, model, plans = 2, TINY_MODEL if tiny else CPU_MODEL, ["cfg=2", "ulysses=2", "ring=2"]
    frames, height, width = model["latent"]
    shape = ModelShape("benchmark", model["num_layers"], model["num_attention_heads"], model["attention_head_dim"],
                       frames * (height // 2) * (width // 2), TEXT, patch_values=4 * 16)
    itemsize = 2 if device == "cuda" else 4
    base = _launch(dict(device=device, model=model, plan="cfg=1", reps=reps), 1)
    rows = [dict(plan="1 rank", world=1, median_ms=base["median_ms"], speedup=1.0, sent=None, formula=None,
                 threads=base["threads"])]
    if device == "cpu" and (os.cpu_count() or 1) // world != base["threads"]:
        # the same process with a rank's share of the cores: what each rank of the plans below has
        alone = _launch(dict(device=device, model=model, plan="cfg=1", reps=reps,
                             threads=max(1, (os.cpu_count() or 1) // world)), 1)
        rows.append(dict(plan="1 rank, a rank's threads", world=1, median_ms=alone["median_ms"],
                         speedup=base["median_ms"] / alone["median_ms"], sent=None, formula=None,
                         threads=alone["threads"]))
    for plan in plans:
        got = _launch(dict(device=device, model=model, plan=plan, reps=reps), world)
        formula = [traffic(plan, shape, guided=True, itemsize=itemsize, rank=r) for r in range(world)]
        rows.append(dict(plan=plan, world=world, median_ms=got["median_ms"], speedup=base["median_ms"] / got["median_ms"],
                         sent=[sum(s.values()) for s in got["sent"]], formula=[f["total"] for f in formula],
                         sent_by_kind=got["sent"], threads=got["threads"]))
    fastest = min(row["median_ms"] for row in rows if row["world"] == 1)  # the speed-up against the better baseline
    for row in rows:
        row["speedup"] = fastest / row["median_ms"]
    return dict(device=device, shape=shape.__dict__, world=world, reps=reps, rows=rows)


def table(result: dict) -> str:
    lines = [f"one denoising step (transformer, batch 2), {result['device']}, {result['reps']} timed reps, "
             f"{result['shape']['video_tokens']} video + {result['shape']['text_tokens']} text tokens, "
             f"{result['shape']['layers']} layers × {result['shape']['heads']} heads",
             f"{'plan':<26}{'ranks':>6}{'threads':>8}{'median ms':>11}{'speed-up':>10}  bytes sent per rank: measured "
             f"/ formula  (speed-up: over the faster one-rank row)"]
    for row in result["rows"]:
        sent = "–" if row["sent"] is None else ", ".join(
            f"{s / 1e6:.2f} / {f / 1e6:.2f} MB" for s, f in zip(row["sent"], row["formula"]))
        lines.append(f"{row['plan']:<26}{row['world']:>6}{str(row['threads'] or '–'):>8}{row['median_ms']:>11.1f}"
                     f"{row['speedup']:>10.2f}  {sent}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        sys.exit("run through benchmarks/run.py --distributed")

"""What a newcomer's first command costs (`python benchmarks/run.py --cli`): `cogvx generate` with
the embedded default model and its own settings (no --model, --steps, --frames...), each run a fresh
process as the command line is, on ONE CPU thread (OMP_NUM_THREADS=1), wall time from start to exit
(imports, loading, text encoding, denoising, decoding, writing the mp4); and `cogvx generate --help`.
The first run of each is reported apart from the repeats (which find the files in the page cache).
Target: one generation within about 10 s, --help within a few seconds.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATE_TARGET_S = 10.0
HELP_TARGET_S = 3.0


def _timed(args: list[str], cwd: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cogvx", *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=600)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"cogvx {' '.join(args)} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return wall, r


def _stages(stdout: str) -> dict:
    """The 'load 0.3s, encode 0.1s, ...' part of the command's `wrote` line."""
    line = next(line for line in stdout.splitlines() if line.startswith("wrote "))
    return {name: float(value) for name, value in re.findall(r"(\w+) ([\d.]+)s", line.split(");", 1)[1])}


def _summary(walls: list[float]) -> dict:
    repeats = walls[1:]
    return {"first_s": round(walls[0], 2), "repeat_median_s": round(statistics.median(repeats), 2) if repeats else None,
            "repeats_s": [round(w, 2) for w in repeats]}


def run(reps: int = 3) -> dict:
    from cogvx.cli import DEFAULT_MODEL, model_card

    prompt = (model_card(DEFAULT_MODEL).get("examples") or ["a red square moving left"])[0]
    with tempfile.TemporaryDirectory() as tmp:
        helps = [_timed(["generate", "--help"], tmp)[0] for _ in range(reps)]
        walls, stages = [], []
        for i in range(reps):
            wall, r = _timed(["generate", "--prompt", prompt, "--seed", "0", "--out", f"run{i}.mp4"], tmp)
            walls.append(wall)
            stages.append(_stages(r.stdout))
            settings = r.stdout.split("(", 1)[1].split(")", 1)[0]
    return {"prompt": prompt, "settings": settings, "threads": 1,
            "generate": {**_summary(walls), "target_s": GENERATE_TARGET_S, "stages_first_s": stages[0]},
            "help": {**_summary(helps), "target_s": HELP_TARGET_S}}


def table(result: dict) -> str:
    g, h = result["generate"], result["help"]
    ok = lambda s, target: "within" if s <= target else "OVER"
    return "\n".join([
        f'cogvx generate --prompt "{result["prompt"]}" (embedded model: {result["settings"]}), 1 thread:',
        f"  first run {g['first_s']} s ({ok(g['first_s'], g['target_s'])} the {g['target_s']:g} s target), "
        f"repeats {g['repeats_s']} s; first run's stages {json.dumps(g['stages_first_s'])}",
        f"cogvx generate --help: first {h['first_s']} s ({ok(h['first_s'], h['target_s'])} {h['target_s']:g} s), "
        f"repeats {h['repeats_s']} s"])

"""What a training run reports: `log.csv` (one row per logged step: every loss term on its own, the
learning rates, grad norm, seconds per step, peak memory, skipped files), a tqdm bar on rank 0, and
`plot_log` (`cogvx plot-log LOG.csv --out curves.png`) drawing the curves.

On resume the log is reopened for appending; rows beyond the resumed step (logged after the
checkpoint the run restarts from) are dropped first, so every step appears once.
"""
from __future__ import annotations

import csv
import math
import resource
import sys
from pathlib import Path

import torch

from .._atomic import atomic_write


def peak_memory(device: torch.device) -> int:
    """Peak bytes so far: CUDA's max_memory_allocated, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class CSVLog:
    """Rows of `columns` appended to `path` (flushed per row, so a killed run keeps what it logged)."""

    def __init__(self, path: str | Path, columns: list[str], *, resume_step: int | None = None):
        self.path, self.columns = Path(path), list(columns)
        kept: list[dict] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is not None and list(reader.fieldnames) != self.columns:
                    raise ValueError(f"{self.path} has columns {reader.fieldnames}; this run logs {self.columns} "
                                     "(another loss configuration?)")
                kept = [row for row in reader if int(row["step"]) <= resume_step]

        def write(tmp):  # the kept rows rewritten atomically: a crash here keeps the old log
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(kept)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, write)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, self.columns)

    def write(self, row: dict) -> None:
        unknown = row.keys() - set(self.columns)
        if unknown:
            raise KeyError(f"log columns {sorted(unknown)} were not declared")
        self._writer.writerow({k: _cell(row.get(k)) for k in self.columns})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return repr(value)  # full precision: resumed runs are compared row for row
    return value


def read_log(path: str | Path) -> tuple[list[str], list[dict]]:
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read log {path}: {exc}") from None
    if "step" not in columns:
        raise ValueError(f"{path} is not a training log: no 'step' column (columns: {columns})")
    return columns, rows


def progress(total: int, initial: int, enabled: bool):
    """tqdm over the steps (rank 0 only); `set_postfix` shows the loss terms, tqdm the it/s."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def plot_log(csv_path: str | Path, out_png: str | Path) -> Path:
    """One panel per numeric column against step (log scale where every value is positive), written
    atomically to out_png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, rows = read_log(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows to plot")

    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan
    steps = [number(r["step"]) for r in rows]
    series = {c: [number(r[c]) for r in rows] for c in columns if c != "step"}
    series = {c: v for c, v in series.items() if any(math.isfinite(x) for x in v)}
    if not series:
        raise ValueError(f"{csv_path} has no numeric columns besides step")
    cols = min(3, len(series))
    rows_n = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3 * rows_n), squeeze=False)
    for ax, (name, values) in zip(axes.flat, series.items()):
        points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        ax.plot(*zip(*points), lw=1)
        if all(v > 0 for _, v in points):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    try:
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return out_png

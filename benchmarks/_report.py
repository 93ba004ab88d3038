"""Reporting: what machine and build a run measured (the JSON header), and the results as a table,
JSON and a PNG of the speedups."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

import cogvx_kernels
from cogvx_kernels import _registry
from cogvx_kernels._extension import load_error

from benchmarks import _memory, _timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

# Dense (no sparsity) bf16 tensor-core TFLOP/s and HBM GB/s, from NVIDIA's data sheets; first match
# of the device name wins. PCIe / NVL H100 parts have other peaks and are deliberately not matched.
GPU_PEAKS = [
    # (name, must contain (all), must not contain (any), bf16 TFLOP/s, GB/s)
    ("H200", ("H200",), (), 989.0, 4800.0),
    ("H100 SXM", ("H100",), ("PCIE", "NVL"), 989.0, 3350.0),
    ("A100 40GB", ("A100", "40GB"), (), 312.0, 1555.0),
    ("A100 80GB PCIe", ("A100", "PCIE"), (), 312.0, 1935.0),
    ("A100 SXM 80GB", ("A100",), (), 312.0, 2039.0),
]


# ---- machine description ------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_peak(name: str | None) -> dict | None:
    if not name:
        return None
    upper = name.upper()
    for label, need, avoid, tflops, gbps in GPU_PEAKS:
        if all(n in upper for n in need) and not any(a in upper for a in avoid):
            return dict(matched=label, bf16_dense_tflops=tflops, hbm_gbps=gbps)
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _now(timestamp: float | None = None) -> str:
    when = datetime.datetime.now() if timestamp is None else datetime.datetime.fromtimestamp(timestamp)
    return when.astimezone().isoformat(timespec="seconds")


def _git() -> dict:
    def git(*args):
        try:
            r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=git("rev-parse", "HEAD"), dirty=None if status is None else bool(status))


def _extension_build() -> dict | None:
    """Which build of cogvx_kernels._C was timed: file, modification time and content hash."""
    mod = sys.modules.get("cogvx_kernels._C")
    path = getattr(mod, "__file__", None)
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return dict(file=os.path.relpath(path, ROOT), mtime=_now(os.path.getmtime(path)), sha256_16=digest)


def _gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def shape_set(mod, device, quick: bool, tiny: bool) -> str:
    """What a module's shapes are on this device (its SHAPE_SETS), or that they are the tiny test set."""
    if tiny:
        return "tiny (test only; not a performance measurement)"
    return mod.SHAPE_SETS[torch.device(device).type] + (" [quick subset]" if quick else "")


def header(args, device: torch.device, dtype: torch.dtype, shape_sets: dict) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = _gpu_name(device)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(
        date=_now(),
        device=device.type,
        dtype=DTYPE_NAMES[dtype],
        quick=args.quick,
        tiny=args.tiny,
        shape_index=args.shape,
        backward=args.backward,
        machine=dict(platform=platform.platform(), arch=platform.machine(), cpu_model=cpu_model(),
                     cpu_capability=torch.backends.cpu.get_cpu_capability(),  # the vector ISA ATen/oneDNN use
                     cpu_count=os.cpu_count(), usable_cpus=usable, torch_threads=torch.get_num_threads()),
        load_average=load_average(),
        gpu=gpu,
        gpu_peak=gpu_peak(gpu),
        versions=dict(python=platform.python_version(), torch=torch.__version__, triton=triton_version,
                      cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                      cogvx_kernels=getattr(cogvx_kernels, "__version__", None)),
        git=_git(),
        extension="loaded" if load_error() is None else load_error(),
        extension_build=_extension_build(),
        triton_interpret=_registry.triton_interpreted(),
        settings=dict(cudnn_benchmark=torch.backends.cudnn.benchmark,
                      allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                      allow_tf32_cudnn=torch.backends.cudnn.allow_tf32),
        shape_sets=shape_sets,
        timing=dict(budget=_timing.budget(device, args), method=_timing.METHOD[device.type]),
        memory_method=_memory.METHOD[device.type],
        flops="causal_conv3d: 2*B*C_out*T*H'*W'*C_in*kt*kh*kw forward; backward 2x forward",
        bytes="minimal: inputs read once + outputs written once",
    )


def whole_header(args, device: torch.device, started: float) -> dict:
    """The header of a --distributed or --cli run that began at time.perf_counter() `started`."""
    return dict(date=_now(), machine=dict(platform=platform.platform(), cpu_model=cpu_model(), cpu_count=os.cpu_count(),
                                          gpu=_gpu_name(device)),
                torch=torch.__version__, git=_git(), tiny=args.tiny, wall_s=round(time.perf_counter() - started, 1),
                load_average=load_average())


# ---- output -------------------------------------------------------------------------------------

def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict], gpu: bool) -> str:
    cols = ["op", "shape", "backend", "pass", "median ms", "vs base", "TFLOP/s", "GB/s", "peak MiB"]
    first = not gpu and any(r.get("first_call_detail") for r in rows)
    cols += ["%peak TF", "%peak BW"] if gpu else ["warm MiB"]
    cols += ["1st MiB", "load+1st"] if first else []
    cols.append("max|diff|")
    lines = []
    for r in rows:
        line = [r["op"], r["shape_label"], r["backend"], "fwd" if r["mode"] == "forward" else "fwd+bwd",
                _fmt(r["median_ms"], ".3f"),
                "-" if r.get("speedup_vs_baseline") is None else f"{r['speedup_vs_baseline']:.2f}x",
                _fmt(r["tflops"], ".3f"), _fmt(r["gbps"], ".1f"), _fmt(r.get("peak_mem_mib"), ".1f")]
        if gpu:
            line += [_fmt(None if r["frac_peak_tflops"] is None else 100 * r["frac_peak_tflops"], ".1f"),
                     _fmt(None if r["frac_peak_gbps"] is None else 100 * r["frac_peak_gbps"], ".1f")]
        else:
            line.append(_fmt(r.get("peak_mem_warm_mib"), ".1f"))
        if first:
            line += [_fmt(r.get("first_call_mib"), ".1f"), _fmt(r.get("load_call_mib"), ".1f")]
        line.append(_fmt(r.get("max_abs_diff_vs_baseline"), ".1e"))
        lines.append(line)
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(cols)]
    right = set(range(4, len(cols)))

    def fmt_line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_line(cols), sep] + [fmt_line(l) for l in lines])


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_png(path: str, rows: list[dict], head: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []  # (op, mode) in order of appearance
    for r in rows:
        if (r["op"], r["mode"]) not in panels:
            panels.append((r["op"], r["mode"]))
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(11, 3.8 * max(len(panels), 1)), squeeze=False)
    where = head["gpu"] or f"{head['machine']['cpu_model']} ({head['machine']['torch_threads']} threads)"
    for ax, (op, mode) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
        labels = list(dict.fromkeys(r["shape_label"] for r in sel))
        baseline = sel[0]["baseline"]
        backends = [b for b in dict.fromkeys(r["backend"] for r in sel) if b != baseline]
        width = 0.8 / max(len(backends), 1)
        for j, b in enumerate(backends):
            xs, ys = [], []
            for i, lab in enumerate(labels):
                r = next((r for r in sel if r["backend"] == b and r["shape_label"] == lab), None)
                if r is not None and r["speedup_vs_baseline"] is not None:
                    xs.append(i + (j - (len(backends) - 1) / 2) * width)
                    ys.append(r["speedup_vs_baseline"])
            bars = ax.bar(xs, ys, width, label=b)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="k", ls="--", lw=1, label=baseline)
        speedups = [r["speedup_vs_baseline"] for r in sel if r["speedup_vs_baseline"]]
        if speedups and (min(speedups) < 0.2 or max(speedups) > 5):
            ax.set_yscale("log")
        ax.set_xlim(-0.75, len(labels) - 0.25)
        ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(f"speedup vs {baseline} (t_base / t)")
        ax.set_title(f"{op} {mode}, {head['dtype']}, {where}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

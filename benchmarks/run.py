#!/usr/bin/env python
"""Benchmark harness of cogvx_kernels: every available backend of each op against a baseline in one
run: the `reference` backend, or what the op's module names in `baselines()` (attention: SDPA).

    python benchmarks/run.py                              # all ops, cuda if present else cpu
    python benchmarks/run.py --op causal_conv3d --device cpu --backward \
        --json benchmarks/results/cpu-causal_conv3d.json --png benchmarks/results/cpu-causal_conv3d.png
    python benchmarks/run.py --quick                      # 1-2 shapes per op, few repeats
    python benchmarks/run.py --save                       # JSON (+PNG) under benchmarks/results/
    python benchmarks/run.py --distributed                # 1 vs W ranks per parallel plan (benchmarks/distributed.py)

For each (op, shape, backend, pass) it reports the median of timed repetitions after warm-up
(CUDA events on the GPU, perf_counter on the CPU; the backends' calls interleaved round by round,
so that a change of machine load hits them alike), the speedup over the baseline (t_base / t), the
achieved TFLOP/s and GB/s (minimal bytes: inputs read once, outputs written once) and, on a known
GPU, their fraction of the device's peak, plus the peak memory of one call:
  * CUDA: max_memory_allocated after reset_peak_memory_stats, minus the memory allocated before.
  * CPU:  in a fresh child process per (shape, backend), with no warm-up: the resident high-water
    mark (VmHWM, reset through /proc/self/clear_refs just before the call) minus the RSS read from
    /proc/self/statm just before the call ("peak MiB"; it includes one-time initialisation such as
    thread pools and the autograd engine), and the same for a second, warm call ("warm MiB").
    Those children fix glibc's mmap threshold (MALLOC_ENV), so that a warm call cannot reuse heap
    the first one left resident. A model benchmark (a module with `load(backend, inputs)`) also gets
    one more child per contender in the caller's own environment, as a user's process runs: it
    loads the model, then makes exactly one call ("1st MiB": the call's peak minus the RSS before
    it; "load+1st": the peak of both over the RSS before loading; the detail says how much of it
    is file-mapped weight pages and what malloc keeps).
    ru_maxrss before/after is recorded too, but it is not
    used when the reset works: a child started by a large parent inherits the parent's high-water
    mark in ru_maxrss (Linux carries signal->maxrss across exec), so it usually hides the call.

Adding an op: write `benchmarks/<op>.py` with the interface documented in
`benchmarks/causal_conv3d.py` and add it to BENCHMARKS below. A model benchmark (not a registry
op, e.g. `benchmarks/transformer.py`: cogvx vs diffusers) defines `contenders(device, dtype)`, the
names it times, baseline first, instead of relying on registered backends.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
# `python benchmarks/run.py` puts benchmarks/ first on sys.path: import the op modules as the
# `benchmarks` package from the repository root instead, so that they cannot shadow anything.
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path.pop(0)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import cogvx_kernels  # noqa: E402,F401  (registers the ops)
from cogvx_kernels import _registry  # noqa: E402
from cogvx_kernels._extension import load_error  # noqa: E402

# op name -> benchmark module (one per op)
BENCHMARKS = {
    "causal_conv3d": "benchmarks.causal_conv3d",
    "rope3d": "benchmarks.rope3d",
    "qk_norm_rope3d": "benchmarks.qk_norm_rope3d",
    "joint_attention": "benchmarks.joint_attention",
    "transformer": "benchmarks.transformer",
    "vae": "benchmarks.vae",
    "vae_train": "benchmarks.vae_train",
    "pipeline": "benchmarks.pipeline",
}

MODES = ("forward", "forward+backward")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
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

# Repetitions: `warmup` calls, then between min and max timed calls, as many as fit in target_s
# (estimated from the last warm-up call).
BUDGETS = {
    ("cuda", "full"): dict(warmup=3, min_reps=10, max_reps=100, target_s=1.0),
    ("cuda", "quick"): dict(warmup=2, min_reps=5, max_reps=20, target_s=0.3),
    ("cpu", "full"): dict(warmup=1, min_reps=3, max_reps=10, target_s=1.5),
    ("cpu", "quick"): dict(warmup=1, min_reps=3, max_reps=5, target_s=0.5),
    ("cpu", "tiny"): dict(warmup=1, min_reps=3, max_reps=5, target_s=0.05),
    ("cuda", "tiny"): dict(warmup=1, min_reps=3, max_reps=5, target_s=0.05),
}

TRITON_ON_CPU = ("on CPU only the Triton interpreter runs (TRITON_INTERPRET=1): a correctness tool, "
                 "not something to time")


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
    import hashlib
    mod = sys.modules.get("cogvx_kernels._C")
    path = getattr(mod, "__file__", None)
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path)).astimezone().isoformat(timespec="seconds")
    return dict(file=os.path.relpath(path, ROOT), mtime=mtime, sha256_16=digest)


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
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=device.type,
        dtype=DTYPE_NAMES[dtype],
        quick=args.quick,
        tiny=args.tiny,
        shape_index=args.shape,
        backward=args.backward,
        machine=dict(platform=platform.platform(), arch=platform.machine(), cpu_model=cpu_model(),
                     cpu_capability=torch.backends.cpu.get_cpu_capability(),  # the vector ISA ATen/oneDNN use
                     cpu_count=os.cpu_count(), usable_cpus=usable, torch_threads=torch.get_num_threads()),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
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
        timing=dict(budget=budget(device, args),
                    method="CUDA events per call, median" if device.type == "cuda"
                    else "time.perf_counter per call, median"),
        memory_method=("cuda: max_memory_allocated - memory_allocated before the call (after warm-up)"
                       if device.type == "cuda" else
                       "cpu: fresh child process per (shape, backend), no warm-up; VmHWM (reset via "
                       "/proc/self/clear_refs) - RSS from /proc/self/statm before the call "
                       "(peak_mem_mib; includes one-time initialisation), then the same for a second "
                       "call (peak_mem_warm_mib); forward measured first, forward+backward after it in "
                       "the same child; ru_maxrss before/after kept in peak_mem_detail; child env "
                       + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
                       + "; models (modules with load()): also a fresh child in the caller's environment "
                       "(default malloc, as a user's process) that loads the model and makes exactly one "
                       "call: first_call_mib = VmHWM (reset after the load) - RSS before the call, "
                       "load_call_mib = peak of load + call - RSS before the load, first_call_detail: "
                       "anonymous vs file-mapped (weights) pages, malloc's kept free bytes"),
        flops="causal_conv3d: 2*B*C_out*T*H'*W'*C_in*kt*kh*kw forward; backward 2x forward",
        bytes="minimal: inputs read once + outputs written once",
    )


def budget(device: torch.device, args) -> dict:
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    return BUDGETS[(device.type, size)]


# ---- timing and memory ----------------------------------------------------------------------------

def time_interleaved(fns: dict, device: torch.device, warmup: int, min_reps: int, max_reps: int,
                     target_s: float) -> dict:
    """Milliseconds of each timed call of every function in `fns` (name -> callable), after
    `warmup` calls of each. The calls are interleaved round by round (the order alternating), so a
    change of machine load during the run hits every backend alike."""
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    last = {}
    for name, fn in fns.items():
        for _ in range(max(warmup, 1)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            last[name] = time.perf_counter() - t0
    slowest = max(last.values(), default=0.0)
    reps = int(min(max_reps, max(min_reps, math.ceil(target_s / max(slowest, 1e-9)))))
    names = list(fns)
    times = {name: [] for name in names}
    events = []
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events.append((name, start, end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    if cuda:
        sync()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    return times


def cuda_peak_mib(fn, device: torch.device) -> float:
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Resets the resident high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _measure_call(fn) -> dict:
    """Extra resident memory of one call of `fn`: VmHWM (reset just before) - RSS before."""
    gc.collect()
    rss = _rss_bytes()
    reset = _reset_hwm()
    ru_before = _ru_maxrss_bytes()
    result = fn()
    ru_after = _ru_maxrss_bytes()
    hwm = _vm_hwm_bytes()
    del result
    gc.collect()
    ru_extra = ru_after - rss if ru_after > ru_before else None
    if reset and hwm is not None:
        peak, method = hwm - rss, "VmHWM"
    else:  # without the reset only ru_maxrss is left; it says nothing when the call stays below it
        peak, method = ru_extra, "ru_maxrss"
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    return dict(peak_mib=None if peak is None else max(mib(peak), 0.0), method=method, rss_before_mib=mib(rss),
                vm_hwm_after_mib=mib(hwm), ru_maxrss_before_mib=mib(ru_before),
                ru_maxrss_after_mib=mib(ru_after), ru_maxrss_extra_mib=mib(ru_extra))


def memory_child(spec: dict) -> dict:
    """In a fresh process, per mode in order: the extra peak resident memory of the first call
    (no warm-up: includes one-time initialisation) and of a second, warm call."""
    mod = load_module(spec["op"])
    dtype = DTYPES[spec["dtype"]]
    out = {}
    for mode in spec["modes"]:
        backward = mode == "forward+backward"
        inputs = mod.make_inputs(spec["shape"], "cpu", dtype, backward)
        call = mod.forward_backward if backward else mod.forward
        fn = lambda: call(spec["backend"], inputs)  # noqa: E731
        cold = _measure_call(fn)
        warm = _measure_call(fn) if cold["method"] == "VmHWM" else dict(peak_mib=None)
        out[mode] = dict(cold, peak_warm_mib=warm["peak_mib"], warm=warm)
        del inputs, fn
    return out


def _status_bytes() -> dict:
    """VmRSS and its parts (RssAnon: heap and other private memory; RssFile: mapped files, e.g.
    weights still mmapped from their safetensors file) from /proc/self/status, in bytes."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _malloc_free_bytes() -> int | None:
    """Free bytes glibc malloc keeps in its arenas (mallinfo2().fordblks), None off glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn().fordblks


def first_call_child(spec: dict) -> dict:
    """In a fresh process with the caller's malloc settings (what a user's process gets): load the
    model (the module's `load`), then exactly one call. The call's own peak (VmHWM reset after the
    load, minus the RSS before the call), the load's, and the peak of load + call over the RSS
    before loading; with where the resident memory went (anonymous vs file-mapped pages)."""
    mod = load_module(spec["op"])
    dtype = DTYPES[spec["dtype"]]
    out = {}
    for mode in spec["modes"]:
        backward = mode == "forward+backward"
        inputs = mod.make_inputs(spec["shape"], "cpu", dtype, backward)
        call = mod.forward_backward if backward else mod.forward
        gc.collect()
        s0 = _status_bytes()
        if not _reset_hwm():
            out[mode] = dict(first_call_mib=None, error="cannot reset VmHWM (/proc/self/clear_refs)")
            continue
        mod.load(spec["backend"], inputs)
        gc.collect()
        load_hwm, s1 = _vm_hwm_bytes(), _status_bytes()
        _reset_hwm()
        result = call(spec["backend"], inputs)
        call_hwm, s2 = _vm_hwm_bytes(), _status_bytes()
        del result
        gc.collect()
        s3, kept = _status_bytes(), _malloc_free_bytes()
        mib = lambda b: None if b is None else b / 2**20  # noqa: E731
        diff = lambda a, b, k: mib(a[k] - b[k]) if k in a and k in b else None  # noqa: E731
        out[mode] = dict(
            first_call_mib=mib(call_hwm - s1["VmRSS"]), load_mib=mib(load_hwm - s0["VmRSS"]),
            load_call_mib=mib(max(load_hwm, call_hwm) - s0["VmRSS"]),
            rss_before_load_mib=mib(s0["VmRSS"]), rss_before_call_mib=mib(s1["VmRSS"]),
            load_anon_mib=diff(s1, s0, "RssAnon"), load_file_mib=diff(s1, s0, "RssFile"),
            # file pages mapped in during the call (weights paged in by their first use) stay resident
            call_file_mib=diff(s2, s1, "RssFile"),
            # after the call, its output freed: anonymous memory kept (e.g. by the allocator)
            call_anon_kept_mib=diff(s3, s1, "RssAnon"), malloc_free_kept_mib=mib(kept))
        del inputs
    return out


# glibc malloc: a fixed mmap threshold (which also turns off its dynamic raising) returns every
# large block to the OS when it is freed, so RSS follows the live tensors; with the dynamic default,
# a warm call reuses heap pages the first call left resident and looks almost free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def child_env() -> dict:
    return {**MALLOC_ENV, **os.environ}  # settings of the caller win


def cpu_peaks(op: str, shape: dict, backend: str, dtype: torch.dtype, modes: list[str], first: bool = False) -> dict:
    """The memory child's figures per mode; `first`: the first-call child's, in the caller's
    environment (no malloc settings of ours)."""
    spec = dict(op=op, shape=shape, backend=backend, dtype=DTYPE_NAMES[dtype], modes=modes, first=first)
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                           env=dict(os.environ) if first else child_env())
    except subprocess.TimeoutExpired:
        return {m: dict(peak_mib=None, error="memory child timed out") for m in modes}
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return {m: dict(peak_mib=None, error=f"memory child failed: {err}") for m in modes}
    return json.loads(lines[-1])


# ---- the run ------------------------------------------------------------------------------------

def load_module(op: str):
    return importlib.import_module(BENCHMARKS[op])


def plan_backends(op: str, device: torch.device, dtype: torch.dtype, only: list[str] | None):
    """(backends to time, the baseline first; [(backend, reason)] skipped).

    The baseline is the `reference` backend, unless the op's benchmark module defines
    `baselines(device, dtype)`: then those (e.g. SDPA's backends for attention) run first, the first
    of them is what speedups are measured against, and the reference only runs if the module's
    `RUN_REFERENCE` is true (an eager L×L attention does not fit at the model's sequence length)."""
    mod = load_module(op)
    if hasattr(mod, "contenders"):  # a model benchmark: its own contenders, not registry backends
        return list(mod.contenders(device, dtype)), []
    extra = list(mod.baselines(device, dtype)) if hasattr(mod, "baselines") else []
    run, skipped = [], []
    for impl in _registry.implementations(op):
        if impl.backend == "reference" and extra and not getattr(mod, "RUN_REFERENCE", False):
            continue
        if impl.backend in extra:  # a baseline of the same name measures it already (attention's sdpa on CPU)
            continue
        if only and impl.backend not in only and impl.backend != "reference":
            continue
        reason = impl.unavailable(device)
        if impl.backend == "triton" and device.type == "cpu":
            reason = TRITON_ON_CPU
        elif reason is None and dtype not in impl.dtypes:
            reason = f"does not support {DTYPE_NAMES.get(dtype, dtype)}"
        if reason is None:
            run.append(impl.backend)
        else:
            skipped.append((impl.backend, reason))
    run.sort(key=lambda b: (b != "reference", _registry.BACKEND_RANK[b]))
    return extra + run, skipped


def _max_diff(out, ref) -> float:
    """Max |out - ref| over an output tensor or a tuple of them (ops with several outputs)."""
    if isinstance(out, (tuple, list)):
        return max((_max_diff(o, r) for o, r in zip(out, ref)), default=0.0)
    return (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0


def bench_op(op: str, device: torch.device, dtype: torch.dtype, args, peak: dict | None):
    mod = load_module(op)
    backends, skipped = plan_backends(op, device, dtype, args.backend)
    shapes = mod.shapes(device, args.quick, tiny=args.tiny)
    if args.shape:
        shapes = [shapes[i] for i in args.shape]
    modes = list(MODES if args.backward and not getattr(mod, "INFERENCE_ONLY", False) else MODES[:1])
    print(f"\n== {op}: {shape_set(mod, device, args.quick, args.tiny)}")
    print(f"   timing: {', '.join(backends)}")
    for backend, reason in skipped:
        print(f"   skipped {backend}: {reason}")
    rows = []
    bud = dict(getattr(mod, "BUDGET", None) or budget(device, args)) if not args.tiny else budget(device, args)
    for shape in shapes:
        shape_rows = []
        for mode in modes:
            backward = mode == "forward+backward"
            inputs = mod.make_inputs(shape, device, dtype, backward)  # shared: no backend mutates them
            call = mod.forward_backward if backward else mod.forward
            fns = {b: (lambda b=b: call(b, inputs)) for b in backends}
            times = time_interleaved(fns, device, **bud)
            ref_out = None
            for backend in backends:
                t = times[backend]
                row = dict(op=op, shape=shape, shape_label=mod.label(shape), backend=backend, mode=mode,
                           dtype=DTYPE_NAMES[dtype], device=device.type, times_ms=t, reps=len(t),
                           warmup=bud["warmup"], median_ms=statistics.median(t), min_ms=min(t),
                           flops=mod.flops(shape, backward), bytes=mod.bytes_moved(shape, dtype, backward))
                if not backward:
                    with torch.no_grad():
                        out = fns[backend]()
                    if backend == backends[0]:
                        ref_out = out
                    row["max_abs_diff_vs_baseline"] = None if ref_out is None else _max_diff(out, ref_out)
                    del out
                if device.type == "cuda" and not args.no_memory:
                    row["peak_mem_mib"] = cuda_peak_mib(fns[backend], device)
                    row["peak_mem_method"] = "max_memory_allocated"
                shape_rows.append(row)
                print(f"   {row['shape_label']:<28} {backend:<9} {mode:<16} {row['median_ms']:10.3f} ms "
                      f"({len(t)} reps)", flush=True)
            del inputs, fns, ref_out
            gc.collect()
        if device.type == "cpu" and not args.no_memory:
            for backend in backends:
                peaks = cpu_peaks(op, shape, backend, dtype, modes)
                for row in shape_rows:
                    if row["backend"] == backend:
                        info = peaks.get(row["mode"], {})
                        row["peak_mem_mib"] = info.get("peak_mib")
                        row["peak_mem_warm_mib"] = info.get("peak_warm_mib")
                        row["peak_mem_detail"] = info
                if hasattr(mod, "load"):  # a model: its load and one first call in a fresh process
                    firsts = cpu_peaks(op, shape, backend, dtype, modes, first=True)
                    for row in shape_rows:
                        if row["backend"] == backend:
                            info = firsts.get(row["mode"], {})
                            row["first_call_mib"] = info.get("first_call_mib")
                            row["load_call_mib"] = info.get("load_call_mib")
                            row["first_call_detail"] = info
        for row in shape_rows:
            ref = next((r for r in shape_rows if r["backend"] == backends[0] and r["mode"] == row["mode"]), None)
            row["baseline"] = backends[0]
            t = row["median_ms"] / 1e3
            row["speedup_vs_baseline"] = ref["median_ms"] / row["median_ms"] if ref else None
            # on a loaded machine the fastest call is the better estimate of the unloaded time
            row["speedup_vs_baseline_min"] = ref["min_ms"] / row["min_ms"] if ref else None
            row["tflops"] = row["flops"] / t / 1e12
            row["gbps"] = row["bytes"] / t / 1e9
            row["frac_peak_tflops"] = row["frac_peak_gbps"] = None
            if peak is not None:
                if dtype in (torch.bfloat16, torch.float16):  # the table is the dense bf16/fp16 peak
                    row["frac_peak_tflops"] = row["tflops"] / peak["bf16_dense_tflops"]
                row["frac_peak_gbps"] = row["gbps"] / peak["hbm_gbps"]
        order = {m: i for i, m in enumerate(modes)}
        rows.extend(sorted(shape_rows, key=lambda r: (backends.index(r["backend"]), order[r["mode"]])))
    return rows, [dict(op=op, backend=b, reason=r) for b, r in skipped]


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


# ---- CLI ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", choices=sorted(BENCHMARKS),
                   help="op to benchmark (repeatable; default: every op with a benchmark module)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--backend", action="append", choices=[b for b in _registry.BACKENDS if b != "reference"],
                   help="only these backends (repeatable; the baseline always runs)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--quick", action="store_true", help="1-2 shapes per op and fewer repeats")
    p.add_argument("--tiny", action="store_true", default=os.environ.get("COGVX_BENCH_TINY") == "1",
                   help="tiny shapes, for the harness's own tests (also COGVX_BENCH_TINY=1)")
    p.add_argument("--shape", action="append", type=int, metavar="I",
                   help="only the I-th shape of each op's set (repeatable; 0-based, as listed in a full run)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark=True (lets the reference's conv3d autotune)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--png", metavar="PATH", help="write a plot of the speedups (matplotlib)")
    p.add_argument("--save", action="store_true",
                   help="write JSON (and PNG) to benchmarks/results/<device-name>-<date>.json/.png "
                        "unless --json/--png are given")
    p.add_argument("--distributed", action="store_true",
                   help="multi-rank inference instead of the ops: one denoising step on 1 rank and on 2 (CPU) or all "
                        "GPUs per parallel plan, with the bytes each rank sends (benchmarks/distributed.py)")
    p.add_argument("--cli", action="store_true",
                   help="a newcomer's first command instead of the ops: `cogvx generate` with the embedded model and "
                        "its settings on one CPU thread, and --help, each a fresh process (benchmarks/cli.py)")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_whole(args, device: torch.device) -> int:
    """--distributed or --cli: a module's run() and table() with the machine header, instead of the ops."""
    from benchmarks import cli, distributed

    t0 = time.perf_counter()
    if args.distributed:
        module, result = distributed, distributed.run(device.type, tiny=args.tiny,
                                                      reps=3 if args.quick or args.tiny else 5)
    else:
        module, result = cli, cli.run(reps=2 if args.quick or args.tiny else 3)
    result["header"] = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                            machine=dict(platform=platform.platform(), cpu_model=cpu_model(), cpu_count=os.cpu_count(),
                                         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None),
                            torch=torch.__version__, git=_git(), tiny=args.tiny, wall_s=round(time.perf_counter() - t0, 1),
                            load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    print(module.table(result))
    print(f"({result['header']['wall_s']} s, load average {result['header']['load_average']})")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        spec = json.loads(args.memory_child)
        print(json.dumps((first_call_child if spec.get("first") else memory_child)(spec)))
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.distributed or args.cli:
        return run_whole(args, device)

    ops = list(dict.fromkeys(args.op or BENCHMARKS))
    registered = set(_registry.ops()) | {op for op in BENCHMARKS if hasattr(load_module(op), "contenders")}
    missing = [op for op in ops if op not in registered]
    for op in missing:
        print(f"skipping {op}: it is not in the cogvx_kernels registry (not implemented yet?)")
    ops = [op for op in ops if op in registered]
    for op in sorted(registered - set(BENCHMARKS)):
        print(f"note: {op} has no benchmark module (add benchmarks/{op}.py and list it in BENCHMARKS)")

    shape_sets = {op: shape_set(load_module(op), device, args.quick, args.tiny) for op in ops}
    head = header(args, device, dtype, shape_sets)
    where = head["gpu"] or f"{head['machine']['cpu_model']}, {head['machine']['cpu_capability']}"
    print(f"cogvx_kernels benchmark: {device.type} ({where}), {head['dtype']}, "
          f"{head['machine']['torch_threads']} torch threads, torch {torch.__version__}"
          + (", QUICK" if args.quick else "") + (", TINY" if args.tiny else ""))
    if head["extension"] != "loaded":
        print(f"warning: {head['extension']}")
    if device.type == "cuda" and head["gpu_peak"] is None:
        print(f"note: no peak figures for {where}: fractions of peak are not reported")

    rows, skipped = [], []
    t0 = time.perf_counter()
    for op in ops:
        r, s = bench_op(op, device, dtype, args, head["gpu_peak"])
        rows += r
        skipped += s
    head["wall_s"] = round(time.perf_counter() - t0, 1)
    head["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print()
    print(table(rows, gpu=device.type == "cuda"))
    for s in skipped:
        print(f"skipped {s['op']}/{s['backend']}: {s['reason']}")
    print(f"({head['wall_s']} s)")

    stem = os.path.join(ROOT, "benchmarks", "results",
                        f"{slug(where)}-{datetime.date.today().isoformat()}")
    json_path = args.json or (stem + ".json" if args.save else None)
    png_path = args.png or (stem + ".png" if args.save else None)
    data = dict(schema=1, header=head, rows=rows, skipped=skipped)
    if json_path:
        write_json(json_path, data)
        print(f"wrote {json_path}")
    if png_path:
        write_png(png_path, rows, head)
        print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

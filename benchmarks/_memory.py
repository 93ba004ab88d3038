"""Peak memory of one call.

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
The children are `run.py --_memory-child SPEC` (`child`).
"""
from __future__ import annotations

import functools
import gc
import json
import os
import resource
import subprocess
import sys

import torch

from benchmarks import _interface

RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")

# glibc malloc: a fixed mmap threshold (which also turns off its dynamic raising) returns every
# large block to the OS when it is freed, so RSS follows the live tensors; with the dynamic default,
# a warm call reuses heap pages the first call left resident and looks almost free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

METHOD = {
    "cuda": "cuda: max_memory_allocated - memory_allocated before the call (after warm-up)",
    "cpu": ("cpu: fresh child process per (shape, backend), no warm-up; VmHWM (reset via "
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
}


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


# ---- in the child -------------------------------------------------------------------------------

def _mib(b):
    return None if b is None else b / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_bytes(*keys: str) -> dict:
    """Those of /proc/self/status's entries (VmHWM; VmRSS and its parts: RssAnon, heap and other
    private memory; RssFile, mapped files such as weights still mmapped from their safetensors
    file; RssShmem) that it has, in bytes."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _vm_hwm_bytes() -> int | None:
    return _status_bytes("VmHWM").get("VmHWM")


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
    return dict(peak_mib=None if peak is None else max(_mib(peak), 0.0), method=method, rss_before_mib=_mib(rss),
                vm_hwm_after_mib=_mib(hwm), ru_maxrss_before_mib=_mib(ru_before),
                ru_maxrss_after_mib=_mib(ru_after), ru_maxrss_extra_mib=_mib(ru_extra))


def _each_mode(spec: dict):
    """(mode, module, inputs, the call) for each mode of the spec in order, on fresh inputs (the
    previous mode's freed before they are made)."""
    mod = _interface.load(spec["op"])
    dtype = getattr(torch, spec["dtype"])
    for mode in spec["modes"]:
        backward = mode == "forward+backward"
        inputs = mod.make_inputs(spec["shape"], "cpu", dtype, backward)
        yield mode, mod, inputs, functools.partial(mod.forward_backward if backward else mod.forward,
                                                   spec["backend"], inputs)
        del inputs


def _peaks(spec: dict) -> dict:
    """Per mode in order: the extra peak resident memory of the first call (no warm-up: includes
    one-time initialisation) and of a second, warm call."""
    out = {}
    for mode, _, inputs, call in _each_mode(spec):
        cold = _measure_call(call)
        warm = _measure_call(call) if cold["method"] == "VmHWM" else dict(peak_mib=None)
        out[mode] = dict(cold, peak_warm_mib=warm["peak_mib"], warm=warm)
        del inputs, call
    return out


def _first_call(spec: dict) -> dict:
    """With the caller's malloc settings (what a user's process gets): load the model (the module's
    `load`), then exactly one call. The call's own peak (VmHWM reset after the load, minus the RSS
    before the call), the load's, and the peak of load + call over the RSS before loading; with
    where the resident memory went (anonymous vs file-mapped pages)."""
    out = {}
    rss_keys = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
    for mode, mod, inputs, call in _each_mode(spec):
        gc.collect()
        s0 = _status_bytes(*rss_keys)
        if not _reset_hwm():
            out[mode] = dict(first_call_mib=None, error="cannot reset VmHWM (/proc/self/clear_refs)")
            continue
        mod.load(spec["backend"], inputs)
        gc.collect()
        load_hwm, s1 = _vm_hwm_bytes(), _status_bytes(*rss_keys)
        _reset_hwm()
        result = call()
        call_hwm, s2 = _vm_hwm_bytes(), _status_bytes(*rss_keys)
        del result
        gc.collect()
        s3, kept = _status_bytes(*rss_keys), _malloc_free_bytes()
        diff = lambda a, b, k: _mib(a[k] - b[k]) if k in a and k in b else None  # noqa: E731
        out[mode] = dict(
            first_call_mib=_mib(call_hwm - s1["VmRSS"]), load_mib=_mib(load_hwm - s0["VmRSS"]),
            load_call_mib=_mib(max(load_hwm, call_hwm) - s0["VmRSS"]),
            rss_before_load_mib=_mib(s0["VmRSS"]), rss_before_call_mib=_mib(s1["VmRSS"]),
            load_anon_mib=diff(s1, s0, "RssAnon"), load_file_mib=diff(s1, s0, "RssFile"),
            # file pages mapped in during the call (weights paged in by their first use) stay resident
            call_file_mib=diff(s2, s1, "RssFile"),
            # after the call, its output freed: anonymous memory kept (e.g. by the allocator)
            call_anon_kept_mib=diff(s3, s1, "RssAnon"), malloc_free_kept_mib=_mib(kept))
        del inputs, call
    return out


def child(spec: dict) -> dict:
    """What `run.py --_memory-child SPEC` prints: the first-call child's figures or the memory child's."""
    return (_first_call if spec.get("first") else _peaks)(spec)


# ---- in the parent ------------------------------------------------------------------------------

def _cpu_peaks(op: str, shape: dict, backend: str, dtype: torch.dtype, modes: list[str], first: bool) -> dict:
    """The memory child's figures per mode; `first`: the first-call child's, in the caller's
    environment (no malloc settings of ours, which the caller's own win over)."""
    spec = dict(op=op, shape=shape, backend=backend, dtype=str(dtype).removeprefix("torch."), modes=modes, first=first)
    cmd = [sys.executable, RUN, "--_memory-child", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                           env=dict(os.environ) if first else {**MALLOC_ENV, **os.environ})
    except subprocess.TimeoutExpired:
        return {m: dict(peak_mib=None, error="memory child timed out") for m in modes}
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return {m: dict(peak_mib=None, error=f"memory child failed: {err}") for m in modes}
    return json.loads(lines[-1])


# the row fields each child fills in: field -> the child's key (None: all it says)
_FIELDS = {False: dict(peak_mem_mib="peak_mib", peak_mem_warm_mib="peak_warm_mib", peak_mem_detail=None),
           True: dict(first_call_mib="first_call_mib", load_call_mib="load_call_mib", first_call_detail=None)}


def add_cpu_peaks(rows: list[dict], op: str, shape: dict, backends: list[str], dtype: torch.dtype,
                  modes: list[str], model: bool) -> None:
    """Fills in the CPU memory figures of one shape's rows: a memory child per backend, and for a
    `model` (a module with `load`) a first-call child too (its load and one first call)."""
    for backend in backends:
        for first in (False, True) if model else (False,):
            figures = _cpu_peaks(op, shape, backend, dtype, modes, first)
            for row in rows:
                if row["backend"] == backend:
                    info = figures.get(row["mode"], {})
                    row.update({field: info if key is None else info.get(key) for field, key in _FIELDS[first].items()})

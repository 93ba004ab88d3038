"""Timing: how many repetitions, and the timer that interleaves the backends' calls."""
from __future__ import annotations

import math
import time

import torch

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
METHOD = {"cuda": "CUDA events per call, median", "cpu": "time.perf_counter per call, median"}


def budget(device: torch.device, args, own: dict | None = None) -> dict:
    """The device's budget for the run's size (--tiny / --quick / full), or a module's `own` BUDGET
    (which --tiny overrides)."""
    if own and not args.tiny:
        return dict(own)
    return BUDGETS[(device.type, "tiny" if args.tiny else "quick" if args.quick else "full")]


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

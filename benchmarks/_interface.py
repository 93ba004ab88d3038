"""What a benchmark module (`benchmarks/<op>.py`) provides, declared once: `Benchmark`. run.py and
the memory children reach a module only through `load(op)`, which checks it against `Benchmark`."""
from __future__ import annotations

import importlib
from typing import Protocol

import torch

# the ops and models that have a benchmark module `benchmarks/<name>.py`, in the default run's order
BENCHMARKS = ("causal_conv3d", "rope3d", "qk_norm_rope3d", "joint_attention", "transformer", "vae", "vae_train",
              "pipeline")


class Benchmark(Protocol):
    """A benchmark module's names (a module can implement a Protocol)."""

    OP: str  # the op's name in the cogvx_kernels registry, or the model's
    SHAPE_SETS: dict[str, str]  # {"cuda": ..., "cpu": ...}: what the shapes are on each device (real or scaled down)

    # the shapes to time, JSON-serialisable dicts (quick: 1-2 of them; tiny: the harness's tests')
    def shapes(self, device, quick: bool, tiny: bool = False) -> list[dict]: ...
    def label(self, shape: dict) -> str: ...  # short text for tables and plots
    # every argument of one call, shared by all backends (none of them mutates it)
    def make_inputs(self, shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict: ...
    def forward(self, backend: str, inputs: dict): ...  # one call through the public op (or the contender's model)
    # forward + backward: the gradients of every input that has one (not needed if INFERENCE_ONLY)
    def forward_backward(self, backend: str, inputs: dict): ...
    # useful flops of one call (0: not counted, e.g. memory-bound ops, judged by GB/s)
    def flops(self, shape: dict, backward: bool) -> int: ...
    # minimal bytes of one call: every input read once, every output written once
    def bytes_moved(self, shape: dict, dtype: torch.dtype, backward: bool) -> int: ...

    # Optional; `load` fills in the defaults of OPTIONAL.
    # a model benchmark (not a registry op): the names it times, the baseline first
    def contenders(self, device, dtype: torch.dtype) -> list[str]: ...
    # timed before the registry's backends, instead of `reference`; the first is the baseline
    def baselines(self, device, dtype: torch.dtype) -> list[str]: ...
    RUN_REFERENCE: bool  # with baselines(): time the `reference` backend too
    INFERENCE_ONLY: bool  # no forward+backward pass (--backward ignored)
    BUDGET: dict | None  # the repetitions (as _timing.BUDGETS) instead of the device's, except with --tiny
    # a model benchmark: loads the contender's model, so that a child can measure load, then one call
    def load(self, backend: str, inputs: dict): ...


OPTIONAL = dict(contenders=None, baselines=None, RUN_REFERENCE=False, INFERENCE_ONLY=False, BUDGET=None, load=None)
REQUIRED = [name for name in {**Benchmark.__annotations__, **vars(Benchmark)}
            if not name.startswith("_") and name not in OPTIONAL]


def load(op: str) -> Benchmark:
    """The module `benchmarks/<op>.py`, checked against `Benchmark`, its missing optional names set to
    their defaults."""
    mod = importlib.import_module(f"benchmarks.{op}")
    for name, default in OPTIONAL.items():
        vars(mod).setdefault(name, default)
    missing = [name for name in REQUIRED if not hasattr(mod, name)
               and not (name == "forward_backward" and mod.INFERENCE_ONLY)]
    if missing:
        raise TypeError(f"benchmarks/{op}.py does not implement the benchmark interface "
                        f"(benchmarks/_interface.py): it lacks {', '.join(missing)}")
    return mod

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
    """A benchmark module: its module-level names, as a Protocol (a module can implement one)."""

    OP: str  # the op's name in the cogvx_kernels registry, or the model's
    SHAPE_SETS: dict[str, str]  # {"cuda": ..., "cpu": ...}: what the shapes are on each device (real or scaled down)

    def shapes(self, device, quick: bool, tiny: bool = False) -> list[dict]:
        """The shapes to time, as JSON-serialisable dicts (quick: 1-2 of them; tiny: the harness's tests')."""

    def label(self, shape: dict) -> str:
        """Short text for tables and plots."""

    def make_inputs(self, shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict:
        """Every argument of one call, shared by all backends (none of them mutates it)."""

    def forward(self, backend: str, inputs: dict):
        """One forward call through the public op (or the contender's model)."""

    def forward_backward(self, backend: str, inputs: dict):
        """Forward + backward: the gradients of every input that has one. Not needed if INFERENCE_ONLY."""

    def flops(self, shape: dict, backward: bool) -> int:
        """Useful flops of one call (0: not counted, e.g. memory-bound ops, judged by GB/s)."""

    def bytes_moved(self, shape: dict, dtype: torch.dtype, backward: bool) -> int:
        """Minimal bytes of one call: every input read once, every output written once."""

    # Optional; `load` fills in the defaults of OPTIONAL.
    def contenders(self, device, dtype: torch.dtype) -> list[str]:
        """A model benchmark (not a registry op): the names it times, the baseline first."""

    def baselines(self, device, dtype: torch.dtype) -> list[str]:
        """Timed before the registry's backends, instead of `reference`; the first is the baseline."""

    RUN_REFERENCE: bool  # with baselines(): time the `reference` backend too
    INFERENCE_ONLY: bool  # no forward+backward pass (--backward ignored)
    BUDGET: dict | None  # the repetitions (as _timing.BUDGETS) instead of the device's, except with --tiny

    def load(self, backend: str, inputs: dict):
        """A model benchmark: loads the contender's model, so that a child can measure load, then one call."""


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

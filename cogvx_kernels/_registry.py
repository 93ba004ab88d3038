"""One registry of op implementations: dispatch, `info`, the self-check, the parity tests and the
benchmarks all iterate over it, so a new backend is one file plus one entry in its op's `declare` call
(ops/_declare.py).

Backends: `reference` (plain PyTorch, the ground truth), `cpu` (the extension's C++ kernels),
`cuda` (the extension's CUDA kernels), `sdpa` (torch's own fused attention kernels), `triton` (our
Triton kernels; on CPU tensors only under TRITON_INTERPRET=1, which is how they are tested without
a GPU).

Each implementation declares what it needs, and backend choice checks it before choosing:
* the dtypes automatic choice may send it (`dtypes`), and test paths it runs only when named
  (`dtypes_on_request`);
* the kernels it needs built (`native_op`: the extension's CPU / CUDA kernels), and for the `cuda`
  backend an image or PTX of them for the device's arch (`_device.arch_refusal` against the build's
  TORCH_CUDA_ARCH_LIST, recorded in the extension);
* limits on the inputs (`accepts`: head dims, grid sizes) and the shared memory per block its CUDA
  kernels need for them (`shared_memory`), forward and, when autograd will run it, backward, against
  the device's opt-in limit;
* whether its backward is bit-reproducible (`deterministic`: "always", or "on request" when it has a
  faster atomics path used unless `torch.use_deterministic_algorithms(True)` is on). Every backward
  honours deterministic mode; a backend that could not is refused while it is on.

Automatic choice (`backend=None`, no COGVX_BACKEND) takes the best-ranked implementation that
declares the dtype and passes those checks; one it skips for the device or the inputs is named in
one warning line with the reason; with none left, the reference runs (warned). A named backend that
fails a check raises ValueError with the reason and the available backends.

fp32 attention on CUDA goes to `sdpa`: torch's memory-efficient attention kernel, which on sm_80+
computes fp32 products as 3xTF32 on tensor cores (CUTLASS `OpMultiplyAddFastF32`: fp32-level accuracy
at tensor-core speed). Triton with exact fp32 dots (input_precision="ieee") compiles them to FMA on
the CUDA cores and cannot match that, and our CUDA fp32 kernels are a one-warp-per-row test path
(run only when backend="cuda" is named). So `sdpa` is as fast as torch's fp32 attention by
construction, while keeping the op's contract (lse output and its gradient, layout, determinism).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from . import _device, _extension
from ._extension import has_kernel, load_error, warn_once

# Preference of the automatic choice: lower first. The reference is the last resort.
BACKEND_RANK = {"cuda": 0, "cpu": 0, "sdpa": 1, "triton": 2, "reference": 9}
BACKENDS = tuple(BACKEND_RANK)
DETERMINISM = ("always", "on request", "no")


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


TRITON_IMPORT_ERROR = _triton_import_error()  # once, at import: backend choice stays traceable


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    # dtypes automatic choice may send here
    dtypes: tuple[torch.dtype, ...]
    # dtypes it runs only when named (test paths automatic choice never takes)
    dtypes_on_request: tuple[torch.dtype, ...] = ()
    # the C++ op name whose CPU/CUDA kernels this backend needs (cpu / cuda backends)
    native_op: str | None = None
    # limits beyond dtype and device: called with the op's inputs, returns None when this
    # implementation handles them, else why not (e.g. an unsupported head dim)
    accepts: Callable[..., str | None] | None = None
    # CUDA kernels' shared memory per block for these inputs: called with the op's inputs and
    # backward=<whether autograd will run the backward>, returns {kernel: bytes} (kernels whose
    # static shared memory fits every GPU, <= 48 KiB, need not be listed)
    shared_memory: Callable[..., Mapping[str, int]] | None = None
    # "always": the backward is bit-identical run to run; "on request": it is when
    # torch.use_deterministic_algorithms(True) is on (a faster atomics path otherwise); "no": never
    # (refused while deterministic mode is on)
    deterministic: str = "always"

    def __post_init__(self):
        if self.backend not in BACKEND_RANK:
            raise ValueError(f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")
        if self.deterministic not in DETERMINISM:
            raise ValueError(f"deterministic must be one of {DETERMINISM}; got {self.deterministic!r}")

    @property
    def rank(self) -> int:
        return BACKEND_RANK[self.backend]

    @property
    def device_types(self) -> tuple[str, ...]:
        """The device types whose tensors it takes (triton: CPU only under TRITON_INTERPRET=1)."""
        return {"cpu": ("cpu",), "cuda": ("cuda",), "sdpa": ("cpu", "cuda"), "triton": ("cuda", "cpu"),
                "reference": ()}[self.backend]

    @property
    def all_dtypes(self) -> tuple[torch.dtype, ...]:
        """Every dtype it runs when named (automatic ones first)."""
        return self.dtypes + tuple(d for d in self.dtypes_on_request if d not in self.dtypes)

    def unavailable(self, device: torch.device | str) -> str | None:
        """None when this implementation can run on `device`, else the reason it cannot (not built,
        wrong device type, no code for the device's arch, disabled by the self-check)."""
        device = torch.device(device)
        if self.backend == "reference":
            return None
        if self.backend == "cpu":
            if device.type != "cpu":
                return f"the cpu backend takes CPU tensors, not {device.type}"
            return None if has_kernel(self.native_op, "CPU") else (load_error() or "no CPU kernel registered")
        if self.backend == "cuda":
            if device.type != "cuda":
                return f"the cuda backend takes CUDA tensors, not {device.type}"
            if not has_kernel(self.native_op, "CUDA"):
                return load_error() or "cogvx_kernels._C was built without CUDA kernels"
            return _cuda_arch_refusal(device)
        if self.backend == "sdpa":
            return None if device.type in ("cpu", "cuda") else f"the sdpa backend takes CPU or CUDA tensors, not {device.type}"
        if self.backend == "triton":
            if TRITON_IMPORT_ERROR:
                return TRITON_IMPORT_ERROR
            if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
                return None
            return f"the triton backend takes CUDA tensors ({device.type} only with TRITON_INTERPRET=1)"
        raise AssertionError(self.backend)

    def refusal(self, device: torch.device | str, inputs: tuple = (), backward: bool = False) -> str | None:
        """None when this implementation takes these inputs on `device`, else why not: its input
        limits, the shared memory its kernels need against the device's, deterministic mode."""
        if self.accepts is not None and inputs:
            reason = self.accepts(*inputs)
            if reason is not None:
                return reason
        if self.shared_memory is not None and inputs:
            facts = _device.properties(device)
            if facts is not None:
                for kernel, need in self.shared_memory(*inputs, backward=backward).items():
                    if need > facts.shared_memory_per_block_optin:
                        return (f"its {kernel} kernel needs {need:,} bytes of shared memory per block here; "
                                f"{facts} allows {facts.shared_memory_per_block_optin:,}")
        if backward and self.deterministic == "no" and torch.are_deterministic_algorithms_enabled():
            return "its backward is not deterministic and torch.use_deterministic_algorithms(True) is on"
        return None


def _cuda_arch_refusal(device: torch.device) -> str | None:
    facts = _device.properties(device)
    if facts is None:
        return None  # no CUDA device to check against (no GPU): launching reports it
    arch_list = _extension.CUDA_ARCH_LIST
    if arch_list is None:
        return ("cogvx_kernels._C does not record the archs it was built for (built before this check): "
                "rebuild it (pip install --no-build-isolation -e .)")
    return _device.arch_refusal(arch_list, facts.capability)


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# (op, backend, device type, dtype) -> why the self-check disabled it (cogvx_kernels.self_check)
_DISABLED: dict[tuple[str, str, str, torch.dtype], str] = {}


def register(impl: Implementation) -> Implementation:
    _REGISTRY.setdefault(impl.op, {})[impl.backend] = impl
    return impl


def disable(op: str, backend: str, device_type: str, dtype: torch.dtype, reason: str) -> None:
    """Takes an implementation out of automatic choice for (device type, dtype): the self-check
    found it wrong here. Named explicitly, it still raises with `reason`."""
    _DISABLED[(op, backend, device_type, dtype)] = reason


def disabled(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str | None:
    reason = _DISABLED.get((op, backend, device_type, dtype))
    return None if reason is None else f"disabled by the self-check: {reason}"


def ops() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def implementations(op: str) -> tuple[Implementation, ...]:
    return tuple(sorted(_REGISTRY[op].values(), key=lambda i: i.rank))


def common_backends() -> tuple[str, ...]:
    """The backends every op implements (what a model-wide backend setting may name)."""
    return tuple(b for b in BACKENDS if all(b in impls for impls in _REGISTRY.values()))


def check_common_backend(backend: str | None) -> str | None:
    """A backend name for a whole model or integration (every op it runs must have it), or None
    (automatic); refused when set, not at the first forward."""
    names = common_backends()
    if backend is not None and backend not in names:
        raise ValueError(f"backend must be one of {', '.join(names)} or None (automatic); got {backend!r} "
                         "(attention-only backends such as sdpa are chosen automatically or per op)")
    return backend


def available(op: str, device: torch.device | str) -> tuple[str, ...]:
    return tuple(i.backend for i in implementations(op) if i.unavailable(device) is None)


def resolve_backend(backend: str | None) -> str | None:
    """The backend asked for: the argument, else COGVX_BACKEND (unset or empty: None, automatic).
    An explicit name must be a known backend; "" is not one (None asks for the automatic choice)."""
    if backend is None:
        backend, source = os.environ.get("COGVX_BACKEND") or None, "the COGVX_BACKEND environment variable"
        if backend is None:
            return None
    else:
        source = "backend"
    if not isinstance(backend, str) or backend not in BACKEND_RANK:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (or None for the automatic choice); "
                         f"{source} is {backend!r}")
    return backend


def _needs_backward(inputs: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def select(op: str, backend: str | None, device: torch.device, dtype: torch.dtype,
           inputs: tuple = ()) -> Implementation:
    """The implementation that runs `op` on `device`: the requested one (argument, else the
    COGVX_BACKEND environment variable), or the best available one. `inputs` (the op's tensors)
    go to the implementations' `accepts` and `shared_memory` checks; when one of them requires grad
    (and grad mode is on), the backward's needs count too. On the meta device (shapes only, nothing
    runs) the reference, without a warning."""
    device = torch.device(device)
    backward = _needs_backward(inputs)
    requested = resolve_backend(backend)
    impls = _REGISTRY[op]
    if requested is not None:
        impl = impls.get(requested)
        if impl is None:
            reason = f"{op} has no {requested} implementation"
        else:
            reason = impl.unavailable(device)
            if reason is None and dtype not in impl.all_dtypes:
                reason = f"it does not support {dtype}"
            reason = (reason or disabled(op, requested, device.type, dtype)
                      or impl.refusal(device, inputs, backward))
        if reason is not None:
            raise ValueError(f"backend {requested!r} is not available for {op} on {device.type}: {reason}. "
                             f"Available: {', '.join(available(op, device))}")
        return impl
    if device.type == "meta":
        return impls["reference"]  # shapes only: nothing runs, so no kernel is missed
    skipped = []
    for impl in implementations(op):
        if impl.backend == "reference" or (impl.backend == "triton" and device.type == "cpu"):
            continue  # interpreted Triton is for tests: only when asked for by name
        if device.type not in impl.device_types:
            continue  # a backend for another device type
        if dtype not in impl.dtypes:
            continue  # not a dtype this backend is chosen for (a different path is the right one)
        reason = (impl.unavailable(device) or disabled(op, impl.backend, device.type, dtype)
                  or impl.refusal(device, inputs, backward))
        if reason is not None:
            skipped.append((impl.backend, reason))
            continue
        for name, why in skipped:
            warn_once(f"cogvx: {op} uses the {impl.backend} backend, not {name}: {why}")
        return impl
    why = "; ".join(f"{name}: {reason}" for name, reason in skipped) or load_error() or "no kernel is available"
    warn_once(f"cogvx: {op} falls back to the slow reference implementation on {device.type} ({dtype}); {why}")
    return impls["reference"]

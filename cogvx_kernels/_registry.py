"""One registry of op implementations: dispatch, `info`, the parity tests and the benchmarks all
iterate over it, so a new backend is one file plus one `register` call.

Backends: `reference` (plain PyTorch, the ground truth), `cpu` (the extension's C++ kernels),
`cuda` (the extension's CUDA kernels), `triton` (our Triton kernels; on CPU tensors only under
TRITON_INTERPRET=1, which is how they are tested without a GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ._extension import has_kernel, load_error, warn_once

# Preference of the automatic choice: lower first. The reference is the last resort.
BACKEND_RANK = {"cuda": 0, "cpu": 0, "triton": 1, "reference": 9}
BACKENDS = tuple(BACKEND_RANK)
ALL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
    # (atol, rtol) of the forward against the reference (in fp32 on the same inputs), per dtype;
    # the parity tests use them, so a dtype missing here is a dtype the backend does not support.
    tolerances: Mapping[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    # the C++ op name whose CPU/CUDA kernels this backend needs (cpu / cuda backends)
    native_op: str | None = None
    # optional limits beyond dtype and device: called with the op's inputs, returns None when this
    # implementation handles them, else why not (e.g. an unsupported head dim)
    accepts: Callable[..., str | None] | None = None

    @property
    def rank(self) -> int:
        return BACKEND_RANK[self.backend]

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(self.tolerances)

    def unavailable(self, device: torch.device | str) -> str | None:
        """None when this implementation can run on `device`, else the reason it cannot."""
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
            if has_kernel(self.native_op, "CUDA"):
                return None
            return load_error() or "cogvx_kernels._C was built without CUDA kernels"
        if self.backend == "triton":
            if TRITON_IMPORT_ERROR:
                return TRITON_IMPORT_ERROR
            if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
                return None
            return f"the triton backend takes CUDA tensors ({device.type} only with TRITON_INTERPRET=1)"
        raise AssertionError(self.backend)


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(impl: Implementation) -> Implementation:
    if impl.backend not in BACKEND_RANK:
        raise ValueError(f"unknown backend {impl.backend!r}; known: {', '.join(BACKENDS)}")
    _REGISTRY.setdefault(impl.op, {})[impl.backend] = impl
    return impl


def ops() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def implementations(op: str) -> tuple[Implementation, ...]:
    return tuple(sorted(_REGISTRY[op].values(), key=lambda i: i.rank))


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


def select(op: str, backend: str | None, device: torch.device, dtype: torch.dtype,
           inputs: tuple = ()) -> Implementation:
    """The implementation that runs `op` on `device`: the requested one (argument, else the
    COGVX_BACKEND environment variable), or the best available one. `inputs` go to the
    implementations' `accepts` checks (shape limits)."""
    def refusal(impl):
        return impl.accepts(*inputs) if impl.accepts is not None and inputs else None

    requested = resolve_backend(backend)
    impls = _REGISTRY[op]
    if requested is not None:
        impl = impls.get(requested)
        reason = f"{op} has no {requested} implementation" if impl is None else impl.unavailable(device)
        if reason is None and dtype not in impl.dtypes:
            reason = f"it does not support {dtype}"
        if reason is None:
            reason = refusal(impl)
        if reason is not None:
            raise ValueError(f"backend {requested!r} is not available for {op} on {device.type}: {reason}. "
                             f"Available: {', '.join(available(op, device))}")
        return impl
    for impl in implementations(op):
        if impl.backend == "reference" or (impl.backend == "triton" and device.type == "cpu"):
            continue  # interpreted Triton is for tests: only when asked for by name
        if dtype in impl.dtypes and impl.unavailable(device) is None:
            refused = refusal(impl)
            if refused is not None:
                warn_once(f"cogvx: {op} skips the {impl.backend} backend: {refused}")
                continue
            if device.type == "cuda" and impl.backend != "cuda":
                warn_once(f"cogvx: {op} uses the {impl.backend} backend on CUDA because "
                          f"{impls['cuda'].unavailable(device) if 'cuda' in impls else 'there is no CUDA kernel'}")
            return impl
    warn_once(f"cogvx: {op} falls back to the slow reference implementation on {device.type} ({dtype}); "
              f"{load_error() or 'no kernel is available'}")
    return impls["reference"]

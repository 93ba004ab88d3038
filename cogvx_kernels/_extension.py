"""Loads the compiled op library `cogvx_kernels._C` and says what it holds."""
import functools
import warnings

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when `_C` loaded, else why not (shown by `python -m cogvx_kernels.info`)."""
    try:
        from . import _C  # noqa: F401  (registers the cogvx:: ops)
    except ImportError as exc:
        return f"cogvx_kernels._C is not built or does not load ({exc}); run `pip install --no-build-isolation -e .`"
    return None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `cogvx::op` has a kernel registered for `dispatch_key` ("CPU" or "CUDA")."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cogvx::{op}", dispatch_key)


def warn_once(message: str) -> None:
    _warn_once(message)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)

"""Loads the compiled op library `cogvx_kernels._C` and records which kernels it registered.

Both are computed once at import, so that backend choice is plain data that torch.compile can
trace (querying the dispatcher inside a compiled region would break the graph).
"""
import functools
import warnings

import torch


def _load() -> str | None:
    try:
        from . import _C  # noqa: F401  (registers the cogvx:: ops)
    except ImportError as exc:
        return f"cogvx_kernels._C is not built or does not load ({exc}); run `pip install --no-build-isolation -e .`"
    return None


LOAD_ERROR: str | None = _load()


def _registered_kernels() -> frozenset[tuple[str, str]]:
    if LOAD_ERROR is not None:
        return frozenset()
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("cogvx::")]
    return frozenset((name.split("::", 1)[1], key) for name in names for key in ("CPU", "CUDA")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(name, key))


NATIVE_KERNELS = _registered_kernels()


def _build_facts():
    """(CUDA arch list, CUDA kernels' shared memory) the extension was built with: the module
    attributes `cuda_arch_list` ("8.0,9.0+PTX"; "" without CUDA kernels) and `cuda_smem`
    ({op: {head_dim: {kernel: bytes}}}), see csrc/ops.cpp. (None, None) when `_C` does not load or
    predates them."""
    if LOAD_ERROR is not None:
        return None, None
    from . import _C
    return getattr(_C, "cuda_arch_list", None), getattr(_C, "cuda_smem", None)


CUDA_ARCH_LIST, CUDA_SMEM = _build_facts()


def load_error() -> str | None:
    """None when `_C` loaded, else why not (shown by `python -m cogvx_kernels.info`)."""
    return LOAD_ERROR


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `cogvx::op` has a C++/CUDA kernel registered for `dispatch_key` ("CPU" or "CUDA")."""
    return (op, dispatch_key) in NATIVE_KERNELS


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)

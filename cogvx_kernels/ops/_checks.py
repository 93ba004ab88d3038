"""Argument checks shared by every op: clear errors that name the argument and what was expected."""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, t, *, dim: int | None = None, shape_doc: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point() or t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64); got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions {shape_doc}; got shape {tuple(t.shape)}")
    return t


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same dtype and device as `ref`."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}); got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}); got {t.device}")


def check_shape(name: str, t: torch.Tensor, expected: tuple, doc: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{' ' + doc if doc else ''}; got {tuple(t.shape)}")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(t.shape)}")


def is_int(v) -> bool:
    """An int that is not a bool (True is an int to Python, not a size)."""
    return isinstance(v, int) and not isinstance(v, bool)


FP32 = torch.finfo(torch.float32)


def check_fp32_positive(name: str, value, why: str, *, factor: float = 1.0) -> float:
    """A real number (not a bool) whose product with `factor` is a normal positive float32, in
    [tiny, max] = [1.18e-38, 3.40e38]: the kernels compute with it in fp32, where a larger value
    overflows to inf and a smaller one loses its precision or becomes 0. `why` says what uses it."""
    lo, hi = FP32.tiny / factor, FP32.max / factor
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and lo <= value <= hi):  # also refuses nan, ±inf and values <= 0
        raise ValueError(f"{name} must be a positive finite float in [{lo:.3g}, {hi:.3g}] ({why}); got {value!r}")
    return float(value)


def check_no_internal_overlap(name: str, t: torch.Tensor) -> None:
    """For tensors written in place: refuse views where several elements share one memory location
    (expanded, stride-0 views), as torch's own in-place ops do; writes to them would race."""
    if torch._debug_has_internal_overlap(t) == 1:  # 0: no overlap, 1: overlap, 2: too hard to tell
        raise RuntimeError(f"{name} is written in place but has overlapping memory (strides {t.stride()}, e.g. an "
                           "expanded tensor): unsupported operation: more than one element of the written-to tensor "
                           "refers to a single memory location. Please clone() the tensor before performing the "
                           "operation")

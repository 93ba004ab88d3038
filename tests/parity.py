"""Helpers shared by the op parity tests: backend × device (× dtype) parameters from the registry,
the parity tolerances of every backend, and the tolerance check."""
import pytest
import torch

from cogvx_kernels import _registry

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

# Forward tolerances (atol, rtol) against the reference (in fp32 / fp64 on the same rounded inputs),
# per op, backend and dtype; gradients get the tests' own multiples. A backend's dtypes are declared
# in the registry (what it supports); these say how close each must be (what the tests demand).
_ATTENTION_HALF = {BF16: (1e-2, 1e-2), FP16: (2e-3, 2e-3)}  # P rounded to the input dtype before P·V
_CONV_HALF = {BF16: (2e-2, 2e-2), FP16: (4e-3, 4e-3)}
_ROPE = {FP32: (1e-5, 1e-5), BF16: (1e-2, 1e-2), FP16: (2e-3, 2e-3)}  # one rounding of the output
TOLERANCES = {
    "joint_attention": {
        "reference": {FP32: (0.0, 0.0), FP64: (0.0, 0.0), **_ATTENTION_HALF},
        "cpu": {FP32: (1e-5, 1e-5), **_ATTENTION_HALF},
        "cuda": {FP32: (1e-5, 1e-5), **_ATTENTION_HALF},
        # fp32 dots use TF32 on GPUs only when torch.backends.cuda.matmul.allow_tf32 is set
        "triton": {FP32: (1e-4, 1e-4), **_ATTENTION_HALF},
        # CUDA: 3xTF32 products (fp32-level accuracy); CPU: fp32 FMA
        "sdpa": {FP32: (1e-5, 1e-5)},
    },
    "causal_conv3d": {
        "reference": {FP32: (0.0, 0.0), FP64: (0.0, 0.0), **_CONV_HALF},
        "cpu": {FP32: (1e-4, 1e-4), **_CONV_HALF},
        "cuda": {FP32: (1e-4, 1e-4), **_CONV_HALF},
        # fp32 dots may use TF32 on GPUs: 1e-2 covers it (exact IEEE under the interpreter)
        "triton": {FP32: (1e-2, 1e-2), **_CONV_HALF},
    },
    "rope3d": {backend: _ROPE for backend in ("reference", "cpu", "cuda", "triton")},
    "qk_norm_rope3d": {backend: _ROPE for backend in ("reference", "cpu", "cuda", "triton")},
}


def tolerance(op: str, backend: str, dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[op][backend][dtype]


def _devices(impl) -> list[str]:
    return [d for d in ("cpu", "cuda") if d in impl.device_types]


def backend_params(op: str, dtypes=None):
    """(backend, device) pairs to test: every registered kernel on the device it targets; with
    `dtypes`, (backend, device, dtype) triples of the dtypes each backend runs (named). GPU params
    carry the `cuda` mark (skipped with a message without a GPU)."""
    params = []
    for impl in _registry.implementations(op):
        if impl.backend == "reference":
            continue
        for device in _devices(impl):
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if dtypes is None:
                params.append(pytest.param(impl.backend, device, marks=marks, id=f"{impl.backend}-{device}"))
                continue
            for dtype in dtypes:
                if dtype in impl.all_dtypes:
                    params.append(pytest.param(impl.backend, device, dtype, marks=marks,
                                               id=f"{impl.backend}-{device}-{dtype}"))
    return params


def implementation(op: str, backend: str, device: str) -> _registry.Implementation:
    impl = {i.backend: i for i in _registry.implementations(op)}[backend]
    if backend == "triton" and device == "cpu" and not _registry.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    reason = impl.unavailable(device)
    assert reason is None, f"{backend} should be available on {device}: {reason}"
    return impl


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str):
    """max |actual - expected| <= atol + rtol * max |expected| (scaled to the tensor's magnitude, so a
    bf16 rounding of a large sum near a zero crossing does not fail an elementwise rtol)."""
    atol, rtol = tol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.double().abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g} (atol {atol}, rtol {rtol})"
    return err

"""Helpers shared by the op parity tests: backend × device parameters from the registry, and the
tolerance check."""
import pytest
import torch

from cogvx_kernels import _registry


def backend_params(op: str):
    """(backend, device) pairs to test: every registered kernel on the device it targets; GPU
    pairs carry the `cuda` mark (skipped with a message without a GPU)."""
    params = []
    for impl in _registry.implementations(op):
        if impl.backend == "reference":
            continue
        devices = {"cpu": ["cpu"], "cuda": ["cuda"], "triton": ["cpu", "cuda"]}[impl.backend]
        for device in devices:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            params.append(pytest.param(impl.backend, device, marks=marks, id=f"{impl.backend}-{device}"))
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

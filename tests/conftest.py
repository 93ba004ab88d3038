"""Test set-up. Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set
before any @triton.jit decorator runs, so it is set here, before cogvx_kernels is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cogvx_kernels  # noqa: E402,F401  (registers the ops)

NO_GPU = "needs a CUDA GPU (none present): run scripts/gpu_check.sh on a GPU machine"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped with a message when none is present")
    config.addinivalue_line("markers", "slow: slower tests (still part of the default run)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_GPU)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture  # the trainers' tests: deterministic kernels for the run, restored after
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)

"""`python -m cogvx_kernels.info`: what is built and which backend each op can use here."""
from __future__ import annotations

import os
import platform

import torch

from . import _registry
from ._extension import load_error


def collect() -> dict:
    import cogvx_kernels  # noqa: F401  (registers every op)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda_built = torch.version.cuda is not None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": "loaded" if load_error() is None else load_error(),
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0") if cuda_built else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpret": _registry.triton_interpreted(),
        "ops": {
            op: {
                impl.backend: {dev: (impl.unavailable(dev) or "available") for dev in devices}
                for impl in _registry.implementations(op)
            }
            for op in _registry.ops()
        },
    }


def main() -> None:
    info = collect()
    for key, value in info.items():
        if key != "ops":
            print(f"{key:>16}: {value}")
    print("backends (per device):")
    for op, impls in info["ops"].items():
        for backend, per_device in impls.items():
            states = ", ".join(f"{dev}: {state}" for dev, state in per_device.items())
            print(f"  {op:<16} {backend:<10} {states}")


if __name__ == "__main__":
    main()

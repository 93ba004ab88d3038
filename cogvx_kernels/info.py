"""`python -m cogvx_kernels.info`: what is built and which backend each op can use here.

    python -m cogvx_kernels.info                  # versions, build, backends per device
    python -m cogvx_kernels.info --check          # + the self-check table (exit status 1 if any failed)
    python -m cogvx_kernels.info --check --quick  # only what automatic choice uses (the pipeline's check)
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import _device, _extension, _registry
from ._extension import load_error


def collect() -> dict:
    import cogvx_kernels  # noqa: F401  (registers every op)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = _device.properties("cuda") if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": "loaded" if load_error() is None else load_error(),
        # the archs the extension's CUDA kernels were built for (its TORCH_CUDA_ARCH_LIST)
        "cuda_arch_list": _extension.CUDA_ARCH_LIST or None,
        "gpu": None if gpu is None else {"name": gpu.name, "arch": gpu.sm,
                                         "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin},
        "triton_interpret": _registry.triton_interpreted(),
        "ops": {
            op: {
                impl.backend: {dev: (impl.unavailable(dev) or "available") for dev in devices}
                for impl in _registry.implementations(op)
            }
            for op in _registry.ops()
        },
    }


def print_info(info: dict) -> None:
    for key, value in info.items():
        if key != "ops":
            print(f"{key:>16}: {value}")
    print("backends (per device):")
    for op, impls in info["ops"].items():
        for backend, per_device in impls.items():
            states = ", ".join(f"{dev}: {state}" for dev, state in per_device.items())
            print(f"  {op:<16} {backend:<10} {states}")


def check(device: str | None = None, quick: bool = False) -> int:
    """Runs the self-check on `device` (default: the GPU when present, else the CPU), prints the
    table; 0 when every check passed, else 1."""
    from . import self_check

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"self-check on {device} ({'quick' if quick else 'full'}): every available backend against the "
          f"reference, forward and backward")
    results = self_check.run(device, quick=quick)
    print(self_check.format_table(results))
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvx_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="run the self-check and print its table")
    parser.add_argument("--quick", action="store_true", help="with --check: only what automatic choice uses")
    parser.add_argument("--device", help="with --check: the device to check (default: cuda when present, else cpu)")
    args = parser.parse_args(argv)
    print_info(collect())
    return check(args.device, args.quick) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())

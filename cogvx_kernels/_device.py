"""What a CUDA device offers and whether the extension's CUDA code can run on it: the facts backend
choice checks before it picks a backend (`_registry.Implementation.unavailable` / `refusal`).

* `properties(device)`: name, compute capability and the opt-in shared memory per block
  (`torch.cuda.get_device_properties(...).shared_memory_per_block_optin`: 227 KiB on sm_90,
  163 KiB on sm_80 / sm_87, 99 KiB = 101,376 bytes on sm_86 / sm_89 / sm_120), cached per device.
* `arch_refusal(arch_list, capability)`: whether code built for a TORCH_CUDA_ARCH_LIST runs on a
  device. A cubin for sm_XY runs on devices XY' of the same major X with Y' >= Y (sm_80 code runs on
  sm_86 and sm_89, not on sm_90 or sm_120); PTX for compute_XY is JIT-compiled by the driver for any
  device >= X.Y; arch-specific entries (9.0a) run on that exact device only, family ones (10.0f) on
  the same major with a minor >= theirs.

Tests monkeypatch `properties` (and `_extension.CUDA_ARCH_LIST` / `CUDA_SMEM`) to play any GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# torch.utils.cpp_extension's names for TORCH_CUDA_ARCH_LIST entries
_NAMED_ARCHES = {
    "Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
}
_ENTRY = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?")


@dataclass(frozen=True)
class Device:
    name: str
    capability: tuple[int, int]
    shared_memory_per_block_optin: int  # bytes a block may opt in to (cudaFuncSetAttribute)

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    def __str__(self) -> str:
        return f"{self.name} ({self.sm})"


_PROPERTIES: dict[int, Device] = {}


def properties(device: torch.device | str) -> Device | None:
    """The CUDA device's facts; None for other devices and when no CUDA GPU is present."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    facts = _PROPERTIES.get(index)
    if facts is None:
        p = torch.cuda.get_device_properties(index)
        facts = _PROPERTIES[index] = Device(p.name, (p.major, p.minor), int(p.shared_memory_per_block_optin))
    return facts


@dataclass(frozen=True)
class ArchEntry:
    major: int
    minor: int
    variant: str  # "" (portable), "a" (arch-specific), "f" (family-specific)
    ptx: bool     # PTX embedded too (+PTX), besides the cubin

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.variant}{'+PTX' if self.ptx else ''}"

    def cubin_runs_on(self, capability: tuple[int, int]) -> bool:
        major, minor = capability
        if self.variant == "a":
            return (major, minor) == (self.major, self.minor)
        return major == self.major and minor >= self.minor

    def ptx_runs_on(self, capability: tuple[int, int]) -> bool:
        if not self.ptx:
            return False
        if self.variant:  # arch / family-specific PTX is not forward-compatible
            return self.cubin_runs_on(capability)
        return tuple(capability) >= (self.major, self.minor)


def parse_arch_list(arch_list: str) -> tuple[ArchEntry, ...]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "8.0 9.0", "Ampere", or the extension's "8.0,9.0+PTX")
    as entries. Unrecognised entries raise ValueError naming them."""
    entries, bad = [], []
    for token in (t for t in re.split(r"[;,\s]+", arch_list.strip()) if t):
        for part in _NAMED_ARCHES.get(token, token).split(";"):
            m = _ENTRY.fullmatch(part)
            if m is None:
                bad.append(token)
                continue
            entries.append(ArchEntry(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) is not None))
    if bad:
        raise ValueError(f"unrecognised CUDA arch list entries {bad} in {arch_list!r} (expected e.g. 8.0;9.0+PTX)")
    return tuple(entries)


def arch_refusal(arch_list: str, capability: tuple[int, int]) -> str | None:
    """None when code built for `arch_list` runs on a device of `capability`, else why not."""
    entries = parse_arch_list(arch_list)
    if any(e.cubin_runs_on(capability) or e.ptx_runs_on(capability) for e in entries):
        return None
    built = ", ".join(str(e) for e in entries) or "no arch"
    major, minor = capability
    return (f"the extension's CUDA kernels were built for {built}, with no kernel image or PTX for sm_{major}{minor} "
            f"(rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor}, or a lower arch with +PTX)")

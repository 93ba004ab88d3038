"""Self-check: every available backend of every op, on the present device, against the reference at
small shapes with odd lengths, forward and backward (`python -m cogvx_kernels.info --check`).

Each (op, backend, dtype) runs its cases on random inputs rounded to the dtype; the reference runs
in fp32 on the same rounded inputs; the result is the worst relative error (max |error| / max
|reference|) over every output and every input gradient, against a bound per dtype (`BOUNDS`). The
bounds catch broken kernels (wrong results, failed launches, NaN), not the last digits: those are
the parity tests' job (tests/parity.py), whose tolerances are much tighter.

`ensure(device)` is what the pipeline calls on a CUDA device: the quick check (the dtypes automatic
choice uses, one case per op) once per (device, build), its verdict cached as JSON under the user's
cache folder ($XDG_CACHE_HOME/cogvx or ~/.cache/cogvx); a failed (op, backend, dtype) is disabled
for automatic choice with one warning line naming it, so the next backend runs. COGVX_SELF_CHECK=0
skips it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import _device, _extension, _registry

CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# max |error| / max |reference| above which a result is wrong (forward outputs and gradients)
BOUNDS = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 1e-1}
CACHE_VERSION = 1


@dataclass
class Result:
    op: str
    backend: str
    dtype: str
    ok: bool
    error: float | None  # worst relative error over outputs and gradients (None: it did not run)
    bound: float
    reason: str | None   # why it failed
    seconds: float
    note: str | None = None  # what was not run here (e.g. a backward the device cannot launch)


@dataclass
class Case:
    name: str
    leaves: list  # input tensors (floating ones get gradients) and plain arguments
    call: Callable  # call(leaves, backend) -> tuple of output tensors


def _grid(g, shape, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def _attention_cases(device, dtype, quick):
    from .ops.joint_attention import joint_attention

    def case(Lq, Lk, D, seed):
        g = torch.Generator().manual_seed(seed)
        # head-split views, as the model produces them: (B, L, heads, D) memory as (B, heads, L, D)
        q, k, v = (_grid(g, (1, L, 3, D), dtype, device).transpose(1, 2) for L in (Lq, Lk, Lk))
        return Case(f"Lq={Lq} Lk={Lk} D={D}", [q, k, v],
                    lambda t, backend: joint_attention(*t, return_lse=True, backend=backend))
    cases = [case(37, 29, 64, 0)]
    return cases if quick else cases + [case(29, 67, 128, 1)]


def _conv_cases(device, dtype, quick):
    from .ops.causal_conv3d import causal_conv3d
    g = torch.Generator().manual_seed(2)
    x = _grid(g, (1, 6, 3, 9, 11), dtype, device)
    w = _grid(g, (5, 6, 3, 3, 3), dtype, device, 0.2)
    b = _grid(g, (5,), dtype, device)
    halo = _grid(g, (1, 6, 2, 9, 11), dtype, device)
    cases = [Case("6->5 ch, 3x9x11, halo", [x, w, b, halo],
                  lambda t, backend: (causal_conv3d(*t, backend=backend),))]
    if not quick:
        x3 = _grid(g, (2, 3, 5, 7, 5), dtype, device)
        w3 = _grid(g, (3, 3, 3, 3, 3), dtype, device, 0.2)
        cases.append(Case("3->3 ch, 5x7x5, no halo", [x3, w3],
                          lambda t, backend: (causal_conv3d(*t, backend=backend),)))
    return cases


_ROPE_GRID = dict(text_len=5, pos_t=2, pos_h=3, pos_w=5)


def _rope_cases(device, dtype, quick):
    from .ops.rope3d import rope3d
    g = torch.Generator().manual_seed(3)
    x = _grid(g, (1, 5 + 2 * 3 * 5, 3, 64), dtype, device).transpose(1, 2)
    return [Case("L=35 D=64", [x], lambda t, backend: (rope3d(t[0], **_ROPE_GRID, backend=backend),))]


def _qk_norm_cases(device, dtype, quick):
    from .ops.rope3d import qk_norm_rope3d
    g = torch.Generator().manual_seed(4)
    q, k = (_grid(g, (1, 5 + 2 * 3 * 5, 3, 64), dtype, device).transpose(1, 2) for _ in range(2))
    params = [_grid(g, (64,), torch.float32, device, 0.3) + (1.0 if i % 2 == 0 else 0.0) for i in range(4)]
    return [Case("L=35 D=64 affine", [q, k, *params],
                 lambda t, backend: qk_norm_rope3d(*t, eps=1e-6, **_ROPE_GRID, backend=backend))]


CASES = {"joint_attention": _attention_cases, "causal_conv3d": _conv_cases, "rope3d": _rope_cases,
         "qk_norm_rope3d": _qk_norm_cases}


def _run_case(case: Case, backend: str, compute_dtype: torch.dtype | None, grad_seed: int, backward: bool = True):
    """Outputs and (with `backward`) input gradients of `case` on `backend`; compute_dtype: cast the
    floating leaves first (the reference's fp32 copy of the rounded inputs)."""
    leaves = []
    for t in case.leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(compute_dtype or t.dtype).requires_grad_(backward)
        leaves.append(t)
    outputs = case.call(leaves, backend)
    if not backward:
        return list(outputs)
    g = torch.Generator().manual_seed(grad_seed)
    grad_outputs = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outputs]
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outputs, wanted, grad_outputs)
    return [o.detach() for o in outputs] + list(grads)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        return math.inf
    if not torch.isfinite(actual).all():
        return math.inf
    scale = expected.double().abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / max(scale, 1e-30)


def check_one(op: str, backend: str, dtype: torch.dtype, device: torch.device, quick: bool = False) -> Result:
    """The verdict on one (op, backend, dtype) on `device`."""
    start = time.perf_counter()
    impl = {i.backend: i for i in _registry.implementations(op)}[backend]
    name = str(dtype).removeprefix("torch.")
    bound = BOUNDS[dtype]
    worst, notes = 0.0, []
    try:
        for i, case in enumerate(CASES[op](device, dtype, quick)):
            tensors = tuple(t.detach().requires_grad_() for t in case.leaves if isinstance(t, torch.Tensor))
            # what backend choice would refuse here (shared memory of a kernel) is not run
            refused = impl.refusal(device, tensors, backward=False)
            if refused is not None:
                notes.append(f"{case.name}: not run ({refused})")
                continue
            refused = impl.refusal(device, tensors, backward=True)
            if refused is not None:
                notes.append(f"{case.name}: forward only ({refused})")
            got = _run_case(case, backend, None, 100 + i, backward=refused is None)
            want = _run_case(case, "reference", torch.float32, 100 + i, backward=refused is None)
            for a, e in zip(got, want):
                worst = max(worst, _relative_error(a, e.to(a.device)))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as exc:  # a failed launch, a bad kernel image, an assertion: the verdict is "failed"
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return Result(op, backend, name, False, None, bound, reason, time.perf_counter() - start)
    ok = worst <= bound
    reason = None if ok else f"relative error {worst:.3g} > {bound:g}"
    return Result(op, backend, name, ok, worst, bound, reason, time.perf_counter() - start, "; ".join(notes) or None)


def plan(device: torch.device, quick: bool = False) -> list[tuple[str, str, torch.dtype]]:
    """(op, backend, dtype) to check on `device`: every available backend but the reference (the
    ground truth) in the dtypes it runs (quick: those automatic choice sends it); Triton on CPU only
    under TRITON_INTERPRET=1; backends refused on this device (arch, shared memory) are left out."""
    device = torch.device(device)
    todo = []
    for op in _registry.ops():
        for impl in _registry.implementations(op):
            if impl.backend == "reference" or device.type not in impl.device_types:
                continue
            if impl.unavailable(device) is not None or (impl.backend == "triton" and device.type == "cpu" and quick):
                continue  # not here; interpreted Triton is never chosen automatically
            for dtype in (impl.dtypes if quick else impl.all_dtypes):
                if dtype in CHECK_DTYPES:
                    todo.append((op, impl.backend, dtype))
    return todo


def run(device: torch.device | str, quick: bool = False, progress: Callable[[Result], None] | None = None) -> list[Result]:
    device = torch.device(device)
    results = []
    for op, backend, dtype in plan(device, quick):
        result = check_one(op, backend, dtype, device, quick)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def format_table(results: list[Result]) -> str:
    lines = [f"{'op':<16} {'backend':<9} {'dtype':<9} result"]
    for r in results:
        if r.ok:
            verdict = f"ok      max rel. error {r.error:.2e} (bound {r.bound:g}), {r.seconds:.1f} s"
            if r.note:
                verdict += f"; {r.note}"
        else:
            verdict = f"FAILED  {r.reason}"
        lines.append(f"{r.op:<16} {r.backend:<9} {r.dtype:<9} {verdict}")
    return "\n".join(lines)


# ---- the pipeline's cached quick check -----------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cogvx"


def _build_id() -> str:
    """What the verdict depends on besides the device: the compiled extension, the kernel sources
    (Triton and Python backends), torch and triton versions."""
    h = hashlib.sha256()
    package = Path(__file__).parent
    files = sorted(package.glob("_C*.so")) + sorted(package.rglob("*.py"))
    for f in files:
        h.update(f.relative_to(package).as_posix().encode())
        h.update(f.read_bytes())
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    h.update(f"{torch.__version__} {triton_version} {_extension.load_error()}".encode())
    return h.hexdigest()[:16]


def _device_facts(device: torch.device) -> dict:
    facts = _device.properties(device)
    if facts is not None:
        return {"type": "cuda", "name": facts.name, "capability": list(facts.capability),
                "shared_memory_per_block_optin": facts.shared_memory_per_block_optin,
                "torch_cuda": torch.version.cuda}
    return {"type": device.type, "name": platform.processor() or platform.machine()}


def cache_path(device: torch.device | str) -> Path:
    device = torch.device(device)
    key = json.dumps([CACHE_VERSION, _device_facts(device), _build_id()], sort_keys=True)
    return cache_dir() / f"self-check-{device.type}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


_ENSURED: dict[Path, list[Result]] = {}


def ensure(device: torch.device | str) -> list[Result] | None:
    """The quick self-check of `device`, once per (device, build): run and cached, or read from the
    cache; every failed (op, backend, dtype) is disabled for automatic choice (warned once each).
    None when COGVX_SELF_CHECK=0."""
    if os.environ.get("COGVX_SELF_CHECK", "1").strip() == "0":
        return None
    device = torch.device(device)
    path = cache_path(device)
    results = _ENSURED.get(path)
    if results is None:
        results = _read(path)
        if results is None:
            results = run(device, quick=True)
            _write(path, device, results)
        _ENSURED[path] = results
    for r in results:
        if not r.ok:
            _registry.disable(r.op, r.backend, device.type, getattr(torch, r.dtype), r.reason)
            _extension.warn_once(f"cogvx: self-check: the {r.backend} backend of {r.op} failed in {r.dtype} on "
                                 f"this device ({r.reason}); it is disabled, the next backend is used "
                                 f"(verdict cached in {path}; COGVX_SELF_CHECK=0 skips the check)")
    return results


def _read(path: Path) -> list[Result] | None:
    try:
        data = json.loads(path.read_text())
        return [Result(**r) for r in data["results"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: check again


def _write(path: Path, device: torch.device, results: list[Result]) -> None:
    data = {"version": CACHE_VERSION, "device": _device_facts(device), "build": _build_id(),
            "results": [asdict(r) for r in results]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the verdict still holds for this process
        _extension.warn_once(f"cogvx: self-check verdict not cached ({exc})")

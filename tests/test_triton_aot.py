"""Compile-only checks of the Triton kernels (no GPU needed): every spec of every op module in
cogvx_kernels.triton.aot.OP_MODULES compiles for sm_80 and sm_90 with triton's bundled ptxas,
without register spills or stack frames, and the kernels that use tl.dot run on tensor cores
(mma.sync on sm_80, wgmma on sm_90).

The conftest sets TRITON_INTERPRET=1, which makes @triton.jit return interpreter objects at import
time, so the compile runs once per session in a subprocess without it (about 1-2 minutes on 2
cores; triton's cache makes reruns fast).
"""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)


def _bundled_tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(_bundled_tool(tool)):
            pytest.skip(f"triton's bundled {tool} is missing: Triton AOT check skipped")
    out = tmp_path_factory.mktemp("triton_aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    proc = subprocess.run(
        [sys.executable, "-m", "cogvx_kernels.triton.aot", "--json", str(out), "--jobs", jobs,
         *[a for arch in ARCHS for a in ("--arch", str(arch))]],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    print(proc.stdout[-12000:])
    assert out.exists(), f"the AOT check wrote no report (exit {proc.returncode}):\n{proc.stderr[-8000:]}"
    data = json.loads(out.read_text())
    assert data, "the AOT check compiled no spec"
    return data


def _label(r):
    return f"{r['name']} (sm_{r['arch']})"


def test_every_spec_compiles(results):
    errors = [f"{_label(r)}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)


def test_every_op_module_has_specs_for_both_archs(results):
    from cogvx_kernels.triton.aot import OP_MODULES
    for mod in OP_MODULES:
        archs = {r["arch"] for r in results if r["module"] == mod}
        assert archs == set(ARCHS), f"{mod}: specs compiled for {sorted(archs)}, expected {list(ARCHS)}"


def test_every_kernel_config_exists_for_both_archs(results):
    """Per-arch specs end their name in _sm80 / _sm90 (specs without an arch compile for both): the
    same kernel/dtype/case must exist for both archs."""
    by_arch = {}
    for r in results:
        base = (r["module"], re.sub(r"_sm\d+$", "", r["name"]))
        by_arch.setdefault(base, set()).add(r["arch"])
    missing = {base: sorted(archs) for base, archs in by_arch.items() if archs != set(ARCHS)}
    assert not missing, f"kernels compiled for one arch only: {missing}"


def test_no_spills_no_stack(results):
    bad = [f"{_label(r)}: LOCAL {r['local_bytes']} STACK {r['stack_bytes']} (regs {r['regs']})"
           for r in results if "error" not in r and (r["local_bytes"] or r["stack_bytes"])]
    assert not bad, "register spills / stack use:\n" + "\n".join(bad)


def test_dot_kernels_use_tensor_cores(results):
    bad = []
    for r in results:
        if "error" in r or not r["uses_dot"]:
            continue
        if r["arch"] == 90 and not r["has_wgmma"]:
            bad.append(f"{_label(r)}: no wgmma in the PTX")
        if r["arch"] == 80 and not r["has_mma_sync"]:
            bad.append(f"{_label(r)}: no mma.sync in the PTX")
    assert not bad, "\n".join(bad)


def test_register_use_is_sane(results):
    for r in results:
        if "error" not in r:
            assert 0 < r["regs"] <= 255, f"{_label(r)}: {r['regs']} registers"

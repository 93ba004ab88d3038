"""Compile-only checks of the CUDA kernels (no GPU needed): every csrc/cuda/*.cu builds for sm_80
and sm_90 without register spills or local memory, and the tensor-core kernels contain HMMA.

Runs scripts/check_cuda_build.py once per session (about 1-3 minutes on 2 cores); skipped when
nvcc is not found.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_cuda_build.py")
ARCHS = ["80", "90"]


def _load_script():
    spec = importlib.util.spec_from_file_location("check_cuda_build", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    mod = _load_script()
    cuda_home = mod.find_cuda_home()
    if cuda_home is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): CUDA build check skipped")
    out = tmp_path_factory.mktemp("cuda_build") / "report.json"
    env = dict(os.environ, CUDA_HOME=cuda_home)
    proc = subprocess.run([sys.executable, SCRIPT, "--arch", *ARCHS, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=1500)
    print(proc.stdout[-12000:])
    assert out.exists(), f"check_cuda_build.py wrote no report (exit {proc.returncode}):\n{proc.stderr[-8000:]}"
    data = json.loads(out.read_text())
    data["returncode"] = proc.returncode
    data["stdout"] = proc.stdout
    return data


def _kernels(report):
    return [(r["file"], k) for r in report["results"] for k in r["kernels"]]


def test_compiles(report):
    for r in report["results"]:
        assert r["returncode"] == 0, f"{r['file']} failed to compile:\n{r.get('log', '')[-8000:]}"
    assert report["results"], "no .cu files compiled"


def test_every_kernel_built_for_both_archs(report):
    archs_of = {}
    for f, k in _kernels(report):
        archs_of.setdefault((f, k["kernel"]), set()).add(k["arch"])
    assert archs_of, "ptxas reported no kernels"
    for (f, name), archs in archs_of.items():
        assert archs == {f"sm_{a}" for a in ARCHS}, f"{f}: {name} built for {sorted(archs)}"


def test_no_spills_no_local_memory(report):
    bad = [f"{f}: {k['kernel']} [{k['arch']}] regs={k['registers']} stack={k['stack']} "
           f"spill={k['spill_stores']}/{k['spill_loads']} local_insts={k['local_insts']}"
           for f, k in _kernels(report)
           if k["spill_stores"] or k["spill_loads"] or k["stack"] or k["local_insts"]
           or (k["registers"] or 0) > 255]
    assert not bad, "\n".join(bad)


def test_tensor_core_kernels_use_hmma(report):
    tc = [(f, k) for f, k in _kernels(report) if k["requires_hmma"]]
    # the causal conv3d forward, input-gradient and weight-gradient kernels, fp16 and bf16, both archs
    names = {(k["kernel"], k["arch"]) for _, k in tc}
    for stage in ("fwd", "dgrad", "wgrad"):
        for dtype in ("c10::Half", "c10::BFloat16"):
            for arch in ARCHS:
                assert any(f"causal_conv3d_{stage}_kernel<{dtype}>" in n and a == f"sm_{arch}"
                           for n, a in names), f"missing {stage} {dtype} sm_{arch}"
    missing = [f"{f}: {k['kernel']} [{k['arch']}]" for f, k in tc if not k["hmma"]]
    assert not missing, "no HMMA in:\n" + "\n".join(missing)


def test_script_exit_status(report):
    assert report["ok"] and report["returncode"] == 0, "\n".join(report["errors"]) or report["stdout"][-4000:]

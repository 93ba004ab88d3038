"""The kernels' self-check: its table (`python -m cogvx_kernels.info --check`, `cogvx info --check`),
the pipeline's cached quick check, a broken backend disabled by it, and COGVX_SELF_CHECK=0."""
import dataclasses
import json

import pytest
import torch

from cogvx_kernels import _registry, info, self_check
from cogvx_kernels.reference.rope3d import rope3d_tables


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """A fresh cache folder, no disabled backend, no remembered verdict; Triton stays out of the CPU
    check (interpreted, it would take minutes: the parity tests cover it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("COGVX_SELF_CHECK", raising=False)
    monkeypatch.delenv("COGVX_BACKEND", raising=False)
    monkeypatch.setattr(_registry, "_DISABLED", {})
    monkeypatch.setattr(self_check, "_ENSURED", {})
    _registry.warn_once.cache_clear()
    yield tmp_path
    _registry.warn_once.cache_clear()


def break_backend(monkeypatch, op, backend, fn):
    impl = _registry._REGISTRY[op][backend]
    monkeypatch.setitem(_registry._REGISTRY[op], backend, dataclasses.replace(impl, fn=fn))


def test_check_prints_a_table_of_every_cpu_backend(clean, capsys):
    assert info.main(["--check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:4] for line in out.splitlines() if line.split()[:1] and line.split()[0] in _registry.ops()
            and len(line.split()) > 3 and line.split()[3] in ("ok", "FAILED")]
    expected = {(op, b, str(d).removeprefix("torch.")) for op, b, d in self_check.plan(torch.device("cpu"))}
    assert {(op, b, d) for op, b, d, _ in rows} == expected
    assert all(verdict == "ok" for *_, verdict in rows)
    assert ("joint_attention", "cpu", "bfloat16") in expected and ("joint_attention", "sdpa", "float32") in expected
    assert f"{len(expected)} ok, 0 failed" in out


def test_cogvx_info_check_exit_status(clean, monkeypatch, capsys):
    from cogvx import cli
    break_backend(monkeypatch, "rope3d", "cpu", rope3d_tables)  # still right: passes
    assert cli.main(["info", "--check", "--quick", "--device", "cpu"]) == 0
    break_backend(monkeypatch, "rope3d", "cpu", lambda x, *args: rope3d_tables(x, *args) * 1.5)
    assert cli.main(["info", "--check", "--quick", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert any(line.split()[:4] == ["rope3d", "cpu", "float32", "FAILED"] and "relative error" in line
               for line in out.splitlines())


def test_a_kernel_that_raises_is_reported_failed_with_its_reason(clean, monkeypatch):
    def launch_failure(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    break_backend(monkeypatch, "causal_conv3d", "cpu", launch_failure)
    result = self_check.check_one("causal_conv3d", "cpu", torch.bfloat16, torch.device("cpu"), quick=True)
    assert not result.ok and result.error is None
    assert result.reason == "RuntimeError: CUDA error: no kernel image is available for execution on the device"
    assert "FAILED  RuntimeError: CUDA error" in self_check.format_table([result])


def test_broken_backend_is_disabled_with_one_warning_and_the_next_one_runs(clean, monkeypatch):
    """A backend returning wrong values fails the check, is disabled (one warning naming it) and
    automatic choice takes the next backend; the verdict is cached and reused by the next process."""
    break_backend(monkeypatch, "joint_attention", "cpu",
                  lambda q, k, v, scale: tuple(t * 1.5 for t in _registry._REGISTRY["joint_attention"]["reference"]
                                               .fn(q, k, v, scale)))
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning) as record:
        results = self_check.ensure(cpu)
    failed = {(r.op, r.backend, r.dtype) for r in results if not r.ok}
    assert failed == {("joint_attention", "cpu", d) for d in ("float32", "bfloat16", "float16")}
    warned = [str(w.message) for w in record if "self-check" in str(w.message)]
    assert len(warned) == 3 and all("the cpu backend of joint_attention failed in" in w and "it is disabled, the next "
                                    "backend is used" in w for w in warned)
    q = torch.zeros(1, 2, 9, 64)
    with pytest.warns(RuntimeWarning, match="uses the sdpa backend, not cpu: disabled by the self-check: relative error"):
        assert _registry.select("joint_attention", None, cpu, torch.float32, (q, q, q)).backend == "sdpa"
    with pytest.raises(ValueError, match="backend 'cpu' is not available for joint_attention on cpu: disabled by the "
                                         "self-check"):
        _registry.select("joint_attention", "cpu", cpu, torch.float32, (q, q, q))
    assert _registry.select("rope3d", None, cpu, torch.float32).backend == "cpu"  # other ops untouched

    # the next process: the cached verdict disables it again without checking again
    monkeypatch.setattr(_registry, "_DISABLED", {})
    monkeypatch.setattr(self_check, "_ENSURED", {})
    monkeypatch.setattr(self_check, "run", lambda *a, **k: pytest.fail("the cached verdict should be reused"))
    _registry.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="self-check: the cpu backend of joint_attention failed"):
        again = self_check.ensure(cpu)
    assert again == results
    assert _registry.disabled("joint_attention", "cpu", "cpu", torch.bfloat16)


def test_verdict_is_cached_per_device_and_build(clean, monkeypatch):
    cpu = torch.device("cpu")
    results = self_check.ensure(cpu)
    assert results and all(r.ok for r in results)
    path = self_check.cache_path(cpu)
    assert path.parent == clean / "cogvx" and path.exists()
    data = json.loads(path.read_text())
    assert data["device"]["type"] == "cpu" and len(data["results"]) == len(results)
    # reused within the process, and from the file by a new process
    monkeypatch.setattr(self_check, "run", lambda *a, **k: pytest.fail("the cached verdict should be reused"))
    assert self_check.ensure(cpu) is results
    monkeypatch.setattr(self_check, "_ENSURED", {})
    assert self_check.ensure(cpu) == results
    # another build (or device) is another verdict
    monkeypatch.setattr(self_check, "_build_id", lambda: "another-build")
    assert self_check.cache_path(cpu) != path


def test_self_check_env_0_skips_it(clean, monkeypatch):
    monkeypatch.setenv("COGVX_SELF_CHECK", "0")
    monkeypatch.setattr(self_check, "run", lambda *a, **k: pytest.fail("COGVX_SELF_CHECK=0 must skip the check"))
    assert self_check.ensure("cpu") is None
    assert not (clean / "cogvx").exists()


def test_pipeline_runs_the_check_on_cuda_only(monkeypatch):
    from cogvx.pipeline import Pipeline

    class Ran(Exception):
        pass

    def ensure(device):
        raise Ran(device)
    monkeypatch.setattr(self_check, "ensure", ensure)
    pipe = Pipeline.__new__(Pipeline)  # the check comes before any model is used
    monkeypatch.setattr(Pipeline, "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(Ran, match="cuda:0"):
        pipe("a cat")

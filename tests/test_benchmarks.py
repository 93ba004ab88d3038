"""The benchmark harness `benchmarks/run.py`: a tiny CPU run end to end (JSON + PNG), and the
work formulas of the causal_conv3d benchmark."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    cmd = [sys.executable, RUN, "--quick", "--tiny", "--device", "cpu", "--op", "causal_conv3d", "--backward",
           "--json", str(json_path), "--png", str(png_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, json.loads(json_path.read_text()), png_path


@pytest.mark.slow
def test_header(tiny_run):
    _, data, _ = tiny_run
    head = data["header"]
    for key in ("machine", "gpu", "versions", "date", "dtype", "quick", "device", "shape_sets", "backward"):
        assert key in head, key
    for key in ("platform", "cpu_model", "cpu_count"):
        assert head["machine"][key], key
    for key in ("torch", "triton", "python"):
        assert key in head["versions"], key
    assert head["versions"]["torch"] == torch.__version__
    assert head["dtype"] == "fp32" and head["device"] == "cpu"
    assert head["quick"] is True and head["tiny"] is True
    assert head["gpu"] is None
    assert "tiny" in head["shape_sets"]["causal_conv3d"]


@pytest.mark.slow
def test_rows(tiny_run):
    _, data, _ = tiny_run
    rows = data["rows"]
    for backend in ("reference", "cpu"):
        for mode in ("forward", "forward+backward"):
            sel = [r for r in rows if r["backend"] == backend and r["mode"] == mode]
            assert sel, (backend, mode)
            for r in sel:
                assert r["op"] == "causal_conv3d"
                assert r["median_ms"] > 0 and all(t > 0 for t in r["times_ms"]) and r["reps"] >= 3
                assert r["speedup_vs_baseline"] > 0
                assert r["tflops"] > 0 and r["gbps"] > 0 and r["flops"] > 0 and r["bytes"] > 0
                assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] >= 0
    for r in rows:
        if r["backend"] == "reference":
            assert r["speedup_vs_baseline"] == pytest.approx(1.0)
        if r["mode"] == "forward":
            assert r["max_abs_diff_vs_baseline"] < 1e-3
    # triton on CPU is only the interpreter: skipped, with the reason in the JSON and the output
    assert not any(r["backend"] == "triton" for r in rows)
    assert any(s["backend"] == "triton" and "interpreter" in s["reason"] for s in data["skipped"])


@pytest.mark.slow
def test_table_and_png(tiny_run):
    stdout, _, png_path = tiny_run
    assert "median ms" in stdout and "reference" in stdout
    assert "skipped causal_conv3d/triton" in stdout
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_model_benchmarks_run_ours_against_diffusers(tmp_path):
    """The model benchmarks (transformer, VAE, pipeline): their contenders (diffusers first, the
    baseline) timed in one run, the same outputs, and a memory figure per contender from a child
    process that loads and runs the model."""
    pytest.importorskip("diffusers")
    json_path = tmp_path / "t.json"
    cmd = [sys.executable, RUN, "--quick", "--tiny", "--device", "cpu", "--op", "transformer", "--op", "vae",
           "--op", "pipeline", "--json", str(json_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "COGVX_BENCH_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(json_path.read_text())["rows"]
    kinds = {"transformer": ("block", "forward"), "vae": ("decode", "encode"), "pipeline": (None,)}
    assert {(row["op"], row["shape"].get("kind"), row["backend"]) for row in rows} == {
        (op, kind, who) for op, ks in kinds.items() for kind in ks for who in ("diffusers", "cogvx")}
    for row in rows:
        assert row["baseline"] == "diffusers" and row["speedup_vs_baseline"] > 0
        assert row["max_abs_diff_vs_baseline"] < 1e-4, row
        assert row["peak_mem_mib"] is not None and row["peak_mem_mib"] > 0


def test_conv_work_formulas():
    from benchmarks import causal_conv3d as bench

    s = dict(B=2, C_in=3, C_out=5, T=4, H=6, W=7, kernel=(3, 3, 3), halo=True)
    fwd = 2 * 2 * 5 * 4 * 6 * 7 * 3 * 27
    assert bench.flops(s, backward=False) == fwd
    assert bench.flops(s, backward=True) == 3 * fwd
    x, halo, w, b, out = 2 * 3 * 4 * 42, 2 * 3 * 2 * 42, 5 * 3 * 27, 5, 2 * 5 * 4 * 42
    assert bench.bytes_moved(s, torch.float32, backward=False) == 4 * (x + halo + w + b + out)
    assert bench.bytes_moved(s, torch.bfloat16, backward=False) == 2 * (x + halo + w + b + out)
    inputs = bench.make_inputs(s, "cpu", torch.float32, backward=True)
    assert inputs["grad_out"].shape == (2, 5, 4, 6, 7)
    grads = bench.forward_backward("reference", inputs)
    assert [g.shape for g in grads] == [inputs[k].shape for k in ("x", "weight", "bias", "halo")]


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu_set", "gpu_set"])  # no GPU needed
def test_shape_sets(device):
    from benchmarks import causal_conv3d as bench

    full, quick = bench.shapes(device, quick=False), bench.shapes(device, quick=True)
    assert 1 <= len(quick) <= 2 and all(q in full for q in quick)
    assert any(s["halo"] for s in full) and any(not s["halo"] for s in full)
    if device == "cuda":  # the real CogVideoX decoder stages for 480x720 video
        assert {(s["C_in"], s["H"], s["W"]) for s in full} == {
            (512, 60, 90), (512, 120, 180), (256, 240, 360), (128, 480, 720)}
    else:
        from benchmarks.run import shape_set

        assert "scaled-down" in shape_set(bench, device, quick=False, tiny=False)


def test_gpu_peaks():
    from benchmarks.run import gpu_peak

    assert gpu_peak("NVIDIA H200")["hbm_gbps"] == 4800
    assert gpu_peak("NVIDIA H100 80GB HBM3") == dict(matched="H100 SXM", bf16_dense_tflops=989.0, hbm_gbps=3350.0)
    assert gpu_peak("NVIDIA A100-SXM4-80GB")["bf16_dense_tflops"] == 312
    assert gpu_peak("NVIDIA H100 PCIe") is None
    assert gpu_peak("NVIDIA GeForce RTX 4090") is None and gpu_peak(None) is None


def test_time_interleaved():
    from benchmarks.run import time_interleaved

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_interleaved(fns, torch.device("cpu"), warmup=1, min_reps=3, max_reps=4, target_s=1e-12)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then alternating rounds


@pytest.mark.slow
def test_distributed_benchmark_runs_and_measures_the_formulas_bytes(tmp_path):
    """`run.py --distributed --tiny` on CPU: one rank, then 2 ranks per plan (gloo); every rank's
    measured bytes equal cogvx.parallel.cost.traffic's, and the sequence plans send something."""
    path = tmp_path / "dist.json"
    r = subprocess.run([sys.executable, RUN, "--distributed", "--tiny", "--device", "cpu", "--json", str(path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads(path.read_text())
    plans = [row["plan"] for row in data["rows"] if row["world"] == 2]
    assert plans == ["cfg=2", "ulysses=2", "ring=2"]
    for row in data["rows"]:
        assert row["median_ms"] > 0 and row["speedup"] > 0
        if row["world"] == 2:
            assert row["sent"] == row["formula"] and all(s > 0 for s in row["sent"]), row
    assert "measured / formula" in r.stdout


def test_cli_benchmark_times_fresh_processes_of_the_default_command(tmp_path):
    """`run.py --cli --tiny`: two fresh `cogvx generate` runs with the embedded model's own settings
    and two of --help, first apart from the repeats, with the command's stage timings."""
    path = tmp_path / "cli.json"
    r = subprocess.run([sys.executable, RUN, "--cli", "--tiny", "--json", str(path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads(path.read_text())
    g, h = data["generate"], data["help"]
    assert len(g["repeats_s"]) == len(h["repeats_s"]) == 1 and data["threads"] == 1
    assert g["first_s"] > sum(g["stages_first_s"].values()) > 0  # the wall includes imports
    assert {"load", "denoise", "decode", "write"} <= set(g["stages_first_s"])
    assert 0 < h["first_s"] < g["first_s"] and "fps" in data["settings"]
    assert "first run" in r.stdout and "--help" in r.stdout


def test_rope_vs_sincos_ablation_writes_its_curves_and_verdict(tmp_path):
    """The ablation script end to end at a toy budget (the real run: README)."""
    from benchmarks import ablation_rope_vs_sincos as ablation

    out = tmp_path / "ablation"
    assert ablation.main(["--steps", "3", "--clips", "4", "--held-out", "1", "--window", "2",
                          "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    header = out.with_suffix(".csv").read_text().splitlines()
    assert header[0] == "step,3D-RoPE mean,3D-RoPE std,3D sin-cos mean,3D sin-cos std" and len(header) == 4
    summary = json.loads(out.with_suffix(".json").read_text())
    assert {len(v["runs"]) for v in summary["held_out_loss"].values()} == {3}
    assert summary["rope_minus_sincos"] == pytest.approx(
        summary["held_out_loss"]["3D-RoPE"]["mean"] - summary["held_out_loss"]["3D sin-cos"]["mean"])
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("contender", ["cogvx", "diffusers"])
def test_saved_activations_counted_on_meta_equal_a_real_run(contender, monkeypatch):
    """benchmarks/vae_train_activations.py counts what autograd saves on the meta device; the same
    step run on CPU tensors saves the same bytes (cogvx on its reference conv, which is what runs on
    meta; diffusers as it is)."""
    if contender == "diffusers":
        pytest.importorskip("diffusers")
    from benchmarks import vae_train, vae_train_activations as acts

    monkeypatch.setenv("COGVX_BACKEND", "reference")
    shape = dict(model="tiny", B=1, F=5, H=16, W=16)
    video, noise = torch.rand(1, 3, 5, 16, 16) * 2 - 1, torch.randn(1, 4, 2, 2, 2)
    if contender == "cogvx":
        import cogvx
        vae = cogvx.CausalVAE(vae_train.config(shape), chunking="whole")
    else:
        vae = vae_train._diffusers_class()(**vae_train.config(shape))
    vae.train()
    on_cpu = acts.saved_bytes(vae, lambda: vae_train._autoencode(contender, vae, video, noise))
    assert on_cpu > 0
    assert acts.count(contender, "tiny", 5, 16, torch.float32) == on_cpu


def test_saved_activations_script_reports_both_and_refuses_bad_sizes():
    pytest.importorskip("diffusers")
    script = os.path.join(ROOT, "benchmarks", "vae_train_activations.py")
    r = subprocess.run([sys.executable, script, "--model", "tiny", "--frames", "5", "--size", "16"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "diffusers" in r.stdout and "cogvx" in r.stdout and "(1.00×)" in r.stdout
    assert "Warning" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, script, "--frames", "6"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "--frames must be 1 + 4k; got 6" in r.stderr

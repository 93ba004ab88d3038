"""Multi-rank inference (cogvx.parallel) with gloo on CPU: every scheme and their combinations give
what one process gives — the transformer's output on tiny random models of each variant, the
pipeline's latents after a few denoising steps and the decoded video (one process with the VAE's
"whole" chunking) — the CLI under torchrun writes one video equal to the one-process one, bad splits
are refused before anything loads, and a rank killed mid-run ends the others with an error naming it
instead of a hang.

Tolerances (fp32), relative to the largest magnitude of the expected tensor: transformer outputs
1e-5 (the ring merges partial attentions in another order, CFG runs half batches; seen: up to 3e-7,
Ulysses bit-exact); latents after 3 denoising steps and the decoded video 1e-4 (the context-parallel
GroupNorm statistics are merged in float64, one process sums in fp32; seen: latents 2e-6, video 4e-5).
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.models import Transformer3D
from cogvx.parallel import ParallelPlan, PlanError, local_rope_tables, token_split, vae_ranks
from cogvx.pipeline import Pipeline
from cogvx.tiny import build
from parity import assert_close

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRANSFORMER_TOL = (0.0, 1e-5)
PIPELINE_TOL = (0.0, 1e-4)
TEXT_LEN, TEXT_DIM = 7, 16

VARIANTS = {  # what each CogVideoX checkpoint's config switches on, in miniature
    "2b": dict(),                                                                    # 3D sin-cos positions
    "5b": dict(use_rotary_positional_embeddings=True),                               # 3D-RoPE
    "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, in_channels=8),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2),              # temporal patches
}


def tiny_transformer(folder: Path, variant: str, heads: int) -> Path:
    """A random Transformer3D (LayerNorm affines and the learned table random too) saved to folder."""
    torch.manual_seed(len(variant) + heads)
    config = dict(num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
                  text_embed_dim=TEXT_DIM, num_layers=2, sample_width=12, sample_height=8, sample_frames=9,
                  patch_size=2, max_text_seq_length=TEXT_LEN)
    config.update(VARIANTS[variant])
    model = Transformer3D(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "linear" not in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
        if config.get("use_learned_positional_embeddings"):
            model.patch_embed.pos_embedding.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder


def model_inputs(variant: str, frames: int, height: int, width: int, seed: int) -> dict:
    """Batch 2 (as the guided pipeline: [unconditional; conditional]), distinct timesteps."""
    g = torch.Generator().manual_seed(seed)
    channels = VARIANTS[variant].get("in_channels", 4)
    return dict(latents=torch.randn(2, frames, channels, height, width, generator=g),
                text_embeddings=torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g), timestep=torch.tensor([999, 500]))


# (variant, heads, latent frames, height, width): video tokens (frames / p_t)·(h/2)·(w/2)
SHAPES = {
    "5b": ("5b", 4, 3, 10, 6),        # 45 tokens: uneven over 2 and 4 ranks (23/22, 12/11/11/11)
    "2b": ("2b", 4, 3, 10, 6),
    "5b-i2v": ("5b-i2v", 4, 3, 8, 12),  # its learned table's native size: 72 tokens
    "1.5": ("1.5", 4, 6, 6, 10),        # 3 temporal patches of 3×5: 45 tokens
}
TRANSFORMER_CASES = {  # world -> [(shape, plan)]
    2: [("5b", "ulysses=2"), ("5b", "ring=2"), ("5b", "cfg=2"), ("2b", "ring=2"), ("2b", "ulysses=2"),
        ("5b-i2v", "ulysses=2"), ("1.5", "ring=2")],
    4: [("5b", "ulysses=4"), ("5b", "ring=4"), ("5b", "ulysses=2,ring=2"), ("5b", "cfg=2,ulysses=2"),
        ("1.5", "cfg=2,ring=2")],
}
PIPELINE_CALL = dict(num_frames=9, height=64, width=96, num_inference_steps=3, guidance_scale=6.0)
PIPELINE_CASES = {  # world -> {name: (plan, call changes)}
    2: {"t2v cfg=2": ("cfg=2", {}), "t2v ulysses=2": ("ulysses=2", {}), "t2v ring=2": ("ring=2", {}),
        "v2v cfg=2": ("cfg=2", dict(video=True, strength=0.7))},
    4: {"t2v cfg=2,ulysses=2, 17 frames": ("cfg=2,ulysses=2", dict(num_frames=17))},
}


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), **extra}


def _torchrun(world: int, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env())


def _video_frames(seed: int = 5) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(9)]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("parallel") / "pipe")


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def ran(request, tmp_path_factory, pipeline_folder):
    """One torchrun per world size for all its cases: (world, inputs, per-rank results)."""
    world, tmp = request.param, tmp_path_factory.mktemp(f"parallel-{request.param}")
    folders = {}
    inputs = dict(transformer={}, pipeline={})
    for shape, plan in TRANSFORMER_CASES[world]:
        variant, heads, frames, height, width = SHAPES[shape]
        if shape not in folders:
            folders[shape] = tiny_transformer(tmp / shape, variant, heads)
        case_inputs = model_inputs(variant, frames, height, width, seed=len(inputs["transformer"]))
        if variant == "1.5-i2v":
            case_inputs["ofs"] = torch.tensor([2.0])
        inputs["transformer"][f"{shape} {plan}"] = dict(folder=str(folders[shape]), plan=plan, inputs=case_inputs)
    for name, (plan, change) in PIPELINE_CASES[world].items():
        call = {**PIPELINE_CALL, **change}
        if call.pop("video", False):
            call["video"] = _video_frames()
            call.pop("num_frames")
        inputs["pipeline"][name] = dict(folder=str(pipeline_folder), plan=plan, prompt=["a red cat walking"],
                                        seed=3, call=call)
    torch.save(inputs, tmp / "inputs.pt")
    r = _torchrun(world, HERE / "parallel_worker.py", tmp / "inputs.pt", tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return world, inputs, [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


# ---- the transformer ------------------------------------------------------------------------------

@pytest.mark.slow
def test_transformer_output_equals_one_process(ran):
    """Ulysses, ring and CFG parallelism alone (2 ranks) and combined (4 ranks: ulysses×ring,
    cfg×ulysses, cfg×ring), on 2B (sin-cos positions), 5B (RoPE), 5B-I2V (learned table) and 1.5
    (temporal patches), with video tokens that do not split evenly: every rank gets the one-process
    output within 1e-5 of its magnitude."""
    world, inputs, results = ran
    for name, case in inputs["transformer"].items():
        model = Transformer3D.from_pretrained(case["folder"])
        with torch.no_grad():
            expected = model(**case["inputs"])
        for rank in range(world):
            assert_close(results[rank][name]["out"], expected, TRANSFORMER_TOL, f"{name}: rank {rank}")


@pytest.mark.slow
def test_bytes_sent_match_the_formula(ran):
    """The bytes each rank sent in a transformer call (all-to-alls, ring sends, the final gather;
    measured by wrapping the collectives) equal cogvx.parallel.cost.traffic, the formula of
    docs/parallelism.md, for that rank's slice (fp32: 4 bytes a value)."""
    from cogvx.parallel.cost import ModelShape, traffic

    world, inputs, results = ran
    for name, case in inputs["transformer"].items():
        model = Transformer3D.from_pretrained(case["folder"])
        c, latents = model.config, case["inputs"]["latents"]
        tokens = latents.shape[1] // (c.patch_size_t or 1) * (latents.shape[3] // 2) * (latents.shape[4] // 2)
        shape = ModelShape("tiny", c.num_layers, c.num_attention_heads, c.attention_head_dim, tokens, TEXT_LEN,
                           patch_values=c.patch_size ** 2 * (c.patch_size_t or 1) * c.output_channels)
        for rank in range(world):
            expected = traffic(case["plan"], shape, guided=True, itemsize=4, rank=rank)
            sent = results[rank][name]["sent"]
            assert {k: sent[k] for k in ("ulysses", "ring", "gather")} == \
                {k: expected[k] for k in ("ulysses", "ring", "gather")}, (name, rank)
            assert sent["ulysses"] > 0 or "ulysses" not in case["plan"], (name, rank)
            assert sent["ring"] > 0 or "ring" not in case["plan"], (name, rank)


@pytest.mark.slow
def test_pipeline_latents_and_video_equal_one_process(ran):
    """Seeded pipeline runs (DPM, guidance 6, 3 steps; video-to-video encodes context parallel): the
    latents and the decoded video of every rank equal one process's with the VAE's "whole" chunking;
    4 ranks: the VAE splits 5 latent frames over 3 ranks (the most its frame split allows) and the
    fourth gets the video by broadcast."""
    world, inputs, results = ran
    for name, case in inputs["pipeline"].items():
        pipe = Pipeline.from_pretrained(case["folder"], dtype=torch.float32)
        pipe.vae.set_chunking("whole")
        if "video" in case["call"]:
            pipe._encoder().set_chunking("whole")
        latents = pipe(case["prompt"], generator=torch.Generator().manual_seed(case["seed"]), output_type="latent",
                       progress=False, **case["call"]).frames
        video = pipe.decode(latents)
        for rank in range(world):
            assert_close(results[rank][name]["latents"], latents, PIPELINE_TOL, f"{name}: rank {rank} latents")
            assert_close(results[rank][name]["video"], video, PIPELINE_TOL, f"{name}: rank {rank} video")


def test_token_split_and_local_rope_tables():
    """Slices are contiguous and balanced to one token; a slice's rotary tables are the rows of the
    whole grid's (the per-axis tables gathered), so RoPE per slice is RoPE of the whole."""
    assert token_split(45, 4) == [12, 11, 11, 11] and token_split(8, 2) == [4, 4]
    with pytest.raises(ValueError, match="3 video tokens cannot be split over 4"):
        token_split(3, 4)
    from cogvx_kernels.reference.rope3d import token_cos_sin

    positions = (torch.linspace(0, 2.5, 3), torch.arange(5.0) + 0.25, torch.arange(4.0))
    cos, sin = token_cos_sin(*positions, (4, 6, 6), 10000.0)
    for start, end in [(0, 60), (7, 23), (59, 60)]:
        local_cos, local_sin = local_rope_tables(positions, (4, 6, 6), 10000.0, start, end)
        torch.testing.assert_close(local_cos, cos[start:end], rtol=0, atol=1e-6)
        torch.testing.assert_close(local_sin, sin[start:end], rtol=0, atol=1e-6)


def test_vae_ranks():
    """The VAE shares a pass over the most ranks its frame split allows (every rank after the first
    at least two latent frames)."""
    assert vae_ranks(13, 8) == 7 and vae_ranks(13, 2) == 2 and vae_ranks(5, 4) == 3
    assert vae_ranks(3, 4) == 2 and vae_ranks(1, 4) == 1 and vae_ranks(2, 2) == 1


# ---- plans: parsing and refusals ------------------------------------------------------------------

def test_plan_parsing_and_checks():
    assert ParallelPlan.parse("cfg=2,ulysses=2,ring=1") == ParallelPlan(cfg=2, ulysses=2, ring=1)
    assert ParallelPlan.parse(" ring=4 ") == ParallelPlan(ring=4) and ParallelPlan.parse(None).world == 1
    for text, message in [("cfg=3", "cfg must be 1 or 2"), ("ulysses=0", "positive integer; got 0"),
                          ("tp=2", "unknown key 'tp'"), ("ulysses", "not key=value"), ("ring=2,ring=2", "given twice"),
                          ("ring=two", "positive integer; got 'two'")]:
        with pytest.raises(PlanError, match=message):
            ParallelPlan.parse(text)
    plan = ParallelPlan.parse("cfg=2,ulysses=2")
    assert plan.problems(world=4, heads=30, guided=True, video_tokens=100) == []
    for kwargs, message in [(dict(world=8), "= 4 must equal the world size 8"),
                            (dict(world=4, heads=3), "ulysses=2 must divide the transformer's 3 attention heads"),
                            (dict(world=4, guided=False), "cfg=2 splits the guided and unguided branches"),
                            (dict(world=4, video_tokens=1), "1 video tokens cannot be split")]:
        with pytest.raises(PlanError, match=message):
            plan.check(**kwargs)


def _launch(world: int, args: list, env: dict, stderr=None, program=("-m", "cogvx")) -> list[subprocess.Popen]:
    """`python -m cogvx ARGS` (or another program) as `world` ranks with torchrun's environment but
    no torchrun agent (its group kill would hide how each rank ends by itself). stderr: one file per
    rank, or pipes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stderr = stderr or [subprocess.PIPE] * world
    return [subprocess.Popen([sys.executable, *map(str, program), *map(str, args)], env={
        **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, text=True, stdout=subprocess.PIPE,
        stderr=stderr[rank]) for rank in range(world)]


FAST = ["--steps", "2", "--frames", "9", "--height", "32", "--width", "48", "--seed", "0", "--device", "cpu"]


@pytest.mark.parametrize("plan,extra,message", [
    ("ulysses=4", [], r"--parallel cfg=1,ulysses=4,ring=1: cfg × ulysses × ring = 4 must equal the world size 2"),
    ("ulysses=2", ["--model", "THREE_HEADS"], r"ulysses=2 must divide the transformer's 3 attention heads"),
    ("cfg=2", ["--guidance", "1"], r"cfg=2 splits the guided and unguided branches, but guidance is off"),
    ("cfg=2,tp=2", [], r"--parallel: unknown key 'tp'"),
], ids=["product", "heads", "cfg-without-guidance", "unknown-key"])
def test_invalid_splits_are_refused_before_loading(tmp_path, plan, extra, message):
    """Two ranks with a bad --parallel: exit status 2 on both, one `cogvx: error:` line from rank 0,
    none from rank 1, nothing written. The model folder's weights are unreadable: the refusal came
    before any load."""
    folder = tmp_path / "model"
    build(folder, transformer=dict(num_attention_heads=3, attention_head_dim=16) if "THREE_HEADS" in extra else None)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    args = ["generate", "--prompt", "a cat", *FAST, "--model", folder, "--parallel", plan, "--out",
            tmp_path / "out.mp4", *[a for a in extra if a not in ("--model", "THREE_HEADS")]]
    ranks = _launch(2, args, _env())
    outs = [p.communicate(timeout=300) for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], outs
    lines = outs[0][1].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cogvx: error: "), outs[0][1]
    assert re.search(message, lines[0]), lines[0]
    assert outs[1][1].strip() == "", outs[1][1]
    assert not (tmp_path / "out.mp4").exists()


# ---- the command line -----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_under_torchrun_writes_one_file_equal_to_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m cogvx generate --parallel cfg=2 --device cpu`: rank 0 alone
    writes the PNG frames (lossless, so they can be compared), equal to the one-process command's
    within one level of 255 (fp32 differences ~1e-6 may round a value the other way) and identical
    on all but a few values. 9 frames: the one-process decode is a single chunk, as "whole"."""
    single = subprocess.run([sys.executable, "-m", "cogvx", "generate", "--prompt", "a red cat", *FAST, "--out",
                             tmp_path / "single"], capture_output=True, text=True, timeout=600, env=_env())
    assert single.returncode == 0, single.stderr
    out = tmp_path / "runs"
    out.mkdir()
    r = _torchrun(2, "-m", "cogvx", "generate", "--prompt", "a red cat", *FAST, "--parallel", "cfg=2",
                  "--out", out / "parallel")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert [p.name for p in out.iterdir()] == ["parallel"] and r.stdout.count("wrote ") == 1, r.stdout
    from PIL import Image

    frames = sorted((out / "parallel").glob("frame_*.png"))
    assert [p.name for p in frames] == sorted(p.name for p in (tmp_path / "single").glob("frame_*.png"))
    got = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in frames])
    want = np.stack([np.asarray(Image.open(tmp_path / "single" / p.name), dtype=np.int16) for p in frames])
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0], ids=["rank-1", "rank-0-the-store-host"])
def test_a_killed_rank_ends_the_others_with_an_error_naming_it(tmp_path, killed):
    """Two ranks (ring=2) of a long CLI run (plain env:// launch: rank 0 holds the rendezvous
    store); one is killed (SIGKILL) once denoising has begun. The other must exit with status 1 well
    within the collectives' timeout (COGVX_DIST_TIMEOUT=60), naming the killed rank, and nothing is
    written."""
    args = ["generate", "--prompt", "a cat", "--steps", "400", "--frames", "9", "--height", "32", "--width", "48",
            "--seed", "0", "--device", "cpu", "--parallel", "ring=2", "--out", tmp_path / "out.mp4"]
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]
    ranks = _launch(2, args, _env(COGVX_DIST_TIMEOUT="60"), stderr=logs)
    survivor = 1 - killed
    try:
        deadline = time.monotonic() + 300
        while "denoising" not in (tmp_path / "rank0.log").read_text():  # tqdm's bar: the steps have begun
            assert ranks[0].poll() is None and time.monotonic() < deadline, (tmp_path / "rank0.log").read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        ranks[killed].send_signal(signal.SIGKILL)
        start = time.monotonic()
        ranks[survivor].wait(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    stderr = (tmp_path / f"rank{survivor}.log").read_text()
    assert ranks[survivor].returncode == 1, stderr[-3000:]
    assert elapsed < 30, f"rank {survivor} took {elapsed:.1f} s to stop"
    last = stderr.strip().splitlines()[-1]
    expected = ("cogvx: error: rank 1 stopped responding" if killed == 1
                else "cogvx: error: the rendezvous store is unreachable: rank 0 (its host) is gone")
    assert last.startswith(expected) and f"rank {survivor} stops" in last, last
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_a_failing_or_stuck_rank_ends_every_rank(mode):
    """Under FailureGuard, rank 1 raises (it reports and exits 1 with a traceback and a line naming
    itself; rank 0 stops at once, naming it) or stalls while alive (rank 0's all-reduce times out
    after COGVX_DIST_TIMEOUT=4 s; it says so and reports, and the stalled rank's heartbeat thread ends
    it): both ranks exit 1, neither hangs."""
    ranks = _launch(2, [mode], _env(COGVX_DIST_TIMEOUT="4"), program=[HERE / "failure_worker.py"])
    start = time.monotonic()
    try:
        outs = [p.communicate(timeout=60) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert time.monotonic() - start < 40
    assert [p.returncode for p in ranks] == [1, 1], outs
    last = [err.strip().splitlines()[-1] for _, err in outs]
    if mode == "raise":
        assert last[1] == "cogvx: error: rank 1 failed: boom at step 3" and "Traceback" in outs[1][1], outs[1][1]
        assert last[0].startswith("cogvx: error: rank 1 failed: boom at step 3; rank 0 stops"), last[0]
    else:
        assert last[0].startswith("cogvx: error: rank 0 failed: a collective timed out or broke while every rank was "
                                  "alive") and "rank 0 stops" in last[0], last[0]
        assert last[1].startswith("cogvx: error: rank 0 failed: a collective timed out") and "rank 1 stops" in last[1]

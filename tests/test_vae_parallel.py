"""Context-parallel VAE (cogvx.parallel.vae) under torchrun with gloo: 2 and 4 ranks give what one
process gives with the whole video as one chunk (inference, and a training step's loss and
gradients with each rank holding only its own frames); the frame split rules."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cogvx.models.vae import CausalVAE
from cogvx.parallel.vae import latent_counts
from cogvx_kernels.nn import CausalConv3d
from parity import assert_close

pytest.importorskip("diffusers")
from test_vae import tiny_vae  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_latent_counts():
    assert latent_counts(13, 2) == [7, 6]
    assert latent_counts(9, 4) == [3, 2, 2, 2]
    assert latent_counts(4, 2) == [2, 2] and latent_counts(3, 2) == [1, 2]
    for total in range(1, 20):
        for world in range(1, 5):
            try:
                counts = latent_counts(total, world)
            except ValueError:
                continue
            assert sum(counts) == total and counts[0] % 2 == total % 2 and counts[0] >= 1
            assert all(n >= 2 and n % 2 == 0 for n in counts[1:])
    with pytest.raises(ValueError, match="cannot be split over 2 ranks"):
        latent_counts(2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("world,latent_frames,slice_elements", [(2, 9, None), (4, 9, None), (2, 3, None), (2, 9, 1)],
                         ids=["2-ranks", "4-ranks", "2-ranks-rank0-one-frame", "2-ranks-frame-slices"])
def test_context_parallel_equals_one_process(tmp_path, world, latent_frames, slice_elements):
    """(2, 3): rank 0 holds a single (latent / video) frame, fewer than a conv's history, so the
    history it passes on includes the frames it received. Frame slices: every layer on every rank a
    frame at a time (the history is sent before the first slice)."""
    tiny_vae().save_pretrained(tmp_path / "vae")
    g = torch.Generator().manual_seed(world)
    video = torch.randn(2, 3, 1 + 4 * (latent_frames - 1), 16, 24, generator=g)
    latents = torch.randn(2, 4, latent_frames, 2, 3, generator=g)
    torch.save(dict(video=video, latents=latents), tmp_path / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.join(HERE, "vae_cp_worker.py"), str(tmp_path / "vae"), str(tmp_path / "inputs.pt"), str(tmp_path)]
    cmd += [] if slice_elements is None else [str(slice_elements)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    whole = CausalVAE.from_pretrained(tmp_path / "vae", chunking="whole")
    with torch.no_grad():
        posterior, frames = whole.encode(video), whole.decode(latents)
    assert frames.shape[2] == 1 + 4 * (latent_frames - 1)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(got["mean"], posterior.mean, (0.0, 1e-4), f"rank {rank} mean")
        assert_close(got["logvar"], posterior.logvar, (0.0, 1e-4), f"rank {rank} logvar")
        assert_close(got["frames"], frames, (0.0, 1e-4), f"rank {rank} frames")


# ---- training: each rank only its own frames, gradients as one process -----------------------

GRAD_TOL = (0.0, 1e-4)  # fp32: max |error| of a gradient within 1e-4 of its largest magnitude
KL_WEIGHT = 0.05
TRAIN_CASES = {  # world -> {name: (video frames, batch, gradient checkpointing)}
    2: {"17-frames": (17, 2, False), "9-frames-rank0-one-frame": (9, 1, False), "9-frames-checkpointing": (9, 1, True)},
    4: {"25-frames": (25, 1, False)},
}
CONV_COUNTS = {2: [3, 4], 4: [3, 1, 1, 2]}  # any split: ranks 1, 2 of 4 hold fewer frames than a conv's history
BAD_SPLITS = {2: ([(0, 5), (5, 9)], [(0, 2), (2, 3)]),  # (video, latent) frame ranges per rank
              4: ([(0, 5), (5, 9), (9, 17), (17, 25)], [(0, 2), (2, 3), (3, 5), (5, 7)])}


def _train_inputs(world):
    g = torch.Generator().manual_seed(100 + world)
    cases = {name: dict(kind="vae", video=torch.randn(batch, 3, frames, 16, 24, generator=g).clamp(-1, 1),
                        seed=world, kl_weight=KL_WEIGHT, checkpointing=checkpointing)
             for name, (frames, batch, checkpointing) in TRAIN_CASES[world].items()}
    torch.manual_seed(world)
    convs = torch.nn.ModuleList([CausalConv3d(4, 4, 3), CausalConv3d(4, 4, (2, 3, 3))])
    frames = sum(CONV_COUNTS[world])
    cases["convs"] = dict(kind="convs", x=torch.randn(2, 4, frames, 5, 6, generator=g),
                          weight=torch.randn(2, 4, frames, 5, 6, generator=g), counts=CONV_COUNTS[world],
                          state=convs.state_dict())
    # rank 0 two latent frames (5 video frames), rank 1 one (4): not local_frames' split
    video_bounds, latent_bounds = BAD_SPLITS[world]
    cases["bad_split"] = dict(kind="bad_split", video=torch.zeros(1, 3, video_bounds[-1][1], 16, 24),
                              video_bounds=video_bounds, latents=torch.zeros(1, 4, latent_bounds[-1][1], 2, 3),
                              latent_bounds=latent_bounds)
    return cases


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def trained(request, tmp_path_factory):
    """One torchrun per world size for all its cases: (world, inputs, folder, per-rank results)."""
    world, tmp = request.param, tmp_path_factory.mktemp(f"cp-train-{request.param}")
    tiny_vae().save_pretrained(tmp / "vae")
    inputs = _train_inputs(world)
    torch.save(inputs, tmp / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.join(HERE, "vae_cp_train_worker.py"), str(tmp / "vae"), str(tmp / "inputs.pt"), str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return world, inputs, tmp / "vae", [torch.load(tmp / f"rank{rank}.pt") for rank in range(world)]


def _one_process_step(folder, case):
    """The same step in one process with the whole clip as one chunk: loss, d loss/d video, grads."""
    vae = CausalVAE.from_pretrained(folder, chunking="whole")
    video = case["video"].clone().requires_grad_()
    posterior = vae.encode(video)
    reconstruction = vae.decode(posterior.sample(torch.Generator().manual_seed(case["seed"])))
    loss = F.mse_loss(reconstruction, video) + case["kl_weight"] * posterior.kl().mean()
    loss.backward()
    return loss.detach(), video.grad, {n: p.grad for n, p in vae.named_parameters()}


@pytest.mark.slow
def test_training_step_equals_one_process(trained):
    """Each rank encodes, samples and decodes only its own frames; the ranks' losses add up to the
    one-process loss, each rank's input gradient is the slice of the one-process one (the halo
    gradients reached the ranks owning those frames: the first frames of every rank but the last get
    gradient from the next rank's convs), and after sum_gradients every rank holds every parameter's
    one-process gradient (encoder and decoder), within fp32 tolerance. Cases: rank 0 holding a single
    frame (fewer than a conv's history), gradient checkpointing per ResNet block (the rerun
    exchanges again), 4 ranks."""
    world, inputs, folder, results = trained
    for name in TRAIN_CASES[world]:
        case = inputs[name]
        loss, video_grad, grads = _one_process_step(folder, case)
        assert_close(sum(r[name]["loss"] for r in results), loss, (0.0, 1e-5), f"{name}: summed loss")
        bounds = [(0, 1 + 4 * (latent_counts(1 + (case["video"].shape[2] - 1) // 4, world)[0] - 1))]
        for n in latent_counts(1 + (case["video"].shape[2] - 1) // 4, world)[1:]:
            bounds.append((bounds[-1][1], bounds[-1][1] + 4 * n))
        assert bounds[-1][1] == case["video"].shape[2]
        for rank, (start, end) in enumerate(bounds):
            got = results[rank][name]
            assert_close(got["video_grad"], video_grad[:, :, start:end], GRAD_TOL, f"{name}: rank {rank} d loss/d video")
            assert got["grads"].keys() == grads.keys()
            for param, grad in grads.items():
                assert grad is not None and grad.abs().max() > 0, f"{name}: {param} got no gradient"
                assert_close(got["grads"][param], grad, GRAD_TOL, f"{name}: rank {rank} grad of {param}")


@pytest.mark.slow
def test_halo_gradients_with_any_split(trained):
    """Two causal convs (kt = 3, then kt = 2) over frame slices of any sizes, ranks holding fewer
    frames than a conv's history included (their history passes on received frames, and so does the
    gradient coming back): input and weight gradients equal one process's. sum_gradients: a parameter
    with a gradient on rank 0 only gets it on every rank; one without any keeps None."""
    world, inputs, _, results = trained
    case = inputs["convs"]
    convs = torch.nn.ModuleList([CausalConv3d(4, 4, 3), CausalConv3d(4, 4, (2, 3, 3))])
    convs.load_state_dict(case["state"])
    x = case["x"].clone().requires_grad_()
    (convs[1](F.silu(convs[0](x)[0]))[0] * case["weight"]).sum().backward()
    start = 0
    for rank, n in enumerate(case["counts"]):
        got = results[rank]["convs"]
        assert_close(got["video_grad"], x.grad[:, :, start:start + n], GRAD_TOL, f"rank {rank} d loss/d x")
        for param, p in convs.named_parameters():
            assert_close(got["grads"]["convs." + param], p.grad, GRAD_TOL, f"rank {rank} grad of {param}")
        assert got["grads"]["rank0_only"] == 1.5 and got["grads"]["unused"] is None  # sum_gradients' edge cases
        start += n


@pytest.mark.slow
def test_training_slices_other_than_local_frames_are_refused(trained):
    """encode_local / decode_local given another split than local_frames' (rank 0 two latent frames,
    rank 1 one: an odd count after rank 0 breaks the time pairs) stop on every rank with an error
    naming the split to use."""
    world, _, _, results = trained
    video, latents = ([end - start for start, end in bounds] for bounds in BAD_SPLITS[world])
    for rank in range(world):
        errors = results[rank]["bad_split"]
        assert f"the ranks hold {video} frames" in errors["encode"], errors
        assert f"{latent_counts(sum(latents), world)} latent frames" in errors["encode"], errors
        assert f"the ranks hold {latents} frames" in errors["decode"] and "local_frames" in errors["decode"], errors

"""Context-parallel VAE (cogvx.parallel.vae) under torchrun with gloo: 2 and 4 ranks give what one
process gives with the whole video as one chunk; the frame split rules."""
import os
import subprocess
import sys

import pytest
import torch

from cogvx.models.vae import CausalVAE
from cogvx.parallel.vae import latent_counts
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

"""The `cogvx` command line as users run it (a subprocess): generate with the embedded model writes
a playable mp4 atomically, --seed reproduces the Python API, bad input is one line on stderr with
exit status 2 and nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--frames", "9", "--height", "32", "--width", "48"]


def cogvx(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "cogvx", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_generate_with_the_embedded_model_writes_an_mp4_equal_to_the_python_api(tmp_path):
    import imageio.v3 as iio

    from cogvx.cli import DEFAULT_MODEL
    from cogvx.pipeline import Pipeline

    out = tmp_path / "cat.mp4"
    r = cogvx("generate", "--prompt", "a red cat walking", "--seed", "3", "--dtype", "fp32", *FAST, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "denoise" in r.stdout and "decode" in r.stdout
    assert "random weights" in r.stderr  # the embedded model says what it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.mp4"]  # no temporary file left
    video = iio.imread(out)
    assert video.shape == (9, 32, 48, 3)
    expected = Pipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)(
        "a red cat walking", num_inference_steps=2, num_frames=9, height=32, width=48,
        generator=torch.Generator("cpu").manual_seed(3), progress=False).frames[0]
    # the mp4 is lossy (yuv420p, x264): compare coarsely, against another seed as the control
    err = np.abs(video.astype(np.float64) / 255 - expected).mean()
    other = Pipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)(
        "a red cat walking", num_inference_steps=2, num_frames=9, height=32, width=48,
        generator=torch.Generator("cpu").manual_seed(4), progress=False).frames[0]
    assert err < 0.5 * np.abs(other - expected).mean(), err


def test_png_frames_gif_and_video_to_video(tmp_path):
    assert cogvx("generate", "--prompt", "a dog", *FAST, "--out", str(tmp_path / "frames")).returncode == 0
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == 9
    assert cogvx("generate", "--prompt", "a dog", *FAST, "--out", str(tmp_path / "dog.gif")).returncode == 0
    assert (tmp_path / "dog.gif").read_bytes()[:6] == b"GIF89a"
    r = cogvx("generate", "--prompt", "a dog running", "--video", str(tmp_path / "dog.gif"), "--strength", "0.5",
              "--steps", "2", "--height", "32", "--width", "48", "--out", str(tmp_path / "v2v.mp4"))
    assert r.returncode == 0, r.stderr
    assert "9 frames" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--frames", "6"], r"num_frames must be 1 \+ 4·k"),
    (["--height", "40"], "multiples of 16"),
    (["--steps", "0"], "num_inference_steps must be positive"),
    (["--guidance", "0.5", "--negative-prompt", "ugly"], "guidance_scale 0.5 < 1"),
    (["--model", "/nonexistent"], "is not a CogVideoX pipeline folder"),
    (["--out", "/nonexistent/dir/out.mp4"], "cannot write to /nonexistent/dir"),
    (["--out", "video.avi"], "--out must end in .mp4 or .gif"),
    (["--image", "/nonexistent.png"], "cannot read image /nonexistent.png"),
    (["--video", "/nonexistent.mp4"], "cannot read video /nonexistent.mp4"),
    (["--image", "/etc/hostname"], "cannot read image /etc/hostname"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    r = cogvx("generate", "--prompt", "a cat", *FAST, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cogvx: error:") and __import__("re").search(message, last), last
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_info_reports_versions_and_backends():
    r = cogvx("info")
    assert r.returncode == 0, r.stderr
    assert '"torch"' in r.stdout and '"cogvx"' in r.stdout


def test_image_to_video_from_the_command_line(tmp_path):
    from PIL import Image

    from cogvx.tiny import build

    folder = build(tmp_path / "i2v", variant="i2v-1.5")
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)).save(tmp_path / "first.png")
    out = tmp_path / "i2v.mp4"
    r = cogvx("generate", "--model", str(folder), "--prompt", "a cat", "--image", str(tmp_path / "first.png"),
              "--steps", "2", "--frames", "9", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "16 fps" in r.stdout  # CogVideoX 1.5's rate
    r = cogvx("generate", "--model", str(folder), "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "image-to-video checkpoint: pass image=" in r.stderr.strip().splitlines()[-1]


def test_png_output_into_an_existing_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "frames").mkdir()
    r = cogvx("generate", "--prompt", "a dog", *FAST, "--out", str(tmp_path / "frames"))
    assert r.returncode == 2 and "exists; choose another --out folder" in r.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"] and not any((tmp_path / "frames").iterdir())

"""The `cogvx` command line as users run it (a subprocess): generate with the embedded model writes
a playable mp4 atomically, --seed reproduces the Python API, bad input is one line on stderr with
exit status 2 and nothing written, checked before the model loads wherever it can be, SIGTERM
leaves nothing behind."""
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--frames", "9", "--height", "32", "--width", "48"]


def cogvx(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "cogvx", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600, errors="backslashreplace")


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_refused(returncode: int, stderr: str, message: str, folder: Path, before: list[str]) -> None:
    """Exit status 2, one `cogvx: error:` line matching `message` (other lines only notes and
    warnings), no traceback or usage block, and `folder` as it was (no temporary file left)."""
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("cogvx: error:") and re.search(message, lines[-1]), lines[-1]
    assert all(line.startswith(("note:", "warning:")) for line in lines[:-1]), stderr
    assert "Traceback" not in stderr and "usage:" not in stderr
    assert listing(folder) == before


def test_generate_with_the_embedded_model_writes_an_mp4_equal_to_the_python_api(tmp_path):
    import imageio.v3 as iio

    from cogvx.cli import DEFAULT_MODEL, model_card
    from cogvx.pipeline import Pipeline

    out = tmp_path / "cat.mp4"
    r = cogvx("generate", "--prompt", "a red cat walking", "--seed", "3", "--dtype", "fp32", *FAST, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "denoise" in r.stdout and "decode" in r.stdout
    assert [line for line in r.stderr.splitlines() if line.startswith("warning:")] == [
        "warning: not in the model's vocabulary, so ignored: cat, walking (it knows: a red green blue yellow square "
        "circle triangle moving left right up down)"]  # the embedded model's card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.mp4"]  # no temporary file left
    video = iio.imread(out)
    assert video.shape == (9, 32, 48, 3)
    guidance = model_card(DEFAULT_MODEL)["generate"]["guidance"]  # the CLI's default for this model
    expected = Pipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)(
        "a red cat walking", num_inference_steps=2, num_frames=9, height=32, width=48, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(3), progress=False).frames[0]
    # the mp4 is lossy (yuv420p, x264): compare coarsely, against another seed as the control
    err = np.abs(video.astype(np.float64) / 255 - expected).mean()
    other = Pipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)(
        "a red cat walking", num_inference_steps=2, num_frames=9, height=32, width=48, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(4), progress=False).frames[0]
    assert err < 0.5 * np.abs(other - expected).mean(), err


def test_png_frames_gif_and_video_to_video(tmp_path):
    assert cogvx("generate", "--prompt", "a blue circle", *FAST, "--out", str(tmp_path / "frames")).returncode == 0
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == 9
    assert cogvx("generate", "--prompt", "a blue circle", *FAST, "--out", str(tmp_path / "dog.gif")).returncode == 0
    assert (tmp_path / "dog.gif").read_bytes()[:6] == b"GIF89a"
    r = cogvx("generate", "--prompt", "a blue circle moving up", "--video", str(tmp_path / "dog.gif"), "--strength", "0.5",
              "--steps", "2", "--height", "32", "--width", "48", "--out", str(tmp_path / "v2v.mp4"))
    assert r.returncode == 0, r.stderr
    assert "9 frames" in r.stdout and "warning" not in r.stderr


# -- inputs made in the test's folder ----------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width × height pixels (no image data): PIL reads the size first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _mp4(path: Path, frames: int = 9) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, np.zeros((frames, 32, 48, 3), np.uint8), fps=8, codec="libx264")


def _truncated_mp4(path: Path) -> None:
    _mp4(path)
    path.write_bytes(path.read_bytes()[:300])


MAKE = {
    "afile": lambda d: (d / "afile").write_text("a regular file"),
    "o.mp4/": lambda d: (d / "o.mp4").mkdir(),
    "frames/": lambda d: (d / "frames").mkdir(),
    "bomb.png": lambda d: _png_header_only(d / "bomb.png", 100_000, 100_000),  # PIL: DecompressionBombError
    "big.png": lambda d: _png_header_only(d / "big.png", 10_000, 10_000),  # PIL: only a DecompressionBombWarning
    "cut.mp4": lambda d: _truncated_mp4(d / "cut.mp4"),
    "good.mp4": lambda d: _mp4(d / "good.mp4"),
    "ten.mp4": lambda d: _mp4(d / "ten.mp4", frames=10),
}


@pytest.fixture(scope="module")
def unloadable(tmp_path_factory):
    """The tiny model whose transformer weights file is valid safetensors holding one unrelated
    tensor: loading it fails, so a case refused with its own message under this model was refused
    before the model loaded (within seconds: no weights are read)."""
    from safetensors.torch import save_file

    from cogvx.cli import DEFAULT_MODEL

    folder = tmp_path_factory.mktemp("unloadable") / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    save_file({"unrelated": torch.zeros(1)}, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    return folder


SPAWNED = []  # the cases also run as users run them: one per kind of check (each costs a Python + torch start)


def case(args, message, make=(), spawn=False):
    """A bad invocation refused before the model loads: its arguments, the error line's pattern, the
    inputs to make first. All cases run through main() in this process; `spawn`: also as a subprocess."""
    param = pytest.param(args, message, list(make), id=" ".join(map(str, args))[:40])
    if spawn:
        SPAWNED.append(param)
    return param


BEFORE_LOAD = [
    # sizes and the pipeline's rules, checked from the configs
    case(["--frames", "6"], r"--frames must be 1 \+ 4·k", spawn=True),
    case(["--height", "40"], "multiples of 16"),
    case(["--guidance", "0.5", "--negative-prompt", "ugly"], "--guidance 0.5 < 1 disables guidance"),
    case(["--model", "/nonexistent"], "is not a CogVideoX pipeline folder"),
    # --out (1)
    case(["--out", "/nonexistent/dir/out.mp4"], "cannot write to /nonexistent/dir"),
    case(["--out", "video.avi"], "--out must end in .mp4 or .gif"),
    case(["--out", "afile/o.mp4"], "cannot write to afile .*Not a directory", ["afile"], spawn=True),
    case(["--out", "o.mp4"], "--out o.mp4 is a folder", ["o.mp4/"], spawn=True),
    case(["--out", "/sys/o.mp4"], "cannot write to /sys .*Permission denied", spawn=True),
    case(["--out", "x" * 246 + ".mp4"], "the name is too long", spawn=True),
    case(["--out", ".mp4"], "--out .mp4 has no name before the suffix", spawn=True),
    case(["--out", "frames"], "frames exists; choose another --out folder", ["frames/"]),
    # memory (2)
    case(["--frames", "4000001"], r"4000001 frames .* need at least [\d,.]+ GiB of RAM .* is available; lower",
         spawn=True),
    case(["--height", "160000", "--width", "160000"], "need at least .* GiB of RAM", spawn=True),
    case(["--height", "160000", "--width", "160000", "--tile"], "need at least .* GiB of RAM"),
    # zero, negative, non-finite, out of range (3, 4, 5)
    *[case([flag, value], f"argument {flag}: must be a positive integer", spawn=flag == "--fps")
      for flag, value in [("--frames", "0"), ("--height", "0"), ("--width", "0"), ("--fps", "0"), ("--fps", "-5"),
                          ("--steps", "0"), ("--steps", "-3")]],
    case(["--guidance", "nan", "--negative-prompt", "ugly"], "argument --guidance: must be a finite number; got nan",
         spawn=True),
    case(["--guidance", "-inf"], "argument --guidance: must be a finite number; got -inf", spawn=True),
    case(["--guidance", "inf"], "argument --guidance: must be a finite number"),
    case(["--strength", "nan"], "argument --strength: must be a finite number"),
    case(["--strength", "0"], r"argument --strength: must be in \(0, 1\]; got 0", spawn=True),
    case(["--strength", "1.5"], r"argument --strength: must be in \(0, 1\]"),
    case(["--seed", str(2**64)], r"argument --seed: must be an integer in \[0, 2\*\*64\)", spawn=True),
    case(["--seed", "-1"], r"argument --seed: must be an integer in \[0, 2\*\*64\)"),
    # argparse's own errors (6)
    case(["--dtype", "fp64"], "argument --dtype: invalid choice", spawn=True),
    case(["--bogus"], "unrecognized arguments: --bogus"),
    case(["--frames"], "argument --frames: expected one argument"),
    # inputs (7, 8, 9)
    case(["--prompt", b"caf\xe9"], "argument --prompt: is not valid UTF-8", spawn=True),
    case(["--negative-prompt", b"\xff\xfe"], "argument --negative-prompt: is not valid UTF-8"),
    case(["--image", "/nonexistent.png"], "cannot read image /nonexistent.png"),
    case(["--image", "/etc/hostname"], "cannot read image /etc/hostname"),
    case(["--image", "bomb.png"], "cannot read image bomb.png: .*decompression bomb", ["bomb.png"], spawn=True),
    case(["--image", "big.png"], "cannot read image big.png: .*decompression bomb", ["big.png"]),
    case(["--video", "/nonexistent.mp4"], "cannot read video /nonexistent.mp4"),
    case(["--video", "cut.mp4"], r"cannot read video cut.mp4: not a readable video \(", ["cut.mp4"],
         spawn=True),
    case(["--video", "ten.mp4"], r"--video ten.mp4 has 10 frames", ["ten.mp4"]),
    case(["--video", "good.mp4", "--strength", "0.01"], r"--strength 0.01 × --steps 2 leaves no denoising step",
         ["good.mp4"], spawn=True),
]


@pytest.mark.parametrize("args,message,make", SPAWNED)
def test_bad_input_is_one_line_and_exit_2(tmp_path, unloadable, args, message, make):
    for name in make:
        MAKE[name](tmp_path)
    before = listing(tmp_path)
    r = cogvx("generate", "--prompt", "a cat", "--model", str(unloadable), *FAST, *args, cwd=tmp_path)
    assert_refused(r.returncode, r.stderr, message, tmp_path, before)


@pytest.mark.parametrize("args,message,make", BEFORE_LOAD)
def test_bad_input_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, unloadable, args, message, make):
    """All the cases through main() in this process (what `python -m cogvx` runs; argv bytes decoded
    as Python decodes them), many at the cost of one start."""
    from cogvx.cli import main

    for name in make:
        MAKE[name](tmp_path)
    before = listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = [os.fsdecode(a) for a in ["generate", "--prompt", "a cat", "--model", str(unloadable), *FAST, *args]]
    code = main(argv)
    assert_refused(code, capsys.readouterr().err, message, tmp_path, before)


def test_the_unloadable_model_fails_only_at_load(tmp_path, unloadable):
    """The premise of the cases above: valid arguments get past every early check to the load."""
    r = cogvx("generate", "--prompt", "a cat", "--model", str(unloadable), *FAST, cwd=tmp_path)
    assert_refused(r.returncode, r.stderr, "transformer.*do not match", tmp_path, [])


def test_help_exits_0_and_strength_without_video_warns(tmp_path):
    r = cogvx("generate", "--help")
    assert r.returncode == 0 and "usage: cogvx generate" in r.stdout and "--strength" in r.stdout
    # the embedded model's vocabulary and examples, from its card
    assert "vocabulary: a red green blue yellow square circle triangle moving left right up down" in r.stdout
    assert 'cogvx generate --prompt "a red square moving left"' in r.stdout
    r = cogvx("generate", "--prompt", "a cat", *FAST, "--strength", "0.5", "--out", str(tmp_path / "o.gif"))
    assert r.returncode == 0, r.stderr
    assert "warning: --strength is ignored without --video" in r.stderr.splitlines()


def test_a_model_card_sets_the_defaults_and_names_unknown_words(tmp_path):
    import json

    from cogvx import tiny

    model = tiny.build(tmp_path / "model", words=("a", "red", "square"))
    (model / "cogvx.json").write_text(json.dumps({"vocabulary": ["a", "red", "square"], "examples": ["a red square"],
                                                  "generate": {"steps": 3, "guidance": 2.5, "fps": 5}}))
    small = ["--frames", "9", "--height", "32", "--width", "48"]
    r = cogvx("generate", "--prompt", "a red Cat, jumping", "--model", str(model), *small,
              "--out", str(tmp_path / "o.gif"))
    assert r.returncode == 0, r.stderr
    assert "5 fps; 3 steps, guidance 2.5" in r.stdout
    assert [line for line in r.stderr.splitlines() if "warning" in line] == ["warning: not in the model's vocabulary, so ignored: cat, jumping "
                                     "(it knows: a red square)"]
    r = cogvx("generate", "--prompt", "a red square", "--model", str(model), *small, "--steps", "2",
              "--guidance", "1", "--fps", "4", "--out", str(tmp_path / "p.gif"))
    assert r.returncode == 0 and "warning" not in r.stderr and "4 fps; 2 steps, guidance 1" in r.stdout, r.stderr
    (model / "cogvx.json").write_text('{"generate": {"stpes": 3}}')
    r = cogvx("generate", "--prompt", "a red square", "--model", str(model), *small, "--out", str(tmp_path / "q.gif"))
    assert_refused(r.returncode, r.stderr, r"cogvx.json: .*only steps, guidance and fps", tmp_path,
                   listing(tmp_path))
    (model / "cogvx.json").unlink()  # no card: the built-in defaults, no vocabulary check
    r = cogvx("generate", "--prompt", "a cat", "--model", str(model), *small, "--steps", "2",
              "--out", str(tmp_path / "r.gif"))
    assert r.returncode == 0 and "guidance 6" in r.stdout and "warning" not in r.stderr, r.stderr


@pytest.mark.parametrize("part,breakage,message", [
    ("transformer", "truncate", r"transformer/diffusion_pytorch_model.safetensors"),
    ("vae", "truncate", r"vae/diffusion_pytorch_model.safetensors"),
    ("text_encoder", "truncate", r"text_encoder/model.safetensors"),
    ("tokenizer", "empty", r"tokenizer' is empty"),
    ("transformer", "num_layers", r"transformer.*num_layers"),
    ("text_encoder", "d_model", r"cannot load the T5 text encoder from .*text_encoder.*d_model"),
])
def test_a_broken_model_folder_is_one_line(tmp_path, part, breakage, message):
    from cogvx.cli import DEFAULT_MODEL

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model)
    if breakage == "truncate":
        weights = next((model / part).glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    elif breakage == "empty":
        shutil.rmtree(model / part)
        (model / part).mkdir()
    else:  # a number as a string
        config = model / part / "config.json"
        text, count = re.subn(rf'"{breakage}": (\d+)', rf'"{breakage}": "\1"', config.read_text())
        assert count == 1
        config.write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    r = cogvx("generate", "--prompt", "a cat", "--model", str(model), *FAST, cwd=work)
    assert_refused(r.returncode, r.stderr, message, work, [])


def test_a_png_folder_made_meanwhile_is_left_intact(tmp_path):
    """Two runs writing one PNG folder: the second finds it when renaming, says so in one line and
    leaves the first run's folder as it was, with no temporary folder."""
    from cogvx.cli import UsageError, write_video

    frames = np.zeros((3, 16, 16, 3), np.uint8)
    write_video(frames, tmp_path / "frames", fps=8)  # the first run
    for first in (["frame_0000.png", "frame_0001.png", "frame_0002.png"], []):
        if not first:  # an empty folder, which rename(2) would silently replace
            shutil.rmtree(tmp_path / "frames")
            (tmp_path / "frames").mkdir()
        with pytest.raises(UsageError, match="frames was created by something else .* left as it is"):
            write_video(frames + 1, tmp_path / "frames", fps=8)
        assert listing(tmp_path) == ["frames"] + [f"frames/{name}" for name in first]


def test_unwritable_output_is_one_line(tmp_path):
    from cogvx.cli import UsageError, write_video

    with pytest.raises(UsageError, match="cannot write .*; nothing written"):
        write_video(np.zeros((1, 16, 16, 3), np.uint8), Path("/sys/frames"), fps=8)


def _appeared(folder, pattern: str) -> bool:
    """Whether a path matching `pattern` exists in `folder`; a temporary folder that the run renames
    or removes while the glob reads it counts as not (yet) there."""
    try:
        return any(folder.glob(pattern))
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("moment", ["made", "filled"])
def test_sigterm_while_writing_leaves_nothing(tmp_path, moment):
    """SIGTERM (timeout, container stops) sent as soon as a temporary appears ("made": the --out
    probe's if the poll catches it, else the PNG folder's as it is made: the narrowest windows, between
    a creation and the cleanup's start) or as the PNG folder is being filled: exit 143, one line,
    nothing left. A run that finished first is tried again."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    pattern = ".frames.*" if moment == "made" else ".frames.*/frame_*.png"
    for attempt in range(3):
        p = subprocess.Popen([sys.executable, "-m", "cogvx", "generate", "--prompt", "a cat", "--steps", "1",
                              "--frames", "33", "--height", "128", "--width", "192", "--guidance", "1",
                              "--out", str(tmp_path / "frames")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env)
        deadline = time.monotonic() + 300
        while p.poll() is None and not _appeared(tmp_path, pattern) and time.monotonic() < deadline:
            time.sleep(0.001)
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=120)
        if p.returncode != 0:
            break
        shutil.rmtree(tmp_path / "frames")  # written whole before the signal came: try again
    assert p.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "cogvx: terminated; nothing written" and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_sigterm_before_loading_exits_143(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    p = subprocess.Popen([sys.executable, "-m", "cogvx", "generate", "--prompt", "a cat", *FAST,
                          "--out", str(tmp_path / "o.mp4")], stderr=subprocess.PIPE, text=True, env=env)
    first = p.stderr.readline()  # the unknown word's warning: main() is running, its handler installed
    assert first.startswith("warning: not in the model's vocabulary"), first
    p.send_signal(signal.SIGTERM)
    stderr = first + p.stderr.read()
    assert p.wait(timeout=120) == 143, stderr
    assert stderr.strip().splitlines()[-1] == "cogvx: terminated; nothing written" and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_memory_estimate_accepts_real_runs_and_refuses_impossible_ones():
    """CogVideoX-5B (DESIGN.md: 42 layers × 48 heads × 64, latent 16 channels, VAE blocks
    128/256/256/512, T5-XXL) at 49×480×720 in bf16 fits an 80 GB GPU with room to spare;
    4,000,001 frames or 160,000² pixels do not fit any machine."""
    from cogvx import TransformerConfig, VAEConfig
    from cogvx.cli import memory_estimate

    five_b = TransformerConfig(num_attention_heads=48, attention_head_dim=64, patch_size=2, patch_size_t=None,
                               max_text_seq_length=226, num_layers=42)
    two_b = TransformerConfig(num_attention_heads=30, num_layers=30)
    vae = VAEConfig(latent_channels=16, block_out_channels=(128, 256, 256, 512), temporal_compression_ratio=4,
                    sample_height=480, sample_width=720)
    # parameters: the transformer ≈ layers × 12·width² (attention 4, FFN 8), T5-XXL's encoder 4.76e9
    weights = 42 * 12 * 3072**2 + 4.76e9
    five = memory_estimate(five_b, vae, frames=49, height=480, width=720, itemsize=2, guided=True,
                           weights=int(weights))
    assert 19e9 < five["device"] < 0.5 * 80e9, five  # the weights alone are ~19 GB
    # 17,776 tokens (DESIGN.md) × 3072 × batch 2 × 5 live tensors × 2 bytes
    assert five["denoising"] >= 5 * 2 * 17_776 * 3072 * 2
    assert five["host"] == 5 * 3 * 49 * 480 * 720
    two = memory_estimate(two_b, vae, frames=49, height=480, width=720, itemsize=2, guided=True)
    assert two["denoising"] < five["denoising"] and two["device"] < 4e9
    cpu = memory_estimate(five_b, vae, frames=49, height=480, width=720, itemsize=4, guided=True, cpu=True,
                          weights=int(weights))
    assert cpu["host"] == 0 and cpu["device"] > 2 * five["weights"]  # fp32 on the CPU: all in RAM
    assert memory_estimate(five_b, vae, frames=4_000_001, height=480, width=720, itemsize=2,
                           guided=True)["device"] > 1e13
    huge = memory_estimate(five_b, vae, frames=49, height=160_000, width=160_000, itemsize=2, guided=True)
    tiled = memory_estimate(five_b, vae, frames=49, height=160_000, width=160_000, itemsize=2, guided=True, tile=True)
    assert tiled["decoding"] < huge["decoding"] and tiled["device"] > 1e13


def test_available_ram_is_the_containers_limit_less_its_use_but_not_its_page_cache(tmp_path, monkeypatch):
    import cogvx.cli

    monkeypatch.setattr(cogvx.cli, "CGROUP", tmp_path)
    host = cogvx.cli._available_ram()  # no cgroup files: MemAvailable (more than 1 GiB on a test machine)
    assert 2**30 < host < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**29}\n")
    (tmp_path / "memory.stat").write_text(f"anon {2**28}\nfile {2**28}\nkernel 0\n")
    assert cogvx.cli._available_ram() == 2**30 - 2**28  # 512 MiB used, half of it cache
    (tmp_path / "memory.max").write_text("max\n")
    assert cogvx.cli._available_ram() > 2**30


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

"""Every code example of README.md runs as written: each ```python block in a child process and each
line of the ```bash blocks in bash, in a folder holding tiny random models (cogvx.tiny) and input
files at the paths the examples name. A broken example fails here; a line that cannot run in a test
is listed in SKIPPED with its reason, and that list must match the README exactly."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"^```(python|bash)\n(.*?)^```$", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [line for lang, code in BLOCKS if lang == "bash" for line in code.splitlines() if line.strip()]

# bash lines (their command, without the trailing comment) a test cannot run, and why
SKIPPED = {
    "bash scripts/demo.sh": "runs scripts/setup_env.sh (pip installs and an extension build: network, minutes); "
                            "its generation step, `cogvx generate` on the embedded model, is test_cli.py's first test",
    "bash scripts/test.sh": "runs the whole test suite, this file included",
}


def command(line: str) -> str:
    return " ".join(shlex.split(line, comments=True))


RUN = [line for line in BASH if command(line) not in SKIPPED]
TIMEOUT = 300  # seconds per example; each takes a few on the tiny models


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The folder the examples run in: tiny models named as in the README, an image, a video, and
    `cogvx` on PATH (the installed console script, else a shim running `python -m cogvx`)."""
    from PIL import Image

    from cogvx.cli import write_video
    from cogvx.tiny import build

    root = tmp_path_factory.mktemp("readme")
    build(root / "CogVideoX-5b")
    build(root / "CogVideoX-5b-I2V", variant="i2v")
    frames = (np.random.default_rng(0).random((9, 64, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(frames[0]).save(root / "first_frame.png")
    write_video(frames, root / "input.mp4", fps=8)
    scripts = Path(sys.executable).parent
    if not (scripts / "cogvx").exists():
        scripts = root / "bin"
        scripts.mkdir()
        (scripts / "cogvx").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cogvx "$@"\n')
        (scripts / "cogvx").chmod(0o755)
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
    # the models are tiny: one thread each, else busy-waiting threads on a shared CPU slow them ~10×
    env.setdefault("OMP_NUM_THREADS", "1")
    return root, env


def run(args, workspace) -> subprocess.CompletedProcess:
    root, env = workspace
    result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_the_readme_has_the_examples_this_file_runs():
    """The parse found every fenced python/bash block, and the skipped lines are exactly SKIPPED."""
    assert len(PYTHON) == README.count("```python\n") >= 3
    assert sum(lang == "bash" for lang, _ in BLOCKS) == README.count("```bash\n") >= 2
    assert sorted(command(line) for line in BASH if command(line) in SKIPPED) == sorted(SKIPPED)
    assert any(line.startswith("cogvx generate") for line in RUN)


@pytest.mark.parametrize("code", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_python_example_runs(code, workspace):
    run([sys.executable, "-c", code], workspace)


@pytest.mark.parametrize("line", RUN, ids=[command(line)[:60] for line in RUN])
def test_bash_line_runs(line, workspace):
    run(["bash", "-c", line], workspace)
    args = shlex.split(line, comments=True)
    if "--out" in args:  # and writes what it says
        out = workspace[0] / args[args.index("--out") + 1]
        assert out.is_file() and out.stat().st_size > 0, out

"""The embedded default model: `cogvx train-default-model` runs its stages (VAE, pipeline folder,
latent cache, transformer) and continues an interrupted run; the same seed gives the same weights;
the shipped folder is an ordinary diffusers CogVideoX pipeline that diffusers loads and runs to our
frames."""
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.cli import DEFAULT_MODEL, main, model_card
from cogvx.pipeline import Pipeline
from cogvx.train import default_model

# the shipped configs with a few steps at 32x32: the stages, not the budget
SMALL = {"VAE": [("steps = 1500", "steps = 2"), ("checkpoint_every = 250", "checkpoint_every = 1"),
                 ("validate_every = 250", "validate_every = 0"), ("length = 4096", "length = 16"),
                 ("batch_size = 4", "batch_size = 1"), ("height = 64", "height = 32"), ("width = 96", "width = 32")],
         "transformer": [("steps = 10000", "steps = 2"), ("checkpoint_every = 1000", "checkpoint_every = 1"),
                         ("validate_every = 2000", "validate_every = 0"), ("length = 2048", "length = 4"),
                         ("batch_size = 16", "batch_size = 2"), ("[9, 64, 96], [1, 64, 96]", "[9, 32, 32], [1, 32, 32]")]}


def small_configs(folder: Path) -> tuple[Path, Path]:
    paths = []
    for what, source in (("VAE", default_model.VAE_CONFIG), ("transformer", default_model.TRANSFORMER_CONFIG)):
        text = source.read_text()
        for old, new in SMALL[what]:
            assert old in text, f"{source.name} no longer has {old!r}: update this test's small budget"
            text = text.replace(old, new)
        paths.append(folder / source.name)
        paths[-1].write_text(text)
    return tuple(paths)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("default-model")
    vae_config, transformer_config = small_configs(root)
    args = ["train-default-model", "--vae-config", str(vae_config), "--transformer-config", str(transformer_config)]
    here = Path.cwd()
    os.chdir(root)  # relative --work and --out, as users type them (the configs live elsewhere)
    try:
        assert main([*args, "--work", "work", "--out", "model"]) == 0
    finally:
        os.chdir(here)
    return root, args


def test_the_command_writes_a_pipeline_our_pipeline_runs(retrained):
    root, _ = retrained
    model = root / "model"
    assert sorted(p.name for p in model.iterdir()) == ["cogvx.json", "model_index.json", "scheduler", "text_encoder",
                                                       "tokenizer", "transformer", "vae"]
    assert not list(root.glob(".model.*")), "the staging folder is renamed into place"
    # stage 1's VAE and stage 2's (EMA) transformer are the ones shipped
    work = root / "work"
    assert digest(model / "vae") == digest(work / "vae" / "checkpoint-2" / "vae")
    assert digest(model / "transformer") == digest(work / "transformer" / "checkpoint-2" / "transformer_ema")
    video = Pipeline.from_pretrained(model, dtype=torch.float32)(
        "a red square moving left", num_frames=9, height=32, width=32, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np", progress=False).frames
    assert video.shape == (1, 9, 32, 32, 3) and np.isfinite(video).all()


def test_the_model_card_and_tokenizer_know_the_captions_words(retrained):
    from transformers import AutoTokenizer

    from cogvx.train.data import CAPTION_WORDS, SyntheticShapes

    model = retrained[0] / "model"
    card = model_card(model)
    assert card["vocabulary"] == list(CAPTION_WORDS)
    captions = {SyntheticShapes(frames=9, height=32, width=32, length=200).caption(i) for i in range(200)}
    assert {w for c in captions for w in c.split()} == set(CAPTION_WORDS)  # every word used, none missing
    assert set(card["examples"]) >= {"a red square moving left", "a red square"}
    assert card["generate"] == {"steps": 20, "guidance": 3.0, "fps": 8}  # the validation section's
    tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
    ids = tokenizer("a Red cat moving left").input_ids
    assert ids[2] == tokenizer.unk_token_id and tokenizer.unk_token_id not in ids[:2] + ids[3:]


def test_the_vae_scaling_factor_makes_the_training_latents_unit_variance(retrained):
    """Stage 2 sets scaling_factor from the VAE's posteriors: the cached clips' latents, sampled and
    scaled as training scales them, have standard deviation 1 (the cache holds the same clips)."""
    import json

    from cogvx.train.cache import LatentCache

    root = retrained[0]
    factor = json.loads((root / "model" / "vae" / "config.json").read_text())["scaling_factor"]
    assert factor != 0.7  # not cogvx.tiny's placeholder
    cache = LatentCache(root / "work" / "cache")
    items = [cache[(int(i), 0)] for i in cache.bucket_members()[0]]  # the video bucket's clips
    assert len(items) >= 2
    mean = torch.stack([item["latent_mean"] for item in items]).double()
    std = torch.stack([item["latent_std"] for item in items]).double()
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs((sampled * factor).std().item() - 1) < 0.05


def test_a_rerun_continues_and_the_seed_decides_the_weights(retrained, capsys):
    root, args = retrained
    before = digest(root / "model")
    assert main([*args, "--work", str(root / "work"), "--out", str(root / "model")]) == 0  # every stage done
    assert "resumed from" in capsys.readouterr().out
    assert digest(root / "model") == before
    assert main([*args, "--work", str(root / "again"), "--out", str(root / "again-model")]) == 0
    assert digest(root / "again-model") == before
    assert main([*args, "--work", str(root / "seed1"), "--out", str(root / "seed1-model"), "--seed", "1"]) == 0
    assert digest(root / "seed1-model") != before


def test_missing_config_is_one_line(tmp_path, capsys):
    assert main(["train-default-model", "--vae-config", str(tmp_path / "nope.toml"), "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"cogvx: error: config .*nope\.toml does not exist .*", err) and "\n" not in err


def test_embedded_model_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.CogVideoXPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    card = model_card(DEFAULT_MODEL)["generate"]  # what `cogvx generate` runs without flags
    kwargs = dict(num_inference_steps=card["steps"], guidance_scale=card["guidance"])
    # diffusers pads prompts to 226 tokens unless told; ours to the transformer's max_text_seq_length
    text_length = ref.transformer.config.max_text_seq_length
    expected = ref("a red square moving left", generator=torch.Generator().manual_seed(0), output_type="np",
                   max_sequence_length=text_length, num_frames=9, height=64, width=96, **kwargs).frames
    actual = ours("a red square moving left", generator=torch.Generator().manual_seed(0), output_type="np",
                  progress=False, **kwargs).frames
    err = np.abs(actual - expected).max()
    assert actual.shape == expected.shape and err <= 1e-4, f"max |ours - diffusers| = {err:.3g}"


def what_it_drew(video: np.ndarray) -> tuple[str, str]:
    """(colour, direction) of the moving thing in a (F, H, W, 3) video in [0, 1]: the pixels far from
    the background (the median colour), their mean colour's nearest shape colour, and the direction
    nearest to their centroid's path from the first frame to the last."""
    from cogvx.train.data import COLOURS, DIRECTIONS

    background = np.median(video.reshape(-1, 3), axis=0)
    thing = np.abs(video - background).max(-1) > 0.3  # (F, H, W)
    colour = video[thing].mean(0)
    name = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - colour).sum())
    first, last = (np.argwhere(thing[f]).mean(0) for f in (0, -1))  # (y, x) centroids
    direction = max(DIRECTIONS, key=lambda d: np.dot(DIRECTIONS[d], last - first))
    return name, direction


def test_the_judge_reads_the_datasets_own_clips():
    from cogvx.train.data import SyntheticShapes

    clips = SyntheticShapes(frames=9, height=64, width=96, seed=7, length=12)
    for i in range(len(clips)):
        video = (clips[i]["video"].permute(1, 2, 3, 0).numpy() + 1) / 2
        d = clips.describe(i)
        assert what_it_drew(video) == (d["colour"], d["direction"]), clips.caption(i)


def test_the_embedded_model_draws_the_prompts_colour_moving_the_prompts_way():
    """Every colour with every direction (shapes in turn), one seed each, with the settings
    `cogvx generate` uses: the shipped model gets 16/16 colours and 13/16 directions (1 and 2
    threads); the bounds leave a little room for other CPUs' float sums. A random model draws
    no consistent colour or direction (about 4/16 each by chance)."""
    from cogvx.train.data import COLOURS, DIRECTIONS, SHAPES

    pipe = Pipeline.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    card = model_card(DEFAULT_MODEL)["generate"]
    colours = directions = n = 0
    for colour in COLOURS:
        for direction in DIRECTIONS:
            prompt = f"a {colour} {SHAPES[n % len(SHAPES)]} moving {direction}"
            video = pipe(prompt, num_inference_steps=card["steps"], guidance_scale=card["guidance"], output_type="np",
                         generator=torch.Generator().manual_seed(0), progress=False).frames[0]
            drawn = what_it_drew(video)
            colours += drawn[0] == colour
            directions += drawn[1] == direction
            n += 1
    assert colours >= 15 and directions >= 12, f"colours {colours}/16, directions {directions}/16"


@pytest.mark.parametrize("case", ["a file", "a folder of other things", "the root", "work is a file"])
def test_an_out_that_would_be_lost_is_refused_before_training(tmp_path, capsys, case):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "keep.py").write_text("mine")
    args = {"a file": ["--out", str(tmp_path / "notes.txt")],
            "a folder of other things": ["--out", str(tmp_path / "project")],
            "the root": ["--out", "/"],
            "work is a file": ["--work", str(tmp_path / "notes.txt")]}[case]
    assert main(["train-default-model", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cogvx: error: ") and "\n" not in err
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "project" / "keep.py").read_text() == "mine"
    assert not (tmp_path / "work").exists()

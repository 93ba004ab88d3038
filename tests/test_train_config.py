"""cogvx.train.config: TOML → checked frozen dataclasses; errors name the file and section.key."""
import dataclasses
import json
from pathlib import Path

import pytest

from cogvx.loading import ConfigError
from cogvx.models.vae import VAEConfig
from cogvx.train.config import VGG16_FILE, VAETrainConfig, load_vae_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MINIMAL = {"data": {"source": "synthetic:shapes", "frames": 9, "height": 32, "width": 32},
           "loss": {"lpips_backbone": "random"}, "train": {"steps": 10}}


def with_(section, **values):
    data = json.loads(json.dumps(MINIMAL))
    data.setdefault(section, {}).update(values)
    return data


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["vae-stage1.toml", "vae-stage2.toml", "vae-tiny.toml"])
def test_shipped_configs_load(name):
    config = load_vae_config(CONFIGS / name)
    assert config.source == CONFIGS / name
    assert (config.data.frames - 1) % 8 == 0 and config.data.height % 8 == 0 and config.data.width % 8 == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.steps = 1


def test_shipped_configs_say_what_they_promise():
    stage1, stage2, tiny = (load_vae_config(CONFIGS / f"vae-{n}.toml") for n in ("stage1", "stage2", "tiny"))
    assert stage1.data.frames == 17 and (stage1.data.height, stage1.data.width) == (256, 256)
    assert stage1.model.pretrained is None and stage1.model.vae == VAEConfig()  # from scratch: CogVideoX's VAE
    assert stage1.loss.lpips_backbone.name == VGG16_FILE and not stage1.train.context_parallel
    assert stage2.data.frames == 49 and stage2.train.context_parallel and stage2.model.vae is None
    # stage 2 starts from stage 1's last checkpoint (relative paths read from the config's folder)
    assert stage2.model.pretrained == CONFIGS / f"../{stage1.train.out}/checkpoint-{stage1.train.steps}"
    assert tiny.data.source == "synthetic:shapes" and tiny.loss.lpips_backbone == "random"
    from cogvx.tiny import VAE as EMBEDDED  # the tiny VAE can replace the embedded pipeline's random one
    embedded = VAEConfig.from_dict(EMBEDDED)
    assert all(getattr(tiny.model.vae, k) == getattr(embedded, k)
               for k in ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups"))
    assert tiny.data.frames == 9 and tiny.data.height in (32, 64) and tiny.train.steps <= 500
    assert 0 < tiny.loss.gan_start_step < tiny.train.steps and tiny.loss.gan_weight > 0


def test_stage1_without_the_backbone_file_says_which_file_and_where(tmp_path):
    text = (CONFIGS / "vae-stage1.toml").read_text().replace('source = "../data/videos"', f'source = "{tmp_path}"')
    (tmp_path / "captions.jsonl").write_text("")
    text = text.replace("~/.cache/torch/hub/checkpoints/vgg16-397923af.pth", "weights/vgg16-397923af.pth")
    config = load_vae_config(write_toml(tmp_path / "stage1.toml", text))
    assert config.loss.lpips_backbone == tmp_path / "weights" / VGG16_FILE  # relative to the file's folder
    with pytest.raises(ConfigError) as err:
        config.check_files()
    message = str(err.value)
    assert "loss.lpips_backbone" in message and VGG16_FILE in message and "~/.cache/torch/hub/checkpoints" in message
    assert "stage1.toml" in message and "lpips_weight = 0" in message
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / VGG16_FILE).write_bytes(b"")
    config.check_files()  # the file is there: nothing else is missing


def test_defaults_and_types():
    config = VAETrainConfig.from_dict(MINIMAL)
    assert config.model.vae == VAEConfig() and config.model.pretrained is None
    assert config.data.batch_size == 1 and config.data.validation_clips == 2 and config.data.length == 1024
    assert config.loss.reconstruction == "l2" and config.loss.kl_weight == 1e-6 and config.loss.gan_loss == "hinge"
    assert config.optim.betas == (0.9, 0.999) and config.optim.schedule == "constant"
    assert config.train.mixed_precision == "no" and config.train.ema_decay is None
    assert config.train.out == Path("runs/vae")
    assert config.discriminator.channels == 64 and config.discriminator.layers == 3
    # a config records itself as JSON (checkpoints) and reads back the same
    assert VAETrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


FIVE_BLOCKS = dict(block_out_channels=[8] * 5, down_block_types=["CogVideoXDownBlock3D"] * 5,
                   up_block_types=["CogVideoXUpBlock3D"] * 5, latent_channels=4, layers_per_block=1, norm_num_groups=4)
BAD = [  # (data, the key the error must name, words it must say)
    (with_("data", colour="red"), "data.colour", "unknown key"),
    (with_("optimizer", lr=1.0), "[optimizer]", "unknown section"),
    (with_("model", vae={"latent_channel": 4}), "model.vae", "latent_channel"),
    (with_("train", steps="100"), "train.steps", "positive integer"),
    (with_("train", steps=0), "train.steps", "positive integer"),
    (with_("optim", lr=True), "optim.lr", "positive number"),
    (with_("optim", betas=[0.9]), "optim.betas", "two numbers"),
    (with_("train", gradient_checkpointing=1), "train.gradient_checkpointing", "boolean"),
    (with_("loss", reconstruction="l3"), "loss.reconstruction", "'l2' or 'l1'"),
    (with_("loss", gan_loss="wasserstein"), "loss.gan_loss", "'hinge' or 'non_saturating'"),
    (with_("train", ema_decay=1.0), "train.ema_decay", "(0, 1)"),
    (with_("data", frames=8), "data.frames", "1 + 8·k"),
    (with_("data", frames=16), "data.frames", "9 or 17"),
    (with_("data", frames=13), "data.frames", "an even n"),  # 1 + 4·3 frames: 4 latent frames decode to 16
    (with_("data", height=36), "data.height", "multiple of 8"),
    (with_("data", width=20), "data.width", "multiple of 8"),
    (with_("data", height=32, width=40, frames=9) | {"model": {"vae": FIVE_BLOCKS}},
     "data.width", "multiple of 16"),
    (with_("data", source="synthetic:stars"), "data.source", "'synthetic:shapes'"),
    (with_("data", validation_clips=8, length=8), "data.validation_clips", "less than data.length"),
    (with_("loss", kl_weight=-1e-6), "loss.kl_weight", "non-negative"),
    (with_("loss", lpips_weight=-0.1), "loss.lpips_weight", "non-negative"),
    (with_("loss", gan_weight=-1), "loss.gan_weight", "non-negative"),
    (with_("loss", reconstruction_weight=-1), "loss.reconstruction_weight", "non-negative"),
    (with_("loss", gradient_penalty_weight=-1), "loss.gradient_penalty_weight", "non-negative"),
    ({**MINIMAL, "loss": {}}, "loss.lpips_backbone", VGG16_FILE),
    ({k: v for k, v in MINIMAL.items() if k != "train"}, "train.steps", "required"),
    (with_("model", pretrained="vae", vae={}), "model.vae and model.pretrained", "exclude"),
    (with_("train", context_parallel=True) | {"data": {**MINIMAL["data"], "frames": 1}}, "train.context_parallel",
     "data.frames ≥ 9"),
    (with_("train", mixed_precision="bf16", device="cpu"), "train.mixed_precision", "GPU"),
    (with_("train", device="tpu"), "train.device", "'auto' or 'cpu' or 'cuda'"),
    (with_("data", batch_size=1.5), "data.batch_size", "positive integer"),
]


@pytest.mark.parametrize("data,key,words", BAD, ids=[f"{i}-{key}" for i, (_, key, _) in enumerate(BAD)])
def test_bad_values_name_file_and_key(data, key, words):
    with pytest.raises(ConfigError) as err:
        VAETrainConfig.from_dict(data, source="runs/my.toml")
    assert key in str(err.value) and words in str(err.value) and "'runs/my.toml'" in str(err.value)


def test_every_problem_of_a_file_at_once(tmp_path):
    path = write_toml(tmp_path / "bad.toml", """
[data]
source = "synthetic:shapes"
frames = 9
height = 32
width = 32
shuffle = true
[loss]
lpips_backbone = "random"
kl_weight = -1.0
[train]
steps = 1.5
""")
    with pytest.raises(ConfigError) as err:
        load_vae_config(path)
    message = str(err.value)
    assert all(part in message for part in (str(path), "data.shuffle", "loss.kl_weight", "train.steps"))


def test_toml_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"bad\.toml.*not valid TOML"):
        load_vae_config(write_toml(tmp_path / "bad.toml", "[data\nframes = 9"))
    with pytest.raises(FileNotFoundError, match="nowhere.toml"):
        load_vae_config(tmp_path / "nowhere.toml")


def test_relative_paths_are_read_from_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_toml(tmp_path / "sub" / "run.toml", """
[model]
pretrained = "../models/vae"
[data]
source = "clips"
frames = 17
height = 64
width = 96
[loss]
lpips_backbone = "/abs/vgg16-397923af.pth"
[train]
steps = 5
out = "runs/x"
""")
    config = load_vae_config(path)
    assert config.model.pretrained == tmp_path / "sub" / "../models/vae"
    assert config.data.source == tmp_path / "sub" / "clips" and not config.data.synthetic
    assert config.loss.lpips_backbone == Path("/abs/vgg16-397923af.pth")
    assert config.train.out == Path("runs/x")  # the output folder: relative to where the trainer runs


def test_check_files_reads_the_pretrained_vae(tmp_path):
    from cogvx.models.vae import CausalVAE
    CausalVAE(FIVE_BLOCKS).save_pretrained(tmp_path / "ckpt" / "vae")  # a checkpoint folder holding vae/
    config = VAETrainConfig.from_dict(with_("model", pretrained=str(tmp_path / "ckpt")))
    config.check_files()
    assert config.vae_config() == VAEConfig.from_dict(FIVE_BLOCKS)
    # the folder's VAE halves the size 4 times: a width of 40 loads (CogVideoX's factor 8 is assumed
    # until then) and is refused before training
    wide = VAETrainConfig.from_dict(with_("model", pretrained=str(tmp_path / "ckpt")) | {
        "data": {**MINIMAL["data"], "width": 40}})
    with pytest.raises(ConfigError, match="data.width must be a multiple of 16"):
        wide.check_files()
    with pytest.raises(ConfigError, match="model.pretrained.*missing"):
        VAETrainConfig.from_dict(with_("model", pretrained=str(tmp_path / "missing"))).check_files()
    with pytest.raises(ConfigError, match="data.source.*captions.jsonl"):
        VAETrainConfig.from_dict(with_("data", source=str(tmp_path))).check_files()


def test_check_world_for_context_parallel():
    config = VAETrainConfig.from_dict(with_("train", context_parallel=True) | {
        "data": {**MINIMAL["data"], "frames": 17}})  # 5 latent frames: 2 ranks (3 + 2) or 2 (1 + 2 + 2), not 4
    config.check_world(1)
    config.check_world(3)
    with pytest.raises(ConfigError, match="data.frames = 17 with train.context_parallel over 4 ranks"):
        config.check_world(4)

"""Loading errors surface at load time, naming the file and the key (issue #15): config types and
ranges, dtype / device / backend arguments, indexes and shard names, unreadable safetensors."""
import inspect
import json
import math
import os

import pytest
import torch

from cogvx import loading, tiny
from cogvx.models import CausalVAE, Transformer3D
from cogvx.models.transformer import TransformerConfig
from cogvx.models.vae import VAEConfig


@pytest.fixture
def model_dir(tmp_path):
    """A tiny transformer folder, one weights file."""
    Transformer3D(tiny.TRANSFORMER).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def sharded_dir(tmp_path):
    """A tiny transformer folder in several shards listed by an index."""
    Transformer3D(tiny.TRANSFORMER).save_pretrained(tmp_path / "s", max_shard_size=200_000)
    assert len(list((tmp_path / "s").glob("diffusion_pytorch_model-*.safetensors"))) > 2
    return tmp_path / "s"


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- 1. config values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, expected", [
    ("norm_eps", "1e-5", "a positive number"),
    ("norm_eps", 0, "a positive number"),
    ("norm_eps", math.nan, "a positive number"),
    ("num_layers", "2", "a positive integer"),
    ("num_layers", True, "a positive integer"),       # a boolean is not a count
    ("num_layers", 2.0, "a positive integer"),
    ("patch_size", 0, "a positive integer"),          # was a ZeroDivisionError at the first forward
    ("attention_head_dim", None, "a positive integer"),
    ("out_channels", -4, "a positive integer or null"),
    ("dropout", 1.5, "a number in \\[0, 1\\]"),
    ("use_rotary_positional_embeddings", "yes", "a boolean"),
])
def test_transformer_config_values_checked_at_load(model_dir, key, value, expected):
    path = model_dir / "config.json"
    edit_json(path, **{key: value})
    with pytest.raises(ValueError, match=f"invalid transformer config in '{path}': '{key}' must be {expected}; got "):
        Transformer3D.from_pretrained(model_dir)


def test_vae_config_values_checked_at_load(tmp_path):
    CausalVAE(tiny.VAE).save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "config.json"
    edit_json(path, block_out_channels=[16, "16", 32, 32])
    with pytest.raises(ValueError, match=f"in '{path}': 'block_out_channels' must be a list of items each a positive"):
        CausalVAE.from_pretrained(tmp_path / "vae")
    edit_json(path, block_out_channels=[16, 16, 32, 32], norm_num_groups=3)
    with pytest.raises(ValueError, match="must be multiples of norm_num_groups"):
        CausalVAE.from_pretrained(tmp_path / "vae")


def test_diffusers_json_forms_accepted(model_dir):
    """Integers where numbers are declared, arrays for tuples, null for optional fields."""
    edit_json(model_dir / "config.json", spatial_interpolation_scale=2, out_channels=None, patch_size_t=None)
    config = Transformer3D.from_pretrained(model_dir).config
    assert config.spatial_interpolation_scale == 2 and config.output_channels == config.in_channels
    vae = VAEConfig.from_dict({**tiny.VAE, "latents_mean": [0, 0.5, 1, 2]})
    assert vae.block_out_channels == (16, 16, 32, 32) and vae.latents_mean == (0, 0.5, 1, 2)
    with pytest.raises(ValueError, match=r"invalid VAE config: expected a JSON object of keys and values; got an array"):
        VAEConfig.of([tiny.VAE])


def _defaults(cls):
    return {name: list(p.default) if isinstance(p.default, tuple) else p.default
            for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


def test_real_and_diffusers_configs_load():
    """diffusers' defaults (CogVideoX-2B), the public checkpoints' switches, diffusers' test dummies."""
    diffusers = pytest.importorskip("diffusers")
    base = json.loads(json.dumps(_defaults(diffusers.CogVideoXTransformer3DModel)))  # as a config.json holds it
    assert TransformerConfig.from_dict(base) == TransformerConfig()
    big = dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
    for variant in (big, {**big, "use_learned_positional_embeddings": True, "in_channels": 32},
                    {**big, "patch_size_t": 2, "patch_bias": False, "sample_height": 300, "sample_width": 300,
                     "sample_frames": 81, "ofs_embed_dim": None},
                    {**big, "patch_size_t": 2, "patch_bias": False, "ofs_embed_dim": 512, "in_channels": 32}):
        TransformerConfig.from_dict({**base, **variant})
    vae = json.loads(json.dumps(_defaults(diffusers.AutoencoderKLCogVideoX)))
    assert VAEConfig.from_dict(vae) == VAEConfig()
    VAEConfig.from_dict({**vae, "scaling_factor": 0.7, "invert_scale_latents": True})
    # diffusers' tests/pipelines/cogvideo dummy components
    TransformerConfig.from_dict(dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                                     time_embed_dim=2, text_embed_dim=32, num_layers=1, sample_width=2,
                                     sample_height=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                     max_text_seq_length=16))
    VAEConfig.from_dict(dict(in_channels=3, out_channels=3, down_block_types=["CogVideoXDownBlock3D"] * 4,
                             up_block_types=["CogVideoXUpBlock3D"] * 4, block_out_channels=[8, 8, 8, 8],
                             latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4))


@pytest.mark.parametrize("variant", list(tiny.VARIANTS))
def test_tiny_variants_load(tmp_path, variant):
    changes, vae_changes = tiny.VARIANTS[variant]
    Transformer3D({**tiny.TRANSFORMER, **changes}).save_pretrained(tmp_path / "t")
    CausalVAE({**tiny.VAE, **vae_changes}).save_pretrained(tmp_path / "v")
    assert Transformer3D.from_pretrained(tmp_path / "t").config == TransformerConfig(**{**tiny.TRANSFORMER, **changes})
    CausalVAE.from_pretrained(tmp_path / "v")


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "must hold a JSON object of keys and values; got an array"),
    (b'{"num_layers": 2,}', "is not valid JSON"),
    (b'{"activation_fn": "gelu\xe9"}', "is not UTF-8 text"),
])
def test_unreadable_config_names_the_file(model_dir, content, message):
    path = model_dir / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"'{path}' {message}"):
        Transformer3D.from_pretrained(model_dir)


@pytest.mark.parametrize("index, message", [
    ({"metadata": {}}, "has no 'weight_map'"),
    ({"weight_map": ["a.safetensors"]}, "'weight_map' must be an object of tensor name → shard file name; got an array"),
    ({"weight_map": {"proj_out.weight": 3}}, "'weight_map' must be an object"),
    ([], "must hold a JSON object"),
    ('{"weight_map": {', "is not valid JSON"),
])
def test_bad_index_names_the_file(sharded_dir, index, message):
    path = sharded_dir / loading.INDEX_NAME
    path.write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(ValueError, match=f"'{path}'.*{message}"):
        Transformer3D.from_pretrained(sharded_dir)


# -- 2. dtype and device ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                                         ("half", torch.float16), ("float32", torch.float32), ("fp32", torch.float32),
                                         ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16),
                                         (None, None)])
def test_resolve_dtype_accepts_dtypes_and_cli_names(name, dtype):
    assert loading.resolve_dtype(name) is dtype


@pytest.mark.parametrize("dtype", [5, "int8", "bogus", torch.complex64, torch.float64, torch.int8, float])
def test_bad_dtype_refused_at_load(model_dir, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of torch.float32, torch.bfloat16, torch.float16, "
                                         r"one of the names .*bf16.*; got "):
        Transformer3D.from_pretrained(model_dir, dtype=dtype)


def test_dtype_names_load(model_dir, tmp_path):
    assert Transformer3D.from_pretrained(model_dir, dtype="bf16").proj_out.weight.dtype == torch.bfloat16
    CausalVAE(tiny.VAE).save_pretrained(tmp_path / "vae")
    assert CausalVAE.from_pretrained(tmp_path / "vae", dtype="fp16").decoder.conv_out.conv.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        CausalVAE.from_pretrained(tmp_path / "vae", dtype="bf17")


def test_bad_device_refused_at_load(model_dir):
    with pytest.raises(ValueError, match="device 'gpu' is not a device torch knows"):
        Transformer3D.from_pretrained(model_dir, device="gpu")
    with pytest.raises(TypeError, match="device must be a torch.device, a device string"):
        Transformer3D.from_pretrained(model_dir, device=1.5)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"device 'cuda:{count}': this machine has {count} CUDA device"):
        Transformer3D.from_pretrained(model_dir, device=f"cuda:{count}")
    assert loading.resolve_device(None) == torch.device("cpu")
    assert Transformer3D.from_pretrained(model_dir, device=torch.device("cpu")).proj_out.weight.device.type == "cpu"


# -- 3. backend ----------------------------------------------------------------------------------------
def test_unknown_backend_refused_up_front(model_dir):
    message = "backend must be one of .*reference.* or None \\(automatic\\); got 'bogus'"
    with pytest.raises(ValueError, match=message):
        Transformer3D(tiny.TRANSFORMER, backend="bogus")
    with pytest.raises(ValueError, match=message):
        Transformer3D.from_pretrained(model_dir, backend="bogus")
    model = Transformer3D.from_pretrained(model_dir, backend="reference")
    with pytest.raises(ValueError, match="got ''"):
        model.set_backend("")
    assert model.set_backend(None).transformer_blocks[0].attn1.backend is None


# -- 4. shard names and weight paths ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../other/x.safetensors", "sub/../../x.safetensors", "/abs/x.safetensors", ""])
def test_index_pointing_outside_the_folder_refused(sharded_dir, name):
    path = sharded_dir / loading.INDEX_NAME
    index = json.loads(path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = name
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"'{path}' lists shards outside its folder"):
        Transformer3D.from_pretrained(sharded_dir)


def test_linked_and_nested_shards_load(sharded_dir, tmp_path):
    """A shard name may go into a subfolder; a shard file may be a link to a blob elsewhere (as in
    the hub's cache): the name decides, not where the file resolves."""
    path = sharded_dir / loading.INDEX_NAME
    index = json.loads(path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    (sharded_dir / "sub").mkdir()
    (sharded_dir / first).rename(sharded_dir / "sub" / first)
    (tmp_path / "blobs").mkdir()
    (sharded_dir / second).rename(tmp_path / "blobs" / "abc")
    os.symlink(tmp_path / "blobs" / "abc", sharded_dir / second)
    index["weight_map"] = {k: f"sub/{v}" if v == first else v for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    Transformer3D.from_pretrained(sharded_dir)


def test_weights_path_that_is_a_folder(model_dir, sharded_dir):
    weights = model_dir / loading.WEIGHTS_NAME
    weights.unlink()
    weights.mkdir()
    with pytest.raises(IsADirectoryError, match=f"weights file '{weights}' is a directory, not a safetensors file"):
        Transformer3D.from_pretrained(model_dir)
    shard = sorted(sharded_dir.glob("diffusion_pytorch_model-*.safetensors"))[0]
    shard.unlink()
    shard.mkdir()
    with pytest.raises(IsADirectoryError, match=f"shard of .* '{shard}' is a directory"):
        Transformer3D.from_pretrained(sharded_dir)
    shard.rmdir()
    with pytest.raises(FileNotFoundError, match=f"'{shard}' is missing"):
        Transformer3D.from_pretrained(sharded_dir)


# -- 5. unreadable safetensors ----------------------------------------------------------------------------
def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header...\xff"
    path.write_bytes(bytes(data))


def _huge_header_length(path):
    data = bytearray(path.read_bytes())
    data[:8] = (2 ** 62).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate, _garbage_header, _huge_header_length])
def test_corrupt_safetensors_named_before_any_tensor_is_read(sharded_dir, monkeypatch, corrupt):
    shard = sorted(sharded_dir.glob("diffusion_pytorch_model-*.safetensors"))[-1]  # the last one read
    corrupt(shard)
    opened = []
    real_open = loading.safe_open
    monkeypatch.setattr(loading, "safe_open", lambda *a, **k: opened.append(k.get("device")) or real_open(*a, **k))
    with pytest.raises(ValueError, match=f"'{shard}' is not a readable safetensors file: "):
        Transformer3D.from_pretrained(sharded_dir)
    assert opened and all(device is None for device in opened)  # only the survey: no tensor was loaded


def test_stored_elements_from_headers_of_single_and_sharded_folders(model_dir, sharded_dir, tmp_path):
    """Counted from the headers: equal to the model's parameters, for diffusers' index and for an
    index of another name (transformers' model.safetensors.index.json, as sharded T5 folders have)."""
    count = sum(p.numel() for p in Transformer3D(tiny.TRANSFORMER).parameters())
    assert loading.stored_elements(model_dir) == count == loading.stored_elements(sharded_dir)
    index = sharded_dir / loading.INDEX_NAME
    index.rename(sharded_dir / "model.safetensors.index.json")
    assert loading.stored_elements(sharded_dir) == count
    assert loading.stored_elements(model_dir, ("transformer_blocks.",)) < count


def test_vae_builds_and_runs_on_the_meta_device():
    """Shapes only, nothing runs (how benchmarks/vae_train_activations.py counts a step's saved
    activations at any size): no kernel-fallback warning, no check that reads values."""
    import warnings
    with torch.device("meta"):
        vae = CausalVAE(tiny.VAE, chunking="whole")
        video = torch.empty(1, 3, 9, 16, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        posterior = vae.encode(video)
        out = vae.decode(posterior.mean)
    assert posterior.mean.shape == (1, 4, 3, 2, 3) and posterior.mean.is_meta
    assert out.shape == (1, 3, 9, 16, 24) and out.is_meta

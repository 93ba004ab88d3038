"""cogvx.Transformer3D against diffusers' CogVideoXTransformer3DModel: every variant (2B sin-cos,
5B RoPE, 5B-I2V learned positions, 1.5 temporal patches, 1.5-I2V ofs) loaded from folders diffusers
saved, same outputs; every attention backend inside the model; bf16/fp16; gradients and gradient
checkpointing; torch.compile; save round trips; loading memory; bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import cogvx
from cogvx_kernels import _registry
from parity import assert_close, backend_params, implementation
from tiny_transformers import TEXT_LEN, diffusers, diffusers_forward, tiny_transformer, transformer_inputs

FP32 = (0.0, 1e-4)  # max |ours - diffusers| <= 1e-4 · max |diffusers|

# (variant, latent frames, height, width): 1 frame, the sample size, non-square other sizes
CASES = [
    ("2b", 1, 8, 12), ("2b", 3, 8, 12), ("2b", 2, 6, 10),
    ("5b", 1, 8, 12), ("5b", 3, 8, 12), ("5b", 2, 6, 10), ("5b", 4, 10, 6),
    ("5b-i2v", 3, 8, 12), ("5b-i2v", 2, 8, 12),   # learned table at the native frame count; sin-cos otherwise
    ("1.5", 2, 8, 12), ("1.5", 4, 6, 10),
    ("1.5-i2v", 2, 8, 12), ("1.5-i2v", 4, 4, 8),
]


def load_ours(model, tmp_path, **kwargs) -> cogvx.Transformer3D:
    model.save_pretrained(tmp_path / "diffusers")
    return cogvx.Transformer3D.from_pretrained(tmp_path / "diffusers", **kwargs)


@pytest.mark.parametrize("variant,frames,height,width", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}" for c in CASES])
def test_matches_diffusers(tmp_path, variant, frames, height, width):
    ref = tiny_transformer(variant)
    ours = load_ours(ref, tmp_path)
    inputs, rotary = transformer_inputs(ref, frames, height, width)
    with torch.no_grad():
        expected = diffusers_forward(ref, inputs, rotary)
        actual = ours(**inputs)
    assert actual.shape == expected.shape == inputs["latents"].shape[:2] + (4, height, width)
    assert_close(actual, expected, FP32, f"{variant} output")


# the backends a model-wide setting may name (every op of the model has them; attention-only ones such as
# sdpa are tested against the reference in test_joint_attention.py)
MODEL_BACKENDS = [p for p in backend_params("joint_attention") if p.values[0] in _registry.common_backends()]


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu"), *MODEL_BACKENDS])
@pytest.mark.parametrize("variant", ["5b", "1.5-i2v", "2b"])
def test_every_backend_inside_the_model(tmp_path, backend, device, variant):
    if backend != "reference":
        implementation("joint_attention", backend, device)
    ref = tiny_transformer(variant)
    ours = load_ours(ref, tmp_path, device=device, backend=backend)
    frames = 2 if variant.startswith("1.5") else 3
    inputs, rotary = transformer_inputs(ref, frames, 8, 12)
    with torch.no_grad():
        expected = diffusers_forward(ref, inputs, rotary)
        actual = ours(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    assert_close(actual.cpu(), expected, FP32, f"{variant} output with {backend}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["2b", "5b", "1.5-i2v"])
def test_half_precision_is_as_close_as_diffusers(tmp_path, dtype, variant):
    """Ours in bf16/fp16 is no further from the fp32 result than diffusers in the same dtype (within
    1.5× its error, plus 0.2 % of the output scale), and finite."""
    ref = tiny_transformer(variant)
    ours = load_ours(ref, tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    frames = 2 if variant.startswith("1.5") else 3
    inputs, rotary = transformer_inputs(ref, frames, 8, 12)
    half = {k: (v.to(dtype) if k in ("latents", "text_embeddings") else v) for k, v in inputs.items()}
    with torch.no_grad():
        truth = diffusers_forward(ref, inputs, rotary).double()
        theirs = diffusers_forward(ref.to(dtype), half, rotary).double()
        actual = ours(**half)
    assert torch.isfinite(actual).all()
    scale = truth.abs().max().item()
    their_err = (theirs - truth).abs().max().item()
    our_err = (actual.double() - truth).abs().max().item()
    assert our_err <= 1.5 * their_err + 2e-3 * scale, f"{dtype}: ours {our_err:.3g} vs diffusers {their_err:.3g}"


@pytest.mark.parametrize("variant", ["5b", "2b"])
def test_gradients_match_diffusers_with_and_without_checkpointing(tmp_path, variant):
    ref = tiny_transformer(variant).train()
    ours = load_ours(ref, tmp_path).train()
    inputs, rotary = transformer_inputs(ref, 2, 8, 12)

    def grads(model, forward):
        model.zero_grad()
        forward().square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    expected = grads(ref, lambda: diffusers_forward(ref, inputs, rotary))
    plain = grads(ours, lambda: ours(**inputs))
    ours.enable_gradient_checkpointing()
    checkpointed = grads(ours, lambda: ours(**inputs))
    assert plain.keys() == expected.keys()
    for name in expected:
        assert_close(plain[name], expected[name], (1e-6, 1e-4), f"grad {name}")
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=f"checkpointed {name}")


@pytest.mark.parametrize("variant", ["5b", "2b"])
def test_compiles_without_graph_breaks(tmp_path, variant):
    ref = tiny_transformer(variant)
    ours = load_ours(ref, tmp_path)
    inputs, _ = transformer_inputs(ref, 2, 8, 12)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    with torch.no_grad():
        expected = ours(**inputs)
        actual = compiled(**inputs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_timestep_forms_agree(tmp_path):
    ours = load_ours(tiny_transformer("5b"), tmp_path)
    inputs, _ = transformer_inputs(ours, 2, 8, 12)
    with torch.no_grad():
        as_batch = ours(**{**inputs, "timestep": torch.tensor([500, 500])})
        assert torch.equal(ours(**{**inputs, "timestep": 500}), as_batch)
        assert torch.equal(ours(**{**inputs, "timestep": torch.tensor([500])}), as_batch)


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", ["5b-i2v", "1.5-i2v"])
def test_our_save_loads_in_diffusers_and_back(tmp_path, variant, shard):
    ref = tiny_transformer(variant)
    ours = load_ours(ref, tmp_path)
    ours.save_pretrained(tmp_path / "ours", max_shard_size=200_000 if shard else 10 * 2**30)
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert ("diffusion_pytorch_model.safetensors.index.json" in files) == shard
    assert not any(name.startswith(".") for name in files), f"temporary files left: {files}"
    theirs = diffusers.CogVideoXTransformer3DModel.from_pretrained(tmp_path / "ours").eval()
    again = cogvx.Transformer3D.from_pretrained(tmp_path / "ours")
    inputs, rotary = transformer_inputs(ref, 2, 8, 12)
    with torch.no_grad():
        expected = ours(**inputs)
        assert_close(diffusers_forward(theirs, inputs, rotary), expected, FP32, "diffusers on our save")
        assert torch.equal(again(**inputs), expected)
    theirs_state, ref_state = theirs.state_dict(), ref.state_dict()
    assert theirs_state.keys() == ref_state.keys()
    for key in ref_state:  # bit-exact fp32 weights (diffusers builds the learned table in float64)
        assert torch.equal(theirs_state[key].float(), ref_state[key].float()), key


def test_loads_sharded_diffusers_folders_and_pipeline_roots(tmp_path):
    ref = tiny_transformer("5b")
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="100KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = cogvx.Transformer3D.from_pretrained(tmp_path / "pipe")  # a pipeline root: its transformer/
    inputs, rotary = transformer_inputs(ref, 2, 8, 12)
    with torch.no_grad():
        assert_close(ours(**inputs), diffusers_forward(ref, inputs, rotary), FP32, "sharded load")


def test_bf16_checkpoint_loads_as_stored_unless_asked(tmp_path):
    ref = tiny_transformer("1.5-i2v").to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in cogvx.Transformer3D.from_pretrained(tmp_path / "bf16").state_dict().values()} == {
        torch.bfloat16}
    loaded = cogvx.Transformer3D.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in loaded.state_dict().values()} == {torch.float32}
    assert all(p.requires_grad for p in loaded.parameters()), "loaded parameters must stay trainable"
    torch.testing.assert_close(loaded.proj_out.weight, ref.proj_out.weight.float(), atol=0, rtol=0)


MEMORY_PROBE = r"""
import json, sys, torch, cogvx
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
anon, rss, mapped = status("RssAnon"), status("VmRSS"), status("RssFile")
model = cogvx.Transformer3D.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
load_peak, paged_in = status("VmHWM") - rss, status("RssFile") - mapped
touched = sum(float(p.detach().float().sum()) for p in model.parameters())  # every page resident
print(json.dumps(dict(weights=sum(t.numel() * t.element_size() for t in model.state_dict().values()),
                      anon=status("RssAnon") - anon, load_peak=load_peak, paged_in=paged_in)))
"""


@pytest.mark.parametrize("stored,loaded", [("float32", "float32"), ("bfloat16", "float32"), ("float32", "bfloat16")])
def test_loading_never_holds_two_copies(tmp_path, stored, loaded):
    """In a child process: loading adds at most one anonymous copy of the weights (none when the
    dtype is kept: the tensors are the file's mapped pages, paged in by the load rather than by the
    first call) and peaks below that copy plus the file."""
    config = dict(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=64,
                  text_embed_dim=64, num_layers=4, sample_width=12, sample_height=8, sample_frames=9,
                  max_text_seq_length=7)
    cogvx.Transformer3D(config).to(getattr(torch, stored)).save_pretrained(tmp_path / "ckpt")
    file_size = (tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "ckpt"), loaded], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(out.stdout.strip().splitlines()[-1])
    slack = 16 * 2**20
    converted = m["weights"] if stored != loaded else 0
    assert m["anon"] <= converted + slack, m
    assert m["load_peak"] <= converted + file_size + slack, m
    if stored == loaded:
        assert m["paged_in"] >= m["weights"] - slack, m


# -- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_15_i2v(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    tiny_transformer("1.5-i2v").save_pretrained(path)
    return cogvx.Transformer3D.from_pretrained(path)


@pytest.mark.parametrize("change,message", [
    (dict(latents=torch.randn(2, 2, 5, 8, 12)), "latents must have 8 channels"),
    (dict(latents=torch.randn(2, 2, 8, 7, 12)), "multiples of patch_size 2"),
    (dict(latents=torch.randn(2, 3, 8, 8, 12)), "multiple of patch_size_t 2"),
    (dict(latents=torch.randn(2, 8, 8, 12)), r"latents must be \(batch, frames"),
    (dict(latents=torch.randn(2, 2, 8, 16, 24)), "exceeds the model's 4×6 position grid"),
    (dict(text_embeddings=torch.randn(2, TEXT_LEN, 32)), r"text_embeddings must be \(batch=2, tokens, 16\)"),
    (dict(text_embeddings=torch.randn(1, TEXT_LEN, 16)), r"text_embeddings must be \(batch=2"),
    (dict(timestep=torch.tensor([1, 2, 3])), r"timestep must be a scalar or of shape \(2,\)"),
    (dict(timestep=torch.ones(2, 1)), "timestep must be"),
    (dict(ofs=None), "ofs is required"),
    (dict(latents=torch.randn(2, 2, 8, 8, 12, dtype=torch.float64)), "share a dtype"),
])
def test_bad_inputs_raise_clear_errors(model_15_i2v, change, message):
    inputs, _ = transformer_inputs(model_15_i2v, 2, 8, 12)
    with pytest.raises(ValueError, match=message):
        model_15_i2v(**{**inputs, **change})


def test_bad_inputs_of_the_learned_position_table(tmp_path):
    ours = load_ours(tiny_transformer("5b-i2v"), tmp_path)
    inputs, _ = transformer_inputs(ours, 3, 8, 12)
    with pytest.raises(ValueError, match="only serve 8×12 latents; got 6×10"):
        ours(**{**inputs, "latents": torch.randn(2, 3, 8, 6, 10)})
    with pytest.raises(ValueError, match=f"must have {TEXT_LEN} tokens"):
        ours(**{**inputs, "text_embeddings": inputs["text_embeddings"][:, :5]})
    with pytest.raises(ValueError, match="no ofs embedding"):
        ours(**{**inputs, "ofs": torch.tensor([2.0])})


def test_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cogvx.Transformer3D.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        cogvx.Transformer3D.from_pretrained(tmp_path / "empty")
    tiny_transformer("5b").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        cogvx.Transformer3D.from_pretrained(tmp_path / "m")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX"}))
    with pytest.raises(ValueError, match="describes a AutoencoderKLCogVideoX, not a CogVideoXTransformer3DModel"):
        cogvx.Transformer3D.from_pretrained(tmp_path / "vae")


def test_mismatched_weights_and_configs_are_listed(tmp_path):
    ref = tiny_transformer("5b")
    ref.save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ValueError, match=r"missing transformer_blocks\.2\.attn1\.norm_k\.bias"):
        cogvx.Transformer3D.from_pretrained(tmp_path / "m")
    config_path.write_text(json.dumps({**config, "num_layers": 1}))
    with pytest.raises(ValueError, match=r"unexpected transformer_blocks\.1\."):
        cogvx.Transformer3D.from_pretrained(tmp_path / "m")
    config_path.write_text(json.dumps({**config, "text_embed_dim": 32}))
    with pytest.raises(ValueError, match=r"patch_embed\.text_proj\.weight .* has shape \(128, 16\); the config implies"):
        cogvx.Transformer3D.from_pretrained(tmp_path / "m")
    config_path.write_text(json.dumps({**config, "use_linear_attention": True}))
    with pytest.raises(ValueError, match=r"does not know: \['use_linear_attention'\]"):
        cogvx.Transformer3D.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="activation_fn must be 'gelu-approximate'"):
        cogvx.Transformer3D({**config, "activation_fn": "relu"})


def test_random_model_from_a_config_dict_runs_without_diffusers():
    """Transformer3D(config dict) builds a random model; the model layer never imports diffusers."""
    code = """
import sys, torch, cogvx
model = cogvx.Transformer3D(dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    time_embed_dim=32, text_embed_dim=16, num_layers=1, sample_width=12, sample_height=8, sample_frames=9,
    max_text_seq_length=7, use_rotary_positional_embeddings=True))
with torch.no_grad():
    out = model(torch.randn(1, 2, 4, 8, 12), torch.randn(1, 7, 16), 10)
assert out.shape == (1, 2, 4, 8, 12) and torch.isfinite(out).all(), out.shape
assert "diffusers" not in sys.modules, "the model layer imported diffusers"
"""
    subprocess.run([sys.executable, "-c", code], check=True)

"""CogVideoXAttnProcessor inside diffusers' CogVideoX transformer (RoPE and sin-cos variants) and
nn.JointAttention against diffusers' Attention: same outputs and gradients."""
import pytest
import torch

from cogvx_kernels import _registry
from cogvx_kernels.integrations.diffusers import CogVideoXAttnProcessor
from cogvx_kernels.nn import JointAttention, Rope3D
from parity import assert_close, backend_params, implementation

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0  # noqa: E402
from test_nn_rope3d import diffusers_cos_sin  # noqa: E402
from tiny_transformers import diffusers_forward, tiny_transformer, transformer_inputs  # noqa: E402

# (variant, frames, height, width): 5B-like RoPE at the sample size and cropped, 1.5-like, 2B-like
VARIANTS = [("5b", 3, 8, 12), ("5b", 2, 6, 10), ("1.5", 4, 8, 12), ("2b", 3, 8, 12)]
IDS = ["rope-native", "rope-crop", "rope-1.5", "sincos"]


# the backends the processor may name: it runs attention and the q/k norm + RoPE, so every op's (the
# attention-only sdpa is tested in test_joint_attention.py)
PROCESSOR_BACKENDS = [p for p in backend_params("joint_attention") if p.values[0] in _registry.common_backends()]


def on(device, inputs, rotary):
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return inputs, (tuple(t.to(device) for t in rotary) if rotary is not None else None)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("backend,device", PROCESSOR_BACKENDS)
def test_processor_matches_diffusers(backend, device, variant):
    implementation("joint_attention", backend, device)
    name, frames, height, width = variant
    model = tiny_transformer(name).to(device)
    kwargs, rotary = on(device, *transformer_inputs(model, frames, height, width))
    with torch.no_grad():
        expected = diffusers_forward(model, kwargs, rotary)
        model.set_attn_processor(CogVideoXAttnProcessor(backend=backend))
        assert all(isinstance(p, CogVideoXAttnProcessor) for p in model.attn_processors.values())
        actual = diffusers_forward(model, kwargs, rotary)
    assert_close(actual.cpu(), expected.cpu(), (1e-5, 1e-4), f"{backend} transformer output")


@pytest.mark.parametrize("backend,device", PROCESSOR_BACKENDS)
def test_processor_gradients_match(backend, device):
    implementation("joint_attention", backend, device)
    model = tiny_transformer("5b").to(device)
    kwargs, rotary = on(device, *transformer_inputs(model, 2, 8, 12))

    def grads():
        model.zero_grad()
        diffusers_forward(model, kwargs, rotary).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    model.set_attn_processor(CogVideoXAttnProcessor(backend=backend))
    actual = grads()
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name].cpu(), expected[name].cpu(), (1e-5, 1e-3), f"{backend} grad {name}")


def test_processor_in_bf16_is_close_and_finite():
    model = tiny_transformer("5b").to(torch.bfloat16)
    kwargs, rotary = transformer_inputs(model, 3, 8, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = diffusers_forward(model, kwargs, rotary).float()
        model.set_attn_processor(CogVideoXAttnProcessor())
        actual = diffusers_forward(model, kwargs, rotary).float()
    assert torch.isfinite(actual).all()
    assert_close(actual, expected, (2e-2, 3e-2), "bf16 transformer output")


def test_processor_rejects_an_attention_mask():
    attn = Attention(query_dim=32, dim_head=16, heads=2, qk_norm="layer_norm", eps=1e-6, processor=None)
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        CogVideoXAttnProcessor()(attn, torch.randn(1, 4, 32), torch.randn(1, 2, 32), attention_mask=torch.ones(1, 6))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_joint_attention_module_matches_diffusers_attention(qk_norm):
    """nn.JointAttention loads diffusers' Attention state dict as is and gives its output, with
    RoPE from positions (Rope3D) where diffusers uses the pipeline's tables."""
    torch.manual_seed(0)
    dim, heads, head_dim, frames, height, width = 48, 2, 64, 2, 6, 10
    ref = Attention(query_dim=dim, dim_head=head_dim, heads=heads, qk_norm="layer_norm" if qk_norm else None,
                    eps=1e-6, bias=True, out_bias=True, processor=CogVideoXAttnProcessor2_0())
    ours = JointAttention(dim, heads, head_dim, qk_norm=qk_norm)
    ours.load_state_dict(ref.state_dict())
    config = dict(attention_head_dim=head_dim, sample_height=8, sample_width=12, patch_size=2, patch_size_t=None)
    rope = Rope3D.from_config(config)
    video = torch.randn(2, frames * (height // 2) * (width // 2), dim)
    text = torch.randn(2, 5, dim)
    expected = ref(video, text, image_rotary_emb=diffusers_cos_sin(config, frames, height, width))
    actual = ours(video, text, positions=rope.positions(frames, height, width))
    for a, e, what in zip(actual, expected, ("video", "text")):
        assert_close(a, e, (1e-5, 1e-5), f"JointAttention {what}")
    # without positions: no rotation, as diffusers without image_rotary_emb
    expected = ref(video, text)
    actual = ours(video, text)
    assert_close(actual[0], expected[0], (1e-5, 1e-5), "JointAttention without rope")


def test_accelerate_puts_our_kernels_into_a_diffusers_pipeline(tmp_path):
    """accelerate(pipe): our attention processor and causal conv inside diffusers' CogVideoXPipeline,
    weights untouched, frames within 1e-4 of the unmodified pipeline (same seed)."""
    from cogvx.tiny import build
    from cogvx_kernels.integrations.diffusers import DiffusersCausalConv3d, accelerate

    pipe = diffusers.CogVideoXPipeline.from_pretrained(build(tmp_path / "pipe"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_frames=9, height=64, width=96, num_inference_steps=2, output_type="np")
    before = {k: v.clone() for k, v in [*pipe.transformer.state_dict().items(), *pipe.vae.state_dict().items()]}
    expected = pipe("a red cat", generator=torch.Generator().manual_seed(0), **call).frames
    assert accelerate(pipe) is pipe
    assert all(isinstance(p, CogVideoXAttnProcessor) for p in pipe.transformer.attn_processors.values())
    convs = [m for m in pipe.vae.modules() if isinstance(m, DiffusersCausalConv3d)]
    assert len(convs) > 10 and not any(type(m).__name__ == "CogVideoXCausalConv3d" for m in pipe.vae.modules())
    after = {**pipe.transformer.state_dict(), **pipe.vae.state_dict()}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    actual = pipe("a red cat", generator=torch.Generator().manual_seed(0), **call).frames
    assert abs(actual - expected).max() <= 1e-4


@pytest.mark.parametrize("missing", ["transformer", "vae"])
def test_accelerate_swaps_the_parts_a_pipeline_has(tmp_path, missing):
    """diffusers allows pipeline parts set to None (its test_encode_prompt_works_in_isolation builds
    one without a transformer): accelerate swaps what is there, and the pipeline still works."""
    from cogvx.tiny import build
    from cogvx_kernels.integrations.diffusers import DiffusersCausalConv3d, accelerate

    full = diffusers.CogVideoXPipeline.from_pretrained(build(tmp_path / "pipe"), dtype=torch.float32)
    parts = {name: getattr(full, name) for name in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")}
    pipe = diffusers.CogVideoXPipeline(**{**parts, missing: None})
    latents = torch.randn(1, 4, 2, 8, 12, generator=torch.Generator().manual_seed(0))
    expected = pipe.vae.decode(latents).sample if pipe.vae is not None else None
    assert accelerate(pipe) is pipe
    if pipe.transformer is not None:
        assert all(isinstance(p, CogVideoXAttnProcessor) for p in pipe.transformer.attn_processors.values())
    if pipe.vae is not None:
        assert any(isinstance(m, DiffusersCausalConv3d) for m in pipe.vae.modules())
        assert (pipe.vae.decode(latents).sample - expected).abs().max() <= 1e-4
    embeddings, _ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)
    assert embeddings.shape == (1, 226, 32)


def test_accelerate_rejects_a_pipeline_without_cogvideox_parts(tmp_path):
    from cogvx_kernels.integrations.diffusers import accelerate

    class NotCogVideoX:
        transformer, vae = torch.nn.Linear(2, 2), None

    with pytest.raises(ValueError, match="with a CogVideoX transformer or VAE; got transformer=Linear, vae=NoneType"):
        accelerate(NotCogVideoX())


def test_processor_refuses_an_attention_only_backend():
    with pytest.raises(ValueError, match="backend must be one of .*got 'sdpa'"):
        CogVideoXAttnProcessor(backend="sdpa")

"""CogVideoXAttnProcessor inside diffusers' CogVideoX transformer (RoPE and sin-cos variants) and
nn.JointAttention against diffusers' Attention: same outputs and gradients."""
import pytest
import torch

from cogvx_kernels.integrations.diffusers import CogVideoXAttnProcessor
from cogvx_kernels.nn import JointAttention, Rope3D
from parity import assert_close, backend_params, implementation

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0  # noqa: E402
from test_nn_rope3d import diffusers_cos_sin  # noqa: E402

TEXT_LEN, TEXT_DIM = 7, 16


def tiny_transformer(rope: bool, patch_size_t=None, head_dim=64, seed=0):
    torch.manual_seed(seed)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=rope)
    with torch.no_grad():  # random LayerNorm affines, so the fused kernel's weights matter
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return model.eval()


def inputs(model, frames, height, width, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, 4, height, width, generator=g)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    timestep = torch.tensor([999, 3][:batch])
    rotary = None
    if model.config.use_rotary_positional_embeddings:
        cfg = dict(model.config, sample_height=model.config.sample_height, sample_width=model.config.sample_width)
        rotary = diffusers_cos_sin(cfg, frames, height, width)
    return dict(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, image_rotary_emb=rotary)


# (rope, patch_size_t, frames, height, width): 5B-like RoPE at the sample size and cropped, 1.5-like, 2B-like
VARIANTS = [(True, None, 3, 8, 12), (True, None, 2, 6, 10), (True, 2, 4, 8, 12), (False, None, 3, 8, 12)]
IDS = ["rope-native", "rope-crop", "rope-1.5", "sincos"]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("backend,device", backend_params("joint_attention"))
def test_processor_matches_diffusers(backend, device, variant):
    implementation("joint_attention", backend, device)
    rope, patch_size_t, frames, height, width = variant
    model = tiny_transformer(rope, patch_size_t).to(device)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs(model, frames, height,
                                                                                         width).items()}
    if kwargs["image_rotary_emb"] is not None:
        kwargs["image_rotary_emb"] = tuple(t.to(device) for t in kwargs["image_rotary_emb"])
    with torch.no_grad():
        expected = model(**kwargs, return_dict=False)[0]
        model.set_attn_processor(CogVideoXAttnProcessor(backend=backend))
        assert all(isinstance(p, CogVideoXAttnProcessor) for p in model.attn_processors.values())
        actual = model(**kwargs, return_dict=False)[0]
    assert_close(actual.cpu(), expected.cpu(), (1e-5, 1e-4), f"{backend} transformer output")


@pytest.mark.parametrize("backend,device", backend_params("joint_attention"))
def test_processor_gradients_match(backend, device):
    implementation("joint_attention", backend, device)
    model = tiny_transformer(True).to(device)
    kwargs = inputs(model, 2, 8, 12)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    kwargs["image_rotary_emb"] = tuple(t.to(device) for t in kwargs["image_rotary_emb"])

    def grads():
        model.zero_grad()
        model(**kwargs, return_dict=False)[0].square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    model.set_attn_processor(CogVideoXAttnProcessor(backend=backend))
    actual = grads()
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name].cpu(), expected[name].cpu(), (1e-5, 1e-3), f"{backend} grad {name}")


def test_processor_in_bf16_is_close_and_finite():
    model = tiny_transformer(True).to(torch.bfloat16)
    kwargs = inputs(model, 3, 8, 12)
    kwargs["hidden_states"] = kwargs["hidden_states"].bfloat16()
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].bfloat16()
    with torch.no_grad():
        expected = model(**kwargs, return_dict=False)[0].float()
        model.set_attn_processor(CogVideoXAttnProcessor())
        actual = model(**kwargs, return_dict=False)[0].float()
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

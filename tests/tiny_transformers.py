"""Tiny random diffusers CogVideoX transformers of every variant, and inputs for them, shared by the
model-layer tests and the diffusers integration tests."""
import torch

diffusers = __import__("pytest").importorskip("diffusers")
from test_nn_rope3d import diffusers_cos_sin  # noqa: E402

TEXT_LEN, TEXT_DIM, TIME_DIM = 7, 16, 32

# CogVideoX variants in miniature: what each public checkpoint's config switches on
VARIANTS = {
    "2b": dict(),                                                             # 3D sin-cos positions
    "5b": dict(use_rotary_positional_embeddings=True),                        # 3D-RoPE
    "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, in_channels=8),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2),       # temporal patches
    "1.5-i2v": dict(use_rotary_positional_embeddings=True, patch_size_t=2, ofs_embed_dim=TIME_DIM, in_channels=8),
}


def tiny_transformer(variant: str = "5b", *, head_dim: int = 64, heads: int = 2, layers: int = 2, seed: int = 0,
                     **overrides):
    """A diffusers CogVideoXTransformer3DModel with random weights, including the LayerNorm affines
    and the learned position table (left at their ones/zeros/sin-cos init they would hide mistakes)."""
    torch.manual_seed(seed)
    config = dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
                  time_embed_dim=TIME_DIM, text_embed_dim=TEXT_DIM, num_layers=layers, sample_width=12,
                  sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=TEXT_LEN)
    config.update(VARIANTS[variant], **overrides)
    model = diffusers.CogVideoXTransformer3DModel(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "linear" not in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
        for name, b in model.named_buffers():
            if name == "patch_embed.pos_embedding" and model.config.use_learned_positional_embeddings:
                b.normal_(0.0, 0.5)
    return model.eval()


def transformer_inputs(model, frames, height, width, batch=2, seed=1, dtype=torch.float32):
    """Our call's inputs (latents, text_embeddings, timestep, ofs) and diffusers' rotary tables."""
    g = torch.Generator().manual_seed(seed)
    config = model.config  # diffusers' FrozenDict or our TransformerConfig
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    config = type("Config", (), config)
    latents = torch.randn(batch, frames, config.in_channels, height, width, generator=g).to(dtype)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g).to(dtype)
    timestep = torch.tensor([999, 3, 500, 0][:batch])
    ofs = torch.tensor([2.0]) if config.ofs_embed_dim else None
    rotary = diffusers_cos_sin(vars(config), frames, height, width) if config.use_rotary_positional_embeddings else None
    return dict(latents=latents, text_embeddings=text, timestep=timestep, ofs=ofs), rotary


def diffusers_forward(model, inputs, rotary):
    return model(inputs["latents"], inputs["text_embeddings"], inputs["timestep"], ofs=inputs["ofs"],
                 image_rotary_emb=rotary, return_dict=False)[0]

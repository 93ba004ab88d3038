"""Rope3D: positions from the config equal the CogVideoX pipeline's rotary tables (1.0 crop grid,
1.5 slice grid), and the module applies them through the fused ops."""
import pytest
import torch

from cogvx_kernels.nn import Rope3D
from cogvx_kernels.reference.rope3d import token_cos_sin

embeddings = pytest.importorskip("diffusers.models.embeddings")
pipeline = pytest.importorskip("diffusers.pipelines.cogvideo.pipeline_cogvideox")

CONFIG_1_0 = dict(attention_head_dim=64, sample_height=60, sample_width=90, patch_size=2, patch_size_t=None)
CONFIG_1_5 = dict(attention_head_dim=64, sample_height=96, sample_width=170, patch_size=2, patch_size_t=2)


def diffusers_cos_sin(config, frames, height, width):
    """What CogVideoXPipeline._prepare_rotary_positional_embeddings builds (latent sizes given)."""
    p, p_t = config["patch_size"], config["patch_size_t"]
    grid_h, grid_w = height // p, width // p
    base_w, base_h = config["sample_width"] // p, config["sample_height"] // p
    if p_t is None:
        crops = pipeline.get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return embeddings.get_3d_rotary_pos_embed(config["attention_head_dim"], crops, (grid_h, grid_w), frames)
    return embeddings.get_3d_rotary_pos_embed(config["attention_head_dim"], None, (grid_h, grid_w),
                                              (frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w))


@pytest.mark.parametrize("config,frames,height,width", [
    (CONFIG_1_0, 13, 60, 90),   # native 480×720
    (CONFIG_1_0, 7, 40, 64),    # 320×512: crop region, fractional positions
    (CONFIG_1_0, 3, 96, 40),    # tall: the other branch of the crop rule
    (CONFIG_1_0, 2, 12, 18),
    (CONFIG_1_5, 22, 96, 170),  # 1.5 native 768×1360, 81 frames (22 latent frames, p_t 2)
    (CONFIG_1_5, 5, 40, 64),
], ids=["1.0-native", "1.0-crop", "1.0-tall", "1.0-small", "1.5-native", "1.5-small"])
def test_positions_match_the_pipeline(config, frames, height, width):
    rope = Rope3D.from_config(config)
    cos, sin = token_cos_sin(*rope.positions(frames, height, width), rope.axes_dim, rope.theta)
    ref_cos, ref_sin = diffusers_cos_sin(config, frames, height, width)
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)


def test_forward_and_qk_apply_the_positions():
    rope = Rope3D.from_config(CONFIG_1_0, backend="cpu")
    frames, height, width, text_len = 2, 12, 18, 5
    cos, sin = diffusers_cos_sin(CONFIG_1_0, frames, height, width)
    L = text_len + frames * (height // 2) * (width // 2)
    q, k = torch.randn(2, 2, L, 64), torch.randn(2, 2, L, 64)
    expected = torch.cat([q[:, :, :text_len], embeddings.apply_rotary_emb(q[:, :, text_len:], (cos, sin))], 2)
    torch.testing.assert_close(rope(q, text_len=text_len, frames=frames, height=height, width=width), expected)

    norm_q, norm_k = torch.nn.LayerNorm(64, eps=1e-6), torch.nn.LayerNorm(64, eps=1e-6)
    q_out, k_out = rope.qk(q, k, norm_q, norm_k, text_len=text_len, frames=frames, height=height, width=width)
    nq = norm_q(q)
    expected_q = torch.cat([nq[:, :, :text_len], embeddings.apply_rotary_emb(nq[:, :, text_len:], (cos, sin))], 2)
    torch.testing.assert_close(q_out, expected_q, atol=1e-5, rtol=1e-5)


def test_1_5_grid_larger_than_the_model_raises():
    with pytest.raises(ValueError, match="exceeds the model's 48×85 position grid"):
        Rope3D.from_config(CONFIG_1_5).positions(5, 100, 170)


def test_head_dim_must_split():
    with pytest.raises(ValueError, match="multiple of 8"):
        Rope3D(60, sample_height=60, sample_width=90)

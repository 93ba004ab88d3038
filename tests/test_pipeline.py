"""cogvx.Pipeline against diffusers' CogVideoXPipeline on a tiny random pipeline folder (built by
cogvx.tiny, loaded by both): same seeded frames with DDIM and DPM, with and without dynamic CFG;
output types; bad input."""
import numpy as np
import pytest
import torch

from cogvx.pipeline import Pipeline
from cogvx.tiny import build

diffusers = pytest.importorskip("diffusers")

CALL = dict(num_frames=9, height=64, width=96, num_inference_steps=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny") / "pipe")


def diffusers_pipe(folder, scheduler):
    pipe = diffusers.CogVideoXPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    cls = diffusers.CogVideoXDDIMScheduler if scheduler == "ddim" else diffusers.CogVideoXDPMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dynamic", [False, True], ids=["cfg", "dynamic-cfg"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_seeded_frames_equal_diffusers(folder, scheduler, dynamic):
    ref = diffusers_pipe(folder, scheduler)
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32, scheduler=scheduler)
    kwargs = dict(CALL, guidance_scale=6.0, use_dynamic_cfg=dynamic, negative_prompt="blurry")
    expected = ref(["a red cat walking", "a boat on the sea"], generator=torch.Generator().manual_seed(0),
                   output_type="np", **kwargs).frames
    actual = ours(["a red cat walking", "a boat on the sea"], generator=torch.Generator().manual_seed(0),
                  output_type="np", progress=False, **kwargs).frames
    assert actual.shape == expected.shape == (2, 9, 64, 96, 3)
    err = np.abs(actual - expected).max()
    assert err <= 1e-4, f"max |ours - diffusers| = {err:.3g} (frames in [0, 1])"


def test_output_types_and_no_guidance(folder):
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)
    run = lambda kind, g=1.0: ours("a dog", generator=torch.Generator().manual_seed(1), guidance_scale=g,  # noqa: E731
                                   output_type=kind, progress=False, **CALL).frames
    array, tensor, images, latents = run("np"), run("pt"), run("pil"), run("latent")
    assert array.shape == (1, 9, 64, 96, 3) and array.min() >= 0 and array.max() <= 1
    assert tensor.shape == (1, 9, 3, 64, 96)
    np.testing.assert_allclose(tensor.permute(0, 1, 3, 4, 2).numpy(), array)
    assert len(images) == 1 and len(images[0]) == 9 and images[0][0].size == (96, 64)
    assert latents.shape == (1, 3, 4, 8, 12)
    ref = diffusers_pipe(folder, "dpm")
    expected = ref("a dog", generator=torch.Generator().manual_seed(1), guidance_scale=1.0, output_type="np",
                   **CALL).frames
    assert np.abs(array - expected).max() <= 1e-4


@pytest.mark.parametrize("change,message", [
    (dict(num_frames=8), r"num_frames must be 1 \+ 4·k"),
    (dict(height=72), "multiples of 16"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer; got 0"),
    (dict(height=0), "height must be a positive integer; got 0"),  # 0 is not "the default"
    (dict(width=-16), "width must be a positive integer; got -16"),
    (dict(num_frames=0), "num_frames must be a positive integer; got 0"),
    (dict(num_frames=9.0), "num_frames must be a positive integer; got 9.0"),
    (dict(max_sequence_length=0), "max_sequence_length must be a positive integer; got 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number; got nan"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number; got inf"),
    (dict(guidance_scale="6"), "guidance_scale must be a finite number; got '6'"),
    (dict(strength=float("nan")), "strength must be a finite number; got nan"),
    (dict(guidance_scale=0.5, negative_prompt="ugly"), "guidance_scale 0.5 < 1"),
    (dict(output_type="gif"), "output_type must be one of"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries for 1 prompts"),
    (dict(latents=torch.zeros(1, 2, 4, 8, 12)), r"latents must have shape \(1, 3, 4, 8, 12\)"),
])
def test_bad_input_raises_clear_errors(folder, change, message):
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        ours("a cat", **{**CALL, "progress": False, **change})


def test_long_prompts_warn_and_missing_parts_raise(folder, tmp_path):
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)
    with pytest.warns(UserWarning, match="prompt longer than 226 tokens"):
        ours("cat " * 300, **{**CALL, "num_inference_steps": 1, "output_type": "latent", "progress": False})
    with pytest.warns(UserWarning, match=r"prompt longer than 16 tokens \(max_sequence_length\); dropped: 'cat cat"):
        ours("cat " * 20, max_sequence_length=16,
             **{**CALL, "num_inference_steps": 1, "output_type": "latent", "progress": False})
    with pytest.raises(FileNotFoundError, match="not a CogVideoX pipeline folder"):
        Pipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks model parts: transformer, vae"):
        Pipeline.from_pretrained(tmp_path)


def frames_of(seed, count, height=64, width=96):
    """Smooth random RGB frames (PIL), the kind of input image/video users pass."""
    from PIL import Image

    g = np.random.default_rng(seed)
    base = g.random((count, height // 8, width // 8, 3))
    return [Image.fromarray((np.kron(f, np.ones((8, 8, 1))) * 255).astype(np.uint8)) for f in base]


@pytest.mark.parametrize("variant", ["i2v", "i2v-1.5"])
def test_image_to_video_equals_diffusers(tmp_path, variant):
    folder = build(tmp_path / variant, variant=variant)
    ref = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)
    image = frames_of(0, 1)[0]
    kwargs = dict(CALL, guidance_scale=6.0, output_type="np")
    expected = ref(image=image, prompt="a cat", generator=torch.Generator().manual_seed(2), **kwargs).frames
    actual = ours("a cat", image=image, generator=torch.Generator().manual_seed(2), progress=False, **kwargs).frames
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4
    with pytest.raises(ValueError, match="image-to-video checkpoint: pass image="):
        ours("a cat", **CALL)


@pytest.mark.parametrize("prompts", [1, 2])
def test_video_to_video_equals_diffusers(folder, prompts):
    ref = diffusers.CogVideoXVideoToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)
    video = frames_of(1, 9)
    prompt = ["a dog running", "a boat"][:prompts]
    kwargs = dict(height=64, width=96, num_inference_steps=4, strength=0.6, guidance_scale=6.0, output_type="np")
    expected = ref(video=video, prompt=prompt, generator=torch.Generator().manual_seed(3), **kwargs).frames
    actual = ours(prompt, video=video, generator=torch.Generator().manual_seed(3), progress=False, **kwargs).frames
    assert actual.shape == expected.shape == (prompts, 9, 64, 96, 3)
    assert np.abs(actual - expected).max() <= 1e-4
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        ours("a dog", video=video, strength=0.0, **CALL)
    with pytest.raises(ValueError, match="needs an I2V checkpoint"):
        ours("a dog", image=video[0], **CALL)


def test_strength_leaving_no_step_raises(folder):
    """diffusers starts video-to-video at step S − int(S·strength): with int(S·strength) = 0 nothing
    would be denoised."""
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)
    video = frames_of(1, 9)
    run = dict(output_type="latent", progress=False, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"strength × num_inference_steps \(0.2 × 4\) leaves no denoising step: "
                                         r"raise num_inference_steps to at least 5 or strength to at least 1/4"):
        ours("a dog", video=video, strength=0.2, num_inference_steps=4, **run)
    assert ours("a dog", video=video, strength=0.25, num_inference_steps=4, **run).frames.shape == (1, 3, 4, 8, 12)


def test_max_sequence_length_equals_diffusers(tmp_path):
    """A model whose learned position table covers 16 text tokens (diffusers' I2V test model) runs with
    max_sequence_length=16 (prompts padded/truncated to 16 tokens), its default (the transformer's
    max_text_seq_length), and equals diffusers told the same."""
    folder = build(tmp_path / "i2v16", variant="i2v", transformer=dict(max_text_seq_length=16))
    ref = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)
    image = frames_of(4, 1)[0]
    kwargs = dict(CALL, guidance_scale=6.0, output_type="np")
    prompt = "a red cat walking in a green garden near a small river under a bright blue sky at night"  # > 16 tokens
    expected = ref(image=image, prompt=prompt, negative_prompt="dark", generator=torch.Generator().manual_seed(6),
                   max_sequence_length=16, **kwargs).frames
    with pytest.warns(UserWarning, match="prompt longer than 16 tokens"):
        actual = ours(prompt, "dark", image=image, generator=torch.Generator().manual_seed(6), progress=False,
                      **kwargs).frames
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4
    positive, negative = ours.encode_prompt(["a red cat"], ["dark"])
    assert positive.shape == negative.shape == (1, 16, 32)
    with pytest.raises(ValueError, match="max_sequence_length must be 16 for this model"):
        ours(prompt, image=image, max_sequence_length=226, **CALL)


def test_prompt_embeddings_replace_the_prompt(folder):
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)
    run = dict(CALL, output_type="latent", progress=False)
    from_text = ours("a red cat", negative_prompt="blurry", generator=torch.Generator().manual_seed(5), **run).frames
    positive, negative = ours.encode_prompt(["a red cat"], ["blurry"])
    from_embeds = ours(None, prompt_embeds=positive, negative_prompt_embeds=negative,
                       generator=torch.Generator().manual_seed(5), **run).frames
    assert torch.equal(from_text, from_embeds)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        ours("a cat", prompt_embeds=positive, **run)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must have the shape of prompt_embeds"):
        ours(None, prompt_embeds=positive[:, :16], max_sequence_length=20, **run)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_pipeline_is_finite_and_close(folder, dtype):
    """fp16 / bf16 runs end to end without NaN or inf, close to the fp32 frames (same seed)."""
    run = dict(CALL, num_inference_steps=2, output_type="np", progress=False)
    full = Pipeline.from_pretrained(folder, dtype=torch.float32)("a cat", generator=torch.Generator().manual_seed(0),
                                                                  **run).frames
    half = Pipeline.from_pretrained(folder, dtype=dtype)("a cat", generator=torch.Generator().manual_seed(0),
                                                          **run).frames
    assert np.isfinite(half).all()
    assert np.abs(half - full).mean() < 0.05, np.abs(half - full).mean()


def test_from_pretrained_takes_dtype_names_and_refuses_bad_ones_before_loading(tmp_path):
    from cogvx.cli import DEFAULT_MODEL

    pipe = Pipeline.from_pretrained(DEFAULT_MODEL, dtype="fp32")
    assert pipe.dtype == torch.float32 and pipe.text_encoder.model.dtype == torch.float32
    assert next(Pipeline.from_pretrained(DEFAULT_MODEL, dtype="bfloat16").vae.parameters()).dtype == torch.bfloat16
    for bad in ("bf17", 5, torch.complex64):
        with pytest.raises(ValueError, match="dtype must be one of"):
            Pipeline.from_pretrained(tmp_path / "absent", dtype=bad)  # refused before the folder is looked at
    with pytest.raises(ValueError, match="is not a device torch knows"):
        Pipeline.from_pretrained(DEFAULT_MODEL, device="gpu0")

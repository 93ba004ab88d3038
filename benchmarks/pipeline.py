"""End-to-end benchmark: a whole text-to-video call (text encoding, denoising with CFG, VAE decode),
cogvx's `Pipeline` vs diffusers' `CogVideoXPipeline` in the same run, same seed, same folder.

CPU: the embedded tiny model (9x64x96) and a reduced pipeline with real widths (2B transformer width,
2 layers; real VAE channels; 9 frames at 128x128; a 1-layer random T5 of width 4096), 4 DPM steps.
GPU: the 2B and 5B transformers at full depth with the real VAE at 49x480x720, bf16, 4 steps,
random weights built on the device, random prompt embeddings (T5-XXL is not what is measured).
On the CPU "peak MiB" is a fresh process that loads the folder and generates; "warm MiB" a second
call. Interface: benchmarks/_interface.py.
"""
from __future__ import annotations

import torch

from ._checkpoints import cached_folder, diffusers_contenders

OP = "pipeline"
INFERENCE_ONLY = True
STEPS = 4
# a whole generation per call: one warm-up and two timed calls are enough (and all a GPU slot allows)
BUDGET = dict(warmup=1, min_reps=2, max_reps=2, target_s=0.0)

_CPU = [dict(model="tiny", F=9, H=64, W=96), dict(model="reduced-2B", F=9, H=128, W=128)]
_GPU = [dict(model="2B", F=49, H=480, W=720), dict(model="5B", F=49, H=480, W=720)]
_TINY = [dict(model="tiny", F=9, H=32, W=48)]

REDUCED = dict(transformer=dict(num_attention_heads=30, attention_head_dim=64, text_embed_dim=4096, in_channels=16,
                                out_channels=16, time_embed_dim=512, sample_height=16, sample_width=16),
               vae=dict(block_out_channels=[128, 256, 256, 512], latent_channels=16, layers_per_block=3,
                        norm_num_groups=32, sample_height=128, sample_width=128))
FULL = {"2B": dict(num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False),
        "5B": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)}


def contenders(device, dtype) -> list[str]:
    return diffusers_contenders("pipeline", _diffusers)


def _diffusers():
    import diffusers

    return diffusers


def shapes(device, quick: bool, tiny: bool = False) -> list[dict]:
    if tiny:
        return list(_TINY)
    chosen = _GPU if torch.device(device).type == "cuda" else _CPU
    return chosen[:1] if quick and torch.device(device).type == "cuda" else chosen[-1:] if quick else list(chosen)


SHAPE_SETS = {
    "cuda": f"real CogVideoX 2B / 5B at 49x480x720, {STEPS} DPM steps with CFG, random weights and embeddings",
    "cpu": (f"scaled-down CPU set, NOT the model's size: the embedded tiny model, and real widths with 2 "
            f"layers at 9x128x128; {STEPS} DPM steps with CFG"),
}


def label(shape: dict) -> str:
    return f"{shape['model']} {shape['F']}x{shape['H']}x{shape['W']}"


def _folder(shape: dict):
    from cogvx.tiny import build

    if shape["model"] == "tiny":
        from cogvx.cli import DEFAULT_MODEL
        return DEFAULT_MODEL
    return cached_folder("pipeline-reduced", REDUCED, lambda folder: build(folder, **REDUCED))


def make_inputs(shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict:
    if backward:
        raise ValueError("the pipeline benchmark is inference only (no --backward)")
    inputs = dict(shape=shape, device=torch.device(device), dtype=dtype, pipes={})
    if inputs["device"].type == "cpu":
        inputs["folder"] = _folder(shape)
    else:
        width = FULL[shape["model"]]["num_attention_heads"] * 64
        g = torch.Generator().manual_seed(seed)
        inputs["embeds"] = [torch.randn(1, 226, 4096, generator=g).to(device, dtype) for _ in range(2)]
        inputs["width"] = width
    return inputs


def _gpu_pipes(inputs, backends):
    """Random-weight transformer and VAE decoder built on the GPU by us; diffusers' modules (when
    diffusers is importable) take the same weights."""
    import cogvx
    from cogvx.pipeline import Pipeline
    from cogvx.schedulers import DPMScheduler
    from cogvx.tiny import SCHEDULER

    device, dtype, model = inputs["device"], inputs["dtype"], inputs["shape"]["model"]
    config = dict(attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096,
                  **FULL[model])
    torch.manual_seed(0)
    with torch.device(device):
        transformer = cogvx.Transformer3D(config).to(dtype).eval()
        vae = cogvx.CausalVAE(parts=("decoder",)).to(dtype).eval()   # CogVideoX's VAE config
    pipes = {"cogvx": Pipeline(transformer, vae, None, DPMScheduler(SCHEDULER))}
    if "diffusers" in backends:
        diffusers = _diffusers()
        with torch.device(device):  # built for real: the 2B sin-cos table is a non-persistent buffer
            their_transformer = diffusers.CogVideoXTransformer3DModel(**config).to(dtype)
            their_vae = diffusers.AutoencoderKLCogVideoX().to(dtype)
        their_transformer.load_state_dict(transformer.state_dict())
        their_vae.decoder.load_state_dict(vae.decoder.state_dict())
        theirs = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=their_vae.eval(),
                                             transformer=their_transformer.eval(),
                                             scheduler=diffusers.CogVideoXDPMScheduler(**SCHEDULER))
        theirs.set_progress_bar_config(disable=True)
        pipes["diffusers"] = theirs
    return pipes


def _pipe(backend: str, inputs: dict):
    if backend not in inputs["pipes"]:
        if inputs["device"].type == "cuda":
            inputs["pipes"].update(_gpu_pipes(inputs, contenders(inputs["device"], inputs["dtype"])))
        elif backend == "diffusers":
            pipe = _diffusers().CogVideoXPipeline.from_pretrained(inputs["folder"], dtype=inputs["dtype"])
            pipe.set_progress_bar_config(disable=True)
            inputs["pipes"][backend] = pipe
        else:
            from cogvx.pipeline import Pipeline
            inputs["pipes"][backend] = Pipeline.from_pretrained(inputs["folder"], dtype=inputs["dtype"])
    return inputs["pipes"][backend]


def forward(backend: str, inputs: dict):
    s, pipe = inputs["shape"], _pipe(backend, inputs)
    call = dict(num_frames=s["F"], height=s["H"], width=s["W"], num_inference_steps=STEPS, guidance_scale=6.0,
                generator=torch.Generator().manual_seed(0), output_type="pt")
    if "embeds" in inputs:
        call.update(prompt_embeds=inputs["embeds"][0], negative_prompt_embeds=inputs["embeds"][1])
        prompt = None
    else:
        prompt = "a red cat walking in a garden"
    if backend == "cogvx":
        call["progress"] = False
    elif prompt is not None:  # diffusers pads prompts to 226 tokens unless told the model's length (ours: 16)
        call["max_sequence_length"] = pipe.transformer.config.max_text_seq_length
    with torch.no_grad():
        return pipe(prompt, **call).frames


def flops(shape: dict, backward: bool) -> int:
    return 0  # not counted: reported as 0


def bytes_moved(shape: dict, dtype: torch.dtype, backward: bool) -> int:
    return shape["F"] * shape["H"] * shape["W"] * 3 * torch.empty((), dtype=dtype).element_size()

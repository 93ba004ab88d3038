"""Text-to-video: prompt -> T5 embeddings -> denoising with the expert transformer and a CogVideoX
scheduler (classifier-free guidance, cond/uncond batched) -> VAE decode -> frames.

`Pipeline.__call__` follows diffusers' `CogVideoXPipeline.__call__` (same arguments, same output
layouts) and draws random numbers exactly as it does, so a seeded run equals diffusers' for the same
`torch.Generator`.

Multi-rank (inside torchrun): `Pipeline.from_pretrained(folder, parallel="cfg=2,ulysses=2")` splits
the transformer's work over the ranks (cogvx.parallel: CFG and sequence parallelism) and decodes (and,
for image/video-to-video, encodes) with the context-parallel VAE; every rank runs the same call with
the same arguments and gets the same result (a seeded run equals the one-process run whose VAE
chunking is "whole").
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cogvx_kernels import self_check

from ._progress import progress_bar
from ._random import randn
from .loading import read_config, read_json, resolve_device, resolve_dtype
from .models import CausalVAE, Transformer3D
from .models.transformer import DIFFUSERS_CLASS as TRANSFORMER_CLASS, TransformerConfig
from .schedulers import DPMScheduler, dynamic_guidance, load_scheduler
from .text import TextEncoder

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class PipelineOutput:
    """frames: np (B, F, H, W, 3) floats in [0, 1]; pt (B, F, 3, H, W); pil: B lists of F images;
    latent: (B, F', C, h, w)."""
    frames: object


class Pipeline:
    """CogVideoX text-to-video on our transformer, VAE and schedulers (T5 through transformers)."""

    def __init__(self, transformer: Transformer3D, vae: CausalVAE, text_encoder: TextEncoder, scheduler, *,
                 scaling_factor: float | None = None, offload_text_encoder: bool = False):
        self.transformer, self.vae, self.text_encoder, self.scheduler = transformer, vae, text_encoder, scheduler
        self.scaling_factor = vae.config.scaling_factor if scaling_factor is None else scaling_factor
        self.offload_text_encoder = offload_text_encoder
        self.timings: dict[str, float] = {}  # seconds per phase of the last call
        self._vae_folder: Path | None = None  # where the encoder loads from when first needed
        self._encoder_vae: CausalVAE | None = None
        self.parallel = None  # a cogvx.parallel.ParallelRun on several ranks (from_pretrained(parallel=...))

    @classmethod
    def from_pretrained(cls, root: str | Path, *, dtype: torch.dtype | str | None = torch.bfloat16, device=None,
                        scheduler: str | None = None, offload_text_encoder: bool = False,
                        parallel: str | None = None) -> "Pipeline":
        """A diffusers-layout folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
        scheduler/. `scheduler` "ddim" / "dpm" overrides the folder's scheduler class (its schedule
        settings are kept). `dtype`: a torch dtype or a name ("bf16", "fp32", ...; None keeps the
        transformer checkpoint's), checked with `device` before anything loads.

        `parallel` (inside torchrun): a plan such as "cfg=2,ulysses=2,ring=1" whose product is the
        world size (cogvx.parallel.ParallelPlan), checked before anything loads; the process group is
        initialised if it is not (NCCL on cuda, gloo on cpu, with COGVX_DIST_TIMEOUT), and on cuda
        each rank takes the GPU of its LOCAL_RANK unless `device` names one."""
        dtype = resolve_dtype(dtype)
        root = Path(root)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{str(root)!r} is not a CogVideoX pipeline folder (no model_index.json)")
        index = read_json(root / "model_index.json")
        missing = [part for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
                   if not (root / part).is_dir()]
        if missing:
            raise FileNotFoundError(f"{str(root)!r} lacks model parts: {', '.join(missing)}")
        if index.get("_class_name") not in (None, "CogVideoXPipeline", "CogVideoXImageToVideoPipeline",
                                             "CogVideoXVideoToVideoPipeline"):
            warnings.warn(f"{root}: model_index.json names {index.get('_class_name')}; loading it as CogVideoX")
        run = None
        if parallel is not None:
            from .parallel import ParallelRun

            config = read_config(root / "transformer", TransformerConfig, TRANSFORMER_CLASS)
            run = ParallelRun.start(parallel, device, heads=config.num_attention_heads)
            device = run.device
        device = resolve_device(device)
        transformer = Transformer3D.from_pretrained(root / "transformer", dtype=dtype, device=device)
        dtype = transformer.proj_out.weight.dtype  # None: the transformer checkpoint's, for every part
        vae = CausalVAE.from_pretrained(root / "vae", dtype=dtype, device=device, parts=("decoder",))
        text_encoder = TextEncoder.from_pretrained(root, dtype=dtype, device=device)
        pipe = cls(transformer, vae, text_encoder, load_scheduler(root / "scheduler", scheduler),
                   offload_text_encoder=offload_text_encoder)
        pipe._vae_folder = root / "vae"
        if run is not None and run.world > 1:
            pipe.parallel = run.attach(transformer)
        return pipe

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out.weight.dtype

    # -- the steps ----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: list[str], negative_prompt: list[str] | None, progress: bool = False,
                      max_sequence_length: int | None = None):
        """(prompt embeddings, negative prompt embeddings or None), each (B, max_sequence_length, dim):
        the tokens padded or truncated to that length (default: the transformer's max_text_seq_length,
        as __call__), as diffusers; truncation reported as a warning."""
        if max_sequence_length is None:
            max_sequence_length = self.transformer.config.max_text_seq_length
        for text, cut in zip(prompt, self.text_encoder.truncated(prompt, max_sequence_length)):
            if cut:
                warnings.warn(f"prompt longer than {max_sequence_length} tokens (max_sequence_length); "
                              f"dropped: {cut!r}")
        groups = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        encoded = [self.text_encoder.encode(texts, device=self.device, max_length=max_sequence_length)
                   for texts in progress_bar(groups, progress, "text encoding")]
        positive, negative = encoded[0], (encoded[1] if len(encoded) > 1 else None)
        if self.offload_text_encoder:  # T5-XXL is ~9 GB in bf16: off the GPU once the prompts are encoded
            self.text_encoder.to("cpu")
        return positive, negative

    def _check(self, prompt, negative_prompt, num_frames, height, width, guidance_scale, output_type):
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt is not None and (not prompt or not all(isinstance(p, str) for p in prompt)):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is not None:
            negative_prompt = [negative_prompt] * len(prompt) if isinstance(negative_prompt, str) else negative_prompt
            if prompt is not None and len(negative_prompt) != len(prompt):
                raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompt)} prompts")
        ratio = int(self.vae.config.temporal_compression_ratio)
        if (num_frames - 1) % ratio:
            raise ValueError(f"num_frames must be 1 + {ratio}·k (e.g. 49); got {num_frames}")
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be positive multiples of 16; got {height}×{width}")
        if guidance_scale < 1 and negative_prompt is not None and any(negative_prompt):
            raise ValueError(f"guidance_scale {guidance_scale} < 1 disables guidance: the negative prompt would "
                             "be ignored")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        return prompt, negative_prompt

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "np", image=None, video=None, strength: float = 0.8,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 max_sequence_length: int | None = None, progress: bool = True) -> PipelineOutput:
        """Text-to-video; image-to-video with `image` (an I2V checkpoint: the image's latent conditions
        every step); video-to-video with `video` (a list of frames noised to `strength`, then denoised).
        `prompt_embeds` / `negative_prompt_embeds` (B, max_sequence_length, text dim) replace the
        prompts' encoding; prompts are padded or truncated to max_sequence_length tokens (default: the
        transformer's max_text_seq_length, 226 for every CogVideoX as diffusers' default; a learned
        position table fixes it to that)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt or prompt_embeds")
        if self.device.type == "cuda":  # our kernels on this GPU: checked once per (device, build), cached
            self_check.ensure(self.device)
        c, spatial = self.transformer.config, self.vae.config.spatial_factor
        max_sequence_length = c.max_text_seq_length if max_sequence_length is None else max_sequence_length
        height = c.sample_height * spatial if height is None else height  # 0 is an error, not "the default"
        width = c.sample_width * spatial if width is None else width
        counts = dict(height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
                      max_sequence_length=max_sequence_length)
        for name, value in counts.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value <= 0):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name, value in [("guidance_scale", guidance_scale), ("strength", strength)]:
            # NaN compares False with everything: it would silently turn guidance off
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        if c.use_learned_positional_embeddings and prompt is not None and max_sequence_length != c.max_text_seq_length:
            raise ValueError(f"max_sequence_length must be {c.max_text_seq_length} for this model (its learned "
                             f"position table covers that many text tokens); got {max_sequence_length}")
        if image is not None and video is not None:
            raise ValueError("pass image (image-to-video) or video (video-to-video), not both")
        i2v = c.in_channels == 2 * self.vae.config.latent_channels
        if image is not None and not i2v:
            raise ValueError("image-to-video needs an I2V checkpoint (transformer in_channels = 2 × latent channels)")
        if image is None and i2v:
            raise ValueError("this is an image-to-video checkpoint: pass image=")
        if video is not None:
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1]; got {strength}")
            if int(num_inference_steps * strength) == 0:  # diffusers would start past the last step
                raise ValueError(f"strength × num_inference_steps ({strength} × {num_inference_steps}) leaves no "
                                 f"denoising step: raise num_inference_steps to at least {math.ceil(1 / strength)} "
                                 f"or strength to at least 1/{num_inference_steps}")
            video = preprocess(video, height, width).to(self.device, self.dtype)       # (B=1, 3, F, H, W)
            num_frames = video.shape[2]
        num_frames = c.sample_frames if num_frames is None else num_frames
        prompt, negative_prompt = self._check(prompt, negative_prompt, num_frames, height, width, guidance_scale,
                                              output_type)
        guided = guidance_scale > 1.0
        if self.parallel is not None:  # a split this call cannot run on; the ranks' random draws made alike
            ratio, p = int(self.vae.config.temporal_compression_ratio), c.patch_size
            latent_frames = (num_frames - 1) // ratio + 1
            steps = -(-latent_frames // c.patch_size_t) if c.patch_size_t else latent_frames
            self.parallel.check_call(guided=guided, video_tokens=steps * (height // spatial // p) * (width // spatial // p))
            generator = self.parallel.shared_generator(generator)
            progress = progress and self.parallel.rank == 0
        clock = time.perf_counter()
        if prompt_embeds is None:
            if guided and negative_prompt is None:
                negative_prompt = [""] * len(prompt)
            positive, negative = self.encode_prompt(prompt, negative_prompt if guided else None, progress,
                                                    max_sequence_length)
        else:
            positive, negative = prompt_embeds.to(self.device), negative_prompt_embeds
            if guided and negative is None:
                negative = self.encode_prompt([""] * len(positive), None, max_sequence_length=max_sequence_length)[0]
            if guided and negative.shape != positive.shape:
                raise ValueError(f"negative_prompt_embeds must have the shape of prompt_embeds, "
                                 f"{tuple(positive.shape)}; got {tuple(negative.shape)} (max_sequence_length sets "
                                 "the length of encoded prompts)")
        self.timings = {"text": time.perf_counter() - clock}
        clock = time.perf_counter()
        embeddings = torch.cat([negative.to(positive), positive]) if guided else positive  # uncond first, as diffusers
        dtype, batch = embeddings.dtype, len(positive)

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if video is not None:  # start part-way: the last `strength` of the schedule
            start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            timesteps, num_inference_steps = timesteps[start:], num_inference_steps - start
        ratio = int(self.vae.config.temporal_compression_ratio)
        latent_frames = (num_frames - 1) // ratio + 1
        pad = (-latent_frames) % c.patch_size_t if c.patch_size_t else 0  # 1.5: whole temporal patches, at the front
        channels = self.vae.config.latent_channels
        shape = (batch, latent_frames + pad, channels, height // spatial, width // spatial)
        # random numbers in diffusers' order: posterior samples of the image/video first, then the noise
        condition = self._image_latents(image, batch, shape, generator) if image is not None else None
        clean = self._encode(video, generator) if video is not None else None
        if latents is None:
            latents = randn(shape, generator, self.device, dtype)
            if clean is not None:
                latents = self.scheduler.add_noise(clean.to(dtype), latents, timesteps[:1].repeat(batch))
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        ofs = latents.new_full((1,), 2.0) if c.ofs_embed_dim else None

        dpm = isinstance(self.scheduler, DPMScheduler)
        denoiser = self.transformer if self.parallel is None else self.parallel.transformer
        for i, t in enumerate(progress_bar(timesteps, progress, "denoising")):
            model_input = torch.cat([latents] * 2) if guided else latents
            if condition is not None:
                model_input = torch.cat([model_input, torch.cat([condition] * 2) if guided else condition], dim=2)
            velocity = denoiser(model_input, embeddings, t.expand(model_input.shape[0]), ofs=ofs).float()
            scale = dynamic_guidance(guidance_scale, t.item(), num_inference_steps) if use_dynamic_cfg \
                else guidance_scale
            if guided:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + scale * (cond - uncond)
            if dpm:
                latents = self.scheduler.step(velocity, t, latents, timestep_back=timesteps[i - 1] if i > 0 else None,
                                              generator=generator)
            else:
                latents = self.scheduler.step(velocity, t, latents)
            latents = latents.to(dtype)

        self.timings["denoise"] = time.perf_counter() - clock
        if output_type == "latent":
            return PipelineOutput(frames=latents)
        clock = time.perf_counter()
        frames = postprocess(self.decode(latents[:, pad:], progress=progress), output_type)
        self.timings["decode"] = time.perf_counter() - clock
        return PipelineOutput(frames=frames)

    def _encoder(self) -> CausalVAE:
        """The VAE's encoder, loaded on first use (text-to-video never needs it)."""
        if self.vae.encoder is None:
            if self._vae_folder is None:
                raise RuntimeError("this pipeline's VAE has no encoder and no folder to load it from")
            self._encoder_vae = self._encoder_vae or CausalVAE.from_pretrained(
                self._vae_folder, dtype=self.dtype, device=self.device, parts=("encoder",))
            return self._encoder_vae
        return self.vae

    def _encode(self, video: torch.Tensor, generator) -> torch.Tensor:
        """The scaled posterior sample (1, F', C, h, w) of a (1, 3, F, H, W) video: one draw, shared by
        all prompts (diffusers draws once per input video)."""
        sample = self._vae_encode(video).sample(generator)
        return self.scaling_factor * sample.to(self.dtype).permute(0, 2, 1, 3, 4)

    def _image_latents(self, image, batch: int, shape: tuple, generator) -> torch.Tensor:
        """The I2V condition: the image's scaled posterior sample as the first latent frame, zeros after
        (divided by the scaling factor instead when the VAE's config says invert_scale_latents)."""
        height, width = shape[3] * self.vae.config.spatial_factor, shape[4] * self.vae.config.spatial_factor
        frame = preprocess([image], height, width).to(self.device, self.dtype)           # (1, 3, 1, H, W)
        first = self._vae_encode(frame).sample(generator).to(self.dtype)   # one draw, as diffusers
        first = first.permute(0, 2, 1, 3, 4).expand(batch, -1, -1, -1, -1)
        first = (1 / self.scaling_factor) * first if self.vae.config.invert_scale_latents else self.scaling_factor * first
        zeros = torch.zeros((batch, shape[1] - 1, *shape[2:]), device=self.device, dtype=self.dtype)
        return torch.cat([first, zeros], dim=1)

    def _vae_encode(self, video: torch.Tensor):
        """The posterior of (B, 3, F, H, W) frames: context parallel on several ranks."""
        if self.parallel is not None:
            return self.parallel.encode(self._encoder(), video)
        return self._encoder().encode(video)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """(B, F', C, h, w) latents -> (B, 3, F, H, W) video in [-1, 1] (context parallel on several
        ranks: equal to one process's decode with chunking="whole")."""
        latents = (1 / self.scaling_factor) * latents.permute(0, 2, 1, 3, 4)
        if self.parallel is not None:
            return self.parallel.decode(self.vae, latents)
        return self.vae.decode(latents, progress=progress)


def preprocess(frames, height: int, width: int) -> torch.Tensor:
    """Frames (PIL images, or (H, W, 3) uint8 arrays, or file paths) -> (1, 3, F, H, W) in [-1, 1],
    resized with Lanczos when their size differs, as diffusers' VideoProcessor does."""
    from PIL import Image

    arrays = []
    for frame in frames:
        if isinstance(frame, (str, Path)):
            try:
                frame = Image.open(frame)
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read image {frame}: {exc}") from None
        if isinstance(frame, np.ndarray):
            frame = Image.fromarray(frame)
        if not isinstance(frame, Image.Image):
            raise ValueError(f"frames must be PIL images, uint8 arrays or paths; got {type(frame).__name__}")
        frame = frame.convert("RGB")
        if frame.size != (width, height):
            frame = frame.resize((width, height), Image.LANCZOS)
        arrays.append(np.array(frame).astype(np.float32) / 255.0)
    video = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2)[None]          # (1, 3, F, H, W)
    return 2.0 * video - 1.0


def postprocess(video: torch.Tensor, output_type: str):
    """(B, 3, F, H, W) in [-1, 1] -> diffusers' output layouts ((x/2 + 1/2) clamped to [0, 1])."""
    frames = (video.permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(0, 1)        # (B, F, 3, H, W)
    if output_type == "pt":
        return frames
    array = frames.permute(0, 1, 3, 4, 2).float().cpu().numpy()              # (B, F, H, W, 3)
    if output_type == "np":
        return array
    from PIL import Image

    return [[Image.fromarray(frame) for frame in (clip * 255).round().astype(np.uint8)] for clip in array]

"""Training CogVideoX's transformer (`cogvx train`): one loop, read top to bottom, like diffusers'
examples/cogvideo/train_cogvideox_lora.py.

    train_transformer(load_transformer_config("configs/transformer-tiny.toml"), "runs/transformer-tiny")

Set-up: seed, device, torch.distributed when launched by torchrun; the transformer (a diffusers-format
folder, or new from a layout), with LoRA adapters (peft) or all of it trainable; the pipeline folder's
scheduler (its ᾱ table defines the noise schedule), VAE and T5 (frozen; only what the data and the
validation need); AdamW with warm-up then constant or cosine LR; DDP or FSDP2 across ranks. Each
step, for each of `grad_accumulation` micro-batches:

1. inputs: clean latents x0 (the VAE's posterior sampled, × scaling_factor; `latents.training_inputs`)
   and T5 embeddings, from clips encoded now or from a latent cache; each sample's text replaced by
   the empty prompt's with probability `loss.text_dropout` (classifier-free guidance needs it);
2. noise ε and a timestep t per sample, t uniform in [timestep_min, timestep_max];
   x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε (the scheduler's add_noise);
3. the transformer predicts v; loss = mean((v_pred − v)²), v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0
   (`losses.v_prediction_loss`: diffusers' 1/(1 − ᾱ)-weighted x0 loss, exactly); backward.

Then clip, AdamW step, LR step, EMA; a CSV row; on their schedules, validation videos of fixed prompts
(our Pipeline with the current weights) and checkpoints (a diffusers transformer folder, or the LoRA
file diffusers' load_lora_weights reads).

Scale: DDP (each rank its share of the batch, gradients averaged) or FSDP2 (`fully_shard` per
transformer block, then the whole). Determinism: every random draw of a sample (posterior noise,
diffusion noise, timestep, text dropout) comes from a generator seeded by (seed, step, micro-batch,
the sample's index in the global batch), so a step's loss depends neither on how the batch is split
over ranks nor on where a run was resumed.

Precision: the trained weights are fp32 (bf16 autocast on a GPU with mixed_precision = "bf16"); the
frozen VAE and T5, and a LoRA run's frozen base outside FSDP, are held in bf16 then (FSDP2 wants one
dtype per block: there the base stays fp32 and sharded).
"""
from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..loading import ConfigError
from ..models.transformer import Transformer3D
from . import checkpoint as ckpt
from .log import CSVLog, peak_memory, progress
from .loop import (ParameterEMA, adamw, autocast_context, distributed, lr_lambda, mean_over_ranks, resume_point,
                   sample_generator, training_device)

KEEP_CHECKPOINTS = 3
WHAT = "transformer training"
COLUMNS = ["step", "loss", "lr", "grad_norm", "sec_per_step", "peak_memory", "skipped"]


# -- pieces of the loop -------------------------------------------------------------------------------
class EMAWeights:
    """A fully fine-tuned transformer's EMA as a checkpoint part: the model's state with its trained
    parameters replaced by their averages, written as a diffusers folder (`transformer_ema/`)."""

    def __init__(self, model: Transformer3D, ema: ParameterEMA):
        self.model, self.ema, self.config = model, ema, model.config

    def save_pretrained(self, folder, *, state_dict):
        self.model.save_pretrained(folder, state_dict=state_dict)

    def state_dict(self) -> dict:
        return {**self.model.state_dict(), **self.ema.shadow}

    def load_state_dict(self, state: dict) -> None:
        for name, average in self.ema.shadow.items():
            ckpt.copy_full_into(average, state[name])


def pad_to_temporal_patches(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """(B, C, F', h, w) latents with the first frame repeated in front up to a multiple of
    patch_size_t (CogVideoX 1.5's temporal patches), as CogVideo's fine-tuning code pads them."""
    extra = (-latents.shape[2]) % patch_size_t if patch_size_t else 0
    if not extra:
        return latents
    return torch.cat([latents[:, :, :1].expand(-1, -1, extra, -1, -1), latents], dim=2)


def draw_diffusion(generators: list[torch.Generator], shape: tuple, t_min: int, t_max: int, p_drop: float):
    """Per sample, from its generator after its posterior draw: noise ε (fp32, `shape` (B, ...)),
    a timestep uniform in [t_min, t_max], and whether its text is dropped (probability p_drop)."""
    noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
    timesteps = torch.cat([torch.randint(t_min, t_max + 1, (1,), generator=g) for g in generators])
    dropped = torch.stack([torch.rand((), generator=g) < p_drop for g in generators])
    return noise, timesteps, dropped


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


@torch.no_grad()
def validate(transformer, vae, scheduler, prompt_embeds, negative_embeds, settings, sizes, folder: Path | None,
             autocast) -> list[Path]:
    """Generate a video per validation prompt with the current weights (our Pipeline; seeded, so
    steps compare), written as mp4s into `folder` (rank 0; None: generate only, as the other ranks
    of an FSDP run must, their forwards being collective). Returns the files written."""
    from ..cli import write_video
    from ..pipeline import Pipeline, postprocess

    frames, height, width = sizes
    pipe = Pipeline(transformer, vae, None, scheduler)
    was_training = transformer.training
    transformer.eval()
    written = []
    try:
        for i in range(len(prompt_embeds)):
            generator = torch.Generator().manual_seed(settings.seed)
            with autocast:
                latents = pipe(prompt=None, prompt_embeds=prompt_embeds[i:i + 1],
                               negative_prompt_embeds=negative_embeds[i:i + 1], num_frames=frames, height=height,
                               width=width, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                               generator=generator, output_type="latent", progress=False).frames
            pad = latents.shape[1] - ((frames - 1) // int(vae.config.temporal_compression_ratio) + 1)  # 1.5's padding
            weight = next(vae.parameters())
            video = postprocess(pipe.decode(latents[:, pad:].to(weight.dtype)), "np")[0]  # (F, H, W, 3) in [0, 1]
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{i:02d}-{_slug(settings.prompts[i])}.mp4"
                write_video((video * 255).round().astype(np.uint8), path, fps=settings.fps)
                written.append(path)
    finally:
        transformer.train(was_training)
    return written


# -- the loop -----------------------------------------------------------------------------------------
def train_transformer(config, out_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train as `config` (a TransformerTrainConfig) says, writing checkpoints, log.csv and validation
    videos to out_dir (default: config.train.out). resume=True continues from the latest checkpoint
    there. Returns {"step", "checkpoint", "last": the last logged row, "validation": the last videos}."""
    from ..models.vae import CausalVAE
    from ..schedulers import load_scheduler
    from ..text import TextEncoder
    from .data import Batches, make_dataset
    from .latents import training_inputs
    from .lora import WEIGHT_NAME, LoRAWeights, add_lora
    from .losses import v_prediction_loss

    c_model, c_lora, c_data, c_loss, c_optim, c_train, c_val = (config.model, config.lora, config.data, config.loss,
                                                                config.optim, config.train, config.validation)
    out_dir = Path(out_dir if out_dir is not None else c_train.out)
    config.check_files()

    # ---- set-up: processes, device, seed
    device = training_device(c_train.device)
    rank, world, owns_group = distributed(device.type)
    log = bar = None
    try:
        main = rank == 0
        latest = resume_point(out_dir, resume)
        torch.manual_seed(c_train.seed)  # the same initial weights (and LoRA adapters) on every rank
        np.random.seed(c_train.seed)
        fsdp = world > 1 and c_train.parallel == "fsdp"
        lora = c_model.finetune == "lora"
        frozen_dtype = torch.bfloat16 if device.type == "cuda" and c_train.mixed_precision == "bf16" else torch.float32

        # ---- models: the transformer (trained), the schedule, the frozen VAE and T5
        base_dtype = frozen_dtype if lora and not fsdp else torch.float32
        if c_model.pretrained is not None:
            transformer = Transformer3D.from_pretrained(c_model.pretrained, dtype=base_dtype, device=device)
        else:
            transformer = Transformer3D(c_model.transformer).to(device, base_dtype)
        lora_config = None
        if lora:
            try:
                lora_config = add_lora(transformer, rank=c_lora.rank, alpha=c_lora.alpha,
                                       target_modules=c_lora.target_modules, dropout=c_lora.dropout)
            except ValueError as exc:
                raise ConfigError(WHAT, [f"lora.target_modules: {exc}"], config.source) from None
            for p in transformer.parameters():  # the adapters train in fp32 over a bf16 base
                if p.requires_grad:
                    p.data = p.data.float()
        if c_train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        patch_size_t = transformer.config.patch_size_t

        scheduler_folder = config.pipeline / "scheduler"
        noise_schedule = load_scheduler(scheduler_folder)  # its ᾱ table (float64) is the sampler's
        alphas_cumprod = noise_schedule.alphas_cumprod
        t_min = c_loss.timestep_min
        t_max = c_loss.timestep_max if c_loss.timestep_max is not None else len(alphas_cumprod) - 1
        raw = c_data.cache is None  # clips encoded at every step, or latents cached ahead
        vae_config = config.vae_config()
        vae = text_encoder = None
        if raw or c_val.prompts:  # encoding clips, decoding validation videos
            vae_parts = ("encoder", "decoder") if raw else ("decoder",)
            vae = CausalVAE.from_pretrained(config.pipeline / "vae", dtype=frozen_dtype, device=device, parts=vae_parts)
            vae.requires_grad_(False).eval()
        if config.needs_text_encoder():
            text_encoder = TextEncoder.from_pretrained(config.pipeline, dtype=frozen_dtype, device=device)
            text_encoder.model.requires_grad_(False)
            text_encoder.max_length = transformer.config.max_text_seq_length  # the model trained, not the folder's

        # ---- data; the empty prompt's embedding (text dropout) and the validation prompts'
        try:
            if raw:
                dataset = make_dataset(c_data.source, buckets=c_data.shapes, seed=c_data.seed,
                                       length=c_data.length if c_data.synthetic else None)
                empty_text = text_encoder.encode([""], device=device, dtype=torch.float32)[0]
            else:  # written by `cogvx cache-latents` from these models and buckets (else CacheError)
                from .cache import LatentCache
                dataset = LatentCache(c_data.cache, pipeline=config.pipeline, buckets=c_data.shapes)
                empty_text = dataset.empty_text.to(device, torch.float32)
        except (OSError, ValueError) as exc:
            raise ConfigError(WHAT, [f"data.{'source' if raw else 'cache'}: {exc}"], config.source) from None
        if empty_text.shape[-1] != transformer.config.text_embed_dim:  # (T5's width was checked with the files)
            raise ConfigError(WHAT, [f"data.cache: its text embeddings are {empty_text.shape[-1]} wide, the "
                                     f"transformer takes {transformer.config.text_embed_dim}"], config.source)
        if empty_text.shape[0] != transformer.config.max_text_seq_length:
            raise ConfigError(WHAT, [f"data.cache: its prompts are {empty_text.shape[0]} tokens, the transformer is "
                                     f"made for max_text_seq_length {transformer.config.max_text_seq_length}: make the "
                                     "cache from a pipeline whose transformer has that length"], config.source)
        prompt_embeds = negative_embeds = None
        if c_val.prompts:
            prompts = list(c_val.prompts)
            prompt_embeds = text_encoder.encode(prompts, device=device, dtype=torch.float32)
            negative_embeds = text_encoder.encode([c_val.negative_prompt] * len(prompts), device=device,
                                                  dtype=torch.float32)
        if not raw:
            text_encoder = None  # a cache holds the captions' embeddings: T5 (XXL: ~9 GB in bf16) is not needed
        validation_size = config.validation_size(transformer.config, vae_config)

        # ---- across ranks
        model = transformer
        if fsdp:
            from torch.distributed.fsdp import fully_shard
            for block in transformer.transformer_blocks:
                fully_shard(block)
            fully_shard(transformer)
        elif world > 1:
            model = nn.parallel.DistributedDataParallel(transformer, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
        model_dtype = transformer.proj_out.weight.dtype
        if prompt_embeds is not None:
            prompt_embeds, negative_embeds = prompt_embeds.to(model_dtype), negative_embeds.to(model_dtype)

        # ---- optimiser, LR schedule, EMA; what a checkpoint holds
        params = [p for p in transformer.parameters() if p.requires_grad]
        optim = adamw(params, c_optim.lr, c_optim.betas, c_optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(c_optim.warmup_steps, c_train.steps,
                                                                   c_optim.schedule))
        ema = ParameterEMA(transformer, c_train.ema_decay) if c_train.ema_decay is not None else None
        if lora:
            parts = {WEIGHT_NAME: LoRAWeights(transformer, lora_config)}
            if ema:
                parts[f"{WEIGHT_NAME}_ema"] = LoRAWeights(transformer, lora_config, ema.shadow)
        else:
            parts = {"transformer": transformer, **({"transformer_ema": EMAWeights(transformer, ema)} if ema else {})}
        optimizers = {"transformer": ckpt.ShardedOptimizer(transformer, optim) if fsdp else optim}
        schedulers = {"transformer": sched}

        # ---- resume
        step, position = 0, 0
        if resume:
            state = ckpt.load_checkpoint(latest, models=parts, optimizers=optimizers, schedulers=schedulers)
            step, position = state["step"], state["data_position"]
            if main:
                print(f"resumed from {latest} at step {step}")
        batches = Batches(dataset, batch_size=c_data.batch_size, seed=c_data.seed, rank=rank, world=world,
                          num_workers=c_data.num_workers, start=position, image_ratio=c_data.image_ratio)

        autocast = autocast_context(device, c_train.mixed_precision)
        log = CSVLog(out_dir / "log.csv", COLUMNS, resume_step=step) if main else None
        bar = progress(c_train.steps, step, main)
        skipped, saved, written, row = 0, None, [], {}
        accumulation = c_optim.grad_accumulation

        # ---- the loop
        while step < c_train.steps:
            started = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64)
            for micro in range(accumulation):
                batch = next(batches)
                skipped += batch.get("skipped", 0)
                size = len(batch["caption"])
                # rank r holds the samples r, r + world, ... of the global batch (Batches): their generators
                generators = [sample_generator(c_train.seed, step, micro, rank + i * world) for i in range(size)]
                # 1. clean latents and text; the text dropout
                latents, text = training_inputs(batch, vae=vae, text_encoder=text_encoder,
                                                scaling_factor=vae_config.scaling_factor, generator=generators,
                                                device=device)
                latents = pad_to_temporal_patches(latents, patch_size_t)
                noise, timesteps, dropped = draw_diffusion(generators, tuple(latents.shape), t_min, t_max,
                                                           c_loss.text_dropout)
                text = torch.where(dropped.to(device)[:, None, None], empty_text, text)
                # 2. noised at t, in the transformer's layout (B, F', C, h, w)
                latents, noise = latents.transpose(1, 2), noise.to(device).transpose(1, 2)
                timesteps = timesteps.to(device)
                noisy = noise_schedule.add_noise(latents, noise, timesteps)
                # 3. predict v; the loss; backward (gradients synchronised on the last micro-batch)
                last_micro = micro == accumulation - 1
                if fsdp:
                    transformer.set_requires_gradient_sync(last_micro)
                sync = model.no_sync() if model is not transformer and not last_micro else contextlib.nullcontext()
                with sync, warnings.catch_warnings():
                    # FSDP2 warns that the root returns a view (in-place ops on it would skip a hook): the
                    # loss only reads it
                    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view", UserWarning)
                    with autocast:
                        prediction = model(noisy.to(model_dtype), text.to(model_dtype), timesteps)
                    loss = v_prediction_loss(prediction, latents, noise, timesteps, alphas_cumprod)
                    (loss / accumulation).backward()
                loss_sum += loss.detach().double().cpu() / accumulation
                del prediction, loss
            grad_norm = nn.utils.clip_grad_norm_(params, c_optim.grad_clip if c_optim.grad_clip > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            optim.step()
            optim.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]
            sched.step()
            if ema is not None:
                ema.update(transformer)
            step += 1

            # log, validate, checkpoint
            if step % c_train.log_every == 0 or step == c_train.steps:
                loss_mean = mean_over_ranks(loss_sum.to(device), world).item()
                total_skipped = torch.tensor([skipped], device=device)
                if world > 1:
                    dist.all_reduce(total_skipped)
                row = {"step": step, "loss": loss_mean, "lr": lr, "grad_norm": float(grad_norm),
                       "sec_per_step": time.perf_counter() - started, "peak_memory": peak_memory(device),
                       "skipped": int(total_skipped.item())}
                skipped = 0
                if main:
                    log.write(row)
                    bar.set_postfix({"loss": f"{loss_mean:.4g}"}, refresh=False)
            bar.update(1)
            validate_now = (c_train.validate_every and step % c_train.validate_every == 0) or step == c_train.steps
            if validate_now and prompt_embeds is not None and (main or fsdp):  # FSDP: every rank's forward
                folder = out_dir / "validation" / f"step-{step}" if main else None
                with ema.swapped(transformer) if ema else contextlib.nullcontext():
                    written = validate(transformer, vae, load_scheduler(scheduler_folder), prompt_embeds,
                                       negative_embeds, c_val, validation_size, folder, autocast)
                if main:
                    bar.write(f"step {step}: validation videos in {folder}")
            if world > 1 and validate_now and prompt_embeds is not None:
                dist.barrier()  # DDP: the other ranks wait for rank 0's videos
            if step % c_train.checkpoint_every == 0 or step == c_train.steps:
                saved = ckpt.save_checkpoint(out_dir, step, models=parts, optimizers=optimizers, schedulers=schedulers,
                                             data_position=batches.position, config=config, keep=KEEP_CHECKPOINTS)
        return {"step": step, "checkpoint": saved, "last": row, "validation": written}
    finally:  # also when stopped (Ctrl-C, SIGTERM): the bar ends before the caller's last line
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if owns_group:
            dist.destroy_process_group()

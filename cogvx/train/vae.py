"""Training the 3D causal VAE (`cogvx train-vae`): one loop, read top to bottom, like diffusers'
training examples.

    train_vae(load_vae_config("configs/vae-tiny.toml"), "runs/vae-tiny")

Set-up: seed, device, torch.distributed when launched by torchrun (gloo on CPU, NCCL on GPU), the
VAE (a diffusers-format folder or from scratch; whole-clip chunking, as SAT trains it), the 3D
discriminator, LPIPS, two AdamW optimisers with warm-up then constant or cosine LR, the data with
held-out validation clips. Each step:

1. VAE: encode → sample → decode, loss = w_rec·rec + w_kl·KL + w_lpips·LPIPS
   (+ from `gan_start_step`: w_gan · adaptive weight · generator loss), backward (each head, L2 +
   LPIPS and the discriminator, back-propagated once to the reconstruction, then the VAE once from
   there; accumulated over `grad_accumulation` micro-batches), clip, fused AdamW step;
2. discriminator (from `gan_start_step`): hinge / non-saturating loss on real vs reconstructed
   clips (+ R1 gradient penalty), AdamW step;
3. EMA of the VAE weights; a CSV row; checkpoints, validation (PSNR/SSIM + an input | reconstruction
   mp4) on their schedules.

Scale: under torchrun, stage 1 is data parallel (DDP: each rank its share of the batch; gradients
averaged), stage 2 (`train.context_parallel`) context parallel along time: every rank holds the same
clips and encodes/decodes its frame slice (cogvx.parallel.vae), each rank's losses scaled by its share
of the frames, parameter gradients summed over ranks: the one-process step for the reconstruction,
KL and LPIPS terms (tested); the discriminator judges each rank's frames on their own (its temporal
receptive field stops at the slice boundary), so with the GAN term on, stage 2 differs from one
process there. The adaptive GAN weight uses the ranks' combined last-layer gradients in both modes.
Validation runs on rank 0 under DDP, on every rank (context-parallel encode/decode) under CP.

Determinism: the posterior's noise is drawn per sample from a generator seeded by (seed, step,
micro-batch, global sample index), so it depends neither on how the batch is split over ranks nor on
where a run was resumed; the data order comes from `Batches` (seeded, positioned), everything else
from the RNG states a checkpoint restores.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..loading import ConfigError
from ..models.vae import CausalVAE
from . import checkpoint as ckpt
from .log import CSVLog, peak_memory, progress
from .loop import (EMA, adamw, autocast_context, distributed, lr_lambda, mean_over_ranks, resume_point,
                   sample_noise, training_device)

KEEP_CHECKPOINTS = 3
TERMS = ("rec", "kl", "lpips", "gan", "gan_weight", "disc", "gp")


# -- metrics ------------------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements: 10·log10(range² / MSE) (inf when equal)."""
    mse = (x.double() - y.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """SSIM (Wang et al. 2004) of two videos (B, C, F, H, W): per frame and channel with an 11×11
    Gaussian window (σ 1.5) over the valid positions, K1 0.01, K2 0.03; the mean over everything."""
    if x.shape != y.shape or x.dim() != 5:
        raise ValueError(f"ssim takes two (B, C, F, H, W) videos of one shape; got {tuple(x.shape)}, {tuple(y.shape)}")
    frames = lambda v: v.double().transpose(1, 2).flatten(0, 2)[:, None]  # (B·F·C, 1, H, W)
    x, y = frames(x), frames(y)
    size = min(11, x.shape[-2], x.shape[-1])
    window = _gaussian_window(size)[None, None].to(x.device)
    blur = lambda v: F.conv2d(v, window)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean().item()


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (what a viewer sees)."""
    return ((video.float() + 1) / 2).clamp(0, 1)


# -- pieces of the loop -------------------------------------------------------------------------------
class Autoencode(nn.Module):
    """encode → sample (mean + std · noise) → decode as one forward, so DDP sees the whole step.
    Under autocast the latents are cast back to the weights' dtype (the decoder checks it)."""

    def __init__(self, vae: CausalVAE):
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor, noise: torch.Tensor):
        posterior = self.vae.encode(video)
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(latents.to(video.dtype)), posterior


def _adaptive_weight(rec: torch.Tensor, grad_nll: torch.Tensor, grad_gan: torch.Tensor, last_layer: torch.Tensor,
                     max_weight: float, world: int, context_parallel: bool) -> torch.Tensor:
    """LDM's adaptive GAN weight from the last layer's gradients of the two terms (their gradients at
    the reconstruction taken once: losses.output_gradient) over ranks: those of the whole batch (DDP:
    the mean of the ranks' gradients, each rank's loss a mean over its equal share) or of the whole
    clip (context parallel: their sum, each rank's loss its share), so every rank uses the weight one
    process would compute."""
    from .losses import last_layer_gradient, weight_from_gradients

    grads = torch.stack([last_layer_gradient(rec, g, last_layer).float() for g in (grad_nll, grad_gan)])
    if world > 1:
        dist.all_reduce(grads)
        if not context_parallel:
            grads /= world
    return weight_from_gradients(grads[0], grads[1], max_weight)


def _frames_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return (to_unit(video) * 255).round().byte().permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def validate(vae: CausalVAE, clips: list[torch.Tensor], device, autocast, video_path: Path | None,
             cp_group=None) -> dict:
    """PSNR and SSIM (on [0, 1]) of the posterior-mode reconstructions of the held-out clips; the
    first clip's input | reconstruction side by side written to `video_path` (rank 0)."""
    from ..cli import write_video

    was_training = vae.training
    vae.eval()
    scores, first = [], None
    for clip in clips:
        x = clip[None].to(device)
        with autocast:
            if cp_group is None:
                rec = vae.decode(vae.encode(x).mode())
            else:
                from ..parallel.vae import decode, encode
                rec = decode(vae, encode(vae, x, group=cp_group).mode(), group=cp_group)
        rec = rec.float()
        scores.append((psnr(to_unit(x), to_unit(rec)), ssim(to_unit(x), to_unit(rec))))
        if first is None:
            first = torch.cat([x[0], rec[0]], dim=-1)  # input | reconstruction
    vae.train(was_training)
    if video_path is not None and first is not None:
        video_path.parent.mkdir(parents=True, exist_ok=True)
        write_video(_frames_uint8(first), video_path, fps=8)
    finite = [p for p, _ in scores if math.isfinite(p)]
    return {"val_psnr": sum(finite) / len(finite) if finite else math.inf,
            "val_ssim": sum(s for _, s in scores) / len(scores)}


# -- the loop -----------------------------------------------------------------------------------------
def train_vae(config, out_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train as `config` (a VAETrainConfig) says, writing checkpoints, log.csv and validation videos
    to out_dir (default: config.train.out). resume=True continues from the latest checkpoint there.
    Returns {"step", "checkpoint", "last": the last logged row, "validation": the last scores}."""
    from .data import Batches, make_dataset, split_validation
    from .losses import (LPIPS, Discriminator3D, discriminator_loss, generator_loss, gradient_penalty, kl_loss,
                         output_gradient, reconstruction_gradient)

    c_model, c_data, c_loss, c_disc, c_optim, c_train = (config.model, config.data, config.loss, config.discriminator,
                                                         config.optim, config.train)
    out_dir = Path(out_dir if out_dir is not None else c_train.out)
    config.check_files()

    # ---- set-up: processes, device, seed
    device = training_device(c_train.device)
    rank, world, owns_group = distributed(device.type)
    log = bar = None
    try:
        config.check_world(world)
        context_parallel = c_train.context_parallel and world > 1
        main = rank == 0
        latest = resume_point(out_dir, resume)
        torch.manual_seed(c_train.seed)  # the same initial weights on every rank
        np.random.seed(c_train.seed)

        # ---- models
        if c_model.pretrained is not None:
            vae = CausalVAE.from_pretrained(c_model.pretrained, dtype=torch.float32, device=device, chunking="whole")
        else:
            vae = CausalVAE(c_model.vae, chunking="whole").to(device)
        vae.set_chunking("whole").train()  # one chunk per clip: GroupNorm over the clip, as SAT trains
        latent_frames = 1 + (c_data.frames - 1) // int(vae.config.temporal_compression_ratio)
        if vae.decoded_frames(latent_frames) != c_data.frames:  # an even latent count decodes to 4 frames each
            raise ConfigError("VAE training", [
                f"data.frames = {c_data.frames} gives {latent_frames} latent frames, which decode to "
                f"{vae.decoded_frames(latent_frames)} frames: reconstructions must have the clip's length, so "
                f"data.frames must give an odd latent count (1 + 8k: {c_data.frames - 4} or {c_data.frames + 4})"],
                config.source)
        if c_train.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        discriminator = Discriminator3D(3, c_disc.channels, c_disc.layers).to(device).train()
        lpips = None
        if c_loss.lpips_weight > 0:
            lpips = LPIPS(c_loss.lpips_backbone).to(device)
            if main:
                random_backbone = lpips.backbone_name == "random"
                print("LPIPS backbone: " + ("random (tests only: its distances mean little)" if random_backbone
                                            else lpips.backbone_name))
        ema = EMA(vae, c_train.ema_decay) if c_train.ema_decay is not None else None
        last_layer = vae.decoder.conv_out.conv.weight

        autoencode, disc_model = Autoencode(vae), discriminator
        if world > 1 and not context_parallel:
            ids = [device.index] if device.type == "cuda" else None
            autoencode = nn.parallel.DistributedDataParallel(autoencode, device_ids=ids)
            disc_model = nn.parallel.DistributedDataParallel(discriminator, device_ids=ids)
        cp_group = dist.group.WORLD if context_parallel else None

        # ---- optimisers and LR schedules
        optim = adamw(vae.parameters(), c_optim.lr, c_optim.betas, c_optim.weight_decay)
        disc_optim = adamw(discriminator.parameters(), c_optim.disc_lr, c_optim.betas, c_optim.weight_decay)
        schedule = lr_lambda(c_optim.warmup_steps, c_train.steps, c_optim.schedule)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
        disc_sched = torch.optim.lr_scheduler.LambdaLR(disc_optim, schedule)
        optimizers = {"vae": optim, "discriminator": disc_optim}
        schedulers = {"vae": sched, "discriminator": disc_sched}
        parts = {"vae": vae, "discriminator": discriminator, **({"vae_ema": ema.model} if ema else {})}  # checkpointed

        # ---- data: the last validation_clips clips held out
        try:  # a folder with no readable file, too few clips to hold some out: before any step
            dataset = make_dataset(c_data.source, frames=c_data.frames, height=c_data.height, width=c_data.width,
                                   seed=c_data.seed, length=c_data.length if c_data.synthetic else None)
            train_set, held_out = split_validation(dataset, c_data.validation_clips)
        except (OSError, ValueError) as exc:
            raise ConfigError("VAE training", [f"data.source: {exc}"], config.source) from None
        validation = [item["video"] for i in range(len(held_out)) if (item := held_out[i]) is not None]
        data_rank, data_world = (0, 1) if context_parallel else (rank, world)  # CP: every rank the same clips

        # ---- resume
        step, position = 0, 0
        if resume:
            state = ckpt.load_checkpoint(latest, models=parts, optimizers=optimizers, schedulers=schedulers)
            step, position = state["step"], state["data_position"]
            if main:
                print(f"resumed from {latest} at step {step}")
        batches = Batches(train_set, batch_size=c_data.batch_size, seed=c_data.seed, rank=data_rank,
                          world=data_world, num_workers=c_data.num_workers, start=position)

        autocast = autocast_context(device, c_train.mixed_precision)
        columns = ["step", "loss", *TERMS, "lr", "disc_lr", "grad_norm", "disc_grad_norm", "sec_per_step",
                   "peak_memory", "skipped", "val_psnr", "val_ssim"]
        log = CSVLog(out_dir / "log.csv", columns, resume_step=step) if main else None
        bar = progress(c_train.steps, step, main)
        skipped = 0
        saved, scores, row = None, {}, {}
        accumulation = c_optim.grad_accumulation
        params = list(vae.parameters())

        def encode_decode(video, noise):
            """(clip, reconstruction, posterior, share): the whole batch's, or under context parallelism
            this rank's frames of them and its share of the clip's frames (its losses are scaled by it
            and the ranks' gradients summed: the one-process gradient)."""
            if cp_group is None:
                return (video, *autoencode(video, noise), 1.0)
            from ..parallel import vae as cp
            local = cp.local_frames(video, cp_group, ratio=int(vae.config.temporal_compression_ratio))
            posterior = cp.encode_local(vae, local, cp_group)
            latents = posterior.mean + posterior.std * cp.local_latent_frames(noise, cp_group)
            return local, cp.decode_local(vae, latents, cp_group), posterior, cp.frame_share(local, cp_group)

        # ---- the loop
        while step < c_train.steps:
            started = time.perf_counter()
            gan_on = step >= c_loss.gan_start_step and c_loss.gan_weight > 0
            terms = torch.zeros(len(TERMS), dtype=torch.float64)
            reals, fakes, shares = [], [], []

            # 1. the VAE (generator) step, accumulated over micro-batches
            discriminator.requires_grad_(False)  # the generator loss's gradient stops at the clip
            for micro in range(accumulation):
                batch = next(batches)
                skipped += batch["skipped"]
                video = batch["video"].to(device, non_blocking=True)
                # rank r holds the clips r, r + world, ... of the epoch's order (Batches): their global indices
                indices = [data_rank + i * data_world for i in range(video.shape[0])]
                noise_shape = (video.shape[0], vae.config.latent_channels,
                               1 + (video.shape[2] - 1) // int(vae.config.temporal_compression_ratio),
                               video.shape[3] // vae.config.spatial_factor, video.shape[4] // vae.config.spatial_factor)
                noise = sample_noise(noise_shape, c_train.seed, step, micro, indices, device, torch.float32)
                last_micro = micro == accumulation - 1
                sync = (autoencode.no_sync() if isinstance(autoencode, nn.parallel.DistributedDataParallel)
                        and not last_micro else contextlib.nullcontext())
                with sync:
                    with autocast:
                        video, rec, posterior, share = encode_decode(video, noise)
                        kl = kl_loss(posterior)  # a sum over latent elements: each rank's part adds up under CP
                        # each head is back-propagated once, to the reconstruction, and its graph freed
                        rec_loss, lp, grad_rec = reconstruction_gradient(
                            video, rec, lpips, kind=c_loss.reconstruction, weight=c_loss.reconstruction_weight,
                            lpips_weight=c_loss.lpips_weight, lpips_chunk_pixels=c_loss.lpips_chunk_pixels,
                            share=share)
                        gan = weight = rec.new_zeros(())
                        if gan_on:
                            # (context parallel: the discriminator judges this rank's frames only)
                            gan = share * generator_loss(discriminator(rec), c_loss.gan_loss)
                            grad_gan = output_gradient(gan, rec)
                            weight = (_adaptive_weight(rec, grad_rec, grad_gan, last_layer, c_loss.adaptive_weight_max,
                                                       world, context_parallel)
                                      if c_loss.adaptive_weight else torch.ones((), device=device))
                            grad_rec.addcmul_(grad_gan, c_loss.gan_weight * weight)
                            del grad_gan
                    # the VAE's backward of w_rec·rec + w_lpips·LPIPS + w_kl·KL + w_gan·λ·gan, from the
                    # reconstruction and the KL term
                    torch.autograd.backward((rec, c_loss.kl_weight * kl / accumulation), (grad_rec.div_(accumulation), None))
                if cp_group is not None and last_micro:  # each rank holds its frames' share of the gradient
                    from ..parallel.vae import sum_gradients
                    sum_gradients(vae, cp_group)
                terms[:5] += torch.stack([rec_loss, kl, lp, gan, weight]).detach().double().cpu() / accumulation
                reals.append(video)
                fakes.append(rec.detach())
                shares.append(share)
                del rec, posterior, grad_rec
            grad_norm = nn.utils.clip_grad_norm_(params, c_optim.grad_clip if c_optim.grad_clip > 0 else math.inf)
            optim.step()
            optim.zero_grad(set_to_none=True)
            discriminator.requires_grad_(True)

            # 2. the discriminator step (from gan_start_step)
            disc_norm = torch.zeros(())
            if gan_on:
                for micro, (real, fake, share) in enumerate(zip(reals, fakes, shares)):
                    last_micro = micro == accumulation - 1
                    sync = (disc_model.no_sync() if isinstance(disc_model, nn.parallel.DistributedDataParallel)
                            and not last_micro else contextlib.nullcontext())
                    with sync:
                        with autocast:
                            logits = disc_model(torch.cat([real, fake.to(real.dtype)]))  # one forward for DDP
                            d_loss = share * discriminator_loss(*logits.float().chunk(2), c_loss.gan_loss)
                            gp = (share * gradient_penalty(discriminator, real) if c_loss.gradient_penalty_weight > 0
                                  else d_loss.new_zeros(()))
                        ((d_loss + c_loss.gradient_penalty_weight * gp) / accumulation).backward()
                    terms[5:] += torch.stack([d_loss, gp]).detach().double().cpu() / accumulation
                if cp_group is not None:
                    from ..parallel.vae import sum_gradients
                    sum_gradients(discriminator, cp_group)
                disc_norm = nn.utils.clip_grad_norm_(discriminator.parameters(),
                                                     c_optim.grad_clip if c_optim.grad_clip > 0 else math.inf)
                disc_optim.step()
                disc_optim.zero_grad(set_to_none=True)
            del reals, fakes
            lrs = (sched.get_last_lr()[0], disc_sched.get_last_lr()[0])
            sched.step()
            with warnings.catch_warnings():  # before gan_start_step its optimiser has not stepped: fine here
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                disc_sched.step()
            if ema is not None:
                ema.update(vae)
            step += 1

            # 3. log, checkpoint, validate
            if step % c_train.log_every == 0 or step == c_train.steps:
                if context_parallel:  # each rank's terms are its share (the GAN weight is everyone's)
                    weight = terms[4].item()
                    terms = terms.to(device)
                    dist.all_reduce(terms)
                    terms = terms.cpu()
                    terms[4] = weight
                else:
                    terms = mean_over_ranks(terms.to(device), world).cpu()
                total_skipped = torch.tensor([skipped], device=device)
                if world > 1 and not context_parallel:
                    dist.all_reduce(total_skipped)
                values = dict(zip(TERMS, terms.tolist()))
                if not gan_on:
                    values.update(gan=None, gan_weight=None, disc=None, gp=None)
                total = (c_loss.reconstruction_weight * values["rec"] + c_loss.kl_weight * values["kl"]
                         + c_loss.lpips_weight * values["lpips"]
                         + (c_loss.gan_weight * values["gan_weight"] * values["gan"] if gan_on else 0.0))
                row = {"step": step, "loss": total, **values, "lr": lrs[0], "disc_lr": lrs[1],
                       "grad_norm": float(grad_norm), "disc_grad_norm": float(disc_norm) if gan_on else None,
                       "sec_per_step": time.perf_counter() - started, "peak_memory": peak_memory(device),
                       "skipped": int(total_skipped.item())}
                skipped = 0  # the column counts the files skipped since the previous row
            validate_now = (c_train.validate_every and step % c_train.validate_every == 0) or step == c_train.steps
            if validate_now and validation and (main or context_parallel):  # CP: every rank holds frames
                target = out_dir / "validation" / f"step-{step}.mp4" if main else None
                scores = validate(ema.model if ema else vae, validation, device, autocast, target, cp_group)
                if main:
                    bar.write(f"step {step}: validation PSNR {scores['val_psnr']:.2f} dB, "
                              f"SSIM {scores['val_ssim']:.4f}")
                if row.get("step") == step:
                    row.update(scores)
            if main and row.get("step") == step:
                log.write(row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", *TERMS) and v is not None},
                                refresh=False)
            bar.update(1)
            if step % c_train.checkpoint_every == 0 or step == c_train.steps:
                saved = ckpt.save_checkpoint(out_dir, step, models=parts, optimizers=optimizers,
                                             schedulers=schedulers, data_position=batches.position, config=config,
                                             keep=KEEP_CHECKPOINTS)
        return {"step": step, "checkpoint": saved, "last": row, "validation": scores}
    finally:  # also when stopped (Ctrl-C, SIGTERM): the bar ends before the caller's last line
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if owns_group:
            dist.destroy_process_group()

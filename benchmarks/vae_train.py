"""Benchmark of one VAE training step (issue #16), cogvx vs diffusers' `AutoencoderKLCogVideoX` in
the same run: the step `cogvx train-vae` takes (cogvx/train/vae.py), built once on each model.

One call is one whole step, with the GAN on and the loss weights of configs/vae-stage1.toml:
  1. encode -> posterior sample (mean + std * a fixed noise) -> decode; L2 reconstruction + 0.1 LPIPS
     (random VGG16 trunk: the same cost as the real one; built as the trainer builds it, on the meta
     device and then given its weights) + 1e-6 KL + 0.1 * adaptive weight * hinge
     generator loss of a 3D PatchGAN (the adaptive weight from the two gradients at the decoder's
     last layer, `decoder.conv_out.conv.weight` in both models); backward, clip to 1.0, AdamW step;
  2. the discriminator on (real, reconstruction) with the hinge loss; backward, clip, AdamW step
     (no gradient penalty: its weight is 0 in the shipped configs).
Three contenders, the baseline first:
  - "diffusers": diffusers' `AutoencoderKLCogVideoX` in the step as LDM / SAT's LPIPSWithDiscriminator
    take it (each loss's gradient at the last layer by `autograd.grad(..., retain_graph=True)`, then
    the total loss's backward: LPIPS's and the discriminator's backward run twice) with torch's
    default (for-each) AdamW, what a trainer built on diffusers' model gets;
  - "diffusers+cogvx-step": the same model in the step `cogvx train-vae` takes (each head
    back-propagated once to the reconstruction, LPIPS on frames of at most 65536 pixels at a time,
    the VAE's backward once from there; fused AdamW): what our step alone gives;
  - "cogvx": our VAE in our step.
Both models load the same random weights from one diffusers-format folder (written once by
cogvx's save_pretrained under $COGVX_BENCH_CACHE, default ~/.cache/cogvx-bench), and get the same
discriminator, LPIPS trunk and noise. cogvx runs with chunking="whole" as the trainer does (the
whole clip through every layer); diffusers with its own frame batching, which is how diffusers-based
trainers (e.g. finetrainers) train it: the encoder in slices of 8 frames (+1), the decoder in slices
of 2 latent frames, carrying a conv cache between them, tiling and slicing off. At 9 frames both are
one slice (the same numerics); at 17 frames diffusers' slices change its numerics (GroupNorm
statistics per slice), not the work. On the GPU: bf16 autocast over fp32 weights, as the trainer.

The step returns the loss terms (reconstruction, KL, LPIPS, generator, discriminator), so the
harness's max|diff| compares the two contenders' terms after the same number of steps. "peak MiB"
on the CPU is a fresh process's load + first step (optimiser state included); "warm MiB" a second
step (its activations, gradients and temporaries). Interface: benchmarks/_interface.py.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import cogvx
from cogvx.train.config import LossConfig
from cogvx.train.loop import adamw
from cogvx.train.losses import (LPIPS, Discriminator3D, adaptive_weight, discriminator_loss, generator_loss,
                                kl_loss, last_layer_gradient, output_gradient, reconstruction_gradient,
                                reconstruction_loss, weight_from_gradients)

from ._checkpoints import cached_folder, diffusers_contenders, save_module

OP = "vae_train"
INFERENCE_ONLY = True  # one call is a whole training step (its backwards included): no separate --backward pass
# a step is seconds (GPU) to a minute (CPU): one warm-up and five timed steps (a shared CPU needs several)
BUDGET = dict(warmup=1, min_reps=5, max_reps=5, target_s=0.0)

REAL = dict(block_out_channels=[128, 256, 256, 512], latent_channels=16, layers_per_block=3, norm_num_groups=32)
# configs/vae-tiny.toml's VAE (the embedded tiny pipeline's layout) and discriminator
TINY = dict(block_out_channels=[16, 16, 32, 32], latent_channels=4, layers_per_block=1, norm_num_groups=4)
# configs/vae-stage1.toml's loss weights and optimiser
LOSS = dict(kl=1e-6, lpips=0.1, gan=0.1, gan_kind="hinge", adaptive_max=1e4,
            lpips_chunk_pixels=LossConfig.lpips_chunk_pixels)
OPTIM = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, grad_clip=1.0)

_GPU = [dict(model="real", B=1, F=17, H=256, W=256), dict(model="real", B=1, F=17, H=256, W=256, checkpointing=True)]
# CPU: the real channels at 9 frames of 32x32 (3 latent frames of 4x4), NOT a training size, where the weights
# and AdamW's state dominate memory; the tiny config (configs/vae-tiny.toml), and the tiny config at 17x64x64,
# where activations do
_CPU = [dict(model="real", B=1, F=9, H=32, W=32), dict(model="tiny", B=2, F=9, H=32, W=32),
        dict(model="tiny", B=1, F=17, H=64, W=64)]
_TINY = [dict(model="tiny", B=1, F=9, H=32, W=32)]


COGVX_STEP = "diffusers+cogvx-step"


def contenders(device, dtype) -> list[str]:
    names = diffusers_contenders("VAE training", _diffusers_class)
    return ["diffusers", COGVX_STEP, "cogvx"] if "diffusers" in names else names


def _model(backend: str) -> str:
    return "diffusers" if backend.startswith("diffusers") else "cogvx"


def shapes(device, quick: bool, tiny: bool = False) -> list[dict]:
    if tiny:
        return list(_TINY)
    chosen = _GPU if torch.device(device).type == "cuda" else _CPU
    return chosen[:1] if quick else list(chosen)


SHAPE_SETS = {
    "cuda": ("stage-1 size: 17 frames at 256x256, real channels, bf16 autocast over fp32 weights, random weights; "
             "without and with gradient checkpointing per ResNet block (both models)"),
    "cpu": ("scaled-down CPU set, NOT a training size: real channels at 9 frames of 32x32, and configs/vae-tiny.toml's "
            "VAE at 9 frames of 32x32 (batch 2) and 17 frames of 64x64 (activations dominate memory)"),
}


def label(shape: dict) -> str:
    s = shape
    return f"{s['model']} {s['F']}x{s['H']}x{s['W']} B{s['B']}" + (" ckpt" if s.get("checkpointing") else "")


def config(shape: dict) -> dict:
    return dict(TINY if shape["model"] == "tiny" else REAL)


def _discriminator_args(shape: dict) -> tuple[int, int]:
    return (32, 2) if shape["model"] == "tiny" else (64, 3)  # (channels, layers) of the tiny / stage-1 configs


def _diffusers_class():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX


def make_inputs(shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict:
    if backward:
        raise ValueError("the VAE training benchmark's one call is a whole step (backwards included): no --backward")
    s, cfg = shape, config(shape)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    latent = (cfg["latent_channels"], 1 + (s["F"] - 1) // 4, s["H"] // 8, s["W"] // 8)
    inputs = dict(shape=s, config=cfg, device=device, dtype=dtype, models={},
                  video=(torch.rand(s["B"], 3, s["F"], s["H"], s["W"], generator=gen) * 2 - 1).to(device),
                  noise=torch.randn(s["B"], *latent, generator=gen).to(device))
    try:
        _diffusers_class()  # imported here, so that no contender's measured call pays for the import
    except ImportError:
        pass
    inputs["folder"] = cached_folder("vae_train", cfg, lambda folder: save_module(cogvx.CausalVAE(cfg), folder))
    return inputs


def _load(backend: str, inputs: dict) -> dict:
    """The contender's VAE (fp32 weights, train mode), discriminator, LPIPS and optimisers, built on
    the first call (so that the memory child's first step includes loading)."""
    if backend not in inputs["models"]:
        device, s = inputs["device"], inputs["shape"]
        if _model(backend) == "diffusers":
            vae = _diffusers_class().from_pretrained(inputs["folder"], torch_dtype=torch.float32).to(device)
            vae.disable_tiling()
            vae.disable_slicing()
        else:
            vae = cogvx.CausalVAE.from_pretrained(inputs["folder"], dtype=torch.float32, device=device,
                                                  chunking="whole")
        if s.get("checkpointing"):
            vae.enable_gradient_checkpointing()
        vae.train()
        torch.manual_seed(0)  # the same discriminator and LPIPS trunk for both contenders
        discriminator = Discriminator3D(3, *_discriminator_args(s)).to(device).train()
        lpips = LPIPS("random").to(device)
        if backend == "diffusers":  # torch's default AdamW
            optimiser = lambda params: torch.optim.AdamW(params, lr=OPTIM["lr"], betas=OPTIM["betas"],  # noqa: E731
                                                         weight_decay=OPTIM["weight_decay"])
        else:  # the trainer's (fused where torch has it)
            optimiser = lambda params: adamw(params, OPTIM["lr"], OPTIM["betas"], OPTIM["weight_decay"])  # noqa: E731
        inputs["models"][backend] = dict(vae=vae, discriminator=discriminator, lpips=lpips,
                                         optim=optimiser(vae.parameters()),
                                         disc_optim=optimiser(discriminator.parameters()),
                                         last_layer=vae.decoder.conv_out.conv.weight)
    return inputs["models"][backend]


def _autoencode(backend: str, vae, video: torch.Tensor, noise: torch.Tensor):
    if _model(backend) == "diffusers":
        posterior = vae.encode(video).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return vae.decode(latents.to(video.dtype)).sample, posterior
    posterior = vae.encode(video)
    latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
    return vae.decode(latents.to(video.dtype)), posterior


def train_step(backend: str, inputs: dict) -> torch.Tensor:
    """One training step; returns the detached loss terms (reconstruction, KL, LPIPS, generator,
    discriminator)."""
    m = _load(backend, inputs)
    vae, disc, lpips, last_layer = m["vae"], m["discriminator"], m["lpips"], m["last_layer"]
    video, noise, device = inputs["video"], inputs["noise"], inputs["device"]
    autocast = (torch.autocast(device.type, dtype=inputs["dtype"]) if inputs["dtype"] != torch.float32
                else contextlib.nullcontext())
    with torch.enable_grad():  # the harness calls the forward pass under no_grad to compare outputs
        # 1. the VAE (generator) step
        disc.requires_grad_(False)  # the generator loss's gradient stops at the clip
        with autocast:
            rec, posterior = _autoencode(backend, vae, video, noise)
            kl = kl_loss(posterior)
            if backend == "diffusers":  # LDM's step
                rec_loss = reconstruction_loss(video, rec.float())
                lp = lpips(video, rec.float())
                nll = rec_loss + LOSS["lpips"] * lp
                gan = generator_loss(disc(rec), LOSS["gan_kind"])
                weight = adaptive_weight(nll, gan, last_layer, LOSS["adaptive_max"])
                loss = nll + LOSS["kl"] * kl + LOSS["gan"] * weight * gan
            else:  # cogvx train-vae's step (LPIPS in chunks of frames: its default)
                rec_loss, lp, grad_nll = reconstruction_gradient(video, rec, lpips, lpips_weight=LOSS["lpips"],
                                                                 lpips_chunk_pixels=LOSS["lpips_chunk_pixels"])
                gan = generator_loss(disc(rec), LOSS["gan_kind"])
                grad_gan = output_gradient(gan, rec)
                weight = weight_from_gradients(last_layer_gradient(rec, grad_nll, last_layer),
                                               last_layer_gradient(rec, grad_gan, last_layer), LOSS["adaptive_max"])
                grad_rec = grad_nll.addcmul_(grad_gan, LOSS["gan"] * weight)
                del grad_nll, grad_gan
        if backend == "diffusers":
            loss.backward()
        else:
            torch.autograd.backward((rec, LOSS["kl"] * kl), (grad_rec, None))
            del grad_rec
        nn.utils.clip_grad_norm_(vae.parameters(), OPTIM["grad_clip"])
        m["optim"].step()
        m["optim"].zero_grad(set_to_none=True)
        disc.requires_grad_(True)
        fake = rec.detach()
        del rec, posterior
        # 2. the discriminator step
        with autocast:
            logits = disc(torch.cat([video, fake.to(video.dtype)]))
            d_loss = discriminator_loss(*logits.float().chunk(2), LOSS["gan_kind"])
        d_loss.backward()
        nn.utils.clip_grad_norm_(disc.parameters(), OPTIM["grad_clip"])
        m["disc_optim"].step()
        m["disc_optim"].zero_grad(set_to_none=True)
    return torch.stack([rec_loss, kl, lp, gan, d_loss]).detach().float()


forward = train_step


def flops(shape: dict, backward: bool) -> int:
    """Not counted (a conv-by-conv tally of the VAE is not worth its upkeep): reported as 0."""
    return 0


def bytes_moved(shape: dict, dtype: torch.dtype, backward: bool) -> int:
    """The clip read once and its reconstruction written once, in fp32 (a lower bound)."""
    return 2 * shape["B"] * 3 * shape["F"] * shape["H"] * shape["W"] * 4

"""Training CogVideoX's parts: the 3D causal VAE (`cogvx train-vae`) and the transformer (`cogvx train`).

One package for both trainers, each module one concern:
- `config.py`: TOML files (tomllib) read into frozen dataclasses; an unknown key, a wrong type or an
  impossible value stops before training with an error naming the file and the key.
- `data.py`: clips as (3, F, H, W) tensors in [-1, 1] with their captions: `synthetic:shapes`
  (deterministic coloured shapes moving on a plain background) and captioned folders of videos and
  images (`captions.jsonl`, decoded with PyAV); unreadable files skipped and counted; buckets of
  (frames, height, width), every batch one bucket, images and videos mixed at a set ratio.
- `cache.py`: latent caches (`cogvx cache-latents`): every clip's VAE posterior and caption
  embedding computed once into safetensors shards, read back lazily as a bucketed dataset.
- `latents.py`: the transformer's inputs, clean latents and T5 embeddings, from clips or a latent cache.
- `losses.py`: the VAE's reconstruction (L2 or L1), KL of the posterior, LPIPS (the `lpips` package),
  the 3D PatchGAN discriminator with hinge or non-saturating losses, the adaptive GAN weight and the
  gradient penalty; the transformer's v-prediction loss.
- `lora.py`: LoRA adapters through peft, in the file layout diffusers' load_lora_weights reads.
- `checkpoint.py`: diffusers-format model folders (or safetensors files) plus the training state,
  written atomically, resumable, FSDP shards gathered.
- `log.py`: the CSV log (one row per step: every loss term, lr, grad norm, seconds, peak memory),
  tqdm progress, and `cogvx plot-log` curves.
- `loop.py`: what both loops share: devices and process groups, resume rules, the LR schedule, EMA,
  per-sample random draws.
- `vae.py`: the VAE training loop, readable top to bottom, one process or under torchrun (DDP for
  stage 1, context parallelism along time for stage 2).
- `transformer.py`: the transformer's loop, full or LoRA, one process or under torchrun (DDP, FSDP2).
"""

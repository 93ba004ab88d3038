"""Training CogVideoX's parts: the 3D causal VAE (`cogvx train-vae`) and the transformer.

One package for both trainers, each module one concern:
- `config.py`: TOML files (tomllib) read into frozen dataclasses; an unknown key, a wrong type or an
  impossible value stops before training with an error naming the file and the key.
- `data.py`: clips as (3, F, H, W) tensors in [-1, 1] with their captions: `synthetic:shapes`
  (deterministic coloured shapes moving on a plain background) and captioned folders of videos and
  images (`captions.jsonl`, decoded with PyAV); unreadable files skipped and counted; buckets of
  (frames, height, width), every batch one bucket, images and videos mixed at a set ratio.
- `cache.py`: latent caches (`cogvx cache-latents`): every clip's VAE posterior and caption
  embedding computed once into safetensors shards, read back lazily as a bucketed dataset.
- `losses.py`: reconstruction (L2 or L1), KL of the posterior, LPIPS (the `lpips` package), the 3D
  PatchGAN discriminator with hinge or non-saturating losses, the adaptive GAN weight and the
  gradient penalty.
- `checkpoint.py`: diffusers-format model folders plus the training state, written atomically,
  resumable.
- `log.py`: the CSV log (one row per step: every loss term, lr, grad norm, seconds, peak memory),
  tqdm progress, and `cogvx plot-log` curves.
- `vae.py`: the VAE training loop, readable top to bottom, one process or under torchrun (DDP for
  stage 1, context parallelism along time for stage 2).
"""

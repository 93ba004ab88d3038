"""The `cogvx` command line (also `python -m cogvx`).

    cogvx generate --prompt "a red cat walking" [--model FOLDER] [--out out.mp4] ...
    cogvx info

Errors from bad input end the run with one line on stderr (no traceback) and exit status 2;
nothing is left half-written: the video goes to a temporary file renamed into place at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from ._atomic import atomic_folder, atomic_write

DEFAULT_MODEL = Path(__file__).parent / "assets" / "tiny-cogvideox"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
VIDEO_SUFFIXES = (".mp4", ".gif")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogvx", description="CogVideoX text-to-video on cogvx kernels")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--model", type=Path, default=None,
                   help="a diffusers-layout CogVideoX folder (default: the tiny embedded model)")
    g.add_argument("--frames", type=int, default=None, help="1 + 4k (default: the model's, 49 for CogVideoX)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=6.0)
    g.add_argument("--dynamic-cfg", action="store_true")
    g.add_argument("--scheduler", choices=["ddim", "dpm"], default=None, help="default: the model's")
    g.add_argument("--seed", type=int, default=None, help='torch.Generator("cpu").manual_seed(N)')
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    g.add_argument("--device", choices=["cuda", "cpu"], default=None)
    g.add_argument("--image", type=Path, default=None, help="image-to-video (an I2V model): the first frame")
    g.add_argument("--video", type=Path, default=None, help="video-to-video: the video to transform")
    g.add_argument("--strength", type=float, default=0.8, help="video-to-video: how much of it is re-noised")
    g.add_argument("--fps", type=int, default=None, help="default: 16 for CogVideoX 1.5 models, 8 otherwise")
    g.add_argument("--offload", action="store_true", help="move the text encoder off the GPU after encoding")
    g.add_argument("--tile", action="store_true", help="decode in spatial tiles (less memory; diffusers' blending)")
    g.add_argument("--out", type=Path, default=Path("out.mp4"), help=".mp4 or .gif, or a folder for PNG frames")
    sub.add_parser("info", help="versions, backends built, device, memory")
    return p


def _check_output(out: Path) -> None:
    parent = out.parent
    if out.suffix and out.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(f"--out must end in .mp4 or .gif (or name a folder for PNG frames); got {out}")
    if not parent.exists() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent} (for --out {out})")
    if not out.suffix and out.exists():
        raise UsageError(f"{out} exists; choose another --out folder for the PNG frames")


def write_video(frames, out: Path, fps: int) -> None:
    """frames: (F, H, W, 3) uint8 -> an mp4, a gif, or (no suffix) a folder of PNGs, written under a
    temporary name and renamed, so nothing half-written is ever left."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    if not out.suffix:
        def pngs(folder: Path) -> None:
            for i, frame in enumerate(frames):
                Image.fromarray(np.asarray(frame)).save(folder / f"frame_{i:04d}.png")
        atomic_folder(out, pngs)
    elif out.suffix.lower() == ".gif":
        def gif(tmp: str) -> None:
            images = [Image.fromarray(np.asarray(f)) for f in frames]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        atomic_write(out, gif)
    else:
        def mp4(tmp: str) -> None:
            import imageio_ffmpeg

            height, width = frames[0].shape[:2]
            writer = imageio_ffmpeg.write_frames(tmp, (width, height), fps=fps, codec="libx264", quality=8,
                                                 macro_block_size=1, ffmpeg_log_level="error")
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
        atomic_write(out, mp4)


def _read_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read image {path}: {exc}") from None


def _read_video(path: Path) -> list:
    try:
        import imageio.v3 as iio

        frames = iio.imread(path)
    except Exception as exc:  # imageio raises many types for unreadable files
        raise UsageError(f"cannot read video {path}: {exc}") from None
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise UsageError(f"cannot read video {path}: expected RGB frames, got an array of shape {frames.shape}")
    return [frame[..., :3] for frame in frames]


def generate(args) -> int:
    import torch

    from .pipeline import Pipeline

    _check_output(args.out)
    model = args.model or DEFAULT_MODEL
    if not (Path(model) / "model_index.json").is_file():
        raise UsageError(f"{model} is not a CogVideoX pipeline folder (no model_index.json)")
    if args.model is None:
        print("note: using the embedded tiny CogVideoX with random weights (no trained small model exists yet): "
              "expect noise-like motion, not your prompt", file=sys.stderr)
    conditions = {}  # read before the model loads: an unreadable input fails fast
    if args.image is not None:
        conditions["image"] = _read_image(args.image)
    if args.video is not None:
        conditions.update(video=_read_video(args.video), strength=args.strength)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")])
    start = time.perf_counter()
    try:
        pipe = Pipeline.from_pretrained(model, dtype=dtype, device=device, scheduler=args.scheduler,
                                        offload_text_encoder=args.offload)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    load = time.perf_counter() - start
    if args.tile:
        try:
            pipe.vae.enable_tiling()
        except ValueError as exc:
            raise UsageError(f"--tile: {exc}") from None
    generator = torch.Generator("cpu").manual_seed(args.seed) if args.seed is not None else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frames = pipe(args.prompt, args.negative_prompt, num_frames=args.frames, height=args.height,
                          width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          use_dynamic_cfg=args.dynamic_cfg, generator=generator, output_type="np",
                          **conditions).frames[0]
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    timings = {"load": load, **pipe.timings}
    fps = args.fps or (16 if pipe.transformer.config.patch_size_t else 8)  # 1.5 was trained at 16 fps
    start = time.perf_counter()
    write_video((frames * 255).round().astype("uint8"), args.out, fps)
    timings["write"] = time.perf_counter() - start
    print(f"wrote {args.out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {fps} fps); "
          + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return 0


def info(_args) -> int:
    import json

    import torch

    import cogvx
    from cogvx_kernels.info import collect

    data = collect()
    data["cogvx"] = cogvx.__version__
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        data["gpu_memory_gib"] = dict(free=round(free / 2**30, 1), total=round(total / 2**30, 1))
    print(json.dumps(data, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"generate": generate, "info": info}[args.command](args)
    except UsageError as exc:
        print(f"cogvx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cogvx: interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `cogvx` command line (also `python -m cogvx`).

    cogvx generate --prompt "a red cat walking" [--model FOLDER] [--out out.mp4] ...
    torchrun --nproc_per_node=4 -m cogvx generate ... --parallel "cfg=2,ulysses=2,ring=1"
    cogvx info [--check [--quick] [--device cuda]]
    cogvx train-vae --config configs/vae-tiny.toml [--resume] [--out DIR]   (also under torchrun)
    cogvx train --config configs/transformer-tiny.toml [--resume] [--out DIR]   (also under torchrun)
    cogvx cache-latents --config TRANSFORMER.toml [--out DIR] [--storage bf16]   (also under torchrun)
    cogvx train-default-model [--out cogvx/assets/tiny-cogvideox] [--seed 0]   (retrains the embedded model)
    cogvx plot-log runs/vae-tiny/log.csv --out curves.png

Errors from bad input end the run with one line on stderr (no traceback) and exit status 2; what
can be checked without the weights (flags, output path, sizes against memory, input files, weight
file headers) is checked before the model loads. Nothing is left half-written: the video goes to a
temporary file renamed into place at the end, also on Ctrl-C and SIGTERM.

Under torchrun, `generate --parallel PLAN` splits the work over the ranks (cogvx.parallel; gloo for
--device cpu, NCCL for cuda): bad input is refused by every rank alike, before anything loads, with
the one line from rank 0 only and exit status 2 on every rank; rank 0 writes the video. A rank that
fails ends every rank (exit status 1, a line naming the failed rank); collectives time out after
COGVX_DIST_TIMEOUT seconds (default 600).
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from ._atomic import atomic_folder, atomic_write, probe

DEFAULT_MODEL = Path(__file__).parent / "assets" / "tiny-cogvideox"
MODEL_CARD = "cogvx.json"  # in a model folder: its vocabulary, example prompts and generation defaults
GENERATE_DEFAULTS = {"steps": 50, "guidance": 6.0}  # for a folder without a model card
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
VIDEO_SUFFIXES = (".mp4", ".gif")
DEFAULT_STRENGTH = 0.8
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's memory limit


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the writers' cleanup runs (a KeyboardInterrupt: no `except
    Exception` swallows it)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block + "prog: error:" -> our one line
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (leave it out for the model's default); "
                                         f"got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
    return value


def _strength(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if not 0 <= value < 2**64:  # torch wraps negatives (-1 is 2**64 - 1): one spelling per seed
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64) (torch.Generator.manual_seed's "
                                         f"range); got {value}")
    return value


def _utf8_text(text: str) -> str:
    try:  # bytes of argv that are not UTF-8 arrive as lone surrogates, which the tokenizer cannot take
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 (an undecodable byte at character {exc.start}); "
                                         "pass the text in UTF-8") from None
    return text


def model_card(model: Path) -> dict:
    """The model folder's cogvx.json ({} when it has none): "vocabulary", "examples", "generate"."""
    path = Path(model) / MODEL_CARD
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not readable JSON ({_first_line(exc)})") from None
    generate = card.get("generate", {}) if isinstance(card, dict) else None
    if not isinstance(generate, dict) or not set(generate) <= {"steps", "guidance", "fps"}:
        raise UsageError(f"{path}: expected an object whose \"generate\" has only steps, guidance and fps")
    return card


def _embedded_model_help() -> str:
    """The embedded model's vocabulary and example prompts, from its card (a file read, no import)."""
    try:
        card = model_card(DEFAULT_MODEL)
    except UsageError:
        return ""
    if not card.get("vocabulary"):
        return ""
    examples = "\n".join(f'  cogvx generate --prompt "{e}"' for e in card.get("examples", []))
    return ("without --model: the embedded tiny model, trained on coloured shapes moving on a plain background.\n"
            f"Its vocabulary: {' '.join(card['vocabulary'])}\n"
            "(other words are ignored, with a warning). Examples:\n" + examples)


def unknown_words(prompt: str, vocabulary) -> list[str]:
    """The prompt's words (lower-cased, split at anything not a letter, digit or apostrophe) outside
    `vocabulary`, each once, in order."""
    known, unknown = set(vocabulary), []
    for word in re.findall(r"[\w']+", prompt.lower()):
        if word not in known and word not in unknown:
            unknown.append(word)
    return unknown


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cogvx", description="CogVideoX text-to-video on cogvx kernels")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video from a prompt", epilog=_embedded_model_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--prompt", required=True, type=_utf8_text)
    g.add_argument("--negative-prompt", default=None, type=_utf8_text)
    g.add_argument("--model", type=Path, default=None,
                   help="a diffusers-layout CogVideoX folder (default: the tiny embedded model)")
    g.add_argument("--frames", type=_positive_int, default=None,
                   help="1 + 4k (default: the model's, 49 for CogVideoX)")
    g.add_argument("--height", type=_positive_int, default=None, help="a multiple of 16 (default: the model's)")
    g.add_argument("--width", type=_positive_int, default=None, help="a multiple of 16 (default: the model's)")
    g.add_argument("--steps", type=_positive_int, default=None,
                   help=f"denoising steps (default: the model's {MODEL_CARD}, else {GENERATE_DEFAULTS['steps']})")
    g.add_argument("--guidance", type=_finite_float, default=None,
                   help=f"classifier-free guidance scale (default: the model's {MODEL_CARD}, else "
                        f"{GENERATE_DEFAULTS['guidance']})")
    g.add_argument("--dynamic-cfg", action="store_true")
    g.add_argument("--scheduler", choices=["ddim", "dpm"], default=None, help="default: the model's")
    g.add_argument("--seed", type=_seed, default=None, help='0 <= N < 2**64: torch.Generator("cpu").manual_seed(N)')
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    g.add_argument("--device", choices=["cuda", "cpu"], default=None)
    g.add_argument("--image", type=Path, default=None, help="image-to-video (an I2V model): the first frame")
    g.add_argument("--video", type=Path, default=None, help="video-to-video: the video to transform")
    g.add_argument("--strength", type=_strength, default=None,
                   help=f"video-to-video: how much of it is re-noised, in (0, 1] (default {DEFAULT_STRENGTH})")
    g.add_argument("--fps", type=_positive_int, default=None,
                   help=f"default: the model's {MODEL_CARD}, else 16 for CogVideoX 1.5 models, 8 otherwise")
    g.add_argument("--offload", action="store_true", help="move the text encoder off the GPU after encoding")
    g.add_argument("--tile", action="store_true", help="decode in spatial tiles (less memory; diffusers' blending)")
    g.add_argument("--out", type=Path, default=Path("out.mp4"), help=".mp4 or .gif, or a folder for PNG frames")
    g.add_argument("--parallel", default=None, metavar="PLAN",
                   help='under torchrun: how the ranks split the work, e.g. "cfg=2,ulysses=2,ring=1" (the product '
                        "is the number of processes; cfg=2 needs --guidance > 1; ulysses divides the heads)")
    i = sub.add_parser("info", help="versions, backends built, device, memory; --check: the kernels' self-check")
    i.add_argument("--check", action="store_true",
                   help="run every available kernel backend against the reference on this device and print a "
                        "table (exit status 1 if any failed)")
    i.add_argument("--quick", action="store_true", help="with --check: only the backends and dtypes automatic "
                                                         "choice uses (the pipeline's cached check)")
    i.add_argument("--device", help="with --check: the device to check (default: cuda when present, else cpu)")
    t = sub.add_parser("train-vae", help="train the 3D causal VAE (also under torchrun: DDP or context parallel)")
    t.add_argument("--config", type=Path, required=True, help="a TOML training config (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output folder")
    t.add_argument("--out", type=Path, default=None, help="output folder (default: the config's train.out)")
    tt = sub.add_parser("train", help="train the transformer, fully or LoRA (also under torchrun: DDP or FSDP2)")
    tt.add_argument("--config", type=Path, required=True, help="a TOML training config (see configs/)")
    tt.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output folder")
    tt.add_argument("--out", type=Path, default=None, help="output folder (default: the config's train.out)")
    _add_cache_latents(sub)
    d = sub.add_parser("train-default-model", help="retrain the embedded default model from scratch (the tiny VAE, "
                                                   "then the tiny transformer, on synthetic shapes; about an hour on a CPU)")
    d.add_argument("--out", type=Path, default=None,
                   help="the pipeline folder to write (default: WORK/pipeline; cogvx/assets/tiny-cogvideox replaces "
                        "the shipped model)")
    d.add_argument("--work", type=Path, default=Path("runs/default-model"),
                   help="checkpoints, cache and logs of the stages (a rerun continues there)")
    d.add_argument("--seed", type=_seed, default=0)
    d.add_argument("--vae-config", type=Path, default=None, help="default: configs/default-model-vae.toml")
    d.add_argument("--transformer-config", type=Path, default=None,
                   help="default: configs/default-model-transformer.toml")
    pl = sub.add_parser("plot-log", help="draw a training log's curves (log.csv) into a PNG")
    pl.add_argument("log", type=Path, help="a log.csv written by a trainer")
    pl.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write")
    return p


def _join_dash_values(argv: list[str]) -> list[str]:
    """`--guidance -inf` -> `--guidance=-inf`: argparse takes a value starting with '-' for an option
    unless it looks like a plain negative number ('-inf', '-1e3' and '-a cat' do not)."""
    out, i = [], 0
    while i < len(argv):
        token, following = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if (token.startswith("--") and token != "--" and "=" not in token and following is not None
                and following.startswith("-") and not following.startswith("--") and following != "-h"):
            out.append(f"{token}={following}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def memory_estimate(transformer, vae, *, frames: int, height: int, width: int, itemsize: int,
                    guided: bool, tile: bool = False, weights: int = 0, cpu: bool = False) -> dict[str, int]:
    """A lower bound, in bytes, of the peak memory of one generation, from the sizes and the
    model's TransformerConfig and VAEConfig.

    It counts only tensors that must exist at the same time, so a run it refuses cannot fit
    (one it accepts may still not):
    - weights: `weights` parameters in `itemsize` bytes (all parts are on the device together);
    - denoising: the latents and the model input (batch 2 with guidance) and, inside a transformer
      block, the residual stream, its normalised copy and q, k, v: 5 × batch × tokens × width (the
      attention scores are never held whole: not counted);
    - decoding: the decoded video and, in the last decoder stage, a chunk's block input and its
      first conv's output (2 latent frames -> up to 2r video frames, block_out_channels[0] channels,
      full resolution; not counted with `tile`: a tile's are small);
    - output: the frames on the host as float32 and uint8 (5 bytes a value).
    Returns those parts and the totals: "device" = weights + max(denoising, decoding), "host" = output;
    with `cpu` one memory holds all: "device" = weights + the largest phase, "host" = 0."""
    heads, head_dim, patch = transformer.num_attention_heads, transformer.attention_head_dim, transformer.patch_size
    patch_t, text_tokens = transformer.patch_size_t or 1, transformer.max_text_seq_length
    channels, ratio, spatial = vae.latent_channels, int(vae.temporal_compression_ratio), vae.spatial_factor
    blocks = vae.block_out_channels
    batch = 2 if guided else 1
    latent_frames = -(-((frames - 1) // ratio + 1) // patch_t) * patch_t  # 1.5 pads to whole temporal patches
    h, w = height // spatial, width // spatial
    latents = latent_frames * channels * h * w
    tokens = text_tokens + latent_frames // patch_t * (h // patch) * (w // patch)
    denoising = itemsize * (latents * (1 + batch) + 5 * batch * tokens * heads * head_dim)
    video = 3 * frames * height * width
    decoding = itemsize * (video + (0 if tile else 2 * blocks[0] * min(frames, 2 * ratio) * height * width))
    parts = dict(weights=itemsize * weights, denoising=denoising, decoding=decoding, output=5 * video)
    if cpu:
        return {**parts, "device": parts["weights"] + max(denoising, decoding, parts["output"]), "host": 0}
    return {**parts, "device": parts["weights"] + max(denoising, decoding), "host": parts["output"]}


def _available_ram() -> int:
    """MemAvailable, or less when the cgroup (a container) allows less: its limit minus its use
    less the page cache (reclaimable, as MemAvailable counts it)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = CGROUP
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            cache = next(int(line.split()[1]) for line in (cgroup / "memory.stat").read_text().splitlines()
                         if line.startswith("file "))
            used = int((cgroup / "memory.current").read_text()) - cache
            available = min(available, int(limit) - used)
    except (OSError, StopIteration, ValueError):
        pass
    return available


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _check_memory(need: dict[str, int], device: str, args, frames: int, height: int, width: int) -> None:
    import torch

    limits = [("device", "RAM" if device == "cpu" else "GPU",
               _available_ram() if device == "cpu" else torch.cuda.mem_get_info()[0])]
    if device != "cpu":
        limits.append(("host", "RAM", _available_ram()))
    for key, memory, available in limits:
        if need[key] > available:
            parts = ", ".join(f"{k} {_gib(need[k])}" for k in ("weights", "denoising", "decoding", "output"))
            raise UsageError(
                f"{frames} frames at --height {height} --width {width} need at least {_gib(need[key])} of {memory} "
                f"({parts}) but {_gib(available)} is available; lower --height/--width or --frames"
                + ("" if args.tile else ", or decode in tiles with --tile"))


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _check_output(out: Path) -> None:
    """Refuse an --out that writing would fail on, by creating (and removing) the very temporary
    file or folder the writer will use, next to the target."""
    suffix = out.suffix.lower()
    if out.name.lower() in VIDEO_SUFFIXES:  # ".mp4" is a hidden name without suffix, not a video
        raise UsageError(f"--out {out} has no name before the suffix; e.g. {out.with_name('out' + out.name)}")
    if suffix and suffix not in VIDEO_SUFFIXES:
        raise UsageError(f"--out must end in .mp4 or .gif (or name a folder for PNG frames); got {out}")
    if not suffix and os.path.lexists(out):
        raise UsageError(f"{out} exists; choose another --out folder for the PNG frames")
    if suffix and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in {suffix} (or a new folder name "
                         "for PNG frames)")
    try:
        probe(out, folder=not suffix)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(f"--out {out}: the name is too long (its temporary name, .NAME.XXXXXXXX"
                             f"{out.suffix}, must also fit the file system's limit)") from None
        raise UsageError(f"cannot write to {out.parent} (for --out {out}): {exc.strerror or exc}") from None


def write_video(frames, out: Path, fps: int) -> None:
    """frames: (F, H, W, 3) uint8 -> an mp4, a gif, or (no suffix) a folder of PNGs, written under a
    temporary name and renamed, so nothing half-written is ever left. Write errors are UsageErrors
    (one line); a PNG folder that appeared meanwhile (another run) is left as it is."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    try:
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
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno == errno.ENOTEMPTY:
            raise UsageError(f"{out} was created by something else while this run wrote it (another run?); "
                             "left as it is, nothing written") from None
        raise UsageError(f"cannot write {out}: {exc.strerror or _first_line(exc)}; nothing written") from None


def _read_image(path: Path):
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL only warns up to twice its pixel limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UsageError(f"cannot read image {path}: {_first_line(exc)}") from None


def _read_video(path: Path) -> list:
    if not path.is_file():
        raise UsageError(f"cannot read video {path}: no such file")
    try:
        import imageio.v3 as iio

        frames = iio.imread(path)
    except Exception as exc:  # imageio raises many types; ffmpeg's banner follows the first line
        raise UsageError(f"cannot read video {path}: not a readable video ({_first_line(exc)})") from None
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise UsageError(f"cannot read video {path}: expected RGB frames, got an array of shape {frames.shape}")
    return [frame[..., :3] for frame in frames]


def _preflight(args, model: Path, device: str, conditions: dict) -> None:
    """The pipeline's checks that need only the model's configs and weight headers (no weights read):
    sizes, guidance, strength, and memory. The configs are read and checked as loading reads them."""
    from . import loading
    from .models import transformer as transformer_module, vae as vae_module

    try:
        transformer = loading.read_config(model / "transformer", transformer_module.TransformerConfig,
                                          transformer_module.DIFFUSERS_CLASS)
        vae = loading.read_config(model / "vae", vae_module.VAEConfig, vae_module.DIFFUSERS_CLASS)
        encoder = "image" in conditions or "video" in conditions
        weights = (loading.stored_elements(model / "transformer")
                   + loading.stored_elements(model / "vae", () if encoder else ("encoder.", "quant_conv."))
                   + loading.stored_elements(model / "text_encoder"))
    except (OSError, ValueError) as exc:  # missing, unreadable or invalid files, each named
        raise UsageError(_first_line(exc)) from None
    ratio, spatial = int(vae.temporal_compression_ratio), vae.spatial_factor
    frames = len(conditions["video"]) if "video" in conditions else args.frames or transformer.sample_frames
    height = args.height or spatial * transformer.sample_height
    width = args.width or spatial * transformer.sample_width
    if (frames - 1) % ratio:
        what = f"--video {args.video} has {frames} frames" if "video" in conditions else f"got {frames}"
        raise UsageError(f"--frames must be 1 + {ratio}·k (e.g. 49); {what}")
    if height % 16 or width % 16:
        raise UsageError(f"--height and --width must be multiples of 16; got {height}x{width}")
    if args.guidance < 1 and args.negative_prompt:
        raise UsageError(f"--guidance {args.guidance} < 1 disables guidance: --negative-prompt would be ignored")
    if "video" in conditions and int(args.steps * conditions["strength"]) < 1:
        raise UsageError(f"--strength {conditions['strength']} × --steps {args.steps} leaves no denoising step "
                         f"(the run denoises int(steps × strength) steps); raise --strength or --steps")
    need = memory_estimate(transformer, vae, frames=frames, height=height, width=width,
                           itemsize=ITEMSIZE[args.dtype or ("bf16" if device == "cuda" else "fp32")],
                           guided=args.guidance > 1, tile=args.tile, weights=weights, cpu=device == "cpu")
    _check_memory(need, device, args, frames, height, width)


def generate(args) -> int:
    import torch

    _check_output(args.out)
    model = args.model or DEFAULT_MODEL
    if not (Path(model) / "model_index.json").is_file():
        raise UsageError(f"{model} is not a CogVideoX pipeline folder (no model_index.json)")
    card = model_card(Path(model))
    for name, value in {**GENERATE_DEFAULTS, **card.get("generate", {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    plan = _check_parallel(args, Path(model))
    lead = _rank() == 0  # notes, warnings and the result from one rank only
    if card.get("vocabulary") and lead:
        unknown = unknown_words(" ".join(filter(None, [args.prompt, args.negative_prompt])), card["vocabulary"])
        if unknown:
            print(f"warning: not in the model's vocabulary, so ignored: {', '.join(unknown)} (it knows: "
                  f"{' '.join(card['vocabulary'])})", file=sys.stderr)
    if args.strength is not None and args.video is None and lead:
        print("warning: --strength is ignored without --video", file=sys.stderr)
    conditions = {}  # read before the model loads: an unreadable input fails fast
    if args.image is not None:
        conditions["image"] = _read_image(args.image)
    if args.video is not None:
        conditions.update(video=_read_video(args.video),
                          strength=DEFAULT_STRENGTH if args.strength is None else args.strength)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    if plan is not None and device == "cuda":  # this rank's GPU, for the memory check too
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                             "start at most one process per GPU")
        torch.cuda.set_device(local)
    _preflight(args, Path(model), device, conditions)
    if plan is None:
        return _generate(args, model, device, conditions, None)
    from .parallel import runtime

    owns_group = runtime.init_process_group(device)
    try:
        with runtime.FailureGuard(passthrough=(UsageError,)):
            return _generate(args, model, device, conditions, plan)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _check_parallel(args, model: Path):
    """The --parallel plan checked against the launch (WORLD_SIZE), the model's head count and the
    guidance, from the config alone; None for a one-process run."""
    from .parallel.plan import ParallelPlan, PlanError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.parallel is None:
        if world > 1:
            raise UsageError(f"running as {world} processes (WORLD_SIZE={world}) without --parallel: pass a plan "
                             f"such as --parallel \"cfg=2\" or --parallel \"ulysses={world}\"")
        return None
    from . import loading
    from .models import transformer as transformer_module
    from .parallel import runtime

    try:
        runtime.timeout()  # a bad COGVX_DIST_TIMEOUT, named now
        plan = ParallelPlan.parse(args.parallel)
        config = loading.read_config(model / "transformer", transformer_module.TransformerConfig,
                                     transformer_module.DIFFUSERS_CLASS)
        plan.check(world=world, heads=config.num_attention_heads, guided=args.guidance > 1)
    except (PlanError, OSError, ValueError) as exc:
        raise UsageError(("--" if isinstance(exc, PlanError) else "") + _first_line(exc)) from None
    return plan if world > 1 else None


def _generate(args, model, device: str, conditions: dict, plan) -> int:
    import numpy as np
    import torch
    from safetensors import SafetensorError

    from .pipeline import Pipeline

    lead = _rank() == 0
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")])
    start = time.perf_counter()
    try:
        pipe = Pipeline.from_pretrained(model, dtype=dtype, device=device, scheduler=args.scheduler,
                                        offload_text_encoder=args.offload,
                                        parallel=None if plan is None else str(plan))
    except (OSError, ValueError, SafetensorError) as exc:  # bad files in the folder (OSError: FileNotFoundError too)
        raise UsageError(_first_line(exc)) from None
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
        for w in caught if lead else ():
            print(f"warning: {w.message}", file=sys.stderr)
    except ValueError as exc:
        raise UsageError(_first_line(exc)) from None
    if not lead:  # rank 0 writes the video
        return 0
    timings = {"load": load, **pipe.timings}
    fps = args.fps if args.fps is not None else 16 if pipe.transformer.config.patch_size_t else 8  # 1.5: 16 fps
    shape = frames.shape
    frames *= 255  # in place: the float frames are the largest host array; no second copy of them
    video = np.round(frames, out=frames).astype(np.uint8)
    del frames
    start = time.perf_counter()
    write_video(video, args.out, fps)
    timings["write"] = time.perf_counter() - start
    print(f"wrote {args.out} ({shape[0]} frames, {shape[2]}x{shape[1]}, {fps} fps; {args.steps} steps, "
          f"guidance {args.guidance:g}); "
          + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return 0


def info(args) -> int:
    import torch

    import cogvx
    from cogvx_kernels.info import check, collect

    data = collect()
    data["cogvx"] = cogvx.__version__
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        data["gpu_memory_gib"] = dict(free=round(free / 2**30, 1), total=round(total / 2**30, 1))
    print(json.dumps(data, indent=2, default=str))
    if getattr(args, "check", False):
        return check(args.device, args.quick)
    return 0


def train_vae(args) -> int:
    from .train.config import load_vae_config
    from .train.vae import train_vae as train

    return _run_trainer(args, load_vae_config, train)


def train_transformer(args) -> int:
    from .train.config import load_transformer_config
    from .train.transformer import train_transformer as train

    return _run_trainer(args, load_transformer_config, train)


def _run_trainer(args, load_config, train) -> int:
    """Config errors, a missing file named by it and an incompatible checkpoint: one line, before
    any training step."""
    from .loading import ConfigError
    from .train.checkpoint import CheckpointError

    try:
        config = load_config(args.config)
        config.check_files()
    except (ConfigError, OSError) as exc:
        raise UsageError(_first_line(exc)) from None
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder")
    try:
        result = train(config, args.out, resume=args.resume)
    except (ConfigError, CheckpointError) as exc:
        raise UsageError(_first_line(exc)) from None
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: the checkpoints written so far stay
        from .train.checkpoint import latest_checkpoint

        latest = latest_checkpoint(args.out if args.out is not None else config.train.out)
        print(f"cogvx: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; "
              + (f"the latest checkpoint is {latest}: continue with --resume" if latest else "no checkpoint yet"),
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    if result["checkpoint"] is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result['step']}; last checkpoint {result['checkpoint']}")
    return 0


def train_default_model(args) -> int:
    from .loading import ConfigError
    from .train import default_model
    from .train.cache import CacheError
    from .train.checkpoint import CheckpointError

    vae_config = args.vae_config or default_model.VAE_CONFIG
    transformer_config = args.transformer_config or default_model.TRANSFORMER_CONFIG
    for path in (vae_config, transformer_config):
        if not path.is_file():
            raise UsageError(f"config {path} does not exist (the default model's configs come with the source tree: "
                             "configs/default-model-*.toml)")
    out = args.out if args.out is not None else args.work / "pipeline"
    if args.work.exists() and not args.work.is_dir():
        raise UsageError(f"--work {args.work} is a file; give a folder")
    try:
        default_model.check_out(out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        default_model.train_default_model(out, work=args.work, seed=args.seed, vae_config=vae_config,
                                          transformer_config=transformer_config)
    except (ConfigError, CheckpointError, CacheError, OSError) as exc:
        raise UsageError(_first_line(exc)) from None
    except KeyboardInterrupt as exc:
        print(f"cogvx: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; the stages keep their "
              "checkpoints and cache shards: run the same command again to continue", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


def _add_cache_latents(sub) -> None:
    c = sub.add_parser("cache-latents", help="encode a transformer training config's clips and captions once (VAE "
                                              "posterior + T5), for training from the cache (also under torchrun)")
    c.add_argument("--config", type=Path, required=True, help="a transformer training config: its [data] and "
                                                                "model.pipeline are read")
    c.add_argument("--out", type=Path, default=None, help="the cache folder (default: the config's data.cache)")
    c.add_argument("--storage", choices=["fp32", "bf16"], default="fp32", help="dtype of the stored tensors")
    c.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="dtype the VAE and T5 run in (default: bf16 on cuda, fp32 on cpu)")
    c.add_argument("--device", choices=["cuda", "cpu"], default=None)
    c.add_argument("--batch-size", type=_positive_int, default=1, help="clips encoded together")
    c.add_argument("--shard-size", type=_positive_int, default=256, help="clips a shard file")


def cache_latents(args) -> int:
    """Config errors, missing files and a folder holding another cache: one line, before encoding.
    Under torchrun every rank encodes its share of the clips; rank 0 writes the manifest."""
    import torch
    import torch.distributed as dist

    from .loading import ConfigError
    from .train.cache import CacheError, LatentCache, cache_latents as cache
    from .train.config import load_cache_config
    from .train.data import make_dataset

    try:
        config = load_cache_config(args.config)
        config.check_files()
    except (ConfigError, OSError) as exc:
        raise UsageError(_first_line(exc)) from None
    out = args.out if args.out is not None else config.data.cache
    if out is None:
        raise UsageError(f"no cache folder: give --out or set data.cache in {args.config}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")])
    data = config.data
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        if device == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dataset = make_dataset(data.source, buckets=data.shapes, seed=data.seed,
                                   length=data.length if data.synthetic else None)
        except (OSError, ValueError) as exc:
            raise UsageError(f"data.source: {_first_line(exc)}") from None
        rank = dist.get_rank() if dist.is_initialized() else 0
        try:
            cache(dataset, config.model.pipeline, out, storage=args.storage, dtype=dtype, device=device,
                  batch_size=args.batch_size, shard_size=args.shard_size, progress=rank == 0)
        except (CacheError, ValueError) as exc:
            raise UsageError(_first_line(exc)) from None
        except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: the whole shards stay and are reused
            print(f"cogvx: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; the shards written so "
                  f"far in {out} are kept: run the same command again to finish the cache", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        if rank == 0:
            done = LatentCache(out)
            print(f"cached {len(done)} clips in {len(done.files)} shards to {out}"
                  + (f" ({done.skipped} unreadable clips left out)" if done.skipped else ""))
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0


def plot_log(args) -> int:
    from .train.log import plot_log as plot

    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out must end in .png; got {args.out}")
    try:
        probe(args.out)
        plot(args.log, args.out)
    except ValueError as exc:
        raise UsageError(_first_line(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc.strerror or _first_line(exc)}") from None
    print(f"wrote {args.out}")
    return 0


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the cleanup short
    raise Terminated()


def main(argv=None) -> int:
    argv = _join_dash_values(sys.argv[1:] if argv is None else list(argv))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        args = _parser().parse_args(argv)  # --help prints and exits 0 (SystemExit)
        return {"generate": generate, "info": info, "train-vae": train_vae, "train": train_transformer,
                "cache-latents": cache_latents, "train-default-model": train_default_model,
                "plot-log": plot_log}[args.command](args)
    except UsageError as exc:
        if _rank() == 0:  # under torchrun every rank refuses alike: one line
            print(f"cogvx: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("cogvx: terminated; nothing written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("cogvx: interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

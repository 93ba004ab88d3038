"""Training clips: items `{"video": float32 (3, F, H, W) in [-1, 1], "caption": str}`, or None for
a file that cannot be read (skipped, counted and warned about, never a crash mid-epoch).

- `synthetic:shapes` (`SyntheticShapes`): a coloured square, circle or triangle moving left, right,
  up or down on a plain background, captioned "a red square moving left"; every clip a function
  of (seed, index) alone.
- A captioned folder (`CaptionedFolder`): `captions.jsonl` lines `{"path": ..., "caption": ...}`,
  videos and images (an image is a 1-frame clip), resized on the shorter side and centre-cropped,
  a random temporal crop of F frames (random from (seed, index)).
- `Batches`: an endless, deterministic stream of collated batches (epoch permutations from
  (seed, epoch); each rank its own disjoint share; DataLoader workers optional); `position` is how
  many batches were consumed and `start=` resumes there. A skipped item is replaced by a readable
  one (deterministically), so every batch has `batch_size` clips on every rank.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

SYNTHETIC_SHAPES = "synthetic:shapes"
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "white": (1.0, 1.0, 1.0)}  # none a shape colour
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def make_dataset(source: str | Path, *, frames: int, height: int, width: int, seed: int = 0,
                 length: int | None = None) -> Dataset:
    """The dataset a config's `data.source` names: "synthetic:shapes" (`length` clips, 1024 by
    default) or a folder with captions.jsonl (`length` does not apply)."""
    if isinstance(source, str) and source.startswith("synthetic:"):
        if source != SYNTHETIC_SHAPES:
            raise ValueError(f"unknown synthetic dataset {source!r}; there is {SYNTHETIC_SHAPES!r}")
        return SyntheticShapes(frames=frames, height=height, width=width, seed=seed,
                               length=1024 if length is None else length)
    return CaptionedFolder(source, frames=frames, height=height, width=width, seed=seed)


def _check_size(frames: int, height: int, width: int) -> None:
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _rng(*keys: int) -> np.random.Generator:
    """A generator that depends on the keys alone (numpy's SeedSequence mixes them)."""
    return np.random.default_rng([int(k) for k in keys])


# -- synthetic:shapes -----------------------------------------------------------------------------
class SyntheticShapes(Dataset):
    """Coloured shapes moving in a straight line at constant speed on a plain background.

    Each clip: a colour (red, green, blue, yellow), a shape (square, circle, triangle: apex up), a
    direction (left, right, up, down), a background (black, gray, white), a size (radius 15–25 % of
    the shorter side) and a path that keeps the whole shape inside the frame, all drawn from
    (seed, index). Edges are anti-aliased over one pixel (coverage from the signed distance). One
    frame is an image, captioned without motion ("a red square")."""

    def __init__(self, *, frames: int, height: int, width: int, seed: int = 0, length: int = 1024):
        _check_size(frames, height, width)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive integer; got {length!r}")
        self.frames, self.height, self.width, self.seed, self.length = frames, height, width, seed, length

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> dict:
        """What clip `index` shows: colour, shape, direction, background, radius and the centre
        (y, x) in pixels at the first and last frame."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        rng = _rng(self.seed, index)
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        radius = rng.uniform(0.15, 0.25) * min(self.height, self.width)
        dy, dx = DIRECTIONS[direction]
        y_lo, y_hi, x_lo, x_hi = radius, self.height - radius, radius, self.width - radius
        # along the motion: travel 40–80 % of the free span, from the side it moves away from
        along_lo, along_hi = (y_lo, y_hi) if dy else (x_lo, x_hi)
        travel = rng.uniform(0.4, 0.8) * (along_hi - along_lo) if self.frames > 1 else 0.0
        begin = rng.uniform(along_lo, along_hi - travel)
        if (dy or dx) < 0:  # moving up or left: start at the far end
            begin = along_lo + along_hi - begin
        across = rng.uniform(x_lo, x_hi) if dy else rng.uniform(y_lo, y_hi)
        sign = dy or dx
        if dy:
            first, last = (begin, across), (begin + sign * travel, across)
        else:
            first, last = (across, begin), (across, begin + sign * travel)
        return {"colour": colour, "shape": shape, "direction": direction, "background": background,
                "radius": radius, "first": first, "last": last}

    def caption(self, index: int) -> str:
        d = self.describe(index)
        return f"a {d['colour']} {d['shape']}" + (f" moving {d['direction']}" if self.frames > 1 else "")

    def __getitem__(self, index: int) -> dict:
        d = self.describe(index)
        t = torch.linspace(0, 1, self.frames, dtype=torch.float64)  # 0 → 1 over the clip; [0] for an image
        cy = d["first"][0] + (d["last"][0] - d["first"][0]) * t  # (F,)
        cx = d["first"][1] + (d["last"][1] - d["first"][1]) * t
        ys = torch.arange(self.height, dtype=torch.float64) + 0.5  # pixel centres
        xs = torch.arange(self.width, dtype=torch.float64) + 0.5
        py = ys.view(1, -1, 1) - cy.view(-1, 1, 1)  # (F, H, 1)
        px = xs.view(1, 1, -1) - cx.view(-1, 1, 1)  # (F, 1, W)
        distance = _signed_distance(d["shape"], py, px, d["radius"])  # (F, H, W), negative inside
        alpha = (0.5 - distance).clamp(0, 1)  # one-pixel anti-aliased edge
        colour = torch.tensor(COLOURS[d["colour"]], dtype=torch.float64).view(3, 1, 1, 1)
        background = torch.tensor(BACKGROUNDS[d["background"]], dtype=torch.float64).view(3, 1, 1, 1)
        video = background + (colour - background) * alpha.unsqueeze(0)  # (3, F, H, W) in [0, 1]
        return {"video": (video * 2 - 1).float(), "caption": self.caption(index)}


def _signed_distance(shape: str, py: torch.Tensor, px: torch.Tensor, r: float) -> torch.Tensor:
    """Distance to the shape's edge (negative inside) of points (py, px) relative to its centre;
    the square's half side and the triangle's circumradius are r."""
    if shape == "square":
        return torch.maximum(py.abs(), px.abs()) - r
    if shape == "circle":
        return torch.sqrt(py ** 2 + px ** 2) - r
    # equilateral triangle, apex up (y grows downwards): the farthest of its three edge lines,
    # each at the inradius r/2 along the outward normal opposite a vertex
    normals = [(1.0, 0.0), (-0.5, -math.sqrt(3) / 2), (-0.5, math.sqrt(3) / 2)]  # (ny, nx)
    return torch.stack([py * ny + px * nx for ny, nx in normals]).amax(0) - r / 2


# -- captioned folders ----------------------------------------------------------------------------
class CaptionedFolder(Dataset):
    """A folder of videos and images listed in `captions.jsonl` (one JSON object per line:
    {"path": file relative to the folder, "caption": text}; blank lines ignored).

    Videos are decoded with PyAV: it is installed here with FFmpeg inside its wheel and decodes
    frame by frame after a seek, so a temporal crop decodes only the frames up to its end from the
    nearest keyframe (torchcodec would need a build matched to our torch version plus system FFmpeg
    libraries). Images (png, jpg, webp, bmp) are read with PIL as 1-frame clips: with frames > 1
    they are left out (one warning), with frames = 1 a video gives one random frame.

    Each item: frames resized (bilinear, antialiased) so the shorter side relative to the target
    fills it, centre-cropped to height × width; a random crop of `frames` consecutive frames, its
    start drawn from (seed, index). A video shorter than `frames` is skipped (None, one warning);
    so is a missing, unreadable or corrupt file. A malformed captions.jsonl line is an error naming
    it, and so is a folder none of whose files can be read (probed at construction)."""

    def __init__(self, root: str | Path, *, frames: int, height: int, width: int, seed: int = 0):
        _check_size(frames, height, width)
        self.root, self.frames, self.height, self.width, self.seed = Path(root), frames, height, width, seed
        index = self.root / "captions.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{str(self.root)!r} has no captions.jsonl (one {{\"path\": ..., "
                                    f"\"caption\": ...}} line per video or image)")
        entries = _read_captions(index)
        if frames > 1:
            videos = [e for e in entries if Path(e[0]).suffix.lower() not in IMAGE_SUFFIXES]
            if len(videos) < len(entries):
                warnings.warn(f"{str(index)!r}: {len(entries) - len(videos)} image(s) left out: an image is a 1-frame "
                              f"clip and this dataset takes {frames} frames", stacklevel=2)
            entries = videos
        if not entries:
            raise ValueError(f"{str(index)!r} lists no {'video' if frames > 1 else 'video or image'}")
        self.entries = entries  # (path as written, caption)
        self._warned: set[str] = set()
        if not any(self._load(i, warn=False) is not None for i in range(len(entries))):  # stops at the first
            raise ValueError(f"no file listed in {str(index)!r} can be read as a clip of {frames} frames "
                             f"(missing, unreadable, or shorter)")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict | None:
        return self._load(index, warn=True)

    def _load(self, index: int, warn: bool) -> dict | None:
        name, caption = self.entries[index]
        path = self.root / name
        try:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                frames = [_read_image(path)]
            else:
                frames = _read_video(path, self.frames, _rng(self.seed, index))
        except Exception as exc:  # noqa: BLE001 — whatever a file does wrong, it is skipped, not fatal
            if warn and name not in self._warned:
                self._warned.add(name)
                reason = "missing" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
                warnings.warn(f"skipping {str(path)!r} (line of {caption!r}): {reason}", stacklevel=3)
            return None
        video = torch.stack([self._fit(frame) for frame in frames], dim=1)  # (3, F, H, W)
        return {"video": video, "caption": caption}

    def _fit(self, frame: np.ndarray) -> torch.Tensor:
        """(h, w, 3) uint8 → (3, height, width) float32 in [-1, 1]: resize so both sides cover the
        target (the shorter one exactly), then crop the centre."""
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().unsqueeze(0)
        h, w = x.shape[-2:]
        scale = max(self.height / h, self.width / w)
        size = (max(self.height, round(h * scale)), max(self.width, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - self.height) // 2, (size[1] - self.width) // 2
        x = x[0, :, top:top + self.height, left:left + self.width]
        return (x / 127.5 - 1).clamp(-1, 1)


def _read_captions(index: Path) -> list[tuple[str, str]]:
    entries = []
    try:
        lines = index.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(index)!r} is not UTF-8 text: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(index)!r} line {number} is not valid JSON: {exc}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"] \
                or not isinstance(entry.get("caption"), str):
            raise ValueError(f"{str(index)!r} line {number} must be an object with a \"path\" (non-empty string) "
                             f"and a \"caption\" (string); got {line.strip()[:200]}")
        entries.append((entry["path"], entry["caption"]))
    return entries


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy shares it


def _read_video(path: Path, frames: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`frames` consecutive frames (h, w, 3) uint8 from a random start. The frame count comes from
    the container (or its duration); without either, every frame is decoded to count them."""
    import av
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate, base, origin = stream.average_rate, stream.time_base, stream.start_time or 0
        count = stream.frames or (round(stream.duration * base * rate) if stream.duration and rate and base else 0)
        if not count:  # nothing says how many: decode them all
            every = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            if len(every) < frames:
                raise ValueError(f"{len(every)} frames, fewer than the {frames} asked")
            start = int(rng.integers(0, len(every) - frames + 1))
            return every[start:start + frames]
        if count < frames:
            raise ValueError(f"{count} frames, fewer than the {frames} asked")
        start = int(rng.integers(0, count - frames + 1))
        number = None  # frame index from the timestamps after a seek; by counting without one
        if start > 0 and rate and base:
            container.seek(origin + int(start / (rate * base)), stream=stream, backward=True)
        else:
            number = -1
        clip = []
        for frame in container.decode(stream):
            if number is not None:
                number += 1
            elif frame.pts is None:
                raise ValueError("frames without timestamps after a seek")
            index = number if number is not None else round((frame.pts - origin) * base * rate)
            if index < start:
                continue
            if not clip and index > start:  # the seek went past the start: read from the beginning
                return _read_from_start(path, frames, start)
            clip.append(frame.to_ndarray(format="rgb24"))
            if len(clip) == frames:
                return clip
    raise ValueError(f"ended after {start + len(clip)} frames; {start + frames} needed")


def _read_from_start(path: Path, frames: int, start: int) -> list[np.ndarray]:
    import av
    with av.open(str(path)) as container:
        clip = []
        for number, frame in enumerate(container.decode(container.streams.video[0])):
            if number >= start:
                clip.append(frame.to_ndarray(format="rgb24"))
                if len(clip) == frames:
                    return clip
    raise ValueError(f"ended after {start + len(clip)} frames; {start + frames} needed")


# -- batches --------------------------------------------------------------------------------------
def collate(items: list[dict | None]) -> dict:
    """{"video": (B, 3, F, H, W) or None when no item was readable, "caption": [str] * B,
    "skipped": how many items were None}."""
    good = [item for item in items if item is not None]
    return {"video": torch.stack([item["video"] for item in good]) if good else None,
            "caption": [item["caption"] for item in good], "skipped": len(items) - len(good)}


def split_validation(dataset: Dataset, n: int) -> tuple[Dataset, Dataset]:
    """(train, validation): the last `n` clips held out for validation (for a captioned folder, the
    last n lines of captions.jsonl), the others to train on."""
    total = len(dataset)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < total:
        raise ValueError(f"validation clips must be an integer in [0, {total}) for a dataset of {total} clips; "
                         f"got {n!r}")
    return Subset(dataset, range(total - n)), Subset(dataset, range(total - n, total))


class Batches:
    """An endless, deterministic iterator of collated batches of `batch_size` clips per rank.

    Epoch e visits the clips in a permutation drawn from (seed, e); rank r of `world` takes every
    world-th clip of it (disjoint shares of equal size; the few left over wait for the next epoch's
    permutation). The batches are the same with or without DataLoader workers, since an item
    depends on its index alone. A skipped (None) item is replaced by the first readable clip of a
    permutation drawn from (seed, position, rank), so every batch is full; "skipped" counts them.
    `position` is the number of batches consumed; `Batches(..., start=position)` continues there."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0, start: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}); got {rank}")
        if batch_size < 1 or num_workers < 0 or start < 0:
            raise ValueError(f"batch_size must be ≥ 1, num_workers and start ≥ 0; got {batch_size}, "
                             f"{num_workers}, {start}")
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.per_epoch = len(dataset) // world // batch_size  # batches per epoch on every rank
        if self.per_epoch == 0:
            raise ValueError(f"a dataset of {len(dataset)} clips cannot give {world} rank(s) a batch of "
                             f"{batch_size} each")
        self.position = start
        self._loader = None
        if num_workers > 0:
            sampler = _IndexBatches(len(dataset), batch_size, seed, rank, world, start)
            self._loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate))

    def indices(self, position: int) -> list[int]:
        """The dataset indices of this rank's batch number `position` (counted from the start)."""
        return _indices(len(self.dataset), self.batch_size, self.seed, self.rank, self.world, position)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._loader is not None:
            batch = next(self._loader)
        else:
            batch = collate([self.dataset[i] for i in self.indices(self.position)])
        if batch["skipped"]:
            batch = self._refill(batch)
        self.position += 1
        return batch

    def _refill(self, batch: dict) -> dict:
        """The batch completed with readable clips, taken in a permutation drawn from (seed, position,
        rank), again from its start if needed (a dataset with fewer readable clips than a batch)."""
        videos = [] if batch["video"] is None else list(batch["video"])
        captions, skipped = list(batch["caption"]), batch["skipped"]
        order = _rng(self.seed, self.position, self.rank).permutation(len(self.dataset))
        while len(videos) < self.batch_size:
            found = False
            for i in order:
                item = self.dataset[int(i)]
                if item is None:
                    skipped += 1
                    continue
                found = True
                videos.append(item["video"])
                captions.append(item["caption"])
                if len(videos) == self.batch_size:
                    break
            if not found:
                raise RuntimeError("no clip of the dataset can be read any more")
        return {"video": torch.stack(videos), "caption": captions, "skipped": skipped}


def _indices(length: int, batch_size: int, seed: int, rank: int, world: int, position: int) -> list[int]:
    per_epoch = length // world // batch_size
    epoch, batch = divmod(position, per_epoch)
    order = _rng(seed, epoch).permutation(length)
    share = order[rank:per_epoch * batch_size * world:world]
    return [int(i) for i in share[batch * batch_size:(batch + 1) * batch_size]]


class _IndexBatches:
    """Index batches from `start` on, for a DataLoader's batch_sampler (endless). It holds numbers,
    not the Batches: a reference back would make a cycle whose collection stalls the workers' exit."""

    def __init__(self, *args: int):
        *self.args, self.start = args

    def __iter__(self):
        position = self.start
        while True:
            yield _indices(*self.args, position)
            position += 1

"""Training clips: items `{"video": float32 (3, F, H, W) in [-1, 1], "caption": str}`, or None for
a file that cannot be read (skipped, counted and warned about, never a crash mid-epoch).

- `synthetic:shapes` (`SyntheticShapes`): a coloured square, circle or triangle moving left, right,
  up or down on a plain background, captioned "a red square moving left"; every clip a function
  of (seed, index) alone.
- A captioned folder (`CaptionedFolder`): `captions.jsonl` lines `{"path": ..., "caption": ...}`,
  videos and images (an image is a 1-frame clip), resized on the shorter side and centre-cropped,
  a random temporal crop of F frames (random from (seed, index)).
- Buckets: a dataset made with `buckets=[(frames, height, width), ...]` gives each clip at every
  bucket it can fill (`bucket_members()`), read with the key `dataset[(index, bucket)]`; a 1-frame
  bucket is an image bucket (a video gives it one frame), the others video buckets. A dataset
  made with frames, height, width has that one bucket and is read with `dataset[index]`.
- `Batches`: an endless, deterministic stream of collated batches, each batch one bucket's shape
  (images and videos mixed at `image_ratio`; epoch permutations per bucket from (seed, bucket,
  epoch); each rank its own disjoint share; DataLoader workers optional); `position` is how many
  batches were consumed and `start=` resumes there. A skipped item is replaced by a readable one of
  the same bucket (deterministically), so every batch has `batch_size` clips on every rank.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

SYNTHETIC_SHAPES = "synthetic:shapes"
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "white": (1.0, 1.0, 1.0)}  # none a shape colour
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
CAPTION_WORDS = ("a", *COLOURS, *SHAPES, "moving", *DIRECTIONS)  # every word of SyntheticShapes' captions
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
Shape = tuple[int, int, int]  # a bucket: (frames, height, width) of a clip
# first keys of the generators Batches draws from, so that no two of its streams coincide
_ORDER, _SCHEDULE, _REFILL = 1, 2, 3
SCHEDULE_BLOCK = 256  # batch positions whose image/video split is exact (images: round(ratio·256) a block)


def make_dataset(source: str | Path, *, frames: int | None = None, height: int | None = None,
                 width: int | None = None, buckets: list[Shape] | None = None, seed: int = 0,
                 length: int | None = None) -> Dataset:
    """The dataset a config's `data.source` names: "synthetic:shapes" (`length` clips, 1024 by
    default) or a folder with captions.jsonl (`length` does not apply); one shape (frames,
    height, width) or `buckets`."""
    shape = dict(frames=frames, height=height, width=width, buckets=buckets, seed=seed)
    if isinstance(source, str) and source.startswith("synthetic:"):
        if source != SYNTHETIC_SHAPES:
            raise ValueError(f"unknown synthetic dataset {source!r}; there is {SYNTHETIC_SHAPES!r}")
        return SyntheticShapes(**shape, length=1024 if length is None else length)
    return CaptionedFolder(source, **shape)


def _check_size(frames: int, height: int, width: int) -> None:
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _shapes(frames, height, width, buckets) -> list[Shape]:
    """The buckets of a dataset: `buckets`, or the one shape (frames, height, width)."""
    if buckets is None:
        _check_size(frames, height, width)
        return [(int(frames), int(height), int(width))]
    if (frames, height, width) != (None, None, None):
        raise ValueError("give either frames, height, width (one shape) or buckets, not both")
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__len__") or not len(buckets):
        raise ValueError(f"buckets must be a non-empty list of (frames, height, width); got {buckets!r}")
    shapes = []
    for bucket in buckets:
        if isinstance(bucket, (str, bytes)) or not hasattr(bucket, "__len__") or len(bucket) != 3:
            raise ValueError(f"each bucket must be (frames, height, width); got {bucket!r}")
        _check_size(*bucket)
        shapes.append(tuple(int(v) for v in bucket))
    if len(set(shapes)) < len(shapes):
        raise ValueError(f"buckets must be distinct; got {shapes}")
    return shapes


class _Bucketed:
    """Keys of a dataset with buckets: `dataset[(index, bucket)]` is clip `index` at the shape
    `buckets[bucket]`; `dataset[index]` is allowed when there is one bucket."""
    buckets: list[Shape]

    def _key(self, key) -> tuple[int, int]:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise KeyError(f"a bucketed key is (index, bucket); got {key!r}")
            index, bucket = int(key[0]), int(key[1])
        elif len(self.buckets) > 1:
            raise KeyError(f"this dataset has {len(self.buckets)} buckets: read it with dataset[(index, bucket)] "
                           f"(bucket a number in [0, {len(self.buckets)})); got {key!r}")
        else:
            index, bucket = int(key), 0
        if not 0 <= bucket < len(self.buckets):
            raise IndexError(f"bucket {bucket} out of range for {len(self.buckets)} buckets")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        return index, bucket


def _rng(*keys: int) -> np.random.Generator:
    """A generator that depends on the keys alone (numpy's SeedSequence mixes them)."""
    return np.random.default_rng([int(k) for k in keys])


# -- synthetic:shapes -----------------------------------------------------------------------------
class SyntheticShapes(_Bucketed, Dataset):
    """Coloured shapes moving in a straight line at constant speed on a plain background.

    Each clip: a colour (red, green, blue, yellow), a shape (square, circle, triangle: apex up), a
    direction (left, right, up, down), a background (black, gray, white), a size (radius 15–25 % of
    the shorter side) and a path that keeps the whole shape inside the frame, all drawn from
    (seed, index). Edges are anti-aliased over one pixel (coverage from the signed distance). One
    frame is an image, captioned without motion ("a red square"). Every clip can be drawn at every
    bucket: all are members of all buckets."""

    def __init__(self, *, frames: int | None = None, height: int | None = None, width: int | None = None,
                 seed: int = 0, length: int = 1024, buckets: list[Shape] | None = None):
        self.buckets = _shapes(frames, height, width, buckets)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive integer; got {length!r}")
        self.frames, self.height, self.width = self.buckets[0]  # the shape describe() and caption() default to
        self.seed, self.length = seed, length

    def __len__(self) -> int:
        return self.length

    def bucket_members(self) -> list[np.ndarray]:
        return [np.arange(self.length) for _ in self.buckets]

    def describe(self, index: int, shape: Shape | None = None) -> dict:
        """What clip `index` shows at `shape` (default: the first bucket): colour, shape, direction,
        background, radius and the centre (y, x) in pixels at the first and last frame."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        frames, height, width = shape or self.buckets[0]
        rng = _rng(self.seed, index)
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        radius = rng.uniform(0.15, 0.25) * min(height, width)
        dy, dx = DIRECTIONS[direction]
        y_lo, y_hi, x_lo, x_hi = radius, height - radius, radius, width - radius
        # along the motion: travel 40–80 % of the free span, from the side it moves away from
        along_lo, along_hi = (y_lo, y_hi) if dy else (x_lo, x_hi)
        travel = rng.uniform(0.4, 0.8) * (along_hi - along_lo) if frames > 1 else 0.0
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

    def caption(self, index: int, shape: Shape | None = None) -> str:
        d = self.describe(index, shape)
        frames = (shape or self.buckets[0])[0]
        return f"a {d['colour']} {d['shape']}" + (f" moving {d['direction']}" if frames > 1 else "")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, bucket = self._key(key)
        shape = self.buckets[bucket]
        frames, height, width = shape
        d = self.describe(index, shape)
        t = torch.linspace(0, 1, frames, dtype=torch.float64)  # 0 → 1 over the clip; [0] for an image
        cy = d["first"][0] + (d["last"][0] - d["first"][0]) * t  # (F,)
        cx = d["first"][1] + (d["last"][1] - d["first"][1]) * t
        ys = torch.arange(height, dtype=torch.float64) + 0.5  # pixel centres
        xs = torch.arange(width, dtype=torch.float64) + 0.5
        py = ys.view(1, -1, 1) - cy.view(-1, 1, 1)  # (F, H, 1)
        px = xs.view(1, 1, -1) - cx.view(-1, 1, 1)  # (F, 1, W)
        distance = _signed_distance(d["shape"], py, px, d["radius"])  # (F, H, W), negative inside
        alpha = (0.5 - distance).clamp(0, 1)  # one-pixel anti-aliased edge
        colour = torch.tensor(COLOURS[d["colour"]], dtype=torch.float64).view(3, 1, 1, 1)
        background = torch.tensor(BACKGROUNDS[d["background"]], dtype=torch.float64).view(3, 1, 1, 1)
        video = background + (colour - background) * alpha.unsqueeze(0)  # (3, F, H, W) in [0, 1]
        return {"video": (video * 2 - 1).float(), "caption": self.caption(index, shape)}


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
class CaptionedFolder(_Bucketed, Dataset):
    """A folder of videos and images listed in `captions.jsonl` (one JSON object per line:
    {"path": file relative to the folder, "caption": text}; blank lines ignored).

    Videos are decoded with PyAV: it is installed here with FFmpeg inside its wheel and decodes
    frame by frame after a seek, so a temporal crop decodes only the frames up to its end from the
    nearest keyframe (torchcodec would need a build matched to our torch version plus system FFmpeg
    libraries). Images (png, jpg, webp, bmp) are read with PIL as 1-frame clips: without a 1-frame
    bucket they are left out (one warning); a video at a 1-frame bucket gives one random frame.

    Each item: frames resized (bilinear, antialiased) so the shorter side relative to the target
    fills it, centre-cropped to height × width; a random crop of `frames` consecutive frames, its
    start drawn from (seed, index). A video shorter than `frames` is skipped (None, one warning);
    so is a missing, unreadable or corrupt file. A malformed captions.jsonl line is an error naming
    it, and so is a folder none of whose files can be read (probed at construction).

    Buckets: with one image bucket and at most one video bucket, every video belongs to both and
    every image to the image bucket. With several buckets of a kind, each file's size and frame
    count are read first (`bucket_members()`, once) and a file joins the bucket of its kind nearest
    its aspect ratio (then the most frames it can fill, then the largest area); a video also joins
    the image bucket nearest its aspect ratio; a file that cannot be read or is shorter than every
    video bucket joins no video bucket (one warning with the count)."""

    def __init__(self, root: str | Path, *, frames: int | None = None, height: int | None = None,
                 width: int | None = None, seed: int = 0, buckets: list[Shape] | None = None):
        self.buckets = _shapes(frames, height, width, buckets)
        self.frames, self.height, self.width = self.buckets[0]
        self.root, self.seed = Path(root), seed
        index = self.root / "captions.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{str(self.root)!r} has no captions.jsonl (one {{\"path\": ..., "
                                    f"\"caption\": ...}} line per video or image)")
        entries = _read_captions(index)
        images_allowed = any(f == 1 for f, _, _ in self.buckets)
        if not images_allowed:
            videos = [e for e in entries if not _is_image(e[0])]
            if len(videos) < len(entries):
                what = f"{self.frames} frames" if len(self.buckets) == 1 else "no 1-frame bucket"
                warnings.warn(f"{str(index)!r}: {len(entries) - len(videos)} image(s) left out: an image is a 1-frame "
                              f"clip and this dataset takes {what}", stacklevel=2)
            entries = videos
        if not entries:
            raise ValueError(f"{str(index)!r} lists no {'video or image' if images_allowed else 'video'}")
        self.entries = entries  # (path as written, caption)
        self._warned: set[str] = set()
        self._members: list[np.ndarray] | None = None
        shortest = min(range(len(self.buckets)), key=lambda b: self.buckets[b][0])
        if not any(self._load(i, shortest, warn=False) is not None for i in range(len(entries))):  # stops at the first
            raise ValueError(f"no file listed in {str(index)!r} can be read as a clip of {self.buckets[shortest][0]} "
                             f"frames (missing, unreadable, or shorter)")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        index, bucket = self._key(key)
        if self.buckets[bucket][0] > 1 and _is_image(self.entries[index][0]):
            raise ValueError(f"{self.entries[index][0]!r} is an image: it has no clip of {self.buckets[bucket][0]} "
                             f"frames (bucket {bucket}); images fill only 1-frame buckets")
        return self._load(index, bucket, warn=True)

    def bucket_members(self) -> list[np.ndarray]:
        """Per bucket, the indices of the files that fill it (see the class docstring)."""
        if self._members is None:
            self._members = self._assign()
        return self._members

    def _assign(self) -> list[np.ndarray]:
        images = [b for b, (f, _, _) in enumerate(self.buckets) if f == 1]
        videos = [b for b, (f, _, _) in enumerate(self.buckets) if f > 1]
        is_image = np.array([_is_image(name) for name, _ in self.entries], dtype=bool)
        if len(images) <= 1 and len(videos) <= 1:  # no choice to make: nothing to read yet
            everything, video_files = np.arange(len(self)), np.flatnonzero(~is_image)
            return [everything if b in images else video_files for b in range(len(self.buckets))]
        members: list[list[int]] = [[] for _ in self.buckets]
        unreadable = too_short = 0
        for index, (name, _) in enumerate(self.entries):
            try:
                count, h, w = _probe(self.root / name)
            except Exception:  # noqa: BLE001 — counted and left out, as reading it would skip it
                unreadable += 1
                continue
            aspect = math.log(w / h)
            nearest = lambda b: (abs(math.log(self.buckets[b][2] / self.buckets[b][1]) - aspect),
                                 -self.buckets[b][0], -self.buckets[b][1] * self.buckets[b][2])
            if images:
                members[min(images, key=nearest)].append(index)
            fitting = [b for b in videos if self.buckets[b][0] <= count]
            if fitting and not is_image[index]:
                members[min(fitting, key=nearest)].append(index)
            elif videos and not is_image[index]:
                too_short += 1
        if unreadable or too_short:
            warnings.warn(f"{str(self.root / 'captions.jsonl')!r}: {unreadable} unreadable file(s) left out of every "
                          f"bucket, {too_short} video(s) shorter than every video bucket left out of them",
                          stacklevel=3)
        return [np.array(m, dtype=np.int64) for m in members]

    def _load(self, index: int, bucket: int, warn: bool) -> dict | None:
        name, caption = self.entries[index]
        frames, height, width = self.buckets[bucket]
        path = self.root / name
        try:
            if _is_image(name):
                clip = [_read_image(path)]
            else:
                clip = _read_video(path, frames, _rng(self.seed, index))
        except Exception as exc:  # noqa: BLE001 — whatever a file does wrong, it is skipped, not fatal
            if warn and name not in self._warned:
                self._warned.add(name)
                reason = "missing" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
                warnings.warn(f"skipping {str(path)!r} (line of {caption!r}): {reason}", stacklevel=3)
            return None
        video = torch.stack([_fit(frame, height, width) for frame in clip], dim=1)  # (3, F, H, W)
        return {"video": video, "caption": caption}


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _fit(frame: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(h, w, 3) uint8 → (3, height, width) float32 in [-1, 1]: resize so both sides cover the
    target (the shorter one exactly), then crop the centre."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().unsqueeze(0)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[0, :, top:top + height, left:left + width]
    return (x / 127.5 - 1).clamp(-1, 1)


def _probe(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a file from its header (an image: 1 frame); a video whose
    container gives no frame count has its packets counted (no decoding)."""
    if _is_image(path.name):
        from PIL import Image
        with Image.open(path) as image:
            width, height = image.size
        return 1, height, width
    import av
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        height, width = stream.codec_context.height, stream.codec_context.width
        rate, base = stream.average_rate, stream.time_base
        count = stream.frames or (round(stream.duration * base * rate) if stream.duration and rate and base else 0)
        if not count:
            count = sum(1 for packet in container.demux(stream) if packet.size)
    if not (count and height and width):
        raise ValueError("no frames or no frame size")
    return count, height, width


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
    """The items' tensors stacked (B, ...) and their other values listed, under the same keys, plus
    "skipped": how many items were None. Clips give {"video": (B, 3, F, H, W), "caption": [str] * B};
    nothing readable gives {"video": None, "caption": [], "skipped": B}."""
    good = [item for item in items if item is not None]
    if not good:
        return {"video": None, "caption": [], "skipped": len(items)}
    batch = {key: torch.stack([item[key] for item in good]) if isinstance(value, torch.Tensor)
             else [item[key] for item in good] for key, value in good[0].items()}
    batch["skipped"] = len(items) - len(good)
    return batch


class Part(Dataset):
    """Some clips of a dataset (`split_validation`'s halves), keeping its buckets: its members are
    renumbered to the part's own indices, and `part[(i, bucket)]` reads `dataset[(indices[i], bucket)]`."""

    def __init__(self, dataset: Dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def buckets(self) -> list[Shape]:
        return self.dataset.buckets  # AttributeError for a dataset without buckets: then neither has them

    def bucket_members(self) -> list[np.ndarray]:
        own = np.full(len(self.dataset), -1, dtype=np.int64)
        own[np.asarray(self.indices, dtype=np.int64)] = np.arange(len(self.indices))
        return [own[m][own[m] >= 0] for m in self.dataset.bucket_members()]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.dataset[(self.indices[int(key[0])], *key[1:])]
        return self.dataset[self.indices[key]]


def split_validation(dataset: Dataset, n: int) -> tuple[Dataset, Dataset]:
    """(train, validation): the last `n` clips held out for validation (for a captioned folder, the
    last n lines of captions.jsonl), the others to train on; both keep the dataset's buckets."""
    total = len(dataset)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < total:
        raise ValueError(f"validation clips must be an integer in [0, {total}) for a dataset of {total} clips; "
                         f"got {n!r}")
    return Part(dataset, range(total - n)), Part(dataset, range(total - n, total))


class BucketPlan:
    """Which bucket and which clips every batch position takes, from numbers alone (no dataset: a
    DataLoader's batch sampler holds it; a reference back to the Batches would make a cycle whose
    collection stalls the workers' exit).

    The bucket of position p is the same on every rank. Positions come in blocks of SCHEDULE_BLOCK:
    with `image_ratio`, a block has round(ratio·256·(k+1)) − round(ratio·256·k) image batches (so
    any prefix of the stream is within one batch of the ratio, every block within one) at positions
    shuffled by (seed, block); each image (video) batch takes an image (video) bucket drawn with
    probability proportional to its batches per epoch, so the clips of a kind are visited at one
    rate. Without a ratio, every bucket is drawn in proportion to its batches per epoch. The n-th
    batch of bucket b is batch n mod per_epoch[b] of epoch n // per_epoch[b] of that bucket: a
    permutation of its members drawn from (seed, bucket, epoch), of which rank r takes every
    world-th clip (disjoint shares of equal size; the few left over wait for the next epoch)."""

    def __init__(self, members: list[np.ndarray], image: list[bool], *, batch_size: int, seed: int, rank: int,
                 world: int, image_ratio: float | None, shapes: list | None = None):
        self.members = [np.asarray(m, dtype=np.int64) for m in members]
        self.batch_size, self.seed, self.rank, self.world, self.image_ratio = batch_size, seed, rank, world, image_ratio
        self.per_epoch = [len(m) // world // batch_size for m in self.members]
        shapes = shapes or [None] * len(members)
        named = lambda b: f"bucket {b}" + (f" {shapes[b]}" if shapes[b] is not None else "")
        image_buckets = [b for b in range(len(members)) if image[b]]
        video_buckets = [b for b in range(len(members)) if not image[b]]
        if image_ratio is None:
            kinds = [list(range(len(members)))]
        else:
            if not 0 <= image_ratio <= 1:
                raise ValueError(f"image_ratio must be in [0, 1]; got {image_ratio}")
            if image_ratio > 0 and not image_buckets:
                raise ValueError(f"image_ratio {image_ratio} > 0 needs a 1-frame (image) bucket; the buckets are "
                                 f"{[s for s in shapes]}")
            if image_ratio < 1 and not video_buckets:
                raise ValueError(f"image_ratio {image_ratio} < 1 needs a video bucket (more than 1 frame); the buckets "
                                 f"are {[s for s in shapes]}")
            kinds = [image_buckets if image_ratio > 0 else [], video_buckets if image_ratio < 1 else []]
        used = [b for kind in kinds for b in kind]
        empty = [b for b in used if self.per_epoch[b] == 0]
        if empty:
            raise ValueError("; ".join(f"{named(b)} holds {len(self.members[b])} clip(s), too few to give {world} "
                                       f"rank(s) a batch of {batch_size} each" for b in empty)
                             + ": remove it from the buckets or give it more clips")
        self.kinds = [(np.array(k), np.array([self.per_epoch[b] for b in k], dtype=np.float64)) for k in kinds]
        self._blocks: list[np.ndarray] = []  # the buckets of each block's positions, computed in order
        self._counts = [np.zeros(len(members), dtype=np.int64)]  # uses of each bucket before block k
        self._order: dict[int, tuple[int, np.ndarray]] = {}  # bucket -> (epoch, its permutation)

    def _block(self, k: int) -> np.ndarray:
        while len(self._blocks) <= k:
            j = len(self._blocks)
            rng = _rng(self.seed, _SCHEDULE, j)
            n = SCHEDULE_BLOCK
            if self.image_ratio is None:
                kind = np.zeros(n, dtype=np.int64)
            else:
                images = round(self.image_ratio * n * (j + 1)) - round(self.image_ratio * n * j)
                kind = np.ones(n, dtype=np.int64)
                kind[:images] = 0
                rng.shuffle(kind)
            chosen = np.empty(n, dtype=np.int64)
            for which, (buckets, weights) in enumerate(self.kinds):
                if len(buckets):
                    draws = buckets[rng.choice(len(buckets), size=n, p=weights / weights.sum())]
                    chosen[kind == which] = draws[kind == which]
            self._blocks.append(chosen)
            self._counts.append(self._counts[-1] + np.bincount(chosen, minlength=len(self.members)))
        return self._blocks[k]

    def bucket(self, position: int) -> int:
        """The bucket batch number `position` takes (the same on every rank)."""
        return int(self._block(position // SCHEDULE_BLOCK)[position % SCHEDULE_BLOCK])

    def indices(self, position: int) -> list[int]:
        """This rank's clips (indices into the dataset) of batch number `position`."""
        k, offset = divmod(position, SCHEDULE_BLOCK)
        bucket = int(self._block(k)[offset])
        n = int(self._counts[k][bucket] + np.count_nonzero(self._blocks[k][:offset] == bucket))  # its earlier batches
        per_epoch, size = self.per_epoch[bucket], self.batch_size
        epoch, batch = divmod(n, per_epoch)
        cached = self._order.get(bucket)
        if cached is None or cached[0] != epoch:
            order = _rng(self.seed, _ORDER, bucket, epoch).permutation(len(self.members[bucket]))
            cached = self._order[bucket] = (epoch, order)
        share = cached[1][self.rank:per_epoch * size * self.world:self.world]
        return [int(i) for i in self.members[bucket][share[batch * size:(batch + 1) * size]]]

    def refills(self, position: int, bucket: int) -> np.ndarray:
        """Clips to replace unreadable ones of batch `position` with, in order: a permutation of
        the bucket's members drawn from (seed, position, rank)."""
        members = self.members[bucket]
        return members[_rng(self.seed, _REFILL, position, self.rank).permutation(len(members))]


class Batches:
    """An endless, deterministic iterator of collated batches of `batch_size` clips per rank, every
    batch one bucket's shape (see `BucketPlan` for the order).

    A dataset with buckets (`buckets`, `bucket_members()`: SyntheticShapes, CaptionedFolder,
    LatentCache, their `split_validation` parts) is read with keys (index, bucket), or dataset[index]
    when it has one bucket; any other dataset is one bucket of all its clips. `image_ratio`: the share of
    batches taken from 1-frame buckets (None: in proportion to the clips). The batches are the same
    with or without DataLoader workers, since an item depends on its key alone. A skipped (None)
    item is replaced by the first readable clip of the same bucket in a permutation drawn from
    (seed, position, rank), so every batch is full; "skipped" counts them. `position` is the number
    of batches consumed; `Batches(..., start=position)` continues there."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0, start: int = 0, image_ratio: float | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}); got {rank}")
        if batch_size < 1 or num_workers < 0 or start < 0:
            raise ValueError(f"batch_size must be ≥ 1, num_workers and start ≥ 0; got {batch_size}, "
                             f"{num_workers}, {start}")
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        if hasattr(dataset, "buckets") and hasattr(dataset, "bucket_members"):
            shapes = list(dataset.buckets)
            members = dataset.bucket_members()
        else:
            shapes, members = [None], [np.arange(len(dataset))]
            if image_ratio is not None:
                raise ValueError("image_ratio needs a dataset with buckets (made with buckets=...)")
        if len(members) == 1 and members[0].size < world * batch_size:
            raise ValueError(f"a dataset of {len(members[0])} clips cannot give {world} rank(s) a batch of "
                             f"{batch_size} each")
        self.plan = BucketPlan(members, [s is not None and s[0] == 1 for s in shapes], batch_size=batch_size,
                               seed=seed, rank=rank, world=world, image_ratio=image_ratio, shapes=shapes)
        self.shapes = shapes
        self.bucketed = len(shapes) > 1  # keys (index, bucket); with one bucket plain indices
        self.position = start
        self._loader = None
        if num_workers > 0:
            sampler = _KeyBatches(self.plan, self.bucketed, start)
            self._loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate))

    @property
    def per_epoch(self) -> int | list[int]:
        """Batches per epoch on every rank: a number for one bucket, else one per bucket."""
        return self.plan.per_epoch[0] if len(self.plan.per_epoch) == 1 else list(self.plan.per_epoch)

    def bucket(self, position: int) -> int:
        """The bucket batch number `position` takes (same on every rank); `shapes[bucket]` its shape."""
        return self.plan.bucket(position)

    def indices(self, position: int) -> list[int]:
        """The dataset indices of this rank's batch number `position` (counted from the start)."""
        return self.plan.indices(position)

    def keys(self, position: int) -> list:
        """What batch `position` reads: dataset[key] for each key."""
        return _keys(self.plan, self.bucketed, position)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._loader is not None:
            batch = next(self._loader)
        else:
            batch = collate([self.dataset[key] for key in self.keys(self.position)])
        if batch["skipped"]:
            batch = self._refill(batch)
        self.position += 1
        return batch

    def _refill(self, batch: dict) -> dict:
        """The batch completed with readable clips of its bucket, taken in a permutation drawn from
        (seed, position, rank), again from its start if needed (fewer readable clips than a batch)."""
        bucket = self.plan.bucket(self.position)
        items = [{key: batch[key][i] for key in batch if key != "skipped"}
                 for i in range(self.batch_size - batch["skipped"])]
        skipped = batch["skipped"]
        order = self.plan.refills(self.position, bucket)
        while len(items) < self.batch_size:
            found = False
            for i in order:
                item = self.dataset[(int(i), bucket) if self.bucketed else int(i)]
                if item is None:
                    skipped += 1
                    continue
                found = True
                items.append(item)
                if len(items) == self.batch_size:
                    break
            if not found:
                raise RuntimeError("no clip of the dataset can be read any more")
        return {**collate(items), "skipped": skipped}


def _keys(plan: BucketPlan, bucketed: bool, position: int) -> list:
    indices = plan.indices(position)
    if not bucketed:
        return indices
    bucket = plan.bucket(position)
    return [(i, bucket) for i in indices]


class _KeyBatches:
    """Key batches from `start` on, for a DataLoader's batch_sampler (endless)."""

    def __init__(self, plan: BucketPlan, bucketed: bool, start: int):
        self.plan, self.bucketed, self.start = plan, bucketed, start

    def __iter__(self):
        position = self.start
        while True:
            yield _keys(self.plan, self.bucketed, position)
            position += 1

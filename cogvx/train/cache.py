"""Latent caches for the transformer trainer: every clip's VAE posterior and caption embedding
computed once, so training reads them instead of running the VAE and T5 at every step.

    cache_latents(make_dataset("synthetic:shapes", buckets=[(9, 32, 48), (1, 32, 48)]), "tiny-pipeline", "latents")
    cache = LatentCache("latents", pipeline="tiny-pipeline", buckets=[(9, 32, 48), (1, 32, 48)])
    batches = Batches(cache, batch_size=4, seed=0, image_ratio=0.2)  # {"latent_mean", "latent_std", "text", "caption"}

A cache folder holds
- shards `bucket{b}-{k}.safetensors`: the k-th chunk of bucket b's clips (the dataset's
  `bucket_members()`, `shard_size` at a time), tensors `latent_mean` and `latent_std` (n, C, F', h, w)
  (unscaled: `CausalVAE.encode(video)`'s posterior, diffusers' frame chunking; the trainer samples
  mean + std·ε and applies scaling_factor) and `text` (n, L, D) (`TextEncoder.encode([caption])`),
  stored in fp32 or bf16; the captions and source indices in the header's metadata;
- `empty_text.safetensors`: `text` (L, D), the embedding of "" (for caption dropout);
- `manifest.json`, written last: the shards with their byte sizes, the count, the bucket shapes,
  the models' identity (folder and a digest of the files of vae/, text_encoder/, tokenizer/), the
  dtypes, and a description of the data. A folder without it is an unfinished cache.

Every file is written under a temporary name and renamed (`cogvx._atomic`), so an interrupted run
leaves only whole shards; running again with the same data and models reuses them (their
metadata carries the run's key) and computes the rest. Under torchrun, rank r computes the chunks
r, r + world, ...; after a barrier rank 0 gathers the ranks' shard lists and writes the manifest.

`LatentCache` opens a cache lazily: the manifest at construction (checked against the pipeline
and buckets the trainer uses, and every shard's size against the manifest's), each shard with
safetensors' `safe_open` (memory-mapped) on first use, one row read per item.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .._atomic import atomic_write
from ..loading import read_json
from .data import CaptionedFolder, Part, Shape, _Bucketed

FORMAT = 1
MANIFEST = "manifest.json"
EMPTY_TEXT = "empty_text.safetensors"
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_PARTS = ("vae", "text_encoder", "tokenizer")
_SHARD = re.compile(r"bucket(\d+)-(\d+)\.safetensors")
_WHOLE = 64 * 2**20  # files up to this size are digested whole; larger ones by samples
_SAMPLES, _BLOCK = 256, 64 * 2**10
OPEN_SHARDS = 32  # shard files a LatentCache keeps open (memory-mapped) at once


class CacheError(ValueError):
    """A latent cache that cannot be used: unfinished, damaged, or made from other models or buckets."""


# -- identity -------------------------------------------------------------------------------------
def folder_digest(folder: Path) -> str:
    """SHA-256 over a folder's files (names, sizes, contents; hidden files left out). Files over
    64 MiB contribute 256 evenly spread 64 KiB blocks instead of their whole content: 16 MiB read
    per weights file, so checking a 10 GB T5 takes a moment, and retrained weights still differ
    in every block."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= _WHOLE:
                for block in iter(lambda: f.read(2**20), b""):
                    h.update(block)
            else:
                for k in range(_SAMPLES):
                    f.seek(k * (size - _BLOCK) // (_SAMPLES - 1))
                    h.update(f.read(_BLOCK))
    return h.hexdigest()


def pipeline_identity(pipeline: str | Path) -> dict:
    """{"vae" | "text_encoder" | "tokenizer": {"folder": absolute path, "digest": folder_digest}}."""
    root = Path(pipeline)
    missing = [part for part in MODEL_PARTS if not (root / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(root)!r} is not a pipeline folder with {', '.join(p + '/' for p in MODEL_PARTS)}: "
                                f"no {', '.join(p + '/' for p in missing)}")
    return {part: {"folder": str((root / part).resolve()), "digest": folder_digest(root / part)} for part in MODEL_PARTS}


def describe_dataset(dataset: Dataset) -> dict:
    """What a dataset is, for the manifest and the run's key: its class, size, seed, buckets, and
    for a folder its path and a digest of captions.jsonl; a split part adds its indices."""
    out = {}
    if isinstance(dataset, Part):
        indices = dataset.indices
        out["part"] = [indices.start, indices.stop] if isinstance(indices, range) else [int(i) for i in indices]
        dataset = dataset.dataset
    out.update({"class": type(dataset).__name__, "length": len(dataset), "seed": getattr(dataset, "seed", None),
                "buckets": [list(b) for b in getattr(dataset, "buckets", [])]})
    if isinstance(dataset, CaptionedFolder):
        index = dataset.root / "captions.jsonl"
        out.update(root=str(dataset.root.resolve()), captions_sha256=hashlib.sha256(index.read_bytes()).hexdigest())
    return out


def _key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- writing --------------------------------------------------------------------------------------
def _save(path: Path, tensors: dict, metadata: dict) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def _reusable(path: Path, key: str, requested: str) -> dict | None:
    """A shard already written by an interrupted run of this very cache: its record, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    if meta.get("key") != key or meta.get("requested") != requested:
        return None
    return {"file": path.name, "bucket": int(meta["bucket"]), "count": len(json.loads(meta["indices"])),
            "bytes": path.stat().st_size, "latent_shape": json.loads(meta["latent_shape"])}


@torch.no_grad()
def cache_latents(dataset: Dataset, pipeline: str | Path, out: str | Path, *, storage: str = "fp32",
                  dtype: torch.dtype = torch.float32, device=None, batch_size: int = 1, shard_size: int = 64,
                  progress: bool = False) -> Path:
    """Write the latent cache of `dataset` (one with buckets: SyntheticShapes, CaptionedFolder or a
    split part of one) to the folder `out`, encoding with `pipeline`'s vae/, text_encoder/ and
    tokenizer/ in `dtype` on `device` (default: this rank's GPU, else the CPU), `batch_size` clips
    of a bucket at a time, `shard_size` clips a shard; `storage` "fp32" or "bf16". Unreadable clips
    (None) are left out and counted. Returns the manifest's path. A folder that already holds a
    finished cache of other data, models or settings is an error (nothing is overwritten); one
    of the same is returned as it is."""
    from ..models.vae import CausalVAE
    from ..text import TextEncoder

    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {', '.join(STORAGE)}; got {storage!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not (hasattr(dataset, "buckets") and hasattr(dataset, "bucket_members")):
        raise ValueError(f"cache_latents needs a dataset with buckets (made with buckets=... or one shape); got a "
                         f"{type(dataset).__name__}")
    out = Path(out)
    rank, world = _rank_world()
    if device is None:
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
                  else torch.device("cpu"))
    buckets = [tuple(b) for b in dataset.buckets]
    settings = {"format": FORMAT, "models": pipeline_identity(pipeline), "data": describe_dataset(dataset),
                "buckets": [list(b) for b in buckets], "storage": storage, "dtype": str(dtype).removeprefix("torch."),
                "vae_chunking": "diffusers", "shard_size": shard_size}
    # the key: what the shards hold (a moved but identical pipeline keeps it)
    key = _key({**settings, "models": {part: m["digest"] for part, m in settings["models"].items()}})
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        existing = read_json(manifest_path)
        if existing.get("key") == key:
            return manifest_path
        raise CacheError(f"{str(out)!r} already holds a latent cache of other data, models or settings (its "
                         f"{MANIFEST} differs); choose another output folder or remove that one")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()

    # the chunks: bucket b's members shard_size at a time; rank r takes chunks r, r + world, ...
    members = dataset.bucket_members()
    chunks = [(b, k, [int(i) for i in m[start:start + shard_size]])
              for b, m in enumerate(members) for k, start in enumerate(range(0, len(m), shard_size))]
    mine = chunks[rank::world]
    one_bucket = len(buckets) == 1

    vae = text = None
    records, skipped = [], 0
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(c[2]) for c in mine), desc="caching latents", unit="clip")
    for b, k, indices in mine:
        path = out / f"bucket{b:02d}-{k:05d}.safetensors"
        requested = json.dumps(indices)
        record = _reusable(path, key, requested)
        if record is not None:
            records.append(record)
            skipped += len(indices) - record["count"]
            if bar is not None:
                bar.update(len(indices))
            continue
        if vae is None:  # loaded only when there is something to compute
            vae = CausalVAE.from_pretrained(pipeline, dtype=dtype, device=device, parts=("encoder",))
            text = TextEncoder.from_pretrained(pipeline, dtype=dtype, device=device)
        kept, captions, means, stds, texts = [], [], [], [], []
        for start in range(0, len(indices), batch_size):
            items = []
            for i in indices[start:start + batch_size]:
                item = dataset[i if one_bucket else (i, b)]
                if item is None:
                    skipped += 1
                    continue
                items.append(item)
                kept.append(i)
            if bar is not None:
                bar.update(len(indices[start:start + batch_size]))
            if not items:
                continue
            video = torch.stack([item["video"] for item in items]).to(device=device, dtype=dtype)
            posterior = vae.encode(video)
            prompts = [item["caption"] for item in items]
            means.append(posterior.mean.to("cpu", STORAGE[storage]))
            stds.append(posterior.std.to("cpu", STORAGE[storage]))
            texts.append(text.encode(prompts).to("cpu", STORAGE[storage]))
            captions += prompts
        if not kept:  # nothing readable in this chunk: no shard
            continue
        tensors = {"latent_mean": torch.cat(means), "latent_std": torch.cat(stds), "text": torch.cat(texts)}
        latent_shape = list(tensors["latent_mean"].shape[1:])
        _save(path, tensors, {"key": key, "bucket": str(b), "requested": requested, "indices": json.dumps(kept),
                              "captions": json.dumps(captions), "latent_shape": json.dumps(latent_shape)})
        records.append({"file": path.name, "bucket": b, "count": len(kept), "bytes": path.stat().st_size,
                        "latent_shape": latent_shape})
    if bar is not None:
        bar.close()

    if world > 1:  # every rank's shards, in chunk order
        gathered = [None] * world
        dist.all_gather_object(gathered, (records, skipped))
        records = [r for part, _ in gathered for r in part]
        skipped = sum(s for _, s in gathered)
    records.sort(key=lambda r: r["file"])
    if rank == 0:
        if text is None:
            text = TextEncoder.from_pretrained(pipeline, dtype=dtype, device=device)
        empty = text.encode([""])[0].to("cpu", STORAGE[storage])
        _save(out / EMPTY_TEXT, {"text": empty}, {"key": key})
        shapes = {}
        for r in records:
            shapes.setdefault(r["bucket"], r["latent_shape"])
        listed = {r["file"] for r in records}
        for stale in out.iterdir():  # shards of an interrupted run with other settings
            if _SHARD.fullmatch(stale.name) and stale.name not in listed:
                stale.unlink()
        manifest = {**settings, "key": key, "count": sum(r["count"] for r in records), "skipped": skipped,
                    "latent_shapes": [shapes.get(b) for b in range(len(buckets))],
                    "text_shape": list(empty.shape),
                    "empty_text": {"file": EMPTY_TEXT, "bytes": (out / EMPTY_TEXT).stat().st_size},
                    "shards": [{k: r[k] for k in ("file", "bucket", "count", "bytes")} for r in records]}
        atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    if world > 1:
        dist.barrier()  # the manifest exists before any rank returns
    return manifest_path


# -- reading --------------------------------------------------------------------------------------
class LatentCache(_Bucketed, Dataset):
    """A finished latent cache as a dataset with buckets: items {"latent_mean": (C, F', h, w),
    "latent_std": same, "text": (L, D), "caption": str} in the stored dtype; `empty_text` (L, D).
    With `pipeline` (a pipeline folder) and `buckets`, the cache must have been made from those
    models and with those buckets (else CacheError); every shard must have its recorded size.

    `cache[(i, bucket)]` (what Batches reads) or `cache[i]`; `bucket_of(i)`, `bucket_members()`,
    `buckets` (the clips' (frames, height, width)), `latent_shapes` (per bucket (C, F', h, w), None
    for an empty one), `text_shape`, `source(i)` (the dataset index and bucket it came from),
    `skipped` (clips left out as unreadable), `manifest` (the whole record)."""

    def __init__(self, path: str | Path, *, pipeline: str | Path | None = None, buckets: list[Shape] | None = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            unfinished = self.path.is_dir() and any(_SHARD.fullmatch(p.name) for p in self.path.iterdir())
            raise CacheError(f"{str(self.path)!r} is not a latent cache: no {MANIFEST}"
                             + (" (an unfinished one: run `cogvx cache-latents` again to finish it)" if unfinished
                                else " (make one with `cogvx cache-latents`)"))
        try:
            manifest = read_json(manifest_path)
            if manifest.get("format") != FORMAT:
                raise CacheError(f"{str(manifest_path)!r} has format {manifest.get('format')!r}; this cogvx reads "
                                 f"format {FORMAT}: rebuild the cache")
            self.buckets = [tuple(b) for b in manifest["buckets"]]
            shards = manifest["shards"]
            self.latent_shapes = [tuple(s) if s else None for s in manifest["latent_shapes"]]
            self.text_shape, self.storage = tuple(manifest["text_shape"]), manifest["storage"]
            self.models, self.skipped = manifest["models"], manifest["skipped"]
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CacheError):
                raise
            raise CacheError(f"{str(manifest_path)!r} is not a latent cache manifest ({type(exc).__name__}: {exc}); "
                             f"rebuild the cache") from None
        self.manifest = manifest
        if buckets is not None and [tuple(b) for b in buckets] != self.buckets:
            raise CacheError(f"latent cache {str(self.path)!r} holds the buckets {[list(b) for b in self.buckets]}, "
                             f"not {[list(b) for b in buckets]}: rebuild it with these buckets (`cogvx cache-latents`)")
        if pipeline is not None:
            now = pipeline_identity(pipeline)
            changed = [part for part in MODEL_PARTS if now[part]["digest"] != self.models[part]["digest"]]
            if changed:
                raise CacheError("; ".join(
                    f"latent cache {str(self.path)!r} was made with another {part.replace('_', ' ')}: "
                    f"{self.models[part]['folder']!r}, whose files differ from {now[part]['folder']!r}"
                    for part in changed) + ": rebuild it with `cogvx cache-latents`")
        for record in [*shards, manifest["empty_text"]]:
            file = self.path / record["file"]
            if not file.is_file():
                raise CacheError(f"latent cache {str(self.path)!r}: {record['file']} is missing; rebuild the cache")
            size = file.stat().st_size
            if size != record["bytes"]:
                raise CacheError(f"latent cache {str(self.path)!r}: {record['file']} has {size} bytes, the manifest "
                                 f"says {record['bytes']} (truncated or replaced): rebuild the cache")
        self.files = [record["file"] for record in shards]
        counts = np.array([record["count"] for record in shards], dtype=np.int64)
        self._shard = np.repeat(np.arange(len(shards)), counts)  # entry -> shard, row
        self._row = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        self._bucket = np.repeat(np.array([record["bucket"] for record in shards], dtype=np.int64), counts)
        self._open: OrderedDict[int, tuple] = OrderedDict()  # shard -> (safe_open handle, captions, indices)
        self._empty = None

    def __len__(self) -> int:
        return len(self._shard)

    def bucket_members(self) -> list[np.ndarray]:
        return [np.flatnonzero(self._bucket == b) for b in range(len(self.buckets))]

    def bucket_of(self, index: int) -> int:
        """The bucket entry `index` was cached at."""
        return int(self._bucket[index])

    def __getstate__(self):  # DataLoader workers open the shards themselves
        return {**self.__dict__, "_open": OrderedDict()}

    def _shard_file(self, shard: int):
        """The shard's open handle and metadata; the OPEN_SHARDS most recently used stay open (a
        large cache has more shards than a process may hold files)."""
        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            if len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)
            path = self.path / self.files[shard]
            try:
                handle = safe_open(str(path), framework="pt")
                meta = handle.metadata()
                captions, indices = json.loads(meta["captions"]), json.loads(meta["indices"])
            except (SafetensorError, OSError, KeyError, ValueError) as exc:
                raise CacheError(f"latent cache {str(self.path)!r}: {self.files[shard]} cannot be read "
                                 f"({' '.join(str(exc).split())}): rebuild the cache") from None
            self._open[shard] = (handle, captions, indices)
        return self._open[shard]

    def source(self, index: int) -> tuple[int, int]:
        """(index in the dataset the cache was made from, bucket) of cached clip `index`."""
        _, _, indices = self._shard_file(int(self._shard[index]))
        return indices[int(self._row[index])], self.bucket_of(index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if isinstance(key, tuple):
            index, bucket = self._key(key)
        else:  # a plain index reads the entry at its own bucket
            index = int(key)
            if not 0 <= index < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} cached clips")
            bucket = self.bucket_of(index)
        if self._bucket[index] != bucket:
            raise ValueError(f"cached clip {index} is at bucket {self._bucket[index]} "
                             f"{self.buckets[self._bucket[index]]}, not {bucket} {self.buckets[bucket]}")
        handle, captions, _ = self._shard_file(int(self._shard[index]))
        row = int(self._row[index])
        return {"latent_mean": handle.get_slice("latent_mean")[row], "latent_std": handle.get_slice("latent_std")[row],
                "text": handle.get_slice("text")[row], "caption": captions[row]}

    @property
    def empty_text(self) -> torch.Tensor:
        """(L, D): the embedding of the empty prompt, for caption dropout."""
        if self._empty is None:
            path = self.path / EMPTY_TEXT
            try:
                with safe_open(str(path), framework="pt") as f:
                    self._empty = f.get_tensor("text")
            except (SafetensorError, OSError) as exc:
                raise CacheError(f"latent cache {str(self.path)!r}: {EMPTY_TEXT} cannot be read ({exc}): rebuild "
                                 f"the cache") from None
        return self._empty

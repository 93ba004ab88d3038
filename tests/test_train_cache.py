"""cogvx.train.cache: latent caches through the tiny pipeline's VAE and T5 — equal to a direct
encode, read lazily as a bucketed dataset, stale or damaged caches clear errors, interrupted
writes leave whole files only, two gloo ranks write what one process writes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.models.vae import CausalVAE
from cogvx.text import TextEncoder
from cogvx.train import cache as cache_module
from cogvx.train.cache import MANIFEST, CacheError, LatentCache, cache_latents
from cogvx.train.data import Batches, SyntheticShapes, split_validation

HERE = Path(__file__).resolve().parent
BUCKETS = [(5, 16, 24), (1, 16, 24), (1, 16, 16)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from cogvx.tiny import build
    return build(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="module")
def models(pipeline):
    return CausalVAE.from_pretrained(pipeline, dtype=torch.float32), TextEncoder.from_pretrained(pipeline,
                                                                                                 dtype=torch.float32)


def dataset(length=3):
    return SyntheticShapes(buckets=BUCKETS, seed=2, length=length)


def test_cache_holds_the_direct_encode_and_reads_as_bucketed_batches(pipeline, models, tmp_path):
    vae, text = models
    ds = dataset()
    manifest = cache_latents(ds, pipeline, tmp_path / "cache", shard_size=2)
    cache = LatentCache(tmp_path / "cache", pipeline=pipeline, buckets=BUCKETS)
    assert manifest == tmp_path / "cache" / MANIFEST and len(cache) == 9 and cache.buckets == BUCKETS
    # 3 clips a bucket in shards of 2: 2 shards a bucket; the manifest names them with their sizes
    record = json.loads(manifest.read_text())
    assert [s["count"] for s in record["shards"]] == [2, 1] * 3 and record["count"] == 9 and record["skipped"] == 0
    assert [m.tolist() for m in cache.bucket_members()] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert cache.latent_shapes == [(4, 2, 2, 3), (4, 1, 2, 3), (4, 1, 2, 2)] and cache.text_shape == (226, 32)
    for i in range(len(cache)):
        index, bucket = cache.source(i)
        assert (index, bucket) == (i % 3, i // 3) and cache.bucket_of(i) == bucket
        item = cache[(i, bucket)]
        clip = ds[(index, bucket)]
        with torch.no_grad():
            posterior = vae.encode(clip["video"][None])
        assert item["latent_mean"].dtype == torch.float32 and item["latent_mean"].shape == cache.latent_shapes[bucket]
        assert torch.equal(item["latent_mean"], posterior.mean[0]) and torch.equal(item["latent_std"], posterior.std[0])
        assert item["caption"] == clip["caption"] and ("moving" in item["caption"]) == (bucket == 0)
        assert torch.equal(item["text"], text.encode([clip["caption"]])[0])
        assert torch.equal(cache[i]["latent_std"], item["latent_std"])  # a plain index: the entry's own bucket
    assert torch.equal(cache.empty_text, text.encode([""])[0])
    with pytest.raises(ValueError, match="at bucket 0"):
        cache[(0, 1)]
    batches = Batches(cache, batch_size=2, seed=0, image_ratio=0.5)
    for _ in range(6):
        bucket = batches.bucket(batches.position)
        batch = next(batches)
        assert set(batch) == {"latent_mean", "latent_std", "text", "caption", "skipped"}
        assert batch["latent_mean"].shape == batch["latent_std"].shape == (2, *cache.latent_shapes[bucket])
        assert batch["text"].shape == (2, 226, 32) and len(batch["caption"]) == 2 and batch["skipped"] == 0
    # the same cache again: nothing to do; with other settings in the same folder: an error, nothing touched
    stamp = manifest.stat().st_mtime_ns
    assert cache_latents(ds, pipeline, tmp_path / "cache", shard_size=2) == manifest
    assert manifest.stat().st_mtime_ns == stamp
    with pytest.raises(CacheError, match="already holds a latent cache of other data"):
        cache_latents(ds, pipeline, tmp_path / "cache", shard_size=2, storage="bf16")


def test_bf16_storage_and_a_split_part_with_unreadable_clips(pipeline, tmp_path):
    class Flaky(SyntheticShapes):
        def __getitem__(self, key):
            return None if key[0] == 1 else super().__getitem__(key)

    train, _ = split_validation(Flaky(buckets=BUCKETS[:2], seed=2, length=4), 1)
    cache_latents(train, pipeline, tmp_path / "fp32", batch_size=2)
    cache_latents(train, pipeline, tmp_path / "bf16", batch_size=2, storage="bf16")
    full, half = LatentCache(tmp_path / "fp32"), LatentCache(tmp_path / "bf16")
    assert len(full) == len(half) == 4 and full.skipped == 2  # clip 1 at both buckets left out
    assert [full.source(i)[0] for i in range(4)] == [0, 2, 0, 2]
    for i in range(4):
        a, b = full[i], half[i]
        assert b["latent_mean"].dtype == b["text"].dtype == half.empty_text.dtype == torch.bfloat16
        assert all(torch.equal(a[k].bfloat16(), b[k]) for k in ("latent_mean", "latent_std", "text"))


def test_stale_mismatched_or_damaged_caches_are_clear_errors(pipeline, tmp_path):
    cache_latents(dataset(2), pipeline, tmp_path / "cache", shard_size=1)
    LatentCache(tmp_path / "cache", pipeline=pipeline, buckets=BUCKETS)
    other = tmp_path / "other"  # the same pipeline but a retrained VAE
    shutil.copytree(pipeline, other)
    vae = CausalVAE.from_pretrained(pipeline)
    with torch.no_grad():
        vae.encoder.conv_in.conv.weight.add_(1e-3)
    shutil.rmtree(other / "vae")
    vae.save_pretrained(other / "vae")
    with pytest.raises(CacheError, match=r"made with another vae: .*whose files differ from .*other/vae.*rebuild"):
        LatentCache(tmp_path / "cache", pipeline=other)
    with pytest.raises(CacheError, match=r"holds the buckets \[\[5, 16, 24\], \[1, 16, 24\], \[1, 16, 16\]\], not "
                                         r"\[\[5, 16, 24\]\]"):
        LatentCache(tmp_path / "cache", buckets=BUCKETS[:1])
    shard = tmp_path / "cache" / "bucket01-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match=r"bucket01-00001.safetensors has \d+ bytes, the manifest says \d+ "
                                         r"\(truncated"):
        LatentCache(tmp_path / "cache")
    (tmp_path / "cache" / MANIFEST).unlink()
    with pytest.raises(CacheError, match="no manifest.json.*unfinished one"):
        LatentCache(tmp_path / "cache")
    with pytest.raises(CacheError, match="no manifest.json.*make one"):
        LatentCache(tmp_path / "nothing")


def test_an_interrupted_writer_leaves_whole_shards_and_a_rerun_finishes(pipeline, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_save = cache_module.save_file
    written = []

    def dies_in_the_third_shard(tensors, path, metadata):
        if len(written) == 2:
            Path(path).write_bytes(b"half a shard")  # the temporary file, partly written
            raise KeyboardInterrupt
        real_save(tensors, path, metadata=metadata)
        written.append(path)

    monkeypatch.setattr(cache_module, "save_file", dies_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(dataset(2), pipeline, out, shard_size=1)
    assert sorted(p.name for p in out.iterdir()) == ["bucket00-00000.safetensors", "bucket00-00001.safetensors"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(cache_module, "save_file", real_save)
    encoded = []
    monkeypatch.setattr(CausalVAE, "encode", lambda self, video, _real=CausalVAE.encode: encoded.append(1)
                        or _real(self, video))
    cache_latents(dataset(2), pipeline, out, shard_size=1)
    assert len(encoded) == 4  # the two whole shards reused, four clips left to encode
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.iterdir() if p.name in stamps)
    assert not [p for p in out.iterdir() if p.name.startswith(".")] and len(LatentCache(out, buckets=BUCKETS)) == 6


def test_cli_interrupted_keeps_the_shards_and_says_so(pipeline, tmp_path, capsys, monkeypatch):
    from cogvx.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "cache_latents", interrupted)
    config = write_config(tmp_path / "c.toml", pipeline, 'buckets = [[5, 16, 16]]\ncache = "latents"')
    assert main(["cache-latents", "--config", str(config)]) == 130
    assert "interrupted; the shards written so far" in capsys.readouterr().err


@pytest.mark.slow
def test_two_gloo_ranks_write_what_one_process_writes(pipeline, tmp_path):
    one = cache_latents(dataset(3), pipeline, tmp_path / "one", shard_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "cache_latents_worker.py"), str(pipeline), str(tmp_path / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert a == b  # the same shards (6 chunks: ranks 0 and 1 three each), sizes, counts and key
    ca, cb = LatentCache(tmp_path / "one"), LatentCache(tmp_path / "two")
    assert all(torch.equal(ca[i][k], cb[i][k]) for i in range(len(ca)) for k in ("latent_mean", "latent_std", "text"))


# -- config and command line -------------------------------------------------------------------------
def write_config(path, pipeline, data="", model=""):
    path.write_text(f'[model]\npipeline = "{pipeline}"\n{model}\n[data]\nsource = "synthetic:shapes"\n'
                    f'length = 3\n{data}\n[optim]\nlr = 1e-4\n')  # [optim]: the trainer's, not read here
    return path


def test_cli_caches_a_config_s_data(pipeline, tmp_path, capsys):
    from cogvx.cli import main
    config = write_config(tmp_path / "t2v.toml", pipeline, 'buckets = [[5, 16, 32], [1, 16, 32]]\nimage_ratio = 0.25\n'
                          'cache = "latents"\nseed = 1', model="lora_rank = 4")  # lora_rank: the trainer's key
    assert main(["cache-latents", "--config", str(config), "--storage", "bf16", "--batch-size", "2"]) == 0
    assert "cached 6 clips in 2 shards to " in capsys.readouterr().out
    cache = LatentCache(tmp_path / "latents", pipeline=pipeline, buckets=[(5, 16, 32), (1, 16, 32)])  # by the config
    assert len(cache) == 6 and cache[0]["latent_mean"].dtype == torch.bfloat16
    ds = SyntheticShapes(buckets=[(5, 16, 32), (1, 16, 32)], seed=1, length=3)  # data.seed and data.length
    assert [cache[i]["caption"] for i in range(6)] == [ds.caption(i % 3, ds.buckets[i // 3]) for i in range(6)]


@pytest.mark.parametrize("data,says", [
    ('buckets = [[4, 16, 16]]', "data.buckets [4, 16, 16]: 4 frames must be 1 + 4·k"),
    ('buckets = [[5, 16, 24], [1, 16, 16]]', "data.buckets [5, 16, 24]: width 24 must be a multiple of 16"),
    ('frames = 5\nheight = 8\nwidth = 16', "data [5, 8, 16]: height 8 must be a multiple of 16"),
    ('buckets = [[5, 16, 16]]\nimage_ratio = 0.5', "image_ratio = 0.5 needs a 1-frame bucket"),
    ('buckets = [[5, 16, 16], [1, 16, 16]]\nimage_ratio = 1.5', "data.image_ratio must be a number in [0, 1]"),
    ('buckets = [[5, 16]]', "each bucket is [frames, height, width]"),
    ('buckets = [[5, 16, 16]]\nframes = 5', "data.buckets and data.frames exclude each other"),
    ('frames = 5\nheight = 16', "data.width is required"),
    ('buckets = [[5, 16, 16]]\nbucket_size = 3', "unknown key data.bucket_size"),
    ('buckets = [[5, 16, 16]]', "give --out or set data.cache"),
])
def test_cli_bad_configs_are_one_line_exit_2(pipeline, tmp_path, capsys, data, says):
    from cogvx.cli import main
    assert main(["cache-latents", "--config", str(write_config(tmp_path / "c.toml", pipeline, data))]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "latents").exists()


def test_cli_names_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    from cogvx.cli import main
    (tmp_path / "half" / "vae").mkdir(parents=True)
    config = write_config(tmp_path / "c.toml", tmp_path / "half", 'buckets = [[5, 16, 16]]\ncache = "x"')
    assert main(["cache-latents", "--config", str(config)]) == 2
    assert "model.pipeline:" in (err := capsys.readouterr().err) and "no text_encoder, tokenizer" in err, err


def test_vae_config_refuses_the_transformer_data_keys():
    from cogvx.loading import ConfigError
    from cogvx.train.config import VAETrainConfig
    data = {"data": {"source": "synthetic:shapes", "buckets": [[9, 32, 32]]}, "loss": {"lpips_backbone": "random"},
            "train": {"steps": 1}}
    with pytest.raises(ConfigError, match="data.buckets: the VAE trainer takes clips of one shape"):
        VAETrainConfig.from_dict(data)


def test_only_a_few_shards_are_open_at_once(pipeline, tmp_path, monkeypatch):
    cache_latents(SyntheticShapes(buckets=[(1, 16, 16)], length=5), pipeline, tmp_path / "cache", shard_size=1)
    monkeypatch.setattr(cache_module, "OPEN_SHARDS", 2)
    cache = LatentCache(tmp_path / "cache")
    reads = [cache[i]["caption"] for i in (0, 1, 2, 0, 3, 4)]
    assert list(cache._open) == [3, 4] and reads == [cache[i]["caption"] for i in (0, 1, 2, 0, 3, 4)]
    import pickle
    copy = pickle.loads(pickle.dumps(cache))  # as a DataLoader worker gets it: no open handle travels
    assert not copy._open and torch.equal(copy[2]["text"], cache[2]["text"])
    alone, workers = Batches(cache, batch_size=2, seed=3), Batches(cache, batch_size=2, seed=3, num_workers=1)
    for _ in range(3):
        a, b = next(alone), next(workers)
        assert a["caption"] == b["caption"] and torch.equal(a["latent_mean"], b["latent_mean"])

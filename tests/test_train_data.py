"""cogvx.train.data: synthetic shapes, captioned folders (PyAV), collate, Batches, validation split."""
import json
import re
import warnings

import av
import numpy as np
import pytest
import torch

from cogvx.train.data import (BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, Batches, CaptionedFolder, SyntheticShapes,
                              collate, make_dataset, split_validation)


# -- synthetic:shapes -------------------------------------------------------------------------------
def test_synthetic_is_a_function_of_seed_and_index():
    a = SyntheticShapes(frames=5, height=32, width=48, seed=3, length=20)
    b = SyntheticShapes(frames=5, height=32, width=48, seed=3, length=20)
    later = [b[i] for i in reversed(range(20))][::-1]  # other instance, other order
    for i in range(20):
        item = a[i]
        assert item["video"].shape == (3, 5, 32, 48) and item["video"].dtype == torch.float32
        assert -1 <= item["video"].min() and item["video"].max() <= 1
        assert torch.equal(item["video"], later[i]["video"]) and item["caption"] == later[i]["caption"]
    other = SyntheticShapes(frames=5, height=32, width=48, seed=4, length=20)
    assert any(not torch.equal(a[i]["video"], other[i]["video"]) for i in range(20))
    assert len({a[i]["caption"] for i in range(20)}) > 5


def _drawn(video: torch.Tensor, colour):
    """What a frame sequence shows, for a shape of `colour`: the background (the median: the shape
    covers well under half of a frame) and per pixel how much of the shape's colour it holds."""
    rgb = (video + 1) / 2  # (3, F, H, W) in [0, 1]
    background = rgb.flatten(2).median(dim=2).values[:, 0]
    towards = torch.tensor(colour) - background
    coverage = torch.einsum("cfhw,c->fhw", rgb - background.view(3, 1, 1, 1), towards) / towards.pow(2).sum()
    return rgb, background, coverage


def _fill(mask2d: torch.Tensor) -> float:
    ys, xs = mask2d.nonzero(as_tuple=True)
    return mask2d.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()


def test_synthetic_captions_say_what_is_drawn():
    ds = SyntheticShapes(frames=9, height=48, width=48, seed=0, length=16)
    seen, backgrounds = set(), set()
    for i in range(len(ds)):
        item = ds[i]
        colour, shape, direction = re.fullmatch(r"a (\w+) (\w+) moving (\w+)", item["caption"]).groups()
        seen.add((colour, shape, direction))
        rgb, background, coverage = _drawn(item["video"], COLOURS[colour])
        assert tuple(background.tolist()) in BACKGROUNDS.values() and tuple(background.tolist()) != COLOURS[colour]
        backgrounds.add(tuple(background.tolist()))
        inside = rgb.permute(1, 2, 3, 0)[coverage > 0.99]  # (pixels, 3): the shape's interior, the caption's colour
        assert len(inside) > 50 and torch.allclose(inside, torch.tensor(COLOURS[colour]), atol=0.01), item["caption"]
        # everything else is background or the shape's anti-aliased edge, a mix of the two
        assert torch.allclose(rgb, background.view(3, 1, 1, 1) + coverage * (torch.tensor(COLOURS[colour]) - background)
                              .view(3, 1, 1, 1), atol=1e-5) and coverage.min() > -1e-5 and coverage.max() < 1 + 1e-5
        mask = coverage > 0.5
        # the shape: how much of its bounding box it fills (square 1, disc π/4, triangle 1/2)
        fill = _fill(mask[0])
        expected = {"square": (0.9, 1.01), "circle": (0.7, 0.86), "triangle": (0.4, 0.62)}[shape]
        assert expected[0] < fill < expected[1], (i, item["caption"], fill)
        if shape == "triangle":  # apex up: rows widen downwards
            widths = mask[0].sum(1)[mask[0].any(1)]
            assert widths[-1] > 3 * widths[0]
        # the centroid moves the captioned way, and only that way
        ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
        centre = [((ys * m).sum() / m.sum(), (xs * m).sum() / m.sum()) for m in mask.float()]
        dy, dx = (centre[-1][0] - centre[0][0]).item(), (centre[-1][1] - centre[0][1]).item()
        want_y, want_x = DIRECTIONS[direction]
        along, across = (dy * want_y, dx) if want_y else (dx * want_x, dy)
        assert along > 5 and abs(across) < 0.5, (i, item["caption"], dy, dx)
        assert mask.sum((1, 2)).min() > 0 and not mask[:, [0, -1]].all()  # whole shape in every frame
    assert {c for c, _, _ in seen} == set(COLOURS) and {s for _, s, _ in seen} == set(SHAPES)
    assert {d for _, _, d in seen} == set(DIRECTIONS) and backgrounds == set(BACKGROUNDS.values())


def test_synthetic_image_is_one_frame_without_motion():
    ds = SyntheticShapes(frames=1, height=32, width=32, seed=1, length=4)
    item = ds[0]
    assert item["video"].shape == (3, 1, 32, 32) and "moving" not in item["caption"]
    assert re.fullmatch(r"a (red|green|blue|yellow) (square|circle|triangle)", item["caption"])


def test_make_dataset():
    ds = make_dataset("synthetic:shapes", frames=5, height=16, width=16, seed=2, length=7)
    assert isinstance(ds, SyntheticShapes) and len(ds) == 7 and ds.seed == 2
    assert len(make_dataset("synthetic:shapes", frames=5, height=16, width=16)) == 1024
    with pytest.raises(ValueError, match="synthetic:stars"):
        make_dataset("synthetic:stars", frames=5, height=16, width=16)


# -- captioned folders ------------------------------------------------------------------------------
def write_video(path, count, h=24, w=40, gop=4):
    """A flat video whose frame k has the value 8·k (its index, read back through compression)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop  # keyframes every 4: crops start after a real seek
        for k in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 8 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_stripes_png(path, h=40, w=80):
    """Left third red, middle green, right third blue."""
    from PIL import Image
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 3, 0], image[:, w // 3: 2 * w // 3, 1], image[:, 2 * w // 3:, 2] = 255, 255, 255
    Image.fromarray(image).save(path)


def write_captions(root, entries):
    (root / "captions.jsonl").write_text("\n".join(json.dumps({"path": p, "caption": c}) for p, c in entries) + "\n")


@pytest.fixture
def folder(tmp_path):
    write_video(tmp_path / "long.mp4", 30)
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "medium.mp4", 13)
    write_video(tmp_path / "short.mp4", 5)
    write_stripes_png(tmp_path / "stripes.png")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
    write_captions(tmp_path, [("long.mp4", "long"), ("clips/medium.mp4", "medium"), ("short.mp4", "short"),
                              ("stripes.png", "stripes"), ("corrupt.mp4", "corrupt"), ("missing.mp4", "missing")])
    return tmp_path


def frame_numbers(video):
    """The frame indices a flat test video's frames encode."""
    return ((video[0].mean((1, 2)) + 1) * 127.5 / 8).tolist()


def test_folder_crops_consecutive_frames_deterministically(folder):
    with pytest.warns(UserWarning, match="1 image"):
        ds = CaptionedFolder(folder, frames=9, height=16, width=16, seed=0)
    assert len(ds) == 5 and [c for _, c in ds.entries] == ["long", "medium", "short", "corrupt", "missing"]
    starts = set()
    for seed in range(8):
        ds.seed = seed
        item = ds[0]
        assert item["caption"] == "long" and item["video"].shape == (3, 9, 16, 16)
        numbers = frame_numbers(item["video"])
        start = round(numbers[0])
        assert numbers == pytest.approx([start + j for j in range(9)], abs=0.4)
        assert 0 <= start <= 30 - 9
        assert torch.equal(item["video"], ds[0]["video"])  # the same crop every time for (seed, index)
        starts.add(start)
    assert len(starts) > 2  # random crops, not always the first frames
    assert frame_numbers(ds[1]["video"]) == pytest.approx(np.arange(9) + round(frame_numbers(ds[1]["video"])[0]),
                                                          abs=0.4)


def test_folder_skips_short_corrupt_and_missing_files_with_one_warning_each(folder):
    with pytest.warns(UserWarning):
        ds = CaptionedFolder(folder, frames=9, height=16, width=16, seed=0)
    for index, name, reason in [(2, "short.mp4", "5 frames, fewer than the 9"), (3, "corrupt.mp4", "corrupt.mp4"),
                                (4, "missing.mp4", "missing")]:
        with pytest.warns(UserWarning, match=re.escape(name) + ".*" + re.escape(reason)):
            assert ds[index] is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per file
            assert ds[index] is None
    batch = collate([ds[i] for i in range(5)])
    assert batch["video"].shape == (2, 3, 9, 16, 16) and batch["caption"] == ["long", "medium"]
    assert batch["skipped"] == 3


def test_folder_image_resized_and_centre_cropped(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreadable files' warnings
        ds = CaptionedFolder(folder, frames=1, height=16, width=16, seed=0)
    assert len(ds) == 6  # with one frame, images are clips too
    item = ds[3]
    assert item["caption"] == "stripes" and item["video"].shape == (3, 1, 16, 16)
    # 40×80 → 16×32 (the shorter side fills 16), centre 16 columns: original columns 20–60 of
    # red [0, 26), green [26, 53), blue [53, 80): red at the left edge, green in the middle, blue at the right
    rgb = (item["video"][:, 0] + 1) / 2
    assert rgb[:, 8, 0].argmax() == 0 and rgb[:, 8, 8].tolist() == pytest.approx([0, 1, 0], abs=0.02)
    assert rgb[:, 8, 15].argmax() == 2
    video = ds[0]["video"]  # a video gives one random frame
    assert video.shape == (3, 1, 16, 16)


def test_folder_errors_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        CaptionedFolder(tmp_path, frames=1, height=8, width=8)
    write_video(tmp_path / "v.mp4", 9)
    (tmp_path / "captions.jsonl").write_text('{"path": "v.mp4", "caption": "ok"}\n\n{"path": "v.mp4"}\n')
    with pytest.raises(ValueError, match=r"line 3 must be an object with a \"path\".*\"caption\""):
        CaptionedFolder(tmp_path, frames=1, height=8, width=8)
    (tmp_path / "captions.jsonl").write_text('{"path": "v.mp4", "caption": "ok"}\n{"path": "v.mp4", caption: 1}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        CaptionedFolder(tmp_path, frames=1, height=8, width=8)
    (tmp_path / "bad.mp4").write_bytes(b"junk")
    write_captions(tmp_path, [("bad.mp4", "a"), ("nothing.mp4", "b"), ("v.mp4", "too short for 13")])
    with pytest.raises(ValueError, match="no file listed.*can be read"):
        CaptionedFolder(tmp_path, frames=13, height=8, width=8)
    ds = CaptionedFolder(tmp_path, frames=9, height=8, width=8)  # the one readable file is enough
    assert ds[2]["caption"] == "too short for 13"


def test_make_dataset_reads_folders(folder):
    with pytest.warns(UserWarning):
        ds = make_dataset(folder, frames=9, height=16, width=16, seed=1, length=99)  # length: synthetic only
    assert isinstance(ds, CaptionedFolder) and len(ds) == 5


# -- batches ----------------------------------------------------------------------------------------
class Flaky(SyntheticShapes):
    """Synthetic clips where every index divisible by 3 cannot be read."""

    def __getitem__(self, index):
        return None if index % 3 == 0 else super().__getitem__(index)


def same(a, b):
    return torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"] and a["skipped"] == b["skipped"]


def test_batches_resume_where_they_stopped():
    ds = SyntheticShapes(frames=1, height=8, width=8, seed=0, length=10)
    batches = Batches(ds, batch_size=3, seed=7)
    assert batches.per_epoch == 3
    run = [next(batches) for _ in range(8)]  # across epochs 0, 1 and 2
    assert batches.position == 8 and all(b["video"].shape == (3, 3, 1, 8, 8) for b in run)
    resumed = Batches(ds, batch_size=3, seed=7, start=5)
    assert all(same(next(resumed), b) for b in run[5:]) and resumed.position == 8
    # each epoch visits distinct clips, in another order than the previous epoch
    epochs = [sum((batches.indices(p) for p in range(e * 3, e * 3 + 3)), []) for e in range(2)]
    assert all(len(set(e)) == 9 for e in epochs) and epochs[0] != epochs[1]
    assert not same(run[0], next(Batches(ds, batch_size=3, seed=8)))


def test_batches_with_workers_are_the_same():
    ds = SyntheticShapes(frames=5, height=16, width=16, seed=0, length=12)
    alone = Batches(ds, batch_size=2, seed=1, start=3)
    workers = Batches(ds, batch_size=2, seed=1, start=3, num_workers=2)
    for _ in range(8):
        assert same(next(alone), next(workers))
    assert workers.position == alone.position == 11


def test_ranks_take_disjoint_shares():
    ds = SyntheticShapes(frames=1, height=8, width=8, length=23)
    ranks = [Batches(ds, batch_size=2, seed=4, rank=r, world=3) for r in range(3)]
    assert all(r.per_epoch == 3 for r in ranks)  # 23 // 3 = 7 clips each, 3 batches of 2
    for epoch in range(3):
        shares = [sum((r.indices(p) for p in range(epoch * 3, epoch * 3 + 3)), []) for r in ranks]
        flat = sum(shares, [])
        assert len(flat) == len(set(flat)) == 18 and all(0 <= i < 23 for i in flat)
    batches = [next(r) for r in ranks]
    assert len({c for b in batches for c in b["caption"]}) >= 2  # different clips per rank
    with pytest.raises(ValueError, match="cannot give 3 rank"):
        Batches(SyntheticShapes(frames=1, height=8, width=8, length=5), batch_size=2, rank=0, world=3)


def test_skipped_items_are_replaced_and_counted():
    ds = Flaky(frames=1, height=8, width=8, length=12)
    run = [next(b) for b in [Batches(ds, batch_size=4, seed=0)] for _ in range(6)]
    assert all(b["video"].shape[0] == 4 and len(b["caption"]) == 4 for b in run)  # full batches
    expected = [sum(i % 3 == 0 for i in Batches(ds, batch_size=4, seed=0).indices(p)) for p in range(6)]
    assert all(b["skipped"] >= e for b, e in zip(run, expected)) and sum(expected) > 0
    resumed = Batches(ds, batch_size=4, seed=0, start=2, num_workers=1)
    assert all(same(next(resumed), b) for b in run[2:])  # replacements are deterministic too


def test_a_batch_larger_than_the_readable_clips_is_filled():
    ds = Flaky(frames=1, height=8, width=8, length=3)  # clip 0 unreadable: two readable for batches of 3
    batch = next(Batches(ds, batch_size=3))
    assert batch["video"].shape[0] == 3 and set(batch["caption"]) == {ds[1]["caption"], ds[2]["caption"]}
    assert batch["skipped"] >= 1
    with pytest.raises(RuntimeError, match="no clip"):
        next(Batches(Flaky(frames=1, height=8, width=8, length=1), batch_size=1))


def test_collate_of_nothing_readable():
    assert collate([None, None]) == {"video": None, "caption": [], "skipped": 2}


def test_split_validation_holds_out_the_last_clips():
    ds = SyntheticShapes(frames=1, height=8, width=8, length=10)
    train, validation = split_validation(ds, 3)
    assert len(train) == 7 and len(validation) == 3
    assert torch.equal(validation[0]["video"], ds[7]["video"]) and torch.equal(train[6]["video"], ds[6]["video"])
    assert len(split_validation(ds, 0)[1]) == 0
    with pytest.raises(ValueError, match="validation clips"):
        split_validation(ds, 10)


# -- buckets ----------------------------------------------------------------------------------------
BUCKETS = [(1, 16, 16), (1, 16, 24), (5, 16, 16), (9, 8, 16)]


def test_each_batch_is_one_bucket_at_the_configured_image_ratio():
    ds = SyntheticShapes(buckets=BUCKETS, seed=0, length=40)
    batches = Batches(ds, batch_size=3, seed=5, image_ratio=0.3)
    assert batches.per_epoch == [13] * 4 and batches.shapes == BUCKETS
    for _ in range(12):
        bucket = batches.bucket(batches.position)
        batch = next(batches)
        frames, height, width = BUCKETS[bucket]
        assert batch["video"].shape == (3, 3, frames, height, width) and len(batch["caption"]) == 3
        assert all(("moving" in c) == (frames > 1) for c in batch["caption"])  # a still image shows no motion
    buckets = np.array([batches.bucket(p) for p in range(2048)])
    images = np.isin(buckets, [0, 1])
    # exact per block of 256 positions: round(0.3·256·(k+1)) − round(0.3·256·k) image batches
    assert [int(images[k * 256:(k + 1) * 256].sum()) for k in range(8)] == \
        [round(0.3 * 256 * (k + 1)) - round(0.3 * 256 * k) for k in range(8)]
    assert abs(images.sum() - 0.3 * 2048) <= 0.5  # so whole blocks hold the ratio to half a batch
    for n in (100, 500, 1000, 2048):  # any prefix within a block's worth of the ratio; long ones within 1 %
        assert abs(images[:n].mean() - 0.3) < (0.12 if n < 1000 else 0.01), n
    # within a kind, buckets in proportion to their batches per epoch (equal here): both used about equally
    assert abs((buckets == 0).sum() - (buckets == 1).sum()) < 0.1 * images.sum()
    assert abs((buckets == 2).sum() - (buckets == 3).sum()) < 0.1 * (~images).sum()
    # without a ratio: in proportion to the clips (all buckets hold all 40 clips here: a quarter each)
    free = np.array([Batches(ds, batch_size=3, seed=5).bucket(p) for p in range(1024)])
    assert all(abs((free == b).mean() - 0.25) < 0.05 for b in range(4))


def test_bucketed_batches_are_deterministic_and_resume_anywhere():
    ds = SyntheticShapes(buckets=BUCKETS, seed=1, length=20)
    keys = lambda b, n: [b.keys(p) for p in range(n)]
    a, b = Batches(ds, batch_size=2, seed=3, image_ratio=0.5), Batches(ds, batch_size=2, seed=3, image_ratio=0.5)
    assert keys(a, 600) == keys(b, 600)  # several schedule blocks
    assert keys(a, 50) != keys(Batches(ds, batch_size=2, seed=4, image_ratio=0.5), 50)
    # a resumed stream (fresh object: nothing cached) continues exactly, also past a block boundary
    for start in (7, 255, 300):
        resumed = Batches(ds, batch_size=2, seed=3, image_ratio=0.5, start=start)
        assert [resumed.keys(resumed.position + i) for i in range(40)] == [a.keys(start + i) for i in range(40)]
    run = [next(a) for _ in range(6)]
    resumed = Batches(ds, batch_size=2, seed=3, image_ratio=0.5, start=3)
    assert all(same(next(resumed), r) for r in run[3:])
    workers = Batches(ds, batch_size=2, seed=3, image_ratio=0.5, start=3, num_workers=1)
    assert all(same(next(workers), r) for r in run[3:])  # (index, bucket) keys through a DataLoader


def test_bucketed_ranks_take_disjoint_shares_of_each_bucket_epoch():
    ds = SyntheticShapes(buckets=BUCKETS, seed=0, length=21)
    ranks = [Batches(ds, batch_size=2, seed=4, rank=r, world=3, image_ratio=0.25) for r in range(3)]
    assert ranks[0].per_epoch == [3] * 4  # 21 // 3 = 7 clips a rank, 3 batches of 2
    shares = {}  # (bucket, epoch of that bucket) -> per rank, the clips taken
    for r, batches in enumerate(ranks):
        uses = [0] * 4
        for p in range(200):
            bucket = batches.bucket(p)
            assert bucket == ranks[0].bucket(p)  # every rank the same bucket at a position
            shares.setdefault((bucket, uses[bucket] // 3), [[], [], []])[r] += batches.indices(p)
            uses[bucket] += 1
    complete = [s for s in shares.values() if all(len(part) == 6 for part in s)]
    assert len(complete) > 8
    for parts in complete:
        flat = sum(parts, [])
        assert len(set(flat)) == 18 and all(0 <= i < 21 for i in flat)  # disjoint, each clip once


def test_bucket_errors_name_what_is_wrong():
    ds = SyntheticShapes(buckets=[(5, 16, 16), (9, 16, 16)], length=8)
    with pytest.raises(ValueError, match="image_ratio 0.2 > 0 needs a 1-frame"):
        Batches(ds, batch_size=2, image_ratio=0.2)
    with pytest.raises(ValueError, match=r"bucket 1 \(9, 16, 16\) holds 8 clip\(s\), too few to give 4 rank\(s\) a "
                                         r"batch of 3"):
        Batches(ds, batch_size=3, world=4)
    with pytest.raises(KeyError, match=r"dataset\[\(index, bucket\)\]"):
        ds[0]
    with pytest.raises(ValueError, match="image_ratio needs a dataset with buckets"):
        Batches(list(range(8)), batch_size=2, image_ratio=0.5)
    for bad, match in [([], "non-empty list"), ([(5, 16)], r"\(frames, height, width\)"),
                       ([(0, 16, 16)], "frames must be a positive"), ([(5, 8, 8), (5, 8, 8)], "distinct")]:
        with pytest.raises(ValueError, match=match):
            SyntheticShapes(buckets=bad)
    with pytest.raises(ValueError, match="not both"):
        SyntheticShapes(frames=5, height=8, width=8, buckets=[(5, 8, 8)])
    assert SyntheticShapes(buckets=[(5, 8, 8)], length=3)[2]["video"].shape == (3, 5, 8, 8)  # one bucket: plain keys


def test_validation_split_keeps_the_buckets():
    ds = SyntheticShapes(buckets=BUCKETS, seed=0, length=12)
    train, validation = split_validation(ds, 4)
    assert train.buckets == validation.buckets == BUCKETS
    assert [m.tolist() for m in validation.bucket_members()] == [[0, 1, 2, 3]] * 4
    assert torch.equal(validation[(1, 2)]["video"], ds[(9, 2)]["video"])
    batches = Batches(train, batch_size=2, seed=0, image_ratio=0.5)
    assert all(0 <= i < 8 for p in range(30) for i in batches.indices(p))
    assert next(batches)["video"].shape[0] == 2


def test_folder_assigns_files_to_the_bucket_of_their_aspect_and_length(folder):
    write_video(folder / "tall.mp4", 6, h=40, w=24)  # 6 frames, portrait
    write_captions(folder, [("long.mp4", "long"), ("clips/medium.mp4", "medium"), ("short.mp4", "short"),
                            ("stripes.png", "stripes"), ("corrupt.mp4", "corrupt"), ("missing.mp4", "missing"),
                            ("tall.mp4", "tall")])
    buckets = [(1, 16, 32), (1, 32, 16), (5, 16, 32), (9, 16, 32), (5, 32, 16)]
    ds = CaptionedFolder(folder, buckets=buckets, seed=0)
    assert len(ds) == 7  # with a 1-frame bucket, images are clips too
    with pytest.warns(UserWarning, match="2 unreadable file.*0 video"):
        members = [m.tolist() for m in ds.bucket_members()]
    # landscape videos (24×40) and the 40×80 image: the wide buckets; the longest bucket each video fills
    assert members == [[0, 1, 2, 3], [6], [2], [0, 1], [6]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[(6, 4)]["video"].shape == (3, 5, 32, 16) and ds[(6, 1)]["video"].shape == (3, 1, 32, 16)
        assert ds[(3, 0)]["caption"] == "stripes" and ds[(0, 0)]["video"].shape == (3, 1, 16, 32)  # a video's frame
    with pytest.raises(ValueError, match="is an image.*only 1-frame buckets"):
        ds[(3, 2)]
    batches = Batches(ds, batch_size=1, seed=0, image_ratio=0.5)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"bucket 3 \(9, 32, 16\) holds 0 clip"):
        Batches(CaptionedFolder(folder, buckets=buckets[2:] + [(9, 32, 16)], seed=0), batch_size=1)
    for _ in range(6):
        bucket = batches.bucket(batches.position)
        assert next(batches)["video"].shape[2:] == buckets[bucket]


def test_folder_with_one_bucket_of_each_kind_reads_no_file_ahead(folder, monkeypatch):
    import cogvx.train.data as data
    monkeypatch.setattr(data, "_probe", None)  # probing would fail: it must not happen
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CaptionedFolder(folder, buckets=[(9, 16, 16), (1, 16, 16)], seed=0)
        members = [m.tolist() for m in ds.bucket_members()]
        assert members == [[0, 1, 2, 4, 5], [0, 1, 2, 3, 4, 5]]  # videos in both, the image in the image bucket
        run = [next(b) for b in [Batches(ds, batch_size=2, seed=1, image_ratio=0.5)] for _ in range(8)]
    assert all(r["video"].shape[0] == 2 for r in run) and sum(r["skipped"] for r in run) > 0
    assert {r["video"].shape[2] for r in run} == {1, 9}

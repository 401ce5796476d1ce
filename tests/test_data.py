"""Tests for the data pipeline: shards.py (tar shards, splitting, resume, skip
counting) and data.py (image datasets, image helpers, the shapes world as a dataset,
pretokenized tokens). Fast (CPU, tiny data)."""

import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data
import shapes
import shards

# -----------------------------------------------------------------------------
# The shapes world as a dataset


def test_shapes_dataset_split_and_order():
    # DDP ranks x DataLoader workers: disjoint and complete.
    seen = []
    for rank in range(2):
        ds = data.ShapesDataset(0, length=40, infinite=False, rank=rank, world_size=2, batch_size=4)
        for batch in DataLoader(ds, batch_size=4, num_workers=2):
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(40))
    # Same order with and without workers, and the ranks' batches tile the single-process global batch.
    def batches(rank, world, B, workers, start=0, n=5):
        ds = data.ShapesDataset(3, rank=rank, world_size=world, batch_size=B, start_batch=start)
        it = iter(DataLoader(ds, batch_size=B, num_workers=workers))
        return [next(it)["index"].tolist() for _ in range(n)]

    single = batches(0, 1, 6, 0)
    assert batches(0, 1, 6, 2) == single
    r0, r1 = batches(0, 2, 3, 0), batches(1, 2, 3, 2)
    assert [a + b for a, b in zip(r0, r1)] == single
    assert batches(0, 1, 6, 0, start=2, n=3) == single[2:]  # exact resume
    item = data.ShapesDataset(0, image_size=32).item(7)
    assert item["image"].shape == (3, 32, 32) and item["caption"] == shapes.ShapesWorld(0).sample(7).caption


# -----------------------------------------------------------------------------
# Brace patterns and tar shards


def test_expand_braces(tmp_path):
    assert shards.expand_braces("s/{000000..000002}.tar") == ["s/000000.tar", "s/000001.tar", "s/000002.tar"]
    assert shards.expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert shards.expand_braces("{3..1}") == ["3", "2", "1"]
    assert shards.expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert shards.expand_braces("x{a,b{1..2}}y") == ["xay", "xb1y", "xb2y"]
    assert shards.expand_braces("plain.tar") == ["plain.tar"]
    assert shards.expand_braces("{single}") == ["{single}"]
    with pytest.raises(ValueError, match="unbalanced"):
        shards.expand_braces("s/{000..001.tar")
    pattern = str(tmp_path / "{000000..000123}.tar")
    with pytest.raises(FileNotFoundError, match=r"matched no files"):
        shards.list_shards(pattern)
    (tmp_path / "000001.tar").write_bytes(b"")
    assert shards.list_shards(pattern)[:2] == [str(tmp_path / "000000.tar"), str(tmp_path / "000001.tar")]
    assert shards.list_shards(str(tmp_path)) == [str(tmp_path / "000001.tar")]
    with pytest.raises(ValueError, match="not a local file, a 'pipe:COMMAND' or an http"):
        shards.list_shards("s3://bucket/{0..3}.tar")


def _png(w=64, h=64, color=(200, 40, 40)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(w=64, h=64):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return str(path)


def test_tar_grouping_by_key(tmp_path):
    path = _write_tar(tmp_path / "a.tar", [
        ("000001.jpg", b"J1"), ("000001.txt", b"cap 1"), ("000001.json", b"{}"),
        ("sub/000002.png", b"P2"), ("sub/000002.TXT", b"cap 2"), ("sub/000002.recap.txt", b"R"),
        ("__meta__.json", b"{}"), ("._000003.jpg", b"mac"), ("noext", b"x"),
        ("000003.webp", b"W3"),
    ])  # fmt: skip
    groups = list(shards.iter_tar_groups(path))
    assert [g["__key__"] for g in groups] == ["000001", "sub/000002", "000003"]
    assert set(groups[0]) - {"__key__", "__shard__", "__end__"} == {"jpg", "txt", "json"}
    with tarfile.open(path) as tf:  # "__end__": the tar byte after the sample's last member (its padding included)
        member = tf.getmember("000003.webp")
    assert groups[2]["__end__"] == member.offset_data + 512
    assert groups[1]["txt"] == b"cap 2" and groups[1]["recap.txt"] == b"R" and groups[1]["png"] == b"P2"
    assert shards.split_key("a/b/k.seg.txt") == ("a/b/k", "seg.txt")


def _corrupt_shard(tmp_path):
    """A shard with 3 good samples and one of each problem, cut inside its last member."""
    good = _png()
    jpeg = _jpeg()
    members = [
        ("000.png", good), ("000.txt", b"a good one"),
        ("001.jpg", b"\xff\xd8 this is not a jpeg"), ("001.txt", b"corrupt"),
        ("002.jpg", jpeg[: len(jpeg) // 2]), ("002.txt", b"truncated jpeg"),
        ("003.png", good), ("003.json", b'{"url": "http://x"}'),
        ("004.png", good), ("004.json", json.dumps({"caption": "from json", "recaption": "The image depicts a cat.",
                                                     "AESTHETIC_SCORE": 5.25}).encode()),
        ("005.png", good), ("005.txt", b"kept"), ("005.json", b"{not json"),
        ("006.txt", b"no image"),
        ("007.txt", b"the member after me is cut"), ("007.png", _png(300, 300)),
    ]  # fmt: skip
    path = _write_tar(tmp_path / "000000.tar", members)
    raw = open(path, "rb").read()
    cut = raw.index(members[-1][1][:64]) + 100  # inside the last member's data
    with open(path, "wb") as f:
        f.write(raw[:cut])
    return path


def test_corrupt_shard_is_read_through_and_counted(tmp_path, caplog):
    _corrupt_shard(tmp_path)
    (tmp_path / "000001.tar").write_bytes(b"garbage, not a tar" * 50)  # unreadable shard
    pattern = str(tmp_path / "{000000..000002}.tar")  # 000002.tar does not exist
    ds = data.TarShardDataset(pattern, image_size=32, infinite=False, shuffle=False, random_crop=False,
                              random_flip=False, default_aesthetic=6.0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="data"):
        out = list(ds)
    assert [s["key"] for s in out] == ["000000.tar:000", "000000.tar:004", "000000.tar:005"]
    counts = ds.skipped.counts()
    expected = dict(corrupt_image=2, missing_caption=1, missing_image=1, bad_json=1, truncated_member=1,
                    unreadable_shard=2)  # fmt: skip
    assert {k: v for k, v in counts.items() if v} == expected
    assert "corrupt_image" in ds.skipped.summary()
    assert any("truncated_member" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert out[0]["image"].shape == (3, 32, 32)
    assert torch.allclose(out[0]["image"][:, 0, 0], torch.tensor([200, 40, 40]) / 255.0)
    assert out[1]["caption"] == "from json" and out[1]["recaption"] == "A cat."
    assert float(out[1]["aesthetic"]) == 5.25 and float(out[0]["aesthetic"]) == 6.0
    # Batched through a DataLoader worker, the counts still reach the main process.
    ds2 = data.TarShardDataset(pattern, image_size=32, infinite=False, shuffle=False)
    batches = list(DataLoader(ds2, batch_size=2, num_workers=1))
    assert sum(len(b["key"]) for b in batches) == 3
    assert ds2.skipped.counts()["corrupt_image"] == 2 and sum(ds2.skipped.counts().values()) == 8


def _abc_tar(tmp_path):
    """Samples a, b, c (png + txt each); returns (path, raw bytes, c.png's TarInfo, c.txt's TarInfo)."""
    members = [(f"{k}.{e}", _png() if e == "png" else k.encode()) for k in "abc" for e in ("png", "txt")]
    path = _write_tar(tmp_path / "abc.tar", members)
    with tarfile.open(path) as tf:
        c_png, c_txt = tf.getmember("c.png"), tf.getmember("c.txt")
    return path, open(path, "rb").read(), c_png, c_txt


@pytest.mark.parametrize("cut", ["none", "first_member_data", "second_member_data", "boundary", "header", "damaged"])
def test_truncated_tar_keeps_every_complete_sample(tmp_path, cut):
    path, raw, c_png, c_txt = _abc_tar(tmp_path)
    if cut == "damaged":  # c.png's header overwritten: the tar goes on, but cannot be trusted
        raw = raw[: c_png.offset] + b"\x07" * 512 + raw[c_png.offset + 512 :]
    else:
        end = dict(none=len(raw), first_member_data=c_png.offset_data + 10, second_member_data=c_txt.offset_data,
                   boundary=c_png.offset, header=c_png.offset + 100)[cut]  # fmt: skip
        raw = raw[:end]
    with open(path, "wb") as f:
        f.write(raw)
    counter = shards.SkipCounter()
    keys = [g["__key__"] for g in shards.iter_tar_groups(path, counter)]
    # Samples a and b are complete before every cut, so both are kept (a cut in c's first
    # member must not drop b), and every kind of cut is counted once.
    assert keys == (["a", "b", "c"] if cut == "none" else ["a", "b"])
    assert counter.counts()["truncated_member"] == (cut != "none") and sum(counter.counts().values()) == (cut != "none")


def test_bad_shard_counted_once_per_epoch(tmp_path):
    _abc_tar(tmp_path)  # abc.tar: 3 samples
    bad = _write_tar(tmp_path / "bad.tar", [(f"x{i}.{e}", _png() if e == "png" else b"cap") for i in range(3)
                                            for e in ("png", "txt")])  # fmt: skip
    raw = open(bad, "rb").read()
    open(bad, "wb").write(raw[: raw.rindex(b"cap") - 600])  # cut inside x2.png: x0, x1 remain
    ds = data.TarShardDataset(str(tmp_path), image_size=32, seed=0)  # infinite, shuffle buffer 1000
    it = iter(ds)
    for _ in range(2 * 5 + 1):  # 5 usable samples per epoch: this starts the third epoch
        next(it)
    # Counted once per epoch read, not once per epoch a shuffle buffer of 1000 could read ahead (~200).
    assert ds.skipped.counts()["truncated_member"] == 3


def _png_header_only(w, h):
    """A PNG whose header says w x h but whose pixel data is garbage: decoding it would fail."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not deflate data") + chunk(b"IEND", b"")


def test_pixel_limit_before_decoding(tmp_path):
    path = _write_tar(tmp_path / "p.tar", [
        ("huge.png", _png_header_only(9000, 9000)), ("huge.txt", b"81 megapixels"),
        ("bad.png", _png_header_only(300, 300)), ("bad.txt", b"small but broken"),
        ("ok.png", _png(300, 300)), ("ok.txt", b"fine"),
    ])  # fmt: skip
    ds = data.TarShardDataset(path, image_size=256, infinite=False, shuffle=False)
    assert [s["caption"] for s in ds] == ["fine"]
    # The 9000 x 9000 image is judged by its header alone (its pixels would not even decode).
    assert {k: v for k, v in ds.skipped.counts().items() if v} == {"too_many_pixels": 1, "corrupt_image": 1}
    assert data.MAX_PIXELS == 8192 * 8192
    small = data.TarShardDataset(path, image_size=256, infinite=False, shuffle=False, max_pixels=300 * 300 - 1)
    assert list(small) == [] and sum(small.skipped.counts().values()) == small.skipped.counts()["too_many_pixels"] == 3


def test_only_the_listed_image_formats_are_decoded(tmp_path, monkeypatch):
    """An EPS file under a .jpg name (Pillow would hand it to Ghostscript) is skipped as corrupt_image; the
    EPS plugin is never even asked to read it. load_image refuses it the same way."""
    from PIL import EpsImagePlugin, UnidentifiedImageError

    used = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: used.append(self) or 1 / 0)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 300\n0 0 moveto 300 300 lineto stroke\nshowpage\n"
    path = _write_tar(tmp_path / "e.tar", [("x.jpg", eps), ("x.txt", b"postscript"), ("ok.png", _png(300, 300)),
                                           ("ok.txt", b"fine")])  # fmt: skip
    ds = data.TarShardDataset(path, image_size=256, infinite=False, shuffle=False)
    assert [s["caption"] for s in ds] == ["fine"]
    assert {k: v for k, v in ds.skipped.counts().items() if v} == {"corrupt_image": 1}
    (tmp_path / "x.jpg").write_bytes(eps)
    with pytest.raises(UnidentifiedImageError):
        data.load_image(str(tmp_path / "x.jpg"))
    assert used == []


def test_captions_must_be_utf8(tmp_path):
    path = _write_tar(tmp_path / "u.tar", [
        ("good.png", _png()), ("good.txt", "un café ☕".encode()),
        ("txt.png", _png()), ("txt.txt", b"caf\xe9 in latin-1"),
        ("recap.png", _png()), ("recap.txt", b"fine"), ("recap.recap.txt", b"\xff\xfe"),
        ("js.png", _png()), ("js.json", b'{"caption": "caf\xe9"}'),
        ("esc.png", _png()), ("esc.json", b'{"caption": "half a surrogate \\ud800"}'),
        ("score.png", _png()), ("score.txt", b"ok"), ("score.aesthetic", b"\xff"),
    ])  # fmt: skip
    ds = data.TarShardDataset(path, image_size=32, infinite=False, shuffle=False)
    out = list(ds)
    assert [s["caption"] for s in out] == ["un café ☕", "ok"]  # never replacement characters
    assert {k: v for k, v in ds.skipped.counts().items() if v} == {"invalid_utf8": 4, "bad_aesthetic": 1}


def test_inspect_reports_what_is_there(tmp_path, capsys):
    data.make_shapes_shards(str(tmp_path), n=6, per_shard=4)  # 64 x 64 images
    data.main(["inspect", "--data", str(tmp_path), "--show", "1"])
    out = capsys.readouterr().out
    assert "6 usable samples; skipped: none" in out and "image sizes: 64x64 (6)" in out
    assert "image size 256 (longer side >= 256, aspect ratio < 2) would drop 6 of these 6: filtered_resolution=6" in out
    data.main(["inspect", "--data", str(tmp_path), "--image-size", "64", "--show", "0"])
    assert "image size 64 (longer side >= 64, aspect ratio < 2) keeps all 6" in capsys.readouterr().out


def test_resolution_and_aspect_filter(tmp_path):
    sizes = {"ok": (300, 200), "small": (200, 100), "wide": (600, 250), "two": (512, 256), "square": (256, 256)}
    members = []
    for key, (w, h) in sizes.items():
        members += [(f"{key}.png", _png(w, h)), (f"{key}.txt", key.encode())]
    path = _write_tar(tmp_path / "f.tar", members)
    ds = data.TarShardDataset(path, image_size=256, infinite=False, shuffle=False)
    out = list(ds)
    assert [s["caption"] for s in out] == ["ok", "square"]
    assert all(s["image"].shape == (3, 256, 256) for s in out)
    counts = ds.skipped.counts()
    assert counts["filtered_resolution"] == 1 and counts["filtered_aspect"] == 2
    loose = data.TarShardDataset(path, image_size=64, min_longer_side=0, max_aspect_ratio=None, infinite=False)
    assert len(list(loose)) == 5
    strict = data.TarShardDataset(path, image_size=64, min_longer_side=0, max_aspect_ratio=None, min_aesthetic=7.0,
                                  infinite=False)  # fmt: skip
    out = list(strict)
    assert len(out) == 5 and all(torch.isnan(s["aesthetic"]) for s in out)  # no scores: kept, marked unknown
    batch = data.collate(out[:3])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["aesthetic"].shape == (3,) and len(batch["key"]) == 3


def test_image_transform():
    img = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))  # 200x100 ramp
    centre = data.ImageTransform(50, random_crop=False, random_flip=False)(img, np.random.default_rng(0))
    assert centre.shape == (3, 50, 50) and 0 <= centre.min() and centre.max() <= 1
    # Shorter edge 100 -> 50: the 100x50 resize is centre-cropped to its columns 25..74,
    # i.e. original columns 50..149 of the ramp (pixel value = column).
    assert abs(float(centre[0, 0, 0]) * 255 - 50.5) < 2 and abs(float(centre[0, 0, -1]) * 255 - 148.5) < 2
    t = data.ImageTransform(50, random_crop=True, random_flip=True)
    outs = [t(img, np.random.default_rng(i)) for i in range(8)]
    assert len({round(float(o[0, 0, 0]), 3) for o in outs}) > 2
    with pytest.raises(ValueError, match="resize"):
        data.ImageTransform(64, resize=32)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert data.ImageTransform(32, random_crop=False, random_flip=False)(rgba, None).min() == 1.0  # white, not black


def test_image_helpers(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    whole = data.load_image(str(tmp_path / "x.png"))  # size=None: the image as it is
    assert whole.shape == (3, 90, 140) and torch.equal(data.to_uint8(whole).permute(1, 2, 0), torch.from_numpy(arr))
    # With a size: the evaluation protocol, i.e. ImageTransform's resize + centre crop.
    crop = data.load_image(str(tmp_path / "x.png"), 64)
    assert torch.equal(crop, data.ImageTransform(64, random_crop=False, random_flip=False)(Image.fromarray(arr), None))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image(str(tmp_path / "missing.png"))
    # to_uint8 rounds to the nearest level and clamps to [0, 255].
    assert data.to_uint8(torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.0, 1.7])).tolist() == [0, 0, 0, 1, 255, 255]
    # find_images: every image extension (any case), recursively, sorted; nothing else.
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "c.bmp", "d.txt", "sub/e.webp", "noext", "f.apng"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.relpath(p, tmp_path) for p in data.find_images(str(tmp_path))] == [
        "b.JPG", "c.bmp", os.path.join("sub", "e.webp"), "x.png"]  # fmt: skip


def _many_shards(tmp_path, n_shards, per_shard):
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            members += [(f"{s:02d}{i:03d}.png", _png(8, 8)), (f"{s:02d}{i:03d}.txt", f"s{s} i{i}".encode())]
        paths.append(_write_tar(tmp_path / f"{s:06d}.tar", members))
    return str(tmp_path / f"{{000000..{n_shards - 1:06d}}}.tar")


@pytest.mark.parametrize("n_shards", [5, 1])  # whole shards per reader / samples when readers > shards
def test_tar_split_over_ranks_and_workers(tmp_path, n_shards):
    pattern = _many_shards(tmp_path, n_shards, 12 // n_shards + 1)
    total = n_shards * (12 // n_shards + 1)
    keys = []
    for rank in range(2):
        ds = data.TarShardDataset(pattern, image_size=8, infinite=False, rank=rank, world_size=2, seed=1)
        for batch in DataLoader(ds, batch_size=3, num_workers=2):
            keys += batch["key"]
    assert len(keys) == total and len(set(keys)) == total


def test_stream_resume_is_exact(tmp_path):
    pattern = _many_shards(tmp_path, 3, 7)

    def keys(start, n):
        ds = data.TarShardDataset(pattern, image_size=8, shuffle_buffer=5, seed=4, batch_size=3, start_batch=start)
        it = iter(DataLoader(ds, batch_size=3, num_workers=2))
        return [next(it)["key"] for _ in range(n)]

    full = keys(0, 12)  # 36 samples: past the end of a pass over the 21
    assert keys(5, 7) == full[5:]
    assert len({k for b in full for k in b}) == 21


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("first")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "sub" / "b.png")
    (tmp_path / "sub" / "b.txt").write_text("second")
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"aesthetic_score": 7.5}))
    Image.new("RGB", (64, 64)).save(tmp_path / "nocap.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "bad.txt").write_text("bad")
    ds = data.ImageFolderDataset(str(tmp_path), image_size=32, infinite=False, shuffle=False)
    out = list(ds)
    assert [s["caption"] for s in out] == ["first", "second"]
    assert out[0]["key"].endswith(":a") and out[1]["key"].endswith(":" + os.path.join("sub", "b"))
    assert float(out[1]["aesthetic"]) == 7.5
    assert {k: v for k, v in ds.skipped.counts().items() if v} == {"corrupt_image": 1, "missing_caption": 1}
    # build_image_dataset picks the folder reader for a folder without tars.
    assert isinstance(data.build_image_dataset(str(tmp_path), 32, train=False), data.ImageFolderDataset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data.ImageFolderDataset(str(tmp_path / "empty"))


def test_make_shapes_shards_read_back_exactly(tmp_path):
    paths = data.make_shapes_shards(str(tmp_path), n=10, per_shard=4, seed=2)
    assert [os.path.basename(p) for p in paths] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    ds = data.build_image_dataset(str(tmp_path), 64, train=False)
    world = shapes.ShapesWorld(2)
    out = list(ds)
    assert len(out) == 10
    for s in out:
        ref = world.sample(int(s["key"].split(":")[1]))
        assert s["caption"] == ref.caption and float(s["aesthetic"]) == shapes.SHAPES_AESTHETIC
        assert torch.equal((s["image"] * 255).round().byte().permute(1, 2, 0), torch.from_numpy(ref.image))


def test_pick_captions_and_prefix():
    g = torch.Generator().manual_seed(0)
    assert data.pick_captions(["a", "b"], ["A", ""], 1.0, g) == ["A", "b"]
    assert data.pick_captions(["a", "b"], ["A", "B"], 0.0, g) == ["a", "b"]
    picks = data.pick_captions(["c"] * 2000, ["r"] * 2000, 0.95, g)
    assert 0.93 < picks.count("r") / 2000 < 0.97
    assert shards.strip_recaption_prefix("The image shows a dog on grass.") == "A dog on grass."
    assert shards.strip_recaption_prefix("A cat.") == "A cat."


# -----------------------------------------------------------------------------
# Pretokenization


def test_pretokenized_vq_ids_round_trip_exactly(tmp_path):
    ids = np.array([8191, 4097, 2049, 2048, 0, 1, 8190, 6000], dtype=np.int64)
    assert int(np.float16(2049)) == 2048 and int(np.float16(8191)) == 8192  # what fp16 storage would do
    with shards.ShardWriter(str(tmp_path), "tok", per_shard=2) as w:
        for i in range(3):
            w.write(f"{i:03d}", data.pretokenized_members(f"cap {i}", tokens=np.roll(ids, i), aesthetic=None,
                                                          dtype=data.token_dtype(8192)))  # fmt: skip
    assert len(w.paths) == 2 and not any(p.endswith(".tmp") for p in os.listdir(tmp_path))
    raw = next(g for g in shards.iter_tar_groups(w.paths[0]))
    assert shards.decode_npy(raw["tokens.npy"]).dtype == np.int16
    ds = data.PretokenizedDataset(str(tmp_path), infinite=False, shuffle=False, default_aesthetic=5.0)
    out = list(ds)
    assert len(out) == 3
    for i, s in enumerate(out):
        assert s["tokens"].dtype == torch.int64 and s["tokens"].tolist() == np.roll(ids, i).tolist()
        assert s["caption"] == f"cap {i}" and float(s["aesthetic"]) == 5.0
    assert data.token_dtype(2**16) == np.int32
    # A float16 token file (the official layout's bug) is skipped and counted, never read as ids.
    path = _write_tar(tmp_path / "fp16.tar", [("x.tokens.npy", shards.encode_npy(ids.astype(np.float16))),
                                              ("x.txt", b"c")])  # fmt: skip
    ds = data.PretokenizedDataset(path, infinite=False)
    assert list(ds) == [] and ds.skipped.counts()["bad_tokens"] == 1


def test_pretokenized_kl_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(2, 32, 16)).astype(np.float32)
    with shards.ShardWriter(str(tmp_path), "kl", per_shard=10) as w:
        w.write("k0", data.pretokenized_members("c", "The image features a recap", 6.25, mean=mean, logvar=logvar))
    (s,) = list(data.PretokenizedDataset(str(tmp_path), infinite=False))
    assert s["posterior"].shape == (32, 32) and s["posterior"].dtype == torch.float32
    assert torch.equal(s["posterior"], torch.from_numpy(np.concatenate([mean, logvar], -1)))
    assert s["recaption"] == "A recap" and float(s["aesthetic"]) == 6.25


class _StubTokenizer(torch.nn.Module):
    """The TA-TiTok encode() API, deterministic and with large ids."""

    def __init__(self, mode):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), dict(quantize_mode=mode, image_size=64, codebook_size=8192,
                                           num_latent_tokens=4, token_size=3))()  # fmt: skip

    def encode(self, images, return_posterior=False):
        s = images.mean(dim=(1, 2, 3))  # (B,)
        if self.config.quantize_mode == "vq":
            return ((s[:, None] * 1e4).long() + torch.tensor([0, 2049, 4097, 8191])) % 8192  # (B, 4)
        mean = s[:, None, None].expand(-1, 4, 3) + torch.arange(12.0).view(1, 4, 3)
        return type("Post", (), dict(mean=mean, logvar=-mean))()


@pytest.mark.parametrize("mode", ["vq", "kl"])
def test_pretokenize_with_stub(tmp_path, mode):
    tok = _StubTokenizer(mode)
    ds = data.build_image_dataset("shapes:10", 64, train=False)
    res = data.pretokenize(tok, ds, str(tmp_path), batch_size=4, per_shard=6, rank=1)
    assert res["samples"] == 10 and [os.path.basename(p) for p in res["shards"]] == [
        "pretok-rank001-000000.tar", "pretok-rank001-000001.tar"]  # fmt: skip
    out = list(data.PretokenizedDataset(str(tmp_path), infinite=False, shuffle=False))
    world = shapes.ShapesWorld(0)
    for i, s in enumerate(out):
        img = torch.from_numpy(world.sample(i).image).permute(2, 0, 1)[None].float() / 255
        assert s["caption"] == world.sample(i).caption and float(s["aesthetic"]) == shapes.SHAPES_AESTHETIC
        if mode == "vq":
            assert torch.equal(s["tokens"], tok.encode(img)[0])
        else:
            post = tok.encode(img, return_posterior=True)
            assert torch.allclose(s["posterior"], torch.cat([post.mean, post.logvar], -1)[0], atol=1e-6)


def test_pretokenize_cli_end_to_end_ddp(tmp_path):
    """`torchrun --nproc_per_node=2 data.py pretokenize` with a tiny real TA-TiTok (gloo, CPU)."""
    tk = pytest.importorskip("tokenizer")
    import checkpoint

    torch.manual_seed(0)
    model = tk.TATiTok(tk.PRESETS["tiny"]).eval()
    tok_dir = tmp_path / "tok"
    checkpoint.save_release(model, str(tok_dir))
    out = tmp_path / "pretok"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "data.py",
           "pretokenize", "--tokenizer", str(tok_dir), "--data", "shapes:7", "--out", str(out),
           "--batch-size", "2", "--num-workers", "0"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == 7 and meta["quantize_mode"] == "vq" and meta["token_dtype"] == "int16"
    assert meta["tokenizer_digest"] == checkpoint.content_digest(model.state_dict())  # what wrote them, by content
    assert sorted(os.listdir(out)) == ["meta.json", "pretok-rank000-000000.tar", "pretok-rank001-000000.tar"]
    got = {s["caption"] + "|" + s["key"]: s["tokens"] for s in data.PretokenizedDataset(str(out), infinite=False)}
    assert len(got) == 7
    # Every shapes sample 0..6 appears once, with the tokens the model gives it.
    world = shapes.ShapesWorld(0)
    images = torch.stack([data.ShapesDataset(0, image_size=32).item(i)["image"] for i in range(7)])
    with torch.no_grad():
        ids = model.encode(images)
    expected = sorted((world.sample(i).caption, tuple(ids[i].tolist())) for i in range(7))
    assert sorted((k.split("|")[0], tuple(v.tolist())) for k, v in got.items()) == expected
    assert data.read_pretokenized_meta(str(out))["codebook_size"] == tk.PRESETS["tiny"].codebook_size


def test_pretokenize_real_tiny_kl(tmp_path):
    tk = pytest.importorskip("tokenizer")
    torch.manual_seed(0)
    model = tk.TATiTok(tk.PRESETS["tiny_kl"]).eval()
    ds = data.build_image_dataset("shapes:3", model.config.image_size, train=False)
    assert data.pretokenize(model, ds, str(tmp_path), batch_size=3)["samples"] == 3
    out = list(data.PretokenizedDataset(str(tmp_path), infinite=False, shuffle=False))
    images = torch.stack([data.ShapesDataset(0, image_size=32).item(i)["image"] for i in range(3)])
    with torch.no_grad():
        post = model.encode(images, return_posterior=True)
    got = torch.stack([s["posterior"] for s in out])  # (3, K, 2C)
    assert got.shape == (3, model.config.num_latent_tokens, 2 * model.config.token_size)
    assert torch.allclose(got, torch.cat([post.mean, post.logvar], -1), atol=1e-5)


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "data.py", "inspect", "--data", str(tmp_path / "none-*.tar")],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("data.py: error: shard pattern") and "matched no files" in r.stderr

"""Tests for data.py: the shapes-world spec, tar shards, image folders, splitting,
skip counting and pretokenization. Fast (CPU, tiny data)."""

import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data

# -----------------------------------------------------------------------------
# The shapes world


@pytest.fixture(scope="module")
def samples():
    world = data.ShapesWorld(seed=0)
    return [world.sample(i) for i in range(300)]


def test_palette_is_the_spec():
    assert data.COLORS == {
        "red": (220, 30, 30), "yellow": (235, 200, 20), "green": (30, 160, 60),
        "cyan": (20, 180, 200), "blue": (40, 60, 220), "purple": (150, 50, 190),
    }  # fmt: skip
    assert data.SHAPES == ("circle", "square", "triangle")
    assert data.RELATIONS == ("to the left of", "to the right of", "above", "below")


def test_colours_exact(samples):
    palette = {tuple(c) for c in data.COLORS.values()}
    for s in samples:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        pixels = {tuple(p) for p in s.image.reshape(-1, 3)}
        assert (255, 255, 255) in pixels
        # No antialiasing: every pixel is white or exactly an object's palette colour.
        assert pixels - {(255, 255, 255)} == {data.COLORS[o.color] for o in s.objects}
        assert pixels <= palette | {(255, 255, 255)}
        # Each object's pixels carry its colour.
        for o in s.objects:
            assert (s.image[data.shape_mask(o)] == data.COLORS[o.color]).all()


def _dilate(mask, r):
    """Chebyshev dilation by r pixels."""
    out = np.zeros_like(mask)
    padded = np.pad(mask, r)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def test_layout_rules(samples):
    for s in samples:
        assert 1 <= len(s.objects) <= 3
        masks = []
        for o in s.objects:
            assert o.color in data.COLORS and o.shape in data.SHAPES
            assert 16 <= o.size <= 24
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and 0 <= y0 and x1 <= 63 and y1 <= 63  # fully inside
            m = data.shape_mask(o)
            ys, xs = np.nonzero(m)
            # The drawn shape spans exactly its box.
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)
            masks.append(m)
        for a, b in itertools.combinations(range(len(masks)), 2):
            # No overlap, and >= 3 white pixels between objects in every direction.
            assert not (masks[a] & masks[b]).any()
            assert not (_dilate(masks[a], 3) & masks[b]).any()
            assert data.white_gap(s.objects[a], s.objects[b]) >= 3


def test_shape_geometry():
    for size in (16, 17, 23, 24):
        sq = data.shape_mask(data.ShapeObject.at("red", "square", 5, 7, size))
        assert sq.sum() == size * size
        tri = data.ShapeObject.at("red", "triangle", 10, 12, size)
        m = data.shape_mask(tri)[12 : 12 + size, 10 : 10 + size]
        widths = m.sum(1)
        assert (np.diff(widths) >= 0).all() and widths[0] in (1, 2) and widths[-1] == size  # upright, base at bottom
        assert (m == m[:, ::-1]).all()  # isosceles: mirror-symmetric
        circ = data.shape_mask(data.ShapeObject.at("red", "circle", 3, 4, size))[4 : 4 + size, 3 : 3 + size]
        assert (circ == circ[::-1]).all() and (circ == circ.T).all()
        assert 0.72 < circ.mean() < 0.86 and 0.45 < m.mean() < 0.6  # fill ratios the detector relies on


def test_relation_geometry(samples):
    relations = [s for s in samples if s.category == "relation"]
    assert len(relations) > 60
    seen = set()
    for s in relations:
        spec = data.parse_caption(s.caption)
        sub, ref = s.objects
        assert (sub.color, sub.shape) != (ref.color, ref.shape)
        assert spec.objects == ((sub.color, sub.shape), (ref.color, ref.shape))
        # Measured from the rendered pixels: the centres of the drawn boxes.
        centres = []
        for o in (sub, ref):
            ys, xs = np.nonzero((s.image == data.COLORS[o.color]).all(-1) & data.shape_mask(o))
            centres.append(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2))
        dx, dy = centres[0][0] - centres[1][0], centres[0][1] - centres[1][1]
        along, across = {"to the left of": (-dx, dy), "to the right of": (dx, dy),
                         "above": (-dy, dx), "below": (dy, dx)}[spec.relation]  # fmt: skip
        assert along >= 16 and abs(across) <= 8, (s.caption, centres)
        seen.add(spec.relation)
    assert seen == set(data.RELATIONS)


def test_caption_grammar(samples):
    number = {2: "two", 3: "three"}
    for s in samples:
        objs = s.objects
        if s.category == "single":
            (o,) = objs
            assert s.caption == f"a {o.color} {o.shape}"
        elif s.category == "count":
            assert len(objs) in (2, 3) and len({(o.color, o.shape) for o in objs}) == 1
            assert s.caption == f"{number[len(objs)]} {objs[0].color} {objs[0].shape}s"
        else:
            assert s.category == "relation" and len(objs) == 2
            assert re.fullmatch(rf"a {objs[0].color} {objs[0].shape} "
                                rf"(to the left of|to the right of|above|below) a {objs[1].color} {objs[1].shape}",
                                s.caption)  # fmt: skip
        assert s.caption == s.caption.lower() and s.aesthetic == data.SHAPES_AESTHETIC


def test_category_mix(samples):
    counts = {c: sum(s.category == c for s in samples) for c in data.CATEGORIES}
    assert all(70 <= n <= 130 for n in counts.values()), counts  # equal thirds by default
    w = data.ShapesWorld(0, category_mix={"count": 1.0})
    assert {w.sample(i).category for i in range(30)} == {"count"}
    with pytest.raises(ValueError, match="unknown categories"):
        data.ShapesWorld(0, category_mix={"pairs": 1})


def test_determinism():
    a, b, c = data.ShapesWorld(0), data.ShapesWorld(0), data.ShapesWorld(1)
    for i in (0, 5, 123456):
        x, y = a.sample(i), b.sample(i)
        assert np.array_equal(x.image, y.image) and x.caption == y.caption and x.objects == y.objects
    # Out-of-order access gives the same samples.
    assert [a.sample(i).caption for i in (3, 2, 1)] == [b.sample(i).caption for i in (3, 2, 1)]
    differ = sum(not np.array_equal(a.sample(i).image, c.sample(i).image) for i in range(20))
    assert differ >= 19
    assert not np.array_equal(a.sample(0).image, a.sample(1).image)


def test_heldout_prompts():
    prompts = data.heldout_prompts(40)
    assert len(prompts) == 120 and all(isinstance(p, str) for p in prompts)
    cats = [data.parse_caption(p).category for p in prompts]
    assert cats == ["single"] * 40 + ["count"] * 40 + ["relation"] * 40
    assert data.HELDOUT_SEED != 0 and prompts == data.heldout_prompts(40)
    # A different draw from the training seed's (same indices, same forced categories).
    train = data.heldout_prompts(40, seed=0)
    assert sum(p != q for p, q in zip(prompts, train)) > 60
    assert len(set(prompts[80:])) > 30  # relation prompts are varied


def test_parse_caption_round_trip(samples):
    every = [f"a {c} {s}" for c in data.COLORS for s in data.SHAPES]
    every += [f"{n} {c} {s}s" for n in ("two", "three") for c in data.COLORS for s in data.SHAPES]
    kinds = [(c, s) for c in data.COLORS for s in data.SHAPES]
    every += [f"a {c1} {s1} {r} a {c2} {s2}" for (c1, s1) in kinds for r in data.RELATIONS for (c2, s2) in kinds
              if (c1, s1) != (c2, s2)]  # fmt: skip
    assert len(every) == 18 + 36 + 18 * 17 * 4
    for caption in every:
        assert data.make_caption(data.parse_caption(caption)) == caption
    for s in samples:
        spec = data.parse_caption(s.caption)
        assert spec.category == s.category
        if s.category == "count":
            assert spec.count == len(s.objects) and spec.objects == ((s.objects[0].color, s.objects[0].shape),)
    spec = data.parse_caption("  A Red circle   to the left of a green TRIANGLE ")
    assert spec == data.CaptionSpec("relation", (("red", "circle"), ("green", "triangle")), 1, "to the left of")
    for bad in ("a pink circle", "two red circle", "four red circles", "a red circle near a blue square", ""):
        with pytest.raises(ValueError, match="not a shapes caption"):
            data.parse_caption(bad)


def test_render_rejects_unknown_colour():
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        data.render([data.ShapeObject.at("pink", "circle", 0, 0, 16)])


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
    assert item["image"].shape == (3, 32, 32) and item["caption"] == data.ShapesWorld(0).sample(7).caption


# -----------------------------------------------------------------------------
# Brace patterns and tar shards


def test_expand_braces(tmp_path):
    assert data.expand_braces("s/{000000..000002}.tar") == ["s/000000.tar", "s/000001.tar", "s/000002.tar"]
    assert data.expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert data.expand_braces("{3..1}") == ["3", "2", "1"]
    assert data.expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert data.expand_braces("x{a,b{1..2}}y") == ["xay", "xb1y", "xb2y"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]
    assert data.expand_braces("{single}") == ["{single}"]
    with pytest.raises(ValueError, match="unbalanced"):
        data.expand_braces("s/{000..001.tar")
    pattern = str(tmp_path / "{000000..000123}.tar")
    with pytest.raises(FileNotFoundError, match=r"matched no files"):
        data.list_shards(pattern)
    (tmp_path / "000001.tar").write_bytes(b"")
    assert data.list_shards(pattern)[:2] == [str(tmp_path / "000000.tar"), str(tmp_path / "000001.tar")]
    assert data.list_shards(str(tmp_path)) == [str(tmp_path / "000001.tar")]
    with pytest.raises(ValueError, match="only local shard files"):
        data.list_shards("s3://bucket/{0..3}.tar")


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
    groups = list(data.iter_tar_groups(path))
    assert [g["__key__"] for g in groups] == ["000001", "sub/000002", "000003"]
    assert set(groups[0]) - {"__key__", "__shard__"} == {"jpg", "txt", "json"}
    assert groups[1]["txt"] == b"cap 2" and groups[1]["recap.txt"] == b"R" and groups[1]["png"] == b"P2"
    assert data.split_key("a/b/k.seg.txt") == ("a/b/k", "seg.txt")


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
    assert ds2.skipped.counts()["corrupt_image"] == 2 and ds2.skipped.total() == 8


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
    world = data.ShapesWorld(2)
    out = list(ds)
    assert len(out) == 10
    for s in out:
        ref = world.sample(int(s["key"].split(":")[1]))
        assert s["caption"] == ref.caption and float(s["aesthetic"]) == data.SHAPES_AESTHETIC
        assert torch.equal((s["image"] * 255).round().byte().permute(1, 2, 0), torch.from_numpy(ref.image))


def test_pick_captions_and_prefix():
    g = torch.Generator().manual_seed(0)
    assert data.pick_captions(["a", "b"], ["A", ""], 1.0, g) == ["A", "b"]
    assert data.pick_captions(["a", "b"], ["A", "B"], 0.0, g) == ["a", "b"]
    picks = data.pick_captions(["c"] * 2000, ["r"] * 2000, 0.95, g)
    assert 0.93 < picks.count("r") / 2000 < 0.97
    assert data.strip_recaption_prefix("The image shows a dog on grass.") == "A dog on grass."
    assert data.strip_recaption_prefix("A cat.") == "A cat."


# -----------------------------------------------------------------------------
# Pretokenization


def test_pretokenized_vq_ids_round_trip_exactly(tmp_path):
    ids = np.array([8191, 4097, 2049, 2048, 0, 1, 8190, 6000], dtype=np.int64)
    assert int(np.float16(2049)) == 2048 and int(np.float16(8191)) == 8192  # what fp16 storage would do
    with data.ShardWriter(str(tmp_path), "tok", per_shard=2) as w:
        for i in range(3):
            w.write(f"{i:03d}", data.pretokenized_members(f"cap {i}", tokens=np.roll(ids, i), aesthetic=None,
                                                          dtype=data.token_dtype(8192)))  # fmt: skip
    assert len(w.paths) == 2 and not any(p.endswith(".tmp") for p in os.listdir(tmp_path))
    raw = next(g for g in data.iter_tar_groups(w.paths[0]))
    assert data.decode_npy(raw["tokens.npy"]).dtype == np.int16
    ds = data.PretokenizedDataset(str(tmp_path), infinite=False, shuffle=False, default_aesthetic=5.0)
    out = list(ds)
    assert len(out) == 3
    for i, s in enumerate(out):
        assert s["tokens"].dtype == torch.int64 and s["tokens"].tolist() == np.roll(ids, i).tolist()
        assert s["caption"] == f"cap {i}" and float(s["aesthetic"]) == 5.0
    assert data.token_dtype(2**16) == np.int32
    # A float16 token file (the official layout's bug) is refused, not silently read.
    path = _write_tar(tmp_path / "fp16.tar", [("x.tokens.npy", data.encode_npy(ids.astype(np.float16))),
                                              ("x.txt", b"c")])  # fmt: skip
    with pytest.raises(TypeError, match="not integers"):
        list(data.PretokenizedDataset(path, infinite=False))


def test_pretokenized_kl_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(2, 32, 16)).astype(np.float32)
    with data.ShardWriter(str(tmp_path), "kl", per_shard=10) as w:
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
    world = data.ShapesWorld(0)
    for i, s in enumerate(out):
        img = torch.from_numpy(world.sample(i).image).permute(2, 0, 1)[None].float() / 255
        assert s["caption"] == world.sample(i).caption and float(s["aesthetic"]) == data.SHAPES_AESTHETIC
        if mode == "vq":
            assert torch.equal(s["tokens"], tok.encode(img)[0])
        else:
            post = tok.encode(img, return_posterior=True)
            assert torch.allclose(s["posterior"], torch.cat([post.mean, post.logvar], -1)[0], atol=1e-6)


def test_pretokenize_cli_end_to_end_ddp(tmp_path):
    """`torchrun --nproc_per_node=2 data.py pretokenize` with a tiny real TA-TiTok (gloo, CPU)."""
    tk = pytest.importorskip("tokenizer")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = tk.TATiTok(tk.PRESETS["tiny"]).eval()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.official_state_dict().items()}, str(tok_dir / "model.safetensors"))
    (tok_dir / "config.json").write_text(json.dumps(model.official_config()))
    out = tmp_path / "pretok"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "data.py",
           "pretokenize", "--tokenizer", str(tok_dir), "--data", "shapes:7", "--out", str(out),
           "--batch-size", "2", "--num-workers", "0"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == 7 and meta["quantize_mode"] == "vq" and meta["token_dtype"] == "int16"
    assert sorted(os.listdir(out)) == ["meta.json", "pretok-rank000-000000.tar", "pretok-rank001-000000.tar"]
    got = {s["caption"] + "|" + s["key"]: s["tokens"] for s in data.PretokenizedDataset(str(out), infinite=False)}
    assert len(got) == 7
    # Every shapes sample 0..6 appears once, with the tokens the model gives it.
    world = data.ShapesWorld(0)
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

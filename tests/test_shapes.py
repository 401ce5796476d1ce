"""Tests for shapes.py: the shapes-world spec (palette, layout, geometry, captions,
determinism, held-out prompts) and its rule-based detector, on freshly rendered
ground truth. Fast (CPU, numpy)."""

import dataclasses
import hashlib
import itertools
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import shapes

# -----------------------------------------------------------------------------
# The shapes world


@pytest.fixture(scope="module")
def samples():
    world = shapes.ShapesWorld(seed=0)
    return [world.sample(i) for i in range(300)]


def test_palette_is_the_spec():
    assert shapes.COLORS == {
        "red": (220, 30, 30), "yellow": (235, 200, 20), "green": (30, 160, 60),
        "cyan": (20, 180, 200), "blue": (40, 60, 220), "purple": (150, 50, 190),
    }  # fmt: skip
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert shapes.RELATIONS == ("to the left of", "to the right of", "above", "below")


def test_colours_exact(samples):
    palette = {tuple(c) for c in shapes.COLORS.values()}
    for s in samples:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        pixels = {tuple(p) for p in s.image.reshape(-1, 3)}
        assert (255, 255, 255) in pixels
        # No antialiasing: every pixel is white or exactly an object's palette colour.
        assert pixels - {(255, 255, 255)} == {shapes.COLORS[o.color] for o in s.objects}
        assert pixels <= palette | {(255, 255, 255)}
        # Each object's pixels carry its colour.
        for o in s.objects:
            assert (s.image[shapes.shape_mask(o)] == shapes.COLORS[o.color]).all()


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
            assert o.color in shapes.COLORS and o.shape in shapes.SHAPES
            assert 16 <= o.size <= 24
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and 0 <= y0 and x1 <= 63 and y1 <= 63  # fully inside
            m = shapes.shape_mask(o)
            ys, xs = np.nonzero(m)
            # The drawn shape spans exactly its box.
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)
            masks.append(m)
        for a, b in itertools.combinations(range(len(masks)), 2):
            # No overlap, and >= 3 white pixels between objects in every direction.
            assert not (masks[a] & masks[b]).any()
            assert not (_dilate(masks[a], 3) & masks[b]).any()
            assert shapes.white_gap(s.objects[a], s.objects[b]) >= 3


def test_shape_geometry():
    for size in (16, 17, 23, 24):
        sq = shapes.shape_mask(shapes.ShapeObject.at("red", "square", 5, 7, size))
        assert sq.sum() == size * size
        tri = shapes.ShapeObject.at("red", "triangle", 10, 12, size)
        m = shapes.shape_mask(tri)[12 : 12 + size, 10 : 10 + size]
        widths = m.sum(1)
        assert (np.diff(widths) >= 0).all() and widths[0] in (1, 2) and widths[-1] == size  # upright, base at bottom
        assert (m == m[:, ::-1]).all()  # isosceles: mirror-symmetric
        circ = shapes.shape_mask(shapes.ShapeObject.at("red", "circle", 3, 4, size))[4 : 4 + size, 3 : 3 + size]
        assert (circ == circ[::-1]).all() and (circ == circ.T).all()
        assert 0.72 < circ.mean() < 0.86 and 0.45 < m.mean() < 0.6  # fill ratios the detector relies on


def test_relation_geometry(samples):
    relations = [s for s in samples if s.category == "relation"]
    assert len(relations) > 60
    seen = set()
    for s in relations:
        spec = shapes.parse_caption(s.caption)
        sub, ref = s.objects
        assert (sub.color, sub.shape) != (ref.color, ref.shape)
        assert spec.objects == ((sub.color, sub.shape), (ref.color, ref.shape))
        # Measured from the rendered pixels: the centres of the drawn boxes.
        centres = []
        for o in (sub, ref):
            ys, xs = np.nonzero((s.image == shapes.COLORS[o.color]).all(-1) & shapes.shape_mask(o))
            centres.append(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2))
        dx, dy = centres[0][0] - centres[1][0], centres[0][1] - centres[1][1]
        along, across = {"to the left of": (-dx, dy), "to the right of": (dx, dy),
                         "above": (-dy, dx), "below": (dy, dx)}[spec.relation]  # fmt: skip
        assert along >= 16 and abs(across) <= 8, (s.caption, centres)
        seen.add(spec.relation)
    assert seen == set(shapes.RELATIONS)


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
        assert s.caption == s.caption.lower() and s.aesthetic == shapes.SHAPES_AESTHETIC


def test_category_mix(samples):
    counts = {c: sum(s.category == c for s in samples) for c in shapes.CATEGORIES}
    assert all(70 <= n <= 130 for n in counts.values()), counts  # equal thirds by default
    w = shapes.ShapesWorld(0, category_mix={"count": 1.0})
    assert {w.sample(i).category for i in range(30)} == {"count"}
    with pytest.raises(ValueError, match="unknown categories"):
        shapes.ShapesWorld(0, category_mix={"pairs": 1})


def test_determinism():
    a, b, c = shapes.ShapesWorld(0), shapes.ShapesWorld(0), shapes.ShapesWorld(1)
    for i in (0, 5, 123456):
        x, y = a.sample(i), b.sample(i)
        assert np.array_equal(x.image, y.image) and x.caption == y.caption and x.objects == y.objects
    # Out-of-order access gives the same samples.
    assert [a.sample(i).caption for i in (3, 2, 1)] == [b.sample(i).caption for i in (3, 2, 1)]
    differ = sum(not np.array_equal(a.sample(i).image, c.sample(i).image) for i in range(20))
    assert differ >= 19
    assert not np.array_equal(a.sample(0).image, a.sample(1).image)


def test_heldout_prompts():
    prompts = shapes.heldout_prompts(40)
    assert len(prompts) == 120 and all(isinstance(p, str) for p in prompts)
    cats = [shapes.parse_caption(p).category for p in prompts]
    assert cats == ["single"] * 40 + ["count"] * 40 + ["relation"] * 40
    assert shapes.HELDOUT_SEED != 0 and prompts == shapes.heldout_prompts(40)
    # A different draw from the training seed's (same indices, same forced categories).
    train = shapes.heldout_prompts(40, seed=0)
    assert sum(p != q for p, q in zip(prompts, train)) > 60
    assert len(set(prompts[80:])) > 30  # relation prompts are varied


def test_parse_caption_round_trip(samples):
    every = [f"a {c} {s}" for c in shapes.COLORS for s in shapes.SHAPES]
    every += [f"{n} {c} {s}s" for n in ("two", "three") for c in shapes.COLORS for s in shapes.SHAPES]
    kinds = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    every += [f"a {c1} {s1} {r} a {c2} {s2}" for (c1, s1) in kinds for r in shapes.RELATIONS for (c2, s2) in kinds
              if (c1, s1) != (c2, s2)]  # fmt: skip
    assert len(every) == 18 + 36 + 18 * 17 * 4
    for caption in every:
        assert shapes.make_caption(shapes.parse_caption(caption)) == caption
    for s in samples:
        spec = shapes.parse_caption(s.caption)
        assert spec.category == s.category
        if s.category == "count":
            assert spec.count == len(s.objects) and spec.objects == ((s.objects[0].color, s.objects[0].shape),)
    spec = shapes.parse_caption("  A Red circle   to the left of a green TRIANGLE ")
    assert spec == shapes.CaptionSpec("relation", (("red", "circle"), ("green", "triangle")), 1, "to the left of")
    for bad in ("a pink circle", "two red circle", "five red circles", "a red circle near a blue square", ""):
        with pytest.raises(ValueError, match="not a shapes caption"):
            shapes.parse_caption(bad)


def test_render_rejects_unknown_colour():
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        shapes.render([shapes.ShapeObject.at("pink", "circle", 0, 0, 16)])


# -----------------------------------------------------------------------------
# The detector


def fresh_samples(seed, n_per_category):
    world = shapes.ShapesWorld(seed)
    return [world.sample(i, cat) for cat in shapes.CATEGORIES for i in range(n_per_category)]


def test_detector_on_fresh_ground_truth():
    samples = fresh_samples(seed=2024, n_per_category=150)  # 450 fresh renders
    correct = 0
    for s in samples:
        dets = shapes.detect_shapes(s.image)
        want = sorted((o.color, o.shape) for o in s.objects)
        # Right kinds, and each centroid within 1.5 px of the object's box centre
        # (a triangle's centroid sits lower than its box centre, by ~h/6).
        ok = sorted((d.color, d.shape) for d in dets) == want
        for o in s.objects:
            near = [d for d in dets if (d.color, d.shape) == (o.color, o.shape) and abs(d.cx - o.cx) <= 1.5]
            ok &= bool(near) and min(abs(d.cy - o.cy) for d in near) <= (o.size / 6 + 1.5)
        correct += ok
    assert correct / len(samples) >= 0.99, f"detector correct on {correct}/{len(samples)} ground-truth images"


def mismatched_captions(spec):
    """Captions that the ground-truth scene of `spec` must NOT satisfy."""
    (color, shape) = spec.objects[0]
    other_color = next(c for c in shapes.COLORS if c != color)
    other_shape = next(s for s in shapes.SHAPES if s != shape)
    objs = list(spec.objects)
    out = [
        dataclasses.replace(spec, objects=((other_color, shape), *objs[1:])),
        dataclasses.replace(spec, objects=((color, other_shape), *objs[1:])),
    ]
    if spec.category == "single":
        out.append(shapes.CaptionSpec("count", ((color, shape),), 2))
    elif spec.category == "count":
        out.append(shapes.CaptionSpec("count", ((color, shape),), 5 - spec.count))  # 2 <-> 3
        out.append(shapes.CaptionSpec("single", ((color, shape),), 1))
    else:
        flip = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
                "below": "above"}  # fmt: skip
        out.append(dataclasses.replace(spec, relation=flip[spec.relation]))
        out.append(dataclasses.replace(spec, objects=(objs[1], objs[0])))  # subject and reference swapped
    return [shapes.make_caption(s) for s in out]


def test_scorer_accepts_own_captions_and_rejects_mismatches():
    samples = fresh_samples(seed=77, n_per_category=40)
    res = shapes.shapes_score([s.image for s in samples], [s.caption for s in samples])
    assert res == {"single": 1.0, "count": 1.0, "relation": 1.0, "overall": 1.0,
                   "n": {"single": 40, "count": 40, "relation": 40}}  # fmt: skip
    images, wrong = [], []
    for s in samples:
        for cap in mismatched_captions(shapes.parse_caption(s.caption)):
            images.append(s.image)
            wrong.append(cap)
    res = shapes.shapes_score(images, wrong, return_details=True)
    fooled = [d["prompt"] for d in res["per_prompt"] if d["correct"]]
    assert res["overall"] == 0.0, f"scored correct for mismatched captions: {fooled[:5]}"
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.shapes_score([samples[0].image], ["a dog on a sofa"])


def test_detector_tolerates_blur_and_noise():
    # A generator's output is never pixel-exact: blur (sigma 0.8 px) and add noise.
    samples = fresh_samples(seed=5, n_per_category=30)
    rng = np.random.default_rng(0)
    k = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * 0.8**2))
    k = k / k.sum()
    images = []
    for s in samples:
        x = torch.from_numpy(s.image).permute(2, 0, 1)[:, None].float()  # (3, 1, H, W)
        x = torch.nn.functional.pad(x, (3, 3, 3, 3), mode="replicate")
        x = torch.nn.functional.conv2d(x, (k[:, None] * k)[None, None])
        x = x[:, 0].permute(1, 2, 0).numpy() + rng.normal(0, 8, s.image.shape)
        images.append(np.clip(x, 0, 255).astype(np.uint8))
    res = shapes.shapes_score(images, [s.caption for s in samples])
    assert res["overall"] >= 0.95, res


# ---------------------------------------------------------------------------- a new word: "four"


def test_four_is_drawn_and_scored_only_when_asked():
    # The default world and the held-out set are as they were before "four" existed (digest of their pixels
    # and captions taken then), and never say "four".
    h = hashlib.sha256()
    for s in [shapes.ShapesWorld(0).sample(i) for i in range(200)] + shapes.heldout_samples(20):
        h.update(s.image.tobytes() + s.caption.encode())
    assert h.hexdigest() == "7b9224af453ff0aefef6e72664b1f4dca05d5af7e65248b499688e914cd0b5e1"
    assert not any("four" in p for p in shapes.heldout_prompts())
    fours = [shapes.ShapesWorld(3, {"count": 1}, counts=(4,)).sample(i) for i in range(40)]
    assert all(len(s.objects) == 4 and s.caption.startswith("four ") for s in fours)
    assert all(shapes.white_gap(a, b) >= shapes.MIN_GAP for s in fours for a in s.objects for b in s.objects if a != b)
    assert shapes.parse_caption("Four red  circles") == shapes.CaptionSpec("count", (("red", "circle"),), 4)
    assert shapes.shapes_score([s.image for s in fours], [s.caption for s in fours])["count"] == 1.0
    three = [s.caption.replace("four", "three") for s in fours]  # the detector counts: 4 objects are not three
    assert shapes.shapes_score([s.image for s in fours], three)["count"] == 0.0
    with pytest.raises(ValueError, match=r"counts must be some of \[2, 3, 4\], got \(5,\)"):
        shapes.ShapesWorld(0, counts=(5,))
    with pytest.raises(ValueError, match="two|three|four <colour> <shape>s"):
        shapes.parse_caption("five red circles")


def test_make_shapes_writes_a_folder_that_teaches_four(tmp_path):
    data.main(["make-shapes", "--out", str(tmp_path), "--n", "40", "--counts", "4", "--share", "0.25", "--folder"])
    caps = [open(tmp_path / f"{i:09d}.txt").read() for i in range(40)]
    world = shapes.ShapesWorld(0)
    assert [i for i, c in enumerate(caps) if c.startswith("four ")] == list(range(3, 40, 4))  # evenly spread
    assert all(c == world.sample(i).caption for i, c in enumerate(caps) if i % 4 != 3)  # the rest: the usual world
    # Training reads it as an image folder. Random flips would contradict "to the left of" / "to the right of":
    # those samples are never flipped; the others are, half the time.
    ds = data.build_image_dataset(str(tmp_path), 64, seed=1)
    flipped = {}
    for s, _ in zip(ds, range(80)):
        png = torch.from_numpy(np.array(Image.open(tmp_path / f"{s['key'].split(':')[-1]}.png"))).permute(2, 0, 1) / 255
        flipped.setdefault(bool(re.search("left|right", s["caption"])), set()).add(not torch.equal(png, s["image"]))
    assert flipped == {True: {False}, False: {False, True}}
    data.main(["make-shapes", "--out", str(tmp_path / "c"), "--n", "8", "--mix", "0,1,0", "--folder"])  # counts only
    world = shapes.ShapesWorld(0, (0, 1, 0))
    assert all(open(tmp_path / "c" / f"{i:09d}.txt").read() == world.sample(i).caption for i in range(8))
    with pytest.raises(ValueError, match=r"--share must be in \(0, 1\] with --counts, got 0.0"):
        data.main(["make-shapes", "--out", str(tmp_path / "x"), "--counts", "4", "--share", "0"])

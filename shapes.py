"""The shapes world: a tiny captioned world of coloured shapes, and the rule-based
detector that scores images against its captions.

A project addition, not in the paper: it stands in for the web image-text data (§5.1,
App. A) and for GenEval (§5.1 "Evaluation metrics"), so that TA-TiTok, MaskGen and the
evaluation train and are scored from scratch on a laptop CPU. GenEval scores object,
count, colour and position with a detector; this world is scored exactly with rules.

A scene is a 64x64 white canvas with 1-3 objects, each one of 6 palette colours and
3 shapes, drawn without antialiasing, with >= 3 white pixels between objects. Its
caption is in one of three categories:
    single     "a red circle"
    count      "three yellow triangles"              (2 or 3 objects of one kind; 4, "four", only when asked)
    relation   "a blue square above a purple circle" (two different kinds)
The spec in section 1 is shared with the detector below and with outside checks, so
it is followed to the letter: change nothing there without them.

Sections: 1. the spec, 2. scenes and drawing, 3. captions, 4. the world (ShapesWorld, held-out
prompts), 5. the detector (detect_shapes, check_prompt, shapes_score). data.py makes it a dataset
and tar shards (`python data.py make-shapes`); evaluate.py scores generated images against the
held-out prompts (`python evaluate.py shapes`).
"""

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

# =============================================================================
# 1. The spec
# =============================================================================

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
COLORS = {
    "red": (220, 30, 30),
    "yellow": (235, 200, 20),
    "green": (30, 160, 60),
    "cyan": (20, 180, 200),
    "blue": (40, 60, 220),
    "purple": (150, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
MIN_SIZE, MAX_SIZE = 16, 24  # bounding-box side in pixels, inclusive
MIN_GAP = 3  # white pixels between any two objects' boxes
RELATIONS = ("to the left of", "to the right of", "above", "below")
RELATION_MIN_OFFSET = 16  # centres differ by >= this along the relation's axis ...
RELATION_MAX_CROSS = 8  # ... and by <= this along the other axis
# Which coordinate, and which sign of (subject - reference) along it, makes
# "subject <relation> reference" true (y grows downwards).
RELATION_AXES = {"to the left of": ("x", -1), "to the right of": ("x", +1), "above": ("y", -1), "below": ("y", +1)}
CATEGORIES = ("single", "count", "relation")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}  # "four": only in scenes asked for (ShapesWorld's counts)
SHAPES_AESTHETIC = 6.5  # every shapes sample carries this constant aesthetic score
HELDOUT_SEED = 1_000_003  # the held-out prompt sampler's seed; training uses small seeds (0, 1, ...)

_COLOR_NAMES = tuple(COLORS)

# =============================================================================
# 2. Scenes: objects, what a caption asks for, and drawing
# =============================================================================

@dataclass(frozen=True)
class ShapeObject:
    """One object. (cx, cy) is the centre of its size x size bounding box in pixel-index coordinates (the
    mean of the column / row indices it covers): a rendered square's centroid is exactly (cx, cy)."""

    color: str
    shape: str
    cx: float
    cy: float
    size: int

    @classmethod
    def at(cls, color, shape, x0, y0, size):
        """The object whose box has its top-left pixel at (x0, y0)."""
        size = int(size)
        return cls(color, shape, int(x0) + (size - 1) / 2, int(y0) + (size - 1) / 2, size)

    @property
    def box(self):
        """(x0, y0, x1, y1): the first and last pixel column / row of the box, inclusive."""
        x0, y0 = (int(round(c - (self.size - 1) / 2)) for c in (self.cx, self.cy))
        return x0, y0, x0 + self.size - 1, y0 + self.size - 1


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for; the detector scores images against it.
    objects: the (color, shape) pairs in caption order: one for "single" and "count",
    (subject, reference) for "relation". count: objects of each named kind (a NUMBER_WORDS
    key for "count", else 1). relation: one of RELATIONS for "relation", else None."""

    category: str
    objects: tuple
    count: int = 1
    relation: str = None


@dataclass
class ShapesSample:
    image: np.ndarray  # uint8 (64, 64, 3)
    caption: str
    category: str  # "single" | "count" | "relation"
    objects: list  # [ShapeObject]; for "relation": [subject, reference]
    aesthetic: float = SHAPES_AESTHETIC


def shape_mask(obj):
    """Boolean (64, 64) mask of the object: a pixel is in iff its centre lies in the shape (no
    antialiasing: every object pixel is exactly its palette colour). It spans exactly the box."""
    x0, y0, x1, y1 = obj.box
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    in_box = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    if obj.shape == "square":
        return in_box
    if obj.shape == "circle":
        # Radius size/2 reaches the box's edge pixels (centres (size-1)/2 away) but not one beyond.
        return (xx - obj.cx) ** 2 + (yy - obj.cy) ** 2 <= (obj.size / 2) ** 2
    if obj.shape == "triangle":
        # Upright isosceles, height = base: the half-width grows 1/2 px per row, apex row 1-2 px wide.
        half_width = (yy - y0) / 2 + 0.5
        return in_box & (np.abs(xx - obj.cx) <= half_width)
    raise ValueError(f"unknown shape {obj.shape!r}; use one of {SHAPES}")


def render(objects):
    """Draw the objects on a white 64x64 canvas -> np.uint8 (64, 64, 3)."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.uint8)
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; use one of {_COLOR_NAMES}")
        image[shape_mask(obj)] = COLORS[obj.color]
    return image


def white_gap(a, b):
    """White pixels between a's and b's boxes along the better-separated axis (< 0: overlap)."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) - 1  # the larger of the x and y gaps


def relation_holds(subject, reference, relation):
    """Is `subject <relation> reference` unambiguous: the centres differ by >= 16 px
    along the relation's axis (the right way round) and by <= 8 px along the other?"""
    if relation not in RELATION_AXES:
        raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}")
    axis, sign = RELATION_AXES[relation]
    dx, dy = subject.cx - reference.cx, subject.cy - reference.cy
    along, across = (sign * dx, dy) if axis == "x" else (sign * dy, dx)
    return along >= RELATION_MIN_OFFSET and abs(across) <= RELATION_MAX_CROSS


# =============================================================================
# 3. Captions
# =============================================================================

def make_caption(spec):
    """CaptionSpec -> the caption string (the inverse of parse_caption)."""
    if spec.category in ("single", "count"):
        (color, shape), = spec.objects  # every shape name pluralises with -s
        return f"a {color} {shape}" if spec.category == "single" else f"{NUMBER_WORDS[spec.count]} {color} {shape}s"
    if spec.category == "relation":
        (c1, s1), (c2, s2) = spec.objects
        return f"a {c1} {s1} {spec.relation} a {c2} {s2}"
    raise ValueError(f"unknown category {spec.category!r}; use one of {CATEGORIES}")


_C = "|".join(_COLOR_NAMES)
_S = "|".join(SHAPES)
_CAPTION_RES = {
    "relation": re.compile(rf"a ({_C}) ({_S}) ({'|'.join(RELATIONS)}) a ({_C}) ({_S})"),
    "count": re.compile(rf"({'|'.join(NUMBER_WORDS.values())}) ({_C}) ({_S})s"),
    "single": re.compile(rf"a ({_C}) ({_S})"),
}


def parse_caption(caption):
    """A shapes caption -> CaptionSpec; case and extra spaces are forgiven, other forms raise ValueError."""
    text = " ".join(caption.lower().split())
    if m := _CAPTION_RES["relation"].fullmatch(text):
        c1, s1, rel, c2, s2 = m.groups()
        return CaptionSpec("relation", ((c1, s1), (c2, s2)), 1, rel)
    if m := _CAPTION_RES["count"].fullmatch(text):
        word, color, shape = m.groups()
        return CaptionSpec("count", ((color, shape),), {w: n for n, w in NUMBER_WORDS.items()}[word])
    if m := _CAPTION_RES["single"].fullmatch(text):
        return CaptionSpec("single", (m.groups(),), 1)
    raise ValueError(f"{caption!r} is not a shapes caption; write 'a <colour> <shape>', "
                     f"'{'|'.join(NUMBER_WORDS.values())} <colour> <shape>s' or "
                     "'a <colour> <shape> <relation> a <colour> <shape>' "
                     f"with colours {_COLOR_NAMES}, shapes {SHAPES} and relations {RELATIONS}")


# =============================================================================
# 4. The world: seeded random scenes
# =============================================================================

def _scatter(rng, kinds, attempts=100, tries_per_object=50):
    """Place objects of the given (color, shape) kinds anywhere, pairwise >= MIN_GAP apart.
    Objects are placed one by one; one that finds no room restarts the layout."""
    for _ in range(attempts):
        placed = []
        for color, shape in kinds:
            for _ in range(tries_per_object):
                size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
                x0, y0 = rng.integers(0, IMAGE_SIZE - size + 1, size=2)
                obj = ShapeObject.at(color, shape, x0, y0, size)
                if all(white_gap(obj, other) >= MIN_GAP for other in placed):
                    placed.append(obj)
                    break
            else:
                break  # no room for this object: start the layout again
        if len(placed) == len(kinds):
            return placed
    raise RuntimeError(f"could not place {len(kinds)} objects in {attempts} attempts (should never happen)")


def _place_pair(rng, subject, reference, relation, attempts=100):
    """Place two objects so that `subject <relation> reference` holds unambiguously."""
    axis, sign = RELATION_AXES[relation]
    subject_first = sign < 0  # the subject has the smaller coordinate ("to the left of", "above")
    for _ in range(attempts):
        s_sub, s_ref = (int(s) for s in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=2))
        s1, s2 = (s_sub, s_ref) if subject_first else (s_ref, s_sub)
        # Along the relation's axis: box 1, then >= MIN_GAP white pixels, then box 2.
        # That already puts the centres >= (s1+s2)/2 + 3 >= 19 px apart (>= 16 required).
        a1 = int(rng.integers(0, IMAGE_SIZE - s1 - MIN_GAP - s2 + 1))
        a2 = int(rng.integers(a1 + s1 + MIN_GAP, IMAGE_SIZE - s2 + 1))
        # Across it: box 1 anywhere, box 2 with its centre within 8 px of box 1's. In doubled units,
        # centre = 2*start + size - 1, so 2*start2 must lie in [2*c1 + s1 - s2 - 16, 2*c1 + s1 - s2 + 16].
        c1 = int(rng.integers(0, IMAGE_SIZE - s1 + 1))
        mid = 2 * c1 + s1 - s2
        lo = max(0, -(-(mid - 2 * RELATION_MAX_CROSS) // 2))  # ceil division
        hi = min(IMAGE_SIZE - s2, (mid + 2 * RELATION_MAX_CROSS) // 2)
        c2 = int(rng.integers(lo, hi + 1))
        first, second = (subject, reference) if subject_first else (reference, subject)
        xy1, xy2 = ((a1, c1), (a2, c2)) if axis == "x" else ((c1, a1), (c2, a2))
        o1, o2 = ShapeObject.at(*first, *xy1, s1), ShapeObject.at(*second, *xy2, s2)
        sub, ref = (o1, o2) if subject_first else (o2, o1)
        # Re-checked with the spec's own predicates: a slip above costs a retry, never a wrong sample.
        if relation_holds(sub, ref, relation) and white_gap(sub, ref) >= MIN_GAP:
            return [sub, ref]
    raise RuntimeError(f"could not place a {relation!r} pair in {attempts} attempts (should never happen)")


class ShapesWorld:
    """Seeded generator of shapes scenes. Sample `index` draws from its own numpy Generator
    seeded with [seed, index], so it can be regenerated alone, in any order, on any rank.
    category_mix: None (equal thirds), {"single": w, "count": w, "relation": w}, or 3 weights.
    counts: the object counts of "count" scenes, drawn uniformly (NUMBER_WORDS keys). (4,) teaches the word
    "four", which the shipped models never saw (`python data.py make-shapes --counts 4`)."""

    def __init__(self, seed=0, category_mix=None, counts=(2, 3)):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not counts or not set(counts) <= set(NUMBER_WORDS):
            raise ValueError(f"counts must be some of {sorted(NUMBER_WORDS)}, got {counts}")
        self.seed, self.counts = int(seed), tuple(int(n) for n in counts)
        if isinstance(category_mix, dict):
            if unknown := set(category_mix) - set(CATEGORIES):
                raise ValueError(f"category_mix has unknown categories {sorted(unknown)}; use {CATEGORIES}")
            category_mix = [category_mix.get(c, 0.0) for c in CATEGORIES]
        weights = [1.0] * 3 if category_mix is None else [float(w) for w in category_mix]
        if len(weights) != 3:
            raise ValueError(f"category_mix needs 3 weights for {CATEGORIES}, got {len(weights)}")
        w = np.asarray(weights)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"category_mix weights must be >= 0 with a positive sum, got {weights}")
        self.weights = w / w.sum()  # (3,) probabilities of CATEGORIES

    def scene(self, index, category=None):
        """(CaptionSpec, [ShapeObject]) of sample `index`, unrendered; `category` forces one (held-out)."""
        if category is None:
            rng = np.random.default_rng([self.seed, int(index)])
            category = CATEGORIES[int(rng.choice(3, p=self.weights))]
        elif category in CATEGORIES:
            # A forced category gets its own stream: held-out prompts of each category are independent.
            rng = np.random.default_rng([self.seed, int(index), 1 + CATEGORIES.index(category)])
        else:
            raise ValueError(f"unknown category {category!r}; use one of {CATEGORIES}")
        kind = (_COLOR_NAMES[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
        if category == "single":
            return CaptionSpec("single", (kind,)), _scatter(rng, [kind])
        if category == "count":
            n = self.counts[int(rng.integers(len(self.counts)))]  # (2, 3): the draw integers(2, 4) - 2
            return CaptionSpec("count", (kind,), n), _scatter(rng, [kind] * n)
        # "relation": the reference is any of the other 17 (colour, shape) kinds.
        kinds = [(c, s) for c in _COLOR_NAMES for s in SHAPES if (c, s) != kind]
        other = kinds[rng.integers(len(kinds))]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        return CaptionSpec("relation", (kind, other), 1, relation), _place_pair(rng, kind, other, relation)

    def sample(self, index, category=None):
        spec, objects = self.scene(index, category)
        return ShapesSample(render(objects), make_caption(spec), spec.category, objects)

    def batch(self, indices, image_size=IMAGE_SIZE):
        """The samples `indices` as (images (N, 3, S, S) float in [0, 1], [ShapesSample]): the one
        path from this world to tensors (trainers, data.ShapesDataset). At S = 64 the pixels are
        exactly the rendered k / 255; another S is resized bicubic, antialiased, clamped."""
        samples = [self.sample(i) for i in indices]
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
        if image_size != IMAGE_SIZE:
            images = F.interpolate(images, size=(image_size, image_size), mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0, 1)  # fmt: skip
        return images, samples


def heldout_prompts(n_per_category=300, seed=HELDOUT_SEED):
    """Evaluation prompts: 3 * n captions, n per category, in CATEGORIES order.
    Drawn from a seed no training run uses. The caption space is small (18 single, 36 count,
    1224 relation captions), so single / count captions necessarily repeat training ones;
    what is held out is the draw (and the generation seeds), as in GenEval-style scoring."""
    world = ShapesWorld(seed)
    return [make_caption(world.scene(i, category)[0]) for category in CATEGORIES for i in range(n_per_category)]


def heldout_samples(n_per_category=300, seed=HELDOUT_SEED):
    """The held-out prompts' ground-truth scenes ([ShapesSample], same order): a check of the
    detector (it should score 1.0) and the ceiling a generator is measured against."""
    world = ShapesWorld(seed)
    return [world.sample(i, category) for category in CATEGORIES for i in range(n_per_category)]


# =============================================================================
# 5. The detector: the compositional score (a GenEval stand-in)
#
# Every object is one exact palette colour on white, so per palette colour: pixel mask
# -> connected components -> shape from the component's geometry -> position = centroid.
# =============================================================================

@dataclass
class Detection:
    color: str
    shape: str
    cx: float  # centroid, pixels (x to the right, y down)
    cy: float
    area: int  # pixels
    bbox: tuple  # (x0, y0, x1, y1), inclusive
    fill: float  # area / bbox area: square 1.0, circle ~0.79 (pi/4), triangle ~0.55 (1/2 + the apex rows)


def label_components(mask):
    """4-connected components of a boolean (H, W) mask, numpy only -> (labels (H, W) int, 0 = background,
    1..n; n). Each foreground pixel starts labelled by its flat index; each sweep takes the smallest label
    among it and its 4 foreground neighbours, until nothing changes (a few dozen sweeps here)."""
    H, W = mask.shape
    big = H * W + 1
    lab = np.where(mask, np.arange(1, H * W + 1).reshape(H, W), big)
    while True:
        new = lab.copy()
        new[1:, :] = np.minimum(new[1:, :], lab[:-1, :])  # from the pixel above
        new[:-1, :] = np.minimum(new[:-1, :], lab[1:, :])  # from below
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])  # from the left
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])  # from the right
        new[~mask] = big  # background never joins anything
        if np.array_equal(new, lab):
            break
        lab = new
    roots = np.unique(lab[mask])
    out = np.zeros((H, W), dtype=np.int64)
    out[mask] = np.searchsorted(roots, lab[mask]) + 1
    return out, len(roots)


def classify_shape(comp):
    """Shape of one component, from a boolean mask cropped to its bounding box (h, w).
    Returns (shape name, fill ratio). Corner patches (side = a quarter of the box) and row widths:
      * an upright triangle has empty top corners, full bottom ones and rows widening downwards:
        (bottom - top corner coverage) + (bottom - top quarter mean row width) / w is ~1.5, else ~0;
      * a square fills its corners, a circle (pi/4 of its box) mostly not:
        corner coverage + fill / 2 is ~1.5 for a square, ~0.6 for a circle.
    Thresholds sit midway between the classes' ranges on renders blurred (sigma <= 1.2 px) and
    noised (std <= 12 levels), a stand-in for a generator's output, with no errors on ~3000 objects."""
    h, w = comp.shape
    fill = float(comp.mean())
    c = max(2, min(h, w) // 4)
    top = (comp[:c, :c].mean() + comp[:c, -c:].mean()) / 2
    bottom = (comp[-c:, :c].mean() + comp[-c:, -c:].mean()) / 2
    widths = comp.sum(axis=1)  # (h,) pixels per row
    q = max(1, h // 4)
    widening = (widths[-q:].mean() - widths[:q].mean()) / w
    if (bottom - top) + widening > 0.85:
        return "triangle", fill
    if (top + bottom) / 2 + fill / 2 > 0.875:
        return "square", fill
    return "circle", fill


def detect_shapes(image, tol=60.0, min_area=40, white=230):
    """Objects in a shapes-world image. image: uint8 (H, W, 3) -> list[Detection].

    tol: max RGB distance from a palette colour. The closest two (blue, purple) are ~115
      apart, so 60 is unambiguous yet tolerates soft edges and a generator's colour drift.
    min_area: smaller components are noise (a 16 px triangle covers ~130 px at 64x64);
      scaled with the image area. white: pixels with every channel >= this are background."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    min_area = min_area * (img.shape[0] * img.shape[1]) / (64 * 64)
    pal = np.array([COLORS[n] for n in _COLOR_NAMES], dtype=np.float32)  # (6, 3)
    d = np.linalg.norm(img.astype(np.float32)[:, :, None, :] - pal[None, None], axis=-1)  # (H, W, 6)
    nearest = d.argmin(axis=-1)  # (H, W)
    fg = (d.min(axis=-1) < tol) & ~(img >= white).all(axis=-1)
    out = []
    for ci, name in enumerate(_COLOR_NAMES):
        labels, n = label_components(fg & (nearest == ci))
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            if len(ys) < min_area:
                continue
            x0, y0, x1, y1 = (int(v) for v in (xs.min(), ys.min(), xs.max(), ys.max()))
            shape, fill = classify_shape(labels[y0 : y1 + 1, x0 : x1 + 1] == k)
            out.append(Detection(name, shape, float(xs.mean()), float(ys.mean()), len(ys), (x0, y0, x1, y1), fill))
    return out


def check_prompt(dets, spec, margin=4.0):
    """Do detections satisfy a CaptionSpec? -> (ok, reason). The image must hold exactly the
    prompted objects (colours, shapes, count; none missing, none extra); for a relation the
    subject's centroid must lie beyond the reference's by > `margin` px along the relation's
    axis (like GenEval, the other axis is not checked)."""
    want = [tuple(o) for o in spec.objects for _ in range(spec.count)]
    got = [(d.color, d.shape) for d in dets]
    if len(got) != len(want):
        return False, f"found {len(got)} objects, expected {len(want)}"
    if sorted(got) != sorted(want):
        return False, f"found {sorted(got)}, expected {sorted(want)}"
    if spec.relation is None:
        return True, "ok"
    # Subject and reference differ in colour or shape (the world's rule): each matches one detection.
    a, b = (next(d for d in dets if (d.color, d.shape) == tuple(o)) for o in spec.objects)
    axis, sign = RELATION_AXES[spec.relation]
    delta = (a.cx - b.cx) if axis == "x" else (a.cy - b.cy)
    if sign * delta > margin:
        return True, "ok"
    return False, f"relation '{spec.relation}' not satisfied ({axis}: subject - reference = {delta:+.1f} px)"


def shapes_score(images, prompts, return_details=False, **detect_kw):
    """The compositional score of images (uint8 (H, W, 3) arrays) against their captions.
    Returns {"single": acc, "count": acc, "relation": acc, "overall": mean over the categories
    present (GenEval's), "n": {category: count}}; with return_details also "per_prompt":
    [{prompt, category, correct, reason, detections}]."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    hits, details = {}, []
    for img, prompt in zip(images, prompts):
        spec = parse_caption(prompt)
        dets = detect_shapes(img, **detect_kw)
        ok, why = check_prompt(dets, spec)
        hits.setdefault(spec.category, []).append(ok)
        if return_details:
            details.append(dict(prompt=prompt, category=spec.category, correct=ok, reason=why,
                                detections=[asdict(d) for d in dets]))  # fmt: skip
    cats = [c for c in CATEGORIES if c in hits]
    res = {c: float(np.mean(hits[c])) for c in cats}
    res["overall"] = float(np.mean(list(res.values()))) if res else float("nan")
    res["n"] = {c: len(hits[c]) for c in cats}
    if return_details:
        res["per_prompt"] = details
    return res

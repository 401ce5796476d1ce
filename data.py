"""
Data: everything that turns pictures and captions into tensors, plus pretokenization.

Paper: §5.1 "Training Data" and Appendix A ("Dataset Filtering", "Dataset
Recaptioning", Tab. 7). The recipe this file implements:
  * web image-text pairs (DataComp, CC12M, LAION) stored as WebDataset tar shards,
    the layout img2dataset writes;
  * a resolution filter on every dataset: longer side >= 256 and aspect ratio < 2;
    an optional aesthetic-score filter (5.0 for pre-training, 6.0 for fine-tuning);
  * Molmo recaptions kept next to the original captions, so the trainer can use the
    recaption with probability 0.95 (the 95:5 ratio of App. A), with the Molmo
    "The image depicts ..." prefixes stripped;
  * the aesthetic score carried along as MaskGen's micro-condition;
  * images pretokenized once by a frozen TA-TiTok for MaskGen training.
On top of that sits the procedural shapes world (a project addition, not in the
paper): a tiny captioned world in which the whole system trains on a CPU.

Sections, in reading order:
  1. The shapes world        ShapesWorld, ShapesDataset, render, parse_caption, heldout_prompts
  2. WebDataset tar shards   expand_braces, list_shards, iter_tar_groups, ImageTransform, TarShardDataset
  3. Image folders           ImageFolderDataset, build_image_dataset, image_text_loader
  4. Pretokenization         ShardWriter, pretokenize, PretokenizedDataset
  5. Shapes shards + CLI     make_shapes_shards, main()

Every dataset here is a torch IterableDataset that yields dicts. Image datasets give
    {"image": FloatTensor (3,S,S) in [0,1], "caption": str, "recaption": str ("" if none),
     "aesthetic": FloatTensor () , "key": str}
and PretokenizedDataset gives "tokens" LongTensor (K,) or "posterior" FloatTensor (K,2C)
instead of "image". All of them split their samples over DDP ranks and DataLoader
workers without duplicates, and resume exactly from a batch count (see _StreamDataset).
Bad inputs (corrupt images, missing captions, truncated tars, unreadable shards) are
skipped and counted in `dataset.skipped`, never a crash.

Command line:
    python data.py make-shapes --out shards/shapes --n 10000
    python data.py pretokenize --tokenizer <dir> --data "shards/{000000..000099}.tar" --out pretok/
    python data.py inspect --data shards/shapes
"""

import argparse
import glob
import io
import json
import logging
import math
import os
import re
import tarfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger("data")

# =============================================================================
# 1. The shapes world
#
# A 64x64 world of coloured circles, squares and triangles with exact captions.
# The spec below is shared with evaluate.py's rule-based detector and with outside
# checks, so it is followed to the letter: change nothing here without them.
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
CATEGORIES = ("single", "count", "relation")
NUMBER_WORDS = {2: "two", 3: "three"}
SHAPES_AESTHETIC = 6.5  # every shapes sample carries this constant aesthetic score
HELDOUT_SEED = 1_000_003  # the held-out prompt sampler's seed; training uses small seeds (0, 1, ...)

_COLOR_NAMES = tuple(COLORS)


@dataclass(frozen=True)
class ShapeObject:
    """One object. (cx, cy) is the centre of its size x size bounding box in pixel-index
    coordinates (the mean of the column / row indices the box covers), so the centroid
    of a rendered square is exactly (cx, cy). x grows rightwards, y downwards."""

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
        x0 = int(round(self.cx - (self.size - 1) / 2))
        y0 = int(round(self.cy - (self.size - 1) / 2))
        return x0, y0, x0 + self.size - 1, y0 + self.size - 1


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for; evaluate.py scores generated images against it.

    objects:  the (color, shape) pairs in the order the caption names them:
              one for "single" and "count", (subject, reference) for "relation".
    count:    how many objects of each named kind the image holds: 1 for "single"
              and "relation", 2 or 3 for "count".
    relation: one of RELATIONS for "relation" (the subject is `relation` the
              reference), else None.
    """

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
    """Boolean (64, 64) mask of the pixels the object covers. No antialiasing: a pixel
    is in or out by whether its centre lies in the shape, so every object pixel gets
    exactly its palette colour. Each mask spans exactly the object's box."""
    x0, y0, x1, y1 = obj.box
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    in_box = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    if obj.shape == "square":
        return in_box
    if obj.shape == "circle":
        # Radius size/2 reaches the box's edge pixels (whose centres are (size-1)/2
        # from the centre) but not one pixel beyond.
        return (xx - obj.cx) ** 2 + (yy - obj.cy) ** 2 <= (obj.size / 2) ** 2
    if obj.shape == "triangle":
        # Upright isosceles: the half-width grows by 1/2 px per row from the apex
        # row (1-2 px wide) to the bottom row (the full box width). Height = base.
        half_width = (yy - y0) / 2 + 0.5
        return in_box & (np.abs(xx - obj.cx) <= half_width)
    raise ValueError(f"unknown shape {obj.shape!r}; use one of {SHAPES}")


def render(objects):
    """Draw the objects on a white 64x64 canvas -> np.uint8 (64, 64, 3)."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; use one of {_COLOR_NAMES}")
        image[shape_mask(obj)] = COLORS[obj.color]
    return image


def white_gap(a, b):
    """White pixels between the boxes of a and b along the better-separated axis
    (negative when the boxes overlap). The spec wants >= MIN_GAP."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    gap_x = max(bx0 - ax1, ax0 - bx1) - 1
    gap_y = max(by0 - ay1, ay0 - by1) - 1
    return max(gap_x, gap_y)


def relation_holds(subject, reference, relation):
    """Is `subject <relation> reference` unambiguous: the centres differ by >= 16 px
    along the relation's axis (the right way round) and by <= 8 px along the other?"""
    dx, dy = subject.cx - reference.cx, subject.cy - reference.cy
    if relation in ("to the left of", "to the right of"):
        along, across = (-dx if relation == "to the left of" else dx), dy
    elif relation in ("above", "below"):
        along, across = (-dy if relation == "above" else dy), dx  # y grows downwards
    else:
        raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}")
    return along >= RELATION_MIN_OFFSET and abs(across) <= RELATION_MAX_CROSS


def make_caption(spec):
    """CaptionSpec -> the caption string (the inverse of parse_caption)."""
    if spec.category == "single":
        (color, shape), = spec.objects
        return f"a {color} {shape}"
    if spec.category == "count":
        (color, shape), = spec.objects
        return f"{NUMBER_WORDS[spec.count]} {color} {shape}s"  # every shape name pluralises with -s
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
    """A shapes caption -> CaptionSpec. Case and extra spaces are forgiven; anything
    outside the three caption forms raises ValueError."""
    text = " ".join(caption.lower().split())
    m = _CAPTION_RES["relation"].fullmatch(text)
    if m:
        c1, s1, rel, c2, s2 = m.groups()
        return CaptionSpec("relation", ((c1, s1), (c2, s2)), 1, rel)
    m = _CAPTION_RES["count"].fullmatch(text)
    if m:
        word, color, shape = m.groups()
        count = {w: n for n, w in NUMBER_WORDS.items()}[word]
        return CaptionSpec("count", ((color, shape),), count)
    m = _CAPTION_RES["single"].fullmatch(text)
    if m:
        return CaptionSpec("single", (m.groups(),), 1)
    raise ValueError(
        f"{caption!r} is not a shapes caption; write 'a <colour> <shape>', "
        f"'two|three <colour> <shape>s' or 'a <colour> <shape> <relation> a <colour> <shape>' "
        f"with colours {_COLOR_NAMES}, shapes {SHAPES} and relations {RELATIONS}"
    )


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
    horizontal = relation in ("to the left of", "to the right of")
    subject_first = relation in ("to the left of", "above")  # the subject has the smaller coordinate
    for _ in range(attempts):
        s_sub, s_ref = (int(s) for s in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=2))
        s1, s2 = (s_sub, s_ref) if subject_first else (s_ref, s_sub)
        # Along the relation's axis: box 1, then >= MIN_GAP white pixels, then box 2.
        # That already puts the centres >= (s1+s2)/2 + 3 >= 19 px apart (>= 16 required).
        a1 = int(rng.integers(0, IMAGE_SIZE - s1 - MIN_GAP - s2 + 1))
        a2 = int(rng.integers(a1 + s1 + MIN_GAP, IMAGE_SIZE - s2 + 1))
        # Across it: box 1 anywhere, box 2 with its centre within 8 px of box 1's.
        # In doubled units, centre = 2*start + size - 1, so 2*start2 must lie in
        # [2*c1 + s1 - s2 - 16, 2*c1 + s1 - s2 + 16].
        c1 = int(rng.integers(0, IMAGE_SIZE - s1 + 1))
        mid = 2 * c1 + s1 - s2
        lo = max(0, -(-(mid - 2 * RELATION_MAX_CROSS) // 2))  # ceil division
        hi = min(IMAGE_SIZE - s2, (mid + 2 * RELATION_MAX_CROSS) // 2)
        c2 = int(rng.integers(lo, hi + 1))
        first, second = (subject, reference) if subject_first else (reference, subject)
        xy1, xy2 = ((a1, c1), (a2, c2)) if horizontal else ((c1, a1), (c2, a2))
        o1 = ShapeObject.at(*first, *xy1, s1)
        o2 = ShapeObject.at(*second, *xy2, s2)
        sub, ref = (o1, o2) if subject_first else (o2, o1)
        # Checked again with the same predicates the tests use, so a slip above can
        # only cost a retry, never a wrong sample.
        if relation_holds(sub, ref, relation) and white_gap(sub, ref) >= MIN_GAP:
            return [sub, ref]
    raise RuntimeError(f"could not place a {relation!r} pair in {attempts} attempts (should never happen)")


def _category_weights(category_mix):
    """None -> equal thirds; a dict {category: weight} or a 3-sequence -> probabilities."""
    if category_mix is None:
        return np.full(3, 1 / 3)
    if isinstance(category_mix, dict):
        unknown = set(category_mix) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"category_mix has unknown categories {sorted(unknown)}; use {CATEGORIES}")
        weights = [float(category_mix.get(c, 0.0)) for c in CATEGORIES]
    else:
        weights = [float(w) for w in category_mix]
        if len(weights) != 3:
            raise ValueError(f"category_mix needs 3 weights for {CATEGORIES}, got {len(weights)}")
    w = np.asarray(weights)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"category_mix weights must be >= 0 with a positive sum, got {weights}")
    return w / w.sum()


class ShapesWorld:
    """Seeded generator of shapes scenes. Sample `index` depends only on (seed, index):
    it draws from its own numpy Generator seeded with [seed, index], so any sample can
    be regenerated alone, in any order, on any rank or worker.

    category_mix: None (equal thirds), {"single": w, "count": w, "relation": w}, or 3 weights.
    """

    def __init__(self, seed=0, category_mix=None):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.weights = _category_weights(category_mix)

    def scene(self, index, category=None):
        """(CaptionSpec, [ShapeObject]) of sample `index`, without rendering.
        `category` forces the category (the held-out sampler uses it)."""
        if category is None:
            rng = np.random.default_rng([self.seed, int(index)])
            category = CATEGORIES[int(rng.choice(3, p=self.weights))]
        elif category in CATEGORIES:
            # A forced category gets its own stream, so that the held-out prompts of
            # different categories are independent draws.
            rng = np.random.default_rng([self.seed, int(index), 1 + CATEGORIES.index(category)])
        else:
            raise ValueError(f"unknown category {category!r}; use one of {CATEGORIES}")
        kind = (_COLOR_NAMES[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
        if category == "single":
            return CaptionSpec("single", (kind,)), _scatter(rng, [kind])
        if category == "count":
            n = int(rng.integers(2, 4))
            return CaptionSpec("count", (kind,), n), _scatter(rng, [kind] * n)
        # "relation": the reference is any of the other 17 (colour, shape) kinds.
        kinds = [(c, s) for c in _COLOR_NAMES for s in SHAPES if (c, s) != kind]
        other = kinds[rng.integers(len(kinds))]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        return CaptionSpec("relation", (kind, other), 1, relation), _place_pair(rng, kind, other, relation)

    def sample(self, index, category=None):
        spec, objects = self.scene(index, category)
        return ShapesSample(render(objects), make_caption(spec), spec.category, objects)


def heldout_prompts(n_per_category=300, seed=HELDOUT_SEED):
    """Evaluation prompts: a list of 3 * n captions, n per category, in CATEGORIES order
    (parse_caption gives each one's category and spec).

    Drawn from a seed no training run uses. The caption space is small (18 single,
    36 count, 1224 relation captions), so single / count captions necessarily repeat
    training captions; what is held out is the draw (and, for the evaluator, the
    generation seeds), as in GenEval-style scoring."""
    world = ShapesWorld(seed)
    return [make_caption(world.scene(i, category)[0]) for category in CATEGORIES for i in range(n_per_category)]


def _image_to_tensor(array):
    """uint8 (H, W, 3) -> FloatTensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


def resolve_rank(rank=None, world_size=None):
    """(rank, world_size): as given, else from torch.distributed, else from the RANK /
    WORLD_SIZE environment (torchrun), else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size")
    return int(rank), int(world_size)


def _worker():
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShapesDataset(IterableDataset):
    """Shapes samples as training dicts:
        {"image": (3,S,S) in [0,1], "caption", "recaption": "", "aesthetic": 6.5,
         "key", "index", "category"}

    Order. With batch_size = the DataLoader's per-rank batch size B, batch b of rank r
    holds sample indices (b * world_size + r) * B + [0, B). So the global batch b (all
    ranks together) is exactly batch b of a single process with batch world_size * B,
    whatever the number of DataLoader workers: DataLoader worker j makes batches
    start_batch + j, + num_workers, ..., which the loader hands out round-robin, in
    order. To resume after n batches, pass start_batch=n.

    length: None = unbounded indices; N = only indices [0, N) (repeated when infinite,
    a single pass when infinite=False). image_size != 64 resizes (bicubic, antialiased).
    """

    def __init__(self, seed=0, *, category_mix=None, image_size=IMAGE_SIZE, length=None, infinite=True,
                 rank=None, world_size=None, batch_size=None, start_batch=0):
        super().__init__()
        if not infinite and length is None:
            raise ValueError("a finite ShapesDataset needs a length: pass length=N (or 'shapes:N' as a data spec)")
        self.world = ShapesWorld(seed, category_mix)
        self.seed, self.image_size, self.length, self.infinite = int(seed), int(image_size), length, infinite
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.batch_size, self.start_batch = int(batch_size or 1), int(start_batch)
        self.skipped = SkipCounter()  # always empty: the shapes world never fails; kept for a uniform API

    def item(self, index):
        s = self.world.sample(index)
        image = _image_to_tensor(s.image)  # (3, 64, 64)
        if self.image_size != IMAGE_SIZE:
            image = F.interpolate(image[None], size=(self.image_size,) * 2, mode="bicubic",
                                  antialias=True, align_corners=False)[0].clamp_(0, 1)  # fmt: skip
        return {"image": image, "caption": s.caption, "recaption": "", "aesthetic": torch.tensor(s.aesthetic),
                "key": f"shapes-{self.seed}-{index:09d}", "index": index, "category": s.category}  # fmt: skip

    def __iter__(self):
        worker, num_workers = _worker()
        B, batch = self.batch_size, self.start_batch + worker
        while True:
            for t in range(B):
                index = (batch * self.world_size + self.rank) * B + t
                if self.length is not None:
                    if not self.infinite and index >= self.length:
                        return
                    index %= self.length
                yield self.item(index)
            batch += num_workers


# =============================================================================
# 2. WebDataset-format tar shards, read with the standard library
#
# img2dataset writes shards like 000123.tar holding 000123001.jpg, 000123001.txt,
# 000123001.json, 000123002.jpg, ... The files of one sample sit next to each
# other and share a key: the member path up to the first dot of its file name.
# Everything after that dot is the "extension" ("jpg", "txt", "recap.txt").
# =============================================================================

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "text", "TEXT", "prompt")
RECAPTION_EXTS = ("recap.txt", "recap_txt", "recaption.txt")
RECAPTION_FIELDS = ("recaption", "recap_caption", "recap_txt", "molmo_caption")
AESTHETIC_EXTS = ("aesthetic", "score", "aes_score", "aesthetic.txt")
AESTHETIC_FIELDS = ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic", "aes_score")
# The score of a sample without one: NaN marks it unknown, so that the trainer can
# apply its own configured default (and pretokenize stores it as null, not a guess).
MISSING_AESTHETIC = float("nan")

# The reasons a sample (or a whole shard) can be skipped; counted per reason.
# "filtered_*" are the paper's data filters doing their job, not errors: they are
# counted but logged only at DEBUG level.
SKIP_REASONS = (
    "unreadable_shard",  # missing file, not a tar, unreadable from the first byte
    "truncated_member",  # the tar ends (or breaks) inside a member; the rest of that shard is lost
    "unreadable_file",  # image folder: a file that cannot be read
    "missing_image",  # a sample with no .jpg/.jpeg/.png/.webp member
    "corrupt_image",  # image bytes that do not decode (garbage, truncated)
    "missing_caption",  # no .txt and no caption field in the .json
    "bad_json",  # a .json member that does not parse (the sample may still have a .txt caption)
    "bad_aesthetic",  # an aesthetic score that is not a number (the default is used)
    "bad_tokens",  # pretokenized: token arrays missing or unreadable
    "filtered_resolution",  # longer side < min_longer_side
    "filtered_aspect",  # aspect ratio >= max_aspect_ratio
    "filtered_aesthetic",  # aesthetic score < min_aesthetic
)


class SkipCounter:
    """How many samples were skipped, per reason, summed over all DataLoader workers.

    The counts live in a small shared-memory tensor with one row per process (row 0:
    the main process; row 1 + i: DataLoader worker i), so each process only writes
    its own row (no lock needed) and the trainer reads the sum in the main process:
        dataset.skipped.counts()   -> {"corrupt_image": 2, ...}  (all reasons)
        dataset.skipped.summary()  -> "corrupt_image=2 missing_caption=1"
    The first few skips of each reason in each process are logged with a warning."""

    ROWS = 257
    LOG_FIRST = 5

    def __init__(self):
        self._table = torch.zeros(self.ROWS, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        self._logged = {}

    def add(self, reason, detail=""):
        info = get_worker_info()
        row = 0 if info is None else 1 + min(info.id, self.ROWS - 2)
        self._table[row, SKIP_REASONS.index(reason)] += 1
        n = self._logged[reason] = self._logged.get(reason, 0) + 1
        level = logging.DEBUG if reason.startswith("filtered_") else logging.WARNING
        if n <= self.LOG_FIRST:
            log.log(level, "data: skipped (%s) %s", reason, detail)
        elif n == self.LOG_FIRST + 1:
            log.log(level, "data: further '%s' skips in this process are counted, not logged", reason)

    def counts(self):
        return dict(zip(SKIP_REASONS, self._table.sum(0).tolist()))

    def total(self, include_filtered=True):
        return sum(v for k, v in self.counts().items() if include_filtered or not k.startswith("filtered_"))

    def summary(self):
        parts = [f"{k}={v}" for k, v in self.counts().items() if v]
        return " ".join(parts) if parts else "none"


def expand_braces(pattern):
    """Expand shell-style braces: "s/{000..002}.tar" -> ["s/000.tar", "s/001.tar", "s/002.tar"];
    "{a,b}-{1..2}" -> ["a-1", "a-2", "b-1", "b-2"]. Zero-padded bounds keep their width;
    groups may nest; a brace group with neither ".." nor "," stays literal."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in pattern {pattern!r}; every '}}' needs an opening '{{'")
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced '{{' in pattern {pattern!r}; close it with '}}'")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if m:
        a, b = m.groups()
        padded = (len(a) > 1 and a.startswith("0")) or (len(b) > 1 and b.startswith("0"))
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        # Split the body at its top-level commas only.
        options, depth, last = [], 0, 0
        for i, ch in enumerate(body):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                options.append(body[last:i])
                last = i + 1
        options.append(body[last:])
        if len(options) == 1:  # "{abc}": not a brace expression, keep it literally
            return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
        options = [x for opt in options for x in expand_braces(opt)]
    return [head + opt + rest for opt in options for rest in expand_braces(tail)]


def list_shards(spec, exts=(".tar", ".tar.gz", ".tgz")):
    """Shard paths from a spec: a brace pattern, a glob, a directory (its tar files),
    several of those joined by "::", or a list of them. Names that do not exist are
    kept (the reader counts them as unreadable shards); a spec matching no existing
    file at all raises."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in list_shards(s, exts)]
    out = []
    for part in str(spec).split("::"):
        if re.match(r"^[a-z0-9+]+:(//)?", part) and not os.path.exists(part):
            raise ValueError(f"{part!r} looks like a URL or a pipe; only local shard files are supported, "
                             f"download them first (e.g. with img2dataset)")  # fmt: skip
        if os.path.isdir(part):
            names = sorted(p for p in glob.glob(os.path.join(part, "*")) if p.endswith(exts))
            if not names:
                raise FileNotFoundError(
                    f"directory {part!r} holds no shard files ({', '.join(exts)}); pass a directory of "
                    f"tar shards or a pattern like 'dir/{{000000..000099}}.tar'"
                )
            out += names
            continue
        names = []
        for name in expand_braces(part):
            names += sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
        existing = [n for n in names if os.path.isfile(n)]
        if not existing:
            example = f" (it expands to {len(names)} name(s), e.g. {names[0]!r})" if names else ""
            raise FileNotFoundError(f"shard pattern {part!r} matched no files{example}; "
                                    f"check the directory and the brace range")  # fmt: skip
        if len(existing) < len(names):
            missing = [n for n in names if n not in set(existing)]
            log.warning("data: %d of %d shards of %r do not exist (e.g. %s); they will be skipped and counted",
                        len(missing), len(names), part, missing[0])  # fmt: skip
        out += names
    return out


def split_key(name):
    """Tar member name -> (key, extension): "a/b/000001.recap.txt" -> ("a/b/000001", "recap.txt")."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or stem.startswith("__"):
        return None, None  # no extension, a hidden "._x" file, or a "__meta__" member
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_groups(path, skipped=None):
    """Yield one dict per sample from a tar shard, in file order:
        {"__key__": key, "__shard__": path, "<ext>": bytes, ...}
    A shard that cannot be opened counts "unreadable_shard"; a tar that ends or breaks
    inside a member counts "truncated_member" and drops the sample being read (the
    samples before it are kept; nothing after it can be trusted). `skipped` is a
    SkipCounter, or None to count nothing."""
    count = skipped.add if skipped is not None else (lambda reason, detail="": None)
    try:
        # "r|*": a forward-only stream (gzip detected automatically). Shards are read
        # once, front to back, so this is all we need and it never seeks.
        stream = tarfile.open(path, mode="r|*")
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        count("unreadable_shard", f"{path}: {type(e).__name__}: {e}")
        return
    group = None
    try:
        with stream:
            for member in stream:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if key is None:
                    continue
                data = stream.extractfile(member).read()
                if group is not None and key != group["__key__"]:
                    yield group
                    group = None
                if group is None:
                    group = {"__key__": key, "__shard__": path}
                group[ext] = data
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        where = f" in sample {group['__key__']!r}" if group else ""
        count("truncated_member", f"{path}{where}: {type(e).__name__}: {e}; the rest of this shard is skipped")
        return
    if group is not None:
        yield group


def shuffle_buffer(items, size, rng):
    """Approximate shuffle of a stream: keep `size` items, emit a random one for each new one."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def _batches_before(start_batch, worker, num_workers):
    """How many of batches [0, start_batch) the given (logical) worker made."""
    return max(0, (start_batch - worker + num_workers - 1) // num_workers)


class _StreamDataset(IterableDataset):
    """The part every stream-read dataset shares: splitting over ranks and workers,
    epochs, the shuffle buffer, exact resume, and skip counting.

    Splitting. The readers ("slots") are the world_size x num_workers DataLoader
    workers. A subclass yields the raw samples of one epoch for one slot; epochs
    repeat forever when infinite=True, each in a new seeded order.

    Exact resume. DataLoader worker j of a run that starts at batch s makes batches
    s + j, s + j + W, ... So it plays the part of "logical worker" (s + j) % W of the
    first run, whose stream it regenerates from the seed and fast-forwards past the
    batches that worker already made. The resumed run then sees exactly the samples
    the uninterrupted run would have, provided world_size, num_workers, batch_size
    and seed are unchanged. Fast-forwarding decodes the skipped samples cheaply (to
    know which ones were valid), so it costs time proportional to the position.
    """

    def __init__(self, *, shuffle=True, shuffle_buffer=1000, seed=0, infinite=True,
                 rank=None, world_size=None, batch_size=None, start_batch=0):  # fmt: skip
        super().__init__()
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if start_batch and not batch_size:
            raise ValueError("resuming with start_batch needs batch_size (the DataLoader's per-rank batch size)")
        self.shuffle, self.buffer_size, self.seed, self.infinite = shuffle, int(shuffle_buffer), int(seed), infinite
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.batch_size, self.start_batch = int(batch_size or 1), int(start_batch)
        self.skipped = SkipCounter()
        self.max_consecutive_skips = 10_000  # infinite streams: give up (with the counts) after this many

    # --- subclass hooks ---
    def _epoch_groups(self, epoch, slot, n_slots):
        """Raw samples (dicts of bytes) of one epoch that belong to this slot."""
        raise NotImplementedError

    def _decode(self, group, check_only=False):
        """Raw sample -> training dict, or None when skipped. check_only: validate
        cheaply for fast-forwarding and count nothing."""
        raise NotImplementedError

    def _reject(self, reason, detail, check_only):
        if not check_only:
            self.skipped.add(reason, detail)
        return None

    # --- the shared machinery ---
    def _epochs(self, slot, n_slots):
        epoch = 0
        while True:
            n = 0
            for group in self._epoch_groups(epoch, slot, n_slots):
                group["__epoch__"] = epoch
                n += 1
                yield group
            if not self.infinite:
                return
            if n == 0:
                raise RuntimeError(
                    f"{type(self).__name__}: reader {slot} of {n_slots} (rank x DataLoader worker) got no "
                    f"readable sample in a whole pass (skips so far: {self.skipped.summary()}). "
                    f"Check the data path, or use fewer DataLoader workers than there are samples."
                )
            epoch += 1

    def __iter__(self):
        worker, num_workers = _worker()
        logical = (self.start_batch + worker) % num_workers
        slot, n_slots = self.rank * num_workers + logical, self.world_size * num_workers
        to_skip = _batches_before(self.start_batch, logical, num_workers) * self.batch_size
        groups = self._epochs(slot, n_slots)
        if self.shuffle and self.buffer_size > 1:
            groups = shuffle_buffer(groups, self.buffer_size, np.random.default_rng([self.seed, 1, slot, n_slots]))
        produced = failures = seen = 0
        for group in groups:
            seen += 1
            fast_forward = produced < to_skip
            sample = self._decode(group, check_only=fast_forward)
            if sample is None:
                failures += 1
                if self.infinite and failures >= self.max_consecutive_skips:
                    raise RuntimeError(
                        f"{type(self).__name__}: {failures} samples in a row were skipped "
                        f"({self.skipped.summary()}); check the filters (min_longer_side, "
                        f"max_aspect_ratio, min_aesthetic) and the shard contents"
                    )
                continue
            failures = 0
            produced += 1
            if not fast_forward:
                yield sample
        if produced == 0 and seen:
            log.warning("data: %s yielded none of its samples in reader %d of %d; skipped: %s (for small images, lower "
                        "min_longer_side)", type(self).__name__, slot, n_slots, self.skipped.summary())  # fmt: skip


def _text(data):
    """Member bytes -> stripped utf-8 text ("" when absent or undecodable)."""
    if data is None:
        return ""
    return data.decode("utf-8", errors="replace").strip()


def _field(meta, names):
    for name in names:
        value = meta.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


RECAPTION_PREFIXES = tuple(f"The image {verb}" for verb in ("depicts", "displays", "showcases", "features", "shows"))


def strip_recaption_prefix(text):
    """Remove Molmo's stock opening ("The image depicts ...") and capitalise what is
    left: App. A filters these prefixes so that they do not leak into training."""
    text = text.strip()
    for prefix in RECAPTION_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
            return text[:1].upper() + text[1:]
    return text


def pick_captions(captions, recaptions, p_recaption=0.95, generator=None):
    """Per sample, the recaption with probability p_recaption (where there is one),
    else the original caption: the 95:5 mix of App. A. `generator` is a
    torch.Generator, so the trainer can checkpoint the choice's RNG state."""
    draws = torch.rand(len(captions), generator=generator).tolist()
    return [r if (r and u < p_recaption) else c for c, r, u in zip(captions, recaptions, draws)]


def collate(samples):
    """Batch a list of sample dicts: tensors are stacked ((B, ...)), numbers become a
    tensor (B,), anything else (captions, keys, None) stays a list of length B."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def _metadata(group, check_only, reject):
    """(caption, recaption, aesthetic or None) from .txt / .json / score members.
    Returns None when the sample has no caption."""
    meta = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            reject("bad_json", f"{e}", check_only)
            meta = {}
    caption = _text(group.get("txt")) or _field(meta, CAPTION_FIELDS)
    if not caption:
        return None
    recap_ext = next((e for e in RECAPTION_EXTS if e in group), None)
    recaption = _text(group[recap_ext]) if recap_ext else _field(meta, RECAPTION_FIELDS)
    # The aesthetic score: a json field, else a small text member.
    raw = next((meta[k] for k in AESTHETIC_FIELDS if meta.get(k) is not None), None)
    if raw is None:
        ext = next((e for e in AESTHETIC_EXTS if e in group), None)
        raw = _text(group[ext]) if ext else None
    aesthetic = None
    if raw is not None:
        try:
            aesthetic = float(raw)
            if not math.isfinite(aesthetic):
                raise ValueError("not finite")
        except (TypeError, ValueError):
            reject("bad_aesthetic", f"aesthetic score {raw!r} is not a number; using the default", check_only)
            aesthetic = None
    return caption, strip_recaption_prefix(recaption), aesthetic


def _to_rgb(image):
    """Any PIL mode -> RGB; transparent pixels become white, not black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


class ImageTransform:
    """Resize the shorter edge to `resize` (default: size), crop size x size (random or
    centre), flip left-right with probability 1/2 -> FloatTensor (3, size, size) in [0,1].
    The paper's recipe: shorter edge 256, random crop 256, random flip (App. A / Tab. 8)."""

    def __init__(self, size=256, resize=None, random_crop=True, random_flip=True):
        self.size, self.resize = int(size), int(resize or size)
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be >= the crop size ({self.size})")
        self.random_crop, self.random_flip = random_crop, random_flip

    def __call__(self, image, rng):
        """image: PIL; rng: np.random.Generator (drives the crop and the flip)."""
        image = _to_rgb(image)
        w, h = image.size
        scale = self.resize / min(w, h)
        new_w, new_h = max(self.resize, round(w * scale)), max(self.resize, round(h * scale))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BICUBIC)  # PIL antialiases when shrinking
        if self.random_crop:
            left, top = int(rng.integers(0, new_w - self.size + 1)), int(rng.integers(0, new_h - self.size + 1))
        else:
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _image_to_tensor(np.array(image, dtype=np.uint8))  # (3, size, size); np.array: a writable copy


class _ImageStream(_StreamDataset):
    """Decoding, filtering and transforming image samples (shared by tar shards and
    image folders).

    image_size:        the crop size S of the output (3, S, S)
    resize:            shorter edge before cropping (default S)
    random_crop, random_flip: training augmentation (off for evaluation / pretokenizing)
    min_longer_side:   keep images whose longer side is >= this (default S: 256 in the paper)
    max_aspect_ratio:  keep images with long/short < this (paper: 2); None disables
    min_aesthetic:     keep samples scoring >= this (paper: 5.0 pre-training, 6.0
                       fine-tuning); samples without a score are kept
    default_aesthetic: the score given to samples without one (default NaN = unknown)
    """

    def __init__(self, image_size=256, *, resize=None, random_crop=True, random_flip=True, min_longer_side=None,
                 max_aspect_ratio=2.0, min_aesthetic=None, default_aesthetic=MISSING_AESTHETIC, **stream):  # fmt: skip
        super().__init__(**stream)
        self.transform = ImageTransform(image_size, resize, random_crop, random_flip)
        self.image_size = int(image_size)
        self.min_longer_side = self.image_size if min_longer_side is None else int(min_longer_side)
        self.max_aspect_ratio, self.min_aesthetic = max_aspect_ratio, min_aesthetic
        self.default_aesthetic = float(default_aesthetic)

    def _decode(self, group, check_only=False):
        where = f"{os.path.basename(group['__shard__'])}:{group['__key__']}"
        image_ext = next((e for e in IMAGE_EXTS if e in group), None)
        if image_ext is None:
            return self._reject("missing_image", f"{where} has no {'/'.join(IMAGE_EXTS)} member", check_only)
        meta = _metadata(group, check_only, lambda r, d, c: self._reject(r, f"{where}: {d}", c))
        if meta is None:
            return self._reject("missing_caption", f"{where} has no .txt and no caption in its .json", check_only)
        caption, recaption, aesthetic = meta
        if aesthetic is None:
            aesthetic = self.default_aesthetic
        elif self.min_aesthetic is not None and aesthetic < self.min_aesthetic:
            return self._reject("filtered_aesthetic", f"{where}: {aesthetic:.2f} < {self.min_aesthetic}", check_only)
        # Decoding catches every exception: image decoders raise OSError, SyntaxError,
        # ValueError, struct.error, DecompressionBombError, ... on bad bytes.
        try:
            image = Image.open(io.BytesIO(group[image_ext]))  # reads the header only
            w, h = image.size
        except Exception as e:
            return self._reject("corrupt_image", f"{where}: {type(e).__name__}: {e}", check_only)
        # The paper's resolution filter, on the header size before any pixel is decoded.
        if max(w, h) < self.min_longer_side:
            return self._reject("filtered_resolution", f"{where}: {w}x{h}", check_only)
        if self.max_aspect_ratio is not None and max(w, h) / max(1, min(w, h)) >= self.max_aspect_ratio:
            return self._reject("filtered_aspect", f"{where}: {w}x{h}", check_only)
        try:
            if check_only:  # JPEG: decode at 1/8 scale, which still reads (and checks) every byte
                image.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            image.load()  # truncated files fail here
        except Exception as e:
            return self._reject("corrupt_image", f"{where}: {type(e).__name__}: {e}", check_only)
        if check_only:
            return True
        # The crop and flip come from a generator keyed by the sample and the epoch,
        # so they do not depend on which worker decodes the sample.
        name = f"{os.path.basename(group['__shard__'])}/{group['__key__']}".encode()
        rng = np.random.default_rng([self.seed, 3, group["__epoch__"], zlib.crc32(name)])
        return {"image": self.transform(image, rng), "caption": caption, "recaption": recaption,
                "aesthetic": torch.tensor(aesthetic, dtype=torch.float32), "key": where}  # fmt: skip


def _tar_epoch(dataset, shards, epoch, slot, n_slots):
    """One epoch of raw samples for one reader slot (used by the tar-based datasets).

    With at least as many shards as readers, whole shards are dealt out (each shard is
    read by one reader only). With fewer, every reader reads every shard and keeps
    every n_slots-th sample, and only reader 0 counts shard-level problems, so that
    nothing is counted twice."""
    order = np.arange(len(shards))
    if dataset.shuffle:  # the same order on every rank and worker: it depends on (seed, epoch) only
        order = np.random.default_rng([dataset.seed, 2, epoch]).permutation(len(shards))
    if len(shards) >= n_slots:
        for i in order[slot::n_slots]:
            yield from iter_tar_groups(shards[i], dataset.skipped)
        return
    seen = 0
    for i in order:
        for group in iter_tar_groups(shards[i], dataset.skipped if slot == 0 else None):
            if seen % n_slots == slot:
                yield group
            seen += 1


class TarShardDataset(_ImageStream):
    """Image-caption samples from WebDataset-format tar shards.

        ds = TarShardDataset("data/{000000..000099}.tar", image_size=256, seed=0)
        loader = DataLoader(ds, batch_size=32, num_workers=8)
        ... ds.skipped.summary()  # log it

    A sample needs an image (.jpg/.jpeg/.png/.webp) and a caption (.txt, or the
    "caption" field of its .json). Optional: a recaption (.recap.txt or a json field
    such as "recaption") and an aesthetic score (json "aesthetic_score" /
    "AESTHETIC_SCORE" / "aesthetic", or an .aesthetic / .score member).
    Keyword arguments: see _ImageStream (image options) and _StreamDataset (split,
    shuffle, resume). Defaults are for training: infinite, shuffled, augmented.
    Batch with the default collate or `collate` below.
    """

    def __init__(self, shards, image_size=256, **kwargs):
        self.shards = list_shards(shards)
        super().__init__(image_size, **kwargs)

    def _epoch_groups(self, epoch, slot, n_slots):
        return _tar_epoch(self, self.shards, epoch, slot, n_slots)


# =============================================================================
# 3. Image folders: photo.jpg next to photo.txt (its caption)
# =============================================================================


class ImageFolderDataset(_ImageStream):
    """Images anywhere under `root` with a same-stem caption file: a/b/cat.jpg + a/b/cat.txt.
    Optional same-stem side files: cat.json (caption / recaption / aesthetic fields as in
    the tar shards) and cat.recap.txt. Same options and skip rules as TarShardDataset;
    each epoch is a full random permutation (no shuffle buffer needed)."""

    def __init__(self, root, image_size=256, **kwargs):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist; pass a directory of images + .txt captions")
        self.root = root
        self.files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(root) for f in names
            if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in f
        )  # fmt: skip
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {root!r}; "
                                    f"put images with same-name .txt captions there")  # fmt: skip
        kwargs["shuffle_buffer"] = 0
        super().__init__(image_size, **kwargs)

    def _epoch_groups(self, epoch, slot, n_slots):
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.files))
        for position, i in enumerate(order):
            if position % n_slots != slot:
                continue
            path = self.files[i]
            stem, ext = os.path.splitext(path)
            group = {"__key__": os.path.relpath(stem, self.root), "__shard__": self.root}
            try:
                with open(path, "rb") as f:
                    group[ext[1:].lower()] = f.read()
                for side in ("txt", "json", "recap.txt"):
                    if os.path.isfile(f"{stem}.{side}"):
                        with open(f"{stem}.{side}", "rb") as f:
                            group[side] = f.read()
            except OSError as e:
                self.skipped.add("unreadable_file", f"{path}: {e}")
                continue
            yield group


def build_image_dataset(spec, image_size=256, *, train=True, seed=0, rank=None, world_size=None,
                        batch_size=None, start_batch=0, **kwargs):  # fmt: skip
    """One entry point for the trainers' --data:
        "shapes"          the infinite shapes stream (64 px, resized to image_size if different)
        "shapes:N"        shapes samples 0..N-1 (repeated when training)
        a directory       tar shards inside it, else an image folder
        anything else     a tar shard pattern (braces, globs, "::"-joined)
    train=False: one pass, no shuffle, centre crop, no flip (evaluation, pretokenizing).
    Extra keyword arguments go to the image datasets (filters, resize, ...); the
    shapes world takes only category_mix."""
    split = dict(rank=rank, world_size=world_size, batch_size=batch_size, start_batch=start_batch)
    m = re.fullmatch(r"shapes(?::(\d+))?", str(spec))
    if m:
        length = int(m.group(1)) if m.group(1) else None
        if not train and length is None:
            raise ValueError("a single pass over the shapes world needs a size: use 'shapes:N'")
        return ShapesDataset(seed, category_mix=kwargs.get("category_mix"), image_size=image_size,
                             length=length, infinite=train, **split)  # fmt: skip
    kwargs.pop("category_mix", None)
    if not train:
        kwargs = dict(dict(random_crop=False, random_flip=False, shuffle=False), **kwargs)
    kwargs = dict(kwargs, seed=seed, infinite=train, **split)
    if isinstance(spec, str) and os.path.isdir(spec):
        has_tars = any(n.endswith((".tar", ".tar.gz", ".tgz")) for n in os.listdir(spec))
        if not has_tars:
            return ImageFolderDataset(spec, image_size, **kwargs)
    return TarShardDataset(spec, image_size, **kwargs)


def image_text_loader(spec, image_size=256, batch_size=32, *, rank=None, world_size=None, num_workers=0, seed=0,
                      start_batch=0, train=True, **kwargs):  # fmt: skip
    """A DataLoader of image-caption batches from build_image_dataset(spec, ...):
    {"image": (B,3,S,S) in [0,1], "caption": [str], "recaption": [str], "aesthetic": (B,), "key": [str]}.
    start_batch resumes exactly (same world_size / num_workers / batch_size / seed);
    the skip counts are in loader.dataset.skipped."""
    ds = build_image_dataset(spec, image_size, train=train, seed=seed, rank=rank, world_size=world_size,
                             batch_size=batch_size, start_batch=start_batch, **kwargs)  # fmt: skip
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)


# =============================================================================
# 4. Pretokenization for MaskGen
#
# MaskGen never sees pixels: it learns on the frozen tokenizer's tokens. Encoding
# every image once (instead of every step) makes its training far cheaper. The
# output is again tar shards, one sample per image:
#     <key>.tokens.npy     VQ ids, int16 (int32 for codebooks over 32768 entries), shape (K,)
#  or <key>.mean.npy       KL posterior mean, float32 (K, C)
#     <key>.logvar.npy     KL posterior log-variance, float32 (K, C)
#     <key>.txt            the caption
#     <key>.json           {"caption", "recaption", "aesthetic" (null if unknown), "source"}
# plus meta.json in the output folder describing the tokenizer.
#
# VQ ids are stored as integers in .npy files, whose header records the dtype:
# float16 has an 11-bit significand, so it cannot hold every integer above 2048
# (2049 reads back as 2048, 8191 as 8192). The official loader decodes its tokens
# as float16, which silently corrupts ids of an 8192-entry codebook; here the
# reader refuses any non-integer token array instead.
# =============================================================================


def encode_npy(array):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


def token_dtype(codebook_size):
    """The smallest integer dtype that holds every id of the codebook."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


class ShardWriter:
    """Write samples into tar shards of at most `per_shard` samples each:
    out_dir/<prefix>-000000.tar, -000001.tar, ... A shard is written under a .tmp
    name and renamed when complete, so an interrupted run never leaves a
    half-written shard that looks finished.

        with ShardWriter("out", "train", per_shard=1000) as w:
            w.write("000000001", {"png": png_bytes, "txt": "a red circle", "json": {...}})
    Member values: bytes, str (utf-8), dict/list (JSON) or np.ndarray (.npy)."""

    def __init__(self, out_dir, prefix="shard", per_shard=1000):
        if per_shard < 1:
            raise ValueError(f"per_shard must be >= 1, got {per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, int(per_shard)
        self.paths, self.count = [], 0
        self._tar = self._tmp = None

    def _member_bytes(self, value):
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, np.ndarray):
            return encode_npy(value)
        if isinstance(value, (dict, list)):
            return json.dumps(value).encode("utf-8")
        raise TypeError(f"cannot store a {type(value).__name__} in a tar shard; pass bytes, str, dict or np.ndarray")

    def write(self, key, members):
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/' (the key ends at the first dot)")
        if self._tar is None:
            name = f"{self.prefix}-{len(self.paths):06d}.tar"
            self._final = os.path.join(self.out_dir, name)
            self._tmp = self._final + ".tmp"
            self._tar = tarfile.open(self._tmp, "w")
        for ext, value in members.items():
            data = self._member_bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: byte-identical reruns
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.count % self.per_shard == 0:
            self._finish_shard()

    def _finish_shard(self):
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self._final)
            self.paths.append(self._final)
            self._tar = None

    def close(self):
        self._finish_shard()
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # an error: leave the partial shard as .tmp
            self._tar.close()
            self._tar = None


def pretokenized_members(caption, recaption="", aesthetic=None, source="", tokens=None, mean=None, logvar=None,
                         dtype=np.int16):  # fmt: skip
    """The tar members of one pretokenized sample (VQ: tokens (K,); KL: mean and logvar (K, C))."""
    if (tokens is None) == (mean is None or logvar is None):
        raise ValueError("pass either VQ tokens, or a KL mean and logvar")
    members = {}
    if tokens is not None:
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"VQ tokens must be integers, got {tokens.dtype}")
        if tokens.size and (tokens.min() < np.iinfo(dtype).min or tokens.max() > np.iinfo(dtype).max):
            raise ValueError(f"token ids in [{tokens.min()}, {tokens.max()}] do not fit {np.dtype(dtype)}; "
                             f"use token_dtype(codebook_size)")  # fmt: skip
        members["tokens.npy"] = tokens.astype(dtype)
    else:
        members["mean.npy"] = np.asarray(mean, dtype=np.float32)
        members["logvar.npy"] = np.asarray(logvar, dtype=np.float32)
    members["txt"] = caption
    aes = None if aesthetic is None or not math.isfinite(float(aesthetic)) else float(aesthetic)
    members["json"] = {"caption": caption, "recaption": recaption, "aesthetic": aes, "source": source}
    return members


@torch.no_grad()
def pretokenize(tokenizer, dataset, out_dir, *, batch_size=64, per_shard=5000, num_workers=0, rank=0,
                max_samples=None, prefix=None, progress=False):  # fmt: skip
    """Encode every image of `dataset` (already split for this rank) with the frozen
    tokenizer and write this rank's shards: <out_dir>/<prefix>-NNNNNN.tar (default
    prefix "pretok-rank<rank>"). The tokenizer follows tokenizer.TATiTok's API.
    Returns {"samples": n, "shards": [paths]}."""
    cfg = tokenizer.config
    mode = cfg.quantize_mode
    if mode not in ("vq", "kl"):
        raise ValueError(f"tokenizer quantize_mode must be 'vq' or 'kl', got {mode!r}")
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    dtype = token_dtype(getattr(cfg, "codebook_size", 8192))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=f"pretokenize rank {rank}", unit="batch")
    n = 0
    with ShardWriter(out_dir, prefix or f"pretok-rank{rank:03d}", per_shard) as writer:
        for batch in loader:
            images = batch["image"].to(device)  # (B, 3, S, S) in [0, 1]
            if mode == "vq":
                ids = tokenizer.encode(images).cpu().numpy()  # (B, K) int64
                arrays = [dict(tokens=row) for row in ids]
            else:
                post = tokenizer.encode(images, return_posterior=True)
                mean, logvar = post.mean.float().cpu().numpy(), post.logvar.float().cpu().numpy()  # (B, K, C) each
                arrays = [dict(mean=m, logvar=v) for m, v in zip(mean, logvar)]
            for i, arr in enumerate(arrays):
                if max_samples is not None and n >= max_samples:
                    break
                members = pretokenized_members(
                    batch["caption"][i], batch["recaption"][i], float(batch["aesthetic"][i]), batch["key"][i],
                    dtype=dtype, **arr,
                )  # fmt: skip
                writer.write(f"r{rank:03d}_{n:09d}", members)
                n += 1
            if max_samples is not None and n >= max_samples:
                break
    if n == 0:
        log.warning("data: rank %d wrote no pretokenized samples (skips: %s)", rank, dataset.skipped.summary())
    return {"samples": n, "shards": writer.paths, "skipped": dataset.skipped.counts()}


def tokenizer_meta(tokenizer):
    """What a MaskGen trainer needs to know about the tokens (written to meta.json)."""
    cfg = tokenizer.config
    meta = {"quantize_mode": cfg.quantize_mode, "num_tokens": cfg.num_latent_tokens,
            "token_size": cfg.token_size, "image_size": cfg.image_size}  # fmt: skip
    if cfg.quantize_mode == "vq":
        meta.update(codebook_size=cfg.codebook_size, token_dtype=str(token_dtype(cfg.codebook_size)))
    return meta


def read_pretokenized_meta(path):
    """meta.json of a pretokenized folder (or of the folder holding a shard pattern), or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(expand_braces(str(path).split("::")[0])[0])
    meta_file = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_file):
        return None
    with open(meta_file) as f:
        return json.load(f)


class TokenDtypeError(TypeError):
    """Pretokenized VQ ids stored in a non-integer dtype (e.g. the official float16)."""


class PretokenizedDataset(_StreamDataset):
    """Reads the shards `pretokenize` writes, for train_maskgen.py. Yields
        VQ: {"tokens": LongTensor (K,), ...}
        KL: {"posterior": FloatTensor (K, 2C) = cat(mean, logvar), ...}
    plus "caption", "recaption" ("" if none), "aesthetic" FloatTensor () and "key".
    `shards`: a folder of shards, a brace pattern, a glob or a list. Split, shuffle
    and resume options as in _StreamDataset; missing aesthetic scores get
    default_aesthetic (NaN, "unknown", unless given)."""

    def __init__(self, shards, *, default_aesthetic=MISSING_AESTHETIC, **stream):
        self.shards = list_shards(shards)
        self.default_aesthetic = float(default_aesthetic)
        super().__init__(**stream)

    def _epoch_groups(self, epoch, slot, n_slots):
        return _tar_epoch(self, self.shards, epoch, slot, n_slots)

    def _decode(self, group, check_only=False):
        where = f"{os.path.basename(group['__shard__'])}:{group['__key__']}"
        out = {}
        try:
            if "tokens.npy" in group:
                tokens = decode_npy(group["tokens.npy"])
                if tokens.dtype.kind not in "iu":
                    # Not a skip: the whole dataset would be silently wrong.
                    raise TokenDtypeError(
                        f"{where}: VQ tokens are stored as {tokens.dtype}, not integers; float16 cannot hold "
                        f"ids above 2048 exactly. Re-create the shards with `python data.py pretokenize`."
                    )
                if tokens.ndim != 1:
                    raise ValueError(f"expected tokens of shape (K,), got {tokens.shape}")
                out["tokens"] = torch.from_numpy(tokens.astype(np.int64))  # (K,)
            elif "mean.npy" in group and "logvar.npy" in group:
                mean, logvar = decode_npy(group["mean.npy"]), decode_npy(group["logvar.npy"])
                if mean.shape != logvar.shape or mean.ndim != 2:
                    raise ValueError(f"mean {mean.shape} and logvar {logvar.shape} must both be (K, C)")
                out["posterior"] = torch.from_numpy(np.concatenate([mean, logvar], -1).astype(np.float32))  # (K, 2C)
            else:
                return self._reject("bad_tokens", f"{where} has neither tokens.npy nor mean.npy + logvar.npy",
                                    check_only)  # fmt: skip
        except TokenDtypeError:
            raise
        except Exception as e:
            return self._reject("bad_tokens", f"{where}: {type(e).__name__}: {e}", check_only)
        meta = _metadata(group, check_only, lambda r, d, c: self._reject(r, f"{where}: {d}", c))
        if meta is None:
            return self._reject("missing_caption", f"{where} has no caption", check_only)
        caption, recaption, aesthetic = meta
        aesthetic = self.default_aesthetic if aesthetic is None else aesthetic
        out.update(caption=caption, recaption=recaption, aesthetic=torch.tensor(aesthetic, dtype=torch.float32),
                   key=where)  # fmt: skip
        return out


def load_frozen_tokenizer(path, device="cpu"):
    """A frozen TA-TiTok: an official release directory or one of our train_tokenizer.py
    runs (tokenizer.load_tokenizer does the loading; the text encoder is not needed here)."""
    import tokenizer as tk  # imported here so that data.py works without it (shapes, shards)

    tok, _ = tk.load_tokenizer(path, device, with_text=False)
    return tok.eval().requires_grad_(False)


# =============================================================================
# 5. Shapes shards and the command line
# =============================================================================


def make_shapes_shards(out_dir, n, per_shard=1000, seed=0, category_mix=None, prefix="shapes"):
    """Write shapes samples 0..n-1 as WebDataset tars: <key>.png (lossless, so the
    palette colours stay exact), <key>.txt and <key>.json (caption, category,
    aesthetic_score, objects). Returns the shard paths."""
    world = ShapesWorld(seed, category_mix)
    with ShardWriter(out_dir, prefix, per_shard) as writer:
        for index in range(n):
            s = world.sample(index)
            png = io.BytesIO()
            Image.fromarray(s.image).save(png, format="PNG")
            objects = [dict(color=o.color, shape=o.shape, cx=o.cx, cy=o.cy, size=o.size) for o in s.objects]
            meta = {"caption": s.caption, "category": s.category, "aesthetic_score": s.aesthetic,
                    "objects": objects, "seed": seed, "index": index}  # fmt: skip
            writer.write(f"{index:09d}", {"png": png.getvalue(), "txt": s.caption, "json": meta})
    return writer.paths


def _cmd_make_shapes(args):
    paths = make_shapes_shards(args.out, args.n, args.per_shard, args.seed)
    print(f"wrote {args.n} shapes samples in {len(paths)} shard(s) to {args.out}/")


def _cmd_inspect(args):
    ds = build_image_dataset(args.data, args.image_size, train=False, min_longer_side=args.min_longer_side)
    n = 0
    for sample in ds:
        if n < args.show:
            print(f"{sample['key']}: {tuple(sample['image'].shape)} aesthetic={float(sample['aesthetic']):.2f} "
                  f"caption={sample['caption'][:80]!r}")  # fmt: skip
        n += 1
    print(f"{n} usable samples; skipped: {ds.skipped.summary()}")


def _cmd_pretokenize(args):
    # Under torchrun every rank encodes its share of the data and writes its own
    # shards; rank 0 adds meta.json once the counts are summed.
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL picks each rank's GPU from the current device
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = resolve_rank()
    tok = load_frozen_tokenizer(args.tokenizer, device)
    size = tok.config.image_size
    ds = build_image_dataset(args.data, size, train=False, rank=rank, world_size=world_size,
                             min_longer_side=args.min_longer_side)  # fmt: skip
    result = pretokenize(tok, ds, args.out, batch_size=args.batch_size, per_shard=args.per_shard,
                         num_workers=args.num_workers, rank=rank, max_samples=args.max_samples,
                         progress=rank == 0)  # fmt: skip
    total = result["samples"]
    summed = torch.tensor([result["skipped"][r] for r in SKIP_REASONS] + [total], dtype=torch.int64, device=device)
    if distributed:
        torch.distributed.all_reduce(summed)  # also the last sync point: every rank's shards are written
        # gloo's worker thread drops its own reference to `summed` a moment after the call
        # returns. If Python let go of it first and this process were already exiting, that
        # late release would need the interpreter and abort the process ("terminate called
        # without an active exception", seen on a loaded CPU), so hold it until then.
        deadline = time.monotonic() + 10.0
        while summed._use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    counts = summed.cpu()
    total = int(counts[-1])
    if rank == 0:
        meta = dict(tokenizer_meta(tok), tokenizer=os.path.abspath(args.tokenizer), data=str(args.data),
                    num_samples=total, skipped={r: int(v) for r, v in zip(SKIP_REASONS, counts[:-1]) if v})  # fmt: skip
        with open(os.path.join(args.out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        print(f"pretokenized {total} samples ({tok.config.quantize_mode}) into {args.out}/ "
              f"on {world_size} rank(s); skipped: {meta['skipped'] or 'none'}")  # fmt: skip
    if distributed:
        torch.distributed.destroy_process_group()  # no barrier: it would hold on to `summed` again


def main(argv=None):
    parser = argparse.ArgumentParser(description="Data tools: shapes shards, inspection, MaskGen pretokenization.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-shapes", help="write shapes-world samples as WebDataset tar shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=10000, help="number of samples")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_shapes)

    p = sub.add_parser("inspect", help="read a dataset once; print a few samples and the skip counts")
    p.add_argument("--data", required=True, help="tar pattern, folder, or 'shapes:N'")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--min-longer-side", type=int, default=None, help="resolution filter (default: image size)")
    p.add_argument("--show", type=int, default=5)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("pretokenize", help="encode a dataset with a frozen TA-TiTok into token shards (torchrun-able)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="tar pattern, folder, or 'shapes:N'")
    p.add_argument("--out", required=True, help="output folder for the token shards and meta.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=5000)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--max-samples", type=int, default=None, help="per rank")
    p.add_argument("--min-longer-side", type=int, default=None, help="resolution filter (default: image size)")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else CPU")
    p.set_defaults(func=_cmd_pretokenize)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.func(args)


if __name__ == "__main__":
    main()

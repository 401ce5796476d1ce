"""
Data: pictures and captions into training tensors, MaskGen's pretokenized tokens, and
the data command line.

Paper: §5.1 "Training Data" and App. A (Tab. 7). Web image-text pairs as WebDataset tar shards
(shards.py) or an image folder; a resolution filter (longer side >= 256, aspect ratio < 2) and
an optional aesthetic filter (5.0 pre-training, 6.0 fine-tuning); shorter-edge resize, random
crop and flip (Tab. 8); Molmo recaptions beside the captions for the 95:5 mix; the aesthetic
score as MaskGen's micro-condition; images pretokenized once by the frozen TA-TiTok, since
MaskGen never sees pixels. --data=shapes (shapes.py) takes the same entry point.

Image datasets yield {"image": FloatTensor (3,S,S) in [0,1], "caption": str, "recaption":
str ("" if none), "aesthetic": FloatTensor (), "key": str}; streams also "position":
LongTensor (5,). All split over DDP ranks and DataLoader workers without duplicates, resume
exactly, and count bad inputs in `dataset.skipped`.

    python data.py make-shapes --out shards/shapes --n 10000
    torchrun --nproc_per_node=8 data.py pretokenize --tokenizer <dir> --data "shards/{000000..000099}.tar" --out pretok/
    python data.py inspect --data shards/shapes      # what is there, and what a training filter would drop
"""

import argparse
import collections
import io
import itertools
import json
import logging
import math
import os
import pathlib
import re
import sys
import time
import zlib

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

import shapes
from shards import (
    SHARD_EXTS, SKIP_REASONS, ShardWriter, SkipCounter, StreamDataset, decode_npy, list_shards,
    resolve_rank, sample_name, worker_slot,
)  # fmt: skip

log = logging.getLogger("data")


# ----------------------------------------------------------------------------- 1. Image helpers
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # file extensions, in the order a tar sample's are tried
# The formats Pillow may decode them as (web images are often GIF or TIFF under a .jpg name); never others,
# e.g. EPS, which Pillow hands to Ghostscript: a sample's bytes are untrusted input.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def find_images(root):
    """Every image file under `root` (recursively), sorted: a stable order for sharding."""
    return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                  if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in f)  # fmt: skip


def to_rgb(image):
    """Any PIL mode -> RGB; transparent pixels become white, not black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def to_tensor(image):
    """uint8 (H, W, 3) array or RGB PIL image -> FloatTensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)  # a writable copy


def to_uint8(images):
    """Float images in [0, 1], any shape -> uint8 [0, 255], rounded (the official evaluator
    truncates with .to(uint8), biasing every pixel down by half a level)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


class ImageTransform:
    """Shorter edge to `resize` (default: size), crop size x size (random or centre), flip with
    probability 1/2 -> FloatTensor (3, size, size) in [0,1]: App. A / Tab. 8; unrandomised, evaluation's."""

    def __init__(self, size=256, resize=None, random_crop=True, random_flip=True):
        self.size, self.resize = int(size), int(resize or size)
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be >= the crop size ({self.size})")
        self.random_crop, self.random_flip = random_crop, random_flip

    def __call__(self, image, rng, flip=True):  # image: PIL; rng: np.random.Generator (drives the crop and the flip)
        image = to_rgb(image)
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
        if self.random_flip and rng.random() < 0.5 and flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image)  # (3, size, size)


def load_image(path, size=None):
    """An image file -> FloatTensor (3, S, S) in [0, 1], shorter side resized to `size`
    (bicubic) and centre-cropped (the ImageNet-val protocol); size=None: as it is, (3, H, W)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    with Image.open(path, formats=IMAGE_FORMATS) as image:
        image.load()
    if size is None:
        return to_tensor(to_rgb(image))
    return ImageTransform(size, random_crop=False, random_flip=False)(image, None)


# ----------------------------------------------------------------------------- 2. Image datasets
# The largest image decoded (200 MB of RGB), checked on the header's size before any pixel is
# read; PIL's own DecompressionBombError comes only at 2 x 89M pixels.
MAX_PIXELS = 8192 * 8192


def size_filter(w, h, min_longer_side, max_aspect_ratio):
    """The paper's resolution filter on an image's size: the skip reason, or None to keep it."""
    if max(w, h) < min_longer_side:
        return "filtered_resolution"
    if max_aspect_ratio is not None and max(w, h) / max(1, min(w, h)) >= max_aspect_ratio:
        return "filtered_aspect"
    return None


class _ImageStream(StreamDataset):
    """Decoding, filtering and transforming image samples (tar shards and image folders).
    image_size:        crop size S of the output (3, S, S); None: each image at its own size
    resize:            shorter edge before cropping (default S)
    min_longer_side:   keep images whose longer side is >= this (default S: 256 in the paper)
    max_aspect_ratio:  keep images with long/short < this (paper: 2); None disables
    max_pixels:        skip images whose header says width x height > this, undecoded
    Other options (aesthetic filter, split, shuffle, resume): shards.StreamDataset."""

    def __init__(self, image_size=256, *, resize=None, random_crop=True, random_flip=True, min_longer_side=None,
                 max_aspect_ratio=2.0, max_pixels=MAX_PIXELS, **stream):  # fmt: skip
        super().__init__(**stream)
        self.transform = None if image_size is None else ImageTransform(image_size, resize, random_crop, random_flip)
        self.image_size = None if image_size is None else int(image_size)
        self.min_longer_side = int(min_longer_side if min_longer_side is not None else self.image_size or 0)
        self.max_aspect_ratio, self.max_pixels = max_aspect_ratio, int(max_pixels)

    def _decode(self, group, check_only=False):
        where = sample_name(group)
        image_ext = next((e for e in IMAGE_EXTS if e in group), None)
        if image_ext is None:
            return self._reject("missing_image", f"{where} has no {'/'.join(IMAGE_EXTS)} member", check_only)
        fields = self._text_fields(group, check_only)  # caption, recaption, aesthetic, key
        if fields is None:
            return None
        # Every exception is caught: decoders raise OSError, SyntaxError, struct.error, ... on bad bytes.
        try:
            image = Image.open(io.BytesIO(group[image_ext]), formats=IMAGE_FORMATS)  # reads the header only
            w, h = image.size
            # The pixel limit and the paper's resolution filter, on the header size before any pixel is decoded.
            if w * h > self.max_pixels:
                return self._reject("too_many_pixels", f"{where}: {w}x{h} > max_pixels={self.max_pixels}", check_only)
            reason = size_filter(w, h, self.min_longer_side, self.max_aspect_ratio)
            if reason:
                return self._reject(reason, f"{where}: {w}x{h}", check_only)
            if check_only:  # JPEG: decode at 1/8 scale, which still reads (and checks) every byte
                image.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            image.load()  # truncated files fail here
            if check_only:
                return True
            if self.transform is None:  # image_size=None: the image as it is, (3, H, W)
                return {"image": to_tensor(to_rgb(image)), **fields}
            name = f"{os.path.basename(group['__shard__'])}/{group['__key__']}".encode()  # crop, flip: per sample
            rng = np.random.default_rng([self.seed, 3, group["__epoch__"], zlib.crc32(name)])  # and epoch
            # A mirrored image would contradict a caption that says left or right: those are never flipped.
            sided = re.search(r"\b(left|right)\b", f"{fields['caption']} {fields['recaption']}".lower())
            return {"image": self.transform(image, rng, not sided), **fields}  # a mode that does not convert fails here
        except Image.DecompressionBombError as e:  # PIL's own (higher) limit, raised by the header read
            return self._reject("too_many_pixels", f"{where}: {e}", check_only)
        except Exception as e:
            return self._reject("corrupt_image", f"{where}: {type(e).__name__}: {e}", check_only)


class TarShardDataset(_ImageStream):
    """Image-caption samples from WebDataset tar shards ("data/{000000..000099}.tar"). A sample
    needs an image (IMAGE_EXTS) and a caption (.txt or a .json field); a recaption and an
    aesthetic score are optional. Options: _ImageStream; the defaults are for training."""

    def __init__(self, shards, image_size=256, **kwargs):
        self.shards = list_shards(shards)
        super().__init__(image_size, **kwargs)


class ImageFolderDataset(_ImageStream):
    """Images under `root` with a same-stem caption (a/b/cat.jpg + a/b/cat.txt; optionally cat.json,
    cat.recap.txt); options as TarShardDataset; each epoch a full permutation (no shuffle buffer)."""

    def __init__(self, root, image_size=256, **kwargs):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist; pass a directory of images + .txt captions")
        self.root, self.files = root, find_images(root)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {root!r}; "
                                    f"put images with same-name .txt captions there")  # fmt: skip
        super().__init__(image_size, **dict(kwargs, shuffle_buffer=0))

    def _epoch_groups(self, epoch, slot, n_slots, start=(0, 0, 0)):
        """This slot's files of one epoch from place start[0] of its shuffled order (no byte offset)."""
        order = self._order(len(self.files), epoch)
        for place in range(start[0] + (slot - start[0]) % n_slots, len(order), n_slots):  # this slot's places
            path = self.files[order[place]]
            stem = os.path.splitext(path)[0]
            sides = [f"{stem}.{e}" for e in ("txt", "json", "recap.txt") if os.path.isfile(f"{stem}.{e}")]
            try:  # each member is named by what follows the stem: jpg, txt, recap.txt, ...
                group = {p[len(stem) + 1 :].lower(): pathlib.Path(p).read_bytes() for p in [path, *sides]}
            except OSError as e:
                self.skipped.add("unreadable_file", f"{path}: {e}")
                continue
            yield dict(group, __key__=os.path.relpath(stem, self.root), __shard__=self.root, __next__=(place + 1, 0, 0))


# ----------------------------------------------------------------------------- 3. The shapes world
class ShapesDataset(IterableDataset):
    """Shapes samples (shapes.ShapesWorld) as training dicts: {"image": (3,S,S) in [0,1], "caption",
    "recaption": "", "aesthetic", "key", "index", "category"}. Batch b of rank r (B = per-rank
    batch_size) holds indices (b * world_size + r) * B + [0, B), whatever the number of workers;
    resume after n batches with start_batch=n. length N: indices [0, N) only (repeated if infinite)."""

    def __init__(self, seed=0, *, category_mix=None, image_size=shapes.IMAGE_SIZE, length=None, infinite=True,
                 rank=None, world_size=None, batch_size=None, start_batch=0):
        super().__init__()
        if not infinite and length is None:
            raise ValueError("a finite ShapesDataset needs a length: pass length=N (or 'shapes:N' as a data spec)")
        self.world = shapes.ShapesWorld(seed, category_mix)
        self.seed, self.image_size, self.length, self.infinite = int(seed), int(image_size), length, infinite
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.batch_size, self.start_batch = int(batch_size or 1), int(start_batch)
        self.skipped = SkipCounter()  # always empty: the shapes world never fails; kept for a uniform API

    def item(self, index):
        (image,), (s,) = self.world.batch([index], self.image_size)  # (3, S, S) in [0, 1]
        return {"image": image, "caption": s.caption, "recaption": "", "aesthetic": torch.tensor(s.aesthetic),
                "key": f"shapes-{self.seed}-{index:09d}", "index": index, "category": s.category}  # fmt: skip

    def __iter__(self):
        worker, num_workers = worker_slot()
        B = self.batch_size
        for batch in itertools.count(self.start_batch + worker, num_workers):  # this worker's batches
            for t in range(B):
                index = (batch * self.world_size + self.rank) * B + t
                if self.length is not None:
                    if not self.infinite and index >= self.length:
                        return
                    index %= self.length
                yield self.item(index)


# ----------------------------------------------------------------------------- 4. One entry point, batching
def build_image_dataset(spec, image_size=256, *, train=True, seed=0, rank=None, world_size=None,
                        batch_size=None, start_batch=0, positions=None, **kwargs):  # fmt: skip
    """The trainers' --data: "shapes" (the infinite shapes stream), "shapes:N" (samples 0..N-1),
    a directory (its tar shards, else an image folder), or tar shards (shards.list_shards).
    train=False: one pass, no shuffle, centre crop, no flip. image_size=None: images at their
    own size (shapes: 64). positions: saved reader positions (shards.StreamPositions)."""
    split = dict(rank=rank, world_size=world_size, batch_size=batch_size, start_batch=start_batch)
    m = re.fullmatch(r"shapes(?::(\d+))?", str(spec))
    if m:
        length = int(m.group(1)) if m.group(1) else None
        if not train and length is None:
            raise ValueError("a single pass over the shapes world needs a size: use 'shapes:N'")
        return ShapesDataset(seed, category_mix=kwargs.get("category_mix"), image_size=image_size or shapes.IMAGE_SIZE,
                             length=length, infinite=train, **split)  # fmt: skip
    kwargs.pop("category_mix", None)
    evaluation = {} if train else dict(random_crop=False, random_flip=False, shuffle=False)
    kwargs = dict(evaluation, **kwargs, seed=seed, infinite=train, positions=positions, **split)
    if isinstance(spec, str) and os.path.isdir(spec) and not any(n.endswith(SHARD_EXTS) for n in os.listdir(spec)):
        return ImageFolderDataset(spec, image_size, **kwargs)
    return TarShardDataset(spec, image_size, **kwargs)


def image_text_loader(spec, image_size=256, batch_size=32, *, rank=None, world_size=None, num_workers=0, seed=0,
                      start_batch=0, train=True, **kwargs):  # fmt: skip
    """A DataLoader of build_image_dataset(spec, ...) batches: {"image": (B,3,S,S) in [0,1],
    "caption": [str], "recaption": [str], "aesthetic": (B,), "key": [str], "position": (B, 5)
    (streams)}. start_batch (and positions=, O(1)) resumes exactly; skips: loader.dataset.skipped."""
    ds = build_image_dataset(spec, image_size, train=train, seed=seed, rank=rank, world_size=world_size,
                             batch_size=batch_size, start_batch=start_batch, **kwargs)  # fmt: skip
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)


def collate(samples):
    """Batch sample dicts: tensors stacked (B, ...), numbers a tensor (B,), the rest a list of B."""
    out = {}
    for key in samples[0]:
        values = out[key] = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values)
    return out


def pick_captions(captions, recaptions, p_recaption=0.95, generator=None):
    """Per sample, the recaption (where there is one) with probability p_recaption, else the
    caption: App. A's 95:5 mix. `generator`: a torch.Generator the trainer checkpoints."""
    draws = torch.rand(len(captions), generator=generator).tolist()
    return [r if (r and u < p_recaption) else c for c, r, u in zip(captions, recaptions, draws)]


# ----------------------------------------------------------------------------- 5. Pretokenized tokens
# WebDataset tars, one sample per image: <key>.tokens.npy (VQ ids (K,), int16, int32 above 32768
# codes) or <key>.mean.npy + .logvar.npy (KL, float32 (K, C)), <key>.txt and <key>.json {"caption",
# "recaption", "aesthetic" (null if unknown), "source"}; plus meta.json. Ids stay integers: float16
# cannot hold every integer above 2048, so the official float16 loader corrupts 8192-code ids.
def token_dtype(codebook_size):
    """The smallest integer dtype that holds every id of the codebook."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def pretokenized_members(caption, recaption="", aesthetic=None, source="", tokens=None, mean=None, logvar=None,
                         dtype=np.int16):  # fmt: skip
    """The tar members of one pretokenized sample (VQ: tokens (K,); KL: mean and logvar (K, C))."""
    if (tokens is None) == (mean is None or logvar is None):
        raise ValueError("pass either VQ tokens, or a KL mean and logvar")
    if tokens is not None:
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"VQ tokens must be integers, got {tokens.dtype}")
        if tokens.size and (tokens.min() < np.iinfo(dtype).min or tokens.max() > np.iinfo(dtype).max):
            raise ValueError(f"token ids in [{tokens.min()}, {tokens.max()}] do not fit {np.dtype(dtype)}; "
                             f"use token_dtype(codebook_size)")  # fmt: skip
        arrays = {"tokens.npy": tokens.astype(dtype)}
    else:
        arrays = {"mean.npy": np.asarray(mean, dtype=np.float32), "logvar.npy": np.asarray(logvar, dtype=np.float32)}
    aes = None if aesthetic is None or not math.isfinite(float(aesthetic)) else float(aesthetic)  # null: unknown
    return {**arrays, "txt": caption, "json": {"caption": caption, "recaption": recaption, "aesthetic": aes,
                                               "source": source}}  # fmt: skip


@torch.no_grad()
def pretokenize(tokenizer, dataset, out_dir, *, batch_size=64, per_shard=5000, num_workers=0, rank=0,
                max_samples=None, prefix=None, progress=False):  # fmt: skip
    """Encode every image of `dataset` (this rank's split) with the frozen TA-TiTok into shards
    <out_dir>/<prefix>-NNNNNN.tar -> {"samples": n, "shards": [paths], "skipped": counts}."""
    mode = tokenizer.config.quantize_mode
    if mode not in ("vq", "kl"):
        raise ValueError(f"tokenizer quantize_mode must be 'vq' or 'kl', got {mode!r}")
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    dtype = token_dtype(getattr(tokenizer.config, "codebook_size", 8192))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=f"pretokenize rank {rank}", unit="batch")
    n = 0
    with ShardWriter(out_dir, prefix or f"pretok-rank{rank:03d}", per_shard) as writer:
        for batch in loader:
            images = batch["image"].to(device)  # (B, 3, S, S) in [0, 1]
            if mode == "vq":
                arrays = [dict(tokens=row) for row in tokenizer.encode(images).cpu().numpy()]  # (K,) int64 each
            else:
                post = tokenizer.encode(images, return_posterior=True)
                mean, logvar = post.mean.float().cpu().numpy(), post.logvar.float().cpu().numpy()  # (B, K, C) each
                arrays = [dict(mean=m, logvar=v) for m, v in zip(mean, logvar)]
            for i, arr in enumerate(arrays[: None if max_samples is None else max(0, max_samples - n)]):
                writer.write(f"r{rank:03d}_{n:09d}", pretokenized_members(
                    batch["caption"][i], batch["recaption"][i], float(batch["aesthetic"][i]), batch["key"][i],
                    dtype=dtype, **arr))  # fmt: skip
                n += 1
            if max_samples is not None and n >= max_samples:
                break
    if n == 0:
        log.warning("data: rank %d wrote no pretokenized samples (skips: %s)", rank, dataset.skipped.summary())
    return {"samples": n, "shards": writer.paths, "skipped": dataset.skipped.counts()}


def read_pretokenized_meta(path):
    """meta.json (a dict) of a pretokenized folder or of the folder holding a shard, or None; ValueError if bad."""
    meta_file = pathlib.Path(path if os.path.isdir(path) else os.path.dirname(path), "meta.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"{meta_file} holds a JSON {type(meta).__name__}, not the object data.py pretokenize writes")
    return meta


class PretokenizedDataset(StreamDataset):
    """The shards `pretokenize` writes, for train_maskgen.py: VQ {"tokens": LongTensor (K,)}
    or KL {"posterior": FloatTensor (K, 2C) = cat(mean, logvar)}, plus "caption", "recaption",
    "aesthetic" () and "key"; options as shards.StreamDataset. The tokenizer's num_tokens K,
    codebook_size (VQ) or token_size C (KL), where given, are checked: a sample that does not fit
    them is skipped ("token_mismatch"), as is one whose arrays do not load ("bad_tokens")."""

    def __init__(self, shards, *, num_tokens=None, codebook_size=None, token_size=None, **stream):
        self.shards = list_shards(shards)
        self.num_tokens, self.codebook_size, self.token_size = num_tokens, codebook_size, token_size
        super().__init__(**stream)

    def _decode(self, group, check_only=False):
        where, K, V, C = sample_name(group), self.num_tokens, self.codebook_size, self.token_size
        try:  # every failure is a skip: bytes that are no numeric .npy (shards.decode_npy), a dtype, a shape
            if "tokens.npy" in group:
                tokens = decode_npy(group["tokens.npy"])
                if tokens.dtype.kind not in "iu" or tokens.ndim != 1:  # float16 cannot hold ids above 2048 exactly
                    raise ValueError(f"VQ tokens must be integers of shape (K,), got {tokens.dtype} {tokens.shape}; "
                                     f"re-create the shards with `python data.py pretokenize`")  # fmt: skip
                misfit = ("VQ ids for a KL tokenizer" if C is not None else
                          f"{len(tokens)} tokens, not {K}" if K is not None and len(tokens) != K else
                          f"ids in [{tokens.min()}, {tokens.max()}], outside the codebook's [0, {V})"
                          if V is not None and len(tokens) and not 0 <= tokens.min() <= tokens.max() < V else "")
                out = {"tokens": torch.from_numpy(tokens.astype(np.int64))}  # (K,)
            elif "mean.npy" in group and "logvar.npy" in group:
                mean, logvar = decode_npy(group["mean.npy"]), decode_npy(group["logvar.npy"])
                if mean.dtype.kind != "f" or logvar.dtype.kind != "f" or mean.shape != logvar.shape or mean.ndim != 2:
                    raise ValueError(f"mean {mean.dtype} {mean.shape} and logvar {logvar.dtype} {logvar.shape} "
                                     f"must both be floats of shape (K, C)")  # fmt: skip
                with np.errstate(over="ignore"):  # float64 values beyond float32 become inf, refused below
                    posterior = np.concatenate([mean, logvar], -1).astype(np.float32)  # (K, 2C)
                if not np.isfinite(posterior).all():
                    raise ValueError("the posterior holds non-finite values")
                misfit = ("a KL posterior for a VQ tokenizer" if V is not None else
                          f"{len(mean)} tokens, not {K}" if K is not None and len(mean) != K else
                          f"tokens of width {mean.shape[1]}, not {C}" if C is not None and mean.shape[1] != C else "")
                out = {"posterior": torch.from_numpy(posterior)}  # (K, 2C)
            else:
                raise ValueError("it has neither tokens.npy nor mean.npy + logvar.npy")
        except Exception as e:
            return self._reject("bad_tokens", f"{where}: {type(e).__name__}: {e}", check_only)
        if misfit:
            return self._reject("token_mismatch", f"{where}: {misfit}; pretokenize with this tokenizer", check_only)
        fields = self._text_fields(group, check_only)  # caption, recaption, aesthetic, key
        return None if fields is None else {**out, **fields}


# ----------------------------------------------------------------------------- 6. Shapes shards, command line
def make_shapes_shards(out_dir, n, per_shard=1000, seed=0, category_mix=None, prefix="shapes", counts=None, share=0.0,
                       folder=False):  # fmt: skip
    """Shapes samples 0..n-1 as WebDataset tars of <key>.png (lossless: exact palette colours),
    .txt and .json (caption, category, aesthetic_score, objects) -> the shard paths; folder: as the
    files themselves (an image folder). counts, share: that share of the samples, spread evenly, are
    count scenes of `counts` (a world of its own, seed + 1), the rest the usual world (fine-tuning data
    that teaches a new number word and replays the old vocabulary)."""
    world, new = shapes.ShapesWorld(seed, category_mix), counts and shapes.ShapesWorld(seed + 1, (0, 1, 0), counts)
    with ShardWriter(out_dir, prefix, per_shard) as writer:
        for index in range(n):
            s = new.sample(index) if new and int((index + 1) * share) > int(index * share) else world.sample(index)
            png = io.BytesIO()
            Image.fromarray(s.image).save(png, format="PNG")
            objects = [dict(color=o.color, shape=o.shape, cx=o.cx, cy=o.cy, size=o.size) for o in s.objects]
            meta = {"caption": s.caption, "category": s.category, "aesthetic_score": s.aesthetic,
                    "objects": objects, "seed": seed, "index": index}  # fmt: skip
            if not folder:
                writer.write(f"{index:09d}", {"png": png.getvalue(), "txt": s.caption, "json": meta})
                continue
            for ext, b in (("png", png.getvalue()), ("txt", s.caption.encode()), ("json", json.dumps(meta).encode())):
                pathlib.Path(out_dir, f"{index:09d}.{ext}").write_bytes(b)
    return [out_dir] if folder else writer.paths


def _cmd_make_shapes(args):
    if args.counts and not 0 < args.share <= 1:
        raise ValueError(f"--share must be in (0, 1] with --counts, got {args.share}")
    mix = [float(w) for w in args.mix.split(",")] if args.mix else None
    paths = make_shapes_shards(args.out, args.n, args.per_shard, args.seed, mix, counts=args.counts, share=args.share,
                               folder=args.folder)  # fmt: skip
    print(f"wrote {args.n} shapes samples {'as files' if args.folder else f'in {len(paths)} shard(s)'} to {args.out}/")


def _cmd_inspect(args):
    # Each sample at its own size; the resolution filter is reported, not applied (shapes would look empty).
    ds = build_image_dataset(args.data, None, train=False, min_longer_side=0, max_aspect_ratio=None)
    sizes = collections.Counter()
    for n, sample in enumerate(ds):
        h, w = sample["image"].shape[-2:]
        sizes[(w, h)] += 1
        if n < args.show:
            print(f"{sample['key']}: {tuple(sample['image'].shape)} aesthetic={float(sample['aesthetic']):.2f} "
                  f"caption={sample['caption'][:80]!r}")  # fmt: skip
    n = sum(sizes.values())
    print(f"{n} usable samples; skipped: {ds.skipped.summary()}")
    if not n:
        return
    common = ", ".join(f"{w}x{h} ({c})" for (w, h), c in sizes.most_common(5))
    print(f"image sizes: {common}{' ...' if len(sizes) > 5 else ''}")
    longer = args.image_size if args.min_longer_side is None else args.min_longer_side
    aspect = args.max_aspect_ratio or None
    dropped = collections.Counter(reason for (w, h), c in sizes.items()  # a size's skip reason, once per sample
                                  for reason in [size_filter(w, h, longer, aspect)] * c if reason)  # fmt: skip
    rule = f"longer side >= {longer}" + (f", aspect ratio < {aspect:g}" if aspect else "")
    counts = " ".join(f"{k}={v}" for k, v in dropped.items())
    verdict = f"would drop {sum(dropped.values())} of these {n}: {counts}" if dropped else f"keeps all {n}"
    print(f"the training filter for image size {args.image_size} ({rule}) {verdict} (the trainers apply it at "
          f"their tokenizer's image size; --image-size checks another)")  # fmt: skip


def _cmd_pretokenize(args):
    # Under torchrun each rank writes its share's shards; rank 0 adds meta.json once the counts are summed.
    rank, world_size = resolve_rank()  # torchrun's RANK / WORLD_SIZE, else (0, 1)
    gpu = torch.cuda.is_available() and args.device in (None, "auto", "cuda")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device(
        "cpu" if args.device in (None, "auto") else args.device)
    if world_size > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    import checkpoint  # imported here so that data.py works without the models (shapes, shards)
    tok, _ = checkpoint.load_tokenizer(args.tokenizer, device, with_text=False)  # frozen; no text (no CLIP download)
    ds = build_image_dataset(args.data, tok.config.image_size, train=False, rank=rank, world_size=world_size,
                             min_longer_side=args.min_longer_side)  # fmt: skip
    result = pretokenize(tok, ds, args.out, batch_size=args.batch_size, per_shard=args.per_shard,
                         num_workers=args.num_workers, rank=rank, max_samples=args.max_samples,
                         progress=rank == 0)  # fmt: skip
    local = [result["skipped"][r] for r in SKIP_REASONS] + [result["samples"]]  # this rank's counts, summed below
    summed = torch.tensor(local, dtype=torch.int64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(summed)  # also the last sync point: every rank's shards are written
        # gloo's worker thread drops its reference to `summed` a moment after the call returns; a
        # process exiting before that aborts ("terminate called without an active exception").
        deadline = time.monotonic() + 10.0
        while summed._use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    counts = summed.cpu()
    total = int(counts[-1])
    if rank == 0:
        cfg = tok.config  # what a MaskGen trainer needs to know about the tokens, and where they came from
        meta = dict(quantize_mode=cfg.quantize_mode, num_tokens=cfg.num_latent_tokens, token_size=cfg.token_size,
                    image_size=cfg.image_size)  # fmt: skip
        if cfg.quantize_mode == "vq":
            meta.update(codebook_size=cfg.codebook_size, token_dtype=str(token_dtype(cfg.codebook_size)))
        # The tokenizer by name and by content: train_maskgen.py refuses these tokens with any other weights.
        meta.update(tokenizer=checkpoint.record_ref(args.tokenizer), tokenizer_digest=checkpoint.content_digest(
            tok.state_dict()), data=str(args.data), num_samples=total,
            skipped={r: int(v) for r, v in zip(SKIP_REASONS, counts[:-1]) if v})  # fmt: skip
        pathlib.Path(args.out, "meta.json").write_text(json.dumps(meta, indent=2))
        print(f"pretokenized {total} samples ({tok.config.quantize_mode}) into {args.out}/ "
              f"on {world_size} rank(s); skipped: {meta['skipped'] or 'none'}")  # fmt: skip
    if world_size > 1:
        torch.distributed.destroy_process_group()  # no barrier: it would hold on to `summed` again


def main(argv=None):
    parser = argparse.ArgumentParser(description="Data tools: shapes shards, inspection, MaskGen pretokenization.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-shapes", help="write shapes-world samples as WebDataset tar shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=10000, help="number of samples")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", help="weights of single,count,relation scenes, e.g. 0.2,0.5,0.3 (default: thirds)")
    p.add_argument("--counts", type=int, nargs="+", choices=sorted(shapes.NUMBER_WORDS),
                   help="teach these counts: --share of the samples are count scenes of them (e.g. --counts 4)")
    p.add_argument("--share", type=float, default=0.3, help="with --counts: their share of the samples")
    p.add_argument("--folder", action="store_true", help="write <key>.png/.txt/.json files, not tar shards")
    p.set_defaults(func=_cmd_make_shapes)

    p = sub.add_parser("inspect", help="read a dataset once at its own image sizes; print a few samples, the skip "
                                        "counts, the image sizes, and what the training filter would drop")  # fmt: skip
    p.add_argument("--data", required=True, help="tar pattern, folder, pipe:/URL shards, or 'shapes:N'")
    p.add_argument("--image-size", type=int, default=256, help="the training image size whose filter is reported")
    p.add_argument("--min-longer-side", type=int, default=None, help="resolution filter (default: image size)")
    p.add_argument("--max-aspect-ratio", type=float, default=2.0, help="aspect filter (0: none)")
    p.add_argument("--show", type=int, default=5)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("pretokenize", help="encode a dataset with a frozen TA-TiTok into token shards (torchrun-able)")
    p.add_argument("--tokenizer", required=True, help="TA-TiTok: release dir, Hub id, run folder or checkpoint file")
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
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input (a missing shard pattern, a bad tokenizer): no traceback
        sys.exit(f"data.py: error: {e}")

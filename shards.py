"""
WebDataset tar shards: finding, reading and writing them, and the streaming dataset
that every shard reader builds on.

Paper: §5.1 "Training Data" / Appendix A. The web image-text pairs (DataComp, CC12M,
LAION) come as WebDataset tar shards, the layout img2dataset writes, and MaskGen's
pretokenized data (pretokenize.py) is stored the same way. This file is the format
and the streaming machinery, read with the standard library only:
  * a shard like 000123.tar holds 000123001.jpg, 000123001.txt, 000123001.json,
    000123002.jpg, ... The files of one sample sit next to each other and share a
    key: the member path up to the first dot of its file name. Everything after that
    dot is the "extension" ("jpg", "txt", "recap.txt").
  * a sample's text fields: the caption (.txt, or a .json field), the Molmo
    recaption with its "The image depicts ..." prefix stripped (App. A), and the
    aesthetic score (MaskGen's micro-condition, also the paper's data filter).
  * StreamDataset splits the samples over DDP ranks and DataLoader workers without
    duplicates, shuffles, repeats epochs, resumes exactly from a batch count, and
    skips bad inputs (corrupt images, missing captions, truncated tars, unreadable
    shards), counting them in `dataset.skipped`, never a crash.

Sections, in reading order:
  1. Finding shards     expand_braces, list_shards
  2. Reading a shard    split_key, iter_tar_groups, strip_recaption_prefix
  3. Skip counting      SKIP_REASONS, SkipCounter
  4. The stream         resolve_rank, shuffle_buffer, StreamDataset
  5. Writing shards     ShardWriter, encode_npy / decode_npy

data.py builds the image datasets on StreamDataset, pretokenize.py the token one.
"""

import glob
import io
import json
import logging
import math
import os
import re
import tarfile
import zlib

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

import runtime

log = logging.getLogger("data")

SHARD_EXTS = (".tar", ".tar.gz", ".tgz")

# =============================================================================
# 1. Finding shards: brace patterns, globs, folders
# =============================================================================


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


def list_shards(spec, exts=SHARD_EXTS):
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


# =============================================================================
# 2. Reading a shard: members grouped into samples, and a sample's text fields
# =============================================================================


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


# A sample's text fields: where a caption, a recaption and an aesthetic score may sit.
CAPTION_FIELDS = ("caption", "text", "TEXT", "prompt")
RECAPTION_EXTS = ("recap.txt", "recap_txt", "recaption.txt")
RECAPTION_FIELDS = ("recaption", "recap_caption", "recap_txt", "molmo_caption")
AESTHETIC_EXTS = ("aesthetic", "score", "aes_score", "aesthetic.txt")
AESTHETIC_FIELDS = ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic", "aes_score")
# The score of a sample without one: NaN marks it unknown, so that the trainer can
# apply its own configured default (and pretokenize stores it as null, not a guess).
MISSING_AESTHETIC = float("nan")
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


def sample_name(group):
    """"<shard file>:<key>", how logs and the "key" field name a sample."""
    return f"{os.path.basename(group['__shard__'])}:{group['__key__']}"


# =============================================================================
# 3. Skip counting
# =============================================================================

# The reasons a sample (or a whole shard) can be skipped; counted per reason.
# "filtered_*" are the paper's data filters doing their job, not errors: they are
# counted but logged only at DEBUG level.
SKIP_REASONS = (
    "unreadable_shard",  # missing file, not a tar, unreadable from the first byte
    "truncated_member",  # the tar ends (or breaks) inside a member; the rest of that shard is lost
    "unreadable_file",  # image folder: a file that cannot be read
    "missing_image",  # a sample with no image member (data.IMAGE_EXTS)
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


# =============================================================================
# 4. The stream: ranks x workers, epochs, shuffling, exact resume
# =============================================================================


def resolve_rank(rank=None, world_size=None):
    """(rank, world_size): as given, else runtime.rank_world() (the process group, else
    torchrun's environment, else (0, 1)), checked."""
    if rank is None or world_size is None:
        r, w = runtime.rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size")
    return int(rank), int(world_size)


def worker_slot():
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


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


class StreamDataset(IterableDataset):
    """The part every stream-read dataset shares: splitting over ranks and workers,
    epochs, the shuffle buffer, exact resume, skip counting, and a sample's text fields
    with the paper's aesthetic filter.

    Splitting. The readers ("slots") are the world_size x num_workers DataLoader
    workers. Each epoch yields the raw samples of this slot (by default from the tar
    shards in self.shards); epochs repeat forever when infinite=True, each in a new
    seeded order.

    Exact resume. DataLoader worker j of a run that starts at batch s makes batches
    s + j, s + j + W, ... So it plays the part of "logical worker" (s + j) % W of the
    first run, whose stream it regenerates from the seed and fast-forwards past the
    batches that worker already made. The resumed run then sees exactly the samples
    the uninterrupted run would have, provided world_size, num_workers, batch_size
    and seed are unchanged. Fast-forwarding decodes the skipped samples cheaply (to
    know which ones were valid), so it costs time proportional to the position.

    min_aesthetic:     keep samples scoring >= this (paper: 5.0 pre-training, 6.0
                       fine-tuning); samples without a score are kept
    default_aesthetic: the score given to samples without one (default NaN = unknown)
    """

    def __init__(self, *, shuffle=True, shuffle_buffer=1000, seed=0, infinite=True, rank=None, world_size=None,
                 batch_size=None, start_batch=0, min_aesthetic=None, default_aesthetic=MISSING_AESTHETIC):  # fmt: skip
        super().__init__()
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if start_batch and not batch_size:
            raise ValueError("resuming with start_batch needs batch_size (the DataLoader's per-rank batch size)")
        self.shuffle, self.buffer_size, self.seed, self.infinite = shuffle, int(shuffle_buffer), int(seed), infinite
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.batch_size, self.start_batch = int(batch_size or 1), int(start_batch)
        self.min_aesthetic, self.default_aesthetic = min_aesthetic, float(default_aesthetic)
        self.skipped = SkipCounter()
        self.max_consecutive_skips = 10_000  # infinite streams: give up (with the counts) after this many

    # --- subclass hooks ---
    def _epoch_groups(self, epoch, slot, n_slots):
        """Raw samples (dicts of bytes) of one epoch that belong to this slot, from the
        tar shards in self.shards.

        With at least as many shards as readers, whole shards are dealt out (each shard
        is read by one reader only). With fewer, every reader reads every shard and
        keeps every n_slots-th sample, and only reader 0 counts shard-level problems,
        so that nothing is counted twice."""
        order = np.arange(len(self.shards))
        if self.shuffle:  # the same order on every rank and worker: it depends on (seed, epoch) only
            order = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.shards))
        if len(self.shards) >= n_slots:
            for i in order[slot::n_slots]:
                yield from iter_tar_groups(self.shards[i], self.skipped)
            return
        seen = 0
        for i in order:
            for group in iter_tar_groups(self.shards[i], self.skipped if slot == 0 else None):
                if seen % n_slots == slot:
                    yield group
                seen += 1

    def _decode(self, group, check_only=False):
        """Raw sample -> training dict, or None when skipped. check_only: validate
        cheaply for fast-forwarding and count nothing."""
        raise NotImplementedError

    def _reject(self, reason, detail, check_only):
        if not check_only:
            self.skipped.add(reason, detail)
        return None

    def _text_fields(self, group, check_only):
        """{"caption", "recaption", "aesthetic": FloatTensor (), "key"} from the .txt /
        .json / score members, or None (counted) when the sample has no caption or scores
        below min_aesthetic. Samples without a score get default_aesthetic and are kept."""
        where = sample_name(group)
        meta = {}
        if "json" in group:
            try:
                meta = json.loads(group["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
            except (ValueError, UnicodeDecodeError) as e:
                self._reject("bad_json", f"{where}: {e}", check_only)
                meta = {}
        caption = _text(group.get("txt")) or _field(meta, CAPTION_FIELDS)
        if not caption:
            return self._reject("missing_caption", f"{where} has no .txt and no caption in its .json", check_only)
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
                self._reject("bad_aesthetic", f"{where}: aesthetic score {raw!r} is not a number; using the default",
                             check_only)  # fmt: skip
                aesthetic = None
        if aesthetic is None:
            aesthetic = self.default_aesthetic
        elif self.min_aesthetic is not None and aesthetic < self.min_aesthetic:
            return self._reject("filtered_aesthetic", f"{where}: {aesthetic:.2f} < {self.min_aesthetic}", check_only)
        return {"caption": caption, "recaption": strip_recaption_prefix(recaption),
                "aesthetic": torch.tensor(aesthetic, dtype=torch.float32), "key": where}  # fmt: skip

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
        worker, num_workers = worker_slot()
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


# =============================================================================
# 5. Writing shards
# =============================================================================


def encode_npy(array):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


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

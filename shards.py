"""
WebDataset tar shards, end to end: finding them, reading one shard (a local file, a pipe,
a URL) as samples, writing shards, and the streaming dataset data.py builds on.

Paper: §5.1 "Training Data" / App. A. The web image-text pairs (DataComp, CC12M, LAION) and
MaskGen's pretokenized tokens are WebDataset tars, the layout img2dataset writes: a sample's
members share a key, the path up to the first dot of the name (000123001.jpg, .txt, .recap.txt).
A shard is "data/000123.tar" (or .tar.gz / .tgz), "pipe:COMMAND" (the tar on a shell command's
stdout, e.g. "pipe:aws s3 cp s3://bucket/000123.tar -": take a data spec only from whom you
would let run commands), or an http(s) URL (streamed). Only a plain local tar seeks straight to
a sample on resume. A cut tar keeps every complete sample before the cut. Bad inputs are
counted in `dataset.skipped`, never a crash.
"""
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import tarfile
import tempfile
import threading
import urllib.request
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info


log = logging.getLogger("data")

SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
READ_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error)  # from a broken tar, pipe or connection
URL_TIMEOUT_S = 60  # seconds without a byte from an http(s) shard before it counts as unreadable
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: these cannot seek to a member
PIPE_TAIL_BYTES = 1 << 20  # what a pipe may still send after its tar's end (tar pads to 10 KiB records)
MAX_MEMBER_BYTES = 1 << 28  # a larger member is left unread (a worker holds a sample in memory) and its sample skipped


# ----------------------------------------------------------------------------- 1. Finding shards
def expand_braces(pattern):
    """Shell-style braces: "s/{000..002}.tar" -> s/000.tar, s/001.tar, s/002.tar; "{a,b}-{1..2}"
    -> a-1, a-2, b-1, b-2. Zero-padded bounds keep their width; groups nest; "{abc}" stays literal."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in pattern {pattern!r}; every '}}' needs an opening '{{'")
        return [pattern]
    depth, commas = 0, []  # the body's top-level commas
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
        if depth == 1 and pattern[end] == ",":
            commas.append(end)
    else:
        raise ValueError(f"unbalanced '{{' in pattern {pattern!r}; close it with '}}'")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    if m := re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body):
        a, b = m.groups()
        width = max(len(a), len(b)) if any(len(x) > 1 and x.startswith("0") for x in (a, b)) else 0  # zero-padded
        step = 1 if int(b) >= int(a) else -1
        options = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif commas:
        cuts = [start, *commas, end]
        options = [x for i, j in zip(cuts, cuts[1:]) for x in expand_braces(pattern[i + 1 : j])]
    else:  # "{abc}": not a brace expression
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + opt + rest for opt in options for rest in expand_braces(tail)]


def list_shards(spec, exts=SHARD_EXTS):
    """Shard names from a brace pattern, glob, directory, several joined by "::", or a list; missing
    files are kept (counted when read) unless none exists. pipe: and http(s) names are brace-expanded."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in list_shards(s, exts)]
    out = []
    for part in str(spec).split("::"):
        if part.startswith("pipe:") or re.match(r"https?://", part):  # checked only when read
            out += expand_braces(part)
            continue
        if re.match(r"^[a-z0-9+]+:(//)?", part) and not os.path.exists(part):
            raise ValueError(f"{part!r} is not a local file, a 'pipe:COMMAND' or an http(s):// URL; read other "
                             f"stores through a command that writes the tar to stdout, e.g. 'pipe:aws s3 cp "
                             f"s3://bucket/000.tar -' or 'pipe:gsutil cat gs://bucket/000.tar'")  # fmt: skip
        if os.path.isdir(part):
            names = sorted(p for p in glob.glob(os.path.join(part, "*")) if p.endswith(exts))
            if not names:
                raise FileNotFoundError(f"directory {part!r} holds no shard files ({', '.join(exts)}); pass a folder "
                                        f"of tar shards or a pattern like 'dir/{{000000..000099}}.tar'")  # fmt: skip
            out += names
            continue
        names = [n for name in expand_braces(part)
                 for n in (sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name])]  # fmt: skip
        existing = [n for n in names if os.path.isfile(n)]
        if not existing:
            example = f" (it expands to {len(names)} name(s), e.g. {names[0]!r})" if names else ""
            raise FileNotFoundError(f"shard pattern {part!r} matched no files{example}; check its folder and braces")
        if len(existing) < len(names):
            missing = sorted(set(names) - set(existing))  # sets: 100k names take milliseconds
            log.warning("data: %d of %d shards of %r do not exist (e.g. %s); they will be skipped and counted",
                        len(missing), len(names), part, missing[0])  # fmt: skip
        out += names
    return out


# ----------------------------------------------------------------------------- 2. One shard's samples
def open_shard(source, offset=0):
    """-> (file, start: the tar byte it begins at, finish(completed): closes it, returns why a pipe
    failed or None; completed=False stops the command unjudged). OSError when unopenable."""
    if source.startswith("pipe:"):
        stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        proc = subprocess.Popen(source[len("pipe:"):], shell=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr)  # fmt: skip

        def finish(completed):
            # Read the padding after the tar's end so the command is not cut off mid-write; more is
            # not waited for: the command is stopped, unjudged.
            if completed and proc.stdout.read(PIPE_TAIL_BYTES) and proc.stdout.read(1):
                completed = False
            if proc.poll() is None and not completed:
                proc.kill()
            proc.stdout.close()
            status = proc.wait()
            with stderr:
                stderr.seek(0)
                message = stderr.read()[-600:].decode("utf-8", "replace").strip()
            if completed and status != 0:
                return f"{source}: the command exited with status {status}: {message or '(nothing on stderr)'}"

        return proc.stdout, 0, finish
    if re.match(r"https?://", source):
        response = urllib.request.urlopen(source, timeout=URL_TIMEOUT_S)  # HTTPError / URLError are OSErrors
        return response, 0, lambda completed: response.close()
    f = open(source, "rb")
    start = offset if offset > 0 and not f.read(6).startswith(COMPRESSED_MAGIC) else 0  # a plain tar seeks
    f.seek(start)
    return f, start, lambda completed: f.close()


def split_key(name):
    """Tar member name -> (key, extension): "a/b/000001.recap.txt" -> ("a/b/000001", "recap.txt")."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or stem.startswith("__"):
        return None, None  # no extension, a hidden "._x" file, or a "__meta__" member
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class _Header(tarfile.TarInfo):
    """A header that records why reading stopped: tarfile stops silently at the end and at a cut."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.stopped_by = e
            raise


def _groups(fileobj, source, start, skip_to):
    """Yield the samples of a tar stream that begins at tar byte `start` from byte `skip_to`
    on; return (reason, detail) of the problem that ended it, or None."""
    try:
        # "r|": forward-only (all a pipe allows); "r|*" also detects compression (from byte 0 only).
        tar = tarfile.open(fileobj=fileobj, mode="r|" if start else "r|*", tarinfo=_Header)
    except READ_ERRORS as e:
        if start:  # a seek into the middle of a shard that has nothing readable there
            return "truncated_member", f"{source}: the tar breaks at byte {start}: {type(e).__name__}: {e}"
        return "unreadable_shard", f"{source}: {type(e).__name__}: {e}"
    group = None  # the sample being read: every member read so far is complete
    with tar:
        try:
            for member in tar:  # a read error here leaves `group` whole: kept below
                key, ext = split_key(member.name) if member.isfile() else (None, None)
                if key is None or start + member.offset < skip_to:
                    continue
                if group is not None and key != group["__key__"]:
                    yield group  # the next sample has begun, so this one is complete
                    group = None
                group = group or {"__key__": key, "__shard__": source}
                if member.size > MAX_MEMBER_BYTES:  # left unread; StreamDataset counts its sample as skipped
                    group["__too_large__"] = f"{member.name} holds {member.size} bytes > {MAX_MEMBER_BYTES}"
                else:
                    try:
                        group[ext] = tar.extractfile(member).read()
                    except READ_ERRORS as e:  # this member is cut: its sample is dropped
                        return "truncated_member", f"{source}: sample {key!r} is cut in {member.name} ({e})"
                group["__end__"] = start + tar.offset  # the tar byte after this member: where a reader resumes
            # The loop ended without an error: at the end-of-archive block (a clean end), or at a cut.
            stop, where = getattr(tar, "stopped_by", None), f"at byte {start + tar.offset}"
            problem = None if stop is None or isinstance(stop, tarfile.EOFHeaderError) else {
                tarfile.EmptyHeaderError: f"the tar ends {where}, at a member boundary, without its end-of-archive "
                                          f"blocks",
                tarfile.TruncatedHeaderError: f"the tar ends {where}, inside a member header",
            }.get(type(stop), f"a damaged member header {where} ({stop})")  # fmt: skip
        except READ_ERRORS as e:
            problem = f"{type(e).__name__}: {e} after byte {start + tar.offset}"
    if group is not None:
        yield group
    return None if problem is None else ("truncated_member", f"{source}: {problem}; the rest of this shard is lost")


def iter_tar_groups(source, skipped=None, offset=0):
    """Yield a shard's samples {"__key__", "__shard__", "__end__": byte after it, "<ext>": bytes}
    from byte `offset` (a sample's start); count a shard problem at most once in `skipped`."""
    count = skipped.add if skipped is not None else (lambda reason, detail="": None)
    try:
        fileobj, start, finish = open_shard(source, offset)
    except (OSError, ValueError) as e:
        count("unreadable_shard", f"{source}: {type(e).__name__}: {e}")
        return
    completed = False
    try:
        problem = yield from _groups(fileobj, source, start, offset)
        completed = True
    finally:  # also when the reader stops early: never leave a command running
        failure = finish(completed)
    if failure:  # a failed command explains a cut in its output better than the cut does
        count("unreadable_shard", failure)
    elif problem:
        count(*problem)


# ----------------------------------------------------------------------------- 3. Writing shards
# Arrays travel as .npy (dtype and shape in its header); allow_pickle=False: a shard never runs code.
def encode_npy(array):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data):
    """.npy bytes -> a numeric ndarray; ValueError for anything else: a pickle or an object array (refused
    unrun), an .npz archive, strings, cut bytes."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise ValueError(f"expected a numeric .npy array, got {getattr(array, 'dtype', type(array).__name__)}")
    return array


class ShardWriter:
    """Samples into tar shards out_dir/<prefix>-000000.tar, ... of <= per_shard samples, each renamed
    from .tmp once complete; member values: bytes, str, dict/list (JSON), ndarray (.npy)."""

    def __init__(self, out_dir, prefix="shard", per_shard=1000):
        if per_shard < 1:
            raise ValueError(f"per_shard must be >= 1, got {per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, int(per_shard)
        self.paths, self.count, self._tar = [], 0, None

    def write(self, key, members):
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/' (the key ends at the first dot)")
        if self._tar is None:
            self._final = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):06d}.tar")
            self._tar = tarfile.open(self._final + ".tmp", "w")
        for ext, value in members.items():
            if isinstance(value, (str, dict, list)):  # text, or JSON
                value = (value if isinstance(value, str) else json.dumps(value)).encode("utf-8")
            elif isinstance(value, np.ndarray):
                value = encode_npy(value)
            elif not isinstance(value, bytes):
                raise TypeError(f"cannot store a {type(value).__name__} in a shard; pass bytes, str, dict or ndarray")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(value), 0o644, 0  # mtime 0: byte-identical reruns
            self._tar.addfile(info, io.BytesIO(value))
        self.count += 1
        if self.count % self.per_shard == 0:
            self.close()  # this shard is full; the next write opens the next one

    def close(self):
        """Finish the shard being written (rename it from .tmp); return every shard's path."""
        if self._tar is not None:
            self._tar.close()
            os.replace(self._final + ".tmp", self._final)
            self.paths.append(self._final)
            self._tar = None
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # an error: leave the partial shard as .tmp
            self._tar.close()
            self._tar = None


# ----------------------------------------------------------------------------- 4. A sample's text fields
# Where a caption, a recaption and an aesthetic score may sit.
CAPTION_FIELDS = ("caption", "text", "TEXT", "prompt")
RECAPTION_EXTS = ("recap.txt", "recap_txt", "recaption.txt")
RECAPTION_FIELDS = ("recaption", "recap_caption", "recap_txt", "molmo_caption")
AESTHETIC_EXTS = ("aesthetic", "score", "aes_score", "aesthetic.txt")
AESTHETIC_FIELDS = ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic", "aes_score")
# Longer text skips the sample: CLIP reads 77 tokens, and its BPE takes time quadratic in a word's length.
MAX_TEXT_BYTES, MAX_CAPTION_CHARS = 1 << 20, 4096  # per .txt / .json / recaption member; per caption
MISSING_AESTHETIC = float("nan")  # unknown: the trainer applies its own default, pretokenize stores null
RECAPTION_PREFIXES = tuple(f"The image {verb}" for verb in ("depicts", "displays", "showcases", "features", "shows"))


def strip_recaption_prefix(text):
    """Remove Molmo's stock opening ("The image depicts ...") and capitalise the rest (App. A)."""
    text = text.strip()
    for prefix in RECAPTION_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
            return text[:1].upper() + text[1:]
    return text


def _field(meta, names):
    """The first of the .json fields `names` that holds a non-blank string, stripped, or ""."""
    return next((meta[n].strip() for n in names if isinstance(meta.get(n), str) and meta[n].strip()), "")


def sample_name(group):
    """"<shard file>:<key>", how logs and the "key" field name a sample."""
    return f"{os.path.basename(group['__shard__'])}:{group['__key__']}"


# ----------------------------------------------------------------------------- 5. Skip counting
# Why a sample (or a shard) is skipped. "filtered_*" are the paper's filters: counted, logged at DEBUG only.
SKIP_REASONS = (
    "unreadable_shard",  # missing file, not a tar, a failing pipe: command or URL (once per shard and pass)
    "truncated_member",  # the tar is cut or damaged; the rest of that shard is lost (once per shard and pass)
    "unreadable_file",  # image folder: a file that cannot be read
    "missing_image",  # a sample with no image member (data.IMAGE_EXTS)
    "corrupt_image",  # image bytes that do not decode (garbage, truncated, a format not in data.IMAGE_FORMATS)
    "missing_caption",  # no .txt and no caption field in the .json
    "bad_json",  # a .json member that does not parse (the sample may still have a .txt caption)
    "bad_aesthetic",  # an aesthetic score that is not a number (the default is used)
    "bad_tokens",  # pretokenized: token arrays missing, unreadable (decode_npy), of a wrong dtype, or non-finite
    "token_mismatch",  # pretokenized: tokens that do not fit the tokenizer (kind, count, width, ids past the codebook)
    "invalid_utf8",  # a caption, recaption or .json that is not valid UTF-8
    "text_too_long",  # a text member over MAX_TEXT_BYTES, or a caption over MAX_CAPTION_CHARS
    "member_too_large",  # a tar member over MAX_MEMBER_BYTES (never read)
    "undecodable",  # any other failure while decoding a sample (the exception is logged)
    "too_many_pixels",  # an image whose header says width x height > max_pixels (never decoded)
    "filtered_resolution",  # longer side < min_longer_side
    "filtered_aspect",  # aspect ratio >= max_aspect_ratio
    "filtered_aesthetic",  # aesthetic score < min_aesthetic
)


class SkipCounter:
    """Skipped samples per reason over DataLoader workers: a shared-memory table, one row per process
    (0: main, 1 + i: worker i), each writing its own row, lock-free; the first few are logged."""

    ROWS, LOG_FIRST = 257, 5  # the main process + up to 256 workers; skips logged per reason and process

    def __init__(self):
        self._table, self._logged = torch.zeros(self.ROWS, len(SKIP_REASONS), dtype=torch.int64).share_memory_(), {}

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

    def summary(self):
        return " ".join(f"{k}={v}" for k, v in self.counts().items() if v) or "none"


# ----------------------------------------------------------------------------- 6. The stream
def resolve_rank(rank=None, world_size=None):
    """(rank, world_size) as given, else the process group's, else torchrun's, else (0, 1)."""
    joined = dist.is_available() and dist.is_initialized()
    rank = (dist.get_rank() if joined else int(os.environ.get("RANK", 0))) if rank is None else rank
    if world_size is None:
        world_size = dist.get_world_size() if joined else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size")
    return int(rank), int(world_size)


def worker_slot():
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process. Called first by every
    dataset's __iter__, it also leaves stop signals to the main process (train_common.RunControl: finish the
    step, checkpoint, exit 143 / 130): torchrun, shells and Ctrl-C signal a whole process group, and a worker
    dying of one would make the stop a DataLoader error. Ignoring them is not enough (multiprocessing ends its
    workers with SIGTERM as the main process exits): a worker blocks them, and a thread exits it on one from the
    main process only. One whose main process died exits by itself (PyTorch's watchdog, between batches)."""
    info, stop = get_worker_info(), {signal.SIGTERM, signal.SIGINT}
    if info is not None and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, stop):  # not yet guarded
        main = torch.multiprocessing.parent_process().pid  # the standard module's, re-exported

        def wait():  # os._exit: the worker holds nothing its main process needs
            while signal.sigwaitinfo(stop).si_pid != main:
                pass
            os._exit(0)

        threading.Thread(target=wait, daemon=True).start()
    return (0, 1) if info is None else (info.id, info.num_workers)


POSITION_FIELDS = ("epoch", "shard", "offset", "seen", "taken")  # a reader's position, LongTensor (5,)
START = (0, 0, 0, 0, 0)  # the position of a reader that has read nothing


class StreamDataset(IterableDataset):
    """What every stream-read dataset shares: the rank x worker split, epochs, shuffling,
    exact resume, skip counting, and a sample's text fields with the aesthetic filter.

    The readers ("slots") are the world_size x num_workers DataLoader workers. Each cuts its
    epoch's stream (_epoch_groups) into blocks of `shuffle_buffer` samples, each permuted by
    a generator seeded by where the block starts, so a reader's whole state is a position
    (POSITION_FIELDS): epoch, shard and byte offset of the block, the epoch's samples
    before it, and the block's samples used. Each sample carries the position after it.
    Resume: worker j of a run starting at batch s is logical worker (s + j) % W of the first
    run; it seeks to its saved position (StreamPositions), or without one (-1) regenerates
    and fast-forwards: either way it sees the samples, crops and flips of the first run.

    min_aesthetic:     keep samples scoring >= this (paper: 5.0 pre-training, 6.0 fine-tuning)
    default_aesthetic: the score of samples without one, which are kept (NaN = unknown)"""

    def __init__(self, *, shuffle=True, shuffle_buffer=1000, seed=0, infinite=True, rank=None, world_size=None,
                 batch_size=None, start_batch=0, positions=None, min_aesthetic=None,
                 default_aesthetic=MISSING_AESTHETIC):  # fmt: skip
        super().__init__()
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if start_batch and not batch_size:
            raise ValueError("resuming with start_batch needs batch_size (the DataLoader's per-rank batch size)")
        self.shuffle, self.buffer_size, self.seed, self.infinite = shuffle, int(shuffle_buffer), int(seed), infinite
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.batch_size, self.start_batch = int(batch_size or 1), int(start_batch)
        self.positions = None if positions is None else torch.as_tensor(positions, dtype=torch.int64)
        self.min_aesthetic, self.default_aesthetic = min_aesthetic, float(default_aesthetic)
        self.skipped = SkipCounter()
        self.max_consecutive_skips = 10_000  # infinite streams: give up (with the counts) after this many

    # --- subclass hooks: _epoch_groups (where raw samples come from), _decode (what they become) ---
    def _epoch_groups(self, epoch, slot, n_slots, start=(0, 0, 0)):
        """Raw samples (dicts of bytes) of one epoch for this slot from self.shards, from start =
        (shard, offset, seen), each with "__next__", the (shard, offset, seen) after it. Whole
        shards are dealt out; with fewer shards than readers, every reader reads every shard,
        keeps every n_slots-th sample, and only reader 0 counts shard-level problems."""
        order = self._order(len(self.shards), epoch)
        few = len(self.shards) < n_slots
        mine = order if few else order[slot::n_slots]
        first, offset, seen = start
        counter = self.skipped if slot == 0 or not few else None
        for k in range(first, len(mine)):
            for group in iter_tar_groups(self.shards[mine[k]], counter, offset if k == first else 0):
                seen += 1
                group["__next__"] = (k, group["__end__"], seen)
                if not few or (seen - 1) % n_slots == slot:
                    yield group

    def sources(self):
        """The shard list positions point into, as checkpoints record it: {"count", "sha256", "list": zlib'd lines
        "base name<TAB>byte size" (-1: not a local file)}: moving the data changes nothing; ~8 bytes a shard."""
        shards = getattr(self, "shards", None)  # image folders list self.files: no byte offsets, so no sizes
        lines = [f"{os.path.basename(s)}\t{os.path.getsize(s) if shards is not None and os.path.isfile(s) else -1}"
                 for s in (self.files if shards is None else shards)]  # fmt: skip
        text = "\n".join(lines).encode()
        return {"count": len(lines), "sha256": hashlib.sha256(text).hexdigest(), "list": zlib.compress(text)}

    def _order(self, n, epoch):
        """The epoch's order of n shards (or files): the same on every rank and worker (it depends on seed, epoch)."""
        return np.random.default_rng([self.seed, 2, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _decode(self, group, check_only=False):
        """Raw sample -> training dict, or None when skipped; check_only: validate cheaply, count nothing."""
        raise NotImplementedError

    def _reject(self, reason, detail, check_only):
        if not check_only:
            self.skipped.add(reason, detail)
        return None

    def _text_fields(self, group, check_only):
        """{"caption", "recaption", "aesthetic": FloatTensor (), "key"} from the .txt / .json /
        score members, or None (counted) without a caption or below min_aesthetic. Whatever a .json
        or a score holds that does not parse is counted, and the sample goes on without it."""
        where = sample_name(group)
        text = {}  # valid UTF-8 only: replacement characters would train on text nobody wrote
        for ext in filter(group.__contains__, ("txt", "json", *RECAPTION_EXTS)):
            if len(group[ext]) > MAX_TEXT_BYTES:
                return self._reject("text_too_long", f"{where}: its .{ext} holds {len(group[ext])} bytes",
                                    check_only)  # fmt: skip
            try:
                text[ext] = group[ext].decode("utf-8").strip()
            except UnicodeDecodeError as e:
                return self._reject("invalid_utf8", f"{where}: its .{ext} is not valid UTF-8 ({e})", check_only)
        try:
            meta = json.loads(text.get("json", "{}"))
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        except Exception as e:  # ValueError, RecursionError (nested too deeply), ...
            self._reject("bad_json", f"{where}: {type(e).__name__}: {str(e)[:200]}", check_only)
            meta = {}
        caption = text.get("txt") or _field(meta, CAPTION_FIELDS)
        if not caption:
            return self._reject("missing_caption", f"{where} has no .txt and no caption in its .json", check_only)
        recap_ext = next((e for e in RECAPTION_EXTS if e in text), None)
        recaption = text[recap_ext] if recap_ext else _field(meta, RECAPTION_FIELDS)
        if max(len(caption), len(recaption)) > MAX_CAPTION_CHARS:
            return self._reject("text_too_long", f"{where}: a caption of {max(len(caption), len(recaption))} "
                                f"characters > {MAX_CAPTION_CHARS}", check_only)  # fmt: skip
        try:  # a JSON string may still hold an unpaired surrogate escape ("\\ud800"), which is not UTF-8
            caption.encode("utf-8"), recaption.encode("utf-8")
        except UnicodeEncodeError as e:
            return self._reject("invalid_utf8", f"{where}: a caption in its .json is not valid UTF-8 ({e})", check_only)
        raw = next((meta[k] for k in AESTHETIC_FIELDS if meta.get(k) is not None), None)  # a score: json, else member
        if raw is None:
            raw = next((group[e].decode("utf-8", "replace").strip() for e in AESTHETIC_EXTS if e in group), None)
        try:  # JSON true is no score, though float(True) is 1.0
            aesthetic = None if raw is None else float("nan" if isinstance(raw, bool) else raw)
        except (TypeError, ValueError, OverflowError):  # a list, "high", a 400-digit integer
            aesthetic = math.nan
        if aesthetic is not None and not math.isfinite(aesthetic):  # also 1e999, true, NaN
            self._reject("bad_aesthetic", f"{where}: aesthetic score {str(raw)[:40]!r} is not a finite number; "
                         f"using the default", check_only)  # fmt: skip
            aesthetic = None
        if aesthetic is None:  # no score, or not a usable one: the default, and the sample is kept
            aesthetic = self.default_aesthetic
        elif self.min_aesthetic is not None and aesthetic < self.min_aesthetic:
            return self._reject("filtered_aesthetic", f"{where}: {aesthetic:.2f} < {self.min_aesthetic}", check_only)
        return {"caption": caption, "recaption": strip_recaption_prefix(recaption),
                "aesthetic": torch.tensor(aesthetic, dtype=torch.float32), "key": where}  # fmt: skip

    def _stream(self, slot, n_slots, position):
        """(raw sample, this reader's position after it) from `position` on, block by block."""
        epoch, shard, offset, seen, taken = position
        size = self.buffer_size if self.shuffle and self.buffer_size > 1 else 1
        while True:
            whole_pass = (shard, offset, seen) == (0, 0, 0)
            groups = self._epoch_groups(epoch, slot, n_slots, (shard, offset, seen))
            n = 0
            while block := list(itertools.islice(groups, size)):
                n += len(block)
                seed = [self.seed, 1, slot, n_slots, epoch, shard, offset, seen]  # where the block starts
                order = np.random.default_rng(seed).permutation(len(block)) if size > 1 else range(len(block))
                for i in range(taken, len(block)):
                    group = block[order[i]]
                    group["__epoch__"] = epoch
                    yield group, (epoch, shard, offset, seen, i + 1)
                (shard, offset, seen), taken = block[-1]["__next__"], 0
            if not self.infinite:
                return
            if whole_pass and n == 0:
                raise RuntimeError(f"{type(self).__name__}: reader {slot} of {n_slots} (rank x DataLoader worker) got "
                                   f"no readable sample in a whole pass (skips so far: {self.skipped.summary()}). "
                                   f"Check the data path, or use fewer DataLoader workers than there are samples.")
            epoch, shard, offset, seen = epoch + 1, 0, 0, 0

    def __iter__(self):
        worker, num_workers = worker_slot()
        logical = (self.start_batch + worker) % num_workers
        slot, n_slots = self.rank * num_workers + logical, self.world_size * num_workers
        if self.positions is not None and len(self.positions) != num_workers:
            raise ValueError(f"{len(self.positions)} saved reader positions for {num_workers} DataLoader worker(s); "
                             f"resume with the num_workers the positions were saved with")  # fmt: skip
        saved = None if self.positions is None else self.positions[logical].tolist()
        known = saved is not None and saved[0] >= 0
        # Without a saved position: regenerate and skip the samples of its batches among 0 .. start_batch - 1.
        made = max(0, (self.start_batch - logical + num_workers - 1) // num_workers)
        to_skip = 0 if known else made * self.batch_size
        produced = failures = n_groups = 0
        for group, after in self._stream(slot, n_slots, saved if known else START):
            n_groups += 1
            fast_forward = produced < to_skip
            try:  # no sample can stop the run: whatever a decoder did not foresee is a skip too
                sample = (self._decode(group, check_only=fast_forward) if "__too_large__" not in group else  # unread
                          self._reject("member_too_large", f"{sample_name(group)}: {group['__too_large__']}",
                                       fast_forward))  # fmt: skip
            except Exception as e:
                sample = self._reject("undecodable", f"{sample_name(group)}: {type(e).__name__}: {e}", fast_forward)
            if sample is None:
                failures += 1
                if self.infinite and failures >= self.max_consecutive_skips:
                    raise RuntimeError(f"{type(self).__name__}: {failures} samples in a row were skipped "
                                       f"({self.skipped.summary()}); check the filters (min_longer_side, "
                                       f"max_aspect_ratio, min_aesthetic) and the shard contents")  # fmt: skip
                continue
            failures = 0
            produced += 1
            if not fast_forward:
                sample["position"] = torch.tensor(after, dtype=torch.int64)  # (5,): where to resume after it
                yield sample
        if produced == 0 and n_groups:
            log.warning("data: %s yielded none of its samples in reader %d of %d; skipped: %s (for small images, lower "
                        "min_longer_side)", type(self).__name__, slot, n_slots, self.skipped.summary())  # fmt: skip


def source_changes(saved, now):
    """None where two StreamDataset.sources() records match, else a line naming what changed (size -1: no file)."""
    if saved["sha256"] == now["sha256"]:
        return None
    old, new = (dict(e.rsplit("\t", 1) for e in zlib.decompress(r["list"]).decode().split("\n")) for r in (saved, now))
    diff = {"added": [n for n in new if old.get(n, "-1") == "-1" != new[n] or n not in old],
            "missing": [n for n in old if new.get(n, "-1") == "-1" != old[n] or n not in new],
            "resized": [f"{n} ({old[n]} -> {new[n]} bytes)" for n in new if "-1" != old.get(n, "-1") != new[n] != "-1"]}
    text = "; ".join(f"{len(v)} {k}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for k, v in diff.items() if v)
    return f"{saved['count']} shards then, {now['count']} now; {text or 'the same shards in another order'}"


class StreamPositions:
    """Where each reader of this rank stands after the batches consumed, for StreamDataset(positions=).
    Batches come round-robin: batch b from logical worker b % W, now at its last sample's "position".
    Use: StreamPositions(W, start, ckpt["data_positions"][rank]) -> dataset(positions=.saved) -> consumed(batch)
    for each batch -> ckpt["data_positions"] = [every rank's state()] (train_common.resume_positions, run_state)."""

    def __init__(self, num_workers, start_batch=0, saved=None, sources=None, new_epoch=False):
        self.workers, self.batch = max(1, int(num_workers)), int(start_batch)
        self.sources = sources  # StreamDataset.sources(): the shard list positions point into, for the checkpoint
        if saved is not None and saved["num_workers"] != self.workers:
            raise ValueError(f"the checkpoint's data positions are for {saved['num_workers']} readers, this run has "
                             f"{self.workers}: resume with --num_workers={saved['num_workers']} (who reads what)")
        self.saved = None if saved is None else saved["positions"].clone()
        if new_epoch:  # re-planned on another shard list: each reader that knows its place starts its next epoch
            known = self.saved[:, 0] >= 0
            self.saved[known, 0] += 1
            self.saved[known, 1:] = 0
        # A fresh run's readers are at their start; a run resumed without positions does not know yet (-1).
        unknown = torch.full((self.workers, len(POSITION_FIELDS)), -1 if start_batch else 0, dtype=torch.int64)
        self.table, self.tracked = (unknown if self.saved is None else self.saved.clone()), False

    def consumed(self, batch):
        """Record a batch the trainer took (batches without "position": nothing to track)."""
        if "position" in batch:
            self.table[self.batch % self.workers] = batch["position"][-1]
            self.tracked = True
        self.batch += 1

    def state(self):
        """{"num_workers", "positions": LongTensor (W, 5)} for the checkpoint; None if not a stream."""
        return {"num_workers": self.workers, "positions": self.table.clone()} if self.tracked else None

"""
One tar shard's bytes, both ways: opening a shard (a local file, a pipe: command or
a URL), grouping its members into samples, and writing shards. shards.py's stream
reads every shard through `iter_tar_groups`; pretokenize.py and `data.py make-shapes`
write with ShardWriter.

A shard is one of three sources (webdataset's conventions):
  * a local file, "data/000123.tar" (or .tar.gz / .tgz). A plain tar can be opened at
    any sample's byte offset: a resumed run seeks straight to where it stopped.
  * "pipe:COMMAND": COMMAND runs in a shell and the tar is read from its stdout, e.g.
    "pipe:aws s3 cp s3://bucket/000123.tar -" or "pipe:gsutil cat gs://bucket/000123.tar".
    A command that fails (non-zero exit, missing program) counts as an unreadable shard,
    with the end of its stderr in the log; stdin is closed, so a command that asks
    for input fails instead of waiting. (A data spec is thus a shell command line:
    take one only from whom you would let run commands.)
  * "http://..." / "https://...": streamed with urllib (never downloaded whole); an HTTP
    or network error counts as an unreadable shard.
A pipe or a URL cannot seek, and neither can a compressed tar: to start at an offset
they read the shard from its beginning and drop the members before it. Resuming them
therefore costs one partial shard, not a replay of the run.

Cuts and damage. A well-formed tar ends with a block of zeros. When the bytes end (or
turn to garbage) before it, every complete sample before the cut is kept, a sample
whose member is cut is dropped, and the shard counts once as "truncated_member",
whether the cut falls inside a member's data, at a member boundary or inside a header.

    for group in iter_tar_groups("data/000123.tar", skipped):   # skipped: a SkipCounter
        group["__key__"], group["jpg"], group["txt"], group["__end__"]

Sections: 1. Opening a shard (is_remote, open_shard)  2. Reading its samples
(split_key, iter_tar_groups)  3. Writing shards (ShardWriter, encode_npy / decode_npy).
"""

import io
import json
import os
import re
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np

# What a broken tar, a failing pipe or a dropped connection raises while it is read.
READ_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error)
URL_TIMEOUT_S = 60  # seconds without a byte from an http(s) shard before it counts as unreadable
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: these cannot seek to a member
PIPE_TAIL_BYTES = 1 << 20  # what a pipe may still send after its tar's end (tar pads to 10 KiB records)

# =============================================================================
# 1. Opening a shard: a local file (seekable), a pipe: command, a URL
# =============================================================================


def is_remote(source):
    """Whether a shard name is a pipe: command or an http(s):// URL rather than a file."""
    return source.startswith("pipe:") or re.match(r"https?://", source) is not None


def open_shard(source, offset=0):
    """Open a shard's bytes, positioned at `offset` where it can seek there.

    Returns (file object, start, finish): `start` is the byte of the tar the file object
    begins at (offset for a plain local file, else 0: the caller reads forward to the
    offset). finish(completed) closes everything and returns why the source failed (a
    pipe's exit status and stderr), or None; completed=False (the reader stopped early)
    ends a pipe's command without judging it. Raises OSError when the source cannot be
    opened at all (a missing file, an HTTP error, an unreachable host)."""
    if source.startswith("pipe:"):
        stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        proc = subprocess.Popen(source[len("pipe:"):], shell=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr)  # fmt: skip

        def finish(completed):
            # After the tar's end only its padding should follow: read it, so that the command
            # is not cut off mid-write. More than that (a cut tar, a command that goes on) is
            # not waited for: the command is stopped and, having been stopped, not judged.
            if completed and proc.stdout.read(PIPE_TAIL_BYTES) and proc.stdout.read(1):
                completed = False
            if proc.poll() is None and not completed:
                proc.kill()
            proc.stdout.close()
            status = proc.wait()
            stderr.seek(0)
            message = stderr.read()[-600:].decode("utf-8", "replace").strip()
            stderr.close()
            if completed and status != 0:
                return f"{source}: the command exited with status {status}: {message or '(nothing on stderr)'}"
            return None

        return proc.stdout, 0, finish
    if re.match(r"https?://", source):
        response = urllib.request.urlopen(source, timeout=URL_TIMEOUT_S)  # HTTPError / URLError are OSErrors
        return response, 0, lambda completed: response.close()
    f = open(source, "rb")
    seekable = offset > 0 and not f.read(6).startswith(COMPRESSED_MAGIC)
    f.seek(offset if seekable else 0)
    return f, offset if seekable else 0, lambda completed: f.close()


# =============================================================================
# 2. Reading a shard's samples: members grouped by key, cuts detected
# =============================================================================


def split_key(name):
    """Tar member name -> (key, extension): "a/b/000001.recap.txt" -> ("a/b/000001", "recap.txt")."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or stem.startswith("__"):
        return None, None  # no extension, a hidden "._x" file, or a "__meta__" member
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class _Header(tarfile.TarInfo):
    """tarfile's member header that also remembers why reading headers stopped: tarfile
    ends an iteration silently on the end-of-archive zero block (a clean end), but also
    on no bytes at all, a partial header or a damaged one (a cut)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.stopped_by = e
            raise


def _cut(tar, base):
    """Why an iteration that raised nothing ended: None for a clean end, else the cut."""
    stop = getattr(tar, "stopped_by", None)
    where = f"at byte {base + tar.offset}"
    if stop is None or isinstance(stop, tarfile.EOFHeaderError):
        return None  # the end-of-archive block
    if isinstance(stop, tarfile.EmptyHeaderError):
        return f"the tar ends {where}, at a member boundary, without its end-of-archive blocks"
    if isinstance(stop, tarfile.TruncatedHeaderError):
        return f"the tar ends {where}, inside a member header"
    return f"a damaged member header {where} ({stop})"


def _groups(fileobj, source, start, skip_to):
    """Yield the samples of an open tar stream (see iter_tar_groups); return the problem
    that ended it, (reason, detail), or None after a clean end. `start` is the tar byte
    where fileobj begins; members before byte `skip_to` are passed over unread."""
    try:
        # "r|": a forward-only stream (what a pipe or a socket allows); "r|*" also detects
        # compression, which only a stream from the shard's first byte can have.
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
                try:
                    data = tar.extractfile(member).read()
                except READ_ERRORS as e:  # this member is cut: its sample is dropped
                    return "truncated_member", f"{source}: sample {key!r} is cut in {member.name} ({e})"
                if group is None:
                    group = {"__key__": key, "__shard__": source}
                group[ext] = data
                group["__end__"] = start + tar.offset  # the tar byte after this member: where a reader resumes
            problem = _cut(tar, start)
        except READ_ERRORS as e:
            problem = f"{type(e).__name__}: {e} after byte {start + tar.offset}"
    if group is not None:
        yield group
    return None if problem is None else ("truncated_member", f"{source}: {problem}; the rest of this shard is lost")


def iter_tar_groups(source, skipped=None, offset=0):
    """Yield one dict per sample of a shard, in file order, from byte `offset` on (a
    sample's start, as recorded in "__end__" of the sample before it):
        {"__key__": key, "__shard__": source, "__end__": byte after the sample, "<ext>": bytes, ...}
    A shard that cannot be read counts "unreadable_shard"; a tar that is cut or damaged
    counts "truncated_member" (see the module docstring); each at most once per call.
    `skipped` is a shards.SkipCounter, or None to count nothing."""
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


# =============================================================================
# 3. Writing shards
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

"""
Checkpoint files, at the lowest level: reading one safely, and loading a state dict so
that every key that does not fit is named.

No paper section: this is plumbing shared by the models (tokenizer.py, maskgen.py), the
official-release reader (official.py) and every entry point. It imports torch only.

    torch_load(path)                      a checkpoint file -> its object (tensors on the CPU)
    atomic_write(path, write)             a file that is complete or absent (temporary file + rename)
    write_dir(out, write, overwrite)      a directory's content written beside it, then moved in
    mismatch_error(where, missing, ...)   the one report of keys that do not fit a model
    load_checked(model, sd, where)        load_state_dict that raises that report
    newest_checkpoint(run_dir)            a run folder's newest good ckpt_*.pt -> (path, ckpt)
    save_checkpoint(out_dir, step, ...)   write one with its checksum, atomically; keep the newest good
"""

import glob
import hashlib
import os
import pickle
import re
import shutil
import tempfile
import warnings

import torch


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint. .path, .cause: what is wrong with it."""

    def __init__(self, path, cause, fix):
        super().__init__(f"{path!r} {cause}. {fix}")
        self.path, self.cause = path, cause


# Said for every file torch cannot read: which files this project can read.
_OURS = ("pass a file written by train_tokenizer.py, train_maskgen.py or `sample.py bundle`, or an "
         "official release directory (config.json + model.safetensors)")  # fmt: skip


def torch_load(path):
    """torch.load for files we did not write ourselves in this process: weights_only, so a
    checkpoint is data and never code; memory-mapped, so a big file is not read twice.
    A file that cannot be read raises CheckpointError naming it and the cause; torch's own
    advice to load it unsafely (with weights_only=False) is never passed on."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": noise before the real error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # files in the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # missing, a directory, unreadable: the OS error names the file already
        raise
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path, e):
    """The CheckpointError for a file that torch.load (weights_only) refused with `e`: what
    the file is and why, in our words; torch's advice to load it unsafely is dropped."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        return CheckpointError(path, "is empty, not a checkpoint", f"Fix: {_OURS}")
    if not head.startswith((b"PK", b"\x80")):  # neither a zip archive (torch.save) nor a pickle (legacy)
        return CheckpointError(path, "is not a PyTorch checkpoint file (neither a zip archive nor a pickle)", f"Fix: {_OURS}")
    if isinstance(e, pickle.UnpicklingError):  # weights_only refused something: never code, so never ours
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        what = (f"a Python object of type {found[1]}" if found else "pickled data beyond tensors and plain values "
                f"({reason[1].strip().split('. ')[0] if reason else 'unknown content'})")  # fmt: skip
        return CheckpointError(path, f"is not a checkpoint this project wrote: it holds {what}, which is not "
                               "loaded because unpickling it could run code", f"Fix: {_OURS}")  # fmt: skip
    if isinstance(e, (RuntimeError, EOFError)):  # "PytorchStreamReader failed ...": cut short or damaged
        cause = f"is damaged or incomplete (torch: {str(e).split('. ')[0] or type(e).__name__})"
        return CheckpointError(path, cause, "Fix: copy it again or use an earlier checkpoint")
    return CheckpointError(path, f"cannot be read as a checkpoint (torch.load: {type(e).__name__}: {e})", f"Fix: {_OURS}")


def atomic_write(path, write):
    """Write a file that is either complete or absent: write(f) fills path + '.tmp', which
    is flushed to disk and renamed over path (atomic on POSIX). On any failure (a full
    disk, a signal, an exception in write) the temporary file is removed."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def check_out_file(out, overwrite, flag="--overwrite"):
    """Refuse, before any work, to write file `out` over a directory, or over a file unless asked."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a directory; give the file to write, e.g. {os.path.join(out, 'bundle.pt')}")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"--out {out!r} exists; pass {flag} to replace it, or choose another file name")


def check_out_dir(out, overwrite, flag="--overwrite"):
    """Refuse, before any work, to write into `out` when it is a file, or a non-empty
    directory unless asked."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; give a directory to write into")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not overwrite:
        more = f", ... ({len(held)} entries)" if len(held) > 4 else ""
        raise ValueError(f"--out {out!r} is not empty (it holds {', '.join(held[:4])}{more}); pass {flag} to replace "
                         f"what this command writes there, or choose an empty or new directory")  # fmt: skip


def write_dir(out, write, overwrite=False):
    """Fill directory `out`: write(tmp) fills a fresh temporary folder beside it, whose
    entries then replace those of the same name in `out` (other entries are left alone).
    A failure leaves `out` as it was and removes the temporary folder. Returns the names."""
    check_out_dir(out, overwrite)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp", dir=parent)
    try:
        write(tmp)
        os.makedirs(out, exist_ok=True)
        names = sorted(os.listdir(tmp))
        for name in names:
            dst = os.path.join(out, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            elif os.path.lexists(dst):
                os.remove(dst)
            os.replace(os.path.join(tmp, name), dst)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mismatch_error(where, missing, unexpected, shapes, model="the model built from its config",
                   fix="Check that the config belongs to these weights (same variant and size)."):  # fmt: skip
    """A RuntimeError naming every missing / unexpected key and every shape mismatch
    ("key: checkpoint (..) vs model (..)"), at most 20 of each; None when all fit."""
    if not (missing or unexpected or shapes):
        return None

    def show(xs):
        return "\n    ".join(xs[:20]) + (f"\n    ... and {len(xs) - 20} more" if len(xs) > 20 else "")

    msg = [f"checkpoint {where!r} does not match {model}:"]
    for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            msg.append(f"  {name} ({len(keys)}):\n    {show(keys)}")
    msg.append(f"  {fix}")
    return RuntimeError("\n".join(msg))


def load_checked(model, sd, where):
    """model.load_state_dict(sd), but a mismatch names every key that does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]  # fmt: skip
    err = mismatch_error(where, missing, unexpected, shapes)
    if err is not None:
        raise err
    model.load_state_dict(sd)
    return model


# -----------------------------------------------------------------------------
# Run folders: ckpt_<step>.pt files, each written atomically and carrying a checksum of its
# content. A file is "good" when it loads, its checksum matches and its model/EMA weights
# are finite; only good files are resumed from, read, or counted by retention.


def content_digest(obj):
    """sha256 over a checkpoint's content: every tensor's dtype, shape and bytes and every
    other value's repr, walked in a fixed order (dict keys sorted). A file damaged in any
    byte of its data, or torn, cannot reproduce it."""
    h = hashlib.sha256()

    def walk(x):
        if torch.is_tensor(x):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"D")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"L" if isinstance(x, list) else b"U")
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())
        h.update(b";")

    walk(obj)
    return h.hexdigest()


def nonfinite_weights(ckpt):
    """Names of the model / EMA tensors of a checkpoint that hold nan or inf (at most 5)."""
    bad = [f"{part}.{k}" for part in ("model", "ema") if isinstance(ckpt.get(part), dict)
           for k, v in ckpt[part].items()
           if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]  # fmt: skip
    return bad[:5]


def load_good(path):
    """(checkpoint, None) when the run-folder checkpoint at `path` is good, else (None, why)."""
    try:
        ckpt = torch_load(path)
    except CheckpointError as e:  # truncated zip, bad pickle, ...
        return None, f"unreadable ({e.cause[:160]})"
    except Exception as e:
        return None, f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(ckpt, dict):
        return None, f"not a checkpoint dict ({type(ckpt).__name__})"
    digest = ckpt.pop("sha256", None)
    if digest is not None and digest != content_digest(ckpt):  # files from before checksums have none
        return None, "checksum mismatch (its content was damaged)"
    bad = nonfinite_weights(ckpt)
    if bad:
        return None, f"non-finite weights ({', '.join(bad)})"
    return ckpt, None


def run_checkpoints(run_dir):
    """A run folder's ckpt_*.pt files, newest first (zero-padded step numbers sort in order)."""
    return sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")), reverse=True)


def newest_checkpoint(run_dir, log=print, rejected=None):
    """(path, checkpoint) of the newest good ckpt_*.pt in a training run's folder, or
    (None, None) when it holds none. A bad file is reported and skipped (and appended as
    (path, why) to `rejected` when given), and the one before it is used."""
    paths = run_checkpoints(run_dir)
    for i, path in enumerate(paths):
        ckpt, why = load_good(path)
        if ckpt is not None:
            return path, ckpt
        if rejected is not None:
            rejected.append((path, why))
        more = "; falling back to the previous one" if i + 1 < len(paths) else ""
        log(f"warning: checkpoint {path} is {why}{more}")
    return None, None


_GOOD = {}  # (path, size, mtime) -> is it good: retention checks each file once per process


def save_checkpoint(out_dir, step, payload, keep=2, log=print):
    """Write ckpt_<step>.pt with its checksum, atomically (a temporary file, fsync, rename:
    a crash mid-write leaves no ckpt_*.pt), then keep the newest `keep` good checkpoints.
    Bad files are left alone and named; the newest good one is never deleted. A payload
    whose weights are not finite is refused (ValueError): it would only spread."""
    bad = nonfinite_weights(payload)
    if bad:
        raise ValueError(f"refusing to write a checkpoint with non-finite weights ({', '.join(bad)})")
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    atomic_write(path, lambda f: torch.save({**payload, "sha256": content_digest(payload)}, f))
    st = os.stat(path)
    _GOOD[(path, st.st_size, st.st_mtime_ns)] = True
    good, unreadable = [], []
    for p in run_checkpoints(out_dir):
        st = os.stat(p)
        key = (p, st.st_size, st.st_mtime_ns)
        if key not in _GOOD:
            _GOOD[key] = load_good(p)[0] is not None
        (good if _GOOD[key] else unreadable).append(p)
    for old in good[max(1, keep):]:
        os.remove(old)
    if unreadable:
        log(f"warning: left alone, not counted as checkpoints (bad files): {', '.join(unreadable)}")
    return path

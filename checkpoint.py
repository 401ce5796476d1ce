"""
Checkpoint files, at the lowest level: reading one safely, and loading a state dict so
that every key that does not fit is named.

No paper section: this is plumbing shared by the models (tokenizer.py, maskgen.py), the
official-release reader (official.py) and every entry point. It imports torch only.

    torch_load(path)                      a checkpoint file -> its object (tensors on the CPU)
    mismatch_error(where, missing, ...)   the one report of keys that do not fit a model
    load_checked(model, sd, where)        load_state_dict that raises that report
    newest_checkpoint(run_dir)            a run folder's newest good ckpt_*.pt -> (path, ckpt)
    save_checkpoint(out_dir, step, ...)   write one with its checksum, atomically; keep the newest good
"""

import glob
import hashlib
import os

import torch


def torch_load(path):
    """torch.load for files we did not write ourselves in this process: weights_only, so a
    checkpoint is data and never code; memory-mapped, so a big file is not read twice."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


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
    except Exception as e:  # truncated zip, bad pickle, ...
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
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({**payload, "sha256": content_digest(payload)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:  # a full disk, a signal: leave no half-written .tmp behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
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

"""
Reading and writing models: checkpoint files and training-run folders, the official release layout of
TA-TiTok (paper §3.2) and MaskGen (§3.3, §4.2), Hugging Face Hub ids, and the loader that turns a reference
into a tokenizer and a generator checked to fit each other (§4.2: MaskGen-VQ works on TA-TiTok's VQ ids,
MaskGen-KL on its continuous KL tokens; both read CLIP text features). The official names (config.json
field tables, weight renames) sit at the end of tokenizer.py and maskgen.py, which never import this file.

Every entry point accepts any model reference (resolve()):
    a release directory   config.json + model.safetensors, the official Hugging Face layout; the shipped
                          models are checkpoints/shapes{,_kl}/{generator,tokenizer}/ (fp16)
    a Hub id              owner/name, hf-hub:owner/name or owner/name@revision (a local path of that name wins)
    a training run        a folder of ckpt_*.pt, read at its newest good one
    a checkpoint file     one ckpt_*.pt written by train_tokenizer.py / train_maskgen.py
The pairing checks read only the configs, so a wrong pairing is refused before any model is built.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from typing import NamedTuple, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import maskgen as M
import tokenizer as T
from text import TEXT_PRESETS, build_text_encoder

# -----------------------------------------------------------------------------
# Reading a checkpoint file safely (weights_only: a checkpoint is data, never code); writing a file, or a
# directory's content, so that it appears whole or not at all; weights that do not fit or are not finite.


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint; .cause says what is wrong with it."""

    def __init__(self, path, cause, fix):
        super().__init__(f"{path!r} {cause}. {fix}")
        self.path, self.cause = path, cause


def torch_load(path):
    """torch.load, weights_only and memory-mapped, for files this process did not write. A file that cannot
    be read raises CheckpointError in our words, never torch's advice to pass weights_only=False."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # missing, a directory, unreadable: the OS error names the file already
        head = f.read(4)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": noise before the real error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # Only a zip archive (torch.save) can be memory-mapped, not the legacy format (a pickle).
            return torch.load(path, map_location="cpu", weights_only=True, mmap=head == b"PK\x03\x04")
    except Exception as e:
        fix = ("Fix: pass a file written by train_tokenizer.py or train_maskgen.py, or a release directory "
               "(config.json + model.safetensors)")
        if not head:
            cause = "is empty, not a checkpoint"
        elif not head.startswith((b"PK", b"\x80")):  # neither a zip archive (torch.save) nor a pickle (legacy)
            cause = "is not a PyTorch checkpoint file (neither a zip archive nor a pickle)"
        elif isinstance(e, pickle.UnpicklingError):  # weights_only refused something: never code, so never ours
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            what = (f"a Python object of type {found[1]}" if found else "pickled data beyond tensors and plain "
                    f"values ({reason[1].strip().split('. ')[0] if reason else 'unknown content'})")
            cause = (f"is not a checkpoint this project wrote: it holds {what}, which is not loaded because "
                     "unpickling it could run code")
        elif isinstance(e, (RuntimeError, EOFError)):  # "PytorchStreamReader failed ...": cut short or damaged
            cause = f"is damaged or incomplete (torch: {str(e).split('. ')[0] or type(e).__name__})"
            fix = "Fix: copy it again or use an earlier checkpoint"
        else:
            cause = f"cannot be read as a checkpoint (torch.load: {type(e).__name__}: {e})"
        raise CheckpointError(path, cause, fix) from None


def atomic_write(path, write):
    """write(f) fills path + '.tmp', which is flushed to disk and renamed over path (atomic on POSIX); on
    any failure (a full disk, a signal, an exception in write) the temporary file is removed."""
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


def check_fit(where, missing, unexpected, shapes, model="the model built from its config",
              fix="Check that the config belongs to these weights (same variant and size)."):
    """Raise a RuntimeError listing missing / unexpected keys and shape mismatches (20 of each at most)."""
    msg = [f"checkpoint {where!r} does not match {model}:"]
    for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            msg.append(f"  {name} ({len(keys)}):\n    " + "\n    ".join(keys[:20]) + more)
    if len(msg) > 1:
        raise RuntimeError("\n".join(msg + [f"  {fix}"]))


def load_checked(model, sd, where):
    """model.load_state_dict(sd), but a mismatch names every key that does not fit."""
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]  # fmt: skip
    check_fit(where, sorted(set(own) - set(sd)), sorted(set(sd) - set(own)), shapes)
    model.load_state_dict(sd)
    return model


def nonfinite(named):
    """The names among (name, tensor) pairs, or of a checkpoint dict's model / EMA tensors, whose floating-point
    tensor holds nan or inf (at most 5)."""
    if isinstance(named, dict):
        parts = [p for p in ("model", "ema") if isinstance(named.get(p), dict)]
        named = [(f"{p}.{k}", v) for p in parts for k, v in named[p].items()]
    return [k for k, v in named if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()][:5]


# -----------------------------------------------------------------------------
# Run folders: ckpt_<step>.pt files, each written atomically with a checksum of its content. A "good" file
# loads, matches its checksum and holds finite weights; only good files are resumed from, read or kept.


def content_digest(obj):
    """sha256 over every tensor's dtype, shape and bytes and every other value's repr, in a fixed order
    (dict keys sorted): a file damaged in any byte of its data, or torn, cannot reproduce it."""
    h = hashlib.sha256()

    def walk(x):  # a tag per node (T tensor, D dict, L list, U tuple), so equal bytes in another shape differ
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


def load_good(path, strict=False):
    """(checkpoint, None) when the run-folder checkpoint at `path` is good, else (None, why). strict (a trainer's
    resume and retention): a file without a checksum was not written by save_checkpoint, so it is not good."""
    try:
        ckpt = torch_load(path)
    except Exception as e:  # CheckpointError: a truncated zip, a bad pickle, ...
        why = e.cause[:160] if isinstance(e, CheckpointError) else f"{type(e).__name__}: {str(e)[:120]}"
        return None, f"unreadable ({why})"
    if not isinstance(ckpt, dict):
        return None, f"not a checkpoint dict ({type(ckpt).__name__})"
    digest = ckpt.pop("sha256", None)
    if digest is None and strict:
        return None, "without a checksum (not written by a training run)"
    if digest is not None and digest != content_digest(ckpt):  # a file written without a checksum is not checked
        return None, "checksum mismatch (its content was damaged)"
    bad = nonfinite(ckpt)
    return (None, f"non-finite weights ({', '.join(bad)})") if bad else (ckpt, None)


def run_checkpoints(run_dir, log=None):
    """A run folder's ckpt_<step>.pt files, highest step first. Other ckpt_* entries (ckpt_best.pt, a .bak copy,
    a .tmp left by a crash) were not written by a run: never read nor deleted, named to `log` when given."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    steps = {n: int(m[1]) for n in names if (m := re.fullmatch(r"ckpt_(\d+)\.pt", n))}
    if log and (others := sorted(n for n in names if n.startswith("ckpt_") and n not in steps)):
        log(f"note: ignoring {', '.join(others)} in {run_dir}: only ckpt_<step>.pt files are checkpoints")
    return [os.path.join(run_dir, n) for n in sorted(steps, key=steps.get, reverse=True)]


def newest_checkpoint(run_dir, log=print, rejected=None, strict=False):
    """(path, checkpoint) of the newest good ckpt_<step>.pt in a run folder, or (None, None). Each bad file
    before it is logged (and appended as (path, why) to `rejected` when given); strict as load_good."""
    paths = run_checkpoints(run_dir, log)
    for i, path in enumerate(paths):
        ckpt, why = load_good(path, strict)
        if ckpt is not None:
            return path, ckpt
        if rejected is not None:
            rejected.append((path, why))
        more = "; falling back to the previous one" if i + 1 < len(paths) else ""
        log(f"warning: checkpoint {path} is {why}{more}")
    return None, None


_GOOD = {}  # (path, size, mtime) -> is it good: retention checks each file once per process


def save_checkpoint(out_dir, step, payload, keep=2, log=print):
    """Write ckpt_<step>.pt with its checksum atomically, then keep the newest `keep` good checkpoints and the
    one just written (bad files, and any not named ckpt_<step>.pt, are left alone). Non-finite weights are refused
    (ValueError): they would only spread."""
    if bad := nonfinite(payload):
        raise ValueError(f"refusing to write a checkpoint with non-finite weights ({', '.join(bad)})")
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    atomic_write(path, lambda f: torch.save({**payload, "sha256": content_digest(payload)}, f))
    good, unreadable = [], []
    for p in run_checkpoints(out_dir):
        key = (p, (st := os.stat(p)).st_size, st.st_mtime_ns)
        if key not in _GOOD:  # the file just written is good: it is not read back
            _GOOD[key] = p == path or load_good(p, strict=True)[0] is not None
        (good if _GOOD[key] else unreadable).append(p)
    for old in good[max(1, keep):]:  # the newest good one is never deleted, nor the one just written
        if old != path:
            os.remove(old)
    if unreadable:
        log(f"warning: left alone, not counted as checkpoints (bad files): {', '.join(unreadable)}")
    return path


# -----------------------------------------------------------------------------
# The release layout of the authors' Hugging Face repositories (turkeyju/tokenizer_tatitok_*,
# turkeyju/generator_maskgen_*): config.json, the official nested (OmegaConf) config, and model.safetensors (or
# pytorch_model.bin) under the official code's weight names, renamed and re-laid-out to ours by release_view in
# tokenizer.py and maskgen.py. Our releases may add top-level entries that the official code ignores:
# "text_encoder" (a tower other than OpenAI's CLIP; a small random one's weights in text_encoder.safetensors),
# "tokenizer" (a generator's tokenizer, relative to its directory) and EXTRA.


class Release:
    """A release directory's weights, read lazily: .file, .keys, .shape(key), .get(key). Tensors are read
    one at a time (a .bin memory-mapped), so loading holds one copy of the weights (1.1B for MaskGen-XL)."""

    def __init__(self, path):
        self.path = path = os.fspath(path)
        st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if not (os.path.isfile(st) or os.path.isfile(pt)):
            raise FileNotFoundError(f"{path!r} has neither model.safetensors nor pytorch_model.bin; "
                                    "re-download the release")
        self.file = st if os.path.isfile(st) else pt
        self._st, self._sd = (open_safetensors(st), None) if self.file == st else (None, torch_load(pt))
        self.keys = list(self._st.keys() if self._st is not None else self._sd.keys())

    def shape(self, key):
        return tuple(self._st.get_slice(key).get_shape()) if self._st is not None else tuple(self._sd[key].shape)

    def get(self, key):
        return self._st.get_tensor(key) if self._st is not None else self._sd[key]


def read_config(path):
    """A release's config.json (the file or its directory) -> dict; anything else is a ValueError."""
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.loads(text) if (text := f.read()).strip() else None
        why = (None if isinstance(cfg, dict) else "is empty (an interrupted download or copy?)" if cfg is None
               else f"holds a JSON {type(cfg).__name__}, not the object a config.json is")
    except UnicodeDecodeError:
        why = "is not a text file (not UTF-8), so not a config.json"
    except json.JSONDecodeError as e:
        why = f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
    if why:
        raise ValueError(f"{path} {why}; re-download the release, or re-export it with `python sample.py export`")
    return cfg


def open_safetensors(path):
    """safe_open(path), with a damaged or truncated file named in the error."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors' own error type: "Error while deserializing header: ..."
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it is damaged or incomplete: "
                         f"download or write it again") from None


# config.json fields <-> ours, one table per model read both ways (TATITOK_FIELDS, MASKGEN_FIELDS):
# ("section.official_key", our field[, the value assumed when a release leaves it out; else REQUIRED]). Our
# fields the official layout has no place for (e.g. pos_init_std) go to EXTRA, only when they differ from what
# the official fields give, so the release of an official-size model stays official. EXTRA also holds RECORDS,
# what a release knows of itself (save_release): "sha256" of each weights file, "inputs" (the digest of the tokenizer
# the generator was trained on, as train_maskgen.py pins it) and "vocabulary" (the words of the shapes world).
REQUIRED, EXTRA, RECORDS = object(), "extra_fields", ("sha256", "inputs", "vocabulary")


def _fields(table, mode):
    """(section, official key, our field, default) for every field of `mode` in a field table."""
    return [(*f[0].split("."), f[1], f[2] if len(f) > 2 else REQUIRED) for f in table["any"] + table[mode]]


def _unwrap(d):
    """A config.json dict, or the one a hub-mixin wrapper holds under "config"."""
    return d["config"] if "model" not in d and isinstance(d.get("config"), dict) else d


def config_kwargs(d, maskgen, path="config.json"):
    """A MaskGen (maskgen) or TA-TiTok config.json dict -> MaskGenConfig / TATiTokConfig(**kwargs), by the field
    table, then kwargs_from_official(sections, kwargs, mode, path) for what the table cannot; a missing field, or
    one of the wrong kind, is a ValueError."""
    d, (mod, table) = _unwrap(d), (M, M.MASKGEN_FIELDS) if maskgen else (T, T.TATITOK_FIELDS)
    try:
        # The sections the tables name: model.vq_model, model.maskgen, losses, dataset.preprocessing.
        s = dict(d["model"], losses=d.get("losses", {}), preprocessing=d.get("dataset", {}).get("preprocessing", {}))
        mode = {"vq": "vq", "vae": "kl"}[s["vq_model"].get("quantize_mode", "vq")]
        kw = {ours: s[sec][key] if default is REQUIRED else s[sec].get(key, default)
              for sec, key, ours, default in _fields(table, mode)}  # fmt: skip
        mod.kwargs_from_official(s, kw, mode, path)
    except (KeyError, TypeError, AttributeError) as e:
        why = f"missing field {e}" if isinstance(e, KeyError) else f"a field of the wrong kind ({e})"
        what = ("MaskGen config.json: {} (expected model.vq_model, model.maskgen, losses)" if maskgen else
                "TA-TiTok config: {} (expected model.vq_model and dataset.preprocessing.crop_size)")
        raise ValueError(f"{path} is not a " + what.format(why)) from None
    return {**kw, **{k: v for k, v in d.get(EXTRA, {}).items() if k not in RECORDS}}


def release_config(model):
    """config.json content for `model`: the official layout, plus EXTRA for the fields of model.config
    that the official fields do not give back."""
    c, is_maskgen = model.config, hasattr(model.config, "mode")  # a TATiTokConfig has quantize_mode
    mode, table = (c.mode, M.MASKGEN_FIELDS) if is_maskgen else (c.quantize_mode, T.TATITOK_FIELDS)
    s = dict(vq_model={"quantize_mode": "vq" if mode == "vq" else "vae"}, maskgen={}, losses={}, preprocessing={})
    for sec, key, ours, _ in _fields(table, mode):  # the sections the tables name, laid out by official_config
        s[sec][key] = getattr(c, ours)
    d = (M if is_maskgen else T).official_config(c, s)
    # Read it back: whatever the official fields do not reproduce goes to EXTRA.
    back = type(c)(**config_kwargs(d, is_maskgen))
    extra = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if getattr(back, f.name) != getattr(c, f.name)}
    return {**d, EXTRA: extra} if extra else d


def load_weights(model, release):
    """Copy the weights of a Release into `model`, one tensor at a time, after every missing, unexpected or
    mis-shaped key is reported by its release name; weights holding nan or inf are refused."""
    c, sd, skip, alias = model.config, model.state_dict(), set(), {}
    # {official key: the model's tensor in the release's shape}: views, so copying into one loads it
    view = M.release_view(sd, c.mode) if hasattr(c, "mode") else T.release_view(sd)
    what = f"MaskGen-{c.mode.upper()}" if hasattr(c, "mode") else "TA-TiTok"
    if hasattr(c, "mode"):
        # Not loaded on purpose: the last block's text queries (unused), and the tied LM head (the embedding
        # table itself; safetensors keeps one name for shared tensors: if it is lm_head.weight, read as the table).
        skip = {f"{M.last_q_proj(c)}.weight", f"{M.last_q_proj(c)}.bias"}
        if c.mode == "vq" and "embeddings.weight" in release.keys:
            skip.add("lm_head.weight")
        elif c.mode == "vq":
            alias["lm_head.weight"] = "embeddings.weight"
    found = {alias.get(k, k): k for k in release.keys if k not in skip}  # our name -> release key
    missing, unexpected = [n for n in view if n not in found], [k for n, k in found.items() if n not in view]
    shapes = [f"{k}: checkpoint {release.shape(k)} vs model {tuple(view[n].shape)}"
              for n, k in found.items() if n in view and release.shape(k) != tuple(view[n].shape)]
    check_fit(release.path, missing, unexpected, shapes, model=f"the {what} model its config.json describes",
              fix="Fix: use the config.json that was released with these weights (same variant and size); a "
              "directory written by this project must use official key names (checkpoint.release_state_dict).")
    with torch.no_grad():  # tensor by tensor: one copy of the weights in memory
        bad = nonfinite((key, view[name].copy_(release.get(key))) for name, key in found.items())
    if bad:  # a diverged run or a damaged file: it would only draw noise
        raise ValueError(f"{release.file} holds non-finite weights (nan or inf: {', '.join(bad)}); "
                         f"re-download the release, or export it again from a good checkpoint")
    return model


def _half(sd, half):
    """A state dict's tensors, contiguous, in fp16 with half (they load back into fp32 models exactly)."""
    return {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def release_state_dict(model, half=False):
    """Our weights under the release's names and shapes (the inverse of load_weights), as copies (safetensors
    refuses shared storage). MaskGen's unused last-block text queries are zeros (the official code loads
    strictly); its tied lm_head is left out, as in the released files."""
    c, sd = model.config, model.state_dict()
    view = M.release_view(sd, c.mode) if hasattr(c, "mode") else T.release_view(sd)
    out = {k: v.clone() for k, v in view.items()}
    if hasattr(c, "mode"):
        q, ref = M.last_q_proj(c), next(model.parameters())
        out[f"{q}.weight"], out[f"{q}.bias"] = ref.new_zeros(c.width, c.width), ref.new_zeros(c.width)
    return _half(out, half)


def file_sha256(path):
    """The sha256 of a file's bytes (hex), read in blocks: a 1-2 GB weights file takes seconds."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_release(model, path, half=False, text=None, records=None, **extra):
    """Write `model` as a release directory: model.safetensors (fp16 with half), a small text tower's state dict
    `text` as TEXT_FILE, then config.json, whose EXTRA records each weights file's sha256 (checked by resolve())
    and `records` (RECORDS); extra: more top-level entries (a text encoder, a tokenizer). Returns path."""
    os.makedirs(path, exist_ok=True)
    files = {"model.safetensors": release_state_dict(model, half)}
    if text is not None:
        files[TEXT_FILE] = {k: v.clone() for k, v in _half(text, half).items()}  # clones: no shared storage
    for name, sd in files.items():
        save_file(sd, os.path.join(path, name))
    cfg = release_config(model)
    sha = {name: file_sha256(os.path.join(path, name)) for name in files}  # of the files as written
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, EXTRA: {**cfg.get(EXTRA, {}), **(records or {}), "sha256": sha}, **extra}, f, indent=2)
    return os.fspath(path)


# -----------------------------------------------------------------------------
# The device models are loaded onto: --device of every command line.


def pick_device(name="auto", mps=True):
    """The torch.device for --device=NAME: "auto" is this process's GPU (LOCAL_RANK, as is a bare "cuda"), else
    MPS where `mps`, else the CPU. A device this machine lacks is refused here, in words (torch would fail
    much later, obscurely)."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps and mps_ok else "cpu"
    try:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    check = {"cuda": ("cuda", torch.cuda.is_available()), "mps": ("backends.mps", mps_ok)}.get(device.type)
    if check and not check[1]:
        raise ValueError(f"--device {name} was asked for but torch.{check[0]}.is_available() is False; "
                         f"use --device cpu or auto")  # fmt: skip
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


# -----------------------------------------------------------------------------
# Hugging Face Hub ids: wherever a release directory is accepted, so is its id. huggingface_hub (installed
# with open_clip) fetches it once into its cache, and the snapshot directory there is read like any other.

# owner/name, with open_clip's optional "hf-hub:" before and "@revision" after (branch, tag, commit, refs/pr/1)
_HUB_ID = re.compile(r"(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(.+))?")
_FILE_EXTS = (".pt", ".pth", ".bin", ".safetensors", ".json")  # 'runs/ckpt.pt' is a missing file, not an id


class HubError(FileNotFoundError):
    """A Hub id that could not be fetched; the message says what was tried and what to do."""


def hub_id(ref):
    """(repo_id, revision or None) when `ref` names a Hub repository, else None. A local path always wins:
    a path that exists is no id, nor is a file name, nor 'runs/x' when the folder runs/ exists."""
    if not isinstance(ref, (str, os.PathLike)):
        return None
    ref = os.fspath(ref)
    m = _HUB_ID.fullmatch(ref)
    local = m is None or os.path.exists(ref) or m[1].endswith(_FILE_EXTS)
    return None if local or (not ref.startswith("hf-hub:") and os.path.isdir(m[1].split("/")[0])) else (m[1], m[2])


def local_path(ref, revision=None, what="checkpoint"):
    """`ref` unchanged, or for a Hub id the directory of its snapshot (downloaded, or found in the Hub cache,
    only there when HF_HUB_OFFLINE is set) at `revision` when the id names none. Failures raise HubError."""
    if (hub := hub_id(ref)) is None:
        return ref
    repo_id, rev = hub[0], hub[1] or revision
    from huggingface_hub import constants, snapshot_download  # here: only Hub ids need it
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(repo_id, revision=rev, local_files_only=offline)
    except Exception as e:  # the hub's errors, told apart by name (their module moved between versions)
        names, error = {c.__name__ for c in type(e).__mro__}, e
    at = f"revision {rev!r}" if rev else "its main branch"
    if "RevisionNotFoundError" in names:
        why = f"the repository has no {at}"
    elif "GatedRepoError" in names:
        why = "the repository is gated: accept its terms on huggingface.co, then log in with `hf auth login`"
    elif "RepositoryNotFoundError" in names:
        why = "the Hub has no such repository (or it is private: log in with `hf auth login`)"
    elif offline:
        why = f"HF_HUB_OFFLINE is set and the Hub cache holds no snapshot of {at}"
    elif names & {"LocalEntryNotFoundError", "IncompleteSnapshotError"}:
        why = f"the Hub could not be reached (no network?) and the Hub cache holds no complete snapshot of {at}"
    else:
        why = f"{type(error).__name__}: {(str(error).strip() or 'no details').splitlines()[0]}"
    tried = f"the local path {os.path.abspath(ref)!r}, the Hub cache {constants.HF_HUB_CACHE}"
    tried += "" if offline else f", the Hub at {constants.ENDPOINT}"
    get = f"hf download {repo_id}" + (f" --revision {rev}" if rev else "") + " --local-dir DIR"
    raise HubError(f"{what} {ref!r} is not a local path, and as the Hugging Face Hub id {repo_id!r} ({at}) it "
                   f"could not be fetched: {why}. Tried: {tried}. Fix: download it where there is network, `{get}` "
                   "(`huggingface-cli download` before huggingface_hub 1.0), and pass DIR"
                   + ("; or unset HF_HUB_OFFLINE to let it download" if offline else "")
                   + "; or, if a local path was meant, correct it.") from None


def record_ref(ref):
    """A reference as recorded for later use (meta.json, configs): a Hub id as given, a path made absolute."""
    return ref if hub_id(ref) else os.path.abspath(ref)


# -----------------------------------------------------------------------------
# References: resolve() opens one and says what it is (configs only, nothing built); the loaders then build
# the models, after the pairing checks.

HERE = os.path.dirname(os.path.abspath(__file__))
# The small shapes-world models that ship with the repository: DEFAULT_RELEASE/{generator,tokenizer}.
DEFAULT_RELEASE = os.path.join(HERE, "checkpoints", "shapes")


class TextSpec(NamedTuple):
    """Which text encoder a model was trained with: build_text_encoder(*spec, where)."""

    name: Optional[str]  # open_clip model name, or a text.TEXT_PRESETS key (None: unknown)
    pretrained: str  # open_clip weights tag, for named models
    state: Optional[dict]  # weights of a small random tower saved with the model


# The official releases were all trained with OpenAI's CLIP ViT-L/14 at 336 px; ours record theirs.
OFFICIAL_TEXT = TextSpec("ViT-L-14-336", "openai", None)
TEXT_FILE = "text_encoder.safetensors"
# Which official tokenizer each official generator was trained on (official inference configs).
OFFICIAL_PAIRS = "MaskGen-VQ (L, XL) <- tokenizer_tatitok_bl128_vq;  MaskGen-KL (L, XL) <- tokenizer_tatitok_bl32_vae"


class Source(NamedTuple):
    """A reference, opened and identified, with its model config read: not built yet."""

    role: str  # "generator" | "tokenizer"
    where: str  # the release directory or the checkpoint file actually read
    config: object  # MaskGenConfig | TATiTokConfig
    text: TextSpec  # the text encoder its conditions come from
    tokenizer: Optional[str] = None  # generators: the tokenizer recorded with it (a path or Hub id), if any
    ckpt: Optional[dict] = None  # our checkpoint dict (None: a release)
    records: dict = {}  # a release's RECORDS (from EXTRA), those it has


class Models(NamedTuple):
    generator: torch.nn.Module  # MaskGenVQ or MaskGenKL, eval mode
    tokenizer: torch.nn.Module  # TATiTok, eval mode, frozen
    gen_text: torch.nn.Module  # TextEncoder for MaskGen's conditions (.penultimate, .pooled)
    tok_text: torch.nn.Module  # TextEncoder for the decoder (.final); usually the same object
    gen_source: str  # "where (which weights)"
    tok_source: str
    vocabulary: Optional[list] = None  # the words the generator's captions were made of, when its release records them


# A reference of one kind where the other was asked for, or of neither: (kind, wanted, found).
_WRONG = {
    ("release", "generator", "tokenizer"): "{w!r} is a TA-TiTok tokenizer release (its config.json has no "
    "model.maskgen); pass it as --tokenizer, and a MaskGen release (turkeyju/generator_maskgen_*) as --generator",
    ("release", "tokenizer", "generator"): "{w!r} is a MaskGen release, not a tokenizer; pass it as --generator",
    ("ckpt", "generator", "tokenizer"): "{w!r} is a TA-TiTok tokenizer checkpoint (it has 'tokenizer_config'), not a "
    "MaskGen one; pass it as --tokenizer and give the MaskGen run (train_maskgen.py output) as --generator",
    ("ckpt", "tokenizer", "generator"): "{w!r} is a MaskGen checkpoint (it has 'maskgen_config'), not a tokenizer; "
    "pass it as --generator and the TA-TiTok run it was trained with as --tokenizer",
    ("ckpt", "generator", None): "{w!r} is not a MaskGen checkpoint: its keys are {keys}, expected 'maskgen_config' "
    "and 'ema'/'model' (written by train_maskgen.py)",
    ("ckpt", "tokenizer", None): "{w!r} is not a TA-TiTok checkpoint: no 'tokenizer_config' among {keys}",
    ("ckpt", None, None): "{w!r} is neither a TA-TiTok nor a MaskGen checkpoint (keys: {keys})",
}  # fmt: skip


def default_release(role, missing):
    """The shipped model's `role` directory, or a FileNotFoundError starting with `missing`."""
    path = os.path.join(DEFAULT_RELEASE, role)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{missing} and the default {path} is missing. It ships with the repository: restore "
                                "it with `git checkout -- checkpoints/shapes` (or re-clone; with Git LFS run `git lfs "
                                "pull`), or train your own with train_tokenizer.py and then train_maskgen.py on the "
                                "shapes world (exact commands in README.md) and pass --generator RUN_DIR. For the "
                                "paper's models, download official releases and pass --tokenizer DIR --generator DIR.")
    return path


def is_release(ref, revision=None):
    """Is `ref` a release: a directory (or the Hub id of one) with config.json that is not one of our run
    folders (the trainers write a config.json of their own there, beside log.jsonl and ckpt_*.pt)?"""
    path = local_path(ref, revision)
    run = os.path.isfile(os.path.join(path, "log.jsonl")) or run_checkpoints(path)
    return os.path.isfile(os.path.join(path, "config.json")) and not run


def resolve(ref, role=None, revision=None):
    """A model reference (module docstring) -> its Source. role: "generator" or "tokenizer", what the
    caller needs (the other kind is refused, naming its flag), or None for either (`sample.py export`)."""
    flag, name = (f"--{role}", role) if role else ("SRC", "export")
    path = os.fspath(local_path(ref, revision, f"{name} checkpoint"))
    if not os.path.exists(path):
        example = "tokenizer_tatitok_bl32_vq" if role == "tokenizer" else "generator_maskgen_vq_l"
        raise FileNotFoundError(f"{name} checkpoint {path!r} does not exist; pass {flag} a release directory "
                                "(config.json + model.safetensors) or its Hub id (owner/name[@revision]), one of our "
                                "run folders (ckpt_*.pt) or a checkpoint file; download an official release with "
                                f"e.g. `hf download turkeyju/{example} --local-dir DIR` (`huggingface-cli download` "
                                "before huggingface_hub 1.0)")
    if os.path.isdir(path) and is_release(path):  # a local path: local_path returns it as is
        cfg, file = read_config(path), os.path.join(path, "config.json")
        found = "generator" if "maskgen" in _unwrap(cfg).get("model", {}) else "tokenizer"
        if role not in (None, found):
            raise ValueError(_WRONG["release", role, found].format(w=path))
        gen = found == "generator"
        config = (M.MaskGenConfig if gen else T.TATiTokConfig)(**config_kwargs(cfg, gen, file))
        tok = cfg.get("tokenizer")  # written relative to the generator's own directory
        if tok is not None and not (os.path.isabs(tok) or hub_id(tok)):
            tok = os.path.normpath(os.path.join(path, tok))
        records = {k: v for k, v in cfg.get(EXTRA, {}).items() if k in RECORDS and isinstance(v, (dict, list))}
        for name, want in records.get("sha256", {}).items():  # our releases: every weights file, as written
            got = file_sha256(p) if os.path.isfile(p := os.path.join(path, name)) else None
            if got != want:
                raise ValueError(f"{p} {f'has sha256 {got[:16]}' if got else 'is missing'}, but {file} records "
                                 f"{want[:16]}: damaged or replaced; re-download or re-export it (sample.py export)")
        # The text encoder it records (none: the official CLIP), with a small random tower's weights beside it.
        spec, tf = cfg.get("text_encoder"), os.path.join(path, TEXT_FILE)
        if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("name"), str)):
            raise ValueError(f"{path}/config.json: 'text_encoder' must be {{\"name\": ..., \"pretrained\": ...}}, "
                             f"got {spec!r}")
        f = open_safetensors(tf) if spec is not None and os.path.isfile(tf) else None
        state = f and {k: f.get_tensor(k) for k in f.keys()}
        text = spec and TextSpec(spec["name"], spec.get("pretrained", "openai"), state)
        return Source(found, path, config, text or OFFICIAL_TEXT, tok, None, records)
    if os.path.isdir(path):  # one of our training runs
        found, ckpt = newest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{name} directory {path!r} has no config.json (an official release) nor "
                                    f"ckpt_*.pt (one of our training runs); point {flag} at one of those")
        path = found
    else:
        ckpt = torch_load(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} does not hold a checkpoint dict (got {type(ckpt).__name__}); is it a checkpoint?")
    found = "generator" if "maskgen_config" in ckpt else "tokenizer" if "tokenizer_config" in ckpt else None
    if found is None or role not in (None, found):
        raise ValueError(_WRONG["ckpt", role, found].format(w=path, keys=sorted(ckpt)[:10]))
    cfg = ckpt.get("config") or {}  # the training config: text encoder, tokenizer path
    text = TextSpec(cfg.get("text_encoder"), cfg.get("text_pretrained", "openai"), ckpt.get("text_encoder"))
    if found == "generator":
        return Source(found, path, M.MaskGenConfig(**ckpt["maskgen_config"]), text, cfg.get("tokenizer"), ckpt)
    return Source(found, path, T.TATiTokConfig(**ckpt["tokenizer_config"]), text, None, ckpt)


def _weights(ckpt, where):
    """The EMA weights when the checkpoint has them (they sample better), else the raw ones."""
    if ckpt.get("ema"):
        return ckpt["ema"], "EMA weights"
    if ckpt.get("model"):
        return ckpt["model"], "raw weights: the checkpoint has no EMA"
    raise ValueError(f"{where!r} has neither 'ema' nor 'model' weights; it is incomplete, re-save it")


def _build(src, device):
    """The model of a Source on `device`, in eval mode -> (model, "where (which weights)")."""
    model = M.build(src.config, init_weights=False) if src.role == "generator" else T.TATiTok(src.config)
    if src.ckpt is None:  # a release: every weight comes from the file
        model, which = load_weights(model, Release(src.where)), "release"
    else:
        sd, which = _weights(src.ckpt, src.where)
        load_checked(model, sd, src.where)
    return model.to(device).eval(), f"{src.where} ({which})"


def load_tokenizer(ref, device="cpu", with_text=True, revision=None):
    """(frozen TA-TiTok in eval mode, the text encoder its decoder was trained with) from any reference; the
    text encoder is None with with_text=False (pretokenization needs no text, so no CLIP download)."""
    src = resolve(ref, "tokenizer", revision)
    tok = _build(src, device)[0].requires_grad_(False)
    return tok, build_text_encoder(*src.text, src.where).to(device) if with_text else None


def load_generator(ref, device="cpu", revision=None):
    """MaskGenVQ or MaskGenKL (eval mode) from any reference."""
    return _build(resolve(ref, "generator", revision), device)[0]


def init_weights(ref, role, config, presets, flag, tokenizer=None):
    """(state dict under our names, its Source) for a trainer's --init_from: the `role` model ("generator" |
    "tokenizer") of any reference, a run's or checkpoint's EMA weights when present, a release's as loaded.
    `config` is what the trainer's preset builds; where the init's differs (but for the KL scale factor: a
    property of its tokens, which the init keeps) a ValueError names the fields, and the presets among
    `presets` ({name: config}) that fit, as `flag`=name. tokenizer: (its config, where) for a generator,
    checked first to make the tokens it was trained on (check_pair)."""
    src = resolve(ref, role)
    if tokenizer is not None:
        check_pair(tokenizer[0], src.config, tokenizer[1], src.where)

    def differs(c):  # the fields in which config c differs from the init's
        return [k for k in vars(c) if k != "scale_factor" and getattr(c, k) != getattr(src.config, k)]

    if diff := differs(config):
        held, built = (", ".join(f"{k} {getattr(c, k)!r}" for k in diff) for c in (src.config, config))
        fits = " or ".join(f"{flag}={n}" for n, c in presets.items() if not differs(c))
        raise ValueError(f"{src.where!r} holds a {role} with {held}, but the preset builds {built}; "
                         f"pick the preset it was trained with ({fits or 'none fits: add one with its config'})")
    sd = _build(src, "cpu")[0].state_dict() if src.ckpt is None else _weights(src.ckpt, src.where)[0]
    return sd, src


def _same_text(a, b):
    """Do two TextSpecs describe the same encoder? One that records none is taken to match (a generator
    trained with its tokenizer's; a release pair stores a small tower's weights once, with the tokenizer)."""
    if a.name is None or b.name is None or a.name != b.name:
        return a.name is None or b.name is None
    if a.state is None or b.state is None:
        return a.state is not None or b.state is not None or a.pretrained == b.pretrained
    return a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def check_pair(tcfg, gcfg, tok_where, gen_where):
    """The tokenizer must produce exactly the tokens the generator was trained on."""
    tmode, problems = tcfg.quantize_mode, []
    if tmode != gcfg.mode:
        problems.append(f"token type: tokenizer is {tmode.upper()} but the generator is MaskGen-{gcfg.mode.upper()}")
    if tcfg.num_latent_tokens != gcfg.num_tokens:
        problems.append(f"token count K: tokenizer has {tcfg.num_latent_tokens} latent tokens but the generator "
                        f"makes {gcfg.num_tokens}")
    if tmode == gcfg.mode == "vq" and tcfg.codebook_size != gcfg.codebook_size:
        problems.append(f"codebook size: tokenizer {tcfg.codebook_size} vs generator {gcfg.codebook_size}")
    if tmode == gcfg.mode == "kl" and tcfg.token_size != gcfg.token_size:
        problems.append(f"token channels C: tokenizer {tcfg.token_size} vs generator {gcfg.token_size}")
    if problems:
        raise ValueError(f"tokenizer {tok_where!r} and generator {gen_where!r} do not fit together:\n  - "
                         + "\n  - ".join(problems) + "\nFix: pass --tokenizer the TA-TiTok the generator was trained "
                         "with (for our runs it is recorded in the generator's config; omit --tokenizer to use it). "
                         f"Official pairs: {OFFICIAL_PAIRS}")


def _tokenizer_of(gen, tokenizer=None, revision=None):
    """(Source, _build's (model, where) on the CPU) of the tokenizer for generator Source `gen`, checked to fit it:
    `tokenizer`, else the one it records, tried as given, then next to the run, then next to this file; a Hub id
    found nowhere is fetched. A generator that records its tokenizer's digest ("inputs": content_digest of
    the tokenizer's state dict as loaded, fp32, as train_maskgen.py pins it) gets a tokenizer with that digest: in a
    run folder the checkpoint that has it, not the newest; none is refused. Hashing costs seconds per GB of weights."""
    if tokenizer is not None:
        ref, rev, recorded = tokenizer, revision, None
    elif gen.tokenizer is None:
        raise ValueError(f"the generator {gen.where!r} does not say which tokenizer it was trained with (official "
                         f"releases never do); pass --tokenizer DIR. Official pairs: {OFFICIAL_PAIRS}")
    else:
        ref, base = gen.tokenizer, os.path.dirname(os.path.abspath(gen.where))
        near = (base, os.path.dirname(base), HERE)  # the run folder, the folder holding it, this file's
        tries = [ref] if os.path.isabs(ref) else [ref, *(os.path.join(b, ref) for b in near)]
        found = next((p for p in tries if os.path.exists(p)), ref if hub_id(ref) else None)
        recorded = f"the generator {gen.where!r} was trained with tokenizer {ref!r} (recorded in its config)"
        if found is None:
            raise FileNotFoundError(f"{recorded}, which is not found from here; pass --tokenizer PATH to that "
                                    "tokenizer run or release")
        ref, rev = found, None
    pin, seen = ((gen.ckpt or gen.records).get("inputs") or {}).get("tokenizer"), []
    run = pin and os.path.isdir(ref) and not is_release(ref)  # then each of its checkpoints, newest first
    for r in (run and run_checkpoints(ref)) or [ref]:
        try:
            src = resolve(r, "tokenizer", rev)
        except HubError as e:
            raise HubError(f"{recorded}: {e}" if recorded else str(e)) from None
        except ValueError as e:  # a damaged checkpoint in the run folder: the others may hold the weights
            if not run:
                raise
            seen.append(f"{r!r} is unreadable ({str(e)[:80]})")
            continue
        check_pair(src.config, gen.config, src.where, gen.where)
        built = _build(src, "cpu")
        if pin is None or (got := content_digest(built[0].state_dict())) == pin:
            return src, built
        seen.append(f"{src.where!r} has {got[:16]}")
    raise ValueError(f"the generator {gen.where!r} was trained on a tokenizer whose weights have digest {pin[:16]}, "
                     f"but {', '.join(seen)} (sha256 of the weights as loaded); pass --tokenizer=<the checkpoint it "
                     "was trained on> (a ckpt_*.pt of that tokenizer run, or the tokenizer release exported with it)")


def load_models(generator=None, tokenizer=None, device="cpu", revision=None):
    """The generator, its tokenizer and their text encoder(s), cross-checked -> Models. The shipped
    checkpoints/shapes/generator by default; the tokenizer may be omitted when the generator records it."""
    if generator is None:
        if tokenizer is not None:
            raise ValueError("--tokenizer was given without --generator; give the MaskGen checkpoint as --generator")
        generator = default_release("generator", "no checkpoint given")
    gen = resolve(generator, "generator", revision)
    src, (tok, tok_source) = _tokenizer_of(gen, tokenizer, revision)  # configs checked before any model is built
    gen_model, gen_source = _build(gen, device)
    tok_text = build_text_encoder(*src.text, src.where).to(device)  # official releases: CLIP ViT-L-14-336
    if _same_text(gen.text, src.text):  # one text encoder serves both, unless the generator was trained with another
        gen_text = tok_text
    else:
        print(f"note: the generator's text encoder {gen.text.name!r} differs from the tokenizer's "
              f"{src.text.name!r}; using both")
        gen_text = build_text_encoder(*gen.text, gen.where).to(device)
    # Both text encoders must give the widths their models were built for.
    problems, g, t, want = [], gen.config, src.config, f"generator {gen.where!r} expects"
    if gen_text.width != g.text_width:
        problems.append(f"{want} text states of width {g.text_width}, its text encoder gives {gen_text.width}")
    if gen_text.embed_dim != g.pooled_dim:
        problems.append(f"{want} pooled text of size {g.pooled_dim}, its text encoder gives {gen_text.embed_dim}")
    if (tok_text.context_length, tok_text.width) != (t.text_context_length, t.text_embed_dim):
        problems.append(f"tokenizer {src.where!r} expects text states ({t.text_context_length}, {t.text_embed_dim}), "
                        f"its text encoder gives ({tok_text.context_length}, {tok_text.width})")
    if problems:
        raise ValueError("text encoder mismatch:\n  - " + "\n  - ".join(problems)
                         + "\nFix: use the checkpoints as trained (same text encoder).")
    return Models(gen_model, tok.to(device).requires_grad_(False), gen_text, tok_text, gen_source, tok_source,
                  gen.records.get("vocabulary"))


def export_release(ref, out, which=None, tokenizer=None, overwrite=False, revision=None, half=False):
    """Write the model(s) of `ref` as release directories (EMA weights if any; fp16 with half) -> {role: dir}.
    which: tokenizer | generator | both (a generator's default: out/{generator,tokenizer}, the generator recording
    "../tokenizer", a shared small text tower written once); tokenizer: the generator's, if it records none.
    Each release records (save_release) its files' sha256, the shapes world's words if trained on it, and a
    generator the digest of its tokenizer as loaded from the release written beside it (fp16: the rounded weights)."""
    if which not in (None, "tokenizer", "generator", "both"):
        raise ValueError(f"--which must be tokenizer, generator or both, got {which!r}")
    # Before any work: never into a file, nor into a non-empty directory unless asked.
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; give a directory to write into")
    if (held := sorted(os.listdir(out)) if os.path.isdir(out) else []) and not overwrite:
        more = f", ... ({len(held)} entries)" if len(held) > 4 else ""
        raise ValueError(f"--out {out!r} is not empty (it holds {', '.join(held[:4])}{more}); pass --overwrite "
                         f"to replace what this command writes there, or choose an empty or new directory")
    src = resolve(ref, None, revision)
    which = which or ("tokenizer" if src.role == "tokenizer" else "both")
    if src.role == "tokenizer" and which != "tokenizer":
        raise ValueError(f"{src.where!r} is a TA-TiTok tokenizer; it holds no generator: use --which tokenizer")
    gen, tok = (None, src) if src.role == "tokenizer" else (src, None)
    if gen is not None and (which != "generator" or tokenizer is not None or gen.tokenizer is not None):
        tok = _tokenizer_of(gen, tokenizer, revision)[0]  # its text encoder too; the one it was trained on, if pinned
    # role -> (Source, TextSpec); a generator that records no text encoder was trained with its tokenizer's
    parts = {"tokenizer": (tok, tok.text)} if tok is not None and which != "generator" else {}
    if gen is not None and which != "tokenizer":
        parts["generator"] = (gen, tok.text if tok is not None and _same_text(gen.text, tok.text) else gen.text)
    for role, (s, text) in parts.items():
        if text.name is None or (text.state is None and text.name in TEXT_PRESETS):  # it could not be rebuilt
            raise ValueError(f"the {role} {s.where!r} does not record the text encoder it was trained with (or a "
                             f"random tower's weights); pass --tokenizer, the TA-TiTok run it was trained with")
    # Written into a fresh folder beside `out`, whose entries then replace those of the same name in `out` (others
    # are left alone): a failure leaves `out` as it was.
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp", dir=parent)
    try:
        for role, (s, text) in parts.items():  # built one at a time: one model in memory
            d = os.path.join(tmp, role) if len(parts) > 1 else tmp
            extra = {} if text == OFFICIAL_TEXT else {"text_encoder": dict(name=text.name, pretrained=text.pretrained)}
            beside = role == "generator" and "tokenizer" in parts  # its tokenizer is written beside it
            # The words of its captions when that was the shapes world (a run's --data shapes or shapes:N; a release
            # records them), for sample.py's out-of-vocabulary warning, which never reads shapes.py.
            words = s.records.get("vocabulary")  # a run's records never hold it
            if s.ckpt is not None and str((s.ckpt.get("config") or {}).get("data", "")).split(":")[0] == "shapes":
                import shapes  # only here: the default world's words ("four" only where asked for)
                words = sorted({"a", *shapes.COLORS, *map(shapes.NUMBER_WORDS.get, shapes.ShapesWorld().counts),
                                *" ".join(shapes.RELATIONS).split(), *shapes.SHAPES, *(w + "s" for w in shapes.SHAPES)})
            records = {"vocabulary": words} if words else {}
            if role == "generator" and tok is not None:  # its tokenizer's digest as loaded from where it is written
                loaded = resolve(os.path.join(tmp, "tokenizer"), "tokenizer") if beside else tok  # (fp16: rounded)
                records["inputs"] = {"tokenizer": content_digest(_build(loaded, "cpu")[0].state_dict())}
            shared = beside and text is parts["tokenizer"][1]  # a shared small tower: one copy, the tokenizer's
            save_release(_build(s, "cpu")[0], d, half, None if shared else text.state, records, **extra,
                         **({"tokenizer": "../tokenizer"} if beside else {}))
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(tmp):
            dst = os.path.join(out, name)
            if os.path.isdir(dst) and not os.path.islink(dst):  # a folder is replaced whole
                shutil.rmtree(dst)
            elif os.path.lexists(dst):
                os.remove(dst)
            os.replace(os.path.join(tmp, name), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dirs = {role: os.path.join(out, role) if len(parts) > 1 else out for role in parts}
    for role, d in dirs.items():
        print(f"wrote the {role} release {d}/ from {src.where}; load it with --{role} {d}")
    return dirs

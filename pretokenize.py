"""
Pretokenization for MaskGen: encode every training image once with the frozen
TA-TiTok, store the tokens as tar shards, and read them back as a training stream.

Paper: §5.1 / Appendix A ("images pretokenized once by a frozen TA-TiTok for MaskGen
training"). MaskGen never sees pixels: it learns on the frozen tokenizer's tokens, so
encoding every image once (instead of every step) makes its training far cheaper.
The output is again WebDataset tar shards (shards.py, shard_io.py), one sample per image:
    <key>.tokens.npy     VQ ids, int16 (int32 for codebooks over 32768 entries), shape (K,)
 or <key>.mean.npy       KL posterior mean, float32 (K, C)
    <key>.logvar.npy     KL posterior log-variance, float32 (K, C)
    <key>.txt            the caption
    <key>.json           {"caption", "recaption", "aesthetic" (null if unknown), "source"}
plus meta.json in the output folder describing the tokenizer (tokenizer_meta).

VQ ids are stored as integers in .npy files, whose header records the dtype:
float16 has an 11-bit significand, so it cannot hold every integer above 2048
(2049 reads back as 2048, 8191 as 8192). The official loader decodes its tokens
as float16, which silently corrupts ids of an 8192-entry codebook; here the
reader refuses any non-integer token array instead.

    pretokenize(tokenizer, dataset, out_dir)   this rank's images -> token shards
    PretokenizedDataset(shards)                 token shards -> {"tokens" | "posterior", "caption", ...}

The command line (under torchrun, one share of the data per rank) is in data.py:
    torchrun --nproc_per_node=8 data.py pretokenize --tokenizer <dir> --data "shards/{000000..000099}.tar" --out pretok/
"""

import json
import logging
import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from shard_io import ShardWriter, decode_npy
from shards import StreamDataset, expand_braces, list_shards, sample_name

log = logging.getLogger("data")

# -----------------------------------------------------------------------------
# Writing


def token_dtype(codebook_size):
    """The smallest integer dtype that holds every id of the codebook."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


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


# -----------------------------------------------------------------------------
# Reading


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


class PretokenizedDataset(StreamDataset):
    """Reads the shards `pretokenize` writes, for train_maskgen.py. Yields
        VQ: {"tokens": LongTensor (K,), ...}
        KL: {"posterior": FloatTensor (K, 2C) = cat(mean, logvar), ...}
    plus "caption", "recaption" ("" if none), "aesthetic" FloatTensor () and "key".
    `shards`: a folder of shards, a brace pattern, a glob or a list. Split, shuffle,
    resume and aesthetic options as in shards.StreamDataset; missing aesthetic scores
    get default_aesthetic (NaN, "unknown", unless given)."""

    def __init__(self, shards, **stream):
        self.shards = list_shards(shards)
        super().__init__(**stream)

    def _decode(self, group, check_only=False):
        where = sample_name(group)
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
        fields = self._text_fields(group, check_only)  # caption, recaption, aesthetic, key
        return None if fields is None else {**out, **fields}

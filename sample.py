"""
Sample images from text with MaskGen + TA-TiTok, and draw the tokenizer's figures.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact Text-Aware
One-Dimensional Tokens" (Kim et al., arXiv 2501.07730).
  §3 ("Masked Generative Models", sampling) and §4.2: MaskGen fills in K masked tokens
      over a few steps, conditioned on CLIP text features and an aesthetic score; the
      TA-TiTok decoder turns the tokens, plus the caption's CLIP features, into pixels.
  §5.1 and App. E: the evaluation protocol (no rejection sampling, classifier-free
      guidance, 16 steps for VQ / 32 for KL; GenEval prompts, COCO / MJHQ captions).
      `--geneval` writes exactly the folder layout GenEval's evaluation script reads.
  App. C, Fig. 7: the same prompt and seed at several aesthetic scores (`--aesthetic 5 6 7`).
  §5.2, Fig. 4 and App. G, Fig. 8: `sample.py tokviz` swaps single latent tokens and
      shows where each latent token looks in the encoder (see "The tokenizer figures").
Finding, checking and writing checkpoints (release dirs, Hub ids, runs, files) is checkpoint.py.

The pipeline, per batch of prompts:

    captions --TextEncoder--> .penultimate (B,L,W), .pooled (B,E)  -> MaskGen conditions
                              .final       (B,L,W)                 -> TA-TiTok decoder
    "" (computed once)    --> the classifier-free guidance null condition
    generate()            --> tokens: VQ ids (B,K) | KL vectors (B,K,C)
    TATiTok.decode        --> images (B,3,H,W) in [0,1] -> PNG files

Usage:
    python sample.py --prompt "a red circle to the left of a blue square"   # shipped model
    python sample.py --prompts prompts.txt --num_images 4 --aesthetic 5 6 7
    python sample.py --generator runs/maskgen --prompt "..."      # our run (tokenizer from its config)
    python sample.py --tokenizer tokenizer_tatitok_bl128_vq --generator generator_maskgen_vq_l \
        --geneval evaluation_metadata.jsonl --num_images 4 --outdir geneval_out
    python sample.py --generator ... --mjhq meta_data.json --outdir out/mjhq   # <outdir>/<category>/<id>.png
    torchrun --nproc_per_node=8 sample.py ...                      # shards the prompts over GPUs
    An --outdir that holds another run's images is refused; --overwrite deletes those first.
    python sample.py export runs/maskgen --out release/    # release/{generator,tokenizer}/ in the official layout
    python sample.py tokviz --tokenizer PATH --image img.png --caption "a red circle"   # swap.png, attention.png

Public API (importable, used by the tests):
    generate_images(models, prompts, aesthetics, seeds, null, opts, device) -> (B, 3, H, W)
    read_text(path, what), read_mjhq(path) -> [(id, category, prompt)]   (evaluate.py reads prompts with them)
    labelled_grid(rows, row_labels, tile_labels) -> PIL.Image
    swap_tokens(tok, tokens, text_final, positions, replacements) -> (P, J, 3, H, W)
    encoder_attention(tok, images) -> (B, K, G, G);  attention_overlays(image, attn) -> (K, 3, H, W)
    main(argv)    (argv[0] "export" / "tokviz" runs that command)
"""

import argparse
import datetime
import json
import math
import os
import re
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import checkpoint
import train_common
from data import IMAGE_EXTS, load_image
from maskgen import check_guidance_schedule

# -----------------------------------------------------------------------------
# Prompts.


def read_text(path, what, hint=""):
    """The lines of a UTF-8 text file (a prompt or metadata file), with errors that name it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r") for line in f.read().split("\n")]
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def read_prompt_file(path):
    """.txt: one prompt per non-empty line; .jsonl: one JSON object with a "prompt" per line."""
    if path.lower().endswith(".json"):
        raise ValueError(
            f"--prompts {path!r} is a .json file, which would be read as text; --prompts takes .txt (one prompt "
            f'per line) or .jsonl (one {{"prompt": ...}} object per line). For MJHQ-30K\'s meta_data.json use --mjhq {path}'
        )
    prompts = []
    for n, line in enumerate(read_text(path, "prompt file"), 1):
        if line.strip():
            prompts.append(_jsonl_prompt(line, path, n) if path.endswith(".jsonl") else line)
    if not prompts:
        raise ValueError(
            f"prompt file {path!r} holds no prompts; write one prompt per line (.txt) or one "
            f'{{"prompt": "..."}} object per line (.jsonl)'
        )
    return prompts


def _jsonl_prompt(line, path, n):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not valid JSON ({e}); a .jsonl file holds one JSON object per line") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f'{path}:{n} has no "prompt" string; each line must look like {{"prompt": "a red circle", ...}}')
    return obj["prompt"]


MJHQ_SHAPE = '{"<image id>": {"category": "animals", "prompt": "..."}, ...}'


def read_mjhq(path):
    """MJHQ-30K's meta_data.json, {image id: {"category", "prompt"}} -> a list of (id,
    category, prompt) in the file's order. sample.py writes image <id> to
    <outdir>/<category>/<id>.png: MJHQ's own layout (its mjhq30k_imgs.zip unzips into
    <category>/<id>.jpg), so that evaluate.py gen can score each category on its own."""
    bad = f"MJHQ metadata file {path!r}"
    try:
        meta = json.loads("\n".join(read_text(path, "MJHQ metadata file", " (meta_data.json in playgroundai/MJHQ-30K)")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{bad} is not valid JSON ({e}); --mjhq takes MJHQ-30K's meta_data.json: {MJHQ_SHAPE}") from None
    if not isinstance(meta, dict) or not meta:
        got = "an empty object" if meta == {} else f"a JSON {type(meta).__name__}"
        raise ValueError(f"{bad} holds {got}; MJHQ-30K's meta_data.json is one object {MJHQ_SHAPE}")
    entries = []
    for key, row in meta.items():
        if not (isinstance(row, dict) and isinstance(row.get("category"), str) and isinstance(row.get("prompt"), str)):
            raise ValueError(f'{bad}: entry {key!r} needs string fields "category" and "prompt", like {MJHQ_SHAPE}')
        for what, name in (("image id", key), ("category", row["category"])):
            if name in ("", ".", "..") or any(sep in name for sep in "/\\\0"):
                raise ValueError(f"{bad}: entry {key!r} has the {what} {name!r}, which cannot name a file or folder")
        entries.append((key, row["category"], row["prompt"]))
    return entries


# -----------------------------------------------------------------------------
# The work list, sharded over ranks.
#
# Every image is one item (prompt p, image i, aesthetic score a). Its seed is
# seed + p * num_images + i: it depends on neither the batch size nor the number of
# processes, and the same (p, i) at different aesthetic scores shares a seed (Fig. 7).


class Item(NamedTuple):
    prompt_index: int
    image_index: int
    aes_index: int
    seed: int


def make_items(num_prompts, num_images, num_aesthetics, seed):
    """Every item, prompt by prompt; within a prompt, aesthetic score by score."""
    ranges = range(num_prompts), range(num_aesthetics), range(num_images)
    return [Item(p, i, a, seed + p * num_images + i) for p in ranges[0] for a in ranges[1] for i in ranges[2]]


def shard(items, rank, world):
    """Rank r takes items r, r + W, r + 2W, ...: every item exactly once over all ranks,
    and balanced to within one item."""
    return items[rank::world]


# -----------------------------------------------------------------------------
# Sampling.


def generate_images(models, prompts, aesthetics, seeds, null, opts, device, seeding="item"):
    """One batch: captions (list of B), aesthetic scores (list of B floats or None),
    seeds (list of B) -> images (B,3,H,W) in [0,1].

    seeding="item": each image gets its own torch.Generator(seed), passed to one batched
    generate() call as a list (one generator per image), so an image does not depend on
    what else is in its batch: it is the image a batch of one would give. seeding="batch":
    one generator for the whole batch, seeded by the first item's seed; an image then
    depends on the batch size and world size.
    """
    gen, tok = models.generator, models.tokenizer
    text = models.gen_text(prompts)  # one forward: .penultimate (B,L,W), .pooled (B,E), .final (B,L,W)
    final = text.final if models.tok_text is models.gen_text else models.tok_text(prompts).final
    gens = [torch.Generator(device=device).manual_seed(seed) for seed in (seeds if seeding == "item" else seeds[:1])]
    aes = None if aesthetics[0] is None else torch.tensor(aesthetics, dtype=torch.float32, device=device)  # (B,)
    tokens = gen.generate(text.penultimate, text.pooled, null.penultimate, null.pooled, aesthetic=aes,
                          generator=gens if seeding == "item" else gens[0], **opts)  # VQ (B,K) ids | KL (B,K,C)
    return tok.decode(tokens, final)  # (B,3,H,W)


def pick_device(name):
    """--device NAME -> torch.device. "auto" is CUDA, then Apple's GPU (MPS), then the CPU.
    A device this machine lacks is refused here, in words, not by torch much later."""
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = "cuda" if has["cuda"] else "mps" if has["mps"] else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if not has.get(device.type, True):
        check = "torch.cuda.is_available()" if device.type == "cuda" else "torch.backends.mps.is_available()"
        raise ValueError(f"--device {name} was asked for but {check} is False; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


def to_pixels(images):
    """Float images (..., 3, H, W) in [0, 1] -> uint8 numpy (..., H, W, 3), the layout PIL
    writes. Rounded to the nearest level (a plain .to(uint8) would truncate, darkening
    every pixel by half a level on average)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def save_png(arr, path):
    """Write a (H, W, 3) uint8 image atomically: a run stopped mid-write leaves either the
    whole PNG or none (a partial file, removed on any error, never takes its name)."""
    tmp = path + ".tmp"
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# The output folder: never a mix of old and new samples.
#
# evaluate.py scores every image in a folder, so images from an earlier run left beside
# this run's would be scored as this run's. The names sample.py gives its images
# (relative to --outdir; MJHQ's <category>/<id>.png are those its prompts.jsonl lists),
# and its other files besides prompts.jsonl:
OWN_IMAGES = re.compile(
    r"\d{5,}_s-?\d+(_aes[^/]*)?\.png"  # the flat layout: <prompt>_s<seed>[_aes<score>].png
    r"|\d{5,}/samples/\d{4,}\.png"  # GenEval's: <prompt>/samples/<image>.png
)
OWN_OTHERS = re.compile(r"grid\.png|\d{5,}/metadata\.jsonl")  # the overview grid, GenEval's per-prompt metadata


def earlier_mjhq_images(outdir):
    """The <category>/<id>.png names that an earlier --mjhq run listed in its prompts.jsonl."""
    names, index = set(), os.path.join(outdir, "prompts.jsonl")
    if os.path.isfile(index):
        with open(index, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("category"), str):
                    names.add(f"{row['category']}/{row['id']}.png")
    return names


def check_outdir(outdir, planned, overwrite, clear):
    """Refuse an outdir holding images this run will not write (the paths in `planned`),
    or, with overwrite, delete them first (only where `clear`: rank 0). Only files
    sample.py writes (OWN_IMAGES, an earlier --mjhq run's, OWN_OTHERS) are ever deleted;
    other images always stop the run. Returns the number of files deleted."""
    if not os.path.isdir(outdir):
        return 0
    planned = {os.path.relpath(p, outdir).replace(os.sep, "/") for p in planned}
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(outdir) for f in names)
    rel = {p: os.path.relpath(p, outdir).replace(os.sep, "/") for p in files}
    stale, foreign, mjhq = [], [], earlier_mjhq_images(outdir)
    # The image files (by extension, as evaluate.py finds them) this run will not rewrite;
    # evaluate.py never scores grid.png.
    for p in files:
        if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and rel[p] not in planned and rel[p] != "grid.png":
            (stale if OWN_IMAGES.fullmatch(rel[p]) or rel[p] in mjhq else foreign).append(p)
    if foreign:
        raise ValueError(
            f"--outdir {outdir} holds {len(foreign)} image file(s) sample.py did not write (e.g. {foreign[0]}); they "
            f"would be scored with the new samples, and --overwrite deletes only sample.py's own files: move them "
            f"or choose another --outdir"
        )
    if stale and not overwrite:
        raise ValueError(
            f"--outdir {outdir} already holds {len(stale)} image(s) this run will not write (e.g. {stale[0]}); old and "
            f"new samples would be mixed (evaluate.py scores every image in the folder). Choose another --outdir, or "
            f"pass --overwrite to delete those {len(stale)} file(s) first"
        )
    if not (overwrite and clear):
        return 0
    # Also the GenEval metadata and the grid this run will not rewrite, then emptied folders.
    stale += [p for p in files if OWN_OTHERS.fullmatch(rel[p]) and rel[p] not in planned]
    for path in stale:
        os.remove(path)
    for d in sorted({os.path.dirname(p) for p in stale} | {os.path.dirname(os.path.dirname(p)) for p in stale}, reverse=True):
        if os.path.abspath(d) != os.path.abspath(outdir) and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
    print(f"--overwrite: deleted {len(stale)} file(s) of an earlier run from {outdir}")
    return len(stale)


# -----------------------------------------------------------------------------
# Labelled grids (PIL's default font; small images are enlarged so labels stay readable).


def _fit(draw, text, font, width):
    """Cut text to fit a width in pixels, marking the cut with '...'."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def label_font():
    """The labels' font. PIL's default FreeType font at its default 10 px draws a space 2 px
    wide, no wider than the gap between letters, so "two green triangles" read as "twogreen
    triangles": at 13 px the space is clearly wider. Where Pillow has no FreeType (or
    predates load_default(size=), 10.1), its bitmap font, whose space is a full 6 px cell."""
    try:
        return ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):  # old Pillow: no size argument; no FreeType
        return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


def labelled_grid(rows, row_labels=None, tile_labels=None, min_tile=128, pad=4):
    """rows: list of lists of equally sized PIL images (ragged rows are padded with white).
    row_labels: one string per row, drawn in a strip above the row.
    tile_labels: per-tile strings (same nesting as rows), drawn under each tile."""
    font = label_font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 4  # one text line, with a margin
    w0, h0 = rows[0][0].size
    s = max(1, math.ceil(min_tile / max(w0, h0)))  # integer nearest-neighbour upscaling
    tw, th = w0 * s, h0 * s
    ncols = max(len(r) for r in rows)
    row_h = (line if row_labels else 0) + th + (line if tile_labels else 0) + pad
    W, H = pad + ncols * (tw + pad), pad + len(rows) * row_h
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * row_h
        if row_labels:
            draw.text((pad, y + 1), _fit(draw, row_labels[r], font, W - 2 * pad), fill=(0, 0, 0), font=font)
            y += line
        for c, im in enumerate(row):
            x = pad + c * (tw + pad)
            grid.paste(im.resize((tw, th), Image.NEAREST), (x, y))
            if tile_labels and tile_labels[r][c]:
                draw.text((x, y + th + 1), _fit(draw, tile_labels[r][c], font, tw), fill=(60, 60, 60), font=font)
    return grid


def build_run_grid(path_of, prompts, items, aesthetics, max_rows, max_cols=16):
    """One row per (prompt, aesthetic score), one column per image, read back from disk
    (so under torchrun rank 0 sees every rank's images); path_of(item) is its file."""
    rows, labels, tile_labels = {}, {}, {}
    for it in items:
        key = (it.prompt_index, it.aes_index)
        if (key not in rows and len(rows) == max_rows) or len(rows.setdefault(key, [])) >= max_cols:
            continue  # a new row past max_rows, or a full row
        with Image.open(path_of(it)) as im:
            rows[key].append(im.convert("RGB"))
        tile_labels.setdefault(key, []).append(f"seed {it.seed}")
        label = f"{it.prompt_index}: {prompts[it.prompt_index]}"
        if len(aesthetics) > 1:
            label = f"[aesthetic {aesthetics[it.aes_index]:g}] " + label
        labels[key] = label
    keys = list(rows)
    return labelled_grid([rows[k] for k in keys], [labels[k] for k in keys], [tile_labels[k] for k in keys])


# -----------------------------------------------------------------------------
# The tokenizer figures (`sample.py tokviz`), for one image and its caption.
#
# TA-TiTok (§3.2) describes an image with K 1D latent tokens that each read the whole
# image, so a token often owns one semantic element (an object, its colour, the style)
# rather than one fixed patch. Two views show it:
# (1) latent-code swapping (§5.2, Fig. 4): replace token i by code j and decode; the
#     element token i owns changes, not a fixed image region;
# (2) attention maps (App. G, Fig. 8): where each latent token looks in the encoder.


@torch.no_grad()
def swap_tokens(tok, tokens, text_final, positions, replacements, batch_size=64):
    """Decode the image with token `positions[p]` replaced by `replacements[j]`, for all p, j.

    tokens: VQ ids (1,K) long, or KL tokens (1,K,C); text_final: (1,L,W) caption states.
    replacements: VQ code ids (J,) long, or KL token vectors (J,C).
    Returns (P, J, 3, H, W) in [0,1].
    """
    cfg = tok.config
    K, P, J = cfg.num_latent_tokens, len(positions), len(replacements)
    bad = [i for i in positions if not 0 <= i < K]
    if bad:
        raise ValueError(f"token positions {bad} are out of range: this tokenizer has K={K} tokens (0..{K - 1})")
    if cfg.quantize_mode == "vq":
        codes = torch.as_tensor(replacements, dtype=torch.long, device=tokens.device)
        if codes.numel() and (codes.min() < 0 or codes.max() >= cfg.codebook_size):
            raise ValueError(f"code ids must lie in [0, {cfg.codebook_size}); got {codes.tolist()}")
        x = tokens.expand(P * J, K).clone()  # (P*J, K)
    else:
        codes = torch.as_tensor(replacements, dtype=tokens.dtype, device=tokens.device)  # (J, C)
        x = tokens.expand(P * J, K, cfg.token_size).clone()  # (P*J, K, C)
    for n, i in enumerate(positions):
        x[n * J : (n + 1) * J, i] = codes  # rows n*J..: token i takes each replacement in turn
    out = [tok.decode(x[s : s + batch_size], text_final.expand(len(x[s : s + batch_size]), -1, -1))
           for s in range(0, P * J, batch_size)]  # fmt: skip
    return torch.cat(out).clamp(0, 1).view(P, J, 3, cfg.image_size, cfg.image_size)


@torch.no_grad()
def encoder_attention(tok, images):
    """Each latent token's attention over the image patches in the encoder's LAST block.

    images (B,3,H,W) in [0,1] -> (B, K, G, G): softmax(q k^T / sqrt(d)) of the latent
    tokens' queries against the patch keys, averaged over heads. The rows are the
    share of attention that lands on patches (the rest goes to the class token and
    the latent tokens themselves), so they sum to at most 1.
    """
    enc, cfg = tok.encoder, tok.config
    S = cfg.image_size
    if images.ndim != 4 or images.shape[1:] != (3, S, S):
        raise ValueError(f"expected images (B, 3, {S}, {S}) in [0, 1], got {tuple(images.shape)}; use load_image()")
    last = enc.blocks[-1]
    seen = {}
    # The input of the last block, caught on the way through an ordinary forward pass.
    hook = last.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    try:
        enc(images, tok.latent_tokens)
    finally:
        hook.remove()
    x = last.ln_1(seen["x"])  # (B, T, W), T = 1 + G*G + K
    B, Tn, W = x.shape
    h = last.attn.heads
    q, k, _ = last.attn.qkv(x).view(B, Tn, 3, h, W // h).permute(2, 0, 3, 1, 4)  # each (B, h, T, d)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // h), dim=-1).mean(dim=1)  # (B, T, T)
    G = enc.grid
    return att[:, 1 + G * G :, 1 : 1 + G * G].reshape(B, cfg.num_latent_tokens, G, G)  # latents -> patches


def attention_overlays(image, attn, alpha=0.55):
    """image (3,H,W) in [0,1], attn (K,G,G) -> (K,3,H,W): each map, stretched to [0,1]
    per token and upsampled, blended over the image."""
    H, W = image.shape[-2:]
    a = F.interpolate(attn[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]  # (K,H,W)
    lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
    a = ((a - lo) / (hi - lo).clamp_min(1e-12))[:, None]  # (K,1,H,W)
    # A 'jet'-like colour map, blue (low) to red (high): R, G, B are tents centred at 3/4, 1/2, 1/4.
    heat = torch.cat([(1.5 - (4 * a - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)], dim=1)  # (K,3,H,W)
    return ((1 - alpha) * image[None].float() + alpha * heat).clamp(0, 1)


def _spread(n, k):
    """k indices evenly spread over range(n)."""
    k = min(k, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


# -----------------------------------------------------------------------------
# The sampling command.


def main(argv=None):
    """`python sample.py [options]`: prompts -> PNG files (and grid.png) in --outdir;
    `python sample.py export ...` and `python sample.py tokviz ...` run those commands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["export"], ["tokviz"]):
        return (export_main if argv[0] == "export" else tokviz_main)(argv[1:])
    p = argparse.ArgumentParser(
        description="Generate images from text with MaskGen + TA-TiTok (see the module docstring). "
        "Other commands: `sample.py export -h` (write a release), `sample.py tokviz -h` (the tokenizer figures).",
    )
    src = p.add_argument_group("prompts (at least one source)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    src.add_argument("--prompts", help="a .txt file (one prompt per line) or .jsonl file (a \"prompt\" field per line)")
    src.add_argument("--geneval", help="GenEval's evaluation_metadata.jsonl: writes GenEval's folder layout")
    src.add_argument("--mjhq", help="MJHQ-30K's meta_data.json: writes <outdir>/<category>/<id>.png, one image per id")
    ck = p.add_argument_group("checkpoints (default: the shipped shapes model in checkpoints/)")
    ck.add_argument("--generator", help="MaskGen: official release dir or its Hub id (owner/name), or our run folder / ckpt file")
    ck.add_argument("--tokenizer", help="TA-TiTok: official release dir or Hub id, or our run / ckpt file; default: the one the generator records")
    ck.add_argument("--revision", help="Hub revision (branch, tag, commit) for --generator / --tokenizer Hub ids; owner/name@REV also works")
    s = p.add_argument_group("sampling (defaults: the generator's config)")
    s.add_argument("--steps", type=int, help="decoding steps (paper: 16 VQ, 32 KL)")
    s.add_argument("--guidance_scale", type=float, help="classifier-free guidance scale; 1 = no guidance")
    s.add_argument("--guidance_schedule", help="VQ: cosine | linear | none;  KL: linear | constant")
    s.add_argument("--randomize_temperature", type=float, help="VQ: Gumbel temperature, annealed to 0")
    s.add_argument("--temperature", type=float, help="VQ: softmax temperature (default annealed); KL: DiffLoss noise")
    s.add_argument("--aesthetic", type=float, nargs="+", help="aesthetic score(s); several give one grid row each (Fig. 7)")
    s.add_argument("--seed", type=int, default=0, help="image (p, i) uses seed + p * num_images + i")
    s.add_argument("--seeding", choices=("item", "batch"), default="item", help="item: one generator per image "
                   "(still batched): an image depends on neither batch nor world size; batch: one per batch")  # fmt: skip
    s.add_argument("--num_images", type=int, help="images per prompt (default 1; 4 with --geneval, as GenEval)")
    s.add_argument("--batch_size", type=int, default=16)
    o = p.add_argument_group("output and hardware")
    o.add_argument("--outdir", default="out/samples")
    o.add_argument("--overwrite", action="store_true",
                   help="delete images of an earlier run in --outdir first (else such a folder is refused)")  # fmt: skip
    o.add_argument("--grid_rows", type=int, default=16, help="rows in the run's grid.png (0: no grid)")
    o.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    o.add_argument("--dtype", choices=sorted(train_common.DTYPES), default="fp32", help="autocast precision of the models")
    args = p.parse_args(argv)

    # 1. Prompts, numbers and the work list, read and checked before anything is loaded.
    geneval_lines, mjhq = None, None
    layout_flag = "--geneval" if args.geneval else "--mjhq" if args.mjhq else None
    if args.geneval and args.mjhq:
        raise ValueError("--geneval and --mjhq each write their own folder layout; give one of them")
    if layout_flag and (args.prompt or args.prompts):
        raise ValueError(f"{layout_flag} takes its prompts from the metadata file; drop --prompt / --prompts")
    if args.geneval:  # the JSON lines are kept verbatim: each prompt's folder gets its own as metadata.jsonl
        hint = " (it is prompts/evaluation_metadata.jsonl in GenEval)"
        lines = [(n, s.strip()) for n, s in enumerate(read_text(args.geneval, "GenEval metadata file", hint), 1) if s.strip()]
        prompts, geneval_lines = [_jsonl_prompt(s, args.geneval, n) for n, s in lines], [s for _, s in lines]
        if not prompts:
            raise ValueError(f"GenEval metadata file {args.geneval!r} holds no prompts; "
                             f"it should be GenEval's evaluation_metadata.jsonl")  # fmt: skip
    elif args.mjhq:
        mjhq = read_mjhq(args.mjhq)  # [(id, category, prompt)]
        prompts = [prompt for _, _, prompt in mjhq]
    else:
        prompts = list(args.prompt) + (read_prompt_file(args.prompts) if args.prompts else [])
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable), --prompts FILE, --geneval FILE or --mjhq FILE")
    geneval = geneval_lines is not None
    num_images = args.num_images if args.num_images is not None else (4 if geneval else 1)
    aesthetics = list(args.aesthetic) if args.aesthetic else [None]
    if layout_flag and len(aesthetics) > 1:
        raise ValueError(f"{layout_flag} writes one image set per prompt; give a single --aesthetic score")
    if mjhq and num_images != 1:
        raise ValueError("--mjhq writes one image per id (<category>/<id>.png, as MJHQ-30K's reference); drop --num_images")
    # Numbers that would give garbage images or none at all. Guidance, the Gumbel and the
    # DiffLoss temperatures are meaningful from 0 up (0: no noise; guidance 0 is the
    # unconditional model for KL, the conditional one for VQ's official formula); NaN and
    # inf are never.
    for flag, value in (("--steps", args.steps), ("--num_images", num_images), ("--batch_size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    numbers = [("--guidance_scale", args.guidance_scale), ("--randomize_temperature", args.randomize_temperature),
               ("--temperature", args.temperature)] + [("--aesthetic", a) for a in args.aesthetic or []]  # fmt: skip
    for flag, value in numbers:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if value is not None and value < 0 and flag != "--aesthetic":
            raise ValueError(f"{flag} must be >= 0, got {value}" + (" (1 = no guidance)" if flag == "--guidance_scale" else ""))
    items = make_items(len(prompts), num_images, len(aesthetics), args.seed)

    def path_of(item):
        """Where an item's PNG goes: GenEval's layout, MJHQ's, or sample.py's flat one."""
        if geneval:  # <outdir>/<prompt:05d>/samples/<image:04d>.png
            return os.path.join(args.outdir, f"{item.prompt_index:05d}", "samples", f"{item.image_index:04d}.png")
        if mjhq:  # <outdir>/<category>/<id>.png, one image per id
            image_id, category, _ = mjhq[item.prompt_index]
            return os.path.join(args.outdir, category, image_id + ".png")
        name = f"{item.prompt_index:05d}_s{item.seed:04d}"
        if len(aesthetics) > 1:  # the score names a file only when several are given
            name += f"_aes{aesthetics[item.aes_index]:g}"
        return os.path.join(args.outdir, name + ".png")

    # 2. Processes and device. Under torchrun (which sets RANK) a process group serves only
    # the final barrier: gloo runs anywhere (CPU or GPU) and no tensors move; ranks may
    # wait long there for the slowest. Plain python is rank 0 of 1, with no group.
    torchrun = "RANK" in os.environ
    if torchrun:
        rank, world, device = train_common.setup_distributed(args.device, backend="gloo", timeout=datetime.timedelta(hours=4))
    else:
        rank, world, device = 0, 1, pick_device(args.device)

    # 3. The output folder: another run's images there are refused, or deleted with
    # --overwrite (by rank 0; never one this run writes, so no rank waits for it).
    planned = [path_of(it) for it in items] + [os.path.join(args.outdir, "grid.png")] * (args.grid_rows > 0)
    planned += [os.path.join(args.outdir, f"{p:05d}", "metadata.jsonl") for p in range(len(prompts))] if geneval else []
    check_outdir(args.outdir, planned, args.overwrite, clear=rank == 0)

    # 4. Checkpoints, cross-checked (tokens, codebook, text widths) before any sampling.
    models = checkpoint.load_models(args.generator, args.tokenizer, device, revision=args.revision)
    gcfg = models.generator.config
    # Sampler options that only make sense for one variant.
    if args.guidance_schedule is not None:
        check_guidance_schedule(gcfg.mode, args.guidance_schedule, "--guidance_schedule")
    if gcfg.mode == "kl" and args.randomize_temperature is not None:
        print("note: --randomize_temperature only applies to MaskGen-VQ; ignored for this KL model")
    if args.aesthetic and any(a is not None for a in args.aesthetic) and not gcfg.aes_embed_dim:
        print("note: this generator has no aesthetic-score condition; --aesthetic is ignored")
    if gcfg.mode == "vq" and args.temperature == 0:
        raise ValueError("--temperature must be > 0 for MaskGen-VQ: the logits are divided by it (omit it for "
                         "the official annealed temperature)")  # fmt: skip
    aesthetics = [gcfg.aesthetic if a is None else a for a in aesthetics]  # labels show the real score
    if rank == 0:
        print(f"generator: {models.gen_source} [MaskGen-{gcfg.mode.upper()}, K={gcfg.num_tokens}]")
        print(f"tokenizer: {models.tok_source}")
    opts = dict(num_steps=args.steps, guidance_scale=args.guidance_scale, guidance_schedule=args.guidance_schedule,
                randomize_temperature=args.randomize_temperature, temperature=args.temperature)  # fmt: skip

    # 5. This rank's share of the work list, in batches.
    mine = shard(items, rank, world)
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    os.makedirs(args.outdir, exist_ok=True)
    if rank == 0 and not geneval:  # an index from file name to prompt (GenEval has metadata.jsonl)
        with open(os.path.join(args.outdir, "prompts.jsonl"), "w", encoding="utf-8") as f:
            for p, text in enumerate(prompts):
                row = {"id": mjhq[p][0], "category": mjhq[p][1], "prompt": text} if mjhq else {"index": p, "prompt": text}
                f.write(json.dumps(row) + "\n")

    written = []
    autocast = torch.autocast(device.type, dtype=train_common.DTYPES[args.dtype], enabled=args.dtype != "fp32")
    with torch.inference_mode(), autocast:
        null = models.gen_text([""])  # the classifier-free guidance null condition, computed once
        for batch in tqdm(batches, desc=f"sampling (rank {rank})" if world > 1 else "sampling", disable=rank != 0):
            images = generate_images(
                models, [prompts[it.prompt_index] for it in batch], [aesthetics[it.aes_index] for it in batch],
                [it.seed for it in batch], null, opts, device, args.seeding,
            )  # fmt: skip
            for it, arr in zip(batch, to_pixels(images)):  # (B,H,W,3) uint8
                path = path_of(it)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_png(arr, path)
                if geneval and it.image_index == 0:  # the rank that owns image 0 writes the metadata
                    with open(os.path.join(args.outdir, f"{it.prompt_index:05d}", "metadata.jsonl"), "w", encoding="utf-8") as f:
                        f.write(geneval_lines[it.prompt_index] + "\n")  # the line verbatim, as GenEval expects
                written.append(path)

    # 6. After every rank is done, rank 0 draws the grid from the files on disk.
    if torchrun:
        train_common.barrier()
    grid_path = None
    if rank == 0:
        if args.grid_rows > 0:
            grid_path = os.path.join(args.outdir, "grid.png")  # outside the numbered folders: GenEval skips it
            build_run_grid(path_of, prompts, items, aesthetics, args.grid_rows).save(grid_path)
        where = f"{args.outdir}/<prompt>/samples/" if geneval else f"{args.outdir}/<category>/" if mjhq else f"{args.outdir}/"
        n = len(items)
        where = ", ".join(written) if world == 1 and n <= 4 else where  # a few images: name each file
        print(f"wrote {n} image{'s' * (n != 1)} to {where}" + (f"; grid: {grid_path}" if grid_path else ""))
    if torchrun:
        train_common.teardown()
    return {"images": written, "grid": grid_path, "items": mine}


def export_main(argv):
    """`python sample.py export SRC --out DIR`: a tokenizer or generator run folder or
    checkpoint file (or a release) written in the official release layout (config.json +
    model.safetensors), which checkpoint.py and the official code read: how released models,
    the shipped ones included, are made. EMA weights when present. A generator gives
    DIR/generator and DIR/tokenizer (its tokenizer); one model (--which, or a tokenizer
    run) fills DIR itself."""
    p = argparse.ArgumentParser(prog="sample.py export", description=export_main.__doc__)
    p.add_argument("src", metavar="SRC", help="run folder, checkpoint file, release dir or Hub id")
    p.add_argument("--out", required=True, help="the directory to write (new or empty, unless --overwrite)")
    p.add_argument("--which", choices=("generator", "tokenizer", "both"),
                   help="what to export (default: both for a generator, the tokenizer for a tokenizer)")
    p.add_argument("--tokenizer", help="the generator's tokenizer (default: the one it records)")
    p.add_argument("--revision", help="Hub revision for a Hub id SRC / --tokenizer")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR, replacing what export writes")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16, as the shipped models are (half the size)")
    args = p.parse_args(argv)
    return checkpoint.export_release(args.src, args.out, args.which, args.tokenizer, args.overwrite, args.revision,
                                     half=args.fp16)


def tokviz_main(argv):
    """`python sample.py tokviz --image IMG [--caption TEXT] [--tokenizer REF]`: Fig. 4 as
    swap.png (a row per swapped token, a column per replacement: VQ codes, or the token
    values of --swap_image / the image at --sources) and Fig. 8 as attention.png."""
    p = argparse.ArgumentParser(prog="sample.py tokviz", description=tokviz_main.__doc__)
    p.add_argument("--tokenizer", help="official release dir or Hub id, or our run / ckpt file (default: the shipped shapes model)")
    p.add_argument("--image", required=True)
    p.add_argument("--caption", default="", help="the image's caption (the decoder is text-aware)")
    p.add_argument("--positions", type=int, nargs="+", help="token positions to swap (rows; default: 8 spread over K)")
    p.add_argument("--codes", type=int, nargs="+", help="VQ: replacement code ids (columns; default: random)")
    p.add_argument("--swap_image", help="take the replacements from this image's tokens (KL; VQ if no --codes)")
    p.add_argument("--sources", type=int, nargs="+", help="token positions the replacements come from (default: spread)")
    p.add_argument("--num_codes", type=int, default=6, help="columns when --codes / --sources are not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", default="out/tokviz")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    tok, text_enc = checkpoint.load_tokenizer(args.tokenizer or checkpoint.default_release("tokenizer", "no --tokenizer given"), device)
    cfg = tok.config
    K, S = cfg.num_latent_tokens, cfg.image_size
    image = load_image(args.image, S)[None].to(device)  # (1,3,S,S): shorter side resized, centre crop

    with torch.no_grad():
        final = text_enc([args.caption]).final  # (1,L,W)
        tokens = tok.encode(image)  # VQ (1,K) | KL (1,K,C)
        recon = tok.decode(tokens, final).clamp(0, 1)[0]  # (3,S,S)
        positions = args.positions or _spread(K, 8)
        other = tok.encode(load_image(args.swap_image, S)[None].to(device)) if args.swap_image else tokens
        sources = args.sources or _spread(K, args.num_codes)
        if cfg.quantize_mode == "vq" and args.codes:
            replacements, names = args.codes, [f"code {c}" for c in args.codes]
        elif cfg.quantize_mode == "vq" and not args.swap_image:
            g = torch.Generator().manual_seed(args.seed)
            replacements = torch.randperm(cfg.codebook_size, generator=g)[: args.num_codes].tolist()
            names = [f"code {c}" for c in replacements]
        else:  # token values from the second image (or this one) at the source positions
            replacements = other[0, sources]  # VQ (J,) ids | KL (J,C)
            names = [("img2 " if args.swap_image else "") + f"tok {j}" + (f"={int(c)}" if cfg.quantize_mode == "vq" else "")
                     for j, c in zip(sources, replacements)]  # fmt: skip
        swaps = swap_tokens(tok, tokens, final, positions, replacements)  # (P,J,3,S,S)
        attn = encoder_attention(tok, image)[0]  # (K,G,G)
        overlays = attention_overlays(image[0], attn)  # (K,3,S,S)

    # Figure 4: each row is [input, reconstruction, the swaps of one token position].
    os.makedirs(args.outdir, exist_ok=True)
    ids = tokens[0].tolist() if cfg.quantize_mode == "vq" else None
    inp, rec = (Image.fromarray(a) for a in to_pixels(torch.stack([image[0], recon])))
    rows = [[inp, rec] + [Image.fromarray(a) for a in row] for row in to_pixels(swaps)]
    row_labels = [f"token {i}" + (f" (code {ids[i]})" if ids else "") + " replaced by ->" for i in positions]
    tile_labels = [["input", "reconstruction"] + names for _ in positions]
    swap_path = os.path.join(args.outdir, "swap.png")
    labelled_grid(rows, row_labels, tile_labels).save(swap_path)

    # Figure 8: the input, then one overlay per latent token, 8 tiles a row.
    tiles = [inp] + [Image.fromarray(a) for a in to_pixels(overlays)]
    labels = ["input"] + [f"latent {k}" for k in range(K)]
    attn_path = os.path.join(args.outdir, "attention.png")
    starts = range(0, len(tiles), 8)
    labelled_grid([tiles[i : i + 8] for i in starts], None, [labels[i : i + 8] for i in starts]).save(attn_path)
    print(f"wrote {swap_path} (latent-code swapping) and {attn_path} (encoder attention maps)")
    return {"swap": swap_path, "attention": attn_path, "swaps": swaps, "attention_maps": attn, "overlays": overlays}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")

"""
Sample images from text with MaskGen + TA-TiTok, and draw the tokenizer's figures.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact Text-Aware
One-Dimensional Tokens" (Kim et al., arXiv 2501.07730): sampling (§3, §4.2), the evaluation
protocol (§5.1, App. E: no rejection sampling, classifier-free guidance, 16 steps for VQ / 32
for KL, GenEval and MJHQ prompts), aesthetic scores (App. C, Fig. 7) and the tokenizer
figures (§5.2, Fig. 4; App. G, Fig. 8). Per batch of prompts:

    captions --TextEncoder--> .penultimate (B,L,W), .pooled (B,E)  -> MaskGen conditions
                              .final       (B,L,W)                 -> TA-TiTok decoder
    "" (computed once)    --> the classifier-free guidance null condition (or --negative_prompt)
    MaskGen.generate()    --> tokens: VQ ids (B,K) | KL vectors (B,K,C)
    TATiTok.decode        --> images (B,3,H,W) in [0,1] -> PNG files

Usage:
    python sample.py --prompt "a red circle to the left of a blue square"   # the shipped model
    python sample.py --prompts prompts.txt --num_images 4 --aesthetic 5 6 7
    python sample.py --generator runs/maskgen --geneval evaluation_metadata.jsonl   # or --mjhq meta_data.json
    python sample.py --prompt "a blue square" --init_image img.png --strength 0.5   # image-to-image
    torchrun --nproc_per_node=8 sample.py ...                 # shards the prompts over GPUs
    python sample.py export runs/maskgen --out release/ [--fp16]   # the official release layout
    python sample.py tokviz --image img.png --caption "a red circle"   # swap.png, attention.png
"""

import argparse
import datetime
import json
import math
import os
import re
import sys
from collections import namedtuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import checkpoint
from checkpoint import pick_device
import train_common
from data import IMAGE_EXTS, load_image
from maskgen import check_guidance_schedule


def read_text(path, what, hint=""):
    """The lines of a UTF-8 text file, with errors that name it."""
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
        raise ValueError(f"--prompts {path!r} is a .json file, which would be read as text; --prompts takes .txt (one "
                         f'prompt per line) or .jsonl (one {{"prompt": ...}} object per line). For MJHQ-30K\'s '
                         f"meta_data.json use --mjhq {path}")
    lines = [(n, s) for n, s in enumerate(read_text(path, "prompt file"), 1) if s.strip()]
    prompts = [_jsonl_prompt(s, path, n) if path.endswith(".jsonl") else s for n, s in lines]
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts; write one prompt per line (.txt) or one "
                         f'{{"prompt": "..."}} object per line (.jsonl)')
    return prompts


def _jsonl_prompt(line, path, n):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not valid JSON ({e}); a .jsonl file holds one JSON object per line") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f'{path}:{n} has no "prompt" string; each line must look like '
                         f'{{"prompt": "a red circle", ...}}')
    return obj["prompt"]


def read_mjhq(path):
    """MJHQ-30K's meta_data.json -> [(id, category, prompt)] in the file's order. Image <id>
    goes to <outdir>/<category>/<id>.png, MJHQ's own layout, so that evaluate.py gen can
    score each category on its own."""
    bad, shape = f"MJHQ metadata file {path!r}", '{"<image id>": {"category": "animals", "prompt": "..."}, ...}'
    text = "\n".join(read_text(path, "MJHQ metadata file", " (meta_data.json in playgroundai/MJHQ-30K)"))
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{bad} is not valid JSON ({e}); --mjhq takes MJHQ-30K's meta_data.json: {shape}") from None
    if not isinstance(meta, dict) or not meta:
        got = "an empty object" if meta == {} else f"a JSON {type(meta).__name__}"
        raise ValueError(f"{bad} holds {got}; MJHQ-30K's meta_data.json is one object {shape}")
    for key, row in meta.items():
        if not (isinstance(row, dict) and isinstance(row.get("category"), str) and isinstance(row.get("prompt"), str)):
            raise ValueError(f'{bad}: entry {key!r} needs string fields "category" and "prompt", like {shape}')
        for what, name in (("image id", key), ("category", row["category"])):
            if name in ("", ".", "..") or any(sep in name for sep in "/\\\0"):
                raise ValueError(f"{bad}: entry {key!r} has the {what} {name!r}, which cannot name a file or folder")
    return [(key, row["category"], row["prompt"]) for key, row in meta.items()]


# The work list, and sampling it. Every image is one item (prompt p, image i, aesthetic score a)
# with the seed seed + p * num_images + i: it depends on neither the batch size nor the number of
# processes, and the same (p, i) at different aesthetic scores shares a seed (Fig. 7).
Item = namedtuple("Item", "prompt_index image_index aes_index seed")


def make_items(num_prompts, num_images, num_aesthetics, seed):
    """Every item, prompt by prompt; within a prompt, aesthetic score by score."""
    return [Item(p, i, a, seed + p * num_images + i)
            for p in range(num_prompts) for a in range(num_aesthetics) for i in range(num_images)]


def shard(items, rank, world):
    """Rank r takes items r, r + W, r + 2W, ...: each item once over all ranks, balanced to within one."""
    return items[rank::world]


def generate_images(models, prompts, aesthetics, seeds, null, opts, device, seeding="item"):
    """One batch: B captions, B aesthetic scores (or None), B seeds -> images (B,3,H,W) in [0,1].

    seeding="item": one torch.Generator(seed) per image, passed as a list to one batched
    generate(), so an image is the one a batch of one would give. seeding="batch": one
    generator, seeded by the first seed; an image then depends on batch and world size.
    """
    text = models.gen_text(prompts)  # .penultimate (B,L,W), .pooled (B,E), .final (B,L,W)
    final = text.final if models.tok_text is models.gen_text else models.tok_text(prompts).final
    gens = [torch.Generator(device=device).manual_seed(seed) for seed in (seeds if seeding == "item" else seeds[:1])]
    aes = None if aesthetics[0] is None else torch.tensor(aesthetics, dtype=torch.float32, device=device)  # (B,)
    tokens = models.generator.generate(text.penultimate, text.pooled, null.penultimate, null.pooled, aesthetic=aes,
                                       generator=gens if seeding == "item" else gens[0], **opts)  # (B,K) | (B,K,C)
    return models.tokenizer.decode(tokens, final)  # (B,3,H,W)


def to_pixels(images):
    """(..., 3, H, W) in [0, 1] -> uint8 numpy (..., H, W, 3), rounded to the nearest level
    (a plain .to(uint8) truncates, darkening every pixel by half a level on average)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def save_png(arr, path):
    """Write a (H, W, 3) uint8 image atomically: a run stopped mid-write leaves the whole
    PNG or none (a partial file, removed on any error, never takes its name)."""
    checkpoint.atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


# The output folder: never a mix of old and new samples, since evaluate.py scores every image
# in it. The names sample.py gives its files, relative to --outdir (MJHQ's <category>/<id>.png
# are those its prompts.jsonl lists):
OWN_IMAGES = re.compile(r"\d{5,}_s-?\d+(_aes[^/]*)?\.png"  # the flat layout: <prompt>_s<seed>[_aes<score>].png
                        r"|\d{5,}/samples/\d{4,}\.png")  # GenEval's: <prompt>/samples/<image>.png
OWN_OTHERS = re.compile(r"grid\.png|\d{5,}/metadata\.jsonl")  # the overview grid, GenEval's per-prompt metadata


def check_outdir(outdir, planned, overwrite, clear):
    """Refuse an outdir holding images this run will not write (not in `planned`), or with
    overwrite delete them first (where `clear`: rank 0). Only sample.py's own files are ever
    deleted; other images always stop the run."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise ValueError(f"--outdir {outdir} is a file, not a folder; move it or choose another --outdir")
    if not os.path.isdir(outdir):
        return
    planned = {os.path.relpath(p, outdir).replace(os.sep, "/") for p in planned}
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(outdir) for f in names)
    rel = {p: os.path.relpath(p, outdir).replace(os.sep, "/") for p in files}
    stale, foreign, mjhq, index = [], [], set(), os.path.join(outdir, "prompts.jsonl")
    if os.path.isfile(index):  # the <category>/<id>.png names an earlier --mjhq run listed there
        with open(index, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("category"), str):
                    mjhq.add(f"{row['category']}/{row['id']}.png")
    # Image files (by extension, as evaluate.py finds them, which skips grid.png) not rewritten.
    for p in files:
        if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and rel[p] not in planned and rel[p] != "grid.png":
            (stale if OWN_IMAGES.fullmatch(rel[p]) or rel[p] in mjhq else foreign).append(p)
    if foreign:
        raise ValueError(f"--outdir {outdir} holds {len(foreign)} image file(s) sample.py did not write (e.g. "
                         f"{foreign[0]}); they would be scored with the new samples, and --overwrite deletes only "
                         f"sample.py's own files: move them or choose another --outdir")
    if stale and not overwrite:
        raise ValueError(f"--outdir {outdir} already holds {len(stale)} image(s) this run will not write (e.g. "
                         f"{stale[0]}); old and new samples would be mixed (evaluate.py scores every image in the "
                         f"folder). Choose another --outdir, or pass --overwrite to delete those {len(stale)} "
                         f"file(s) first")
    if not (overwrite and clear):
        return
    # Also the GenEval metadata and the grid this run will not rewrite, then emptied folders.
    stale += [p for p in files if OWN_OTHERS.fullmatch(rel[p]) and rel[p] not in planned]
    for path in stale:
        os.remove(path)
    dirs = {os.path.dirname(p) for p in stale}
    for d in sorted(dirs | {os.path.dirname(d) for d in dirs}, reverse=True):
        if os.path.abspath(d) != os.path.abspath(outdir) and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
    print(f"--overwrite: deleted {len(stale)} file(s) of an earlier run from {outdir}")


def labelled_grid(rows, row_labels=None, tile_labels=None, min_tile=128, pad=4):
    """rows: lists of equally sized PIL images (ragged rows are padded with white);
    row_labels: a string per row, drawn above it; tile_labels: a string per tile, drawn under it."""
    # PIL's FreeType font at 13 px: at its default 10 px a space is no wider than a letter gap ("twogreen
    # triangles"). Without FreeType or load_default(size=) (Pillow < 10.1): its bitmap font (6 px spaces).
    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):
        font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    line = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=font)[3] + 4  # a text line + margin
    w0, h0 = rows[0][0].size
    s = max(1, math.ceil(min_tile / max(w0, h0)))  # integer nearest-neighbour upscaling, so labels stay readable
    tw, th = w0 * s, h0 * s
    row_h = (line if row_labels else 0) + th + (line if tile_labels else 0) + pad
    W, H = pad + max(len(r) for r in rows) * (tw + pad), pad + len(rows) * row_h
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)

    def fit(text, width):  # text cut to `width` pixels, the cut marked with "..."
        if draw.textlength(text, font=font) <= width:
            return text
        cut = text[:width]  # a glyph is at least 1 px wide; then the longest cut + "..." that fits
        while cut and draw.textlength(cut + "...", font=font) > width:
            cut = cut[:-1]
        return cut + "..."

    for r, row in enumerate(rows):
        y = pad + r * row_h
        if row_labels:
            draw.text((pad, y + 1), fit(row_labels[r], W - 2 * pad), fill=(0, 0, 0), font=font)
            y += line
        for c, im in enumerate(row):
            x = pad + c * (tw + pad)
            grid.paste(im.resize((tw, th), Image.NEAREST), (x, y))
            if tile_labels and tile_labels[r][c]:
                draw.text((x, y + th + 1), fit(tile_labels[r][c], tw), fill=(60, 60, 60), font=font)
    return grid


def build_run_grid(path_of, prompts, items, aesthetics, max_rows, max_cols=16):
    """One row per (prompt, aesthetic score), one column per image, read back from the files
    path_of(item) (so under torchrun rank 0 sees every rank's images)."""
    rows, labels, tile_labels = {}, {}, {}
    for it in items:
        key = (it.prompt_index, it.aes_index)
        if (key not in rows and len(rows) == max_rows) or len(rows.setdefault(key, [])) >= max_cols:
            continue  # a new row past max_rows, or a full row
        with Image.open(path_of(it)) as im:
            rows[key].append(im.convert("RGB"))
        tile_labels.setdefault(key, []).append(f"seed {it.seed}")
        aes = f"[aesthetic {aesthetics[it.aes_index]:g}] " if len(aesthetics) > 1 else ""
        labels[key] = f"{aes}{it.prompt_index}: {prompts[it.prompt_index]}"
    return labelled_grid(list(rows.values()), [labels[k] for k in rows], [tile_labels[k] for k in rows])


# The tokenizer figures (`sample.py tokviz`). TA-TiTok's K 1D latent tokens (§3.2) each read the
# whole image, so a token often owns one semantic element (an object, its colour, the style)
# rather than a fixed patch: swapping its code changes that element (§5.2, Fig. 4), and its
# attention in the encoder covers it (App. G, Fig. 8).
@torch.no_grad()
def swap_tokens(tok, tokens, text_final, positions, replacements, batch_size=64):
    """Decode the image with token `positions[p]` replaced by `replacements[j]`, for all p, j.

    tokens: VQ ids (1,K) long, or KL tokens (1,K,C); text_final: (1,L,W) caption states;
    replacements: VQ code ids (J,), or KL token vectors (J,C). Returns (P, J, 3, H, W) in [0,1].
    """
    cfg = tok.config
    K, P, J, vq = cfg.num_latent_tokens, len(positions), len(replacements), cfg.quantize_mode == "vq"
    if bad := [i for i in positions if not 0 <= i < K]:
        raise ValueError(f"token positions {bad} are out of range: this tokenizer has K={K} tokens (0..{K - 1})")
    codes = torch.as_tensor(replacements, dtype=torch.long if vq else tokens.dtype, device=tokens.device)  # (J,)|(J,C)
    if vq and codes.numel() and (codes.min() < 0 or codes.max() >= cfg.codebook_size):
        raise ValueError(f"code ids must lie in [0, {cfg.codebook_size}); got {codes.tolist()}")
    x = tokens.expand(P * J, *tokens.shape[1:]).clone()  # (P*J, K) | (P*J, K, C)
    for n, i in enumerate(positions):
        x[n * J : (n + 1) * J, i] = codes  # rows n*J..: token i takes each replacement in turn
    out = [tok.decode(x[s : s + batch_size], text_final.expand(len(x[s : s + batch_size]), -1, -1))
           for s in range(0, P * J, batch_size)]
    return torch.cat(out).clamp(0, 1).view(P, J, 3, cfg.image_size, cfg.image_size)


@torch.no_grad()
def encoder_attention(tok, images):
    """Each latent token's attention over the image patches in the encoder's LAST block.

    images (B,3,H,W) in [0,1] -> (B, K, G, G): softmax(q k^T / sqrt(d)) of the latent tokens'
    queries against the patch keys, averaged over heads. The rest of a row's attention goes to
    the class token and the latent tokens, so a map sums to at most 1.
    """
    enc, cfg, S = tok.encoder, tok.config, tok.config.image_size
    if images.ndim != 4 or images.shape[1:] != (3, S, S):
        raise ValueError(f"expected images (B, 3, {S}, {S}) in [0, 1], got {tuple(images.shape)}; use load_image()")
    last, seen = enc.blocks[-1], {}
    # The input of the last block, caught on the way through an ordinary forward pass.
    hook = last.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    try:
        enc(images, tok.latent_tokens)
    finally:
        hook.remove()
    x = last.ln_1(seen["x"])  # (B, T, W), T = 1 + G*G + K
    (B, Tn, W), h, G = x.shape, last.attn.heads, enc.grid
    q, k, _ = last.attn.qkv(x).view(B, Tn, 3, h, W // h).permute(2, 0, 3, 1, 4)  # each (B, h, T, d)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // h), dim=-1).mean(dim=1)  # (B, T, T)
    return att[:, 1 + G * G :, 1 : 1 + G * G].reshape(B, cfg.num_latent_tokens, G, G)  # latents -> patches


def attention_overlays(image, attn, alpha=0.55):
    """image (3,H,W) in [0,1], attn (K,G,G) -> (K,3,H,W): each map, stretched to [0,1] per
    token and upsampled, blended over the image."""
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


def main(argv=None):
    """`python sample.py [options]`: prompts -> PNG files (and grid.png) in --outdir;
    `python sample.py export ...` and `python sample.py tokviz ...` run those commands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["export"], ["tokviz"]):
        return (export_main if argv[0] == "export" else tokviz_main)(argv[1:])
    p = argparse.ArgumentParser(description="Generate images from text with MaskGen + TA-TiTok (see the module "
                                "docstring). Other commands: `sample.py export -h` (write a release), "
                                "`sample.py tokviz -h` (the tokenizer figures).")
    src = p.add_argument_group("prompts (at least one source)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    src.add_argument("--prompts", help='a .txt file (one prompt per line) or .jsonl file (a "prompt" field per line)')
    src.add_argument("--geneval", help="GenEval's evaluation_metadata.jsonl: writes GenEval's folder layout")
    src.add_argument("--mjhq", help="MJHQ-30K's meta_data.json: writes <outdir>/<category>/<id>.png, one image per id")
    ck = p.add_argument_group("checkpoints (default: the shipped shapes model in checkpoints/)")
    ck.add_argument("--generator", help="MaskGen: official release dir or Hub id (owner/name), or our run / ckpt file")
    ck.add_argument("--tokenizer", help="TA-TiTok, the same forms; default: the one the generator records")
    ck.add_argument("--revision", help="Hub revision (branch, tag, commit) for Hub ids; owner/name@REV also works")
    s = p.add_argument_group("sampling (defaults: the generator's config)")
    s.add_argument("--steps", type=int, help="decoding steps (paper: 16 VQ, 32 KL)")
    s.add_argument("--guidance_scale", type=float, help="classifier-free guidance scale; 1 = no guidance")
    s.add_argument("--guidance_schedule", help="VQ: cosine | linear | none;  KL: linear | constant")
    s.add_argument("--negative_prompt", default="", help="guidance's unconditional caption (default \"\", as trained)")
    s.add_argument("--randomize_temperature", type=float, help="VQ: Gumbel temperature, annealed to 0")
    s.add_argument("--temperature", type=float, help="VQ: softmax temperature (default annealed); KL: DiffLoss noise")
    s.add_argument("--aesthetic", type=float, nargs="+", help="aesthetic score(s); several: a grid row each (Fig. 7)")
    s.add_argument("--init_image", help="image-to-image: start from this image's tokens, for every prompt (resized "
                   "to the tokenizer's image size: shorter side, centre crop)")
    s.add_argument("--strength", type=float, help="with --init_image: the share of its tokens redrawn under the "
                   "prompt, 0 (its reconstruction) to 1 (plain generation); default 0.5")
    s.add_argument("--seed", type=int, default=0, help="image (p, i) uses seed + p * num_images + i")
    s.add_argument("--seeding", choices=("item", "batch"), default="item", help="a generator per image or per batch")
    s.add_argument("--num_images", type=int, help="images per prompt (default 1; 4 with --geneval, as GenEval)")
    s.add_argument("--batch_size", type=int, default=16)
    o = p.add_argument_group("output and hardware")
    o.add_argument("--outdir", default="out/samples")
    o.add_argument("--overwrite", action="store_true", help="delete an earlier run's images in --outdir first")
    o.add_argument("--grid_rows", type=int, default=16, help="rows in the run's grid.png (0: no grid)")
    o.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    o.add_argument("--dtype", choices=sorted(train_common.DTYPES), default="fp32", help="autocast precision")
    args = p.parse_args(argv)
    # 1. Prompts, numbers and the work list, read and checked before anything is loaded.
    geneval, geneval_lines, mjhq = bool(args.geneval), None, None
    layout_flag = "--geneval" if args.geneval else "--mjhq" if args.mjhq else None
    if args.geneval and args.mjhq:
        raise ValueError("--geneval and --mjhq each write their own folder layout; give one of them")
    if layout_flag and (args.prompt or args.prompts):
        raise ValueError(f"{layout_flag} takes its prompts from the metadata file; drop --prompt / --prompts")
    if args.geneval:  # each prompt's folder gets its JSON line verbatim as metadata.jsonl
        text = read_text(args.geneval, "GenEval metadata file", " (it is prompts/evaluation_metadata.jsonl in GenEval)")
        lines = [(n, s.strip()) for n, s in enumerate(text, 1) if s.strip()]
        prompts, geneval_lines = [_jsonl_prompt(s, args.geneval, n) for n, s in lines], [s for _, s in lines]
        if not prompts:
            raise ValueError(f"GenEval metadata file {args.geneval!r} holds no prompts; "
                             f"it should be GenEval's evaluation_metadata.jsonl")
    elif args.mjhq:
        mjhq = read_mjhq(args.mjhq)  # [(id, category, prompt)]
        prompts = [prompt for _, _, prompt in mjhq]
    else:
        prompts = list(args.prompt) + (read_prompt_file(args.prompts) if args.prompts else [])
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable), --prompts FILE, --geneval FILE or --mjhq FILE")
    num_images = args.num_images if args.num_images is not None else (4 if geneval else 1)
    aesthetics = list(args.aesthetic) if args.aesthetic else [None]
    if layout_flag and len(aesthetics) > 1:
        raise ValueError(f"{layout_flag} writes one image set per prompt; give a single --aesthetic score")
    if mjhq and num_images != 1:
        raise ValueError("--mjhq writes one image per id (<category>/<id>.png, as MJHQ-30K's reference); "
                         "drop --num_images")
    # Numbers that would give garbage images or none. Guidance and the Gumbel and DiffLoss
    # temperatures are meaningful from 0 up (0: no noise; guidance 0 is the unconditional model
    # for KL, the conditional one for VQ's official formula); NaN and inf never are.
    for flag, value in (("--steps", args.steps), ("--num_images", num_images), ("--batch_size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    numbers = [(f"--{k}", getattr(args, k)) for k in ("guidance_scale", "randomize_temperature", "temperature")]
    for flag, value in numbers + [("--aesthetic", a) for a in args.aesthetic or []]:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if value is not None and value < 0 and flag != "--aesthetic":
            raise ValueError(f"{flag} must be >= 0, got {value}" + " (1 = no guidance)" * (flag == "--guidance_scale"))
    if args.strength is not None and not (args.init_image and 0 <= args.strength <= 1):
        raise ValueError(f"--strength {args.strength} " + ("must be in [0, 1], the share of the image's tokens redrawn "
                         "(0 keeps them all, 1 redraws every one)" if args.init_image else "needs --init_image IMG"))
    items = make_items(len(prompts), num_images, len(aesthetics), args.seed)

    def path_of(item):
        if geneval:  # GenEval's layout: <outdir>/<prompt:05d>/samples/<image:04d>.png
            return os.path.join(args.outdir, f"{item.prompt_index:05d}", "samples", f"{item.image_index:04d}.png")
        if mjhq:  # MJHQ's: <outdir>/<category>/<id>.png, one image per id
            return os.path.join(args.outdir, mjhq[item.prompt_index][1], mjhq[item.prompt_index][0] + ".png")
        aes = f"_aes{aesthetics[item.aes_index]:g}" if len(aesthetics) > 1 else ""  # only when several are given
        return os.path.join(args.outdir, f"{item.prompt_index:05d}_s{item.seed:04d}{aes}.png")

    # 2. Processes and device. Under torchrun (which sets RANK) a gloo process group serves only the
    # final barrier, where ranks may wait long for the slowest; plain python is rank 0 of 1.
    torchrun, hours = "RANK" in os.environ, datetime.timedelta(hours=4)
    rank, world, device = (train_common.setup_distributed(args.device, backend="gloo", timeout=hours) if torchrun
                           else (0, 1, pick_device(args.device)))
    # 3. Another run's images in the output folder are refused, or deleted with --overwrite once the
    # models have loaded (by rank 0; never one this run writes, so no rank waits for it).
    metas = {p: os.path.join(args.outdir, f"{p:05d}", "metadata.jsonl") for p in range(len(prompts)) if geneval}
    planned = [path_of(it) for it in items] + [os.path.join(args.outdir, "grid.png")] * (args.grid_rows > 0)
    check_outdir(args.outdir, planned + list(metas.values()), args.overwrite, clear=False)
    # 4. Checkpoints, cross-checked (tokens, codebook, text widths); options for one variant only.
    models = checkpoint.load_models(args.generator, args.tokenizer, device, revision=args.revision)
    check_outdir(args.outdir, planned + list(metas.values()), args.overwrite, clear=rank == 0)
    gcfg = models.generator.config
    if args.guidance_schedule is not None:
        check_guidance_schedule(gcfg.mode, args.guidance_schedule, "--guidance_schedule")
    if gcfg.mode == "kl" and args.randomize_temperature is not None:
        print("note: --randomize_temperature only applies to MaskGen-VQ; ignored for this KL model")
    if args.aesthetic and not gcfg.aes_embed_dim:
        print("note: this generator has no aesthetic-score condition; --aesthetic is ignored")
    if gcfg.mode == "vq" and args.temperature == 0:
        raise ValueError("--temperature must be > 0 for MaskGen-VQ: the logits are divided by it (omit it for "
                         "the official annealed temperature)")
    aesthetics = [gcfg.aesthetic if a is None else a for a in aesthetics]  # labels show the real score
    if rank == 0:
        print(f"generator: {models.gen_source} [MaskGen-{gcfg.mode.upper()}, K={gcfg.num_tokens}]")
        print(f"tokenizer: {models.tok_source}")
    for p in prompts if models.vocabulary and rank == 0 else []:  # a model of a closed world (shapes) names its words
        if unknown := sorted({w for w in re.findall(r"\w+", p.lower()) if w not in models.vocabulary}):
            print(f"warning: the prompt {p!r} has words this model never saw ({', '.join(unknown)}); it will draw "
                  f"something else. Its vocabulary: {' '.join(models.vocabulary)}")
    opts = dict(num_steps=args.steps, guidance_scale=args.guidance_scale, guidance_schedule=args.guidance_schedule,
                randomize_temperature=args.randomize_temperature, temperature=args.temperature)
    # 5. This rank's share of the work list, in batches.
    mine = shard(items, rank, world)
    os.makedirs(args.outdir, exist_ok=True)
    if rank == 0 and not geneval:  # an index from file name to prompt (GenEval has metadata.jsonl)
        with open(os.path.join(args.outdir, "prompts.jsonl"), "w", encoding="utf-8") as f:
            for p, text in enumerate(prompts):
                row = {"id": mjhq[p][0], "category": mjhq[p][1]} if mjhq else {"index": p}
                f.write(json.dumps({**row, "prompt": text}) + "\n")
    written = []
    autocast = torch.autocast(device.type, dtype=train_common.DTYPES[args.dtype], enabled=args.dtype != "fp32")
    try:
        with torch.inference_mode(), autocast:
            # CFG's unconditional branch: the "" caption the model was trained with (caption dropout), or a
            # negative prompt in its place, so that guidance steers away from it. Computed once.
            null = models.gen_text([args.negative_prompt])
            if args.init_image:  # image-to-image: its tokens, once, for every prompt
                # The image resized (shorter side) to the tokenizer's image size and centre-cropped, as every image
                # it reads -> tokens: VQ ids (1,K), KL posterior means (1,K,C) (its reconstruction decodes those).
                try:
                    image = load_image(args.init_image, models.tokenizer.config.image_size)  # (3,S,S) in [0,1]
                except FileNotFoundError:
                    raise FileNotFoundError(f"--init_image {args.init_image!r} does not exist; give the image file to "
                                            "start from") from None
                except (OSError, Image.DecompressionBombError) as e:
                    raise ValueError(f"--init_image {args.init_image!r} is not a readable image ({e}); give a PNG or "
                                     "JPEG file") from None
                init = models.tokenizer.encode(image[None].to(device))  # (1,K) | (1,K,C)
                opts.update(init_tokens=init, strength=0.5 if args.strength is None else args.strength)
            batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
            for batch in tqdm(batches, desc=f"sampling (rank {rank})" if world > 1 else "sampling", disable=rank != 0):
                images = generate_images(models, [prompts[it.prompt_index] for it in batch],
                                         [aesthetics[it.aes_index] for it in batch], [it.seed for it in batch],
                                         null, opts, device, args.seeding)  # (B,3,H,W)
                for it, arr in zip(batch, to_pixels(images)):  # (B,H,W,3) uint8
                    path = path_of(it)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    save_png(arr, path)
                    written.append(path)
                    if geneval and it.image_index == 0:  # the rank that owns image 0 writes the metadata, verbatim
                        with open(metas[it.prompt_index], "w", encoding="utf-8") as f:
                            f.write(geneval_lines[it.prompt_index] + "\n")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130 = 128 + SIGINT, as a shell reports it
        print(f"\ninterrupted: wrote {len(written)} of {len(mine)} image(s) to {args.outdir}", file=sys.stderr)
        sys.exit(130)
    # 6. After every rank is done (and has left the process group), rank 0 draws the grid from the files on disk.
    if torchrun:
        train_common.teardown()
    grid_path = os.path.join(args.outdir, "grid.png") if rank == 0 and args.grid_rows > 0 else None
    if grid_path:  # outside the numbered folders: GenEval skips it
        build_run_grid(path_of, prompts, items, aesthetics, args.grid_rows).save(grid_path)
    if rank == 0:
        n, out = len(items), args.outdir
        where = f"{out}/<prompt>/samples/" if geneval else f"{out}/<category>/" if mjhq else f"{out}/"
        where = ", ".join(written) if world == 1 and n <= 4 else where  # a few images: name each file
        print(f"wrote {n} image{'s' * (n != 1)} to {where}" + (f"; grid: {grid_path}" if grid_path else ""))
    return {"images": written, "grid": grid_path, "items": mine}


def export_main(argv):
    """`python sample.py export SRC --out DIR`: a run folder, checkpoint file or release written
    in the official release layout (config.json + model.safetensors, EMA weights when present),
    as the shipped models were made. A generator gives DIR/generator and DIR/tokenizer; one
    model (--which, or a tokenizer run) fills DIR itself."""
    p = argparse.ArgumentParser(prog="sample.py export", description=export_main.__doc__)
    p.add_argument("src", metavar="SRC", help="run folder, checkpoint file, release dir or Hub id")
    p.add_argument("--out", required=True, help="the directory to write (new or empty, unless --overwrite)")
    p.add_argument("--which", choices=("generator", "tokenizer", "both"),
                   help="what to export (default: both for a generator, the tokenizer for a tokenizer)")
    p.add_argument("--tokenizer", help="the generator's tokenizer (default: the one it records)")
    p.add_argument("--revision", help="Hub revision for a Hub id SRC / --tokenizer")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR, replacing what export writes")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16, as the shipped models are")
    a = p.parse_args(argv)
    return checkpoint.export_release(a.src, a.out, a.which, a.tokenizer, a.overwrite, a.revision, half=a.fp16)


def tokviz_main(argv):
    """`python sample.py tokviz --image IMG [--caption TEXT] [--tokenizer REF]`: Fig. 4 as
    swap.png (a row per swapped token, a column per replacement: VQ codes, or the token
    values of --swap_image / the image at --sources) and Fig. 8 as attention.png."""
    p = argparse.ArgumentParser(prog="sample.py tokviz", description=tokviz_main.__doc__)
    p.add_argument("--tokenizer", help="release dir, Hub id, run or ckpt file (default: the shipped shapes model)")
    p.add_argument("--image", required=True)
    p.add_argument("--caption", default="", help="the image's caption (the decoder is text-aware)")
    p.add_argument("--positions", type=int, nargs="+", help="token positions to swap (rows; default: 8 spread over K)")
    p.add_argument("--codes", type=int, nargs="+", help="VQ: replacement code ids (columns; default: random)")
    p.add_argument("--swap_image", help="take the replacements from this image's tokens (KL; VQ if no --codes)")
    p.add_argument("--sources", type=int, nargs="+", help="token positions to take them from (default: spread)")
    p.add_argument("--num_codes", type=int, default=6, help="columns when --codes / --sources are not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", default="out/tokviz")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    ref = args.tokenizer or checkpoint.default_release("tokenizer", "no --tokenizer given")
    tok, text_enc = checkpoint.load_tokenizer(ref, device)
    K, S, vq = tok.config.num_latent_tokens, tok.config.image_size, tok.config.quantize_mode == "vq"
    image = load_image(args.image, S)[None].to(device)  # (1,3,S,S): shorter side resized, centre crop
    with torch.no_grad():
        final = text_enc([args.caption]).final  # (1,L,W)
        tokens = tok.encode(image)  # VQ (1,K) | KL (1,K,C)
        recon = tok.decode(tokens, final).clamp(0, 1)[0]  # (3,S,S)
        positions = args.positions or _spread(K, 8)
        if vq and (args.codes or not args.swap_image):  # --codes, else random codes
            perm = torch.randperm(tok.config.codebook_size, generator=torch.Generator().manual_seed(args.seed))
            replacements = args.codes or perm[: args.num_codes].tolist()
            names = [f"code {c}" for c in replacements]
        else:  # token values of the second image (or this one) at the source positions
            sources = args.sources or _spread(K, args.num_codes)
            other = tok.encode(load_image(args.swap_image, S)[None].to(device)) if args.swap_image else tokens
            replacements = other[0, sources]  # VQ (J,) ids | KL (J,C)
            names = [("img2 " if args.swap_image else "") + f"tok {j}" + (f"={int(c)}" if vq else "")
                     for j, c in zip(sources, replacements)]
        swaps = swap_tokens(tok, tokens, final, positions, replacements)  # (P,J,3,S,S)
        attn = encoder_attention(tok, image)[0]  # (K,G,G)
        overlays = attention_overlays(image[0], attn)  # (K,3,S,S)
    # Figure 4: each row is [input, reconstruction, the swaps of one token position].
    os.makedirs(args.outdir, exist_ok=True)
    swap_path, attn_path = os.path.join(args.outdir, "swap.png"), os.path.join(args.outdir, "attention.png")
    inp, rec = (Image.fromarray(a) for a in to_pixels(torch.stack([image[0], recon])))
    rows = [[inp, rec] + [Image.fromarray(a) for a in row] for row in to_pixels(swaps)]
    row_labels = [f"token {i}" + (f" (code {int(tokens[0, i])})" if vq else "") + " replaced by ->" for i in positions]
    labelled_grid(rows, row_labels, [["input", "reconstruction"] + names for _ in positions]).save(swap_path)
    # Figure 8: the input, then one overlay per latent token, 8 tiles a row.
    tiles = [inp] + [Image.fromarray(a) for a in to_pixels(overlays)]
    labels = ["input"] + [f"latent {k}" for k in range(K)]
    starts = range(0, len(tiles), 8)
    labelled_grid([tiles[i : i + 8] for i in starts], None, [labels[i : i + 8] for i in starts]).save(attn_path)
    print(f"wrote {swap_path} (latent-code swapping) and {attn_path} (encoder attention maps)")
    return {"swap": swap_path, "attention": attn_path, "swaps": swaps, "attention_maps": attn, "overlays": overlays}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")

"""
Sample images from text with MaskGen + TA-TiTok.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact Text-Aware
One-Dimensional Tokens" (Kim et al., arXiv 2501.07730).
  §3 ("Masked Generative Models", sampling) and §4.2: MaskGen fills in K masked tokens
      over a few steps, conditioned on CLIP text features and an aesthetic score; the
      TA-TiTok decoder turns the tokens, plus the caption's CLIP features, into pixels.
  §5.1 and App. E: the evaluation protocol (no rejection sampling, classifier-free
      guidance, 16 steps for VQ / 32 for KL; GenEval prompts, COCO / MJHQ captions).
      `--geneval` writes exactly the folder layout GenEval's evaluation script reads.
  App. C, Fig. 7: the same prompt and seed at several aesthetic scores (`--aesthetic 5 6 7`).
The tokenizer figures (Fig. 4 / Fig. 8) are tokviz.py; finding and checking the
checkpoints (release dirs, runs, files, bundles) is load.py.

The pipeline, per batch of prompts:

    captions --TextEncoder--> .penultimate (B,L,W), .pooled (B,E)  -> MaskGen conditions
                              .final       (B,L,W)                 -> TA-TiTok decoder
    "" (computed once)    --> the classifier-free guidance null condition
    MaskGen.generate      --> tokens: VQ ids (B,K) | KL vectors (B,K,C)
    TATiTok.decode        --> images (B,3,H,W) in [0,1] -> PNG files

Usage:
    python sample.py --prompt "a red circle to the left of a blue square"   # shipped model
    python sample.py --prompts prompts.txt --num_images 4 --aesthetic 5 6 7
    python sample.py --generator runs/maskgen --prompt "..."      # our run (tokenizer from its config)
    python sample.py --tokenizer tokenizer_tatitok_bl128_vq --generator generator_maskgen_vq_l \
        --geneval evaluation_metadata.jsonl --num_images 4 --outdir geneval_out
    torchrun --nproc_per_node=8 sample.py ...                      # shards the prompts over GPUs
    python sample.py bundle --generator runs/maskgen --out my.pt    # both runs in one file, like shapes.pt

Public API (importable, used by the tests):
    generate_images(models, prompts, aesthetics, seeds, null, opts, device) -> (B, 3, H, W)
    labelled_grid(rows, row_labels, tile_labels) -> PIL.Image
    main(argv)
"""

import argparse
import datetime
import json
import math
import os
import sys
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import load
import runtime
from data import to_uint8
from schedules import check_guidance_schedule

# -----------------------------------------------------------------------------
# Prompts.


def read_prompt_file(path):
    """.txt: one prompt per non-empty line; .jsonl: one JSON object with a "prompt" per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                prompts.append(_jsonl_prompt(line, path, n))
            else:
                prompts.append(line.rstrip("\r\n"))
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


def read_geneval(path):
    """GenEval's evaluation_metadata.jsonl -> (prompts, the raw JSON lines, kept verbatim)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GenEval metadata file {path!r} does not exist (it is prompts/evaluation_metadata.jsonl in GenEval)")
    prompts, lines = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                prompts.append(_jsonl_prompt(line, path, n))
                lines.append(line.strip())
    if not prompts:
        raise ValueError(f"GenEval metadata file {path!r} holds no prompts; it should be GenEval's evaluation_metadata.jsonl")
    return prompts, lines


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
    return [
        Item(p, i, a, seed + p * num_images + i)
        for p in range(num_prompts)
        for a in range(num_aesthetics)
        for i in range(num_images)
    ]


def shard(items, rank, world):
    """Rank r takes items r, r + W, r + 2W, ...: every item exactly once over all ranks,
    and balanced to within one item."""
    return items[rank::world]


def image_path(outdir, item, aesthetics, geneval):
    if geneval:  # GenEval's layout: <outdir>/<prompt:05d>/samples/<image:04d>.png
        return os.path.join(outdir, f"{item.prompt_index:05d}", "samples", f"{item.image_index:04d}.png")
    name = f"{item.prompt_index:05d}_s{item.seed:04d}"
    if len(aesthetics) > 1:
        name += f"_aes{aesthetics[item.aes_index]:g}"
    return os.path.join(outdir, name + ".png")


# -----------------------------------------------------------------------------
# Sampling.


def generate_images(models, prompts, aesthetics, seeds, null, opts, device, seeding="item"):
    """One batch: captions (list of B), aesthetic scores (list of B floats or None),
    seeds (list of B) -> images (B,3,H,W) in [0,1].

    seeding="item": each image gets its own torch.Generator(seed), so an image does not
    depend on what else is in its batch. MaskGen.generate takes one generator for the
    whole batch, so this runs generate() once per image (text encoding and decoding
    stay batched). seeding="batch": one generate() call per batch, seeded by the first
    item's seed: faster, but an image then depends on the batch size and world size.
    """
    gen, tok = models.generator, models.tokenizer
    text = models.gen_text(prompts)  # one forward: .penultimate (B,L,W), .pooled (B,E), .final (B,L,W)
    final = text.final if models.tok_text is models.gen_text else models.tok_text(prompts).final
    kw = dict(null_text=null.penultimate, null_pooled=null.pooled, **opts)
    if seeding == "item":
        tokens = []
        for b, seed in enumerate(seeds):
            g = torch.Generator(device=device).manual_seed(seed)
            tokens.append(gen.generate(text.penultimate[b : b + 1], text.pooled[b : b + 1], aesthetic=aesthetics[b], generator=g, **kw))
        tokens = torch.cat(tokens)  # VQ (B,K) ids | KL (B,K,C)
    else:
        g = torch.Generator(device=device).manual_seed(seeds[0])
        aes = None if aesthetics[0] is None else torch.tensor(aesthetics, dtype=torch.float32, device=device)
        tokens = gen.generate(text.penultimate, text.pooled, aesthetic=aes, generator=g, **kw)
    return tok.decode(tokens, final)  # (B,3,H,W)


def check_options(args, gcfg):
    """Sampler options that only make sense for one variant, checked before any work."""
    if args.guidance_schedule is not None:
        check_guidance_schedule(gcfg.mode, args.guidance_schedule, "--guidance_schedule")
    if gcfg.mode == "kl" and args.randomize_temperature is not None:
        print("note: --randomize_temperature only applies to MaskGen-VQ; ignored for this KL model")
    if args.aesthetic and any(a is not None for a in args.aesthetic) and not gcfg.aes_embed_dim:
        print("note: this generator has no aesthetic-score condition; --aesthetic is ignored")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")


# -----------------------------------------------------------------------------
# Labelled grids (PIL's default font; small images are enlarged so labels stay readable).


def _fit(draw, text, font, width):
    """Cut text to fit a width in pixels, marking the cut with '...'."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def labelled_grid(rows, row_labels=None, tile_labels=None, min_tile=128, pad=4):
    """rows: list of lists of equally sized PIL images (ragged rows are padded with white).
    row_labels: one string per row, drawn in a strip above the row.
    tile_labels: per-tile strings (same nesting as rows), drawn under each tile."""
    font = ImageFont.load_default()
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


def build_run_grid(outdir, prompts, items, aesthetics, geneval, max_rows, max_cols=16):
    """One row per (prompt, aesthetic score), one column per image, read back from disk
    (so under torchrun rank 0 sees every rank's images)."""
    rows, labels, tile_labels = {}, {}, {}
    for it in items:
        key = (it.prompt_index, it.aes_index)
        if key not in rows and len(rows) == max_rows:
            continue
        if len(rows.setdefault(key, [])) >= max_cols:
            continue
        with Image.open(image_path(outdir, it, aesthetics, geneval)) as im:
            rows[key].append(im.convert("RGB"))
        tile_labels.setdefault(key, []).append(f"seed {it.seed}")
        label = f"{it.prompt_index}: {prompts[it.prompt_index]}"
        if len(aesthetics) > 1:
            label = f"[aesthetic {aesthetics[it.aes_index]:g}] " + label
        labels[key] = label
    keys = list(rows)
    return labelled_grid([rows[k] for k in keys], [labels[k] for k in keys], [tile_labels[k] for k in keys])


# -----------------------------------------------------------------------------
# The sampling command.


def build_parser():
    p = argparse.ArgumentParser(
        description="Generate images from text with MaskGen + TA-TiTok (see the module docstring). "
        "The tokenizer visualisations are `python tokviz.py -h`.",
    )
    src = p.add_argument_group("prompts (at least one source)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    src.add_argument("--prompts", help="a .txt file (one prompt per line) or .jsonl file (a \"prompt\" field per line)")
    src.add_argument("--geneval", help="GenEval's evaluation_metadata.jsonl: writes GenEval's folder layout")
    ck = p.add_argument_group("checkpoints (default: the shipped checkpoints/shapes.pt)")
    ck.add_argument("--generator", help="MaskGen: official release dir, our run folder / ckpt file, or a bundled file")
    ck.add_argument("--tokenizer", help="TA-TiTok: official release dir, our run / ckpt file, or a bundle; default: the one the generator records")
    s = p.add_argument_group("sampling (defaults: the generator's config)")
    s.add_argument("--steps", type=int, help="decoding steps (paper: 16 VQ, 32 KL)")
    s.add_argument("--guidance_scale", type=float, help="classifier-free guidance scale; 1 = no guidance")
    s.add_argument("--guidance_schedule", help="VQ: cosine | linear | none;  KL: linear | constant")
    s.add_argument("--randomize_temperature", type=float, help="VQ: Gumbel temperature, annealed to 0")
    s.add_argument("--temperature", type=float, help="VQ: softmax temperature (default annealed); KL: DiffLoss noise")
    s.add_argument("--aesthetic", type=float, nargs="+", help="aesthetic score(s); several give one grid row each (Fig. 7)")
    s.add_argument("--seed", type=int, default=0, help="image (p, i) uses seed + p * num_images + i")
    s.add_argument("--seeding", choices=("item", "batch"), default="item",
                   help="item: per-image generators, results independent of batch/world size; batch: faster")  # fmt: skip
    s.add_argument("--num_images", type=int, help="images per prompt (default 1; 4 with --geneval, as GenEval)")
    s.add_argument("--batch_size", type=int, default=16)
    o = p.add_argument_group("output and hardware")
    o.add_argument("--outdir", default="out/samples")
    o.add_argument("--grid_rows", type=int, default=16, help="rows in the run's grid.png (0: no grid)")
    o.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    o.add_argument("--dtype", choices=sorted(runtime.DTYPES), default="fp32", help="autocast precision of the models")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bundle"]:
        return bundle_main(argv[1:])
    args = build_parser().parse_args(argv)

    # 1. Prompts, read and checked before anything is loaded.
    geneval_lines = None
    if args.geneval:
        if args.prompt or args.prompts:
            raise ValueError("--geneval takes its prompts from the metadata file; drop --prompt / --prompts")
        prompts, geneval_lines = read_geneval(args.geneval)
    else:
        prompts = list(args.prompt) + (read_prompt_file(args.prompts) if args.prompts else [])
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable), --prompts FILE or --geneval FILE")
    geneval = geneval_lines is not None
    num_images = args.num_images if args.num_images is not None else (4 if geneval else 1)
    aesthetics = list(args.aesthetic) if args.aesthetic else [None]
    if geneval and len(aesthetics) > 1:
        raise ValueError("--geneval writes one image set per prompt; give a single --aesthetic score")
    if num_images < 1 or args.batch_size < 1:
        raise ValueError(f"--num_images and --batch_size must be at least 1, got {num_images} and {args.batch_size}")

    # 2. Processes and device.
    # Under torchrun a process group serves only the final barrier: gloo runs anywhere
    # (CPU or GPU) and no tensors move; ranks may wait long there for the slowest.
    rank, world, device = runtime.setup_distributed(args.device, backend="gloo", timeout=datetime.timedelta(hours=4))

    # 3. Checkpoints, cross-checked (tokens, codebook, text widths) before any sampling.
    models = load.load_models(args.generator, args.tokenizer, device)
    gcfg = models.generator.config
    check_options(args, gcfg)
    aesthetics = [gcfg.aesthetic if a is None else a for a in aesthetics]  # labels show the real score
    if rank == 0:
        print(f"generator: {models.gen_source} [MaskGen-{gcfg.mode.upper()}, K={gcfg.num_tokens}]")
        print(f"tokenizer: {models.tok_source}")
    opts = dict(num_steps=args.steps, guidance_scale=args.guidance_scale, guidance_schedule=args.guidance_schedule,
                randomize_temperature=args.randomize_temperature, temperature=args.temperature)  # fmt: skip

    # 4. The work list: this rank's share, in batches.
    items = make_items(len(prompts), num_images, len(aesthetics), args.seed)
    mine = shard(items, rank, world)
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    os.makedirs(args.outdir, exist_ok=True)
    if rank == 0 and not geneval:  # an index from file name to prompt (GenEval has metadata.jsonl)
        with open(os.path.join(args.outdir, "prompts.jsonl"), "w", encoding="utf-8") as f:
            for p, text in enumerate(prompts):
                f.write(json.dumps({"index": p, "prompt": text}) + "\n")

    written = []
    autocast = runtime.autocast(device, args.dtype)
    with torch.inference_mode(), autocast:
        null = models.gen_text([""])  # the classifier-free guidance null condition, computed once
        for batch in tqdm(batches, desc=f"sampling (rank {rank})" if world > 1 else "sampling", disable=rank != 0):
            images = generate_images(
                models, [prompts[it.prompt_index] for it in batch], [aesthetics[it.aes_index] for it in batch],
                [it.seed for it in batch], null, opts, device, args.seeding,
            )  # fmt: skip
            for it, arr in zip(batch, to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()):  # (B,H,W,3)
                path = image_path(args.outdir, it, aesthetics, geneval)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(arr).save(path)
                if geneval and it.image_index == 0:  # the rank that owns image 0 writes the metadata
                    with open(os.path.join(args.outdir, f"{it.prompt_index:05d}", "metadata.jsonl"), "w", encoding="utf-8") as f:
                        f.write(geneval_lines[it.prompt_index] + "\n")  # the line verbatim, as GenEval expects
                written.append(path)

    # 5. After every rank is done, rank 0 draws the grid from the files on disk.
    runtime.barrier()
    grid_path = None
    if rank == 0:
        if args.grid_rows > 0:
            grid_path = os.path.join(args.outdir, "grid.png")  # outside the numbered folders: GenEval skips it
            build_run_grid(args.outdir, prompts, items, aesthetics, geneval, args.grid_rows).save(grid_path)
        where = f"{args.outdir}/<prompt>/samples/" if geneval else f"{args.outdir}/"
        n = len(items)
        where = ", ".join(written) if world == 1 and n <= 4 else where  # a few images: name each file
        print(f"wrote {n} image{'s' * (n != 1)} to {where}" + (f"; grid: {grid_path}" if grid_path else ""))
    runtime.teardown()
    return {"images": written, "grid": grid_path, "items": mine}


def bundle_main(argv):
    """`python sample.py bundle --generator RUN --out FILE`: one self-contained file with
    the generator's and its tokenizer's EMA weights, configs and small text tower (how
    checkpoints/shapes.pt is made). Weights are stored in fp16 unless --fp32; they are
    loaded back into fp32 models."""
    p = argparse.ArgumentParser(prog="sample.py bundle", description=bundle_main.__doc__)
    p.add_argument("--generator", required=True, help="a train_maskgen.py run folder or checkpoint")
    p.add_argument("--tokenizer", help="its TA-TiTok run (default: the one the generator records)")
    p.add_argument("--out", required=True)
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights (twice the size)")
    args = p.parse_args(argv)
    return load.write_bundle(args.generator, args.tokenizer, args.out, args.fp32)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")

"""
Evaluation: the command line that runs the paper's metrics (metrics.py) on folders,
datasets and checkpoints.

Paper §5.1 ("Evaluation metrics") and appendix E: the tokenizer is scored by
reconstruction FID (rFID) and Inception Score (IS) on ImageNet-val, zero-shot with
the caption "A photo of a {class}."; the generator by FID on MJHQ-30K / COCO-30K and
by GenEval, a compositional (object / count / colour / position) benchmark. Here:

  * `recon`: a tokenizer (any reference load.py takes) on an image folder or tar shards:
    rFID, IS, PSNR, codebook usage.
  * `gen`: a folder of generated images (sample.py's, GenEval's or MJHQ-30K's layout,
    sidecar captions, or a prompt file) against a reference: gFID, IS, CLIP score; in
    MJHQ's layout (<dir>/<category>/<id>.png, and the reference's <ref>/<category>/*.jpg)
    also the FID of each category.
  * `shapes`: the shapes-world compositional score, a GenEval stand-in for the project's
    own 64x64 world, scored by the rule-based detector that lives beside the world's
    spec in shapes.py (shapes.shapes_score).
  * `context`: does a MaskGen read the tokens already drawn? On shapes-world scenes,
    VQ: the masked tokens' cross-entropy with 0 / 50 / 90% of the tokens visible; KL: how
    much of a masked token's posterior mean a ridge regression recovers (R^2) from the
    model's per-token conditions, at the same fractions; and both: the detector's score
    when the hidden 50 / 25 / 10% of a scene's tokens are filled in one step.

CLI (each writes <out>.json and a readable table <out>.txt; default out/eval/<cmd>):
    python evaluate.py recon  --tokenizer DIR_OR_RUN --data IMAGENET_VAL_DIR --class-names classes.txt
    python evaluate.py gen    --images GEN_DIR --ref REF_DIR|ref_stats.npz [--clip --prompts prompts.txt]
    python evaluate.py gen    --images out/mjhq --ref mjhq30k_imgs/     # overall + per-category FID
    python evaluate.py shapes [--generator CKPT] [--n-per-category 300]   # default: shipped checkpoint
    python evaluate.py shapes --images SAMPLE_DIR | --ground-truth | --reconstruct
    python evaluate.py context [--generator CKPT] [--n-per-category 300]
    torchrun --nproc_per_node=8 evaluate.py ...     # images / prompts sharded over ranks, features gathered
"""

import argparse
import json
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import load
import train_common
import sample
import shapes
from data import load_image, to_uint8
from metrics import CLIPScorer, evaluate_generation, evaluate_reconstruction, gather_rows, inception_extractor
from shards import SKIP_REASONS

# -----------------------------------------------------------------------------
# Image folders, prompts and reports (the CLI's plumbing).


def list_images(folder):
    """Every image file under folder (recursively, data.IMAGE_EXTS), sorted: a stable
    order for sharding. sample.py's overview grid.png is no sample and is left out."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    files = [f for f in data.find_images(folder) if os.path.basename(f) != "grid.png"]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(data.IMAGE_EXTS)}) found under {folder!r}")
    return files


def read_class_names(path):
    """Class-names file -> {folder name or index string: class name}.
    Lines "n01440764 tench, Tinca tinca" (LOC_synset_mapping.txt) map folder names;
    other lines are names in class-index order, for the sorted class folders "0", "1", ...
    The whole name, synonyms included, goes into the caption, as the official code does
    ("A photo of a tench, Tinca tinca.")."""
    names = {}
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    for i, ln in enumerate(lines):
        key, _, name = ln.replace("\t", " ").partition(" ")
        if name and key.startswith("n") and key[1:].isdigit():
            names[key] = name.strip()
        else:
            names[str(i)] = ln
    return names


def read_prompts(path):
    """A prompt file for `--prompts` -> a list (one prompt per image, in sorted file order)
    or a dict matched to each image's file name:
      .txt                  one prompt per non-empty line (a list);
      .jsonl with "id"      {id: prompt}, for the image <id>.png (sample.py --mjhq's prompts.jsonl);
      .jsonl with "index"   {index: prompt}, for sample.py's <index>_s<seed>.png (its prompts.jsonl);
      other .jsonl          one {"prompt": ...} per image, in order (a list);
      .json                 MJHQ-30K's meta_data.json {id: {"category", "prompt"}} (by id)."""
    if path.lower().endswith(".json"):
        return {image_id: prompt for image_id, _, prompt in sample.read_mjhq(path)}
    lines = [ln for ln in sample.read_text(path, "prompt file") if ln.strip()]
    if not path.lower().endswith(".jsonl"):
        return lines
    rows = []
    for n, line in enumerate(lines, 1):
        sample._jsonl_prompt(line, path, n)  # a clear error for a bad line
        rows.append(json.loads(line))
    for key in ("id", "index"):
        if all(key in r for r in rows):
            return {r[key]: r["prompt"] for r in rows}
    return [r["prompt"] for r in rows]


_PROMPT_FILES = {}


def _prompt_file(path):
    """read_prompts(path), read once (sample.py's prompts.jsonl serves every image beside it)."""
    if path not in _PROMPT_FILES:
        _PROMPT_FILES[path] = read_prompts(path)
    return _PROMPT_FILES[path]


SAMPLE_NAME = re.compile(r"(\d+)_s-?\d+(?:_aes[^/]*)?")  # sample.py's flat layout: <prompt>_s<seed>[_aes<a>]


def lookup_prompt(prompts, path, index, source):
    """The prompt of image `path` (number `index` in sorted order) from read_prompts' result."""
    if isinstance(prompts, list):
        return prompts[index]
    stem = os.path.splitext(os.path.basename(path))[0]
    m = SAMPLE_NAME.fullmatch(stem)
    for key in (stem, int(m.group(1)) if m else None):
        if key in prompts:
            return prompts[key]
    raise ValueError(f"{source} has no prompt for {path} (matched by file name: {stem!r})")


def prompt_for(path, prompts=None, index=None, class_names=None, class_dirs=None):
    """The caption of an image: a sidecar <stem>.txt; else GenEval's layout
    (<dir>/<k>/samples/x.png with <dir>/<k>/metadata.jsonl); else sample.py's layout
    (<dir>/<prompt>_s<seed>.png with <dir>/prompts.jsonl), or its MJHQ layout
    (<dir>/<category>/<id>.png with <dir>/prompts.jsonl); else --prompts (read_prompts);
    else "A photo of a {class}." from its class folder; else ""."""
    side = os.path.splitext(path)[0] + ".txt"
    if os.path.exists(side):
        with open(side) as f:
            return f.read().strip()
    meta = os.path.join(os.path.dirname(os.path.dirname(path)), "metadata.jsonl")
    if os.path.basename(os.path.dirname(path)) == "samples" and os.path.exists(meta):
        with open(meta) as f:
            return json.loads(f.readline())["prompt"]
    stem = os.path.splitext(os.path.basename(path))[0]
    flat = os.path.join(os.path.dirname(path), "prompts.jsonl")  # beside <prompt>_s<seed>.png
    mjhq = os.path.join(os.path.dirname(os.path.dirname(path)), "prompts.jsonl")  # above <category>/<id>.png
    if SAMPLE_NAME.fullmatch(stem) and os.path.exists(flat):
        return lookup_prompt(_prompt_file(flat), path, index, flat)
    if os.path.exists(mjhq) and isinstance(_prompt_file(mjhq), dict) and stem in _prompt_file(mjhq):
        return _prompt_file(mjhq)[stem]
    if prompts is not None:
        return lookup_prompt(prompts, path, index, "--prompts")
    if class_names is not None:
        folder = os.path.basename(os.path.dirname(path))
        name = class_names.get(folder) or class_names.get(str(class_dirs.index(folder)) if folder in class_dirs else "")
        if name:
            return f"A photo of a {name}."  # the paper's zero-shot ImageNet caption
    return ""


def folder_batches(files, batch_size, size=None, prompts=None, class_names=None, groups=None, skipped=None):
    """Yield (images (B,3,S,S), captions, group ids (B,) or None) over this rank's share of
    `files` (rank::world). groups: one category id per file (or None). A file that does
    not decode as an image is skipped and counted in `skipped` ({reason: count}, the
    reasons of data.py's loaders), as data.py does, instead of ending the run."""
    rank, world = train_common.rank_world()
    class_dirs = sorted({os.path.basename(os.path.dirname(f)) for f in files})
    mine = list(range(len(files)))[rank::world]
    skipped = {} if skipped is None else skipped
    for i in range(0, len(mine), batch_size):
        idx, imgs = [], []
        for j in mine[i : i + batch_size]:
            try:
                imgs.append(load_image(files[j], size))
                idx.append(j)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decode errors
                reason = "unreadable_file" if isinstance(e, (FileNotFoundError, PermissionError)) else "corrupt_image"
                skipped[reason] = skipped.get(reason, 0) + 1
                if skipped[reason] <= 5:  # the first few, like data.py's SkipCounter
                    print(f"skipped ({reason}) {files[j]}: {type(e).__name__}: {e}")
        if not idx:
            continue
        if len({tuple(t.shape) for t in imgs}) > 1:
            raise ValueError("images differ in size; pass --size to resize and centre-crop them")
        caps = [prompt_for(files[j], prompts, j, class_names, class_dirs) for j in idx]
        yield torch.stack(imgs), caps, None if groups is None else torch.tensor([groups[j] for j in idx])


def sum_skipped(skipped):
    """This rank's {reason: count} summed over all ranks (every rank calls it); nonzero only."""
    counts = gather_rows(torch.tensor([[skipped.get(r, 0) for r in SKIP_REASONS]], dtype=torch.long)).sum(0)
    return {r: int(n) for r, n in zip(SKIP_REASONS, counts) if n}


def write_report(results, out_prefix, title):
    """Write <out>.json (machine-readable) and <out>.txt (a table), and print the table."""
    rows = [(k, v) for k, v in results.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows) if rows else 10
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = "\n".join([title, "-" * (width + 14)] + [f"{k:<{width}}  {fmt(v):>12}" for k, v in rows])
    for k, v in results.items():
        if isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()):
            table += f"\n{k}: " + ", ".join(f"{a}={fmt(b)}" for a, b in v.items())
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".json", "w") as f:
        json.dump(results, f, indent=2)
    with open(out_prefix + ".txt", "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {out_prefix}.json and {out_prefix}.txt")


# -----------------------------------------------------------------------------
# Inputs: real images to reconstruct, generated images to score (models: load.py).


def recon_batches(spec, batch_size, size, class_names=None, skipped=None):
    """(images, captions) batches for `recon`: an image folder (with sidecar .txt captions
    or ImageNet-style class folders + a class-names file) is read here; tar shards and
    everything else go through data.py's loader (one pass, centre crop, rank-sharded).
    Samples that cannot be read are skipped and counted in `skipped` ({reason: count})."""
    skipped = {} if skipped is None else skipped
    if os.path.isdir(spec) and not any(n.endswith((".tar", ".tar.gz", ".tgz")) for n in os.listdir(spec)):
        for images, captions, _ in folder_batches(list_images(spec), batch_size, size, class_names=class_names,
                                                  skipped=skipped):  # fmt: skip
            yield images, captions
        return
    rank, world = train_common.rank_world()
    loader = data.image_text_loader(spec, size, batch_size, rank=rank, world_size=world, train=False)
    try:
        for batch in loader:
            yield batch["image"], list(batch["caption"])
    finally:  # also when --limit stops early
        for reason, n in loader.dataset.skipped.counts().items():
            skipped[reason] = skipped.get(reason, 0) + n


def generate_shapes_images(prompts, generator=None, tokenizer=None, device="cpu", seed=0, batch_size=50,
                           num_steps=None, guidance_scale=None, guidance_schedule=None, temperature=None):  # fmt: skip
    """Images for `prompts` from a MaskGen + TA-TiTok pair, loaded by load.py and sampled by
    sample.py (generator=None: the shipped checkpoints/shapes.pt). Under torchrun every rank draws
    prompts rank::world and rank 0 gets all images back, in prompt order.
    Returns a list of uint8 (H, W, 3) arrays (complete on rank 0)."""
    models = load.load_models(generator, tokenizer, device)
    aesthetic = models.generator.config.aesthetic
    opts = dict(num_steps=num_steps, guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                randomize_temperature=None, temperature=temperature)  # fmt: skip
    rank, world = train_common.rank_world()
    mine = list(range(len(prompts)))[rank::world]
    out = []
    with torch.inference_mode():
        null = models.gen_text([""])  # the classifier-free guidance null condition
        for i in range(0, len(mine), batch_size):
            idx = mine[i : i + batch_size]
            imgs = sample.generate_images(models, [prompts[j] for j in idx], [aesthetic] * len(idx),
                                          [seed + j for j in idx], null, opts, device, seeding="batch")  # fmt: skip
            out.append(to_uint8(imgs).permute(0, 2, 3, 1).cpu())  # (b, H, W, 3)
    S = models.tokenizer.config.image_size
    images = gather_rows(torch.cat(out) if out else torch.zeros((0, S, S, 3), dtype=torch.uint8))
    order = gather_rows(torch.tensor(mine, dtype=torch.long)[:, None])[:, 0]
    ordered = [None] * len(prompts)
    for j, img in zip(order.tolist(), images.numpy()):
        ordered[j] = img
    return ordered


# -----------------------------------------------------------------------------
# Command line.


def cmd_recon(args, device):
    class_names = read_class_names(args.class_names) if args.class_names else None
    tok, text = load.load_tokenizer(args.tokenizer, device, revision=args.revision)  # frozen; text: the encoder its decoder was trained with
    size = args.size or tok.config.image_size
    extractor = None if args.no_fid else inception_extractor(device, args.inception_weights)
    skipped = {}
    source = batches = recon_batches(args.data, args.batch_size, size, class_names, skipped)
    if args.limit:  # the first N batches' worth, per rank
        batches = (b for b, _ in zip(source, range(-(-args.limit // args.batch_size))))
    res = evaluate_reconstruction(tok, text, batches, extractor, args.is_splits)
    source.close()  # the loader's skip counts are read when it closes
    return with_skips(res, skipped), f"reconstruction: {args.tokenizer} on {args.data}"


def with_skips(res, skipped, key="skipped"):
    """res plus {key: the skip counts summed over ranks}, when anything was skipped."""
    total = sum_skipped(skipped)
    if total:
        print(f"{key}: " + ", ".join(f"{r}={n}" for r, n in total.items()))
    return {**res, key: total} if total else res


def categories_of(files, root):
    """The first folder under root of each file (MJHQ's <root>/<category>/<id>.jpg), or
    None for a file directly in root."""
    parts = [os.path.relpath(f, root).split(os.sep) for f in files]
    return [p[0] if len(p) > 1 else None for p in parts]


def shared_categories(gen_cats, ref_cats, ref):
    """The categories `gen` scores one by one: when every generated image lies in a
    <category>/ folder and the reference has folders of those names (MJHQ-30K's layout,
    which sample.py --mjhq writes), their sorted names; else None (overall FID only)."""
    gen, refs = set(gen_cats), set(ref_cats) - {None}
    if None in gen or not gen & refs:
        return None
    if gen - refs:
        raise ValueError(
            f"per-category FID: the reference {ref} has no category {sorted(gen - refs)} of the generated images; "
            f"both sides need MJHQ-30K's layout, <dir>/<category>/<image> (sample.py --mjhq writes it)"
        )
    return sorted(gen)


def save_ref_stats(path, stats):
    """The reference statistics ({"": (mu, sigma), category: (mu, sigma)}) as a .npz:
    mu, sigma, and per category (when there are any) categories, mu_per_category,
    sigma_per_category."""
    cats = [c for c in stats if c]
    per = dict(categories=np.array(cats), mu_per_category=np.stack([stats[c][0] for c in cats]),
               sigma_per_category=np.stack([stats[c][1] for c in cats])) if cats else {}  # fmt: skip
    np.savez(path, mu=stats[""][0], sigma=stats[""][1], **per)


def load_ref_stats(path):
    """A .npz written by --save-ref-stats -> {"": (mu, sigma), category: (mu, sigma)}."""
    z = np.load(path)
    if not {"mu", "sigma"} <= set(z.files):
        raise ValueError(f"{path} holds {z.files}, not mu and sigma; write it with `evaluate.py gen --save-ref-stats`")
    stats = {"": (z["mu"], z["sigma"])}
    for k, name in enumerate(z["categories"] if "categories" in z.files else []):
        stats[str(name)] = (z["mu_per_category"][k], z["sigma_per_category"][k])
    return stats


def cmd_gen(args, device):
    if args.no_fid and not args.clip:
        raise ValueError("gen --no-fid without --clip would compute nothing; drop --no-fid (FID and IS) or add --clip")
    files = list_images(args.images)[: args.limit]
    prompts = read_prompts(args.prompts) if args.prompts else None
    if isinstance(prompts, list) and len(prompts) < len(files):
        raise ValueError(
            f"--prompts has {len(prompts)} lines for {len(files)} images (one line per image, sorted file order)"
        )
    extractor = None if args.no_fid else inception_extractor(device, args.inception_weights)
    ref_batches, ref_stats, categories, gen_skipped, ref_skipped = None, None, None, {}, {}
    gen_cats = categories_of(files, args.images)
    if extractor is not None:
        if args.ref is None:
            raise ValueError("gFID needs --ref (a folder of reference images or a .npz with mu, sigma), or --no-fid")
        if args.ref.endswith(".npz"):
            ref_stats = load_ref_stats(args.ref)
            categories = shared_categories(gen_cats, list(ref_stats), args.ref)
        else:
            ref_files = list_images(args.ref)[: args.ref_limit]
            ref_cats = categories_of(ref_files, args.ref)
            categories = shared_categories(gen_cats, ref_cats, args.ref)
            ref_groups = [categories.index(c) if c in categories else -1 for c in ref_cats] if categories else None
            ref_batches = folder_batches(ref_files, args.batch_size, args.size, groups=ref_groups, skipped=ref_skipped)
    groups = [categories.index(c) for c in gen_cats] if categories else None
    clip = CLIPScorer(args.clip_model, args.clip_pretrained, device) if args.clip else None
    gen = folder_batches(files, args.batch_size, args.size, prompts=prompts, groups=groups, skipped=gen_skipped)
    res, stats = evaluate_generation(gen, extractor, ref_batches, ref_stats, clip, args.is_splits, categories)
    res = with_skips(with_skips(res, gen_skipped), ref_skipped, "ref_skipped")
    if args.save_ref_stats and stats is not None and train_common.rank_world()[0] == 0:
        save_ref_stats(args.save_ref_stats, stats)
        print(f"saved reference statistics to {args.save_ref_stats}")
    return res, f"generation: {args.images} vs {args.ref}"


def cmd_shapes(args, device):
    if args.n_per_category < 1:
        raise ValueError(f"--n-per-category must be at least 1, got {args.n_per_category}")
    if args.decoder_text != "caption" and not args.reconstruct:
        raise ValueError("--decoder-text only applies to --reconstruct (the tokenizer's decoder)")
    if args.save:
        _fresh_dir(args.save)  # refuse a non-empty folder before the (long) generation, not after
    if args.images:  # a folder of already generated images with their prompts
        files = list_images(args.images)
        prompts = read_prompts(args.prompts) if args.prompts else None
        if isinstance(prompts, list) and len(prompts) < len(files):
            raise ValueError(f"--prompts has {len(prompts)} lines for {len(files)} images (one per image, in order)")
        caps = [prompt_for(p, prompts, i) for i, p in enumerate(files)]
        images = [to_uint8(load_image(p)).permute(1, 2, 0).numpy() for p in files]
        source = args.images
    elif args.ground_truth or args.reconstruct:  # the held-out prompts' ground-truth scenes, rendered
        samples = shapes.heldout_samples(args.n_per_category, args.seed)
        images, caps = [s.image for s in samples], [s.caption for s in samples]
        source = "ground-truth renders (detector sanity check)"
        if args.reconstruct:  # through the tokenizer: the ceiling for any generator on top of it
            # What the text-aware decoder reads: the scene's caption, the next scene's, or "".
            text = {"caption": caps, "next": caps[1:] + caps[:1], "empty": [""] * len(caps)}[args.decoder_text]
            images = _reconstruct(images, text, args.generator, args.tokenizer, device, args.batch_size)
            of = args.tokenizer if args.generator is None and args.tokenizer else args.generator
            source = f"ground-truth renders reconstructed by the tokenizer of {of or 'checkpoints/shapes.pt'}"
    else:  # the held-out prompts (a seed no training run uses), generated
        caps = shapes.heldout_prompts(args.n_per_category, args.seed)
        images = generate_shapes_images(caps, args.generator, args.tokenizer, device, args.sample_seed,
                                        args.batch_size, args.steps, args.guidance_scale, args.guidance_schedule,
                                        args.temperature)  # fmt: skip
        source = args.generator or "the shipped checkpoints/shapes.pt"
        if train_common.rank_world()[0] != 0:
            return {}, source
    res = shapes.shapes_score(images, caps, return_details=bool(args.details or args.save))
    rows = res.pop("per_prompt", None)
    if args.save:
        save_scored(args.save, images, rows)
    if args.details:
        with open(args.details, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return res, f"shapes compositional score: {source}"


# -----------------------------------------------------------------------------
# `context`: does MaskGen use the tokens already drawn? A model that does not draws each
# token from its marginal, and with 1D tokens that are only meaningful together the
# decoded image falls apart into fragments.


def ridge_r2(x_train, y_train, x_test, y_test, lam=1.0):
    """R^2 on the test rows of a ridge regression y ~ x + bias fit on the train rows (float64)."""

    def aug(x):
        return torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], dim=1)
    a = aug(x_train)
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    w = torch.linalg.solve(a.T @ a + lam * eye, a.T @ y_train.double())
    err = (aug(x_test) @ w - y_test.double()).pow(2).sum()
    return (1 - err / (y_test.double() - y_train.double().mean(0)).pow(2).sum()).item()


def hidden_token_setup(models, images, captions, aesthetic, seed):
    """What context_use and inpaint_use share: the captions' features, the aesthetic scores
    (B,), each image's random hiding order rank (B, K) (a token is hidden at fraction f
    when rank >= round(f K)), the true tokens as the generator reads them (VQ: ids (B, K);
    KL: (B, K, C), scaled, a posterior sample or the mean as in training), the KL posterior
    (None for VQ), and the CPU generator the draws came from (for any later draws).
    All randomness comes from that CPU generator, so one seed gives the same draws on every
    device (hence the posterior sample by hand, not post.sample)."""
    G, T = models.generator, models.tokenizer
    device, c = next(G.parameters()).device, G.config
    g = torch.Generator().manual_seed(seed)
    feats = models.gen_text(captions)
    aes = torch.full((len(captions),), float(aesthetic), device=device)
    rank = torch.rand(len(captions), c.num_tokens, generator=g).argsort(-1).argsort(-1).to(device)  # (B, K)
    if c.mode == "vq":
        return feats, aes, rank, T.encode(images), None, g
    post = T.encode(images, return_posterior=True)
    noise = torch.randn(post.mean.shape, generator=g).to(device)
    x = post.mean + post.std * noise if c.kl_tokens == "sample" else post.mean
    return feats, aes, rank, x * c.scale_factor, post, g


@torch.no_grad()
def context_use(models, images, captions, aesthetic, fractions=(0.0, 0.5, 0.9), seed=0):
    """How much MaskGen's predictions for masked tokens depend on the visible ones.

    images (B, 3, H, W) in [0, 1] with their captions; each image's tokens are hidden in
    a random order, all but the first `fraction` of them. VQ: {"masked_ce@f"}: the
    cross-entropy of the masked ids. KL: {"r2_from_z@f"}: R^2 of a ridge regression from
    the per-token conditions z (what DiffLoss sees) to the masked tokens' posterior means,
    fit on the even images and scored on the odd ones. A model that reads its context does
    far better (lower cross-entropy, higher R^2) with tokens visible than with none.
    """
    G = models.generator
    B, K = len(captions), G.config.num_tokens
    feats, aes, rank, x, post, _ = hidden_token_setup(models, images, captions, aesthetic, seed)
    out = {}
    if G.config.mode == "vq":
        for f in fractions:
            masked = rank >= round(f * K)  # (B, K) bool
            logits = G.logits(torch.where(masked, G.mask_id, x), feats.penultimate, feats.pooled, aes)
            ce = F.cross_entropy(logits.float().flatten(0, 1), x.flatten(), reduction="none").view(B, K)
            out[f"masked_ce@{f:g}"] = ce[masked].mean().item()
        return out
    mean = post.mean * G.config.scale_factor  # (B, K, C): the regression targets
    txt, cond = G.encode_condition(feats.penultimate, feats.pooled, aes)
    even = (torch.arange(B, device=x.device) % 2 == 0)[:, None]  # (B, 1): fit on even, score on odd
    for f in fractions:
        masked = rank >= round(f * K)  # (B, K) bool
        z = G.token_conditions(x, masked.float(), txt, cond)  # (B, K, D)
        fit, test = masked & even, masked & ~even
        out[f"r2_from_z@{f:g}"] = ridge_r2(z[fit], mean[fit], z[test], mean[test], lam=10.0)
    return out


@torch.no_grad()
def inpaint_use(models, images, captions, aesthetic, fractions=(0.5, 0.75, 0.9), seed=0):
    """How well MaskGen fills in the rest of a real scene. All but `fraction` of each
    scene's tokens are hidden (a random order, as in context_use) and drawn in ONE step
    from the true visible ones, without guidance (VQ: the most likely id; KL: one DiffLoss
    draw at the config's temperature); the decoded scenes are scored by the shapes
    detector: {"inpaint@f": overall score}. The context is the truth here, so this
    measures the per-token predictions apart from the decoding schedule. Also returns the
    decoded images, {f: (B, 3, H, W) in [0, 1]}."""
    G, T = models.generator, models.tokenizer
    c, K = G.config, G.config.num_tokens
    feats, aes, rank, visible, _, g = hidden_token_setup(models, images, captions, aesthetic, seed)
    tok_text = models.tok_text(captions).final
    if c.mode == "kl":
        txt, cond = G.encode_condition(feats.penultimate, feats.pooled, aes)
        temperature = 1.0 if c.temperature is None else c.temperature
        draws = g if visible.device.type == "cpu" else None  # DiffLoss draws on visible's device
    out, decoded = {}, {}
    for f in fractions:
        masked = rank >= round(f * K)  # (B, K) bool
        if c.mode == "vq":
            logits = G.logits(torch.where(masked, G.mask_id, visible), feats.penultimate, feats.pooled, aes)
            tokens = torch.where(masked, logits.argmax(-1), visible)  # (B, K)
        else:
            z = G.token_conditions(visible, masked.float(), txt, cond)  # (B, K, D)
            new = G.diffloss.sample(z[masked], temperature=temperature, generator=draws)  # (hidden, C)
            tokens = visible.masked_scatter(masked[..., None], new.to(visible.dtype)) / c.scale_factor  # (B, K, C)
        decoded[f] = T.decode(tokens, tok_text)
        uint8 = list(to_uint8(decoded[f]).permute(0, 2, 3, 1).cpu().numpy())
        out[f"inpaint@{f:g}"] = shapes.shapes_score(uint8, captions)["overall"]
    return out, decoded


def cmd_context(args, device):
    if args.n_per_category < 2:
        raise ValueError(f"--n-per-category must be at least 2 (half the scenes fit, half score), "
                         f"got {args.n_per_category}")
    models = load.load_models(args.generator, args.tokenizer, device)
    samples = shapes.heldout_samples(args.n_per_category, args.seed)
    images = torch.tensor(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div(255).to(device)
    # One pass over all scenes (900 at the default: small for the shapes models; --batch-size
    # is not used); the regressions need every image at once anyway.
    captions = [s.caption for s in samples]
    res = context_use(models, images, captions, shapes.SHAPES_AESTHETIC, seed=args.sample_seed)
    res.update(inpaint_use(models, images, captions, shapes.SHAPES_AESTHETIC, seed=args.sample_seed)[0])
    return res, f"context use of {args.generator or 'checkpoints/shapes.pt'} on {len(samples)} held-out scenes"


def save_scored(folder, images, rows):
    """Write the images just scored, so that misses can be looked at: <folder>/<category>/
    <i>_<ok|miss>.png (i: the prompt's number within its category) with its prompt in the
    sidecar <i>_<ok|miss>.txt (so `--images <folder>` scores them again), and the detector's
    verdicts in <folder>/results.jsonl (file, prompt, category, correct, reason, detections)."""
    counts = {}
    with open(os.path.join(_fresh_dir(folder), "results.jsonl"), "w") as log:
        for img, row in zip(images, rows):
            i = counts[row["category"]] = counts.get(row["category"], -1) + 1
            name = os.path.join(row["category"], f"{i:04d}_{'ok' if row['correct'] else 'miss'}")
            os.makedirs(os.path.join(folder, row["category"]), exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, name + ".png"))
            with open(os.path.join(folder, name + ".txt"), "w") as f:
                f.write(row["prompt"] + "\n")
            log.write(json.dumps({"file": name + ".png", **row}) + "\n")
    print(f"saved {len(rows)} scored images to {folder}/<category>/ (misses: *_miss.png; verdicts: results.jsonl)")


def _fresh_dir(folder):
    """Create `folder` for --save; one that already holds files is refused (nothing is overwritten)."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"--save folder {folder!r} is not empty; name a new folder (or remove that one)")
    os.makedirs(folder, exist_ok=True)
    return folder


def _reconstruct(images, captions, generator, tokenizer, device, batch_size):
    """Encode and decode uint8 (H, W, 3) images with the generator's tokenizer, or with
    `tokenizer` alone when no generator is given (a tokenizer run, before any MaskGen), and
    its text encoder, since the decoder is text-aware."""
    if generator is None and tokenizer is not None:
        tok, tok_text = load.load_tokenizer(tokenizer, device)
    else:
        models = load.load_models(generator, tokenizer, device)
        tok, tok_text = models.tokenizer, models.tok_text
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack(images[i : i + batch_size])).permute(0, 3, 1, 2).float().div(255).to(device)
            text = tok_text(captions[i : i + batch_size]).final
            recon = tok.decode(tok.encode(x), text)
            out += list(to_uint8(recon).permute(0, 2, 3, 1).cpu().numpy())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=None, help="output prefix for <out>.json / <out>.txt (default out/eval/<cmd>)")
    common.add_argument("--device", default=None, help="cuda / mps / cpu (default: best available)")
    common.add_argument("--batch-size", type=int, default=50)
    fid = argparse.ArgumentParser(add_help=False)
    fid.add_argument("--no-fid", action="store_true", help="skip FID / IS (no torch-fidelity needed)")
    fid.add_argument("--inception-weights", default=None, help="local FID Inception weights (.pth), for offline use")
    fid.add_argument("--is-splits", type=int, default=1, help="IS splits: 1 = official evaluator, 10 = Salimans")
    fid.add_argument("--limit", type=int, default=None, help="use only the first N images")

    p = sub.add_parser("recon", parents=[common, fid], help="tokenizer reconstruction: rFID, IS, PSNR, codebook")
    p.add_argument("--tokenizer", required=True, help="official release dir or Hub id (owner/name[@rev]), or our run / checkpoint")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag, commit) for a --tokenizer Hub id")
    p.add_argument("--data", required=True, help="image folder (e.g. ImageNet val with class sub-folders)")
    p.add_argument("--class-names", default=None, help="class names file -> captions 'A photo of a {class}.'")
    p.add_argument("--size", type=int, default=None, help="resize+centre-crop side (default: tokenizer's)")

    p = sub.add_parser("gen", parents=[common, fid], help="generated folder: gFID vs a reference, IS, CLIP score")
    p.add_argument("--images", required=True)
    p.add_argument("--ref", default=None, help="reference image folder, or a .npz with mu / sigma")
    p.add_argument("--ref-limit", type=int, default=None)
    p.add_argument("--save-ref-stats", default=None, help="save the reference mu / sigma to this .npz")
    p.add_argument("--size", type=int, default=None, help="resize+centre-crop side (needed if sizes differ)")
    p.add_argument("--prompts", default=None,
                   help="prompts for --clip: .txt (one line per image, sorted file order), sample.py's prompts.jsonl "
                   "(matched by file name) or MJHQ-30K's meta_data.json; default: what the folder holds")  # fmt: skip
    p.add_argument("--clip", action="store_true", help="also compute the CLIP score")
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")

    p = sub.add_parser("shapes", parents=[common], help="shapes-world compositional score")
    p.add_argument("--images", default=None, help="folder of generated images (prompts as in `gen`)")
    p.add_argument("--prompts", default=None, help="as for gen")
    p.add_argument("--generator", default=None, help="MaskGen checkpoint (default: the shipped one), via sample.py")
    p.add_argument("--tokenizer", default=None,
                   help="TA-TiTok checkpoint (default: the one the generator records); alone with --reconstruct")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the generator's config)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--guidance-schedule", default=None, help="VQ: cosine | linear | none; KL: linear | constant")
    p.add_argument("--temperature", type=float, default=None,
                   help="VQ: softmax temperature (default annealed); KL: DiffLoss noise (default: the config's)")
    p.add_argument("--ground-truth", action="store_true", help="score ground-truth renders (detector check)")
    p.add_argument("--reconstruct", action="store_true",
                   help="score ground-truth renders after a trip through the tokenizer (the generator's ceiling)")
    p.add_argument("--decoder-text", choices=["caption", "next", "empty"], default="caption",
                   help="--reconstruct: the decoder reads each scene's caption, the next scene's, or \"\"")
    p.add_argument("--n-per-category", type=int, default=300)
    p.add_argument("--seed", type=int, default=shapes.HELDOUT_SEED, help="held-out prompt seed (no training run uses it)")
    p.add_argument("--sample-seed", type=int, default=0, help="generation: prompt j is sampled with seed + j")
    p.add_argument("--details", default=None, help="write per-prompt results to this .jsonl")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the scored images to DIR/<category>/<i>_<ok|miss>.png (+ .txt prompts, results.jsonl)")

    p = sub.add_parser("context", parents=[common], help="does a MaskGen read the visible tokens? (shapes world)")
    p.add_argument("--generator", default=None, help="MaskGen checkpoint (default: the shipped one)")
    p.add_argument("--tokenizer", default=None, help="TA-TiTok checkpoint (default: the one the generator records)")
    p.add_argument("--n-per-category", type=int, default=300)
    p.add_argument("--seed", type=int, default=shapes.HELDOUT_SEED, help="held-out scene seed (as for shapes)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the masking orders and posterior samples")

    args = ap.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    rank, _, device = train_common.setup_distributed(args.device or "auto")  # joins torchrun's process group
    commands = {"recon": cmd_recon, "gen": cmd_gen, "shapes": cmd_shapes, "context": cmd_context}
    res, title = commands[args.cmd](args, device)
    if rank == 0:
        write_report(res, args.out or os.path.join("out", "eval", args.cmd), title)
    train_common.teardown()
    return res


if __name__ == "__main__":
    try:
        main()
    except (ImportError, FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"evaluate.py: error: {e}")

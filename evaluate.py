"""
Evaluation: the paper's metrics in plain code (numbers in, numbers out), and the command
line that runs them on folders, datasets and checkpoints.

Paper §5.1 and appendix E: the tokenizer is scored by reconstruction FID (rFID) and Inception Score on
ImageNet-val, decoding with the caption "A photo of a {class}."; the generator by FID on MJHQ-30K / COCO-30K,
CLIP score and GenEval. FID / IS features come from the standard FID Inception-v3 (the TF-2015 graph as ported
by torch-fidelity, optional) so that numbers compare with the literature. Each command writes <out>.json and a
table <out>.txt (out/eval/<cmd>):
    python evaluate.py recon --tokenizer DIR_OR_RUN --data IMAGENET_VAL_DIR --class-names classes.txt
    python evaluate.py gen --images GEN_DIR --ref REF_DIR|ref_stats.npz [--clip --prompts prompts.txt]
    python evaluate.py shapes [--generator CKPT] [--images DIR | --ground-truth | --reconstruct]
    python evaluate.py context [--generator CKPT]       # does MaskGen read the tokens already drawn?
`gen` on MJHQ-30K's layout (<dir>/<category>/<image>, both sides) also gives each category's FID; `shapes` is
a GenEval stand-in for the 64x64 shapes world, scored by the rule-based detector in shapes.py. Under torchrun
(torchrun --nproc_per_node=8 evaluate.py ...) every rank scores its share and gather_rows joins them.
"""

import argparse
import functools
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import checkpoint
import data
import sample
import shapes
import train_common
from data import load_image, to_uint8
from shards import SKIP_REASONS


def gather_rows(x):
    """Every rank's (n_r, ...) tensor, concatenated in rank order (n_r may differ: all_gather_object
    sends each whole); x itself in a single process."""
    if train_common.rank_world()[1] == 1:
        return x
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x.cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Metrics: FID (Heusel et al. 2017), Inception Score (Salimans et al. 2016), PSNR, codebook use.

def feature_stats(features):
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2 to fit a Gaussian, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID: the Fréchet (2-Wasserstein) distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) fit to
    two feature sets; mu: (D,), sigma: (D, D).   d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})
    As in pytorch-fid, a numerically singular covariance (fewer samples than dimensions) gets eps * I, which keeps
    numbers close to pytorch-fid's; but both Gaussians are widened everywhere, not only inside the root (a -2 eps D
    bias), so equal statistics give exactly 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if any(np.linalg.eigvalsh(s).min() <= eps * max(1.0, np.abs(s).max()) for s in (s1, s2)):  # singular
        s1, s2 = s1 + eps * np.eye(s1.shape[0]), s2 + eps * np.eye(s1.shape[0])
    # tr((S1 S2)^{1/2}) without a general sqrtm (which can go complex or inf for singular input): S1 S2 is similar
    # to the symmetric PSD M = S1^{1/2} S2 S1^{1/2}, so the trace is sum_i sqrt(eig_i(M)), from two symmetric
    # eigen-decompositions (round-off negatives clipped).
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^{1/2}
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)).sum()  # M symmetrised
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2.0 * float(tr_sqrt))


def inception_score(logits, splits=1):
    """IS = exp(E_x KL(p(y|x) || p(y))): high when each image is confidently one class and the
    classes are diverse. logits (N, C) (or log-probabilities) -> (mean, std) over `splits` chunks;
    1 split is the official TA-TiTok evaluator, 10 Salimans' / torch-fidelity's."""
    p = torch.as_tensor(logits, dtype=torch.float64).softmax(dim=1)  # p(y|x): (N, C)
    n = p.shape[0]
    if n < splits:
        raise ValueError(f"{n} samples cannot be cut into {splits} splits")
    scores = []
    for i in range(splits):
        chunk = p[i * n // splits : (i + 1) * n // splits]  # (n_i, C)
        marginal = chunk.mean(dim=0, keepdim=True)  # p(y): (1, C)
        # KL = sum_y p log p - p log p(y); xlogy makes 0 log 0 = 0, so one-hot rows need no epsilon.
        kl = (torch.special.xlogy(chunk, chunk) - torch.special.xlogy(chunk, marginal)).sum(dim=1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def psnr(a, b, data_range=1.0):
    """Per-image 10 log10(range^2 / MSE); a, b: (B, C, H, W) -> (B,). The MSE is floored at
    1e-10 range^2 (100 dB), so identical images do not give +inf."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10 * data_range**2)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def codebook_stats(ids, codebook_size):
    """How a VQ tokenizer uses its codebook, over this rank's code ids (any shape), all ranks joined:
    usage = the fraction of codes chosen at least once (the official evaluator's "CodebookUsage");
    perplexity = exp(entropy of the code frequencies), the codebook size when all are used equally."""
    ids = torch.as_tensor(ids).flatten().long().cpu()
    if ids.numel() and (ids.min() < 0 or ids.max() >= codebook_size):
        raise ValueError(f"code ids must lie in [0, {codebook_size}), got [{ids.min()}, {ids.max()}]")
    counts = gather_rows(torch.bincount(ids, minlength=codebook_size).double()[None]).sum(dim=0)  # (V,) all ranks
    total = counts.sum().item()
    if total == 0:
        raise ValueError("no code ids were counted")
    p = counts / total
    entropy = -torch.special.xlogy(p, p).sum().item()  # nats
    return dict(codebook_usage=float((counts > 0).double().mean()), codebook_perplexity=math.exp(entropy),
                codebook_entropy_bits=entropy / math.log(2))


# -----------------------------------------------------------------------------
# Features: the FID Inception network (via torch-fidelity), and the CLIP score.

def inception_extractor(device="cpu", weights_path=None):
    """The standard FID Inception-v3: uint8 (B, 3, H, W) -> (pool3 features (B, 2048) for FID, the
    TF graph's "logits_unbiased" (B, 1008) for IS), resized to 299 inside with the TF-1 bilinear
    resize the reference numbers were computed with."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("FID and Inception Score need the standard FID Inception network from torch-fidelity, "
                          "which is not installed. Fix: `pip install torch-fidelity` (an optional dependency; "
                          "the rest of evaluate.py works without it), or pass --no-fid.") from e
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=weights_path)
    except Exception as e:  # first use downloads the weights from GitHub
        raise RuntimeError(f"could not load the FID Inception weights ({e}). Fix: run once with internet access "
                           "(torch-fidelity caches them under $TORCH_HOME/hub/checkpoints), or pass "
                           "--inception-weights weights-inception-2015-12-05-6726825d.pth") from e
    net = net.to(device).eval()
    return torch.no_grad()(lambda images_uint8: net(images_uint8.to(device)))


class FeatureBank:
    """This rank's (features, logits, category ids (-1: none)); .gather() joins all ranks."""

    def __init__(self, extractor, batches=()):  # batches: (images, any[, group ids (B,)]) to add now
        self.extractor, self.rows = extractor, []
        for images, _, *groups in batches:
            self.add(images, *groups)

    def add(self, images, groups=None):  # images (B, 3, H, W) float in [0, 1]; groups (B,) ids or None
        f, l = self.extractor(to_uint8(images))  # (B, 2048), (B, 1008)
        g = torch.full((f.shape[0],), -1) if groups is None else torch.as_tensor(groups).long()
        self.rows.append((f.detach().float().cpu(), l.detach().float().cpu(), g.cpu()))

    def gather(self):  # -> (N, 2048), (N, 1008), (N,) over all ranks
        none = [(torch.zeros(0, 1), torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))]  # a rank without images
        return tuple(gather_rows(torch.cat(x)).numpy() for x in zip(*(self.rows or none)))


class CLIPScorer:
    """CLIP score = 100 * max(cos(image embedding, text embedding), 0) per image (torchmetrics'
    convention; Hessel et al. use 2.5). Default: OpenAI's ViT-L/14 via open_clip, with the
    QuickGELU it was trained with; tests pass a tiny model (and tokenizer) instead."""

    def __init__(self, model_name="ViT-L-14", pretrained="openai", device="cpu", model=None, tokenizer=None):
        import open_clip
        if model is None:
            model = open_clip.create_model(model_name, pretrained=pretrained,
                                           force_quick_gelu=pretrained == "openai", device=device)
            tokenizer = open_clip.get_tokenizer(model_name)
        ctx = getattr(model, "context_length", 77)
        tokenizer = functools.partial(open_clip.tokenize, context_length=ctx) if tokenizer is None else tokenizer
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, device
        self.size = model.visual.image_size  # an int or (H, W)
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean, self.std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images: (B, 3, H, W) in [0, 1]; prompts: B strings -> (B,) scores."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        # Bicubic resize to CLIP's input size (squashing non-square images: fine for a similarity).
        x = F.interpolate(images.to(self.device).float(), size=self.size, mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)  # (B, 3, S, S)
        img = F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)  # (B, E)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return 100.0 * (img * txt).sum(dim=-1).clamp_min(0).cpu()


# -----------------------------------------------------------------------------
# Evaluation routines: batches in, a dict of metrics out.

@torch.no_grad()
def evaluate_reconstruction(tokenizer, text_encoder, batches, extractor=None, is_splits=1):
    """rFID, IS (of the reconstructions), PSNR and, for VQ, codebook usage, over this rank's batches
    of (images (B, 3, S, S) in [0, 1], captions), all ranks joined. KL tokenizers decode the
    posterior mean (what encode() returns); the text-aware decoder reads the captions."""
    device = next(tokenizer.parameters()).device
    real_bank, fake_bank, psnrs = FeatureBank(extractor), FeatureBank(extractor), []
    codes = [] if tokenizer.config.quantize_mode == "vq" else None  # VQ: every code id, for codebook_stats
    for images, captions, *_ in batches:  # category ids, from folder_batches, unused
        images = images.to(device)
        tokens = tokenizer.encode(images)  # VQ (B, K) ids | KL (B, K, C) mean
        recon = tokenizer.decode(tokens, text_encoder(list(captions)).final.to(device)).float().clamp(0, 1)
        # PSNR of the 8-bit images one would save: both rounded to 256 levels first.
        psnrs.append(psnr(to_uint8(images).float() / 255, to_uint8(recon).float() / 255).cpu())
        if codes is not None:
            codes.append(tokens.cpu())
        if extractor is not None:
            real_bank.add(images)
            fake_bank.add(recon)
    p = gather_rows(torch.cat(psnrs).float() if psnrs else torch.zeros(0))  # (N,) all ranks; a rank may get none
    res = {"num_images": int(p.numel()), "psnr": float(p.mean())}
    if codes is not None:
        res.update(codebook_stats(torch.cat(codes) if codes else torch.zeros(0), tokenizer.config.codebook_size))
    if extractor is not None:
        (fr, _, _), (ff, lf, _) = real_bank.gather(), fake_bank.gather()
        res["rfid"] = frechet_distance(*feature_stats(fr), *feature_stats(ff))
        res["inception_score"], res["inception_score_std"] = inception_score(lf, splits=is_splits)
    return res


def stats_by_group(feats, groups, categories):
    """{"": (mu, sigma) of all rows, name: (mu, sigma) of each category (groups (N,): row ->
    index into categories) with the 2 rows a Gaussian needs}."""
    per = {c: feature_stats(feats[groups == k]) for k, c in enumerate(categories or []) if (groups == k).sum() >= 2}
    return {"": feature_stats(feats), **per}


@torch.no_grad()
def evaluate_generation(gen_batches, extractor=None, ref_batches=None, ref_stats=None, clip_scorer=None,
                        is_splits=1, categories=None):
    """FID against a reference (its batches or its statistics), IS, and the CLIP score with a scorer -> (metrics,
    the reference's stats_by_group). gen_batches: (images (B, 3, H, W) in [0, 1], prompts[, group ids (B,)]);
    ref_batches: (images, any[, group ids]). `categories` names the group ids (MJHQ-30K's): then also each
    category's FID against the reference's same category, as MJHQ-30K reports it."""
    bank, clip, res, stats = FeatureBank(extractor), [], {}, ref_stats
    for images, prompts, *groups in gen_batches:
        if extractor is not None:
            bank.add(images, *groups)
        if clip_scorer is not None:
            clip.append(clip_scorer(images, prompts).float())
    if extractor is not None:
        feats, logits, ids = bank.gather()
        res["num_images"] = int(feats.shape[0])
        if stats is None:
            if ref_batches is None:
                raise ValueError("FID needs a reference: pass ref_batches or ref_stats")
            ref_feats, _, ref_ids = FeatureBank(extractor, ref_batches).gather()
            stats = stats_by_group(ref_feats, ref_ids, categories)
        mine = stats_by_group(feats, ids, categories)
        res["fid"] = frechet_distance(*mine[""], *stats[""])
        if categories:
            res["fid_per_category"] = {c: frechet_distance(*mine[c], *stats[c])
                                       for c in categories if c in mine and c in stats}
            res["num_images_per_category"] = {c: int((ids == k).sum()) for k, c in enumerate(categories)}
        res["inception_score"], res["inception_score_std"] = inception_score(logits, splits=is_splits)
    if clip_scorer is not None:
        scores = gather_rows(torch.cat(clip) if clip else torch.zeros(0))
        res["clip_score"], res["num_images"] = float(scores.mean()), int(scores.numel())
    return res, stats


def generate_shapes_images(prompts, generator=None, tokenizer=None, device="cpu", seed=0, batch_size=50,
                           num_steps=None, guidance_scale=None, guidance_schedule=None, temperature=None):
    """uint8 (H, W, 3) images for `prompts` in their order, prompt j sampled with seed + j by
    sample.py (generator None: the shipped checkpoints/shapes). Under torchrun rank r draws
    prompts r::world and every rank gets all images."""
    models = checkpoint.load_models(generator, tokenizer, device)
    opts = dict(num_steps=num_steps, guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                randomize_temperature=None, temperature=temperature)
    rank, world = train_common.rank_world()
    mine = list(range(len(prompts)))[rank::world]
    aesthetic, out = models.generator.config.aesthetic, []
    with torch.inference_mode():
        null = models.gen_text([""])  # the classifier-free guidance null condition
        for i in range(0, len(mine), batch_size):
            idx = mine[i : i + batch_size]
            imgs = sample.generate_images(models, [prompts[j] for j in idx], [aesthetic] * len(idx),
                                          [seed + j for j in idx], null, opts, device, seeding="batch")
            out.append(to_uint8(imgs).permute(0, 2, 3, 1).cpu())  # (b, H, W, 3)
    S = models.tokenizer.config.image_size
    images = gather_rows(torch.cat(out) if out else torch.zeros((0, S, S, 3), dtype=torch.uint8))
    order = gather_rows(torch.tensor(mine, dtype=torch.long))  # the prompt number of each gathered image
    return list(images.numpy()[order.argsort().numpy()])


# -----------------------------------------------------------------------------
# `context`: does MaskGen use the tokens already drawn? One that does not draws each token
# from its marginal, and 1D tokens, meaningful only together, decode to fragments.

def ridge_r2(x_train, y_train, x_test, y_test, lam=1.0):
    """Test-row R^2 of a ridge regression y ~ x + bias fit on the train rows (float64)."""
    a = F.pad(x_train.double(), (0, 1), value=1.0)  # (N, D + 1): a constant column for the bias
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]).to(a), a.T @ y_train.double())
    err = (F.pad(x_test.double(), (0, 1), value=1.0) @ w - y_test.double()).pow(2).sum()
    return (1 - err / (y_test.double() - y_train.double().mean(0)).pow(2).sum()).item()


@torch.no_grad()
def context_use(models, images, captions, aesthetic, fractions=(0.0, 0.5, 0.9), seed=0):
    """How much MaskGen's predictions for the hidden tokens of images (B, 3, H, W) in [0, 1] depend on the visible
    `fraction`: VQ {"masked_ce@f"}, their cross-entropy; KL {"r2_from_z@f"}, the R^2 of a ridge regression from the
    per-token conditions z (what DiffLoss sees) to their posterior means, fit on even images, scored on odd ones. A
    model that reads its context does far better with tokens visible than without. The visible tokens are those
    the generator reads in training (KL: scaled, a posterior sample or the mean). Every draw comes from a CPU
    generator, so a seed gives the same draws on every device."""
    G, T, c = models.generator, models.tokenizer, models.generator.config
    B, K, device = len(captions), c.num_tokens, next(G.parameters()).device
    g = torch.Generator().manual_seed(seed)
    feats = models.gen_text(captions)
    aes = torch.full((B,), float(aesthetic), device=device)
    rank = torch.rand(B, K, generator=g).argsort(-1).argsort(-1).to(device)  # (B, K): hidden where rank >= round(f K)
    if c.mode == "vq":
        x = T.encode(images)  # (B, K)
        predict = lambda m: G.logits(torch.where(m, G.mask_id, x), feats.penultimate, feats.pooled, aes)  # noqa: E731
    else:  # predict(masked): the per-token conditions z (B, K, D)
        post = T.encode(images, return_posterior=True)
        noise = torch.randn(post.mean.shape, generator=g).to(device)  # drawn even for "mean"
        x = (post.mean + post.std * noise if c.kl_tokens == "sample" else post.mean) * c.scale_factor  # (B, K, C)
        txt, cond = G.trunk.encode_condition(feats.penultimate, feats.pooled, aes)
        predict = lambda m: G.token_conditions(x, m.float(), txt, cond)  # noqa: E731
    even = (torch.arange(B, device=x.device) % 2 == 0)[:, None]  # (B, 1)
    out = {}
    for f in fractions:
        masked = rank >= round(f * K)  # (B, K) bool
        if c.mode == "vq":
            ce = F.cross_entropy(predict(masked).float().flatten(0, 1), x.flatten(), reduction="none").view(B, K)
            out[f"masked_ce@{f:g}"] = ce[masked].mean().item()
        else:  # z (B, K, D) -> the posterior means (B, K, C), the regression targets
            z, mean, fit, test = predict(masked), post.mean * c.scale_factor, masked & even, masked & ~even
            out[f"r2_from_z@{f:g}"] = ridge_r2(z[fit], mean[fit], z[test], mean[test], lam=10.0)
    return out


@torch.no_grad()
def inpaint_use(models, images, captions, aesthetic, fractions=(0.5, 0.75, 0.9), seed=0):
    """How well MaskGen fills in a real scene whose tokens but `fraction` are hidden: generate()'s
    image-to-image at strength 1 - fraction in ONE unguided step (VQ: the likeliest id; KL: one
    DiffLoss draw), so the per-token predictions are measured apart from the decoding schedule. ->
    ({"inpaint@f": the shapes detector's overall score}, {f: decoded (B, 3, H, W) in [0, 1]})."""
    G, T = models.generator, models.tokenizer
    feats, tok_text = models.gen_text(captions), models.tok_text(captions).final
    init = T.encode(images)  # VQ ids (B, K) | KL posterior means (B, K, C), what the reconstruction decodes
    out, decoded = {}, {}
    for f in fractions:  # a fresh generator per fraction: one random order, so the hidden sets nest
        gen = torch.Generator(images.device).manual_seed(seed)
        tokens = G.generate(feats.penultimate, feats.pooled, aesthetic=aesthetic, num_steps=1, guidance_scale=1.0,
                            generator=gen, init_tokens=init, strength=1 - f)  # (B, K) | (B, K, C)
        decoded[f] = T.decode(tokens, tok_text)
        uint8 = list(to_uint8(decoded[f]).permute(0, 2, 3, 1).cpu().numpy())
        out[f"inpaint@{f:g}"] = shapes.shapes_score(uint8, captions)["overall"]
    return out, decoded


# -----------------------------------------------------------------------------
# Command line: image folders, their prompts, reports.

def list_images(folder):
    """Every image under folder (data.IMAGE_EXTS, recursively) but sample.py's grid.png, sorted
    (a stable order to shard)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    files = [f for f in data.find_images(folder) if os.path.basename(f) != "grid.png"]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(data.IMAGE_EXTS)}) found under {folder!r}")
    return files


def read_class_names(path):
    """Class-names file -> {folder name or class index: name}. Lines "n01440764 tench, Tinca
    tinca" (LOC_synset_mapping.txt) name folders; other lines name the sorted class folders
    "0", "1", ... by line. The whole name goes into the caption, as in the official code."""
    names = {}
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    for i, ln in enumerate(lines):
        key, _, name = ln.replace("\t", " ").partition(" ")
        synset = name and key.startswith("n") and key[1:].isdigit()
        names[key if synset else str(i)] = name.strip() if synset else ln
    return names


@functools.lru_cache(maxsize=None)  # read once: sample.py's prompts.jsonl serves every image beside it
def read_prompts(path):
    """A prompt file -> a list (one prompt per image, sorted file order) or a dict by file name:
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
    prompts = [sample._jsonl_prompt(line, path, n) for n, line in enumerate(lines, 1)]  # a clear error for a bad line
    rows = [json.loads(line) for line in lines]
    for key in ("id", "index"):
        if all(key in r for r in rows):
            return {r[key]: p for r, p in zip(rows, prompts)}
    return prompts


def prompts_option(path, files):
    """--prompts (read_prompts) for the images `files`; None without the option."""
    prompts = read_prompts(path) if path else None
    if isinstance(prompts, list) and len(prompts) < len(files):
        raise ValueError(f"--prompts has {len(prompts)} lines for {len(files)} images "
                         "(one line per image, sorted file order)")
    return prompts


SAMPLE_NAME = re.compile(r"(\d+)_s-?\d+(?:_aes[^/]*)?")  # sample.py's flat layout: <prompt>_s<seed>[_aes<a>]


def prompt_for(path, prompts=None, index=None, class_names=None, class_dirs=None):
    """The caption of image `path` (number `index` in sorted order), from the first of: a sidecar
    <stem>.txt; GenEval's <k>/metadata.jsonl beside <k>/samples/; sample.py's prompts.jsonl beside
    <prompt>_s<seed>.png or above MJHQ's <category>/<id>.png; `prompts` (read_prompts' list, or a
    dict by file name); "A photo of a {class}." for a class folder; else ""."""
    side = os.path.splitext(path)[0] + ".txt"
    if os.path.exists(side):
        with open(side) as f:
            return f.read().strip()
    parent = os.path.dirname(os.path.dirname(path))
    meta = os.path.join(parent, "metadata.jsonl")
    if os.path.basename(os.path.dirname(path)) == "samples" and os.path.exists(meta):
        with open(meta) as f:
            return json.loads(f.readline())["prompt"]
    stem, source = os.path.splitext(os.path.basename(path))[0], "--prompts"
    flat, mjhq = os.path.join(os.path.dirname(path), "prompts.jsonl"), os.path.join(parent, "prompts.jsonl")
    m = SAMPLE_NAME.fullmatch(stem)
    if m and os.path.exists(flat):
        prompts, source = read_prompts(flat), flat
    elif os.path.exists(mjhq) and isinstance(read_prompts(mjhq), dict) and stem in read_prompts(mjhq):
        return read_prompts(mjhq)[stem]
    if isinstance(prompts, list):
        return prompts[index]
    if prompts is not None:
        for key in (stem, int(m.group(1)) if m else None):  # <id>.png, or sample.py's <index>_s<seed>.png
            if key in prompts:
                return prompts[key]
        raise ValueError(f"{source} has no prompt for {path} (matched by file name: {stem!r})")
    if class_names is not None:
        folder = os.path.basename(os.path.dirname(path))
        name = class_names.get(folder) or class_names.get(str(class_dirs.index(folder)) if folder in class_dirs else "")
        if name:
            return f"A photo of a {name}."  # the paper's zero-shot ImageNet caption
    return ""


def folder_batches(files, batch_size, skipped, size=None, prompts=None, class_names=None, groups=None):
    """(images (B, 3, S, S), captions, category ids (B,) or None) over this rank's files
    (rank::world); groups: a category id per file. Files that do not decode are skipped and
    counted in `skipped` ({reason: count}), as data.py does."""
    rank, world = train_common.rank_world()
    class_dirs = sorted({os.path.basename(os.path.dirname(f)) for f in files})
    mine = list(range(len(files)))[rank::world]
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


def with_skips(res, skipped, key="skipped"):
    """res plus {key: skip counts summed over ranks} when anything was skipped (all ranks call it)."""
    counts = gather_rows(torch.tensor([[skipped.get(r, 0) for r in SKIP_REASONS]], dtype=torch.long)).sum(0)
    total = {r: int(n) for r, n in zip(SKIP_REASONS, counts) if n}
    if total:
        print(f"{key}: " + ", ".join(f"{r}={n}" for r, n in total.items()))
    return {**res, key: total} if total else res


def write_report(results, out_prefix, title):
    """Write <out>.json and a table <out>.txt, and print the table."""
    rows = [(k, v) for k, v in results.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows) if rows else 10
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = "\n".join([title, "-" * (width + 14)] + [f"{k:<{width}}  {fmt(v):>12}" for k, v in rows])
    for k, v in results.items():  # flat dicts (per category, skip counts) as one line each
        if isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()):
            table += f"\n{k}: " + ", ".join(f"{a}={fmt(b)}" for a, b in v.items())
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".json", "w") as f, open(out_prefix + ".txt", "w") as txt:
        json.dump(results, f, indent=2)
        txt.write(table + "\n")
    print(f"{table}\nwrote {out_prefix}.json and {out_prefix}.txt")


# -----------------------------------------------------------------------------
# The commands: each takes the parsed arguments and the device, and returns (metrics, title).

def recon_batches(spec, batch_size, size, class_names, skipped):
    """`recon`'s (images, captions): an image folder (sidecar .txt captions, or class folders and
    class names) read here; tar shards and the rest by data.py's loader (one pass, centre crop,
    rank-sharded). Unreadable samples are counted in `skipped`."""
    if os.path.isdir(spec) and not any(n.endswith((".tar", ".tar.gz", ".tgz")) for n in os.listdir(spec)):
        yield from folder_batches(list_images(spec), batch_size, skipped, size, class_names=class_names)
        return
    rank, world = train_common.rank_world()
    loader = data.image_text_loader(spec, size, batch_size, rank=rank, world_size=world, train=False)
    try:
        for batch in loader:
            yield batch["image"], list(batch["caption"])
    finally:  # also when --limit stops early
        for reason, n in loader.dataset.skipped.counts().items():
            skipped[reason] = skipped.get(reason, 0) + n


def cmd_recon(args, device):
    class_names = read_class_names(args.class_names) if args.class_names else None
    # Frozen, with the text encoder its decoder was trained with.
    tok, text = checkpoint.load_tokenizer(args.tokenizer, device, revision=args.revision)
    extractor = None if args.no_fid else inception_extractor(device, args.inception_weights)
    skipped = {}
    size = args.size or tok.config.image_size
    source = batches = recon_batches(args.data, args.batch_size, size, class_names, skipped)
    if args.limit:  # the first N batches' worth, per rank
        batches = (b for b, _ in zip(source, range(-(-args.limit // args.batch_size))))
    res = evaluate_reconstruction(tok, text, batches, extractor, args.is_splits)
    source.close()  # the loader's skip counts are read when it closes
    return with_skips(res, skipped), f"reconstruction: {args.tokenizer} on {args.data}"


def shared_categories(gen_cats, ref_cats, ref):
    """The categories `gen` scores one by one, sorted: when every generated image lies in a
    <category>/ folder and the reference has such folders (MJHQ-30K's layout, which sample.py
    --mjhq writes); else None (overall FID only)."""
    gen, refs = set(gen_cats), set(ref_cats) - {None}
    if None in gen or not gen & refs:
        return None
    if gen - refs:
        raise ValueError(f"per-category FID: the reference {ref} has no category {sorted(gen - refs)} of the "
                         "generated images; both sides need MJHQ-30K's layout, <dir>/<category>/<image> "
                         "(sample.py --mjhq writes it)")
    return sorted(gen)


def cmd_gen(args, device):
    def categories_of(fs, root):  # each file's first folder under root (MJHQ's <category>/), or None
        return [(os.path.relpath(f, root).split(os.sep)[:-1] or [None])[0] for f in fs]
    if args.no_fid and not args.clip:
        raise ValueError("gen --no-fid without --clip would compute nothing; drop --no-fid (FID and IS) or add --clip")
    files = list_images(args.images)[: args.limit]
    prompts = prompts_option(args.prompts, files)
    extractor = None if args.no_fid else inception_extractor(device, args.inception_weights)
    ref_batches, ref_stats, categories, gen_skipped, ref_skipped = None, None, None, {}, {}
    gen_cats = categories_of(files, args.images)
    if extractor is not None:
        if args.ref is None:
            raise ValueError("gFID needs --ref (a folder of reference images or a .npz with mu, sigma), or --no-fid")
        if args.ref.endswith(".npz"):
            z = np.load(args.ref)  # --save-ref-stats' {"": (mu, sigma), category: (mu, sigma)}
            if not {"mu", "sigma"} <= set(z.files):
                raise ValueError(f"{args.ref} holds {z.files}, not mu and sigma; write it with `evaluate.py gen "
                                 "--save-ref-stats`")
            cats = z["categories"] if "categories" in z.files else []
            per = {str(c): (z["mu_per_category"][k], z["sigma_per_category"][k]) for k, c in enumerate(cats)}
            ref_stats = {"": (z["mu"], z["sigma"]), **per}
            categories = shared_categories(gen_cats, list(ref_stats), args.ref)
        else:
            ref_files = list_images(args.ref)[: args.ref_limit]
            ref_cats = categories_of(ref_files, args.ref)
            categories = shared_categories(gen_cats, ref_cats, args.ref)
            ref_groups = [categories.index(c) if c in categories else -1 for c in ref_cats] if categories else None
            ref_batches = folder_batches(ref_files, args.batch_size, ref_skipped, args.size, groups=ref_groups)
    groups = [categories.index(c) for c in gen_cats] if categories else None
    clip = CLIPScorer(args.clip_model, args.clip_pretrained, device) if args.clip else None
    gen = folder_batches(files, args.batch_size, gen_skipped, args.size, prompts=prompts, groups=groups)
    res, stats = evaluate_generation(gen, extractor, ref_batches, ref_stats, clip, args.is_splits, categories)
    res = with_skips(with_skips(res, gen_skipped), ref_skipped, "ref_skipped")
    if args.save_ref_stats and stats is not None and train_common.rank_world()[0] == 0:
        # The .npz that --ref reads: mu, sigma and, with categories, their names and stacked stats.
        cats = [c for c in stats if c]
        per = dict(categories=np.array(cats), mu_per_category=np.stack([stats[c][0] for c in cats]),
                   sigma_per_category=np.stack([stats[c][1] for c in cats])) if cats else {}
        np.savez(args.save_ref_stats, mu=stats[""][0], sigma=stats[""][1], **per)
        print(f"saved reference statistics to {args.save_ref_stats}")
    return res, f"generation: {args.images} vs {args.ref}"


def reconstruct(images, captions, generator, tokenizer, device, batch_size):
    """uint8 (H, W, 3) images through the generator's tokenizer (or `tokenizer` alone: a
    tokenizer run before any MaskGen), its text-aware decoder reading `captions`."""
    if generator is None and tokenizer is not None:
        tok, tok_text = checkpoint.load_tokenizer(tokenizer, device)
    else:
        models = checkpoint.load_models(generator, tokenizer, device)
        tok, tok_text = models.tokenizer, models.tok_text
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack(images[i : i + batch_size])).permute(0, 3, 1, 2).float().div(255).to(device)
            recon = tok.decode(tok.encode(x), tok_text(captions[i : i + batch_size]).final)  # (b, 3, H, W)
            out += list(to_uint8(recon).permute(0, 2, 3, 1).cpu().numpy())
    return out


def cmd_shapes(args, device):
    if args.n_per_category < 1:
        raise ValueError(f"--n-per-category must be at least 1, got {args.n_per_category}")
    if args.decoder_text != "caption" and not args.reconstruct:
        raise ValueError("--decoder-text only applies to --reconstruct (the tokenizer's decoder)")
    if args.save and os.path.isdir(args.save) and os.listdir(args.save):  # refused before the (long) generation
        raise ValueError(f"--save folder {args.save!r} is not empty; name a new folder (or remove that one)")
    if args.images:  # already generated images, with their prompts
        files = list_images(args.images)
        prompts = prompts_option(args.prompts, files)
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
            images = reconstruct(images, text, args.generator, args.tokenizer, device, args.batch_size)
            of = args.tokenizer if args.generator is None and args.tokenizer else args.generator
            source = f"ground-truth renders reconstructed by the tokenizer of {of or 'checkpoints/shapes'}"
    else:  # the held-out prompts (a seed no training run uses), generated
        caps = shapes.heldout_prompts(args.n_per_category, args.seed)
        images = generate_shapes_images(caps, args.generator, args.tokenizer, device, args.sample_seed, args.batch_size,
                                        args.steps, args.guidance_scale, args.guidance_schedule, args.temperature)
        source = args.generator or "the shipped checkpoints/shapes"
        if train_common.rank_world()[0] != 0:
            return {}, source
    res = shapes.shapes_score(images, caps, return_details=bool(args.details or args.save))
    rows = res.pop("per_prompt", None)
    if args.save:
        # The scored images, to look at the misses: <save>/<category>/<i>_<ok|miss>.png (i: the prompt's number in
        # its category), its prompt in <i>_<ok|miss>.txt (so `--images <save>` scores them again), and the
        # detector's verdicts in <save>/results.jsonl. Empty or new: refused above if used, so nothing is overwritten.
        counts, folder = {}, args.save
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "results.jsonl"), "w") as log:
            for img, row in zip(images, rows):
                i = counts[row["category"]] = counts.get(row["category"], -1) + 1
                name = os.path.join(row["category"], f"{i:04d}_{'ok' if row['correct'] else 'miss'}")
                os.makedirs(os.path.join(folder, row["category"]), exist_ok=True)
                Image.fromarray(img).save(os.path.join(folder, name + ".png"))
                with open(os.path.join(folder, name + ".txt"), "w") as f:
                    f.write(row["prompt"] + "\n")
                log.write(json.dumps({"file": name + ".png", **row}) + "\n")
        print(f"saved {len(rows)} scored images to {folder}/<category>/ (misses: *_miss.png; verdicts: results.jsonl)")
    if args.details:
        with open(args.details, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return res, f"shapes compositional score: {source}"


def cmd_context(args, device):
    if args.n_per_category < 2:
        raise ValueError("--n-per-category must be at least 2 (half the scenes fit, half score), "
                         f"got {args.n_per_category}")
    models = checkpoint.load_models(args.generator, args.tokenizer, device)
    samples = shapes.heldout_samples(args.n_per_category, args.seed)
    # One batch of all scenes (no --batch-size): the regressions need every image at once.
    images = torch.tensor(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div(255).to(device)
    scenes = (models, images, [s.caption for s in samples], shapes.SHAPES_AESTHETIC)
    res = {**context_use(*scenes, seed=args.sample_seed), **inpaint_use(*scenes, seed=args.sample_seed)[0]}
    return res, f"context use of {args.generator or 'checkpoints/shapes'} on {len(samples)} held-out scenes"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    # Options several commands share, as parent parsers: output and device (all); the FID network
    # and image size (recon, gen); the models and held-out scenes (shapes, context); prompts.
    common, fid, world, prompts = (argparse.ArgumentParser(add_help=False) for _ in range(4))
    common.add_argument("--out", help="output prefix for <out>.json / <out>.txt (default out/eval/<cmd>)")
    common.add_argument("--device", help="cuda / mps / cpu (default: best available)")
    common.add_argument("--batch-size", type=int, default=50)
    fid.add_argument("--no-fid", action="store_true", help="skip FID / IS (no torch-fidelity needed)")
    fid.add_argument("--inception-weights", help="local FID Inception weights (.pth), for offline use")
    fid.add_argument("--is-splits", type=int, default=1, help="IS splits: 1 = official evaluator, 10 = Salimans")
    fid.add_argument("--limit", type=int, help="use only the first N images")
    fid.add_argument("--size", type=int, help="resize+centre-crop side (recon: the tokenizer's; gen: if sizes differ)")
    world.add_argument("--generator", help="MaskGen checkpoint (default: the shipped one)")
    world.add_argument("--tokenizer", help="TA-TiTok checkpoint (default: the generator's; alone: --reconstruct)")
    world.add_argument("--n-per-category", type=int, default=300)
    world.add_argument("--seed", type=int, default=shapes.HELDOUT_SEED, help="held-out prompt / scene seed")
    world.add_argument("--sample-seed", type=int, default=0,
                       help="generation: prompt j is sampled with seed + j; context: masking orders, posterior draws")
    prompts.add_argument("--prompts", help="prompts for --clip / shapes: .txt (one line per image, sorted file order), "
                         "sample.py's prompts.jsonl (by file name) or MJHQ-30K's meta_data.json; default: the folder's")
    p = sub.add_parser("recon", parents=[common, fid], help="tokenizer reconstruction: rFID, IS, PSNR, codebook")
    p.add_argument("--tokenizer", required=True, help="official release dir or Hub id (owner/name[@rev]), or our run")
    p.add_argument("--revision", help="Hub revision (branch, tag, commit) for a --tokenizer Hub id")
    p.add_argument("--data", required=True, help="image folder (e.g. ImageNet val with class sub-folders)")
    p.add_argument("--class-names", help="class names file -> captions 'A photo of a {class}.'")
    p = sub.add_parser("gen", parents=[common, fid, prompts], help="generated folder: gFID vs a reference, IS, CLIP")
    p.add_argument("--images", required=True)
    p.add_argument("--ref", help="reference image folder, or a .npz with mu / sigma")
    p.add_argument("--ref-limit", type=int)
    p.add_argument("--save-ref-stats", help="save the reference mu / sigma to this .npz")
    p.add_argument("--clip", action="store_true", help="also compute the CLIP score")
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")
    p = sub.add_parser("shapes", parents=[common, world, prompts], help="shapes-world compositional score")
    p.add_argument("--images", help="folder of generated images (prompts as in `gen`)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the generator's config)")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--guidance-schedule", help="VQ: cosine | linear | none; KL: linear | constant")
    p.add_argument("--temperature", type=float, help="VQ: softmax temperature (default annealed); KL: DiffLoss noise")
    p.add_argument("--ground-truth", action="store_true", help="score ground-truth renders (detector check)")
    p.add_argument("--reconstruct", action="store_true", help="score ground-truth renders through the tokenizer")
    p.add_argument("--decoder-text", choices=["caption", "next", "empty"], default="caption",
                   help="--reconstruct: the decoder reads each scene's caption, the next scene's, or \"\"")
    p.add_argument("--details", help="write per-prompt results to this .jsonl")
    p.add_argument("--save", metavar="DIR", help="write the scored images to DIR/<category>/<i>_<ok|miss>.png")
    sub.add_parser("context", parents=[common, world], help="does a MaskGen read the visible tokens? (shapes world)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    rank, _, device = train_common.setup_distributed(args.device or "auto")  # joins torchrun's process group
    res, title = dict(recon=cmd_recon, gen=cmd_gen, shapes=cmd_shapes, context=cmd_context)[args.cmd](args, device)
    if rank == 0:
        write_report(res, args.out or os.path.join("out", "eval", args.cmd), title)
    train_common.teardown()
    return res


if __name__ == "__main__":
    try:
        main()
    except (ImportError, FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"evaluate.py: error: {e}")

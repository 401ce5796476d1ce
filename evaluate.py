"""
Evaluation: the paper's metrics, in plain code, and a command line around them.

Paper §5.1 ("Evaluation metrics") and appendix E: the tokenizer is scored by
reconstruction FID (rFID) and Inception Score (IS) on ImageNet-val, zero-shot with
the caption "A photo of a {class}."; the generator by FID on MJHQ-30K / COCO-30K and
by GenEval, a compositional (object / count / colour / position) benchmark. Here:

  * FID / IS features come from the standard FID Inception-v3 (the TF-2015 graph,
    as ported by torch-fidelity, an optional dependency) so numbers are comparable
    with the literature. The maths on top -- Fréchet distance, Inception Score -- is
    written out below.
  * PSNR, codebook usage and perplexity (VQ tokenizers).
  * CLIP score with open_clip.
  * The shapes-world compositional score: a GenEval stand-in for the project's own
    64x64 world (data.py), with a rule-based detector instead of an object detector.

Public API (the maths is framework-light: numpy float64 where precision matters):
    frechet_distance(mu1, sigma1, mu2, sigma2)      feature_stats(features) -> (mu, sigma)
    inception_score(logits, splits=1) -> (mean, std)
    psnr(a, b) -> (B,)                              CodebookCounter(size).update(ids).result()
    inception_extractor(device) -> callable(uint8 (B,3,H,W)) -> (feats (B,2048), logits (B,1008))
    CLIPScorer(model_name, pretrained)(images, prompts) -> (B,)
    detect_shapes(image uint8 (H,W,3)) -> [Detection]   shapes_score(images, prompts) -> dict
    evaluate_reconstruction(...), evaluate_generation(...)
CLI (each writes <out>.json and a readable table <out>.txt; default out/eval/<cmd>):
    python evaluate.py recon  --tokenizer DIR_OR_RUN --data IMAGENET_VAL_DIR --class-names classes.txt
    python evaluate.py gen    --images GEN_DIR --ref REF_DIR|ref_stats.npz [--clip --prompts prompts.txt]
    python evaluate.py shapes [--generator CKPT] [--n-per-category 300]   # default: shipped checkpoint
    python evaluate.py shapes --images SAMPLE_DIR | --ground-truth | --reconstruct
    torchrun --nproc_per_node=8 evaluate.py ...     # images / prompts sharded over ranks, features gathered
"""

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

# The shapes world's palette and caption grammar: data.py holds the one spec.
from data import CATEGORIES, COLORS, HELDOUT_SEED, parse_caption

# -----------------------------------------------------------------------------
# Fréchet Inception Distance (Heusel et al. 2017).
#
# Fit a Gaussian to each set of Inception features; FID is the Fréchet (2-Wasserstein)
# distance between the two Gaussians:
#     d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1 S2)^{1/2} )


def feature_stats(features):
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2 to fit a Gaussian, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(s):
    """Symmetric square root of a PSD matrix via its eigen-decomposition S = V diag(w) V^T.
    Tiny negative eigenvalues (round-off in a rank-deficient covariance) are clipped to 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1, s2):
    """tr((S1 S2)^{1/2}) for PSD S1, S2, without a general (non-symmetric) sqrtm.

    S1 S2 is not symmetric, but it is similar to the symmetric PSD matrix
    M = S1^{1/2} S2 S1^{1/2}  (S1 S2 = S1^{1/2} M S1^{-1/2}), so both have the same
    eigenvalues, all real and >= 0, and tr((S1 S2)^{1/2}) = sum_i sqrt(eig_i(M)).
    Two symmetric eigen-decompositions: stable, real, and no NaN for singular inputs
    (scipy.linalg.sqrtm of S1 S2 can return complex or inf values there).
    """
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    m = 0.5 * (m + m.T)  # symmetrise away round-off
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID between N(mu1, sigma1) and N(mu2, sigma2); mu: (D,), sigma: (D, D).

    eps: like the reference pytorch-fid, when a covariance is numerically singular
    (e.g. fewer samples than the 2048 feature dimensions) eps * I is added to both.
    Our eigen route would not NaN without it; the offset keeps numbers close to
    pytorch-fid's in that regime. pytorch-fid offsets only inside the square root,
    which leaves a -2 * eps * D bias (identical statistics score -0.004 at D = 2048);
    we offset both covariances everywhere, i.e. compute the exact distance between
    the two slightly widened Gaussians, so identical statistics still give 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    singular = any(np.linalg.eigvalsh(s).min() <= eps * max(1.0, np.abs(s).max()) for s in (s1, s2))
    if singular:
        s1, s2 = s1 + eps * np.eye(s1.shape[0]), s2 + eps * np.eye(s1.shape[0])
    tr_covmean = trace_sqrt_product(s1, s2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# -----------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016): exp( E_x KL( p(y|x) || p(y) ) ).
# High when each image is confidently one class (sharp p(y|x)) and the classes
# are diverse (broad marginal p(y)). Bounded by the number of classes.


def inception_score(logits=None, probs=None, splits=1):
    """logits (N, C) -- or probs (N, C) -- -> (mean, std) of the IS over `splits` chunks.

    splits=1 is the official TA-TiTok evaluator (one score over all images); the
    Salimans / torch-fidelity convention is 10 splits (report the mean and std).
    """
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits= or probs=")
    if logits is not None:
        p = torch.as_tensor(logits, dtype=torch.float64).softmax(dim=1)
    else:
        p = torch.as_tensor(probs, dtype=torch.float64)
    n = p.shape[0]
    if n < splits:
        raise ValueError(f"{n} samples cannot be cut into {splits} splits")
    scores = []
    for i in range(splits):
        chunk = p[i * n // splits : (i + 1) * n // splits]  # (n_i, C)
        marginal = chunk.mean(dim=0, keepdim=True)  # p(y): (1, C)
        # KL(p(y|x) || p(y)) = sum_y p log p - p log p(y); xlogy makes 0 log 0 = 0
        # exactly, so one-hot predictions need no epsilon.
        kl = (torch.special.xlogy(chunk, chunk) - torch.special.xlogy(chunk, marginal)).sum(dim=1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# PSNR and codebook statistics.


def psnr(a, b, data_range=1.0):
    """Peak signal-to-noise ratio per image: 10 log10(range^2 / MSE). a, b: (B, C, H, W).
    Identical images would give +inf; the MSE is floored at 1e-10 * range^2 (100 dB)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10 * data_range**2)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


class CodebookCounter:
    """How a VQ tokenizer uses its codebook, accumulated over batches.

    usage      = fraction of codes chosen at least once (official evaluator's "CodebookUsage");
    perplexity = exp(entropy of the code frequencies): the "effective number" of codes --
                 equal to the codebook size when every code is used equally often.
    """

    def __init__(self, codebook_size):
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)

    def update(self, ids):
        ids = torch.as_tensor(ids).flatten().long().cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.counts.numel()):
            raise ValueError(f"code ids must lie in [0, {self.counts.numel()}), got [{ids.min()}, {ids.max()}]")
        self.counts += torch.bincount(ids, minlength=self.counts.numel()).double()
        return self

    def result(self):
        counts = self.counts
        if dist.is_available() and dist.is_initialized():  # sum over ranks
            counts = counts.clone().to(_dist_device())
            dist.all_reduce(counts)
            counts = counts.cpu()
        total = counts.sum().item()
        if total == 0:
            raise ValueError("no code ids were counted")
        p = counts / total
        entropy = -torch.special.xlogy(p, p).sum().item()  # nats
        return dict(
            codebook_usage=float((counts > 0).double().mean()),
            codebook_perplexity=math.exp(entropy),
            codebook_entropy_bits=entropy / math.log(2),
        )


# -----------------------------------------------------------------------------
# Feature extraction: the FID Inception network (via torch-fidelity), sharded over ranks.


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> uint8 [0, 255], rounded. (The official evaluator
    truncates with .to(uint8), which biases every pixel down by half a level.)"""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def inception_extractor(device="cpu", weights_path=None):
    """The standard FID Inception-v3 as a callable: uint8 (B,3,H,W) -> (feats (B,2048), logits (B,1008)).

    Features are the 2048-d pool3 activations (FID); logits are the 1008-way
    "logits_unbiased" of the TF graph (IS), both exactly as torch-fidelity / the
    official evaluator use them. Inputs of any size are resized to 299 inside, with
    the TF-1 bilinear resize the reference numbers were computed with.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError(
            "FID and Inception Score need the standard FID Inception network from torch-fidelity, "
            "which is not installed. Fix: `pip install torch-fidelity` (an optional dependency; "
            "the rest of evaluate.py works without it), or pass --no-fid."
        ) from e
    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        )
    except Exception as e:  # first use downloads the weights from GitHub
        raise RuntimeError(
            f"could not load the FID Inception weights ({e}). Fix: run once with internet access (torch-fidelity "
            "caches them under $TORCH_HOME/hub/checkpoints), or pass --inception-weights "
            "weights-inception-2015-12-05-6726825d.pth"
        ) from e
    net = net.to(device).eval()

    @torch.no_grad()
    def extract(images_uint8):
        feats, logits = net(images_uint8.to(device))
        return feats, logits

    return extract


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dist_device():
    # NCCL only moves CUDA tensors; gloo (CPU runs) moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(x):
    """Concatenate every rank's (n_r, ...) tensor along dim 0 (rank order); a no-op
    without torch.distributed. Ranks may hold different n_r: pad, all_gather, trim."""
    rank, world = _dist_info()
    if world == 1:
        return x
    dev = _dist_device()
    x = x.to(dev)
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).cpu()


class FeatureBank:
    """Collects (features, logits) batch by batch on this rank; .gather() joins all ranks."""

    def __init__(self, extractor):
        self.extractor, self.feats, self.logits = extractor, [], []

    def add(self, images):  # (B, 3, H, W) float in [0, 1]
        f, l = self.extractor(to_uint8(images))
        self.feats.append(f.detach().float().cpu())
        self.logits.append(l.detach().float().cpu())

    def gather(self):
        f = torch.cat(self.feats) if self.feats else torch.zeros(0, 1)
        l = torch.cat(self.logits) if self.logits else torch.zeros(0, 1)
        return gather_rows(f).numpy(), gather_rows(l).numpy()


# -----------------------------------------------------------------------------
# CLIP score: how well an image matches its prompt, by CLIP embedding similarity.


class CLIPScorer:
    """CLIP score = 100 * max(cos(image embedding, text embedding), 0), per image
    (the torchmetrics / T2I-literature convention; Hessel et al.'s CLIPScore uses
    2.5 instead of 100).

    Default model: OpenAI ViT-L/14 through open_clip (downloads on first use on a
    user's machine); its weights were trained with QuickGELU, so that is forced.
    Tests inject a tiny random open_clip model: CLIPScorer(model=..., tokenizer=...).
    """

    def __init__(self, model_name="ViT-L-14", pretrained="openai", device="cpu", model=None, tokenizer=None):
        import open_clip

        if model is None:
            model = open_clip.create_model(
                model_name, pretrained=pretrained, force_quick_gelu=(pretrained == "openai"), device=device
            )
            tokenizer = open_clip.get_tokenizer(model_name)
        if tokenizer is None:
            ctx = getattr(model, "context_length", 77)
            tokenizer = lambda texts: open_clip.tokenize(texts, context_length=ctx)  # noqa: E731
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, device
        size = model.visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images: (B, 3, H, W) in [0, 1]; prompts: B strings -> (B,) scores."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        x = images.to(self.device).float()
        # Bicubic resize to CLIP's input size (our images are square; others are
        # squashed, which is fine for a similarity score), then CLIP normalisation.
        x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        img = F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)  # (B, E)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return 100.0 * (img * txt).sum(dim=-1).clamp_min(0).cpu()


# -----------------------------------------------------------------------------
# The shapes world's compositional score (issue 6): a rule-based detector.
#
# The world is simple enough to "detect" objects by colour: every object is one
# exact palette colour on white. Per palette colour: pixel mask -> connected
# components -> shape from the component's geometry -> position = its centroid.


@dataclass
class Detection:
    color: str
    shape: str
    cx: float  # centroid, pixels (x to the right, y down)
    cy: float
    area: int  # pixels
    bbox: tuple  # (x0, y0, x1, y1), inclusive
    fill: float  # area / bbox area: square 1.0, circle ~0.79 (pi/4), triangle ~0.55 (1/2 + the apex rows)


def label_components(mask):
    """4-connected components of a boolean (H, W) mask, numpy only.

    Every foreground pixel starts with its own label (its flat index); each sweep
    replaces a label by the smallest label among itself and its 4 foreground
    neighbours, until nothing changes. A component ends up labelled with its
    smallest index. Sweeps needed <= the longest path inside a component (a few
    dozen for our objects), each a handful of vectorised array ops.
    Returns (labels (H, W) int, 0 = background, 1..n; n).
    """
    H, W = mask.shape
    big = H * W + 1
    lab = np.where(mask, np.arange(1, H * W + 1).reshape(H, W), big)
    while True:
        new = lab.copy()
        new[1:, :] = np.minimum(new[1:, :], lab[:-1, :])  # from the pixel above
        new[:-1, :] = np.minimum(new[:-1, :], lab[1:, :])  # from below
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])  # from the left
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])  # from the right
        new[~mask] = big  # background never joins anything
        if np.array_equal(new, lab):
            break
        lab = new
    roots = np.unique(lab[mask])
    out = np.zeros((H, W), dtype=np.int64)
    out[mask] = np.searchsorted(roots, lab[mask]) + 1
    return out, len(roots)


def classify_shape(comp):
    """Shape of one component, from a boolean mask cropped to its bounding box (h, w).

    Corner patches (side = a quarter of the box) and row widths tell the three apart:
      * an upright triangle has empty top corners, full bottom corners, and rows that
        widen downwards: triangle_score = (bottom - top corner coverage)
        + (bottom - top quarter mean row width) / w is ~1.5 for a triangle, ~0 otherwise;
      * a square fills its box and its corners, a circle fills pi/4 of it and leaves
        the corners mostly empty: square_score = corner coverage + fill / 2 is ~1.5
        for a square, ~0.6 for a circle.
    Thresholds sit midway between the classes' ranges measured on renders blurred
    (Gaussian sigma up to 1.2 px) and noised (std up to 12 levels) -- a stand-in for a
    generator's imperfect output -- where this rule made no errors on ~3000 objects.
    Returns (shape name, fill ratio).
    """
    h, w = comp.shape
    fill = float(comp.mean())
    c = max(2, min(h, w) // 4)
    top = (comp[:c, :c].mean() + comp[:c, -c:].mean()) / 2
    bottom = (comp[-c:, :c].mean() + comp[-c:, -c:].mean()) / 2
    widths = comp.sum(axis=1)  # (h,) pixels per row
    q = max(1, h // 4)
    widening = (widths[-q:].mean() - widths[:q].mean()) / w
    if (bottom - top) + widening > 0.85:
        return "triangle", fill
    if (top + bottom) / 2 + fill / 2 > 0.875:
        return "square", fill
    return "circle", fill


def detect_shapes(image, tol=60.0, min_area=40, white=230):
    """Objects in a shapes-world image. image: uint8 (H, W, 3) -> list[Detection].

    tol: max RGB distance from a palette colour for a pixel to count as that colour.
      The closest two palette colours (blue, purple) are ~115 apart, so 60 is
      unambiguous, while tolerating antialiased edges and a generator's colour drift.
    min_area: components smaller than this are noise (the smallest real object, a
      16 px triangle, covers ~130 px at 64x64); scaled with the image area.
    white: pixels with every channel >= this are background.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    H, W = img.shape[:2]
    min_area = min_area * (H * W) / (64 * 64)
    x = img.astype(np.float32)
    names = list(COLORS)
    pal = np.array([COLORS[n] for n in names], dtype=np.float32)  # (6, 3)
    d = np.linalg.norm(x[:, :, None, :] - pal[None, None], axis=-1)  # (H, W, 6)
    nearest = d.argmin(axis=-1)  # (H, W)
    fg = (d.min(axis=-1) < tol) & ~(img >= white).all(axis=-1)
    out = []
    for ci, name in enumerate(names):
        labels, n = label_components(fg & (nearest == ci))
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            if len(ys) < min_area:
                continue
            y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
            shape, fill = classify_shape(labels[y0 : y1 + 1, x0 : x1 + 1] == k)
            bbox = (int(x0), int(y0), int(x1), int(y1))
            out.append(Detection(name, shape, float(xs.mean()), float(ys.mean()), len(ys), bbox, fill))
    return out


# Relations: which coordinate, and which sign of (A - B) along it, makes "A rel B" true.
RELATION_AXES = {"to the left of": ("x", -1), "to the right of": ("x", +1), "above": ("y", -1), "below": ("y", +1)}


def check_prompt(dets, spec, margin=4.0):
    """Do detections satisfy a parsed caption (data.CaptionSpec)? Exact matching:
    the image must hold exactly the prompted objects -- none missing, none extra --
    with the right colours, shapes and count; for a relation the subject's centroid
    must lie beyond the reference's by more than `margin` px along the relation's
    axis (like GenEval, the other axis is not checked). Returns (ok, reason)."""
    want = [tuple(o) for o in spec.objects for _ in range(spec.count)]
    got = [(d.color, d.shape) for d in dets]
    if len(got) != len(want):
        return False, f"found {len(got)} objects, expected {len(want)}"
    if sorted(got) != sorted(want):
        return False, f"found {sorted(got)}, expected {sorted(want)}"
    if spec.relation is None:
        return True, "ok"
    # Subject and reference differ in colour or shape (data.py's rule), so each
    # matches exactly one detection.
    a, b = (next(d for d in dets if (d.color, d.shape) == tuple(o)) for o in spec.objects)
    axis, sign = RELATION_AXES[spec.relation]
    delta = (a.cx - b.cx) if axis == "x" else (a.cy - b.cy)
    if sign * delta > margin:
        return True, "ok"
    return False, f"relation '{spec.relation}' not satisfied ({axis}: subject - reference = {delta:+.1f} px)"


def shapes_score(images, prompts, return_details=False, **detect_kw):
    """The compositional score of images against their prompts.

    images: list of uint8 (H, W, 3) arrays; prompts: list of captions (same length).
    Returns {"single": acc, "count": acc, "relation": acc, "overall": mean over the
    categories present (GenEval's "overall"), "n": {category: count}}; with
    return_details, also "per_prompt": [{prompt, category, correct, reason, detections}].
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    hits, details = {}, []
    for img, prompt in zip(images, prompts):
        spec = parse_caption(prompt)
        dets = detect_shapes(img, **detect_kw)
        ok, why = check_prompt(dets, spec)
        hits.setdefault(spec.category, []).append(ok)
        if return_details:
            details.append(dict(prompt=prompt, category=spec.category, correct=ok, reason=why,
                                detections=[asdict(d) for d in dets]))  # fmt: skip
    cats = [c for c in CATEGORIES if c in hits]
    res = {c: float(np.mean(hits[c])) for c in cats}
    res["overall"] = float(np.mean(list(res.values()))) if res else float("nan")
    res["n"] = {c: len(hits[c]) for c in cats}
    if return_details:
        res["per_prompt"] = details
    return res


# -----------------------------------------------------------------------------
# Evaluation loops (framework: batches in, a dict of metrics out).


@torch.no_grad()
def evaluate_reconstruction(tokenizer, text_encoder, batches, extractor=None, is_splits=1):
    """Tokenizer reconstruction metrics over this rank's batches (all ranks joined).

    batches: iterable of (images (B,3,S,S) float [0,1], captions list[str]).
    The text-aware decoder reads the captions' CLIP states. KL tokenizers decode the
    posterior mean (encode() returns it), VQ tokenizers their code ids.
    Returns rFID, IS (of the reconstructions), PSNR, and codebook usage/perplexity (VQ).
    """
    device = next(tokenizer.parameters()).device
    vq = tokenizer.config.quantize_mode == "vq"
    real_bank, fake_bank = (FeatureBank(extractor), FeatureBank(extractor)) if extractor else (None, None)
    counter = CodebookCounter(tokenizer.config.codebook_size) if vq else None
    psnrs = []
    for images, captions in batches:
        images = images.to(device)
        tokens = tokenizer.encode(images)  # VQ (B, K) ids | KL (B, K, C) mean
        recon = tokenizer.decode(tokens, text_encoder(list(captions)).final.to(device)).float().clamp(0, 1)
        # PSNR on the 8-bit images one would save, i.e. after rounding both to 256 levels.
        psnrs.append(psnr(to_uint8(images).float() / 255, to_uint8(recon).float() / 255).cpu())
        if counter is not None:
            counter.update(tokens)
        if extractor is not None:
            real_bank.add(images)
            fake_bank.add(recon)
    res = {}
    local = torch.cat(psnrs) if psnrs else torch.zeros(0, dtype=torch.float64)  # a rank may get no images
    p = gather_rows(local[:, None].float())[:, 0]
    res["num_images"] = int(p.numel())
    res["psnr"] = float(p.mean())
    if counter is not None:
        res.update(counter.result())
    if extractor is not None:
        fr, _ = real_bank.gather()
        ff, lf = fake_bank.gather()
        res["rfid"] = frechet_distance(*feature_stats(fr), *feature_stats(ff))
        res["inception_score"], res["inception_score_std"] = inception_score(lf, splits=is_splits)
    return res


@torch.no_grad()
def evaluate_generation(gen_batches, extractor=None, ref_batches=None, ref_stats=None, clip_scorer=None,
                        is_splits=1):  # fmt: skip
    """Generator metrics: FID against a reference set (its batches, or saved (mu, sigma)),
    IS of the generated images, and the CLIP score when a scorer is given.

    gen_batches: iterable of (images (B,3,H,W) float [0,1], prompts list[str]).
    ref_batches: iterable of (images, anything). Returns (metrics dict, ref (mu, sigma)).
    """
    bank = FeatureBank(extractor) if extractor else None
    clip = []
    for images, prompts in gen_batches:
        if bank is not None:
            bank.add(images)
        if clip_scorer is not None:
            clip.append(clip_scorer(images, prompts).float())
    res = {}
    stats = ref_stats
    if bank is not None:
        feats, logits = bank.gather()
        res["num_images"] = int(feats.shape[0])
        if stats is None:
            if ref_batches is None:
                raise ValueError("FID needs a reference: pass ref_batches or ref_stats")
            ref = FeatureBank(extractor)
            for images, _ in ref_batches:
                ref.add(images)
            stats = feature_stats(ref.gather()[0])
        res["fid"] = frechet_distance(*feature_stats(feats), *stats)
        res["inception_score"], res["inception_score_std"] = inception_score(logits, splits=is_splits)
    if clip_scorer is not None:
        scores = gather_rows((torch.cat(clip) if clip else torch.zeros(0))[:, None])[:, 0]
        res["clip_score"] = float(scores.mean())
        res["num_images"] = int(scores.numel())
    return res, stats


# -----------------------------------------------------------------------------
# Image folders, prompts and reports (the CLI's plumbing).

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder):
    """Every image file under folder (recursively), sorted: a stable order for sharding."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    files = sorted(
        os.path.join(root, f)
        for root, _, fs in os.walk(folder)
        for f in fs
        if f.lower().endswith(IMAGE_EXTS) and f != "grid.png"  # sample.py's overview grid is no sample
    )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) found under {folder!r}")
    return files


def load_image(path, size=None):
    """-> float tensor (3, S, S) in [0, 1]: shorter side resized to `size` (bicubic),
    centre-cropped (the ImageNet-val protocol); size=None keeps the image as is."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


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


_PROMPT_INDEX = {}


def _prompt_index(path):
    """sample.py's prompts.jsonl ({"index", "prompt"} per line) -> {index: prompt}, read once."""
    if path not in _PROMPT_INDEX:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        _PROMPT_INDEX[path] = {r["index"]: r["prompt"] for r in rows}
    return _PROMPT_INDEX[path]


def prompt_for(path, prompts_by_index=None, index=None, class_names=None, class_dirs=None):
    """The caption of an image: a sidecar <stem>.txt; else GenEval's layout
    (<dir>/<k>/samples/x.png with <dir>/<k>/metadata.jsonl); else sample.py's layout
    (<dir>/<prompt>_s<seed>.png with <dir>/prompts.jsonl); else the --prompts line;
    else "A photo of a {class}." from its class folder; else ""."""
    side = os.path.splitext(path)[0] + ".txt"
    if os.path.exists(side):
        with open(side) as f:
            return f.read().strip()
    meta = os.path.join(os.path.dirname(os.path.dirname(path)), "metadata.jsonl")
    if os.path.basename(os.path.dirname(path)) == "samples" and os.path.exists(meta):
        with open(meta) as f:
            return json.loads(f.readline())["prompt"]
    m = re.fullmatch(r"(\d+)_s\d+(?:_aes[\d.]+)?", os.path.splitext(os.path.basename(path))[0])
    index_file = os.path.join(os.path.dirname(path), "prompts.jsonl")
    if m and os.path.exists(index_file):  # sample.py's layout: <prompt>_s<seed>.png + prompts.jsonl
        return _prompt_index(index_file)[int(m.group(1))]
    if prompts_by_index is not None:
        return prompts_by_index[index]
    if class_names is not None:
        folder = os.path.basename(os.path.dirname(path))
        name = class_names.get(folder) or class_names.get(str(class_dirs.index(folder)) if folder in class_dirs else "")
        if name:
            return f"A photo of a {name}."  # the paper's zero-shot ImageNet caption
    return ""


def folder_batches(files, batch_size, size=None, prompts=None, class_names=None):
    """Yield (images (B,3,S,S), captions) over this rank's share of `files` (rank::world)."""
    rank, world = _dist_info()
    class_dirs = sorted({os.path.basename(os.path.dirname(f)) for f in files})
    mine = list(range(len(files)))[rank::world]
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        imgs = [load_image(files[j], size) for j in idx]
        if len({tuple(t.shape) for t in imgs}) > 1:
            raise ValueError("images differ in size; pass --size to resize and centre-crop them")
        caps = [prompt_for(files[j], prompts, j, class_names, class_dirs) for j in idx]
        yield torch.stack(imgs), caps


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


def _setup_device(requested=None):
    """Join torchrun's process group if launched by it; pick the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            return torch.device("cuda", torch.cuda.current_device())
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# -----------------------------------------------------------------------------
# Model loading (thin: the loaders live with the models).


def load_tokenizer_and_text(path, device):
    """A frozen tokenizer and the text encoder its decoder was trained with:
    tokenizer.load_tokenizer reads official release dirs (text: CLIP ViT-L/14-336)
    and our train_tokenizer.py runs (text: the tower saved inside)."""
    import tokenizer as tk

    tok, text = tk.load_tokenizer(path, device)
    return tok.eval().requires_grad_(False), text.to(device)


def recon_batches(spec, batch_size, size, class_names=None):
    """(images, captions) batches for `recon`: an image folder (with sidecar .txt captions
    or ImageNet-style class folders + a class-names file) is read here; tar shards and
    everything else go through data.py's loader (one pass, centre crop, rank-sharded)."""
    if os.path.isdir(spec) and not any(n.endswith((".tar", ".tar.gz", ".tgz")) for n in os.listdir(spec)):
        yield from folder_batches(list_images(spec), batch_size, size, class_names=class_names)
        return
    import data

    rank, world = _dist_info()
    loader = data.image_text_loader(spec, size, batch_size, rank=rank, world_size=world, train=False)
    for batch in loader:
        yield batch["image"], list(batch["caption"])


def generate_shapes_images(prompts, generator=None, tokenizer=None, device="cpu", seed=0, batch_size=50,
                           num_steps=None, guidance_scale=None):  # fmt: skip
    """Images for `prompts` from a MaskGen + TA-TiTok pair, loaded and sampled by sample.py
    (generator=None: the shipped checkpoints/shapes.pt). Under torchrun every rank draws
    prompts rank::world and rank 0 gets all images back, in prompt order.
    Returns a list of uint8 (H, W, 3) arrays (complete on rank 0)."""
    import sample

    models = sample.load_models(generator, tokenizer, device)
    aesthetic = models.generator.config.aesthetic
    opts = dict(num_steps=num_steps, guidance_scale=guidance_scale, guidance_schedule=None,
                randomize_temperature=None, temperature=None)  # fmt: skip
    rank, world = _dist_info()
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
    tok, text = load_tokenizer_and_text(args.tokenizer, device)
    size = args.size or tok.config.image_size
    extractor = None if args.no_fid else inception_extractor(device, args.inception_weights)
    batches = recon_batches(args.data, args.batch_size, size, class_names)
    if args.limit:  # the first N batches' worth, per rank
        batches = (b for b, _ in zip(batches, range(-(-args.limit // args.batch_size))))
    res = evaluate_reconstruction(tok, text, batches, extractor, args.is_splits)
    return res, f"reconstruction: {args.tokenizer} on {args.data}"


def cmd_gen(args, device):
    files = list_images(args.images)[: args.limit]
    prompts = None
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [ln.rstrip("\n") for ln in f if ln.strip()]
        if len(prompts) < len(files):
            raise ValueError(
                f"--prompts has {len(prompts)} lines for {len(files)} images (one line per image, sorted file order)"
            )
    extractor = None if args.no_fid else inception_extractor(device, args.inception_weights)
    ref_batches, ref_stats = None, None
    if extractor is not None:
        if args.ref is None:
            raise ValueError("gFID needs --ref (a folder of reference images or a .npz with mu, sigma), or --no-fid")
        if args.ref.endswith(".npz"):
            z = np.load(args.ref)
            ref_stats = (z["mu"], z["sigma"])
        else:
            ref_batches = folder_batches(list_images(args.ref)[: args.ref_limit], args.batch_size, args.size)
    clip = CLIPScorer(args.clip_model, args.clip_pretrained, device) if args.clip else None
    gen = folder_batches(files, args.batch_size, args.size, prompts=prompts)
    res, stats = evaluate_generation(gen, extractor, ref_batches, ref_stats, clip, args.is_splits)
    if args.save_ref_stats and stats is not None and _dist_info()[0] == 0:
        np.savez(args.save_ref_stats, mu=stats[0], sigma=stats[1])
        print(f"saved reference statistics to {args.save_ref_stats}")
    return res, f"generation: {args.images} vs {args.ref}"


def cmd_shapes(args, device):
    if args.images:  # a folder of already generated images with their prompts
        files = list_images(args.images)
        prompts = None
        if args.prompts:
            with open(args.prompts) as f:
                prompts = [ln.rstrip("\n") for ln in f if ln.strip()]
        if prompts is not None and len(prompts) < len(files):
            raise ValueError(f"--prompts has {len(prompts)} lines for {len(files)} images (one per image, in order)")
        caps = [prompt_for(p, prompts, i) for i, p in enumerate(files)]
        images = [(load_image(p) * 255).round().byte().permute(1, 2, 0).numpy() for p in files]
        source = args.images
    else:  # held-out prompts of the shapes world, rendered (ground truth) or generated
        import data

        prompts = _heldout_prompts(data, args.n_per_category, args.seed)
        if args.ground_truth or args.reconstruct:
            images, caps = _render_ground_truth(data, args.n_per_category, args.seed)
            source = "ground-truth renders (detector sanity check)"
            if args.reconstruct:  # through the tokenizer: the ceiling for any generator on top of it
                images = _reconstruct(images, caps, args.generator, args.tokenizer, device, args.batch_size)
                source = f"ground-truth renders reconstructed by the tokenizer of {args.generator or 'checkpoints/shapes.pt'}"
        else:
            images = generate_shapes_images(prompts, args.generator, args.tokenizer, device, args.sample_seed,
                                            args.batch_size, args.steps, args.guidance_scale)  # fmt: skip
            caps, source = prompts, args.generator or "the shipped checkpoints/shapes.pt"
            if _dist_info()[0] != 0:
                return {}, source
    res = shapes_score(images, caps, return_details=bool(args.details))
    if args.details and "per_prompt" in res:
        with open(args.details, "w") as f:
            for row in res.pop("per_prompt"):
                f.write(json.dumps(row) + "\n")
    return res, f"shapes compositional score: {source}"


def _heldout_prompts(data, n_per_category, seed):
    """n held-out prompts per category from data.py (a seed no training run uses)."""
    out = data.heldout_prompts(n_per_category, seed=seed)
    return [p if isinstance(p, str) else p[0] for p in out]  # captions (or (caption, category) pairs)


def _reconstruct(images, captions, generator, tokenizer, device, batch_size):
    """Encode and decode uint8 (H, W, 3) images with the generator's tokenizer (and its
    text encoder, since the decoder is text-aware)."""
    import sample

    models = sample.load_models(generator, tokenizer, device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack(images[i : i + batch_size])).permute(0, 3, 1, 2).float().div(255).to(device)
            text = models.tok_text(captions[i : i + batch_size]).final
            recon = models.tokenizer.decode(models.tokenizer.encode(x), text)
            out += list(to_uint8(recon).permute(0, 2, 3, 1).cpu().numpy())
    return out


def _render_ground_truth(data, n_per_category, seed):
    """The held-out prompts' own ground-truth scenes, rendered: a check of the detector
    (it should score ~1.0), and the ceiling a generator is measured against."""
    world = data.ShapesWorld(seed)
    samples = [world.sample(i, cat) for cat in data.CATEGORIES for i in range(n_per_category)]
    return [s.image for s in samples], [s.caption for s in samples]


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
    p.add_argument("--tokenizer", required=True, help="official checkpoint dir or project checkpoint")
    p.add_argument("--data", required=True, help="image folder (e.g. ImageNet val with class sub-folders)")
    p.add_argument("--class-names", default=None, help="class names file -> captions 'A photo of a {class}.'")
    p.add_argument("--size", type=int, default=None, help="resize+centre-crop side (default: tokenizer's)")

    p = sub.add_parser("gen", parents=[common, fid], help="generated folder: gFID vs a reference, IS, CLIP score")
    p.add_argument("--images", required=True)
    p.add_argument("--ref", default=None, help="reference image folder, or a .npz with mu / sigma")
    p.add_argument("--ref-limit", type=int, default=None)
    p.add_argument("--save-ref-stats", default=None, help="save the reference mu / sigma to this .npz")
    p.add_argument("--size", type=int, default=None, help="resize+centre-crop side (needed if sizes differ)")
    p.add_argument("--prompts", default=None, help="prompt file, one line per image in sorted file order")
    p.add_argument("--clip", action="store_true", help="also compute the CLIP score")
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")

    p = sub.add_parser("shapes", parents=[common], help="shapes-world compositional score")
    p.add_argument("--images", default=None, help="folder of generated images (prompts as in `gen`)")
    p.add_argument("--prompts", default=None)
    p.add_argument("--generator", default=None, help="MaskGen checkpoint (default: the shipped one), via sample.py")
    p.add_argument("--tokenizer", default=None, help="TA-TiTok checkpoint (default: the one the generator records)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the generator's config)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--ground-truth", action="store_true", help="score ground-truth renders (detector check)")
    p.add_argument("--reconstruct", action="store_true",
                   help="score ground-truth renders after a trip through the tokenizer (the generator's ceiling)")
    p.add_argument("--n-per-category", type=int, default=300)
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, help="held-out prompt seed (no training run uses it)")
    p.add_argument("--sample-seed", type=int, default=0, help="generation: prompt j is sampled with seed + j")
    p.add_argument("--details", default=None, help="write per-prompt results to this .jsonl")

    args = ap.parse_args(argv)
    device = _setup_device(args.device)
    res, title = {"recon": cmd_recon, "gen": cmd_gen, "shapes": cmd_shapes}[args.cmd](args, device)
    if _dist_info()[0] == 0:
        write_report(res, args.out or os.path.join("out", "eval", args.cmd), title)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    try:
        main()
    except (ImportError, FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"evaluate.py: error: {e}")

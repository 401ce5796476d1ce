"""
The paper's evaluation metrics, in plain code: numbers in, numbers out.

Paper §5.1 ("Evaluation metrics") and appendix E: the tokenizer is scored by
reconstruction FID (rFID) and Inception Score (IS), the generator by FID against a
reference set and by CLIP score. Here:

  * FID / IS features come from the standard FID Inception-v3 (the TF-2015 graph,
    as ported by torch-fidelity, an optional dependency) so numbers are comparable
    with the literature. The maths on top -- Fréchet distance, Inception Score -- is
    written out below.
  * PSNR, codebook usage and perplexity (VQ tokenizers).
  * CLIP score with open_clip.
Under torchrun every rank scores its own images and the features are gathered.
The command line that feeds these from folders, datasets and checkpoints is evaluate.py.

Public API (framework-light: numpy float64 where precision matters):
    frechet_distance(mu1, sigma1, mu2, sigma2)      feature_stats(features) -> (mu, sigma)
    inception_score(logits, splits=1) -> (mean, std)
    psnr(a, b) -> (B,)                              CodebookCounter(size).update(ids).result()
    inception_extractor(device) -> callable(uint8 (B,3,H,W)) -> (feats (B,2048), logits (B,1008))
    CLIPScorer(model_name, pretrained)(images, prompts) -> (B,)
    evaluate_reconstruction(...), evaluate_generation(...)   batches in, a dict of metrics out
    gather_rows(x)                                  every rank's rows, joined
"""

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import train_common
from data import to_uint8

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
            counts = counts.clone().to(train_common.collective_device())
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


def gather_rows(x):
    """Concatenate every rank's (n_r, ...) tensor along dim 0 (rank order); a no-op
    without torch.distributed. Ranks may hold different n_r: pad, all_gather, trim."""
    rank, world = train_common.rank_world()
    if world == 1:
        return x
    dev = train_common.collective_device()
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
    """Collects (features, logits, group ids) batch by batch on this rank; .gather() joins
    all ranks. A group id names the category of each image (-1: none)."""

    def __init__(self, extractor):
        self.extractor, self.feats, self.logits, self.groups = extractor, [], [], []

    def add(self, images, groups=None):  # images (B, 3, H, W) float in [0, 1]; groups (B,) ids or None
        f, l = self.extractor(to_uint8(images))
        self.feats.append(f.detach().float().cpu())
        self.logits.append(l.detach().float().cpu())
        n = f.shape[0]
        self.groups.append(torch.full((n,), -1) if groups is None else torch.as_tensor(groups).long().cpu())

    def gather(self):
        f = torch.cat(self.feats) if self.feats else torch.zeros(0, 1)
        l = torch.cat(self.logits) if self.logits else torch.zeros(0, 1)
        g = torch.cat(self.groups) if self.groups else torch.zeros(0, dtype=torch.long)
        return gather_rows(f).numpy(), gather_rows(l).numpy(), gather_rows(g[:, None])[:, 0].numpy()


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
        fr, _, _ = real_bank.gather()
        ff, lf, _ = fake_bank.gather()
        res["rfid"] = frechet_distance(*feature_stats(fr), *feature_stats(ff))
        res["inception_score"], res["inception_score_std"] = inception_score(lf, splits=is_splits)
    return res


def stats_by_group(feats, groups, categories):
    """{"": (mu, sigma) of all rows} plus {name: (mu, sigma)} for each category with at
    least 2 rows (a Gaussian needs 2); groups (N,) holds row -> index into categories."""
    stats = {"": feature_stats(feats)}
    for k, name in enumerate(categories or []):
        if (groups == k).sum() >= 2:
            stats[name] = feature_stats(feats[groups == k])
    return stats


@torch.no_grad()
def evaluate_generation(gen_batches, extractor=None, ref_batches=None, ref_stats=None, clip_scorer=None,
                        is_splits=1, categories=None):  # fmt: skip
    """Generator metrics: FID against a reference set (its batches, or saved statistics),
    IS of the generated images, and the CLIP score when a scorer is given.

    gen_batches: iterable of (images (B,3,H,W) float [0,1], prompts list[str][, groups]).
    ref_batches: iterable of (images, anything[, groups]).
    categories: names for the optional groups, (B,) ids into this list (as MJHQ-30K's
        categories): then also "fid_per_category", each category's generated images
        against the same category's reference images, as MJHQ-30K reports it (a category
        with fewer than 2 images on either side has no Gaussian, so no FID: left out).
    ref_stats: {"": (mu, sigma) overall, name: (mu, sigma) per category}, as returned.
    Returns (metrics dict, the reference statistics in that form).
    """
    bank = FeatureBank(extractor) if extractor else None
    clip = []
    for images, prompts, *groups in gen_batches:
        if bank is not None:
            bank.add(images, *groups)
        if clip_scorer is not None:
            clip.append(clip_scorer(images, prompts).float())
    res = {}
    stats = ref_stats
    if bank is not None:
        feats, logits, ids = bank.gather()
        res["num_images"] = int(feats.shape[0])
        if stats is None:
            if ref_batches is None:
                raise ValueError("FID needs a reference: pass ref_batches or ref_stats")
            ref = FeatureBank(extractor)
            for images, _, *groups in ref_batches:
                ref.add(images, *groups)
            ref_feats, _, ref_ids = ref.gather()
            stats = stats_by_group(ref_feats, ref_ids, categories)
        mine = stats_by_group(feats, ids, categories)
        res["fid"] = frechet_distance(*mine[""], *stats[""])
        if categories:
            res["fid_per_category"] = {c: frechet_distance(*mine[c], *stats[c]) for c in categories if c in mine and c in stats}
            res["num_images_per_category"] = {c: int((ids == k).sum()) for k, c in enumerate(categories)}
        res["inception_score"], res["inception_score_std"] = inception_score(logits, splits=is_splits)
    if clip_scorer is not None:
        scores = gather_rows((torch.cat(clip) if clip else torch.zeros(0))[:, None])[:, 0]
        res["clip_score"] = float(scores.mean())
        res["num_images"] = int(scores.numel())
    return res, stats

"""Tests for metrics.py and evaluate.py: the metric maths against closed forms, the pipelines on a
tiny folder with a stand-in feature extractor, and the shapes-world command line
(the detector itself is tested in test_shapes.py)."""

import json
import math
import sys

import numpy as np
import pytest
import torch

import evaluate as E
import metrics


# ---------------------------------------------------------------------------- FID


def test_frechet_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = metrics.feature_stats(rng.normal(size=(500, 32)))
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_gaussians_match_closed_form():
    # For diagonal covariances (S1 S2)^{1/2} = diag(s1 * s2), so
    # FID = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2 with s the standard deviations.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_non_diagonal_against_rotation_invariance():
    # Rotating both Gaussians by the same orthogonal matrix leaves the distance unchanged.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    rot = lambda s: q @ np.diag(s**2) @ q.T  # noqa: E731
    want = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert metrics.frechet_distance(q @ mu1, rot(s1), q @ mu2, rot(s2)) == pytest.approx(want, rel=1e-8)


def test_frechet_singular_covariances_no_nan():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 64)), rng.normal(size=(7, 64)) + 1  # N << D: rank-deficient
    d = metrics.frechet_distance(*metrics.feature_stats(a), *metrics.feature_stats(b))
    assert math.isfinite(d) and d > 0
    zero = np.zeros((4, 4))  # fully degenerate: two point masses at distance 2
    assert metrics.frechet_distance(np.zeros(4), zero, np.full(4, 1.0), zero) == pytest.approx(4.0, abs=1e-4)


# ---------------------------------------------------------------------------- IS, PSNR, codebook


def test_inception_score_closed_forms():
    assert metrics.inception_score(logits=np.tile(np.array([[3.0, 1.0, -2.0]]), (10, 1)))[0] == pytest.approx(1.0)
    for n in (2, 7, 50):
        assert metrics.inception_score(probs=np.eye(n))[0] == pytest.approx(n)
    mean, std = metrics.inception_score(probs=np.tile(np.eye(5), (4, 1)), splits=4)  # each split sees 5 classes
    assert (mean, std) == (pytest.approx(5.0), pytest.approx(0.0, abs=1e-9))


def test_psnr_by_hand():
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0] = 0.5  # MSE = 0.25 / 48
    assert metrics.psnr(a, b).item() == pytest.approx(10 * math.log10(1 / (0.25 / 48)))
    c = torch.full((2, 3, 8, 8), 100.0)
    d = torch.full((2, 3, 8, 8), 110.0)  # MSE = 100 on a 255 range
    assert metrics.psnr(c, d, data_range=255).tolist() == pytest.approx([10 * math.log10(255**2 / 100)] * 2)


def test_codebook_usage_and_perplexity():
    k = 64
    res = metrics.CodebookCounter(k).update(torch.arange(k).repeat(3)).result()  # uniform usage
    assert res["codebook_perplexity"] == pytest.approx(k)
    assert res["codebook_usage"] == 1.0 and res["codebook_entropy_bits"] == pytest.approx(6.0)
    res = metrics.CodebookCounter(k).update(torch.tensor([5, 5, 5, 9])).result()
    p = np.array([0.75, 0.25])
    assert res["codebook_usage"] == 2 / k
    assert res["codebook_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    with pytest.raises(ValueError, match="code ids"):
        metrics.CodebookCounter(4).update(torch.tensor([4]))


# ---------------------------------------------------------------------------- extractor, pipelines


def test_fid_without_torch_fidelity_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity...` fail
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        metrics.inception_extractor()


def stand_in_extractor():
    """A deterministic stand-in for the Inception net: uint8 images -> (48-d, 10-way)."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(48, 10, generator=g)

    def extract(x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)  # (B, 48)
        return f, 5 * f @ proj

    return extract


def write_folder(path, n, seed, size=32):
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(f"a red circle {i}")
    return path


def test_gen_cli_on_tiny_folders(tmp_path, monkeypatch):
    gen, ref = write_folder(tmp_path / "gen", 12, 0), write_folder(tmp_path / "ref", 12, 1)
    monkeypatch.setattr(E, "inception_extractor", lambda *a, **k: stand_in_extractor())
    out = tmp_path / "res" / "gen"
    res = E.main(["gen", "--images", str(gen), "--ref", str(ref), "--out", str(out), "--batch-size", "5",
                  "--save-ref-stats", str(tmp_path / "ref.npz"), "--device", "cpu"])  # fmt: skip
    assert res["num_images"] == 12 and res["fid"] > 0 and res["inception_score"] >= 1.0
    assert json.loads((tmp_path / "res" / "gen.json").read_text())["fid"] == pytest.approx(res["fid"])
    assert "fid" in (tmp_path / "res" / "gen.txt").read_text()
    # Same folder against its own saved statistics: FID 0.
    res2 = E.main(["gen", "--images", str(ref), "--ref", str(tmp_path / "ref.npz"), "--out", str(out),
                   "--device", "cpu"])  # fmt: skip
    assert res2["fid"] == pytest.approx(0.0, abs=1e-6)


def test_clip_score_with_tiny_model():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
        text_cfg=open_clip.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    )
    scorer = metrics.CLIPScorer(model=model)
    s = scorer(torch.rand(3, 3, 64, 64), ["a red circle", "two blue squares", "a cat"])
    assert s.shape == (3,) and (s >= 0).all() and (s <= 100).all()
    with pytest.raises(ValueError, match="prompts"):
        scorer(torch.rand(2, 3, 32, 32), ["one"])


@pytest.mark.parametrize("preset", ["tiny", "tiny_kl"])
def test_reconstruction_pipeline_tiny_tokenizer(preset):
    import tokenizer as tk
    from text import TEXT_PRESETS, TextEncoder

    torch.manual_seed(0)
    tok = tk.TATiTok(tk.PRESETS[preset]).eval()
    text = TextEncoder.from_config(**TEXT_PRESETS["tiny"])
    imgs = torch.rand(6, 3, 32, 32)
    batches = [(imgs[:4], ["a red circle"] * 4), (imgs[4:], ["two blue squares"] * 2)]
    res = metrics.evaluate_reconstruction(tok, text, batches, stand_in_extractor())
    assert res["num_images"] == 6 and math.isfinite(res["rfid"]) and math.isfinite(res["psnr"])
    assert res["inception_score"] >= 1.0
    if preset == "tiny":
        assert 0 < res["codebook_usage"] <= 1 and 1 <= res["codebook_perplexity"] <= 64
    else:
        assert "codebook_usage" not in res


# ---------------------------------------------------------------------------- shapes world


def test_shapes_cli_ground_truth_and_folder(tmp_path):
    from PIL import Image

    import shapes

    res = E.main(["shapes", "--ground-truth", "--n-per-category", "10", "--out", str(tmp_path / "gt")])
    assert res["overall"] == 1.0 and res["n"] == {"single": 10, "count": 10, "relation": 10}
    # The ground-truth scenes are those of the held-out prompts.
    truth = shapes.heldout_samples(3, shapes.HELDOUT_SEED)
    assert [s.caption for s in truth] == shapes.heldout_prompts(3, shapes.HELDOUT_SEED)
    # A folder of images with sidecar captions (what sample.py-style outputs look like).
    folder = tmp_path / "imgs"
    folder.mkdir()
    world = shapes.ShapesWorld(3)
    for i, s in enumerate(world.sample(j, cat) for cat in shapes.CATEGORIES for j in range(2)):
        Image.fromarray(s.image).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(s.caption if i != 0 else "three red squares")
    res = E.main(["shapes", "--images", str(folder), "--out", str(tmp_path / "f"),
                  "--details", str(tmp_path / "d.jsonl")])  # fmt: skip
    # Image 0 (a single object) now claims a count caption: that one prompt fails.
    assert res["n"] == {"single": 1, "count": 3, "relation": 2}
    assert (res["single"], res["count"], res["relation"]) == (1.0, pytest.approx(2 / 3), 1.0)
    rows = [json.loads(ln) for ln in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["correct"] is False and "expected 3" in rows[0]["reason"]

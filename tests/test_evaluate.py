"""Tests for evaluate.py: the metric maths against closed forms, the pipelines on a
tiny folder with a stand-in feature extractor, and the shapes-world command line
(the detector itself is tested in test_shapes.py)."""

import json
import math
import sys

import numpy as np
import pytest
import torch

import evaluate as E


# ---------------------------------------------------------------------------- FID


def test_frechet_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = E.feature_stats(rng.normal(size=(500, 32)))
    assert E.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_gaussians_match_closed_form():
    # For diagonal covariances (S1 S2)^{1/2} = diag(s1 * s2), so
    # FID = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2 with s the standard deviations.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = E.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_non_diagonal_against_rotation_invariance():
    # Rotating both Gaussians by the same orthogonal matrix leaves the distance unchanged.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    rot = lambda s: q @ np.diag(s**2) @ q.T  # noqa: E731
    want = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert E.frechet_distance(q @ mu1, rot(s1), q @ mu2, rot(s2)) == pytest.approx(want, rel=1e-8)


def test_frechet_singular_covariances_no_nan():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 64)), rng.normal(size=(7, 64)) + 1  # N << D: rank-deficient
    d = E.frechet_distance(*E.feature_stats(a), *E.feature_stats(b))
    assert math.isfinite(d) and d > 0
    zero = np.zeros((4, 4))  # fully degenerate: two point masses at distance 2
    assert E.frechet_distance(np.zeros(4), zero, np.full(4, 1.0), zero) == pytest.approx(4.0, abs=1e-4)


# ---------------------------------------------------------------------------- IS, PSNR, codebook


def test_inception_score_closed_forms():
    assert E.inception_score(logits=np.tile(np.array([[3.0, 1.0, -2.0]]), (10, 1)))[0] == pytest.approx(1.0)
    with np.errstate(divide="ignore"):  # one-hot probabilities as log-probabilities: log 0 = -inf
        for n in (2, 7, 50):
            assert E.inception_score(np.log(np.eye(n)))[0] == pytest.approx(n)
        mean, std = E.inception_score(np.log(np.tile(np.eye(5), (4, 1))), splits=4)  # each split sees 5 classes
    assert (mean, std) == (pytest.approx(5.0), pytest.approx(0.0, abs=1e-9))


def test_psnr_by_hand():
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0] = 0.5  # MSE = 0.25 / 48
    assert E.psnr(a, b).item() == pytest.approx(10 * math.log10(1 / (0.25 / 48)))
    c = torch.full((2, 3, 8, 8), 100.0)
    d = torch.full((2, 3, 8, 8), 110.0)  # MSE = 100 on a 255 range
    assert E.psnr(c, d, data_range=255).tolist() == pytest.approx([10 * math.log10(255**2 / 100)] * 2)


def test_codebook_usage_and_perplexity():
    k = 64
    res = E.codebook_stats(torch.arange(k).repeat(3), k)  # uniform usage
    assert res["codebook_perplexity"] == pytest.approx(k)
    assert res["codebook_usage"] == 1.0 and res["codebook_entropy_bits"] == pytest.approx(6.0)
    res = E.codebook_stats(torch.tensor([[5, 5], [5, 9]]), k)
    p = np.array([0.75, 0.25])
    assert res["codebook_usage"] == 2 / k
    assert res["codebook_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    with pytest.raises(ValueError, match="code ids"):
        E.codebook_stats(torch.tensor([4]), 4)


# ---------------------------------------------------------------------------- extractor, pipelines


def test_fid_without_torch_fidelity_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity...` fail
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        E.inception_extractor()


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
    scorer = E.CLIPScorer(model=model)
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
    res = E.evaluate_reconstruction(tok, text, batches, stand_in_extractor())
    assert res["num_images"] == 6 and math.isfinite(res["rfid"]) and math.isfinite(res["psnr"])
    assert res["inception_score"] >= 1.0
    if preset == "tiny":
        assert 0 < res["codebook_usage"] <= 1 and 1 <= res["codebook_perplexity"] <= 64
    else:
        assert "codebook_usage" not in res


# ---------------------------------------------------------------------------- shapes world


@pytest.mark.parametrize("kl_tokens", ["sample", "mean"])
def test_context_use_feeds_kl_tokens_as_the_generator_was_trained(kl_tokens):
    # The KL probe regresses onto the hidden tokens' posterior means from the conditions z;
    # the visible tokens it feeds must be what training fed: a posterior sample, or the mean.
    import dataclasses

    import checkpoint
    import maskgen as M
    import tokenizer as tk
    from text import TEXT_PRESETS, TextEncoder

    torch.manual_seed(0)
    tok = tk.TATiTok(tk.PRESETS["tiny_kl"]).eval()
    text = TextEncoder.from_config(**TEXT_PRESETS["tiny"])
    cfg = dataclasses.replace(M.PRESETS["tiny_kl"], kl_tokens=kl_tokens)
    gen = M.build(cfg).eval()
    seen = []
    conditions = gen.token_conditions
    gen.token_conditions = lambda x, *a: seen.append(x) or conditions(x, *a)
    models = checkpoint.Models(gen, tok, text, text, "gen", "tok")
    images, captions = torch.rand(6, 3, 32, 32), ["a red circle"] * 6
    res = E.context_use(models, images, captions, 6.5, fractions=(0.0, 0.5))
    assert set(res) == {"r2_from_z@0", "r2_from_z@0.5"} and all(math.isfinite(v) for v in res.values())
    mean = tok.encode(images, return_posterior=True).mean * cfg.scale_factor
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # the same tokens at every fraction
    assert torch.allclose(seen[0], mean) == (kl_tokens == "mean")



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


def test_shapes_save_writes_scored_images_that_score_again(tmp_path):
    import dataclasses

    from PIL import Image

    from test_sample import save_tokenizer_run, TOK_VQ

    # --reconstruct with --tokenizer alone (a tokenizer run, no generator yet), its images saved.
    tok = save_tokenizer_run(tmp_path / "tok", dataclasses.replace(TOK_VQ, image_size=64))
    out = tmp_path / "saved"
    res = E.main(["shapes", "--reconstruct", "--tokenizer", tok, "--n-per-category", "2", "--device", "cpu",
                  "--save", str(out), "--out", str(tmp_path / "r")])  # fmt: skip
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [r["category"] for r in rows] == ["single"] * 2 + ["count"] * 2 + ["relation"] * 2
    for k, r in enumerate(rows):
        verdict = "ok" if r["correct"] else "miss"
        assert r["file"] == f"{r['category']}/{k % 2:04d}_{verdict}.png" and (out / r["file"]).exists()
        assert (out / r["file"]).with_suffix(".txt").read_text().strip() == r["prompt"]
    hits = sum(r["correct"] for r in rows if r["category"] == "single")
    assert res["single"] == hits / 2
    # The saved folder, sidecar prompts included, scores the same with --images.
    again = E.main(["shapes", "--images", str(out), "--out", str(tmp_path / "a")])
    assert {c: again[c] for c in ("single", "count", "relation")} == {c: res[c] for c in ("single", "count", "relation")}
    # --decoder-text: the decoder reads "" (or the next scene's caption) instead: other
    # pixels, still scored against the scene's own caption; the default is the caption.
    first, pixels = rows, {}
    for mode in ("caption", "empty", "next"):
        E.main(["shapes", "--reconstruct", "--tokenizer", tok, "--n-per-category", "2", "--device", "cpu",
                "--decoder-text", mode, "--save", str(tmp_path / mode), "--out", str(tmp_path / "r")])  # fmt: skip
        got = [json.loads(ln) for ln in (tmp_path / mode / "results.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in got] == [r["prompt"] for r in first]
        pixels[mode] = [np.asarray(Image.open(tmp_path / mode / r["file"])) for r in got]
    assert all((a == np.asarray(Image.open(out / r["file"]))).all() for a, r in zip(pixels["caption"], first))
    assert not any((a == b).all() for a, b in zip(pixels["caption"], pixels["empty"]))
    assert not all((a == b).all() for a, b in zip(pixels["caption"], pixels["next"]))
    with pytest.raises(ValueError, match="--decoder-text only applies to --reconstruct"):
        E.main(["shapes", "--ground-truth", "--decoder-text", "empty", "--out", str(tmp_path / "g")])
    # Ground truth: every image passes, so every file is an _ok; a used folder is refused before any work.
    E.main(["shapes", "--ground-truth", "--n-per-category", "1", "--save", str(tmp_path / "gt"), "--out", str(tmp_path / "g")])
    assert sorted(p.name for p in (tmp_path / "gt").rglob("*.png")) == ["0000_ok.png"] * 3
    with pytest.raises(ValueError, match=r"--save folder .* is not empty"):
        E.main(["shapes", "--ground-truth", "--n-per-category", "1", "--save", str(out), "--out", str(tmp_path / "g")])


# ---------------------------------------------------------------------------- MJHQ-30K layout, prompts, errors


def write_mjhq_folder(root, cats, n, seed, ext="png", shift=0.0):
    """<root>/<category>/<id>.<ext>: n random images per category, each category's own
    colour cast (so per-category FIDs differ from the overall one)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ids = {}
    for k, cat in enumerate(cats):
        (root / cat).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 120, (32, 32, 3)) + np.array([60 * k + shift, 20, 40 * (1 - k)])
            image_id = f"{cat[:2]}{seed}{i:03d}"
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / cat / f"{image_id}.{ext}")
            ids[image_id] = cat
    return ids


def stand_in_fid(folder_files, ref_files):
    """FID of two file lists with the stand-in extractor, computed directly."""
    from data import load_image

    extract = stand_in_extractor()
    feats = [extract(torch.stack([load_image(f) for f in files]).mul(255).round().to(torch.uint8))[0].numpy()
             for files in (folder_files, ref_files)]  # fmt: skip
    return E.frechet_distance(*E.feature_stats(feats[0]), *E.feature_stats(feats[1]))


def test_gen_per_category_fid_on_mjhq_layout(tmp_path, monkeypatch):
    gen_ids = write_mjhq_folder(tmp_path / "gen", ["animals", "logo"], 5, seed=0)
    write_mjhq_folder(tmp_path / "ref", ["animals", "logo", "people"], 6, seed=1, ext="jpg", shift=10)
    (tmp_path / "gen" / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": i, "category": c, "prompt": f"a {c} {i}"}) + "\n" for i, c in gen_ids.items()))
    monkeypatch.setattr(E, "inception_extractor", lambda *a, **k: stand_in_extractor())
    seen = []

    class FakeCLIP:  # records the prompts each image is scored with
        def __init__(self, *a, **k):
            pass

        def __call__(self, images, prompts):
            seen.extend(prompts)
            return torch.full((len(prompts),), 30.0)

    monkeypatch.setattr(E, "CLIPScorer", FakeCLIP)
    stats = tmp_path / "ref.npz"
    args = ["gen", "--images", str(tmp_path / "gen"), "--out", str(tmp_path / "res"), "--batch-size", "3", "--device", "cpu"]
    res = E.main(args + ["--ref", str(tmp_path / "ref"), "--clip", "--save-ref-stats", str(stats)])
    files = lambda root, cat="*": sorted(map(str, root.glob(f"{cat}/*.*")))  # noqa: E731
    assert res["num_images"] == 10 and res["num_images_per_category"] == {"animals": 5, "logo": 5}
    # Overall: every generated image against every reference image (the third category too).
    assert res["fid"] == pytest.approx(stand_in_fid(files(tmp_path / "gen"), files(tmp_path / "ref")), rel=1e-6)
    for cat in ("animals", "logo"):
        want = stand_in_fid(files(tmp_path / "gen", cat), files(tmp_path / "ref", cat))
        assert res["fid_per_category"][cat] == pytest.approx(want, rel=1e-6)
    assert len(set(res["fid_per_category"].values()) | {res["fid"]}) == 3
    assert "fid_per_category: animals=" in (tmp_path / "res.txt").read_text()
    # Prompts: sample.py --mjhq's prompts.jsonl beside the categories, matched by id.
    assert sorted(seen) == sorted(f"a {c} {i}" for i, c in gen_ids.items()) and res["clip_score"] == 30.0
    # The saved statistics hold every category: the same numbers again from the .npz.
    again = E.main(args + ["--ref", str(stats)])
    assert again["fid"] == pytest.approx(res["fid"]) and again["fid_per_category"] == pytest.approx(res["fid_per_category"])
    # MJHQ's meta_data.json and a .jsonl with ids work as --prompts too (here over a sidecar-free copy).
    (tmp_path / "gen" / "prompts.jsonl").unlink()
    meta = tmp_path / "meta_data.json"
    meta.write_text(json.dumps({i: {"category": c, "prompt": f"meta {i}"} for i, c in gen_ids.items()}))
    seen.clear()
    E.main(args + ["--no-fid", "--clip", "--prompts", str(meta)])
    assert sorted(seen) == sorted(f"meta {i}" for i in gen_ids)
    # A generated category the reference lacks is named.
    write_mjhq_folder(tmp_path / "gen", ["vehicles"], 2, seed=3)
    with pytest.raises(ValueError, match=r"reference .*ref has no category \['vehicles'\]"):
        E.main(args + ["--ref", str(tmp_path / "ref")])


def test_gen_prompt_files_and_errors(tmp_path, monkeypatch):
    gen = write_folder(tmp_path / "gen", 3, 0)
    for f in gen.glob("*.txt"):
        f.unlink()  # no sidecar captions: the prompts come from --prompts
    (gen / "000.png").rename(gen / "00000_s0000.png")
    (gen / "001.png").rename(gen / "00001_s0001.png")
    (gen / "002.png").rename(gen / "00001_s0002.png")
    seen = []
    monkeypatch.setattr(E, "CLIPScorer", lambda *a, **k: lambda images, prompts: (seen.extend(prompts), torch.ones(len(prompts)))[1])
    index = tmp_path / "prompts.jsonl"  # sample.py's prompts.jsonl, given explicitly: matched by <index>_s<seed>
    index.write_text('{"index": 0, "prompt": "a red circle"}\n{"index": 1, "prompt": "two squares"}\n')
    run = lambda *extra: E.main(["gen", "--images", str(gen), "--out", str(tmp_path / "r"), "--no-fid", *extra])  # noqa: E731
    run("--clip", "--prompts", str(index))
    assert seen == ["a red circle", "two squares", "two squares"]
    seen.clear()
    lines = tmp_path / "p.txt"
    lines.write_text("x\ny\nz\n")
    run("--clip", "--prompts", str(lines))
    assert seen == ["x", "y", "z"]
    with pytest.raises(ValueError, match=r"--no-fid without --clip would compute nothing"):
        run()
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"prompt file '{latin1}' is not UTF-8 text"):
        run("--clip", "--prompts", str(latin1))
    with pytest.raises(ValueError, match=r"--n-per-category must be at least 1, got 0"):
        E.main(["shapes", "--ground-truth", "--n-per-category", "0", "--out", str(tmp_path / "s")])


def test_recon_skips_and_counts_a_file_that_is_no_image(tmp_path):
    from test_sample import save_tokenizer_run

    tok = save_tokenizer_run(tmp_path / "tok")
    folder = write_folder(tmp_path / "imgs", 3, 0)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "broken.txt").write_text("a caption")
    res = E.main(["recon", "--tokenizer", tok, "--data", str(folder), "--no-fid", "--out", str(tmp_path / "r"),
                  "--device", "cpu"])  # fmt: skip
    assert res["num_images"] == 3 and res["skipped"] == {"corrupt_image": 1}
    assert json.loads((tmp_path / "r.json").read_text())["skipped"] == {"corrupt_image": 1}


@pytest.mark.parametrize("mode", ["vq", "kl"])
def test_inpaint_use_fills_only_the_hidden_tokens(mode):
    # With nothing hidden the decoded scenes are exactly the tokenizer's reconstructions (generate()'s
    # image-to-image at strength 0: VQ the ids, KL the posterior means); with tokens hidden they
    # differ, and every score is a fraction of the scenes.
    import checkpoint
    import maskgen as M
    import tokenizer as tk
    from text import TEXT_PRESETS, TextEncoder

    torch.manual_seed(0)
    tok = tk.TATiTok(tk.PRESETS["tiny" if mode == "vq" else "tiny_kl"]).eval()
    text = TextEncoder.from_config(**TEXT_PRESETS["tiny"])
    gen = M.build(M.preset_for(f"tiny_{mode}", tok.config, 32, 32)).eval()
    models = checkpoint.Models(gen, tok, text, text, "gen", "tok")
    images, captions = torch.rand(4, 3, 32, 32), ["a red circle", "two blue squares"] * 2
    res, decoded = E.inpaint_use(models, images, captions, 6.5, fractions=(0.5, 1.0), seed=3)
    assert set(res) == {"inpaint@0.5", "inpaint@1"} and all(0.0 <= v <= 1.0 for v in res.values())
    with torch.no_grad():
        ref = tok.decode(tok.encode(images), text(captions).final)
    assert torch.equal(decoded[1.0], ref)
    assert not torch.equal(decoded[0.5], ref)  # hidden tokens were redrawn (a random model: tiny changes)

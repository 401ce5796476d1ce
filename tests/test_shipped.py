"""The two shipped shapes-world bundles (checkpoints/shapes.pt, VQ; checkpoints/shapes_kl.pt,
KL): the quickstart command draws with each, and each serves as the frozen tokenizer of
`train_maskgen.py` and of `data.py pretokenize` (README "The shipped models")."""

import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import load
import sample
import shapes
import train_maskgen

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = {"vq": os.path.join(HERE, "checkpoints", "shapes.pt"), "kl": os.path.join(HERE, "checkpoints", "shapes_kl.pt")}
CPU = ["--device", "cpu"]


@pytest.fixture(params=sorted(BUNDLES))
def bundle(request):
    path = BUNDLES[request.param]
    assert os.path.isfile(path), f"{path} ships with the repository"
    assert os.path.getsize(path) <= 20 * 2**20, "a shipped bundle stays under 20 MiB"
    return request.param, path


def test_quickstart_draws_with_each_bundle(bundle, tmp_path, capsys):
    mode, path = bundle
    args = ["--generator", path] if mode == "kl" else []  # the VQ bundle is the default model
    res = sample.main(args + ["--prompt", "a red circle to the left of a blue square", "--outdir", str(tmp_path)] + CPU)
    assert res["images"][0] in capsys.readouterr().out  # it says where the image went
    img = np.asarray(Image.open(res["images"][0]).convert("RGB"))
    assert img.shape == (64, 64, 3)
    assert img.std() > 20 and (img.min(axis=-1) < 128).sum() > 50  # not blank: coloured shapes on white
    m = load.load_models(path, None, "cpu")
    assert m.generator.config.mode == m.tokenizer.config.quantize_mode == mode


def test_bundle_is_a_tokenizer_for_pretokenize_and_train_maskgen(bundle, tmp_path):
    mode, path = bundle
    out = tmp_path / "pretok"
    data.main(["pretokenize", "--tokenizer", path, "--data", "shapes:12", "--out", str(out),
               "--batch-size", "4", "--per-shard", "8", "--num-workers", "0", "--device", "cpu"])  # fmt: skip
    meta = json.load(open(out / "meta.json"))
    assert meta["num_samples"] == 12 and meta["quantize_mode"] == mode and len(glob.glob(str(out / "*.tar"))) == 2
    # The bundle's tokenizer, text tower and the tokens written above train a (tiny) MaskGen.
    run = tmp_path / "mg"
    train_maskgen.main([f"--config=tiny_{mode}", f"--tokenizer={path}", f"--data=pretokenized:{out}/*.tar",
                        f"--out_dir={run}", "--max_steps=2", "--batch_size=4", "--log_every=1",
                        "--sample_every=2", "--ckpt_every=2"])  # fmt: skip
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    ck = torch.load(run / "ckpt_00000002.pt", map_location="cpu", weights_only=True)
    tok = load.load_tokenizer(path, "cpu", with_text=False)[0].config
    assert ck["maskgen_config"]["num_tokens"] == tok.num_latent_tokens and ck["maskgen_config"]["mode"] == mode


def test_each_bundle_reads_its_context(bundle, tmp_path):
    # `evaluate.py context`: the shipped generators predict masked tokens far better with
    # most tokens visible than with none (VQ: cross-entropy; KL: R^2 of the masked tokens'
    # means from the DiffLoss conditions). The KL model shipped before pos_init_std did not.
    mode, path = bundle
    res = evaluate.main(["context", "--generator", path, "--n-per-category", "20", "--out", str(tmp_path / "ctx")] + CPU)
    if mode == "vq":
        assert res["masked_ce@0.9"] < res["masked_ce@0"] - 1.0
    else:
        assert res["r2_from_z@0.5"] > res["r2_from_z@0"] + 0.2
    assert json.load(open(tmp_path / "ctx.json")) == pytest.approx(res)


def test_evaluate_shapes_passes_the_sampling_options_through(tmp_path):
    # `evaluate.py shapes --guidance-schedule / --temperature` reach generate(): the bundle's own
    # schedule, given explicitly, draws the default's images; another schedule or a softmax
    # temperature draws others; a schedule of the other variant is refused by name.
    prompts = shapes.heldout_prompts(2)
    cfg = load.load_models(BUNDLES["vq"], None, "cpu").generator.config
    kw = dict(generator=BUNDLES["vq"], device="cpu")
    base = evaluate.generate_shapes_images(prompts, **kw)
    same = evaluate.generate_shapes_images(prompts, guidance_schedule=cfg.guidance_schedule, **kw)
    other = evaluate.generate_shapes_images(prompts, guidance_schedule="none", **kw)
    cooler = evaluate.generate_shapes_images(prompts, temperature=0.3, **kw)
    assert all((a == b).all() for a, b in zip(base, same))
    assert any((a != b).any() for a, b in zip(base, other)) and any((a != b).any() for a, b in zip(base, cooler))
    with pytest.raises(ValueError, match="cosine"):
        evaluate.main(["shapes", "--generator", BUNDLES["kl"], "--guidance-schedule", "cosine",
                       "--n-per-category", "1", "--out", str(tmp_path / "s")] + CPU)  # fmt: skip

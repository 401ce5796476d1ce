"""--init_from in both trainers: a fine-tune starts at step 0 (fresh optimizer, its own schedule) from the
weights of a release directory (written by save_release / export_release, the official layout), a Hub id
(offline, from a Hub-layout cache), one of our run folders or a checkpoint file; a preset that does not
build the init's model is refused, naming the fields and the preset that fits."""

import glob
import json
import os

import pytest
import torch
from huggingface_hub import constants

import checkpoint as C
import train_maskgen
import train_tokenizer
from test_checkpoint import C1, put

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
# lr 0: AdamW leaves every weight as it was (the decay is lr * wd), so the run's weights must be the init's.
FRESH = ["--max_steps=2", "--ckpt_every=2", "--sample_every=100", "--lr=0", "--log_every=1"]


def tok_run(out, *args):
    train_tokenizer.main([f"--out_dir={out}", "--config=tiny", "--disc_start=100", *args])


def mg_run(out, tok, *args, config="tiny_vq"):
    train_maskgen.main([f"--out_dir={out}", f"--config={config}", f"--tokenizer={tok}", *args])


def last(out):
    return torch.load(sorted(glob.glob(f"{out}/ckpt_*.pt"))[-1], weights_only=True)


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """A tiny VQ tokenizer and a MaskGen-VQ on it, trained 3 steps each, as runs, checkpoint files, release
    directories (export_release: the tokenizer with its text tower; save_release: the bare generator) and
    Hub ids in a Hub-layout cache."""
    d = tmp_path_factory.mktemp("init")
    tok_run(d / "tok", "--max_steps=3", "--ckpt_every=3", "--sample_every=100")
    mg_run(d / "gen", d / "tok", "--max_steps=3", "--ckpt_every=3", "--sample_every=100")
    C.export_release(str(d / "tok"), str(d / "tok_rel"))  # config.json, model.safetensors, text_encoder.safetensors
    C.save_release(C.load_generator(d / "gen"), d / "gen_rel")  # the official layout, fp32
    put(d / "cache", "owner/tok", d / "tok_rel", C1, ["main"])
    put(d / "cache", "owner/gen", d / "gen_rel", C1, ["v1"])
    ema = {role: last(d / role)["ema"] for role in ("tok", "gen")}
    return dict(dir=d, ema=ema)


@pytest.fixture
def offline(inits, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(inits["dir"] / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ref(inits, role, form):
    d = inits["dir"]
    return {"run": d / role, "ckpt": sorted(glob.glob(f"{d / role}/ckpt_*.pt"))[-1], "release": d / f"{role}_rel",
            "hub": {"tok": "owner/tok", "gen": "owner/gen@v1"}[role]}[form]  # fmt: skip


def started_fresh(out, ema, keys):
    """The run counted its own steps from 0 with a fresh optimizer, and its weights are the init's EMA ones."""
    ck = last(out)
    assert ck["step"] == 2 and [r["step"] for r in map(json.loads, open(out / "log.jsonl")) if "step" in r] == [1, 2]
    assert {s["step"].item() for s in ck["optimizer"]["state"].values()} == {2.0}  # AdamW's own count: 2 steps
    assert keys and all(torch.equal(ck["model"][k], ema[k]) for k in keys)


@pytest.mark.parametrize("form", ["run", "ckpt", "release", "hub"])
def test_tokenizer_fine_tune_starts_from_the_init(form, inits, tmp_path, offline):
    tok_run(tmp_path, f"--init_from={ref(inits, 'tok', form)}", *FRESH)
    ema = inits["ema"]["tok"]
    # The codebook is left out: dead-code revival replaces unused codes whatever the LR.
    started_fresh(tmp_path, ema, [k for k in ema if not k.startswith("quantize")])
    assert last(tmp_path)["text_encoder"].keys() == last(inits["dir"] / "tok")["text_encoder"].keys()
    assert all(torch.equal(v, last(inits["dir"] / "tok")["text_encoder"][k])
               for k, v in last(tmp_path)["text_encoder"].items())  # the init's text tower, not a new one


@pytest.mark.parametrize("form", ["run", "ckpt", "release", "hub"])
def test_maskgen_fine_tune_starts_from_the_init(form, inits, tmp_path, offline):
    mg_run(tmp_path, inits["dir"] / "tok", f"--init_from={ref(inits, 'gen', form)}", *FRESH)
    started_fresh(tmp_path, inits["ema"]["gen"], list(inits["ema"]["gen"]))


def test_a_preset_that_does_not_fit_is_refused(inits, tmp_path):
    d = inits["dir"]
    with pytest.raises(SystemExit, match=r"holds a tokenizer with quantize_mode 'vq', codebook_size 64, token_size 8, "
                                         r"but the preset builds quantize_mode 'kl', codebook_size 8192, token_size 4; "
                                         r"pick the preset it was trained with \(--tokenizer=tiny\)"):
        tok_run(tmp_path / "a", "--tokenizer=tiny_kl", f"--init_from={d / 'tok_rel'}", *FRESH)
    with pytest.raises(SystemExit, match=r"holds a generator with width 64, .*but the preset builds width 128, .*"
                                         r"pick the preset it was trained with \(--maskgen=tiny_vq\)"):
        mg_run(tmp_path / "b", d / "tok", "--maskgen=shapes_vq", f"--init_from={d / 'gen_rel'}", *FRESH)
    # A tokenizer release that records no text tower was trained with the official CLIP, which `tiny` is not.
    C.save_release(C.load_tokenizer(d / "tok", with_text=False)[0], tmp_path / "bare")
    with pytest.raises(SystemExit, match=r"trained with text encoder ViT-L-14-336 \(openai\); pass "
                                         r"--text_encoder=ViT-L-14-336"):
        tok_run(tmp_path / "c", f"--init_from={tmp_path / 'bare'}", *FRESH)
    # The generator's pairing with the tokenizer is checked first: a KL tokenizer cannot feed a VQ generator.
    tok_run(tmp_path / "kl", "--tokenizer=tiny_kl", "--max_steps=1", "--sample_every=100")
    with pytest.raises(SystemExit, match=r"do not fit together:\n  - token type: tokenizer is KL but the generator "
                                         r"is MaskGen-VQ"):
        mg_run(tmp_path / "d", tmp_path / "kl", f"--init_from={d / 'gen'}", *FRESH, config="tiny_kl")
    assert not any(glob.glob(f"{tmp_path}/{x}/ckpt_*.pt") for x in "abcd")  # refused before any step


def test_kl_fine_tune_keeps_the_scale_factor_its_init_was_trained_with(tmp_path):
    tok_run(tmp_path / "tok", "--tokenizer=tiny_kl", "--max_steps=1", "--sample_every=100")
    mg_run(tmp_path / "gen", tmp_path / "tok", "--max_steps=1", "--sample_every=100", config="tiny_kl")
    mg_run(tmp_path / "new", tmp_path / "tok", "--max_steps=1", "--sample_every=100", "--seed=5", config="tiny_kl")
    mg_run(tmp_path / "ft", tmp_path / "tok", f"--init_from={tmp_path / 'gen'}", *FRESH, "--seed=5", config="tiny_kl")
    scale = {run: last(tmp_path / run)["maskgen_config"]["scale_factor"] for run in ("gen", "new", "ft")}
    assert scale["ft"] == scale["gen"] != scale["new"]  # a fresh run measures its own on other batches

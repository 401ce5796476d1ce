"""sample.py end to end on tiny random models, on CPU: files, grid, GenEval layout,
seeding, sharding, loading checkpoints with checkpoint.py (every form, pairing errors), and
the tokenizer figures of `sample.py tokviz` (Fig. 4 latent-code swapping, Fig. 8 encoder
attention maps). The fixtures here (tiny runs and a release pair) are shared with test_checkpoint.py."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as L
import maskgen as M
import train_common
import sample as S
import tokenizer as T
from checkpoint import load_checked
from text import TEXT_PRESETS, TextEncoder, build_text_encoder

# tokenizer.PRESETS["tiny"] has K = 8 tokens, a 64-code codebook and 8 channels; the
# maskgen "tiny_vq" preset makes K = 16, so the generator here is tiny_vq with K = 8.
TOK_VQ = T.PRESETS["tiny"]
GEN_VQ = dataclasses.replace(M.PRESETS["tiny_vq"], num_tokens=8, num_steps=4)
TOK_KL = T.PRESETS["tiny_kl"]  # K = 8, C = 4: matches maskgen "tiny_kl" as it is
GEN_KL = dataclasses.replace(M.PRESETS["tiny_kl"], num_steps=2, num_sampling_steps="5")
CPU = ["--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# -----------------------------------------------------------------------------
# Fixture helpers: tiny random checkpoints in the formats the trainers write.


def tiny_text(seed=0):
    torch.manual_seed(seed)
    return TextEncoder.from_config(**TEXT_PRESETS["tiny"])


def save_tokenizer_run(folder, cfg=TOK_VQ, text=None, seed=1):
    """A train_tokenizer.py-style run folder: ckpt_*.pt with model/ema/config/tokenizer_config/text_encoder."""
    torch.manual_seed(seed)
    tok = T.TATiTok(cfg)
    with torch.no_grad():
        # At its init a decoder outputs ~0 whatever the tokens; scale weights so the pixels
        # vary and depend strongly on the tokens (else the seed tests would prove nothing).
        tok.decoder.conv_out.weight.mul_(40)
        tok.decoder.conv_out.bias.fill_(0.5)
        tok.decoder.decoder_embed.weight.mul_(20)
        for blk in tok.decoder.blocks:
            blk.attn.qkv.weight.mul_(5)
            blk.attn.proj.weight.mul_(50)
        if cfg.quantize_mode == "vq":
            tok.quantize.embedding.weight.mul_(100)
    ckpt = {
        "model": tok.state_dict(), "ema": tok.state_dict(), "tokenizer_config": dataclasses.asdict(cfg),
        "config": {"tokenizer": "tiny", "text_encoder": "tiny"}, "text_encoder": (text or tiny_text()).state_dict(),
    }  # fmt: skip
    os.makedirs(folder, exist_ok=True)
    torch.save(ckpt, os.path.join(folder, "ckpt_00000010.pt"))
    return str(folder)


def generator_ckpt(cfg, tokenizer_path, with_text=False, seed=2):
    """A train_maskgen.py-style checkpoint dict; 'model' differs from 'ema' so the choice shows.
    train_maskgen.py takes the text encoder from the tokenizer and records none;
    with_text=True also stores it (name + weights), which sample.py accepts too."""
    torch.manual_seed(seed)
    ema, raw = M.build(cfg), M.build(cfg)
    ckpt = {"model": raw.state_dict(), "ema": ema.state_dict(), "maskgen_config": dataclasses.asdict(cfg),
            "config": {"tokenizer": tokenizer_path, "maskgen": "tiny_vq"}}  # fmt: skip
    if with_text:
        ckpt["config"]["text_encoder"] = "tiny"
        ckpt["text_encoder"] = tiny_text().state_dict()
    return ckpt


def save_generator_run(folder, cfg, tokenizer_path, **kw):
    os.makedirs(folder, exist_ok=True)
    torch.save(generator_ckpt(cfg, tokenizer_path, **kw), os.path.join(folder, "ckpt_00000020.pt"))
    return str(folder)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    out["tok"] = save_tokenizer_run(d / "tok")
    # Recorded as training would record it: relative to where training ran (here: d).
    out["gen"] = save_generator_run(d / "gen", GEN_VQ, "tok")
    out["tok_kl"] = save_tokenizer_run(d / "tok_kl", TOK_KL)
    out["gen_kl"] = save_generator_run(d / "gen_kl", GEN_KL, str(d / "tok_kl"), with_text=True)
    # The shipped layout (checkpoints/shapes/): a release pair with both stages' EMA weights
    # in fp16, the generator recording its tokenizer, the small text tower stored once.
    dirs = L.export_release(out["gen"], str(d / "shapes"), half=True)
    out["release"] = dirs["generator"]
    assert sorted(os.listdir(dirs["tokenizer"])) == ["config.json", "model.safetensors", L.TEXT_FILE]
    assert sorted(os.listdir(out["release"])) == ["config.json", "model.safetensors"]
    assert json.loads(open(os.path.join(out["release"], "config.json")).read())["tokenizer"] == "../tokenizer"
    for role in dirs.values():
        f = L.open_safetensors(os.path.join(role, "model.safetensors"))
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    return out


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.RandomState(0)
    path = tmp_path / "img.png"
    Image.fromarray((rng.rand(40, 48, 3) * 255).astype(np.uint8)).save(path)  # not square: resized + cropped
    return str(path)


def run(args, outdir):
    return S.main(args + ["--outdir", str(outdir)] + CPU)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def folder_pixels(outdir):
    return {f: pixels(os.path.join(outdir, f)) for f in sorted(os.listdir(outdir)) if f.endswith(".png") and f != "grid.png"}


# -----------------------------------------------------------------------------
# Sampling.


def test_writes_images_and_grid(ckpts, tmp_path):
    res = run(["--generator", ckpts["gen"], "--prompt", "a red circle", "--prompt", "two blue squares", "--num_images", "2"], tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "00000_s0000.png", "00000_s0001.png", "00001_s0002.png", "00001_s0003.png", "grid.png", "prompts.jsonl",
    ]  # fmt: skip
    imgs = folder_pixels(tmp_path)
    assert all(a.shape == (32, 32, 3) for a in imgs.values())
    # Seeds differ -> images differ clearly (so the seed tests below have power).
    vals = [a.astype(float) for a in imgs.values()]
    assert min(np.abs(x - y).mean() for i, x in enumerate(vals) for y in vals[i + 1 :]) > 5
    assert pixels(res["grid"]).shape[0] > 32 * 2  # two labelled rows
    lines = [json.loads(x) for x in open(tmp_path / "prompts.jsonl")]
    assert lines == [{"index": 0, "prompt": "a red circle"}, {"index": 1, "prompt": "two blue squares"}]


def test_seed_repeatable_and_batch_size_independent(ckpts, tmp_path):
    args = ["--generator", ckpts["gen"], "--prompt", "a", "--prompt", "b", "--num_images", "3", "--seed", "7"]
    run(args + ["--batch_size", "4"], tmp_path / "a")
    run(args + ["--batch_size", "4"], tmp_path / "b")
    run(args + ["--batch_size", "1"], tmp_path / "c")
    a, b, c = (folder_pixels(tmp_path / x) for x in "abc")
    assert list(a) == [f"0000{p}_s{7 + n:04d}.png" for p, n in [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]]
    assert all(np.array_equal(a[f], b[f]) for f in a)
    # Batched decoding may round differently from single-image decoding by one level at most.
    assert list(a) == list(c) and all(np.abs(a[f].astype(int) - c[f].astype(int)).max() <= 1 for f in a)


def test_kl_generator(ckpts, tmp_path):
    run(["--generator", ckpts["gen_kl"], "--prompt", "a red circle", "--num_images", "2", "--guidance_schedule", "constant"], tmp_path)
    imgs = folder_pixels(tmp_path)
    assert list(imgs) == ["00000_s0000.png", "00000_s0001.png"] and all(a.shape == (32, 32, 3) for a in imgs.values())


def test_aesthetic_scores_give_one_row_each(ckpts, tmp_path):
    res = run(["--generator", ckpts["gen"], "--prompt", "a red circle", "--num_images", "2", "--aesthetic", "5", "6", "7"], tmp_path)
    names = sorted(f for f in os.listdir(tmp_path) if f.startswith("0"))
    assert names == [f"00000_s000{i}_aes{a}.png" for i in (0, 1) for a in (5, 6, 7)]  # same seeds at each score
    one = Image.new("RGB", (32, 32))
    expect = S.labelled_grid([[one, one]] * 3, ["x"] * 3, [["s", "s"]] * 3)
    assert Image.open(res["grid"]).size == expect.size  # 3 rows of 2


def test_grid_labels_keep_their_spaces():
    # The default 10 px font drew a space no wider than the gap between letters, so the
    # README grid read "twogreen triangles". Measure the blank column runs in the label:
    # the two word gaps must be clearly wider than any gap between letters.
    one = Image.new("RGB", (64, 64), "white")
    strip = np.asarray(S.labelled_grid([[one]], ["two green triangles"]).convert("L"))[4:24]  # the label's strip
    ink = (strip < 128).any(axis=0)
    xs = np.nonzero(ink)[0]
    runs, n = [], 0
    for v in ink[xs[0] : xs[-1] + 1]:
        if not v:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    runs.sort(reverse=True)
    assert len(runs) > 2 and runs[1] >= runs[2] + 2, f"word gaps {runs[:2]} px vs letter gaps up to {runs[2]} px"


def test_geneval_layout(ckpts, tmp_path):
    meta = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}], "prompt": "a photo of two cats"},
    ]
    lines = [json.dumps(m) for m in meta]
    src = tmp_path / "evaluation_metadata.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "geneval"
    run(["--generator", ckpts["gen"], "--geneval", str(src), "--num_images", "2"], out)
    assert sorted(os.listdir(out)) == ["00000", "00001", "grid.png"]
    for p in range(2):
        d = out / f"{p:05d}"
        assert sorted(os.listdir(d)) == ["metadata.jsonl", "samples"]
        assert sorted(os.listdir(d / "samples")) == ["0000.png", "0001.png"]
        text = (d / "metadata.jsonl").read_text()
        assert text == lines[p] + "\n"
        with open(d / "metadata.jsonl") as f:
            assert json.load(f) == meta[p]  # how GenEval reads it


def test_prompt_files(tmp_path):
    txt, jsonl, bad = tmp_path / "p.txt", tmp_path / "p.jsonl", tmp_path / "bad.jsonl"
    txt.write_text("a red circle\n\ntwo blue squares\n")
    jsonl.write_text('{"prompt": "a red circle", "tag": "x"}\n{"prompt": "two blue squares"}\n')
    bad.write_text('{"prompt": "ok"}\n{"caption": "no prompt field"}\n')
    assert S.read_prompt_file(str(txt)) == S.read_prompt_file(str(jsonl)) == ["a red circle", "two blue squares"]
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 has no \"prompt\""):
        S.read_prompt_file(str(bad))


def test_sharding_over_ranks_matches_one_process(ckpts, tmp_path, monkeypatch):
    items = S.make_items(5, 3, 2, seed=0)
    for world in (1, 2, 3, 4):
        parts = [S.shard(items, r, world) for r in range(world)]
        assert sorted(x for p in parts for x in p) == sorted(items)  # no gaps, no duplicates
        assert max(map(len, parts)) - min(map(len, parts)) <= 1

    args = ["--generator", ckpts["gen"], "--prompt", "a", "--prompt", "b", "--prompt", "c", "--num_images", "2", "--batch_size", "2"]
    run(args, tmp_path / "one")
    for rank in (1, 0):  # rank 0 last: it draws the grid from every rank's files
        monkeypatch.setenv("RANK", str(rank))  # as torchrun sets it: only then is the process group set up
        monkeypatch.setattr(train_common, "setup_distributed", lambda device, r=rank, **kw: (r, 2, S.pick_device(device)))
        res = run(args, tmp_path / "two")
        assert len(res["images"]) == 3
    one, two = folder_pixels(tmp_path / "one"), folder_pixels(tmp_path / "two")
    assert list(one) == list(two) and all(np.abs(one[f].astype(int) - two[f].astype(int)).max() <= 1 for f in one)
    assert os.path.isfile(tmp_path / "two" / "grid.png")


# -----------------------------------------------------------------------------
# Checkpoints: EMA preference, the release pair, the default, and clear errors before any work.


def test_load_generator_prefers_ema(ckpts):
    g = L.load_generator(ckpts["gen"])
    ckpt = torch.load(os.path.join(ckpts["gen"], "ckpt_00000020.pt"), weights_only=True)
    sd = g.state_dict()
    assert all(torch.equal(sd[k], ckpt["ema"][k]) for k in sd)
    assert not all(torch.equal(sd[k], ckpt["model"][k]) for k in sd)
    assert "EMA" in L.load_models(ckpts["gen"]).gen_source and L.resolve(ckpts["gen"], "generator").tokenizer == "tok"
    for gen in ("gen", "gen_kl"):  # text encoder not recorded / recorded with the same weights
        m = L.load_models(ckpts[gen], None, "cpu")
        assert m.gen_text is m.tok_text  # one text encoder serves both models


def test_one_loader_for_every_form(ckpts):
    # A tokenizer loads the same from its run folder, its checkpoint file and its fp16 release
    # (the one the generator release records).
    from_run, text = L.load_tokenizer(ckpts["tok"])
    from_file, none = L.load_tokenizer(os.path.join(ckpts["tok"], "ckpt_00000010.pt"), with_text=False)
    from_bundle, bundle_text = L.load_tokenizer(L.resolve(ckpts["release"], "generator").tokenizer)
    sd = from_run.state_dict()
    assert none is None and not any(p.requires_grad for p in from_run.parameters())
    assert all(torch.equal(sd[k], v) for k, v in from_file.state_dict().items())
    assert all(torch.equal(sd[k].half().float() if v.is_floating_point() else sd[k], v) for k, v in from_bundle.state_dict().items())
    assert (bundle_text.width, bundle_text.context_length) == (text.width, text.context_length)
    with pytest.raises(ValueError, match=r"MaskGen checkpoint.*pass it as --generator"):
        L.load_tokenizer(ckpts["gen"])
    # --init_from's weights: the EMA ones, from a run folder or the generator release.
    ema = torch.load(os.path.join(ckpts["gen"], "ckpt_00000020.pt"), weights_only=True)["ema"]
    cfg = L.resolve(ckpts["gen"], "generator").config
    sd, src = L.init_weights(ckpts["gen"], "generator", cfg, {}, "--maskgen")
    assert src.where.endswith("ckpt_00000020.pt") and all(torch.equal(sd[k], ema[k]) for k in ema)
    sd, _ = L.init_weights(ckpts["release"], "generator", cfg, {}, "--maskgen")
    assert all(torch.equal(sd[k].float(), ema[k].half().float()) for k in ema if ema[k].is_floating_point())


def test_release_pair_and_default_checkpoint(ckpts, tmp_path, monkeypatch, image_file):
    monkeypatch.setattr(L, "DEFAULT_RELEASE", os.path.dirname(ckpts["release"]))
    res = run(["--prompt", "a red circle"], tmp_path / "a")  # no checkpoint arguments at all
    assert [os.path.basename(p) for p in res["images"]] == ["00000_s0000.png"]
    run(["--generator", ckpts["release"], "--prompt", "a red circle"], tmp_path / "b")
    assert np.array_equal(pixels(tmp_path / "a" / "00000_s0000.png"), pixels(tmp_path / "b" / "00000_s0000.png"))
    viz = S.main(["tokviz", "--image", image_file, "--outdir", str(tmp_path / "viz")] + CPU)  # default tokenizer
    assert viz["swaps"].shape == (8, 6, 3, 32, 32)
    monkeypatch.setattr(L, "DEFAULT_RELEASE", str(tmp_path / "checkpoints" / "shapes"))
    with pytest.raises(FileNotFoundError, match=r"shapes[/\\]generator is missing.*train"):
        run(["--prompt", "a red circle"], tmp_path / "c")


def test_bad_inputs_fail_before_work(ckpts, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    # Prompts are checked first: the missing checkpoint is not even looked at.
    with pytest.raises(ValueError, match="holds no prompts"):
        run(["--generator", str(tmp_path / "nope"), "--prompts", str(empty)], out)
    with pytest.raises(FileNotFoundError, match=r"generator checkpoint .*nope.* does not exist"):
        run(["--generator", str(tmp_path / "nope"), "--prompt", "x"], out)
    with pytest.raises(ValueError, match="no prompts"):
        run(["--generator", ckpts["gen"]], out)

    # Token count: the unmodified tiny_vq preset makes 16 tokens, the tokenizer 8.
    bad_k = save_generator_run(tmp_path / "gen16", dataclasses.replace(GEN_VQ, num_tokens=16), ckpts["tok"])
    with pytest.raises(ValueError, match=r"token count K: tokenizer has 8 latent tokens but the generator makes 16(.|\n)*Fix"):
        run(["--generator", bad_k, "--prompt", "x"], out)
    bad_v = save_generator_run(tmp_path / "gen32", dataclasses.replace(GEN_VQ, codebook_size=32), ckpts["tok"])
    with pytest.raises(ValueError, match=r"codebook size: tokenizer 64 vs generator 32"):
        run(["--generator", bad_v, "--prompt", "x"], out)
    with pytest.raises(ValueError, match=r"token type: tokenizer is KL but the generator is MaskGen-VQ"):
        run(["--generator", ckpts["gen"], "--tokenizer", ckpts["tok_kl"], "--prompt", "x"], out)
    with pytest.raises(ValueError, match=r"tokenizer checkpoint.*pass it as --tokenizer"):
        run(["--generator", ckpts["tok"], "--prompt", "x"], out)
    with pytest.raises(ValueError, match=r"MaskGen checkpoint.*pass it as --generator"):
        run(["--generator", ckpts["gen"], "--tokenizer", ckpts["gen"], "--prompt", "x"], out)
    with pytest.raises(ValueError, match=r"guidance_schedule 'cosine' is not available for MaskGen-KL"):
        run(["--generator", ckpts["gen_kl"], "--guidance_schedule", "cosine", "--prompt", "x"], out)
    assert not out.exists()  # nothing was written by any of the failures


def save_official(folder, model):
    """A release-layout directory: config.json (official layout) + model.safetensors."""
    return L.save_release(model, str(folder))


def test_official_release_dirs(tmp_path):
    torch.manual_seed(0)
    gen_dir = save_official(tmp_path / "generator_tiny", M.build(GEN_VQ))
    tok_dir = save_official(tmp_path / "tokenizer_tiny", T.TATiTok(dataclasses.replace(TOK_VQ, num_latent_tokens=16)))
    g = L.load_generator(gen_dir)
    src = L.resolve(gen_dir, "generator")
    assert g.config.num_tokens == 8 and src.tokenizer is None and src.text == L.OFFICIAL_TEXT
    with pytest.raises(ValueError, match=r"tokenizer release.*pass it as --tokenizer"):
        L.load_generator(tok_dir)
    with pytest.raises(ValueError, match=r"does not say which tokenizer.*--tokenizer"):
        L.load_models(gen_dir, None, "cpu")
    # The mismatch is found from the two config.json files, before CLIP would be downloaded.
    with pytest.raises(ValueError, match=r"tokenizer has 16 latent tokens but the generator makes 8"):
        L.load_models(gen_dir, tok_dir, "cpu")


def test_cli_subprocess(ckpts, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "sample.py", "--generator", ckpts["gen"], "--prompt", "a red circle", "--outdir", str(tmp_path)] + CPU
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert f"wrote 1 image to {tmp_path}" in r.stdout
    assert os.path.isfile(tmp_path / "00000_s0000.png") and os.path.isfile(tmp_path / "grid.png")


# -----------------------------------------------------------------------------
# Per-image seeds in one batched call, MJHQ-30K's layout, no silent overwrite, value checks.


def test_item_seeding_batches_with_one_generator_per_image(ckpts, tmp_path, monkeypatch):
    calls, generate = [], M.MaskGenBase.generate

    def spy(self, *args, generator=None, **kw):
        calls.append(generator)
        return generate(self, *args, generator=generator, **kw)

    monkeypatch.setattr(M.MaskGenBase, "generate", spy)
    args = ["--generator", ckpts["gen"], "--prompt", "a", "--prompt", "b", "--num_images", "3", "--seed", "7"]
    run(args + ["--batch_size", "4"], tmp_path / "a")
    assert [len(g) for g in calls] == [4, 2]  # one call per batch, one generator per image
    assert [g.initial_seed() for g in calls[0] + calls[1]] == [7, 8, 9, 10, 11, 12]
    calls.clear()
    run(args + ["--batch_size", "4", "--seeding", "batch"], tmp_path / "b")
    assert [type(g) for g in calls] == [torch.Generator] * 2 and [g.initial_seed() for g in calls] == [7, 11]
    # Each image is the image a batch of one gives (VQ: the same ids; decoding rounds alike
    # here); the batched run of test_seed_repeatable_and_batch_size_independent covers more.
    calls.clear()
    run(args + ["--batch_size", "1"], tmp_path / "c")
    assert len(calls) == 6
    a, c = folder_pixels(tmp_path / "a"), folder_pixels(tmp_path / "c")
    assert list(a) == list(c) and all(np.abs(a[f].astype(int) - c[f].astype(int)).max() <= 1 for f in a)


def test_negative_prompt_replaces_the_empty_caption(ckpts, tmp_path, monkeypatch):
    # --negative_prompt's encoding is CFG's unconditional branch; without it (or with ""), the
    # empty caption is, and the images are the same bytes.
    nulls, outs, generate = [], [], M.MaskGenBase.generate

    def spy(self, text, pooled, null_text=None, null_pooled=None, **kw):
        nulls.append((null_text, null_pooled))
        outs.append(generate(self, text, pooled, null_text, null_pooled, **kw))
        return outs[-1]

    monkeypatch.setattr(M.MaskGenBase, "generate", spy)
    args = ["--generator", ckpts["gen_kl"], "--prompt", "a red circle", "--num_images", "2", "--guidance_scale", "3"]
    run(args, tmp_path / "plain")
    run(args + ["--negative_prompt", ""], tmp_path / "empty")
    run(args + ["--negative_prompt", "two blue squares"], tmp_path / "neg")
    text = L.load_models(ckpts["gen_kl"], device="cpu").gen_text
    for (null_text, null_pooled), caption in zip(nulls, ["", "", "two blue squares"]):
        want = text([caption])
        assert torch.equal(null_text, want.penultimate) and torch.equal(null_pooled, want.pooled)
    plain, empty = (folder_pixels(tmp_path / d) for d in ("plain", "empty"))
    assert all(np.array_equal(plain[f], empty[f]) for f in plain)
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])  # the tokens guidance drew


def write_mjhq(path, entries):
    path.write_text(json.dumps({i: {"category": c, "prompt": p} for i, c, p in entries}))
    return str(path)


def test_mjhq_layout(ckpts, tmp_path):
    entries = [("0a1b", "animals", "a red circle"), ("77ff", "logo", "two blue squares"), ("c3d4", "animals", "a cat")]
    meta = write_mjhq(tmp_path / "meta_data.json", entries)
    out = tmp_path / "mjhq"
    res = run(["--generator", ckpts["gen"], "--mjhq", meta, "--batch_size", "2"], out)
    assert sorted(os.listdir(out)) == ["animals", "grid.png", "logo", "prompts.jsonl"]
    assert sorted(os.listdir(out / "animals")) == ["0a1b.png", "c3d4.png"] and os.listdir(out / "logo") == ["77ff.png"]
    assert sorted(res["images"]) == sorted(str(out / c / f"{i}.png") for i, c, _ in entries)
    rows = [json.loads(x) for x in open(out / "prompts.jsonl")]
    assert rows == [{"id": i, "category": c, "prompt": p} for i, c, p in entries]
    # Seeds as for any prompt list: image of entry p uses seed + p.
    run(["--generator", ckpts["gen"], "--prompt", "a red circle", "--prompt", "two blue squares"], tmp_path / "flat")
    assert np.array_equal(pixels(out / "logo" / "77ff.png"), pixels(tmp_path / "flat" / "00001_s0001.png"))
    # A shorter metadata file in the same folder: the dropped id is another run's image.
    meta = write_mjhq(tmp_path / "meta_data.json", entries[:1] + entries[2:])
    with pytest.raises(ValueError, match=r"already holds 1 image.*logo/77ff.png.*--overwrite"):
        run(["--generator", ckpts["gen"], "--mjhq", meta], out)
    run(["--generator", ckpts["gen"], "--mjhq", meta, "--overwrite"], out)
    assert sorted(os.listdir(out)) == ["animals", "grid.png", "prompts.jsonl"]  # logo/ emptied and removed
    Image.new("RGB", (8, 8)).save(out / "animals" / "mine.png")  # a PNG no run listed: never ours to delete
    with pytest.raises(ValueError, match=r"holds 1 image file\(s\) sample.py did not write .*mine.png"):
        run(["--generator", ckpts["gen"], "--mjhq", meta, "--overwrite"], out)


def test_mjhq_bad_files_are_named(ckpts, tmp_path):
    out = tmp_path / "out"
    meta = write_mjhq(tmp_path / "meta_data.json", [("a", "animals", "x")])
    cases = {
        "not JSON": ("{oops", r"is not valid JSON .*--mjhq takes MJHQ-30K's meta_data.json"),
        "a list": ('[{"category": "a", "prompt": "b"}]', r"holds a JSON list; MJHQ-30K's meta_data.json is one object"),
        "empty": ("{}", r"holds an empty object"),
        "no prompt": ('{"a": {"category": "animals"}}', r"entry 'a' needs string fields \"category\" and \"prompt\""),
        "bad id": ('{"../a": {"category": "x", "prompt": "p"}}', r"image id '../a', which cannot name a file"),
        "bad category": ('{"a": {"category": "", "prompt": "p"}}', r"category '', which cannot name a file"),
    }
    for name, (text, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=rf"MJHQ metadata file '{bad}'.*{message}|{message}"):
            run(["--generator", ckpts["gen"], "--mjhq", str(bad)], out)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"a": {"category": "x", "prompt": "caf\xe9"}}'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"MJHQ metadata file '{latin1}' is not UTF-8 text"):
        run(["--generator", ckpts["gen"], "--mjhq", str(latin1)], out)
    with pytest.raises(FileNotFoundError, match=r"MJHQ metadata file .*nope.json' does not exist"):
        run(["--generator", ckpts["gen"], "--mjhq", str(tmp_path / "nope.json")], out)
    # A .json given as --prompts used to become one long prompt; now it points to --mjhq.
    with pytest.raises(ValueError, match=rf"--prompts '{meta}' is a .json file.*use --mjhq {meta}"):
        run(["--generator", ckpts["gen"], "--prompts", meta], out)
    with pytest.raises(ValueError, match=r"--mjhq writes one image per id"):
        run(["--generator", ckpts["gen"], "--mjhq", meta, "--num_images", "2"], out)
    with pytest.raises(ValueError, match=r"--mjhq takes its prompts from the metadata file"):
        run(["--generator", ckpts["gen"], "--mjhq", meta, "--prompt", "x"], out)
    assert not out.exists()


def test_outdir_with_other_images_needs_overwrite(ckpts, tmp_path):
    out = tmp_path / "out"
    gen = ["--generator", ckpts["gen"]]
    run(gen + ["--prompt", "a", "--prompt", "b", "--num_images", "2"], out)
    (out / "notes.txt").write_text("mine")
    run(gen + ["--prompt", "a", "--prompt", "b", "--num_images", "2"], out)  # the same files again: no question
    before = folder_pixels(out)
    with pytest.raises(ValueError, match=r"already holds 2 image\(s\) this run will not write.*00001_s000.*pass --overwrite to delete those 2"):
        run(gen + ["--prompt", "a", "--num_images", "2"], out)  # prompt 1's two images would stay
    after = folder_pixels(out)
    assert list(after) == list(before) and all(np.array_equal(before[f], after[f]) for f in before)  # nothing touched
    res = run(gen + ["--prompt", "c", "--overwrite"], out)
    assert sorted(os.listdir(out)) == ["00000_s0000.png", "grid.png", "notes.txt", "prompts.jsonl"]  # only ours went
    assert res["images"] == [str(out / "00000_s0000.png")]
    # An image sample.py never writes is not deleted, even with --overwrite.
    Image.new("RGB", (8, 8)).save(out / "photo.jpg")
    with pytest.raises(ValueError, match=r"holds 1 image file\(s\) sample.py did not write .*photo.jpg.*move them"):
        run(gen + ["--prompt", "c", "--overwrite"], out)
    # GenEval's layout: a shorter run clears the extra prompt folders (metadata included).
    geneval = tmp_path / "meta.jsonl"
    geneval.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    run(gen + ["--geneval", str(geneval), "--num_images", "1"], tmp_path / "ge")
    geneval.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"already holds 1 image"):
        run(gen + ["--geneval", str(geneval), "--num_images", "1"], tmp_path / "ge")
    run(gen + ["--geneval", str(geneval), "--num_images", "1", "--overwrite"], tmp_path / "ge")
    assert sorted(os.listdir(tmp_path / "ge")) == ["00000", "grid.png"]


def test_overwrite_deletes_only_after_the_models_load(ckpts, tmp_path):
    out = tmp_path / "out"
    run(["--generator", ckpts["gen"], "--prompt", "a", "--prompt", "b"], out)
    before = folder_pixels(out)
    with pytest.raises(FileNotFoundError, match=r"generator checkpoint .*nope.* does not exist"):
        run(["--generator", str(tmp_path / "nope"), "--prompt", "c", "--overwrite"], out)
    after = folder_pixels(out)
    assert list(after) == list(before) == ["00000_s0000.png", "00001_s0001.png"]
    assert all(np.array_equal(before[f], after[f]) for f in before)


def test_outdir_naming_a_file_is_refused(ckpts, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ValueError, match=rf"--outdir {tmp_path / 'taken'} is a file, not a folder; move it or choose"):
        run(["--generator", ckpts["gen"], "--prompt", "a"], tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_ctrl_c_says_what_was_written_and_exits_130(ckpts, tmp_path, monkeypatch, capsys):
    real, calls = S.generate_images, []

    def interrupted_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "generate_images", interrupted_on_the_second_batch)
    with pytest.raises(SystemExit) as e:
        run(["--generator", ckpts["gen"], "--prompt", "a", "--num_images", "3", "--batch_size", "1"], tmp_path)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"interrupted: wrote 1 of 3 image(s) to {tmp_path}"
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".png")) == ["00000_s0000.png"]


def test_a_very_long_label_is_cut_in_linear_time():
    one = Image.new("RGB", (32, 32), "white")
    start = time.time()
    grid = S.labelled_grid([[one, one]], ["a red circle " * 16000], [["x" * 200000, "seed 0"]])
    assert time.time() - start < 5 and grid.size == S.labelled_grid([[one, one]], ["x"], [["x", "y"]]).size
    ink = (np.asarray(grid.convert("L"))[4:20] < 128).any(axis=0).nonzero()[0]
    assert 0 < ink[-1] < grid.size[0] - 4  # the label drawn, and cut to the grid's width


@pytest.mark.parametrize("flags, message", [
    (["--guidance_scale", "nan"], r"--guidance_scale must be a finite number, got nan"),
    (["--guidance_scale", "inf"], r"--guidance_scale must be a finite number, got inf"),
    (["--guidance_scale", "-2"], r"--guidance_scale must be >= 0, got -2.0 \(1 = no guidance\)"),
    (["--aesthetic", "6", "nan"], r"--aesthetic must be a finite number, got nan"),
    (["--temperature", "-1"], r"--temperature must be >= 0, got -1.0"),
    (["--randomize_temperature", "inf"], r"--randomize_temperature must be a finite number"),
    (["--steps", "0"], r"--steps must be at least 1, got 0"),
    (["--num_images", "0"], r"--num_images must be at least 1, got 0"),
    (["--batch_size", "0"], r"--batch_size must be at least 1, got 0"),
])  # fmt: skip
def test_bad_values_are_refused_before_work(tmp_path, flags, message):
    # The generator does not exist: the values are refused before it is looked for.
    with pytest.raises(ValueError, match=message):
        run(["--generator", str(tmp_path / "nope"), "--prompt", "x"] + flags, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_temperature_zero_and_devices(ckpts, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--temperature must be > 0 for MaskGen-VQ"):
        run(["--generator", ckpts["gen"], "--prompt", "x", "--temperature", "0"], tmp_path / "vq")
    # KL: temperature scales DiffLoss's noise, and 0 (no noise) is a valid choice.
    run(["--generator", ckpts["gen_kl"], "--prompt", "x", "--temperature", "0", "--grid_rows", "0"], tmp_path / "kl")
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"prompt file '{latin1}' is not UTF-8 text \(byte 3"):
        run(["--prompts", str(latin1)], tmp_path / "out")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device cuda was asked for but torch.cuda.is_available\(\) is False; use --device cpu or auto"):
        S.main(["--prompt", "x", "--device", "cuda", "--outdir", str(tmp_path / "out")])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for pick_device in (S.pick_device, train_common.pick_device):  # one function (checkpoint.py), as both see it
        with pytest.raises(ValueError, match=r"unknown --device 'gpu'"):
            pick_device("gpu")
        with pytest.raises(ValueError, match=r"--device mps was asked for but torch.backends.mps.is_available\(\) is False"):
            pick_device("mps")
        assert pick_device("auto") == torch.device("cpu")


def test_png_writes_are_atomic(tmp_path, monkeypatch):
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    S.save_png(arr, str(tmp_path / "a.png"))
    assert os.listdir(tmp_path) == ["a.png"] and pixels(tmp_path / "a.png").shape == (4, 4, 3)

    def dies_mid_write(self, fp, *a, **k):
        fp.write(b"\x89PNG half")  # into the file object atomic_write opened
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space"):
        S.save_png(arr, str(tmp_path / "b.png"))
    assert os.listdir(tmp_path) == ["a.png"]  # no partial b.png, no temporary file


# -----------------------------------------------------------------------------
# The tokenizer figures (`sample.py tokviz`): Fig. 4 latent-code swapping, Fig. 8 encoder attention maps.


def test_swap_tokens_shapes_and_effect(ckpts):
    src = L.resolve(ckpts["tok"], "tokenizer")
    tok = T.TATiTok(src.config)
    load_checked(tok, src.ckpt["ema"], "tok")
    text = build_text_encoder(*src.text, "tok")
    final = text(["a red circle"]).final
    ids = tok.encode(torch.rand(1, 3, 32, 32))
    out = S.swap_tokens(tok, ids, final, positions=[0, 5], replacements=[1, 2, 3])
    assert out.shape == (2, 3, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    same = S.swap_tokens(tok, ids, final, positions=[5], replacements=[int(ids[0, 5])])  # swap to its own code
    assert torch.allclose(same[0, 0], tok.decode(ids, final).clamp(0, 1), atol=1e-5)
    assert not torch.allclose(out[0, 0], out[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        S.swap_tokens(tok, ids, final, positions=[8], replacements=[1])


def test_encoder_attention_is_the_last_blocks_attention(ckpts):
    tok = T.TATiTok(TOK_VQ).eval()
    images = torch.rand(2, 3, 32, 32)
    attn = S.encoder_attention(tok, images)
    G, K = 4, 8
    assert attn.shape == (2, K, G, G) and (attn >= 0).all()
    assert (attn.sum(dim=(2, 3)) <= 1 + 1e-5).all()
    # The recomputed weights, applied to v, must give the block's own attention output.
    seen = {}
    last = tok.encoder.blocks[-1]
    h = last.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    tok.encoder(images, tok.latent_tokens)
    h.remove()
    x = last.ln_1(seen["x"])
    B, N, W = x.shape
    q, k, v = last.attn.qkv(x).view(B, N, 3, last.attn.heads, -1).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // last.attn.heads), dim=-1)  # (B, h, N, N)
    mine = last.attn.proj((w @ v).transpose(1, 2).reshape(B, N, W))
    assert torch.allclose(mine, last.attn(x), atol=1e-5)
    assert torch.allclose(attn, w.mean(1)[:, 1 + G * G :, 1 : 1 + G * G].reshape(B, K, G, G))
    ov = S.attention_overlays(images[0], attn[0])
    assert ov.shape == (K, 3, 32, 32) and 0 <= ov.min() and ov.max() <= 1


def test_tokviz_command_vq_and_kl(ckpts, tmp_path, image_file):
    res = S.main(["tokviz", "--tokenizer", ckpts["tok"], "--image", image_file, "--caption", "a red circle",
                  "--outdir", str(tmp_path / "vq"), "--positions", "0", "3", "7", "--codes", "1", "2"] + CPU)  # fmt: skip
    assert res["swaps"].shape == (3, 2, 3, 32, 32)
    assert res["attention_maps"].shape == (8, 4, 4) and res["overlays"].shape == (8, 3, 32, 32)
    assert Image.open(res["swap"]).size[1] > 3 * 32 and os.path.isfile(res["attention"])
    # KL: replacements are other tokens' values (here from a second image), default positions.
    res = S.main(["tokviz", "--tokenizer", ckpts["tok_kl"], "--image", image_file, "--swap_image", image_file,
                  "--num_codes", "3", "--outdir", str(tmp_path / "kl")] + CPU)  # fmt: skip
    assert res["swaps"].shape == (8, 3, 3, 32, 32)
    assert os.path.isfile(res["swap"]) and os.path.isfile(res["attention"])

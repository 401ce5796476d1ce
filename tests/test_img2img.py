"""Image-to-image on tiny random models, on CPU: MaskGen's generate(init_tokens=, strength=) for
VQ (MaskGIT decoding) and KL (MAR decoding) -- strength 0 is exactly the tokenizer's
reconstruction, 1 exactly plain generation, in between round(strength K) tokens are redrawn and
decoding joins the schedule where that many remain masked -- and sample.py --init_image /
--strength, with its one-line refusals."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as L
import maskgen as M
import sample as S
import tokenizer as T
from data import load_image
from text import TEXT_PRESETS, TextEncoder
from test_sample import CPU, GEN_KL, GEN_VQ, TOK_KL, folder_pixels, save_generator_run, save_tokenizer_run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

CAPTIONS = ["a red circle", "two blue squares", "a green triangle"]


def tiny(mode):
    """(tokenizer, generator, text encoder), random, with K = 8 tokens; the VQ generator makes 8
    steps (K = 8: one token a step at the end of its schedule), the KL one 4 steps of MAR."""
    torch.manual_seed(0)
    tok = T.TATiTok(T.PRESETS["tiny" if mode == "vq" else "tiny_kl"]).eval()
    gen = M.build(M.preset_for(f"tiny_{mode}", tok.config, 32, 32)).eval()
    return tok, gen, TextEncoder.from_config(**TEXT_PRESETS["tiny"]).eval()


@pytest.fixture(scope="module", params=["vq", "kl"])
def models(request):
    return tiny(request.param)


def gens(seeds=(0, 1, 2)):
    return [torch.Generator().manual_seed(s) for s in seeds]


def run_generate(gen, text, init=None, guidance=3.0, **kw):
    """The three captions, one generator per image (seeds 0, 1, 2); init: 1 or 3 rows of tokens."""
    null, t = text([""]), text(CAPTIONS)
    return gen.generate(t.penultimate, t.pooled, null.penultimate, null.pooled, guidance_scale=guidance,
                        generator=gens(), init_tokens=init, **kw)  # fmt: skip


@torch.no_grad()
def test_strength_0_is_exactly_the_reconstruction(models):
    tok, gen, text = models
    images = torch.rand(3, 3, 32, 32)
    init = tok.encode(images)  # VQ (3, K) | KL (3, K, C) means
    tokens = run_generate(gen, text, init, strength=0.0)
    assert torch.equal(tokens, init)
    final = text(CAPTIONS).final
    assert torch.equal(tok.decode(tokens, final), tok.decode(tok.encode(images), final))


@torch.no_grad()
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_strength_1_is_exactly_plain_generation(models, guidance):
    tok, gen, text = models
    init = tok.encode(torch.rand(1, 3, 32, 32))
    plain = run_generate(gen, text, guidance=guidance)
    assert torch.equal(run_generate(gen, text, init, guidance=guidance, strength=1.0), plain)
    # Any strength that rounds to all K tokens is plain generation too (K = 8: 0.95 K = 7.6 -> 8).
    assert torch.equal(run_generate(gen, text, init, guidance=guidance, strength=0.95), plain)
    assert not torch.equal(run_generate(gen, text, init, guidance=guidance, strength=0.5), plain)


@torch.no_grad()
@pytest.mark.parametrize("strength", [0.25, 0.5, 0.75])
def test_a_share_of_the_tokens_is_redrawn_at_seeded_positions(models, strength):
    tok, gen, text = models
    K, kl = gen.config.num_tokens, gen.config.mode == "kl"
    init = tok.encode(torch.rand(1, 3, 32, 32))
    out = run_generate(gen, text, init, strength=strength)
    same = (out == init).all(-1) if kl else out == init  # (3, K)
    kept = K - round(strength * K)
    if kl:  # redrawn tokens are continuous: exactly the kept ones equal the image's
        assert same.sum(1).tolist() == [kept] * 3
    else:  # a redrawn id may happen to equal the image's
        assert (same.sum(1) >= kept).all() and not same.all()
    assert torch.equal(run_generate(gen, text, init, strength=strength), out)  # the same seeds, the same tokens
    # Positions come from the generators: the three images (seeds 0, 1, 2) keep different sets.
    assert len({tuple(row.tolist()) for row in same}) > 1


@torch.no_grad()
def test_one_init_row_serves_every_prompt_and_each_image_equals_its_own_call(models):
    tok, gen, text = models
    init = tok.encode(torch.rand(1, 3, 32, 32))
    batched = run_generate(gen, text, init, strength=0.5)  # 3 prompts, one image's tokens
    null, t = text([""]), text(CAPTIONS)
    for b in range(3):
        alone = gen.generate(t.penultimate[b : b + 1], t.pooled[b : b + 1], null.penultimate, null.pooled,
                             guidance_scale=3.0, generator=gens()[b : b + 1], init_tokens=init, strength=0.5)  # fmt: skip
        if gen.config.mode == "vq":
            assert torch.equal(alone[0], batched[b])
        else:  # the same draws; only matmul rounding (batch of 3 vs 1) differs, as in test_maskgen.py
            assert (alone[0] - batched[b]).abs().max() <= 2e-5 * batched[b].abs().max()


@pytest.mark.parametrize("mode", ["vq", "kl"])
@pytest.mark.parametrize("strength", [1.0, 0.75, 0.5, 0.125])
def test_decoding_joins_the_schedule_where_that_many_remain_masked(mode, strength, monkeypatch):
    # K = 16 (the tiny presets as they are), 8 VQ steps / 4 KL steps. Count the trunk passes and
    # record how many tokens are still masked at each: the first equals round(strength K) and
    # the later ones are plain generation's own counts.
    torch.manual_seed(0)
    cfg = M.PRESETS[f"tiny_{mode}"]
    gen, K, N = M.build(cfg).eval(), cfg.num_tokens, cfg.num_steps
    seen = []
    if mode == "vq":
        predict = gen.predict
        monkeypatch.setattr(gen, "predict", lambda ids, *a: seen.append(int((ids[0] == gen.mask_id).sum())) or predict(ids, *a))
        plain_counts = [K] + M.vq_mask_schedule(K, N)[:-1]  # masked at the start of each step
    else:
        conditions = gen.token_conditions
        monkeypatch.setattr(gen, "token_conditions", lambda x, m, *a: seen.append(int(m[0].sum())) or conditions(x, m, *a))
        plain_counts = [hi for _, hi, _ in M.kl_draw_schedule(K, N)]
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(1, 7, cfg.text_width, generator=g), torch.randn(1, cfg.pooled_dim, generator=g)
    init = torch.randint(0, cfg.codebook_size, (1, K)) if mode == "vq" else torch.randn(1, K, cfg.token_size)
    n = round(strength * K)
    gen.generate(text, pooled, guidance_scale=1.0, generator=g, init_tokens=init, strength=strength)
    assert seen[0] == n
    later = [m for m in plain_counts if m < n]
    assert seen[1:] == later  # then plain generation's counts, nothing skipped, nothing repeated
    if strength == 1.0:
        assert seen == plain_counts


def test_bad_init_tokens_and_strengths_are_explained():
    tok, gen, text = tiny("vq")
    t = text(["a red circle"])
    ids = tok.encode(torch.rand(1, 3, 32, 32))
    run = lambda **kw: gen.generate(t.penultimate, t.pooled, guidance_scale=1.0, **kw)  # noqa: E731
    for strength in (1.5, -0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"strength.*\[0, 1\]"):
            run(init_tokens=ids, strength=strength)
    with pytest.raises(ValueError, match="alone"):
        run(strength=0.5)
    with pytest.raises(ValueError, match=r"init_tokens must be \(1 or 1, 8\) integer ids in \[0, 64\), TATiTok"):
        run(init_tokens=ids.float(), strength=0.5)
    with pytest.raises(ValueError, match=r"init_tokens must be"):
        run(init_tokens=ids[:, :4], strength=0.5)
    for bad in (ids + 64, ids - 64):
        with pytest.raises(ValueError, match=r"integer ids in \[0, 64\)"):
            run(init_tokens=bad, strength=0.5)
    _, kl, _ = tiny("kl")
    with pytest.raises(ValueError, match=r"init_tokens must be \(1 or 1, 8, 4\) float tokens"):
        kl.generate(t.penultimate, t.pooled, guidance_scale=1.0, init_tokens=ids, strength=0.5)


# -----------------------------------------------------------------------------
# sample.py --init_image / --strength.


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("i2i")
    tok, tok_kl = save_tokenizer_run(d / "tok"), save_tokenizer_run(d / "tok_kl", TOK_KL)
    image = d / "scene.png"
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(40, 48, 3) * 255).astype(np.uint8)).save(image)  # not square: resized + cropped
    return {"vq": save_generator_run(d / "gen", GEN_VQ, tok), "kl": save_generator_run(d / "gen_kl", GEN_KL, tok_kl),
            "image": str(image)}  # fmt: skip


def sample(args, outdir):
    return S.main(args + ["--outdir", str(outdir)] + CPU)


@pytest.mark.parametrize("mode", ["vq", "kl"])
def test_cli_strength_0_writes_the_reconstruction_and_1_plain_samples(ckpts, tmp_path, mode):
    base = ["--generator", ckpts[mode], "--prompt", "a red circle", "--prompt", "two blue squares", "--num_images", "2"]
    sample(base, tmp_path / "plain")
    sample(base + ["--init_image", ckpts["image"], "--strength", "1"], tmp_path / "s1")
    assert {f: v.tobytes() for f, v in folder_pixels(tmp_path / "s1").items()} == \
        {f: v.tobytes() for f, v in folder_pixels(tmp_path / "plain").items()}  # fmt: skip
    sample(base + ["--init_image", ckpts["image"], "--strength", "0"], tmp_path / "s0")
    models, tok = L.load_models(ckpts[mode], None, "cpu"), None
    with torch.no_grad():  # decoded as sample.py does: the four images in one batch
        tok = models.tokenizer
        tokens = tok.encode(load_image(ckpts["image"], tok.config.image_size)[None])  # (1, K) | (1, K, C)
        final = models.tok_text(["a red circle"] * 2 + ["two blue squares"] * 2).final
        recon = S.to_pixels(tok.decode(tokens.expand(4, *tokens.shape[1:]), final))  # (4, S, S, 3)
    written = folder_pixels(tmp_path / "s0")
    for i, f in enumerate(["00000_s0000.png", "00000_s0001.png", "00001_s0002.png", "00001_s0003.png"]):
        assert np.array_equal(written[f], recon[i])
    sample(base + ["--init_image", ckpts["image"]], tmp_path / "half")  # the default strength, 0.5
    assert folder_pixels(tmp_path / "half").keys() == folder_pixels(tmp_path / "plain").keys()


def test_cli_refuses_bad_input_in_one_line(ckpts, tmp_path):
    base = ["--generator", ckpts["vq"], "--prompt", "a red circle"]
    for extra, message in [(["--strength", "0.5"], "needs --init_image"),
                           (["--init_image", ckpts["image"], "--strength", "1.5"], r"must be in \[0, 1\]"),
                           (["--init_image", ckpts["image"], "--strength", "-0.1"], r"must be in \[0, 1\]"),
                           (["--init_image", str(tmp_path / "nope.png")], "does not exist")]:  # fmt: skip
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            sample(base + extra, tmp_path / "out")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a PNG at all")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "sample.py"] + base + ["--init_image", str(broken), "--outdir", str(tmp_path / "o")] + CPU
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: --init_image {str(broken)!r} is not a readable image")

"""TA-TiTok on the tiny presets: shapes, gradients, KL, text use, errors. (Official-checkpoint
round trips are in test_checkpoint.py.)"""

import subprocess
import sys

import pytest
import torch

import tokenizer as T
from text import TEXT_PRESETS, TextEncoder


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return TextEncoder.from_config(**TEXT_PRESETS["tiny"])


@pytest.fixture(scope="module")
def text(text_encoder):
    return text_encoder(["a red circle", "two blue squares"])


@pytest.mark.parametrize("preset", ["tiny", "tiny_kl"])
def test_shapes(preset, text):
    torch.manual_seed(0)
    m = T.TATiTok(T.PRESETS[preset])
    c = m.config
    x = torch.rand(2, 3, c.image_size, c.image_size)
    tok = m.encode(x)
    if c.quantize_mode == "vq":
        assert tok.shape == (2, c.num_latent_tokens) and tok.dtype == torch.long
        assert 0 <= tok.min() and tok.max() < c.codebook_size
    else:
        assert tok.shape == (2, c.num_latent_tokens, c.token_size) and tok.is_floating_point()
        post = m.encode(x, return_posterior=True)
        assert post.mean.shape == post.logvar.shape == tok.shape
        assert torch.equal(post.mode(), tok)
    assert m.decode(tok, text.final).shape == x.shape
    rec, extras = m(x, text.final)
    assert rec.shape == x.shape


def test_text_features(text_encoder, text):
    assert text.final.shape == (2, text_encoder.context_length, text_encoder.width)
    assert text.penultimate.shape == text.final.shape
    assert text.pooled.shape == (2, text_encoder.embed_dim)
    # final = ln_final(last block(penultimate)): recompute it by hand.
    blk = text_encoder.transformer.resblocks[-1]
    manual = text_encoder.ln_final(blk(text.penultimate, attn_mask=text_encoder.attn_mask))
    assert torch.allclose(manual, text.final, atol=1e-5)
    # pooled is read at the end-of-text token, so padding after it changes nothing,
    # and a different caption changes it.
    other = text_encoder(["a red circle", "three green triangles"])
    assert torch.allclose(other.pooled[0], text.pooled[0], atol=1e-6)
    assert not torch.allclose(other.pooled[1], text.pooled[1])
    assert not any(p.requires_grad for p in text_encoder.parameters())
    text_encoder.train()
    assert not text_encoder.training  # stays frozen in eval mode


def test_straight_through_gradients(text):
    torch.manual_seed(0)
    m = T.TATiTok(T.PRESETS["tiny"])
    x = torch.rand(2, 3, 32, 32)
    rec, extras = m(x, text.final)
    loss = (rec - x).pow(2).mean() + extras["quantizer_loss"]
    loss.backward()
    # The reconstruction loss reaches the encoder only through the straight-through copy.
    g = m.encoder.patch_embed.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert m.latent_tokens.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad.abs().sum() > 0  # codebook loss trains the codes


def test_block_keep_computes_only_the_kept_rows():
    # The last encoder/decoder block returns only the rows that are used; each must equal
    # the same row of the full block, gradients included.
    torch.manual_seed(0)
    blk = T.Block(32, 4)
    x = torch.randn(2, 11, 32, requires_grad=True)
    keep = slice(3, 9)
    full, part = blk(x)[:, keep], blk(x, keep)
    assert part.shape == (2, 6, 32)
    torch.testing.assert_close(part, full, rtol=0, atol=1e-6)
    (g_full,) = torch.autograd.grad(full.square().sum(), x)
    (g_part,) = torch.autograd.grad(part.square().sum(), x)
    torch.testing.assert_close(g_part, g_full, rtol=0, atol=1e-5)


def test_quantizer_picks_nearest_code():
    q = T.VectorQuantizer(16, 4, clustering_vq=False)
    z = q.embedding.weight[torch.tensor([[3, 7, 11]])] + 1e-4  # (1, 3, 4): near codes 3, 7, 11
    zq, out = q(z)
    assert out["ids"].tolist() == [[3, 7, 11]]
    assert torch.allclose(zq, q.embedding.weight[[3, 7, 11]][None], atol=1e-3)


def test_clustering_vq_revives_dead_codes():
    torch.manual_seed(0)
    q = T.VectorQuantizer(8, 2, clustering_vq=True).train()
    # Every feature sits far from the tiny initial codebook, so a single code wins them all.
    z = 10 + 0.1 * torch.randn(1, 64, 2)
    before = q.embedding.weight.detach().clone()
    _, out = q(z)
    assert torch.equal(q.embedding.weight, before)  # the forward only collects statistics
    q.revive_codes()  # the trainer's once-per-step call
    used = out["ids"].unique()
    assert len(used) == 1
    moved = (q.embedding.weight - before).norm(dim=1)
    dead = torch.ones(8, dtype=torch.bool)
    dead[used] = False
    # The seven unused codes jump onto features (|z| ~ 14); the used one stays put.
    assert (moved[dead] > 10).all() and moved[used].item() < 1e-6
    assert torch.isclose(q.embed_prob.sum(), torch.tensor(0.01))  # usage EMA: (1 - 0.99) * 1
    _, out = q(z)
    assert len(out["ids"].unique()) > 1  # the revived codes now take part


def test_revival_of_micro_batches_equals_revival_of_their_concatenation():
    """Gradient accumulation: revival over micro-batches collected one after the other is
    the revival over the whole global batch (what torchrun over ranks gathers), including
    which feature a code moves to when several are equally near (the earliest)."""
    torch.manual_seed(0)
    a = T.VectorQuantizer(16, 3, clustering_vq=True).train()
    b = T.VectorQuantizer(16, 3, clustering_vq=True).train()
    b.load_state_dict(a.state_dict())
    init = a.embedding.weight.detach().clone()
    z = 5 + torch.randn(4, 8, 3)
    z[2] = z[0]  # exact ties between micro-batches: the first one must win
    a(z)  # one global batch
    for part in z.chunk(4):  # four micro-batches of one image
        b(part)
    a.revive_codes(), b.revive_codes()
    assert torch.equal(a.embedding.weight, b.embedding.weight) and torch.equal(a.embed_prob, b.embed_prob)
    assert (a.embedding.weight - init).norm(dim=1).max() > 1  # dead codes did move
    # Nothing collected since: a second call changes nothing.
    w = a.embedding.weight.clone()
    a.revive_codes()
    assert torch.equal(a.embedding.weight, w)


def test_kl_nonnegative_and_zero_at_prior():
    torch.manual_seed(0)
    post = T.DiagonalGaussian(torch.randn(4, 8, 6) * 3)
    assert (post.kl() >= 0).all() and post.kl().shape == (4,)
    prior = T.DiagonalGaussian(torch.zeros(4, 8, 6))  # mean 0, logvar 0 = N(0, I)
    assert torch.allclose(prior.kl(), torch.zeros(4))
    s = post.sample(generator=torch.Generator().manual_seed(1))
    assert s.shape == post.mean.shape


@pytest.mark.parametrize("preset", ["tiny", "tiny_kl"])
def test_decoder_uses_text(preset, text_encoder):
    torch.manual_seed(0)
    m = T.TATiTok(T.PRESETS[preset]).eval()
    with torch.no_grad():  # weights of a trained scale, so the text's effect is not tiny
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tok = m.encode(torch.rand(1, 3, 32, 32))
    a = m.decode(tok, text_encoder(["a red circle"]).final)
    b = m.decode(tok, text_encoder(["three yellow triangles"]).final)
    assert torch.equal(a, m.decode(tok, text_encoder(["a red circle"]).final))  # deterministic
    assert (a - b).abs().max() > 1e-3


def test_wrong_inputs_are_rejected(text):
    m = T.TATiTok(T.PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        m.encode(torch.rand(2, 3, 64, 64))
    tok = m.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="text_hidden"):
        m.decode(tok, torch.zeros(2, 77, 768))
    with pytest.raises(ValueError, match="out of range"):
        m.decode(torch.full_like(tok, 10_000), text.final)
    with pytest.raises(ValueError, match="quantize_mode"):
        T.TATiTok(T.TATiTokConfig(quantize_mode="fsq"))


def test_presets_match_paper():
    p = T.PRESETS
    assert (p["tatitok_bl32_vq"].enc_width, p["tatitok_bl32_vq"].dec_width) == (768, 1024)
    assert (p["tatitok_sl128_vae"].enc_width, p["tatitok_sl128_vae"].enc_depth) == (512, 8)
    assert p["tatitok_bl128_vq"].num_latent_tokens == 128 and p["tatitok_bl64_vae"].token_size == 16
    assert p["tatitok_bl32_vq"].codebook_size == 8192 and p["tatitok_bl32_vq"].token_size == 64


def test_import_is_silent():
    out = subprocess.run([sys.executable, "-c", "import tokenizer"], capture_output=True, text=True, cwd=".")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


def test_local_init_breaks_attention_symmetry():
    # init="local" (the shapes presets) changes values only: the same parameters as the
    # official init, with k = q in every attention, 2D sin-cos positions, and tokens whose
    # content actually reaches the output at step 0 (with the official init it does not).
    import dataclasses

    def make(init, preset="tiny"):
        torch.manual_seed(0)
        return T.TATiTok(dataclasses.replace(T.PRESETS[preset], init=init)).eval()

    off, loc = make("official"), make("local")
    assert {k: v.shape for k, v in off.state_dict().items()} == {k: v.shape for k, v in loc.state_dict().items()}
    W = loc.config.enc_width
    for blk in [*loc.encoder.blocks, *loc.decoder.blocks]:
        assert torch.equal(blk.attn.qkv.weight[:W], blk.attn.qkv.weight[W : 2 * W])
    G = loc.config.image_size // loc.config.enc_patch_size
    assert torch.allclose(loc.encoder.positional_embedding[1:], 10 * T.sincos_2d(G, W))

    def token_effect(m):  # how much giving each image another image's tokens changes the output
        g = torch.Generator().manual_seed(1)
        x, text = torch.rand(4, 3, 32, 32, generator=g), torch.randn(4, 16, 32, generator=g)
        with torch.no_grad():
            z = m.encode(x)  # KL posterior means: continuous, so every difference shows
            a, b = m.decode(z, text), m.decode(z.roll(1, dims=0), text)
        return ((a - b).abs().mean() / a.std()).item()

    assert token_effect(make("local", "tiny_kl")) > 100 * token_effect(make("official", "tiny_kl"))
    with pytest.raises(ValueError, match="init must be"):
        T.TATiTok(dataclasses.replace(T.PRESETS["tiny"], init="xavier"))


def test_local_init_scales_the_decoder_input_of_l2_codes():
    # A unit-norm code has per-channel RMS 1/sqrt(C): with l2-normalised VQ codes the local
    # init multiplies the decoder's input projection by sqrt(C) (the same draws otherwise),
    # so a code enters the decoder at a KL token's scale. Without l2 codes nothing changes.
    import dataclasses

    def embed(**kw):
        torch.manual_seed(0)
        return T.TATiTok(dataclasses.replace(T.PRESETS["tiny"], init="local", **kw)).decoder.decoder_embed.weight

    C = T.PRESETS["tiny"].token_size
    assert torch.allclose(embed(use_l2_norm=True), C**0.5 * embed(use_l2_norm=False))
    assert T.PRESETS["shapes"].use_l2_norm and T.PRESETS["shapes"].init == "local"  # the shipped VQ recipe uses it

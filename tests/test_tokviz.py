"""tokviz.py: the tokenizer figures (Fig. 4 latent-code swapping, Fig. 8 encoder attention maps)."""

import math
import os

import pytest
import torch
from PIL import Image

import checkpoint as L
import tokenizer as T
import tokviz
from checkpoint import load_checked
from test_sample import CPU, TOK_VQ, ckpts, image_file  # noqa: F401 (fixtures: tiny checkpoints, an image)
from text import build_text_encoder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_swap_tokens_shapes_and_effect(ckpts):
    src = L.resolve(ckpts["tok"], "tokenizer")
    tok = T.TATiTok(src.config)
    load_checked(tok, src.ckpt["ema"], "tok")
    text = build_text_encoder(*src.text, "tok")
    final = text(["a red circle"]).final
    ids = tok.encode(torch.rand(1, 3, 32, 32))
    out = tokviz.swap_tokens(tok, ids, final, positions=[0, 5], replacements=[1, 2, 3])
    assert out.shape == (2, 3, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    same = tokviz.swap_tokens(tok, ids, final, positions=[5], replacements=[int(ids[0, 5])])  # swap to its own code
    assert torch.allclose(same[0, 0], tok.decode(ids, final).clamp(0, 1), atol=1e-5)
    assert not torch.allclose(out[0, 0], out[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        tokviz.swap_tokens(tok, ids, final, positions=[8], replacements=[1])


def test_encoder_attention_is_the_last_blocks_attention(ckpts):
    tok = T.TATiTok(TOK_VQ).eval()
    images = torch.rand(2, 3, 32, 32)
    attn = tokviz.encoder_attention(tok, images)
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
    ov = tokviz.attention_overlays(images[0], attn[0])
    assert ov.shape == (K, 3, 32, 32) and 0 <= ov.min() and ov.max() <= 1


def test_tokviz_command_vq_and_kl(ckpts, tmp_path, image_file):
    res = tokviz.main(["--tokenizer", ckpts["tok"], "--image", image_file, "--caption", "a red circle",
                  "--outdir", str(tmp_path / "vq"), "--positions", "0", "3", "7", "--codes", "1", "2"] + CPU)  # fmt: skip
    assert res["swaps"].shape == (3, 2, 3, 32, 32)
    assert res["attention_maps"].shape == (8, 4, 4) and res["overlays"].shape == (8, 3, 32, 32)
    assert Image.open(res["swap"]).size[1] > 3 * 32 and os.path.isfile(res["attention"])
    # KL: replacements are other tokens' values (here from a second image), default positions.
    res = tokviz.main(["--tokenizer", ckpts["tok_kl"], "--image", image_file, "--swap_image", image_file,
                  "--num_codes", "3", "--outdir", str(tmp_path / "kl")] + CPU)  # fmt: skip
    assert res["swaps"].shape == (8, 3, 3, 32, 32)
    assert os.path.isfile(res["swap"]) and os.path.isfile(res["attention"])

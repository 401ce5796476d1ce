"""text.py's own small CLIP text tower and tokenizer against open_clip's: the same weights
from the same seed, the same token ids, the same features; and the quickstart path never
imports open_clip (nor, through tokenizer.py, torch._dynamo), which is what makes it fast."""

import os
import subprocess
import sys

import pytest
import torch

import text
from text import TEXT_PRESETS, TextEncoder

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [
    "a red circle to the left of a blue square",
    "three green triangles",
    "A Photo of a CAT, sitting on a mat!",  # case, punctuation
    "  café   naïve 東京 😀 &amp; don't  ",  # accents, CJK, emoji, HTML entity, whitespace
    "",  # the null caption of classifier-free guidance
    "one " * 40,  # longer than the context: truncated, end-of-text kept last
]


def open_clip_encoder(name, seed):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = TEXT_PRESETS[name]
    torch.manual_seed(seed)
    tower = _build_text_tower(cfg["embed_dim"], CLIPTextCfg(**cfg["text_cfg"]))
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=tower.context_length)
    return TextEncoder(_tower=tower, _tokenizer=tok)


@pytest.mark.parametrize("name", sorted(TEXT_PRESETS))
def test_small_tower_matches_open_clip(name):
    theirs = open_clip_encoder(name, seed=3)
    torch.manual_seed(3)
    ours = TextEncoder.from_config(**TEXT_PRESETS[name])
    # Same names, shapes and init drawn in the same order: identical weights from one seed.
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert torch.equal(ours.attn_mask, theirs.attn_mask)
    # Same tokenizer, same maths.
    ids = ours.tokenizer(CAPTIONS)
    assert torch.equal(ids, theirs.tokenizer(CAPTIONS))
    f_ours, f_theirs = ours(ids), theirs(ids)
    for x, y in zip(f_ours, f_theirs):
        assert torch.allclose(x, y, atol=1e-5), (x - y).abs().max()
    # Weights from either load into the other (the shipped bundles carry open_clip-built ones).
    torch.manual_seed(4)
    other = TextEncoder.from_config(**TEXT_PRESETS[name])
    assert not torch.allclose(other(ids).pooled, f_ours.pooled)
    other.load_state_dict(theirs.state_dict())
    assert torch.allclose(other(ids).pooled, f_theirs.pooled, atol=1e-5)


def test_unknown_tower_field_is_named():
    cfg = dict(TEXT_PRESETS["tiny"]["text_cfg"], quick_gelu=True)
    with pytest.raises(ValueError, match=r"unknown fields \['quick_gelu'\]"):
        TextEncoder.from_config(cfg, 32)


def test_tokenizer_keeps_end_of_text_when_truncating():
    ids = text.clip_tokenizer(16)(["one " * 40, "a red circle"])
    assert ids.shape == (2, 16)
    assert ids[0, -1] == ids.max() == 49407  # end-of-text is the largest id: pooling finds it
    assert ids[1].argmax() == 4 and (ids[1, 5:] == 0).all()  # start, 3 words, end, then padding


def test_quickstart_imports_neither_open_clip_nor_dynamo(tmp_path):
    # In a fresh interpreter: load the shipped VQ bundle and draw one image, as the quickstart
    # does, then list which slow packages got imported.
    code = f"""
import sys, torch
dynamo_with_torch = "torch._dynamo" in sys.modules  # a torch that imports it itself: not ours to test
import sample
sample.main(["--prompt", "a red circle", "--outdir", {str(tmp_path)!r}, "--device", "cpu"])
slow = [m for m in ("open_clip", "timm", "torchvision") if m in sys.modules]
if not dynamo_with_torch and "torch._dynamo" in sys.modules:
    slow.append("torch._dynamo")
print("SLOW", slow)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SLOW []" in out.stdout, out.stdout[-500:]
    assert (tmp_path / "grid.png").is_file()


def test_cached_features_equal_forward_and_encode_each_caption_once():
    torch.manual_seed(0)
    enc = TextEncoder.from_config(**TEXT_PRESETS["shapes"])
    calls = []
    forward = enc.forward
    enc.forward = lambda c: calls.append(list(c)) or forward(c)  # count the tower's passes
    batch = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], ""]  # a repeat inside the batch
    got = enc.cached(batch)
    want = forward(batch)
    for g, w in zip(got, want):  # final, penultimate, pooled: same rows, same order
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert calls == [[CAPTIONS[0]], [CAPTIONS[1]], [""]]  # each new caption alone, once
    again = enc.cached(["", CAPTIONS[1]])  # all known: no tower pass, the memo's exact rows
    assert len(calls) == 3
    assert torch.equal(again.pooled, torch.cat([got.pooled[3:4], got.pooled[1:2]]))

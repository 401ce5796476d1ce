"""The official release format (official.py): TA-TiTok and MaskGen written as release
directories and read back exactly, the q/k/v layouts, lazy reading, and the error messages."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import official
import tokenizer as T
from maskgen import PRESETS, MaskGen, MaskGenVQ
from official import fuse_qkv, split_qkv
from text import TEXT_PRESETS, TextEncoder

B, L = 3, 7  # batch, text length


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def text():
    torch.manual_seed(0)
    return TextEncoder.from_config(**TEXT_PRESETS["tiny"])(["a red circle", "two blue squares"])


def text_inputs(cfg, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, L, cfg.text_width, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g)


def make(name, seed=0):
    torch.manual_seed(seed)
    return MaskGen(PRESETS[name]).eval()


# ---------------------------------------------------------------------------- TA-TiTok


@pytest.mark.parametrize("preset", ["tiny", "tiny_kl"])
def test_tatitok_round_trip(preset, tmp_path, text):
    torch.manual_seed(0)
    m = T.TATiTok(T.PRESETS[preset]).eval()
    with torch.no_grad():  # non-trivial weights everywhere, so a wrong mapping shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = official.state_dict(m)
    # The official names, e.g. nn.MultiheadAttention's fused projection and the 1x1 convs.
    assert "encoder.transformer.0.attn.in_proj_weight" in sd
    assert sd["decoder.ffn.0.weight"].ndim == 4 and sd["encoder.conv_out.weight"].ndim == 4
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(official.config(m)))
    m2 = T.TATiTok.from_official(str(tmp_path)).eval()
    assert m2.config == m.config
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.encode(x), m2.encode(x))
        tok = m.encode(x)
        assert torch.equal(m.decode(tok, text.final), m2.decode(tok, text.final))

    # The same directory with pytorch_model.bin instead of safetensors.
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    m3 = T.TATiTok.from_official(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m3.state_dict().values()))


def test_tatitok_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.TATiTok.from_official(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        T.TATiTok.from_official(str(tmp_path))
    m = T.TATiTok(T.PRESETS["tiny"])
    (tmp_path / "config.json").write_text(json.dumps(official.config(m)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        T.TATiTok.from_official(str(tmp_path))
    sd = official.state_dict(m)
    sd.pop("decoder.mask_token")
    sd["decoder.extra_weight"] = torch.zeros(3)
    sd["latent_tokens"] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(RuntimeError) as e:
        T.TATiTok.from_official(str(tmp_path))
    msg = str(e.value)
    assert "decoder.mask_token" in msg and "decoder.extra_weight" in msg and "latent_tokens" in msg


# ---------------------------------------------------------------------------- MaskGen


def write_official(model, path, fmt="safetensors", drop=(), rename=None, config_edit=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg = official.config(model)
    if config_edit:
        config_edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in official.state_dict(model).items() if k not in drop}
    if rename:
        sd[rename[1]] = sd.pop(rename[0])
    if fmt == "safetensors":
        save_file(sd, str(path / "model.safetensors"))
    else:  # the .bin layout keeps the tied lm_head as an extra (shared) tensor
        if model.config.mode == "vq":
            sd["lm_head.weight"] = sd["embeddings.weight"]
        torch.save(sd, path / "pytorch_model.bin")
    return path


def test_fused_qkv_layout_converts_both_ways():
    for model in (make("tiny_vq", seed=4), make("tiny_kl", seed=4)):
        sd = model.state_dict()
        old = split_qkv(sd, copy=True)  # the layout of checkpoints from before the fusion
        last = f"blocks.{model.config.depth - 1}.attn."
        assert {f"{last}txt_k.weight", f"{last}txt_v.weight"} <= old.keys() and f"{last}txt_q.weight" not in old
        assert "blocks.0.attn.img_qkv.weight" not in old and "blocks.0.attn.txt_q.bias" in old
        D = model.config.width
        assert torch.equal(old["blocks.0.attn.img_k.weight"], sd["blocks.0.attn.img_qkv.weight"][D : 2 * D])
        back = fuse_qkv(old)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        # an incomplete set of parts is left as it is, so a strict load names it
        del old["blocks.0.attn.img_v.bias"]
        partial = fuse_qkv(old)
        assert "blocks.0.attn.img_q.bias" in partial and "blocks.0.attn.img_qkv.bias" not in partial


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_maskgen_round_trip(tmp_path, fmt):
    vq, kl = make("tiny_vq", seed=3), make("tiny_kl", seed=3)
    for model in (vq, kl):
        sd = official.state_dict(model)
        assert "lm_head.weight" not in sd and any(k.endswith("attn.add_q_proj.weight") for k in sd)
        loaded = MaskGen.from_official(write_official(model, tmp_path / f"{model.config.mode}_{fmt}", fmt)).eval()
        assert type(loaded) is type(model) and loaded.config == model.config
        text, pooled = text_inputs(model.config)
        if model.config.mode == "vq":
            ids = torch.randint(0, 65, (B, 16))
            assert torch.equal(model.logits(ids, text, pooled, 5.0), loaded.logits(ids, text, pooled, 5.0))
            assert loaded.head_weight.untyped_storage().data_ptr() == loaded.tok_emb.weight.untyped_storage().data_ptr()
            # a file that kept the shared table under the head's name loads the same
            alt_dir = tmp_path / f"alt_{fmt}"
            alt = MaskGen.from_official(write_official(model, alt_dir, rename=("embeddings.weight", "lm_head.weight")))
            assert torch.equal(alt.tok_emb.weight, model.tok_emb.weight)
        else:
            txt, cond = model.encode_condition(text, pooled, 5.0)
            x, mask = torch.randn(B, 8, 4), (torch.rand(B, 8) < 0.5).float()
            assert torch.equal(model.token_conditions(x, mask, txt, cond), loaded.token_conditions(x, mask, txt, cond))
            xt, t, c = torch.randn(5, 4), torch.randint(0, 1000, (5,)), torch.randn(5, 64)
            assert torch.equal(model.diffloss.net(xt, t, c), loaded.diffloss.net(xt, t, c))


def test_maskgen_errors(tmp_path):
    vq, kl = make("tiny_vq"), make("tiny_kl")
    with pytest.raises(FileNotFoundError, match="does not exist.*huggingface-cli download"):
        MaskGen.from_official(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MaskGen.from_official(tmp_path / "empty")

    # a renamed key is reported as missing (its official name) and unexpected
    p = write_official(vq, tmp_path / "renamed", rename=("blocks.0.attn.to_q.weight", "blocks.0.attn.q.weight"))
    expected = r"(?s)missing keys \(1\).*blocks\.0\.attn\.to_q\.weight.*" r"unexpected keys \(1\).*blocks\.0\.attn\.q\.weight.*Fix"
    with pytest.raises(RuntimeError, match=expected):
        MaskGen.from_official(p)
    p = write_official(kl, tmp_path / "dropped", drop=("diffloss.net.final_layer.linear.weight",))
    with pytest.raises(RuntimeError, match=r"missing keys \(1\):\n    diffloss\.net\.final_layer\.linear\.weight"):
        MaskGen.from_official(p)

    # weights that do not fit config.json: every mismatched tensor is named
    def wider(cfg):
        cfg["model"]["maskgen"]["decoder_embed_dim"] = 128

    expected = r"(?s)shape mismatches \(56\).*" r"blocks\.0\.attn\.to_q\.weight: checkpoint \(64, 64\) vs model \(128, 128\)"
    with pytest.raises(RuntimeError, match=expected):
        MaskGen.from_official(write_official(vq, tmp_path / "wider", config_edit=wider))

    def not_maskgen(cfg):
        del cfg["model"]["maskgen"]

    with pytest.raises(ValueError, match="not a MaskGen config.json: missing field 'maskgen'"):
        MaskGen.from_official(write_official(vq, tmp_path / "bad_cfg", config_edit=not_maskgen))
    with pytest.raises(ValueError, match="MaskGen-KL"):
        MaskGenVQ.from_official(write_official(kl, tmp_path / "kl"))


# ---------------------------------------------------------------------------- both


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_release_is_read_one_tensor_at_a_time(tmp_path, fmt):
    # load_weights asks the release for each tensor once, after every shape has been checked
    # from the file's header, so a 1.1B-parameter release is never held twice in memory.
    vq = make("tiny_vq")
    path = write_official(vq, tmp_path / "vq", fmt)
    release = official.Release(path)
    gets, get = [], release.get
    release.get = lambda key: gets.append(key) or get(key)
    loaded = official.load_weights(MaskGen(vq.config, init_weights=False), release)
    last_q = f"blocks.{vq.config.depth - 1}.attn.add_q_proj"  # unused, not read (nor the tied lm_head)
    assert sorted(gets) == sorted(set(release.keys) - {f"{last_q}.weight", f"{last_q}.bias", "lm_head.weight"})
    assert all(torch.equal(a, b) for a, b in zip(vq.state_dict().values(), loaded.state_dict().values()))


def test_save_writes_a_loadable_release(tmp_path):
    tok, vq = T.TATiTok(T.PRESETS["tiny_kl"]), make("tiny_vq")
    for model, load in ((tok, T.TATiTok.from_official), (vq, MaskGen.from_official)):
        path = official.save(model, tmp_path / type(model).__name__)
        assert json.loads((tmp_path / type(model).__name__ / "config.json").read_text()) == official.config(model)
        loaded = load(path)
        assert loaded.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_imports_are_silent():
    for module in ("official", "checkpoint", "text", "mmdit", "schedules", "load"):
        out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=".")
        assert out.returncode == 0 and out.stdout == "" and out.stderr == "", module

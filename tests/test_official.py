"""The official release format (official.py): TA-TiTok and MaskGen written as release
directories and read back exactly, the q/k/v layouts, lazy reading, and the error messages."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import load as LD
import official
import sample as S
import tokenizer as T
from checkpoint import CheckpointError, torch_load
from maskgen import PRESETS, MaskGenBase, MaskGenVQ, build
from official import fuse_qkv, split_qkv
from test_sample import ckpts, tiny_text  # noqa: F401 (fixture: tiny runs and a bundle)
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
    return build(PRESETS[name]).eval()


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
        last = f"trunk.blocks.{model.config.depth - 1}.attn."
        assert {f"{last}txt_k.weight", f"{last}txt_v.weight"} <= old.keys() and f"{last}txt_q.weight" not in old
        assert "trunk.blocks.0.attn.img_qkv.weight" not in old and "trunk.blocks.0.attn.txt_q.bias" in old
        D = model.config.width
        assert torch.equal(old["trunk.blocks.0.attn.img_k.weight"], sd["trunk.blocks.0.attn.img_qkv.weight"][D : 2 * D])
        back = fuse_qkv(old)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        # trunk keys held at the top level (no "trunk." prefix) are nested under trunk.
        flat = {k.removeprefix("trunk."): v for k, v in old.items()}
        back = fuse_qkv(flat)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        # an incomplete set of parts is left as it is, so a strict load names it
        del old["trunk.blocks.0.attn.img_v.bias"]
        partial = fuse_qkv(old)
        assert "trunk.blocks.0.attn.img_q.bias" in partial and "trunk.blocks.0.attn.img_qkv.bias" not in partial


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_maskgen_round_trip(tmp_path, fmt):
    vq, kl = make("tiny_vq", seed=3), make("tiny_kl", seed=3)
    for model in (vq, kl):
        sd = official.state_dict(model)
        assert "lm_head.weight" not in sd and any(k.endswith("attn.add_q_proj.weight") for k in sd)
        loaded = MaskGenBase.from_official(write_official(model, tmp_path / f"{model.config.mode}_{fmt}", fmt)).eval()
        assert type(loaded) is type(model) and loaded.config == model.config
        text, pooled = text_inputs(model.config)
        if model.config.mode == "vq":
            ids = torch.randint(0, 65, (B, 16))
            assert torch.equal(model.logits(ids, text, pooled, 5.0), loaded.logits(ids, text, pooled, 5.0))
            assert loaded.head_weight.untyped_storage().data_ptr() == loaded.tok_emb.weight.untyped_storage().data_ptr()
            # a file that kept the shared table under the head's name loads the same
            alt_dir = tmp_path / f"alt_{fmt}"
            alt = MaskGenBase.from_official(write_official(model, alt_dir, rename=("embeddings.weight", "lm_head.weight")))
            assert torch.equal(alt.tok_emb.weight, model.tok_emb.weight)
        else:
            txt, cond = model.trunk.encode_condition(text, pooled, 5.0)
            x, mask = torch.randn(B, 8, 4), (torch.rand(B, 8) < 0.5).float()
            assert torch.equal(model.token_conditions(x, mask, txt, cond), loaded.token_conditions(x, mask, txt, cond))
            xt, t, c = torch.randn(5, 4), torch.randint(0, 1000, (5,)), torch.randn(5, 64)
            assert torch.equal(model.diffloss.net(xt, t, c), loaded.diffloss.net(xt, t, c))


def test_maskgen_errors(tmp_path):
    vq, kl = make("tiny_vq"), make("tiny_kl")
    with pytest.raises(FileNotFoundError, match="does not exist.*huggingface-cli download"):
        MaskGenBase.from_official(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MaskGenBase.from_official(tmp_path / "empty")

    # a renamed key is reported as missing (its official name) and unexpected
    p = write_official(vq, tmp_path / "renamed", rename=("blocks.0.attn.to_q.weight", "blocks.0.attn.q.weight"))
    expected = r"(?s)missing keys \(1\).*blocks\.0\.attn\.to_q\.weight.*" r"unexpected keys \(1\).*blocks\.0\.attn\.q\.weight.*Fix"
    with pytest.raises(RuntimeError, match=expected):
        MaskGenBase.from_official(p)
    p = write_official(kl, tmp_path / "dropped", drop=("diffloss.net.final_layer.linear.weight",))
    with pytest.raises(RuntimeError, match=r"missing keys \(1\):\n    diffloss\.net\.final_layer\.linear\.weight"):
        MaskGenBase.from_official(p)

    # weights that do not fit config.json: every mismatched tensor is named
    def wider(cfg):
        cfg["model"]["maskgen"]["decoder_embed_dim"] = 128

    expected = r"(?s)shape mismatches \(56\).*" r"blocks\.0\.attn\.to_q\.weight: checkpoint \(64, 64\) vs model \(128, 128\)"
    with pytest.raises(RuntimeError, match=expected):
        MaskGenBase.from_official(write_official(vq, tmp_path / "wider", config_edit=wider))

    def not_maskgen(cfg):
        del cfg["model"]["maskgen"]

    with pytest.raises(ValueError, match="not a MaskGen config.json: missing field 'maskgen'"):
        MaskGenBase.from_official(write_official(vq, tmp_path / "bad_cfg", config_edit=not_maskgen))
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
    loaded = official.load_weights(build(vq.config, init_weights=False), release)
    last_q = f"blocks.{vq.config.depth - 1}.attn.add_q_proj"  # unused, not read (nor the tied lm_head)
    assert sorted(gets) == sorted(set(release.keys) - {f"{last_q}.weight", f"{last_q}.bias", "lm_head.weight"})
    assert all(torch.equal(a, b) for a, b in zip(vq.state_dict().values(), loaded.state_dict().values()))


def test_save_writes_a_loadable_release(tmp_path):
    tok, vq = T.TATiTok(T.PRESETS["tiny_kl"]), make("tiny_vq")
    for model, load in ((tok, T.TATiTok.from_official), (vq, MaskGenBase.from_official)):
        path = model.save_official(tmp_path / type(model).__name__)  # official.save
        assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
        assert json.loads((tmp_path / type(model).__name__ / "config.json").read_text()) == official.config(model)
        loaded = load(path)
        assert loaded.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_imports_are_silent():
    for module in ("official", "checkpoint", "text", "maskgen", "load"):
        out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=".")
        assert out.returncode == 0 and out.stdout == "" and out.stderr == "", module


# ---------------------------------------------------------------------------- export


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_round_trips_bit_for_bit(ckpts, tmp_path):
    # A tokenizer run: the release fills --out; its text tower is recorded beside it.
    out = tmp_path / "tok"
    assert S.main(["export", ckpts["tok"], "--out", str(out)]) == {"tokenizer": str(out)}
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "text_encoder.safetensors"]
    assert json.loads((out / "config.json").read_text())["text_encoder"] == {"name": "tiny", "pretrained": "openai"}
    tok, _ = LD.load_tokenizer(ckpts["tok"])  # the EMA weights the samplers use
    loaded = T.TATiTok.from_official(out)
    assert loaded.config == tok.config and same_weights(loaded, tok)
    assert same_weights(LD.load_tokenizer(str(out))[1], tiny_text())

    # A MaskGen run (VQ; KL with its own text record) and a bundle: generator/ and tokenizer/.
    for name in ("gen", "gen_kl", "bundle"):
        out = tmp_path / name
        S.main(["export", ckpts[name], "--out", str(out)])
        assert sorted(os.listdir(out)) == ["generator", "tokenizer"]
        src = LD.load_generator(ckpts[name])
        loaded = MaskGenBase.from_official(out / "generator")
        assert loaded.config == src.model.config and same_weights(loaded, src.model), name
        tok_ref = ckpts[name] if name == "bundle" else ckpts["tok_kl" if name == "gen_kl" else "tok"]
        assert same_weights(T.TATiTok.from_official(out / "tokenizer"), LD.load_tokenizer(tok_ref)[0]), name
        m = LD.load_models(str(out / "generator"), str(out / "tokenizer"))  # text encoders travel too
        assert m.gen_text is m.tok_text and same_weights(m.tok_text, LD.load_tokenizer(tok_ref)[1])

    # One part only: --which generator fills --out itself; a tokenizer has no generator.
    S.main(["export", ckpts["gen"], "--out", str(tmp_path / "g"), "--which", "generator"])
    assert same_weights(MaskGenBase.from_official(tmp_path / "g"), LD.load_generator(ckpts["gen"]).model)
    S.main(["export", ckpts["bundle"], "--out", str(tmp_path / "t"), "--which", "tokenizer"])
    assert sorted(os.listdir(tmp_path / "t")) == ["config.json", "model.safetensors", "text_encoder.safetensors"]
    assert same_weights(T.TATiTok.from_official(tmp_path / "t"), LD.load_tokenizer(ckpts["bundle"])[0])
    with pytest.raises(ValueError, match=r"is a TA-TiTok tokenizer; it holds no generator: use --which tokenizer"):
        S.main(["export", ckpts["tok"], "--out", str(tmp_path / "t2"), "--which", "both"])
    # A checkpoint that does not say which text encoder it was trained with cannot make a usable release.
    ck = torch.load(os.path.join(ckpts["tok"], "ckpt_00000010.pt"), weights_only=True)
    torch.save({**ck, "config": {}, "text_encoder": None}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"the tokenizer .*old.pt' does not record the text encoder it was trained"):
        S.main(["export", str(tmp_path / "old.pt"), "--out", str(tmp_path / "t2")])
    assert not (tmp_path / "t2").exists()


def test_export_never_overwrites_silently(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out .*rel' is not empty \(it holds notes.txt\); pass --overwrite"):
        S.main(["export", ckpts["tok"], "--out", str(out)])
    assert os.listdir(out) == ["notes.txt"]
    S.main(["export", ckpts["tok"], "--out", str(out), "--overwrite"])  # replaces what export writes only
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt", "text_encoder.safetensors"]
    with pytest.raises(ValueError, match=r"--out .*notes.txt' is a file; give a directory"):
        S.main(["export", ckpts["tok"], "--out", str(out / "notes.txt")])

    # A failure while writing leaves --out as it was, and no temporary folder behind.
    def fail(model, path, **extra):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "config.json"), "w").write("{")
        raise OSError("disk full")

    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    monkeypatch.setattr(official, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        S.main(["export", ckpts["gen"], "--out", str(out), "--overwrite"])
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["rel"]
    with pytest.raises(OSError, match="disk full"):
        S.main(["export", ckpts["gen"], "--out", str(tmp_path / "new")])
    assert sorted(os.listdir(tmp_path)) == ["rel"]


def test_bundle_never_overwrites_silently(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "b.pt"
    out.write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"--out .*b.pt' exists; pass --overwrite to replace it"):
        S.main(["bundle", "--generator", ckpts["gen"], "--out", str(out)])
    assert out.read_bytes() == b"precious"
    # The shipped model is refused like any file, before any work.
    shipped = LD.DEFAULT_CHECKPOINT
    stat = os.stat(shipped)
    with pytest.raises(ValueError, match=r"shapes.pt' exists; pass --overwrite"):
        S.main(["bundle", "--generator", ckpts["gen"], "--out", shipped])
    assert os.stat(shipped).st_mtime_ns == stat.st_mtime_ns and not os.path.exists(shipped + ".tmp")
    S.main(["bundle", "--generator", ckpts["gen"], "--out", str(out), "--overwrite"])
    assert set(torch.load(out, weights_only=True)) == {"tokenizer", "generator"}

    # --out naming a directory: a clear error, and no stray DIR.tmp (as there was).
    with pytest.raises(ValueError, match=r"--out .*' is a directory; give the file to write"):
        S.main(["bundle", "--generator", ckpts["gen"], "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["b.pt"]

    # A failure mid-write (a full disk): no file, no temporary file.
    def fail(obj, f):
        f.write(b"half a bundle")
        raise OSError("disk full")

    monkeypatch.setattr(LD.torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        S.main(["bundle", "--generator", ckpts["gen"], "--out", str(tmp_path / "new.pt")])
    assert sorted(os.listdir(tmp_path)) == ["b.pt"]


# ---------------------------------------------------------------------------- load errors


class NotAWeight:  # pickled into a file below: weights_only loading must refuse it
    pass


def test_unreadable_checkpoints_are_named_without_torchs_advice(ckpts, tmp_path):
    torch.save({"ema": {"w": torch.ones(2)}, "x": NotAWeight()}, tmp_path / "custom.pt")
    good = open(os.path.join(ckpts["gen"], "ckpt_00000020.pt"), "rb").read()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    expected = {
        "custom.pt": r"is not a checkpoint this project wrote: it holds a Python object of type "
                     r"test_official.NotAWeight, which is not loaded because unpickling it could run code",
        "cut.pt": r"is damaged or incomplete \(torch: PytorchStreamReader failed",
        "text.pt": r"is not a PyTorch checkpoint file",
        "empty.pt": r"is empty, not a checkpoint",
    }  # fmt: skip
    for name, why in expected.items():
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError, match=f"^'{path}' {why}") as e:
            torch_load(path)
        assert "weights_only" not in str(e.value) and "safe_globals" not in str(e.value), name
        with pytest.raises(ValueError, match=f"^'{path}' {why}"):  # sample.py prints it as "error: ..."
            S.main(["--generator", path, "--prompt", "x", "--device", "cpu", "--outdir", str(tmp_path / "o")])


def test_bad_release_files_are_named(tmp_path):
    model = T.TATiTok(T.PRESETS["tiny"])
    path = tmp_path / "rel"
    model.save_official(path)
    cfg = str(path / "config.json")
    for content, why in ((b"", "is empty"), (b"not json", r"is not valid JSON \(Expecting value at line 1, column 1\)"),
                         (b"[1, 2]", "holds a JSON list, not the object"), (b"\xff\xfe\x00", r"is not a text file"),
                         (b'{"model": {}}', r"is not a TA-TiTok config: missing field 'vq_model'"),
                         (b'{"model": {"vq_model": 3}, "dataset": {"preprocessing": {"crop_size": 32}}}',
                          r"is not a TA-TiTok config: a field of the wrong kind")):  # fmt: skip
        (path / "config.json").write_bytes(content)
        with pytest.raises(ValueError, match=f"^{cfg} {why}"):
            T.TATiTok.from_official(path)
        with pytest.raises(ValueError, match=f"^{cfg} {why}"):
            LD.load_tokenizer(str(path))
    model.save_official(path)
    (path / "model.safetensors").write_bytes(b"garbage" * 3)
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(.*header.*\); "
                                         r"it is damaged or incomplete"):  # fmt: skip
        T.TATiTok.from_official(path)


def test_bundle_sampling_defaults(ckpts, tmp_path):
    # --sampling replaces generate() defaults in the bundle's generator config, nothing else;
    # the loaded model samples with them.
    out = S.main(["bundle", "--generator", ckpts["gen"], "--out", str(tmp_path / "b.pt"),
                  "--sampling", "guidance_scale=2", "num_steps=3", "guidance_schedule=linear"])  # fmt: skip
    before = torch.load(os.path.join(ckpts["gen"], "ckpt_00000020.pt"), weights_only=True)["maskgen_config"]
    cfg = torch.load(out, weights_only=True)["generator"]["maskgen_config"]
    assert (cfg["guidance_scale"], cfg["num_steps"], cfg["guidance_schedule"]) == (2.0, 3, "linear")
    assert before["guidance_scale"] != 2.0 and before["num_steps"] != 3
    assert {k: v for k, v in cfg.items() if k not in LD.SAMPLING_FIELDS} == {
        k: v for k, v in before.items() if k not in LD.SAMPLING_FIELDS}
    assert LD.load_models(out, None, "cpu").generator.config.guidance_scale == 2.0
    # Bad values fail before anything is written, naming the key and the fix.
    for bad, msg in [("guidance=2", "KEY one of num_steps"), ("num_steps=2.5", "'2.5' is not an int"),
                     ("guidance_scale=-1", "guidance_scale must be a finite number"),
                     ("guidance_schedule=zigzag", "zigzag")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            S.main(["bundle", "--generator", ckpts["gen"], "--out", str(tmp_path / "bad.pt"), "--sampling", bad])
        assert not os.path.exists(tmp_path / "bad.pt")

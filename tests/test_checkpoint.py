"""checkpoint.py: the release layout (TA-TiTok and MaskGen written as release directories and
read back exactly, the q/k/v layouts, lazy reading, the error messages), export, Hugging Face
Hub ids (offline, from a Hub cache laid out as huggingface_hub lays it out:
models--owner--name/{blobs, snapshots/<commit>, refs/<branch or tag>}), and the two shipped
models (checkpoints/shapes/, VQ; checkpoints/shapes_kl/, KL): the quickstart draws with each,
and each tokenizer is the frozen tokenizer of `train_maskgen.py` and `data.py pretokenize`."""

import glob
import hashlib
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import save_file

import checkpoint as C
import data
import evaluate
import sample as S
import shapes
import tokenizer as T
import train_maskgen
from checkpoint import CheckpointError, torch_load
from maskgen import PRESETS, build, split_qkv
from test_sample import CPU, GEN_VQ, ckpts, pixels, save_generator_run, save_tokenizer_run, tiny_text  # noqa: F401
from text import TEXT_PRESETS, TextEncoder

B, L = 3, 7  # batch, text length


def tok_from(ref, **kw):
    """A TA-TiTok from any reference, without its text encoder."""
    return C.load_tokenizer(ref, with_text=False, **kw)[0]



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
    sd = C.release_state_dict(m)
    # The official names, e.g. nn.MultiheadAttention's fused projection and the 1x1 convs.
    assert "encoder.transformer.0.attn.in_proj_weight" in sd
    assert sd["decoder.ffn.0.weight"].ndim == 4 and sd["encoder.conv_out.weight"].ndim == 4
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(C.release_config(m)))
    m2 = tok_from(str(tmp_path)).eval()
    assert m2.config == m.config
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.encode(x), m2.encode(x))
        tok = m.encode(x)
        assert torch.equal(m.decode(tok, text.final), m2.decode(tok, text.final))

    # The same directory with pytorch_model.bin instead of safetensors.
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    m3 = tok_from(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m3.state_dict().values()))


def test_tatitok_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tok_from(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        tok_from(str(tmp_path))
    m = T.TATiTok(T.PRESETS["tiny"])
    (tmp_path / "config.json").write_text(json.dumps(C.release_config(m)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        tok_from(str(tmp_path))
    sd = C.release_state_dict(m)
    sd.pop("decoder.mask_token")
    sd["decoder.extra_weight"] = torch.zeros(3)
    sd["latent_tokens"] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(RuntimeError) as e:
        tok_from(str(tmp_path))
    msg = str(e.value)
    assert "decoder.mask_token" in msg and "decoder.extra_weight" in msg and "latent_tokens" in msg


# ---------------------------------------------------------------------------- MaskGen


def write_official(model, path, fmt="safetensors", drop=(), rename=None, config_edit=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg = C.release_config(model)
    if config_edit:
        config_edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in C.release_state_dict(model).items() if k not in drop}
    if rename:
        sd[rename[1]] = sd.pop(rename[0])
    if fmt == "safetensors":
        save_file(sd, str(path / "model.safetensors"))
    else:  # the .bin layout keeps the tied lm_head as an extra (shared) tensor
        if model.config.mode == "vq":
            sd["lm_head.weight"] = sd["embeddings.weight"]
        torch.save(sd, path / "pytorch_model.bin")
    return path


def test_split_qkv_shows_the_official_separate_projections():
    for model in (make("tiny_vq", seed=4), make("tiny_kl", seed=4)):
        sd = model.state_dict()
        parts = split_qkv(sd, copy=True)  # the official layout: separate q, k, v
        last = f"trunk.blocks.{model.config.depth - 1}.attn."
        assert {f"{last}txt_k.weight", f"{last}txt_v.weight"} <= parts.keys() and f"{last}txt_q.weight" not in parts
        assert "trunk.blocks.0.attn.img_qkv.weight" not in parts and "trunk.blocks.0.attn.txt_q.bias" in parts
        D = model.config.width
        assert torch.equal(parts["trunk.blocks.0.attn.img_k.weight"], sd["trunk.blocks.0.attn.img_qkv.weight"][D : 2 * D])
        # views (not copies) write into the fused weight: how a release's to_q/to_k/to_v are loaded
        views = split_qkv(sd)
        views["trunk.blocks.0.attn.img_v.bias"].fill_(7.0)
        assert (model.state_dict()["trunk.blocks.0.attn.img_qkv.bias"][2 * D :] == 7.0).all()
        assert not parts["trunk.blocks.0.attn.img_v.bias"].eq(7.0).all()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_maskgen_round_trip(tmp_path, fmt):
    vq, kl = make("tiny_vq", seed=3), make("tiny_kl", seed=3)
    for model in (vq, kl):
        sd = C.release_state_dict(model)
        assert "lm_head.weight" not in sd and any(k.endswith("attn.add_q_proj.weight") for k in sd)
        loaded = C.load_generator(write_official(model, tmp_path / f"{model.config.mode}_{fmt}", fmt)).eval()
        assert type(loaded) is type(model) and loaded.config == model.config
        text, pooled = text_inputs(model.config)
        if model.config.mode == "vq":
            ids = torch.randint(0, 65, (B, 16))
            assert torch.equal(model.logits(ids, text, pooled, 5.0), loaded.logits(ids, text, pooled, 5.0))
            assert loaded.head_weight.untyped_storage().data_ptr() == loaded.tok_emb.weight.untyped_storage().data_ptr()
            # a file that kept the shared table under the head's name loads the same
            alt_dir = tmp_path / f"alt_{fmt}"
            alt = C.load_generator(write_official(model, alt_dir, rename=("embeddings.weight", "lm_head.weight")))
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
        C.load_generator(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        C.load_generator(tmp_path / "empty")

    # a renamed key is reported as missing (its official name) and unexpected
    p = write_official(vq, tmp_path / "renamed", rename=("blocks.0.attn.to_q.weight", "blocks.0.attn.q.weight"))
    expected = r"(?s)missing keys \(1\).*blocks\.0\.attn\.to_q\.weight.*" r"unexpected keys \(1\).*blocks\.0\.attn\.q\.weight.*Fix"
    with pytest.raises(RuntimeError, match=expected):
        C.load_generator(p)
    p = write_official(kl, tmp_path / "dropped", drop=("diffloss.net.final_layer.linear.weight",))
    with pytest.raises(RuntimeError, match=r"missing keys \(1\):\n    diffloss\.net\.final_layer\.linear\.weight"):
        C.load_generator(p)

    # weights that do not fit config.json: every mismatched tensor is named
    def wider(cfg):
        cfg["model"]["maskgen"]["decoder_embed_dim"] = 128

    expected = r"(?s)shape mismatches \(56\).*" r"blocks\.0\.attn\.to_q\.weight: checkpoint \(64, 64\) vs model \(128, 128\)"
    with pytest.raises(RuntimeError, match=expected):
        C.load_generator(write_official(vq, tmp_path / "wider", config_edit=wider))

    def not_maskgen(cfg):
        del cfg["model"]["maskgen"]

    with pytest.raises(ValueError, match="not a MaskGen config.json: missing field 'maskgen'"):
        C.config_kwargs(C.read_config(write_official(vq, tmp_path / "bad_cfg", config_edit=not_maskgen)), maskgen=True)


# ---------------------------------------------------------------------------- both


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_release_is_read_one_tensor_at_a_time(tmp_path, fmt):
    # load_weights asks the release for each tensor once, after every shape has been checked
    # from the file's header, so a 1.1B-parameter release is never held twice in memory.
    vq = make("tiny_vq")
    path = write_official(vq, tmp_path / "vq", fmt)
    release = C.Release(path)
    gets, get = [], release.get
    release.get = lambda key: gets.append(key) or get(key)
    loaded = C.load_weights(build(vq.config, init_weights=False), release)
    last_q = f"blocks.{vq.config.depth - 1}.attn.add_q_proj"  # unused, not read (nor the tied lm_head)
    assert sorted(gets) == sorted(set(release.keys) - {f"{last_q}.weight", f"{last_q}.bias", "lm_head.weight"})
    assert all(torch.equal(a, b) for a, b in zip(vq.state_dict().values(), loaded.state_dict().values()))


def test_save_writes_a_loadable_release(tmp_path):
    tok, vq = T.TATiTok(T.PRESETS["tiny_kl"]), make("tiny_vq")
    for model, load in ((tok, tok_from), (vq, C.load_generator)):
        path = C.save_release(model, tmp_path / type(model).__name__)
        assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
        sha = {"model.safetensors": hashlib.sha256(open(os.path.join(path, "model.safetensors"), "rb").read()).hexdigest()}
        want = {**C.release_config(model), "extra_fields": {"sha256": sha}}  # the official layout + the file's hash
        assert json.loads((tmp_path / type(model).__name__ / "config.json").read_text()) == want
        loaded = load(path)
        assert loaded.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_imports_are_silent():
    for module in ("checkpoint", "text", "maskgen"):
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
    tok, _ = C.load_tokenizer(ckpts["tok"])  # the EMA weights the samplers use
    loaded = tok_from(out)
    assert loaded.config == tok.config and same_weights(loaded, tok)
    assert same_weights(C.load_tokenizer(str(out))[1], tiny_text())

    # A MaskGen run (VQ; KL with its own text record) and a release pair: generator/ and tokenizer/.
    for name in ("gen", "gen_kl", "release"):
        out = tmp_path / name
        S.main(["export", ckpts[name], "--out", str(out)])
        assert sorted(os.listdir(out)) == ["generator", "tokenizer"]
        src = C.load_generator(ckpts[name])
        loaded = C.load_generator(out / "generator")
        assert loaded.config == src.config and same_weights(loaded, src), name
        tok_ref = C.resolve(ckpts[name], "generator").tokenizer if name == "release" else ckpts["tok_kl" if name == "gen_kl" else "tok"]
        assert same_weights(tok_from(out / "tokenizer"), C.load_tokenizer(tok_ref)[0]), name
        m = C.load_models(str(out / "generator"), str(out / "tokenizer"))  # text encoders travel too
        assert m.gen_text is m.tok_text and same_weights(m.tok_text, C.load_tokenizer(tok_ref)[1])

    # One part only: --which generator fills --out itself; a tokenizer has no generator.
    S.main(["export", ckpts["gen"], "--out", str(tmp_path / "g"), "--which", "generator"])
    assert same_weights(C.load_generator(tmp_path / "g"), C.load_generator(ckpts["gen"]))
    S.main(["export", ckpts["release"], "--out", str(tmp_path / "t"), "--which", "tokenizer"])
    assert sorted(os.listdir(tmp_path / "t")) == ["config.json", "model.safetensors", "text_encoder.safetensors"]
    assert same_weights(tok_from(tmp_path / "t"), C.load_tokenizer(C.resolve(ckpts["release"], "generator").tokenizer)[0])
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
    def fail(model, path, *args, **extra):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "config.json"), "w").write("{")
        raise OSError("disk full")

    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    monkeypatch.setattr(C, "save_release", fail)
    with pytest.raises(OSError, match="disk full"):
        S.main(["export", ckpts["gen"], "--out", str(out), "--overwrite"])
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["rel"]
    with pytest.raises(OSError, match="disk full"):
        S.main(["export", ckpts["gen"], "--out", str(tmp_path / "new")])
    assert sorted(os.listdir(tmp_path)) == ["rel"]


def test_export_never_overwrites_the_shipped_model(ckpts):
    # The shipped model is refused like any non-empty directory, before any work.
    shipped = os.path.join(C.DEFAULT_RELEASE, "generator")
    before = {f: os.stat(os.path.join(shipped, f)).st_mtime_ns for f in os.listdir(shipped)}
    with pytest.raises(ValueError, match=r"shapes' is not empty \(it holds generator, tokenizer\); pass --overwrite"):
        S.main(["export", ckpts["gen"], "--out", C.DEFAULT_RELEASE])
    assert {f: os.stat(os.path.join(shipped, f)).st_mtime_ns for f in os.listdir(shipped)} == before
    assert not [f for f in os.listdir(os.path.dirname(C.DEFAULT_RELEASE)) if f.endswith(".tmp")]


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
                     r"test_checkpoint.NotAWeight, which is not loaded because unpickling it could run code",
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
    C.save_release(model, path)
    cfg = str(path / "config.json")
    for content, why in ((b"", "is empty"), (b"not json", r"is not valid JSON \(Expecting value at line 1, column 1\)"),
                         (b"[1, 2]", "holds a JSON list, not the object"), (b"\xff\xfe\x00", r"is not a text file"),
                         (b'{"model": {}}', r"is not a TA-TiTok config: missing field 'vq_model'"),
                         (b'{"model": {"vq_model": 3}, "dataset": {"preprocessing": {"crop_size": 32}}}',
                          r"is not a TA-TiTok config: a field of the wrong kind")):  # fmt: skip
        (path / "config.json").write_bytes(content)
        with pytest.raises(ValueError, match=f"^{cfg} {why}"):
            tok_from(path)
        with pytest.raises(ValueError, match=f"^{cfg} {why}"):
            C.load_tokenizer(str(path))
    C.save_release(model, path)
    (path / "model.safetensors").write_bytes(b"garbage" * 3)
    with pytest.raises(ValueError, match=r"model.safetensors has sha256 [0-9a-f]{16}, but .*config.json records"):
        tok_from(path)
    (path / "config.json").write_text(json.dumps(C.release_config(model)))  # no hashes recorded, as official
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(.*header.*\); "
                                         r"it is damaged or incomplete"):  # fmt: skip
        tok_from(path)


def test_release_keeps_every_setting_and_refuses_nonfinite_weights(tmp_path):
    # Settings the official config.json has no field for (init, pos_init_std, diffloss_clip_x0,
    # a VQ softmax temperature) travel in its "extra_fields"; a release of an official-size
    # model has none. Sampling defaults edited in config.json are what the loaded model uses.
    import dataclasses

    kl = build(dataclasses.replace(PRESETS["tiny_kl"], pos_init_std=1.0, diffloss_clip_x0=3.0, temperature=0.5,
                                     guidance_schedule="constant", num_sampling_steps="7", num_steps=5))  # fmt: skip
    vq = build(dataclasses.replace(PRESETS["tiny_vq"], temperature=0.7, randomize_temperature=1.25, guidance_scale=1.5))
    tok = T.TATiTok(dataclasses.replace(T.PRESETS["tiny"], init="local"))
    for model, load in ((kl, C.load_generator), (vq, C.load_generator), (tok, tok_from)):
        path = C.save_release(model, tmp_path / type(model).__name__)
        assert load(path).config == model.config, type(model).__name__
    extra = json.loads((tmp_path / "MaskGenKL" / "config.json").read_text())["extra_fields"]
    assert {k: v for k, v in extra.items() if k != "sha256"} == {"pos_init_std": 1.0, "diffloss_clip_x0": 3.0}
    for official_size in (PRESETS["maskgen_vq_l"], PRESETS["maskgen_kl_l"], T.PRESETS["tatitok_bl32_vq"]):
        assert "extra_fields" not in C.release_config(types.SimpleNamespace(config=official_size))
    cfg = json.loads((tmp_path / "MaskGenVQ" / "config.json").read_text())
    cfg["model"]["maskgen"].update(cfg=2.0, num_iter=3)
    del cfg["extra_fields"]["sha256"]  # the file is rewritten below
    (tmp_path / "MaskGenVQ" / "config.json").write_text(json.dumps(cfg))
    loaded = C.load_generator(tmp_path / "MaskGenVQ")
    assert (loaded.config.guidance_scale, loaded.config.num_steps) == (2.0, 3)

    # Non-finite weights: refused, naming the file and the tensor.
    sd = C.release_state_dict(vq)
    sd["blocks.0.attn.to_q.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "MaskGenVQ" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"MaskGenVQ/model.safetensors holds non-finite weights \(nan or inf: "
                                         r"blocks\.0\.attn\.to_q\.weight\); re-download"):  # fmt: skip
        C.load_generator(tmp_path / "MaskGenVQ")


# ---------------------------------------------------------------------------- Hub ids

C1, C2 = "1a" * 20, "2b" * 20  # two commits (40 hex digits, as the Hub names them)


def put(cache, repo_id, release_dir, commit, refs):
    """Add `release_dir` to a Hub cache as snapshot `commit` of `repo_id`: each file a blob
    named by its hash, the snapshot's files symlinks to the blobs, refs/<ref> the commit."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for sub in ("blobs", "refs"):
        (root / sub).mkdir(exist_ok=True)
    for name in sorted(os.listdir(release_dir)):
        blob = (root / "blobs" / hashlib.sha256((release_dir / name).read_bytes()).hexdigest())
        blob.write_bytes((release_dir / name).read_bytes())
        (snap / name).symlink_to(os.path.join("..", "..", "blobs", blob.name))
    for ref in refs:
        (root / "refs" / ref).write_text(commit)



@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two tiny runs (a TA-TiTok, a MaskGen-VQ on it, with the tiny text tower), exported and
    put in a Hub cache: owner/tatitok (C1 = tag v1; C2, another tokenizer = main) and
    owner/maskgen (C1 = main and v1)."""
    d = tmp_path_factory.mktemp("hub")
    runs = {"tok": save_tokenizer_run(d / "tok"), "tok2": save_tokenizer_run(d / "tok2", seed=7)}
    runs["gen"] = save_generator_run(d / "gen", GEN_VQ, runs["tok"])
    C.export_release(runs["gen"], str(d / "rel"))  # rel/generator, rel/tokenizer
    C.export_release(runs["tok2"], str(d / "rel2"))
    cache = d / "cache"
    put(cache, "owner/tatitok", d / "rel" / "tokenizer", C1, ["v1"])
    put(cache, "owner/tatitok", d / "rel2", C2, ["main"])
    put(cache, "owner/maskgen", d / "rel" / "generator", C1, ["main", "v1"])
    return dict(runs, dir=d, cache=cache)


@pytest.fixture
def offline(hub, monkeypatch):
    """HF_HUB_OFFLINE=1 and the fixture's cache, for this process (huggingface_hub reads its
    environment once, at import, into `constants`) and for subprocesses (env)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def test_hub_ids_are_recognised():
    assert C.hub_id("turkeyju/tokenizer_tatitok_bl32_vq") == ("turkeyju/tokenizer_tatitok_bl32_vq", None)
    assert C.hub_id("hf-hub:owner/name") == ("owner/name", None)
    assert C.hub_id("owner/name@refs/pr/1") == ("owner/name", "refs/pr/1")
    for not_an_id in ("name", "a/b/c", "/abs/path", "./x/y", "runs/ckpt.pt", "x/config.json", "owner/"):
        assert C.hub_id(not_an_id) is None, not_an_id
    assert C.hub_id("tests/nothing_here") is None  # under an existing local folder: a path
    assert C.local_path("tests/nothing_here") == "tests/nothing_here"  # unchanged, nothing fetched


def test_tokenizer_by_hub_id(offline):
    rel1 = tok_from(offline["dir"] / "rel" / "tokenizer")
    rel2 = tok_from(offline["dir"] / "rel2")
    assert not same_weights(rel1, rel2)  # the two commits differ, so the checks below can fail
    assert same_weights(rel1, C.load_tokenizer(offline["tok"])[0])  # the export is the run's EMA
    assert same_weights(tok_from("owner/tatitok"), rel2)  # main
    assert same_weights(tok_from("hf-hub:owner/tatitok"), rel2)
    assert same_weights(tok_from(f"owner/tatitok@{C1}"), rel1)  # a commit
    assert same_weights(tok_from("owner/tatitok@v1"), rel1)  # a tag
    assert same_weights(tok_from("owner/tatitok", revision="v1"), rel1)
    assert same_weights(tok_from("owner/tatitok@main", revision="v1"), rel2)  # the id's own wins
    # The text tower recorded in the release travels with it.
    tok, text = C.load_tokenizer("owner/tatitok", revision=C1)
    assert same_weights(tok, rel1) and same_weights(text, tiny_text())
    assert C.record_ref("owner/tatitok") == "owner/tatitok" and C.is_release("owner/tatitok")


def test_generator_by_hub_id(offline):
    local = C.load_generator(offline["dir"] / "rel" / "generator")
    assert same_weights(local, C.load_generator(offline["gen"]))  # EMA weights, exported exactly
    assert same_weights(C.load_generator("owner/maskgen"), local)
    assert same_weights(C.load_generator(f"hf-hub:owner/maskgen@{C1}"), local)
    g = C.load_generator("owner/maskgen@v1")
    assert same_weights(g, local) and g.config == local.config
    m = C.load_models("owner/maskgen", "owner/tatitok@v1")
    assert same_weights(m.tokenizer, C.load_tokenizer(offline["tok"])[0]) and m.gen_text is m.tok_text


def test_missing_id_gives_the_project_message(offline):
    with pytest.raises(FileNotFoundError) as e:
        tok_from("owner/nothing")
    msg = str(e.value)
    for part in ("'owner/nothing' is not a local path", "HF_HUB_OFFLINE is set", str(offline["cache"]),
                 "`hf download owner/nothing --local-dir DIR`", "unset HF_HUB_OFFLINE"):  # fmt: skip
        assert part in msg, part
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no hub traceback behind it
    with pytest.raises(FileNotFoundError, match=r"revision 'v9'.*--revision v9 --local-dir DIR"):
        C.load_generator("owner/maskgen@v9")
    with pytest.raises(FileNotFoundError, match=r"tokenizer checkpoint 'owner/nothing' is not a local path"):
        C.load_models("owner/maskgen", "owner/nothing")
    # A generator that records a Hub id for its tokenizer: the message says where it came from.
    run = save_generator_run(offline["dir"] / "gen_hub", GEN_VQ, "owner/nothing")
    with pytest.raises(FileNotFoundError, match=r"was trained with tokenizer 'owner/nothing' \(recorded.*HF_HUB_OFFLINE"):
        C.load_models(run)


def test_unreachable_hub_falls_back_to_the_cache(offline, monkeypatch):
    # Not offline, but the Hub cannot be reached (a closed local port; no network is used):
    # a cached id still loads, a missing one gets the project's message.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert same_weights(tok_from("owner/tatitok@v1"), C.load_tokenizer(offline["tok"])[0])
    with pytest.raises(FileNotFoundError, match=r"'owner/nothing' is not a local path.*could not be fetched.*"
                                                r"Tried: .*the Hub at http://127.0.0.1:9"):  # fmt: skip
        tok_from("owner/nothing")


def test_local_path_wins(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    os.symlink(offline["dir"] / "rel" / "tokenizer", tmp_path / "owner" / "tatitok")  # C1's weights, locally
    rel1 = tok_from(offline["dir"] / "rel" / "tokenizer")
    assert same_weights(tok_from("owner/tatitok"), rel1)  # the Hub's main would be C2
    assert not same_weights(tok_from("hf-hub:owner/tatitok"), rel1)  # asked for the Hub: main
    # Under an existing local folder a missing name is a missing path, not a Hub lookup.
    with pytest.raises(FileNotFoundError, match=r"tokenizer checkpoint 'owner/other' does not exist"):
        C.load_tokenizer("owner/other")


def test_pretokenize_records_the_hub_id(offline, tmp_path):
    out = tmp_path / "pretok"
    data.main(["pretokenize", "--tokenizer", "owner/tatitok@v1", "--data", "shapes:3", "--out", str(out),
               "--batch-size", "3", "--num-workers", "0", "--device", "cpu"])  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "owner/tatitok@v1" and meta["num_samples"] == 3


def test_sample_cli_with_hub_ids(offline, tmp_path):
    # The same images from the Hub ids (through --revision) as from the run they were exported from.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--prompt", "a red circle", "--grid_rows", "0"] + CPU
    cmd = [sys.executable, "sample.py", "--generator", "owner/maskgen", "--tokenizer", "owner/tatitok", "--revision", "v1"]
    r = subprocess.run(cmd + args + ["--outdir", str(tmp_path / "hub")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    S.main(["--generator", offline["gen"]] + args + ["--outdir", str(tmp_path / "run")])
    assert np.array_equal(pixels(tmp_path / "hub" / "00000_s0000.png"), pixels(tmp_path / "run" / "00000_s0000.png"))
    # A missing id: a FileNotFoundError, which sample.py prints as "error: ..." (no traceback).
    with pytest.raises(FileNotFoundError, match=r"^generator checkpoint 'owner/nothing' is not a local path"):
        S.main(["--generator", "owner/nothing", "--revision", "v1"] + args + ["--outdir", str(tmp_path / "x")])


# ---------------------------------------------------------------------------- the shipped models

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = {"vq": os.path.join(HERE, "checkpoints", "shapes"), "kl": os.path.join(HERE, "checkpoints", "shapes_kl")}
GENERATORS = {mode: os.path.join(d, "generator") for mode, d in SHIPPED.items()}  # each generator records its tokenizer


@pytest.fixture(params=sorted(GENERATORS))
def shipped(request):
    path = GENERATORS[request.param]
    assert os.path.isfile(os.path.join(path, "config.json")), f"{path} ships with the repository"
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(SHIPPED[request.param], "*", "*")))
    assert size <= 20 * 2**20, "a shipped model (both release directories) stays under 20 MiB"
    return request.param, path


def test_quickstart_draws_with_each_shipped_model(shipped, tmp_path, capsys):
    mode, path = shipped
    args = ["--generator", path] if mode == "kl" else []  # the VQ model is the default
    res = S.main(args + ["--prompt", "a red circle to the left of a blue square", "--outdir", str(tmp_path)] + CPU)
    assert res["images"][0] in capsys.readouterr().out  # it says where the image went
    img = np.asarray(Image.open(res["images"][0]).convert("RGB"))
    assert img.shape == (64, 64, 3)
    assert img.std() > 20 and (img.min(axis=-1) < 128).sum() > 50  # not blank: coloured shapes on white
    m = C.load_models(path, None, "cpu")
    assert m.generator.config.mode == m.tokenizer.config.quantize_mode == mode


def test_shipped_tokenizer_for_pretokenize_and_train_maskgen(shipped, tmp_path):
    mode, path = shipped
    path = os.path.join(os.path.dirname(path), "tokenizer")
    out = tmp_path / "pretok"
    data.main(["pretokenize", "--tokenizer", path, "--data", "shapes:12", "--out", str(out),
               "--batch-size", "4", "--per-shard", "8", "--num-workers", "0", "--device", "cpu"])  # fmt: skip
    meta = json.load(open(out / "meta.json"))
    assert meta["num_samples"] == 12 and meta["quantize_mode"] == mode and len(glob.glob(str(out / "*.tar"))) == 2
    # The shipped tokenizer, its text tower and the tokens written above train a (tiny) MaskGen.
    run = tmp_path / "mg"
    train_maskgen.main([f"--config=tiny_{mode}", f"--tokenizer={path}", f"--data=pretokenized:{out}/*.tar",
                        f"--out_dir={run}", "--max_steps=2", "--batch_size=4", "--log_every=1",
                        "--sample_every=2", "--ckpt_every=2"])  # fmt: skip
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    ck = torch.load(run / "ckpt_00000002.pt", map_location="cpu", weights_only=True)
    tok = C.load_tokenizer(path, "cpu", with_text=False)[0].config
    assert ck["maskgen_config"]["num_tokens"] == tok.num_latent_tokens and ck["maskgen_config"]["mode"] == mode


def test_each_shipped_model_reads_its_context(shipped, tmp_path):
    # `evaluate.py context`: the shipped generators predict masked tokens far better with
    # most tokens visible than with none (VQ: cross-entropy; KL: R^2 of the masked tokens'
    # means from the DiffLoss conditions). The KL model shipped before pos_init_std did not.
    mode, path = shipped
    res = evaluate.main(["context", "--generator", path, "--n-per-category", "20", "--out", str(tmp_path / "ctx")] + CPU)
    if mode == "vq":
        assert res["masked_ce@0.9"] < res["masked_ce@0"] - 1.0
    else:
        assert res["r2_from_z@0.5"] > res["r2_from_z@0"] + 0.2
    assert json.load(open(tmp_path / "ctx.json")) == pytest.approx(res)


def test_evaluate_shapes_passes_the_sampling_options_through(tmp_path):
    # `evaluate.py shapes --guidance-schedule / --temperature` reach generate(): the model's own
    # schedule, given explicitly, draws the default's images; another schedule or a softmax
    # temperature draws others; a schedule of the other variant is refused by name.
    prompts = shapes.heldout_prompts(2)
    cfg = C.load_models(GENERATORS["vq"], None, "cpu").generator.config
    kw = dict(generator=GENERATORS["vq"], device="cpu")
    base = evaluate.generate_shapes_images(prompts, **kw)
    same = evaluate.generate_shapes_images(prompts, guidance_schedule=cfg.guidance_schedule, **kw)
    other = evaluate.generate_shapes_images(prompts, guidance_schedule="none", **kw)
    cooler = evaluate.generate_shapes_images(prompts, temperature=0.3, **kw)
    assert all((a == b).all() for a, b in zip(base, same))
    assert any((a != b).any() for a, b in zip(base, other)) and any((a != b).any() for a, b in zip(base, cooler))
    with pytest.raises(ValueError, match="cosine"):
        evaluate.main(["shapes", "--generator", GENERATORS["kl"], "--guidance-schedule", "cosine",
                       "--n-per-category", "1", "--out", str(tmp_path / "s")] + CPU)  # fmt: skip

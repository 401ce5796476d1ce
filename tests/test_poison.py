"""Poisoned samples: every kind of malformed field in image-caption shards and pretokenized
shards is skipped and counted under its reason, never a crash, and skipped alike on exact
resume; train_maskgen runs through poisoned token shards and logs the skips; token shards
written by another tokenizer's weights are refused at start, naming both. Shards built here."""

import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoint
import data
import shards
import train_maskgen

K, V, C = 8, 16, 4  # the token count, codebook size (VQ) and token width (KL) the datasets expect


def _png(size=16, noise=False):
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8) if noise else None
    image = Image.fromarray(pixels) if noise else Image.new("RGB", (size, size), (200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _npy(array, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _npz(array):
    buf = io.BytesIO()
    np.savez(buf, tokens=array)
    return buf.getvalue()


IDS = np.arange(K) % V
MEAN = np.linspace(-1, 1, K * C, dtype=np.float32).reshape(K, C)
GOOD = {"image": {"png": _png(), "txt": "a red square"},
        "vq": {"tokens.npy": _npy(IDS.astype(np.int16)), "txt": "a red square"},
        "kl": {"mean.npy": _npy(MEAN), "logvar.npy": _npy(-MEAN), "txt": "a red square"}}  # fmt: skip


@dataclass
class Poison:
    kind: str  # the stream it goes into: "image" (TarShardDataset), "vq" or "kl" (PretokenizedDataset)
    name: str
    members: dict  # the poisoned sample's tar members (ext -> bytes or str)
    counts: dict  # the skip counts it must add, by reason
    kept: bool = False  # a bad optional field (a score, a .json beside a .txt): counted, and the sample kept
    patch: dict = field(default_factory=dict)  # shards module attributes replaced for this case


def _deep_json(depth=100_000):
    return b"[" * depth + b"]" * depth


def _boom(text):  # a decoder step that fails in a way no check foresaw
    if text == "boom":
        raise RuntimeError("a bug nobody foresaw")
    return text


IMG, TXT = _png(), "a red square"
POISONS = [
    # ---- text fields (shared by every stream)
    Poison("image", "json_nested_too_deeply", {"png": IMG, "json": _deep_json()},
           {"bad_json": 1, "missing_caption": 1}),  # fmt: skip
    Poison("image", "json_nested_too_deeply_beside_a_txt", {"png": IMG, "txt": TXT, "json": _deep_json()},
           {"bad_json": 1}, kept=True),  # fmt: skip
    Poison("image", "json_is_a_list", {"png": IMG, "json": b'[{"caption": "a red square"}]'},
           {"bad_json": 1, "missing_caption": 1}),  # fmt: skip
    Poison("image", "json_not_utf8", {"png": IMG, "txt": TXT, "json": b'{"caption": "\xff\xfe"}'}, {"invalid_utf8": 1}),
    Poison("image", "txt_not_utf8", {"png": IMG, "txt": b"a red \xc3\x28 square"}, {"invalid_utf8": 1}),
    Poison("image", "caption_unpaired_surrogate", {"png": IMG, "json": b'{"caption": "a \\ud800 b"}'},
           {"invalid_utf8": 1}),  # fmt: skip
    Poison("image", "caption_is_a_number", {"png": IMG, "json": b'{"caption": 12345}'}, {"missing_caption": 1}),
    Poison("image", "caption_is_a_dict", {"png": IMG, "json": b'{"caption": {"text": "x"}}'}, {"missing_caption": 1}),
    Poison("image", "caption_blank", {"png": IMG, "txt": " \n\t "}, {"missing_caption": 1}),
    Poison("image", "caption_huge", {"png": IMG, "txt": "a" * (shards.MAX_CAPTION_CHARS + 1)}, {"text_too_long": 1}),
    Poison("image", "recaption_huge", {"png": IMG, "txt": TXT, "recap.txt": "b " * shards.MAX_CAPTION_CHARS},
           {"text_too_long": 1}),  # fmt: skip
    Poison("image", "json_huge", {"png": IMG, "txt": TXT, "json": b'{"x": "' + b"a" * shards.MAX_TEXT_BYTES + b'"}'},
           {"text_too_long": 1}),  # fmt: skip
    Poison("image", "aesthetic_1e999", {"png": IMG, "txt": TXT, "json": b'{"aesthetic_score": 1e999}'},
           {"bad_aesthetic": 1}, kept=True),  # fmt: skip
    Poison("image", "aesthetic_400_digit_integer", {"png": IMG, "txt": TXT,
                                                    "json": b'{"aesthetic": ' + b"9" * 400 + b"}"},
           {"bad_aesthetic": 1}, kept=True),  # fmt: skip
    Poison("image", "aesthetic_10000_digit_integer", {"png": IMG, "txt": TXT,
                                                      "json": b'{"aesthetic": ' + b"7" * 10_000 + b"}"},
           {"bad_json": 1}, kept=True),  # the integer is past what json parses: the .json is ignored  # fmt: skip
    Poison("image", "aesthetic_nan", {"png": IMG, "txt": TXT, "aesthetic": b"nan"}, {"bad_aesthetic": 1}, kept=True),
    Poison("image", "aesthetic_json_NaN", {"png": IMG, "txt": TXT, "json": b'{"aesthetic_score": NaN}'},
           {"bad_aesthetic": 1}, kept=True),  # fmt: skip
    Poison("image", "aesthetic_true", {"png": IMG, "txt": TXT, "json": b'{"aesthetic_score": true}'},
           {"bad_aesthetic": 1}, kept=True),  # fmt: skip
    Poison("image", "aesthetic_list", {"png": IMG, "txt": TXT, "json": b'{"aesthetic_score": [5]}'},
           {"bad_aesthetic": 1}, kept=True),  # fmt: skip
    Poison("image", "aesthetic_not_utf8", {"png": IMG, "txt": TXT, "score": b"\xff\xfe"}, {"bad_aesthetic": 1},
           kept=True),  # fmt: skip
    # ---- images
    Poison("image", "image_garbage", {"png": b"\x89PNG\r\n\x1a\n not really", "txt": TXT}, {"corrupt_image": 1}),
    Poison("image", "image_truncated", {"png": _png(30, noise=True)[:1500], "txt": TXT}, {"corrupt_image": 1}),
    Poison("image", "image_above_max_pixels", {"png": _png(64), "txt": TXT}, {"too_many_pixels": 1}),
    Poison("image", "image_missing", {"txt": TXT, "json": b"{}"}, {"missing_image": 1}),
    Poison("image", "member_too_large", {"png": IMG, "txt": TXT, "json": b'{"x": "' + b"a" * 5000 + b'"}'},
           {"member_too_large": 1}, patch={"MAX_MEMBER_BYTES": 4096}),  # fmt: skip
    Poison("image", "decoder_bug", {"png": IMG, "txt": TXT, "recap.txt": "boom"}, {"undecodable": 1},
           patch={"strip_recaption_prefix": _boom}),  # fmt: skip
    # ---- VQ token arrays
    Poison("vq", "ids_float16", {"tokens.npy": _npy(IDS.astype(np.float16)), "txt": TXT}, {"bad_tokens": 1}),
    Poison("vq", "ids_2d", {"tokens.npy": _npy(IDS.reshape(2, -1)), "txt": TXT}, {"bad_tokens": 1}),
    Poison("vq", "ids_object_array", {"tokens.npy": _npy(np.array([{"a": 1}, 2], dtype=object), True), "txt": TXT},
           {"bad_tokens": 1}),  # fmt: skip
    Poison("vq", "ids_a_pickle", {"tokens.npy": pickle.dumps(list(IDS)), "txt": TXT}, {"bad_tokens": 1}),
    Poison("vq", "ids_truncated", {"tokens.npy": _npy(IDS)[:-5], "txt": TXT}, {"bad_tokens": 1}),
    Poison("vq", "ids_an_npz", {"tokens.npy": _npz(IDS), "txt": TXT}, {"bad_tokens": 1}),
    Poison("vq", "ids_strings", {"tokens.npy": _npy(np.array(["1"] * K)), "txt": TXT}, {"bad_tokens": 1}),
    Poison("vq", "ids_bool", {"tokens.npy": _npy(np.ones(K, bool)), "txt": TXT}, {"bad_tokens": 1}),
    Poison("vq", "ids_missing", {"txt": TXT}, {"bad_tokens": 1}),
    Poison("vq", "ids_too_few", {"tokens.npy": _npy(IDS[:-1]), "txt": TXT}, {"token_mismatch": 1}),
    Poison("vq", "ids_past_the_codebook", {"tokens.npy": _npy(np.full(K, V)), "txt": TXT}, {"token_mismatch": 1}),
    Poison("vq", "ids_negative", {"tokens.npy": _npy(np.full(K, -1)), "txt": TXT}, {"token_mismatch": 1}),
    Poison("vq", "ids_huge_uint64", {"tokens.npy": _npy(np.full(K, 2**64 - 1, np.uint64)), "txt": TXT},
           {"token_mismatch": 1}),  # fmt: skip
    Poison("vq", "a_kl_posterior", {**GOOD["kl"]}, {"token_mismatch": 1}),
    Poison("vq", "good_ids_bad_text", {"tokens.npy": _npy(IDS), "json": _deep_json()},
           {"bad_json": 1, "missing_caption": 1}),  # fmt: skip
    # ---- KL posteriors
    Poison("kl", "posterior_nan", {"mean.npy": _npy(MEAN * np.nan), "logvar.npy": _npy(MEAN), "txt": TXT},
           {"bad_tokens": 1}),  # fmt: skip
    Poison("kl", "posterior_inf_as_float32", {"mean.npy": _npy(MEAN.astype(np.float64) * 1e300),
                                              "logvar.npy": _npy(MEAN), "txt": TXT}, {"bad_tokens": 1}),  # fmt: skip
    Poison("kl", "mean_logvar_shapes_differ", {"mean.npy": _npy(MEAN), "logvar.npy": _npy(MEAN[:, :-1]), "txt": TXT},
           {"bad_tokens": 1}),  # fmt: skip
    Poison("kl", "posterior_ints", {"mean.npy": _npy(IDS.reshape(2, -1)), "logvar.npy": _npy(IDS.reshape(2, -1)),
                                    "txt": TXT}, {"bad_tokens": 1}),  # fmt: skip
    Poison("kl", "posterior_1d", {"mean.npy": _npy(MEAN.ravel()), "logvar.npy": _npy(MEAN.ravel()), "txt": TXT},
           {"bad_tokens": 1}),  # fmt: skip
    Poison("kl", "logvar_missing", {"mean.npy": _npy(MEAN), "txt": TXT}, {"bad_tokens": 1}),
    Poison("kl", "posterior_too_wide", {"mean.npy": _npy(np.zeros((K, C + 1), np.float32)),
                                        "logvar.npy": _npy(np.zeros((K, C + 1), np.float32)), "txt": TXT},
           {"token_mismatch": 1}),  # fmt: skip
    Poison("kl", "posterior_too_few_tokens", {"mean.npy": _npy(MEAN[1:]), "logvar.npy": _npy(MEAN[1:]), "txt": TXT},
           {"token_mismatch": 1}),  # fmt: skip
    Poison("kl", "vq_ids", {**GOOD["vq"]}, {"token_mismatch": 1}),
]


def _dataset(kind, path, **kwargs):
    if kind == "image":  # 16x16 samples; max_pixels 1000 makes the 64x64 image a pixel bomb
        return data.TarShardDataset(path, image_size=16, min_longer_side=0, max_pixels=1000, **kwargs)
    fit = dict(codebook_size=V) if kind == "vq" else dict(token_size=C)
    return data.PretokenizedDataset(path, num_tokens=K, **fit, **kwargs)


@pytest.mark.parametrize("poison", POISONS, ids=[f"{p.kind}-{p.name}" for p in POISONS])
def test_each_poison_is_skipped_and_counted(tmp_path, monkeypatch, poison):
    for name, value in poison.patch.items():
        monkeypatch.setattr(shards, name, value)
    with shards.ShardWriter(str(tmp_path), "poison", per_shard=100) as w:
        for key in ("good0", "good1", "poison", "good2"):
            w.write(key, poison.members if key == "poison" else GOOD[poison.kind])
    ds = _dataset(poison.kind, str(tmp_path), infinite=False, shuffle=False, default_aesthetic=5.5)
    out = list(ds)
    expected = ["good0", "good1"] + ["poison"] * poison.kept + ["good2"]
    assert [s["key"].split(":")[1] for s in out] == expected
    assert {k: v for k, v in ds.skipped.counts().items() if v} == poison.counts
    if poison.kept:  # a bad score is replaced by the default
        assert float(out[2]["aesthetic"]) == 5.5
    for s in out:  # what is yielded is the good samples' content, whole
        assert s["caption"] == TXT
        if poison.kind == "vq":
            assert s["tokens"].tolist() == IDS.tolist()
        elif poison.kind == "kl":
            assert torch.equal(s["posterior"], torch.from_numpy(np.concatenate([MEAN, -MEAN], -1)))
        else:
            assert s["image"].shape == (3, 16, 16)


@pytest.mark.parametrize("kind", ["image", "vq", "kl"])
def test_poison_is_skipped_alike_on_resume(tmp_path, kind):
    """Resuming without saved positions fast-forwards with cheap checks; they must skip what a full decode
    skips, or the resumed run would see other samples than the uninterrupted one."""
    with shards.ShardWriter(str(tmp_path), "mixed", per_shard=7) as w:
        for i, poison in enumerate(p for p in POISONS if p.kind == kind and not p.patch):
            w.write(f"good{i}", GOOD[kind])
            w.write(f"poison{i}", poison.members)

    def keys(start):
        ds = _dataset(kind, str(tmp_path), infinite=False, shuffle_buffer=5, seed=3, batch_size=1, start_batch=start)
        return [s["key"] for s in ds]

    full = keys(0)
    assert len(full) > 6
    for start in (1, len(full) // 2, len(full) - 1):
        assert keys(start) == full[start:]


# ----------------------------------------------------------------------------- train_maskgen
SHIPPED_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints",
                                 "shapes", "tokenizer")  # fmt: skip


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """12 shapes samples pretokenized by the shipped VQ tokenizer (K=32, 2048 codes), with meta.json."""
    out = tmp_path_factory.mktemp("tokens")
    data.main(["pretokenize", "--tokenizer", SHIPPED_TOKENIZER, "--data", "shapes:12", "--out", str(out),
               "--batch-size", "6", "--num-workers", "0", "--device", "cpu"])  # fmt: skip
    return out


def _train(out, tok, data_spec, *args):
    train_maskgen.main(["--config=tiny_vq", f"--tokenizer={tok}", f"--data={data_spec}", f"--out_dir={out}",
                        "--batch_size=4", "--log_every=1", "--sample_every=100", *args])  # fmt: skip
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_maskgen_trains_through_poisoned_tokens_and_logs_the_skips(tokens, tmp_path, capsys):
    folder = tmp_path / "tokens"
    shutil.copytree(tokens, folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer_digest"] == checkpoint.content_digest(checkpoint.load_tokenizer(
        SHIPPED_TOKENIZER, with_text=False)[0].state_dict())  # fmt: skip
    ids = np.arange(32) % 2048
    with shards.ShardWriter(str(folder), "poison", per_shard=100) as w:
        w.write("short", {"tokens.npy": _npy(ids[:31]), "txt": TXT})
        w.write("past_codebook", {"tokens.npy": _npy(ids + 2048), "txt": TXT})
        w.write("fp16", {"tokens.npy": _npy(ids.astype(np.float16)), "txt": TXT})
        w.write("deep_json", {"tokens.npy": _npy(ids), "json": _deep_json()})
        w.write("posterior", {"mean.npy": _npy(np.zeros((32, 16), np.float32)),
                              "logvar.npy": _npy(np.zeros((32, 16), np.float32)), "txt": TXT})  # fmt: skip
    # 4 steps x 4 samples > the 12 good ones: the whole first pass is read, every poisoned sample with it.
    rows = _train(tmp_path / "run", SHIPPED_TOKENIZER, f"pretokenized:{folder}/*.tar", "--max_steps=4",
                  "--ckpt_every=4")  # fmt: skip
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    skipped = rows[-1]["skipped"]
    assert skipped["token_mismatch"] >= 3 and skipped["bad_tokens"] >= 1  # short, past the codebook, a posterior
    assert skipped["bad_json"] >= 1 and skipped["missing_caption"] >= 1
    line = capsys.readouterr().out.split("step       4 |")[1].splitlines()[0]  # the readable log line says so too
    assert "| skipped " in line and "token_mismatch=" in line


def test_tokens_of_another_tokenizer_are_refused_at_start(tokens, tmp_path):
    other = tmp_path / "other_tokenizer"
    shutil.copytree(SHIPPED_TOKENIZER, other)  # the same model, one weight nudged
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, str(other / "model.safetensors"))
    cfg = json.loads((other / "config.json").read_text())  # a release records its files' sha256: record the new one
    cfg[checkpoint.EXTRA]["sha256"]["model.safetensors"] = checkpoint.file_sha256(str(other / "model.safetensors"))
    (other / "config.json").write_text(json.dumps(cfg))
    digest = {t: checkpoint.content_digest(checkpoint.load_tokenizer(str(t), with_text=False)[0].state_dict())[:16]
              for t in (SHIPPED_TOKENIZER, other)}  # fmt: skip
    assert digest[SHIPPED_TOKENIZER] != digest[other]
    with pytest.raises(SystemExit) as e:
        _train(tmp_path / "run", other, f"pretokenized:{tokens}/*.tar", "--max_steps=1")
    msg = str(e.value)
    assert msg.startswith(f"error: the tokens in {tokens} were written by tokenizer {SHIPPED_TOKENIZER} (weights "
                          f"{digest[SHIPPED_TOKENIZER]}), not by --tokenizer={other} (weights {digest[other]})")
    assert f"pass --tokenizer={SHIPPED_TOKENIZER}, or pretokenize again with this tokenizer" in msg
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_tokens_without_a_recorded_digest_warn_and_train(tokens, tmp_path, capsys):
    folder = tmp_path / "tokens"
    shutil.copytree(tokens, folder)
    (folder / "meta.json").unlink()
    rows = _train(tmp_path / "run", SHIPPED_TOKENIZER, f"pretokenized:{folder}/*.tar", "--max_steps=1")
    assert [r["step"] for r in rows] == [1]
    assert f"warning: no tokenizer digest recorded in {folder} (meta.json" in capsys.readouterr().out

"""Hugging Face Hub ids wherever a release directory is accepted (official.local_path, load.py),
offline and without network: a Hub cache laid out as huggingface_hub lays it out
(models--owner--name/{blobs, snapshots/<commit>, refs/<branch or tag>}), filled with releases
written by `sample.py export` from tiny runs, read with HF_HUB_OFFLINE=1."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import constants

import data
import load as L
import maskgen as M
import official
import sample as S
import tokenizer as T
from test_sample import CPU, GEN_VQ, pixels, save_generator_run, save_tokenizer_run, tiny_text

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

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


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two tiny runs (a TA-TiTok, a MaskGen-VQ on it, with the tiny text tower), exported and
    put in a Hub cache: owner/tatitok (C1 = tag v1; C2, another tokenizer = main) and
    owner/maskgen (C1 = main and v1)."""
    d = tmp_path_factory.mktemp("hub")
    runs = {"tok": save_tokenizer_run(d / "tok"), "tok2": save_tokenizer_run(d / "tok2", seed=7)}
    runs["gen"] = save_generator_run(d / "gen", GEN_VQ, runs["tok"])
    L.export_release(runs["gen"], str(d / "rel"))  # rel/generator, rel/tokenizer
    L.export_release(runs["tok2"], str(d / "rel2"))
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
    assert official.hub_id("turkeyju/tokenizer_tatitok_bl32_vq") == ("turkeyju/tokenizer_tatitok_bl32_vq", None)
    assert official.hub_id("hf-hub:owner/name") == ("owner/name", None)
    assert official.hub_id("owner/name@refs/pr/1") == ("owner/name", "refs/pr/1")
    for not_an_id in ("name", "a/b/c", "/abs/path", "./x/y", "runs/ckpt.pt", "x/config.json", "owner/"):
        assert official.hub_id(not_an_id) is None, not_an_id
    assert official.hub_id("tests/nothing_here") is None  # under an existing local folder: a path
    assert official.local_path("tests/nothing_here") == "tests/nothing_here"  # unchanged, nothing fetched


def test_tokenizer_by_hub_id(offline):
    rel1 = T.TATiTok.from_official(offline["dir"] / "rel" / "tokenizer")
    rel2 = T.TATiTok.from_official(offline["dir"] / "rel2")
    assert not same_weights(rel1, rel2)  # the two commits differ, so the checks below can fail
    assert same_weights(rel1, L.load_tokenizer(offline["tok"])[0])  # the export is the run's EMA
    assert same_weights(T.TATiTok.from_official("owner/tatitok"), rel2)  # main
    assert same_weights(T.TATiTok.from_official("hf-hub:owner/tatitok"), rel2)
    assert same_weights(T.TATiTok.from_official(f"owner/tatitok@{C1}"), rel1)  # a commit
    assert same_weights(T.TATiTok.from_official("owner/tatitok@v1"), rel1)  # a tag
    assert same_weights(T.TATiTok.from_official("owner/tatitok", revision="v1"), rel1)
    assert same_weights(T.TATiTok.from_official("owner/tatitok@main", revision="v1"), rel2)  # the id's own wins
    # load.py: the text tower recorded in the release travels with it.
    tok, text = L.load_tokenizer("owner/tatitok", revision=C1)
    assert same_weights(tok, rel1) and same_weights(text, tiny_text())
    assert L.record_ref("owner/tatitok") == "owner/tatitok" and L.is_release("owner/tatitok")


def test_generator_by_hub_id(offline):
    local = M.MaskGenBase.from_official(offline["dir"] / "rel" / "generator")
    assert same_weights(local, L.load_generator(offline["gen"]).model)  # EMA weights, exported exactly
    assert same_weights(M.MaskGenBase.from_official("owner/maskgen"), local)
    assert same_weights(M.MaskGenBase.from_official(f"hf-hub:owner/maskgen@{C1}"), local)
    g = L.load_generator("owner/maskgen@v1")
    assert same_weights(g.model, local) and g.model.config == local.config
    m = L.load_models("owner/maskgen", "owner/tatitok@v1")
    assert same_weights(m.tokenizer, L.load_tokenizer(offline["tok"])[0]) and m.gen_text is m.tok_text


def test_missing_id_gives_the_project_message(offline):
    with pytest.raises(FileNotFoundError) as e:
        T.TATiTok.from_official("owner/nothing")
    msg = str(e.value)
    for part in ("'owner/nothing' is not a local path", "HF_HUB_OFFLINE is set", str(offline["cache"]),
                 "`hf download owner/nothing --local-dir DIR`", "unset HF_HUB_OFFLINE"):  # fmt: skip
        assert part in msg, part
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no hub traceback behind it
    with pytest.raises(FileNotFoundError, match=r"revision 'v9'.*--revision v9 --local-dir DIR"):
        M.MaskGenBase.from_official("owner/maskgen@v9")
    with pytest.raises(FileNotFoundError, match=r"tokenizer checkpoint 'owner/nothing' is not a local path"):
        L.load_models("owner/maskgen", "owner/nothing")
    # A generator that records a Hub id for its tokenizer: the message says where it came from.
    run = save_generator_run(offline["dir"] / "gen_hub", GEN_VQ, "owner/nothing")
    with pytest.raises(FileNotFoundError, match=r"was trained with tokenizer 'owner/nothing' \(recorded.*HF_HUB_OFFLINE"):
        L.load_models(run)


def test_unreachable_hub_falls_back_to_the_cache(offline, monkeypatch):
    # Not offline, but the Hub cannot be reached (a closed local port; no network is used):
    # a cached id still loads, a missing one gets the project's message.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert same_weights(T.TATiTok.from_official("owner/tatitok@v1"), L.load_tokenizer(offline["tok"])[0])
    with pytest.raises(FileNotFoundError, match=r"'owner/nothing' is not a local path.*could not be fetched.*"
                                                r"Tried: .*the Hub at http://127.0.0.1:9"):  # fmt: skip
        T.TATiTok.from_official("owner/nothing")


def test_local_path_wins(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    os.symlink(offline["dir"] / "rel" / "tokenizer", tmp_path / "owner" / "tatitok")  # C1's weights, locally
    rel1 = T.TATiTok.from_official(offline["dir"] / "rel" / "tokenizer")
    assert same_weights(T.TATiTok.from_official("owner/tatitok"), rel1)  # the Hub's main would be C2
    assert not same_weights(T.TATiTok.from_official("hf-hub:owner/tatitok"), rel1)  # asked for the Hub: main
    # Under an existing local folder a missing name is a missing path, not a Hub lookup.
    with pytest.raises(FileNotFoundError, match=r"tokenizer checkpoint 'owner/other' does not exist"):
        L.load_tokenizer("owner/other")


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

"""A generator meets the tokenizer it was trained on, by content: the digest train_maskgen.py
pins (sha256 of the tokenizer's weights as loaded) picks the checkpoint in a tokenizer run
folder, refuses any other tokenizer, and travels into releases. Released weights carry their
sha256 in config.json and a damaged file is refused; shapes-world releases record their
words, and sample.py warns about a prompt's other words."""

import json
import os
import re

import pytest

import checkpoint as C
import sample as S
import shapes
import train_maskgen
import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
CPU = ["--device", "cpu"]
SHIPPED = [os.path.join(C.HERE, "checkpoints", d) for d in ("shapes", "shapes_kl")]


def digest(ref):
    """The tokenizer digest, as train_maskgen.py computes it."""
    return C.content_digest(C.load_tokenizer(ref, with_text=False)[0].state_dict())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tokenizer run that went on training after a MaskGen run started on its step-2 checkpoint."""
    d = tmp_path_factory.mktemp("pair")
    tok, gen = d / "tok", d / "gen"
    steps = ["--ckpt_every=2", "--sample_every=100", "--log_every=1"]
    train_tokenizer.main([f"--out_dir={tok}", "--config=tiny", "--max_steps=2", *steps])
    train_maskgen.main([f"--out_dir={gen}", "--config=tiny_vq", f"--tokenizer={tok}", "--max_steps=1", *steps])
    train_tokenizer.main([f"--out_dir={tok}", "--config=tiny", "--max_steps=4", *steps])  # resumes: ckpt 4 is newest
    old, new = (str(tok / f"ckpt_{step:08d}.pt") for step in (2, 4))
    return {"tok": str(tok), "gen": str(gen), "old": old, "new": new}


def test_the_generator_gets_the_tokenizer_checkpoint_it_was_trained_on(runs, tmp_path):
    pinned = C.resolve(runs["gen"], "generator").ckpt["inputs"]["tokenizer"]
    assert pinned == digest(runs["old"]) != digest(runs["new"]) == digest(runs["tok"])  # the run's newest is not it
    for tokenizer in (None, runs["tok"]):  # recorded, or given as the run folder: its step-2 checkpoint
        m = C.load_models(runs["gen"], tokenizer)
        assert m.tok_source.startswith(runs["old"]) and C.content_digest(m.tokenizer.state_dict()) == pinned
    # Given explicitly, another checkpoint is refused: one line, both digests, the paths, the fix.
    fix = r"pass --tokenizer=<the checkpoint it was trained on>"
    with pytest.raises(ValueError, match=rf"^the generator '{runs['gen']}/ckpt_00000001.pt' was trained on a tokenizer "
                       rf"whose weights have digest {pinned[:16]}, but '{runs['new']}' has {digest(runs['new'])[:16]} "
                       rf"\(sha256 of the weights as loaded\); {re.escape(fix)}") as e:
        C.load_models(runs["gen"], runs["new"])
    assert "\n" not in str(e.value)
    # A run folder without it: each checkpoint is named with its digest; sample.py says so and writes nothing.
    later = tmp_path / "tok"
    later.mkdir()
    os.link(runs["new"], later / "ckpt_00000004.pt")
    with pytest.raises(ValueError, match=rf"digest {pinned[:16]}, but '{later}/ckpt_00000004.pt' has [0-9a-f]{{16}} "):
        C.load_models(runs["gen"], str(later))
    with pytest.raises(ValueError, match=re.escape(fix)):
        S.main(["--generator", runs["gen"], "--tokenizer", str(later), "--prompt", "a red circle",
                "--outdir", str(tmp_path / "o")] + CPU)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_release_records_its_tokenizers_digest(runs, tmp_path):
    # fp16 export: the tokenizer release loads as rounded weights, so the generator records that digest.
    rel = C.export_release(runs["gen"], str(tmp_path / "rel"), half=True)
    extra = json.loads(open(os.path.join(rel["generator"], "config.json")).read())["extra_fields"]
    pinned = extra["inputs"]["tokenizer"]
    assert extra["inputs"] == {"tokenizer": digest(rel["tokenizer"])} and pinned != digest(runs["old"])
    assert C.content_digest(C.load_models(rel["generator"]).tokenizer.state_dict()) == pinned
    # Another tokenizer release with it is refused; a release that records no digest (older) loads with any.
    other = C.export_release(runs["new"], str(tmp_path / "other"))["tokenizer"]
    with pytest.raises(ValueError, match=rf"digest {pinned[:16]}, but '{other}' has "):
        C.load_models(rel["generator"], other)
    cfg = json.loads(open(os.path.join(rel["generator"], "config.json")).read())
    del cfg["extra_fields"]["inputs"]
    open(os.path.join(rel["generator"], "config.json"), "w").write(json.dumps(cfg))
    assert C.load_models(rel["generator"], other).tok_source.startswith(other)


def flip_byte(path, at=-100):
    b = bytearray(open(path, "rb").read())
    b[at] ^= 0x01
    open(path, "wb").write(bytes(b))


def test_damaged_release_weights_are_refused(runs, tmp_path):
    rel = C.export_release(runs["gen"], str(tmp_path / "rel"))
    for role, name in (("generator", "model.safetensors"), ("tokenizer", "model.safetensors"),
                       ("tokenizer", C.TEXT_FILE)):  # fmt: skip
        path = os.path.join(rel[role], name)
        recorded = json.loads(open(os.path.join(rel[role], "config.json")).read())["extra_fields"]["sha256"][name]
        flip_byte(path)
        now = C.file_sha256(path)
        fix = r"damaged or replaced; re-download or re-export it \(sample.py export\)$"
        with pytest.raises(ValueError, match=rf"^{re.escape(path)} has sha256 {now[:16]}, but .*config.json records "
                                             rf"{recorded[:16]}: {fix}"):
            C.load_models(rel["generator"])
        flip_byte(path)
    # As official releases: no hashes recorded, so the same damage (a byte of a weight) goes unseen.
    flip_byte(os.path.join(rel["generator"], "model.safetensors"))
    cfg = json.loads(open(os.path.join(rel["generator"], "config.json")).read())
    del cfg["extra_fields"]["sha256"]
    open(os.path.join(rel["generator"], "config.json"), "w").write(json.dumps(cfg))
    C.load_models(rel["generator"])


def test_shapes_releases_warn_about_words_outside_their_world(runs, tmp_path, capsys):
    gen = C.export_release(runs["gen"], str(tmp_path / "rel"))["generator"]  # trained on --data shapes
    words = json.loads(open(os.path.join(gen, "config.json")).read())["extra_fields"]["vocabulary"]
    assert {w for p in shapes.heldout_prompts(50) for w in p.split()} == set(words)  # every word of every category
    prompts = ["a red circle to the left of a blue square", "four red circles", "A dog.", "three cyan triangles"]
    S.main(["--generator", gen, "--outdir", str(tmp_path / "o"), *[a for p in prompts for a in ("--prompt", p)]] + CPU)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert [w.split("(")[1].split(")")[0] for w in warnings] == ["four", "dog"]
    assert warnings[0].startswith("warning: the prompt 'four red circles' has words this model never saw (four)")
    assert warnings[0].endswith(f"Its vocabulary: {' '.join(words)}")
    # A model that records no vocabulary: no warning.
    S.main(["--generator", runs["gen"], "--prompt", "a dog", "--outdir", str(tmp_path / "p")] + CPU)
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("root", SHIPPED)
def test_shipped_releases_record_hashes_digest_and_words(root, tmp_path, capsys):
    gen, tok = (os.path.join(root, d) for d in ("generator", "tokenizer"))
    extra = {d: json.loads(open(os.path.join(d, "config.json")).read())["extra_fields"] for d in (gen, tok)}
    assert extra[gen]["inputs"] == {"tokenizer": digest(tok)}
    assert sorted(extra[tok]["sha256"]) == ["model.safetensors", C.TEXT_FILE]
    for d in (gen, tok):
        assert all(C.file_sha256(os.path.join(d, n)) == h for n, h in extra[d]["sha256"].items())
        assert extra[d]["vocabulary"] == sorted({w for p in shapes.heldout_prompts(50) for w in p.split()})
    S.main(["--generator", gen, "--prompt", "a dog", "--steps", "1", "--outdir", str(tmp_path)] + CPU)
    assert "warning: the prompt 'a dog' has words this model never saw (dog)" in capsys.readouterr().out

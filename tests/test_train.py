"""The trainers on tiny presets and the shapes world, on CPU: the loss falls, resume is
exact, a truncated checkpoint is never resumed from, DDP (gloo) equals one process; and
the training curves (train_common.plot_curves) drawn from log.jsonl."""

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

import checkpoint
import shapes
import train_common
import train_maskgen
import train_tokenizer


def run_tok(out, *args):
    train_tokenizer.main([f"--out_dir={out}", "--config=tiny", *args])


def run_mg(out, tok, mode="vq", *args):
    train_maskgen.main([f"--out_dir={out}", f"--config=tiny_{mode}", f"--tokenizer={tok}", *args])


def log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def final_ckpt(out):
    return torch.load(sorted(glob.glob(f"{out}/ckpt_*.pt"))[-1], weights_only=True)


@pytest.fixture(scope="module")
def tok_runs(tmp_path_factory):
    """Tiny VQ and KL tokenizers trained for a few steps (shared by the MaskGen tests)."""
    root = tmp_path_factory.mktemp("tok")
    run_tok(root / "vq", "--max_steps=4", "--ckpt_every=4", "--sample_every=4")
    run_tok(root / "kl", "--tokenizer=tiny_kl", "--max_steps=2", "--ckpt_every=2", "--sample_every=2")
    return root


def test_tokenizer_loss_falls(tmp_path):
    run_tok(tmp_path, "--max_steps=16", "--log_every=1", "--disc_start=8")
    totals = [r["total"] for r in log(tmp_path)]
    assert len(totals) == 16 and all(map(torch.isfinite, torch.tensor(totals)))
    assert sum(totals[-4:]) / 4 < 0.5 * sum(totals[:2]) / 2
    assert "hinge" in log(tmp_path)[-1]  # the discriminator switched on at step 8
    assert os.path.exists(tmp_path / "recon_00000016.png")
    # curves.png is drawn at each sample interval: one panel per loss term, the LR and the grad norm.
    curves = train_common.series(train_common.read_log(tmp_path / "log.jsonl"))
    n = len(curves)
    assert n >= 4 and "grad_norm" in train_common.series(log(tmp_path)) and "lr" in train_common.series(log(tmp_path))
    assert Image.open(tmp_path / "curves.png").size == (3 * train_common.PANEL_W, -(-n // 3) * train_common.PANEL_H)


@pytest.mark.parametrize("mode", ["vq", "kl"])
def test_maskgen_loss_falls(mode, tmp_path, tok_runs):
    run_mg(tmp_path, tok_runs / mode, mode, "--max_steps=20", "--log_every=1", "--lr=3e-3")
    losses = [r["loss"] for r in log(tmp_path)]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:3]) / 3, losses
    assert os.path.exists(tmp_path / "samples_00000020.png") and os.path.exists(tmp_path / "curves.png")
    ck = final_ckpt(tmp_path)
    assert ck["maskgen_config"]["mode"] == mode and ck["config"]["tokenizer"] == str(tok_runs / mode)
    assert not any(k.startswith("_orig_mod") for k in ck["model"])


def _same_state(a, b):
    ta = {k: v for k, v in a.items() if torch.is_tensor(v)}
    return ta.keys() == {k for k, v in b.items() if torch.is_tensor(v)} and all(torch.equal(ta[k], b[k]) for k in ta)


def _same_optimizer(a, b):
    return all(_same_state(a["state"][i], b["state"][i]) for i in a["state"]) and a["state"].keys() == b["state"].keys()


def test_tokenizer_exact_resume(tmp_path):
    run_tok(tmp_path / "straight", "--max_steps=6", "--ckpt_every=3", "--disc_start=2")
    run_tok(tmp_path / "resumed", "--max_steps=3", "--ckpt_every=3", "--disc_start=2")
    run_tok(tmp_path / "resumed", "--max_steps=6", "--ckpt_every=3", "--disc_start=2")  # picks up step 3
    a, b = final_ckpt(tmp_path / "straight"), final_ckpt(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "loss_state"):
        assert _same_state(a[key], b[key]), key
    assert _same_optimizer(a["optimizer"], b["optimizer"]) and _same_optimizer(a["optimizer_d"], b["optimizer_d"])


def test_maskgen_exact_resume(tmp_path, tok_runs):
    tok = tok_runs / "kl"  # KL: the posterior samples and diffusion noise must also replay
    run_mg(tmp_path / "straight", tok, "kl", "--max_steps=4", "--ckpt_every=2")
    run_mg(tmp_path / "resumed", tok, "kl", "--max_steps=2", "--ckpt_every=2")
    run_mg(tmp_path / "resumed", tok, "kl", "--max_steps=4", "--ckpt_every=2")
    a, b = final_ckpt(tmp_path / "straight"), final_ckpt(tmp_path / "resumed")
    assert _same_state(a["model"], b["model"]) and _same_state(a["ema"], b["ema"])
    assert _same_optimizer(a["optimizer"], b["optimizer"])


def test_kl_scale_factor_is_measured_on_what_the_model_trains_on(tmp_path, tok_runs, monkeypatch):
    # A KL run on our own tokenizer scales its tokens to unit std, measured once on the first
    # batch: posterior samples for kl_tokens="sample", the means themselves for "mean".
    import dataclasses

    import checkpoint
    import maskgen
    from train_common import parse_config

    scales = {}
    for kind in ("sample", "mean"):
        preset = dataclasses.replace(maskgen.PRESETS["tiny_kl"], kl_tokens=kind)
        monkeypatch.setitem(maskgen.PRESETS, "tiny_kl", preset)
        run_mg(tmp_path / kind, tok_runs / "kl", "kl", "--max_steps=1", "--lr=0")
        saved = final_ckpt(tmp_path / kind)["maskgen_config"]
        assert saved["kl_tokens"] == kind
        scales[kind] = saved["scale_factor"]
    argv = ["--config=tiny_kl", f"--tokenizer={tok_runs / 'kl'}"]
    cfg = parse_config(train_maskgen.TrainConfig, train_maskgen.PRESETS, argv, rules=train_maskgen.RULES)
    tokenizer, _ = checkpoint.load_tokenizer(cfg.tokenizer, torch.device("cpu"))
    tokens, _, _ = train_maskgen.token_batches(cfg, tokenizer, 0, 1, 0, torch.device("cpu"))(0, 0)
    mean = tokens.chunk(2, dim=-1)[0]
    assert scales["mean"] == pytest.approx(1.0 / mean.std().item(), rel=1e-5)
    assert scales["sample"] < scales["mean"]  # the posterior noise adds to the spread


def test_truncated_checkpoint_is_skipped(tmp_path, capsys):
    run_tok(tmp_path, "--max_steps=4", "--ckpt_every=2", "--sample_every=100")
    newest = tmp_path / "ckpt_00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a crash mid-write (without our atomic rename)
    path, ck = checkpoint.newest_checkpoint(str(tmp_path), log=print)
    assert path.endswith("ckpt_00000002.pt") and ck["step"] == 2
    assert "ckpt_00000004.pt is unreadable" in capsys.readouterr().out
    # A stray temporary file from an interrupted save is never considered.
    (tmp_path / "ckpt_00000006.pt.tmp").write_bytes(b"garbage")
    run_tok(tmp_path, "--max_steps=5", "--ckpt_every=5", "--sample_every=100")
    assert final_ckpt(tmp_path)["step"] == 5


def test_caption_drop(tmp_path, monkeypatch):
    # The helper: p = 0 keeps every caption; otherwise each becomes "" with probability p.
    caps = [f"caption {i}" for i in range(4000)]
    assert train_tokenizer.drop_captions(caps, 0.0) == caps
    g = torch.Generator().manual_seed(0)
    out = train_tokenizer.drop_captions(caps, 0.2, generator=g)
    dropped = [c == "" for c in out]
    assert 0.17 < sum(dropped) / len(caps) < 0.23
    assert all(o == c for o, c, d in zip(out, caps, dropped) if not d)  # the others are untouched
    # The trainer: the text encoder sees "" for some training captions, reproducibly (the same
    # draws in a rerun), and never for the fixed grid captions.
    seen = []
    real = train_tokenizer.TextEncoder.forward
    monkeypatch.setattr(train_tokenizer.TextEncoder, "forward", lambda self, c: seen.append(list(c)) or real(self, c))
    # Training batches go through the per-caption memo; here unmemoised, to see each batch whole.
    monkeypatch.setattr(train_tokenizer.TextEncoder, "cached", lambda self, c: self(c))
    run_tok(tmp_path / "a", "--max_steps=6", "--caption_drop=0.5", "--sample_every=100", "--ckpt_every=100")
    first, seen[:] = list(seen), []
    run_tok(tmp_path / "b", "--max_steps=6", "--caption_drop=0.5", "--sample_every=100", "--ckpt_every=100")
    assert seen == first
    assert len(first) == 7  # 6 training batches, then the reconstruction grid at the last step
    blanks = sum(c == "" for batch in first[:6] for c in batch)
    assert 0 < blanks < 24 and "" not in first[6]
    with pytest.raises(SystemExit, match="caption_drop"):
        run_tok(tmp_path / "c", "--caption_drop=1.0")


def test_shapes_mix():
    # --shapes_mix: "" is the world's equal thirds; three weights set the share of single,
    # count and relation scenes in the training stream; anything else is refused by name.
    assert train_common.shapes_mix("") is None
    assert train_common.shapes_mix("0.2,0.3,0.5") == [0.2, 0.3, 0.5]
    assert train_common.shapes_mix_ok("") and train_common.shapes_mix_ok("0,0,1")
    for bad in ("1,2", "a,b,c", "-1,1,1", "0,0,0"):
        assert not train_common.shapes_mix_ok(bad)
    with pytest.raises(SystemExit, match="shapes_mix"):
        run_tok("/tmp/unused", "--shapes_mix=1,2")

    def categories(mix, n=300):
        cfg = types.SimpleNamespace(data="shapes", seed=0, batch_size=n, grad_accum=1, shapes_mix=mix)
        _, captions = train_common.image_batches(cfg, 64, rank=0, world=1, start_step=0)(0, 0)
        return [shapes.parse_caption(c).category for c in captions]

    assert set(categories("0,0,1")) == {"relation"}
    share = categories("0.2,0.3,0.5").count("relation") / 300
    assert 0.4 < share < 0.6  # against ~1/3 with equal thirds
    assert 0.2 < categories("").count("relation") / 300 < 0.45


def test_config_mismatch_is_refused(tmp_path):
    run_tok(tmp_path, "--max_steps=2", "--ckpt_every=2", "--sample_every=100")
    with pytest.raises(SystemExit, match=r"lr: checkpoint has 0.003, this run has 0.1"):
        run_tok(tmp_path, "--max_steps=4", "--lr=0.1")


def test_bad_options_are_refused():
    with pytest.raises(SystemExit, match="unknown option --lrr"):
        run_tok("/tmp/unused", "--lrr=1")
    with pytest.raises(SystemExit, match="not a valid int"):
        run_tok("/tmp/unused", "--max_steps=ten")
    with pytest.raises(SystemExit, match="unknown --config"):
        train_tokenizer.main(["--config=nope"])


def test_compile_runs(tmp_path, tok_runs):
    # The tokenizer too: VQ code revival edits the codebook in place, outside the graph.
    run_tok(tmp_path / "tok", "--max_steps=2", "--compile=true", "--sample_every=100")
    assert final_ckpt(tmp_path / "tok")["step"] == 2
    run_mg(tmp_path, tok_runs / "vq", "vq", "--max_steps=2", "--compile=true", "--sample_every=100")
    assert final_ckpt(tmp_path)["step"] == 2
    assert not any(k.startswith("_orig_mod") for k in final_ckpt(tmp_path)["model"])


def _torchrun(script, nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@contextlib.contextmanager
def threads(n):
    """Run the single-process reference with the ranks' thread count (OMP_NUM_THREADS=1):
    the thread count changes float rounding, and Adam turns rounding noise in gradients
    near its eps (many of a tiny model's are ~1e-8 at init) into visible weight changes."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_ddp_equals_single_process(tmp_path, tok_runs):
    """2 ranks x batch 4 == 1 process x 2 micro-batches of 4 (same global batch, same data,
    same noise per micro-batch slot): allclose weights. Ranks stay in sync by construction
    (DDP all-reduce), and rank 0 writes the checkpoint.

    Both tokenizer kinds: the VQ one's dead-code revival runs once per optimiser step over
    the global batch (gathered over ranks, collected over micro-batches). The GAN is off:
    its LeCAM EMAs see per-step (not per-micro-batch) logits."""
    for kind in ("tiny", "tiny_kl"):  # VQ, KL
        common = ["--max_steps=3", "--ckpt_every=3", "--sample_every=100", "--disc_start=100", f"--tokenizer={kind}"]
        _torchrun("train_tokenizer.py", 2, "--config=tiny", f"--out_dir={tmp_path}/tok_ddp_{kind}", *common)
        with threads(1):
            run_tok(tmp_path / f"tok_one_{kind}", "--grad_accum=2", *common)
        a, b = final_ckpt(tmp_path / f"tok_ddp_{kind}"), final_ckpt(tmp_path / f"tok_one_{kind}")
        for k in a["model"]:
            assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4), (kind, k)

    mg = ["--max_steps=3", "--ckpt_every=3", "--sample_every=100", f"--tokenizer={tok_runs / 'kl'}"]
    _torchrun("train_maskgen.py", 2, "--config=tiny_kl", f"--out_dir={tmp_path}/mg_ddp", "--batch_size=4", *mg)
    with threads(1):
        run_mg(tmp_path / "mg_one", tok_runs / "kl", "kl", "--batch_size=4", "--grad_accum=2", *mg[:-1])
    a, b = final_ckpt(tmp_path / "mg_ddp"), final_ckpt(tmp_path / "mg_one")
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4), k


def test_corrupt_shard_trains_through(tmp_path):
    """A shard with a corrupt JPEG, an image without caption and a tar that ends inside
    a member: training runs, and the skips are counted in the log."""
    import io
    import tarfile

    import data
    import shapes

    data.make_shapes_shards(str(tmp_path / "shards"), n=24, per_shard=12)
    first, second = sorted((tmp_path / "shards").glob("*.tar"))
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(shapes.ShapesWorld(1).sample(0).image).save(png, format="PNG")

    def add(tf, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))

    with tarfile.open(first, "a") as tf:
        # Several corrupt JPEGs: the shuffle buffer draws from many passes over the shards,
        # so one bad sample among ~24 might not be drawn in a few steps.
        for i in range(6):
            add(tf, f"zz_bad{i}.jpg", b"\xff\xd8\xff\xe0 this is not a JPEG")
            add(tf, f"zz_bad{i}.txt", b"a red circle")
        add(tf, "zz_nocap.png", png.getvalue())
    with tarfile.open(second, "a") as tf:
        add(tf, "zz_trunc.png", png.getvalue() * 20)
    with tarfile.open(second) as tf:
        last = tf.getmember("zz_trunc.png")
    raw = second.read_bytes()
    second.write_bytes(raw[: last.offset_data + last.size // 2])  # the file ends inside the last member
    shard = tmp_path / "shards" / "*.tar"

    out = tmp_path / "run"
    # 4 steps x 10 images: more samples than one pass over the shards holds.
    run_tok(out, f"--data={shard}", "--batch_size=10", "--max_steps=4", "--log_every=4", "--sample_every=100", "--ckpt_every=4")
    skipped = log(out)[-1]["skipped"]
    assert skipped["corrupt_image"] >= 1 and skipped["missing_caption"] >= 1 and skipped["truncated_member"] >= 1
    assert final_ckpt(out)["step"] == 4


@pytest.mark.parametrize("mode", ["vq", "kl"])
def test_maskgen_trains_on_pretokenized_shards(mode, tmp_path, tok_runs):
    out = subprocess.run(
        [sys.executable, "data.py", "pretokenize", "--tokenizer", str(tok_runs / mode), "--data", "shapes:24",
         "--out", str(tmp_path / "tokens")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    run_mg(tmp_path / "run", tok_runs / mode, mode, f"--data=pretokenized:{tmp_path}/tokens/*.tar",
           "--max_steps=3", "--log_every=1", "--sample_every=100", "--ckpt_every=3")  # fmt: skip
    assert final_ckpt(tmp_path / "run")["step"] == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log(tmp_path / "run"))


def test_mfu_logged_where_a_peak_is_known(tmp_path, tok_runs):
    # CPU has no table entry, so no MFU by default; --peak_tflops gives the peak, and MFU
    # is img/s x the analytic FLOPs per image (3x forward) / (peak x world size).
    import maskgen as M
    import tokenizer as T

    run_tok(tmp_path / "plain", "--max_steps=2", "--log_every=1")
    assert "mfu" not in log(tmp_path / "plain")[-1]
    run_tok(tmp_path / "tok", "--max_steps=2", "--log_every=1", "--peak_tflops=0.5")
    rec = log(tmp_path / "tok")[-1]
    f = T.TATiTok(T.PRESETS["tiny"]).flops()
    assert rec["mfu"] == pytest.approx(rec["img_per_s"] * 3 * (f["encode"] + f["decode"]) / 0.5e12)
    run_mg(tmp_path / "mg", tok_runs / "vq", "vq", "--max_steps=2", "--log_every=1", "--peak_tflops=0.5")
    rec = log(tmp_path / "mg")[-1]
    ck = final_ckpt(tmp_path / "mg")
    model = M.build(M.MaskGenConfig(**ck["maskgen_config"]))
    assert rec["mfu"] == pytest.approx(rec["img_per_s"] * model.train_flops(16) / 0.5e12)


# -----------------------------------------------------------------------------
# Resume: the fields that may change (they do not change the maths), and what is pinned

REF = ["--max_steps=4", "--ckpt_every=2", "--sample_every=100"]


@pytest.fixture(scope="module")
def reference(tok_runs, tmp_path_factory):
    """An uninterrupted 4-step MaskGen-KL run (constant schedule; posterior samples and
    diffusion noise to replay) with checkpoints at steps 2 and 4, shared by the resume tests."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_mg(out, tok_runs / "kl", "kl", *REF)
    return out


def stopped_at_2(reference, where):
    """A copy of the reference run as if it had stopped at its step-2 checkpoint."""
    shutil.copytree(reference, where)
    (where / "ckpt_00000004.pt").unlink()
    return where


# What each resumable field is changed to. Every case also resumes in another folder than the
# one that wrote the checkpoint, so out_dir changes in all of them ("out_dir": nothing else).
# compile changes float rounding, so it is not bit-exact: test_resuming_with_compile_changed_keeps_the_maths.
CHANGES = {
    "out_dir": [], "log_every": ["--log_every=1"], "sample_every": ["--sample_every=1"],
    "ckpt_every": ["--ckpt_every=1"], "stop_at": ["--stop_at=4"], "keep_ckpts": ["--keep_ckpts=1"],
    "device": [f"--device={'cuda' if torch.cuda.is_available() else 'cpu'}"],  # what "auto" picked, by name
    "peak_tflops": ["--peak_tflops=1"], "max_nonfinite_steps": ["--max_nonfinite_steps=1"],
    "dist_timeout_s": ["--dist_timeout_s=30"], "sample_prompts": ["--sample_prompts=a red circle|two blue squares"],
    "init_from": ["--init_from=no/such/run"],  # read by fresh runs only
    "grad_checkpointing": ["--grad_checkpointing=true"],  # recomputes the same activations: the same gradients
    "replan_data": ["--replan_data"],  # the shapes world: nothing to re-plan
    "wandb_project": ["--wandb_project=p"], "tensorboard_dir": ["--tensorboard_dir=tb"],  # fake trackers
    "max_steps": ["--max_steps=8", "--stop_at=4"],  # a constant schedule does not read it
    "tokenizer": [],  # the same tokenizer, moved: --tokenizer=<a copy> (its content is pinned by hash)
}  # fmt: skip


def test_every_resumable_field_is_tested():
    assert train_common.RESUMABLE_FIELDS - {"compile"} <= set(CHANGES)  # compile: its own test below
    assert "num_workers" not in train_common.RESUMABLE_FIELDS and "max_steps" not in train_common.RESUMABLE_FIELDS


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_resumable_field_keeps_the_maths(field, reference, tok_runs, tmp_path, monkeypatch):
    """Stopped at step 2 and resumed with `field` changed == the uninterrupted run, bit for bit."""
    fake = types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None, add_scalar=lambda *a: None,
                                 close=lambda: None)  # fmt: skip
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: fake))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=lambda d: fake))
    run = stopped_at_2(reference, tmp_path / "run")
    tok = shutil.copytree(tok_runs / "kl", tmp_path / "moved") if field == "tokenizer" else tok_runs / "kl"
    run_mg(run, tok, "kl", *REF, *CHANGES[field])
    a, b = (torch.load(d / "ckpt_00000004.pt", weights_only=True) for d in (reference, run))
    assert a["step"] == b["step"] == 4 and b["config"][field] != a["config"][field]  # it did change
    for key in ("model", "ema"):
        assert _same_state(a[key], b[key]), key
    assert _same_optimizer(a["optimizer"], b["optimizer"])


def test_resuming_with_compile_changed_keeps_the_maths(reference, tok_runs, tmp_path, monkeypatch):
    """compile, the one resumable field the parametrized test leaves out: resumed at step 2
    with --compile=true == the eager reference, up to float rounding. torch.compile runs with
    the aot_eager backend (dynamo's graph capture and AOTAutograd, eager kernels): inductor's
    code generation would take minutes on a cold cache, and it is not what could break here."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="aot_eager"))
    run = stopped_at_2(reference, tmp_path / "run")
    run_mg(run, tok_runs / "kl", "kl", *REF, "--compile=true")
    a, b = (torch.load(d / "ckpt_00000004.pt", weights_only=True) for d in (reference, run))
    assert a["step"] == b["step"] == 4 and b["config"]["compile"] and not a["config"]["compile"]
    assert not any(k.startswith("_orig_mod") for k in b["model"])  # the unwrapped model is saved
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], rtol=1e-4, atol=1e-6), (key, k)


def test_fields_that_change_the_maths_are_refused(reference, tok_runs, tmp_path):
    # num_workers: the order of shard data depends on it (stream positions are saved per
    # DataLoader worker), so it may not change, even for the shapes world where it is unused.
    run = stopped_at_2(reference, tmp_path / "run")
    with pytest.raises(SystemExit, match=r"num_workers: checkpoint has 0, this run has 2 \(the order of the shard"):
        run_mg(run, tok_runs / "kl", "kl", *REF, "--num_workers=2")


def test_max_steps_may_change_only_where_no_step_depended_on_it(tmp_path, tok_runs):
    # MaskGen-VQ's cosine decay runs from the end of warm-up (2 steps) to max_steps.
    tok = tok_runs / "vq"
    run_mg(tmp_path / "a", tok, "vq", "--max_steps=8", "--stop_at=2", "--sample_every=100")
    # steps 0 and 1 were warm-up, whose learning rate does not depend on max_steps: allowed, and exact
    run_mg(tmp_path / "a", tok, "vq", "--max_steps=10", "--stop_at=4", "--sample_every=100")
    run_mg(tmp_path / "b", tok, "vq", "--max_steps=10", "--stop_at=4", "--sample_every=100")
    a, b = final_ckpt(tmp_path / "a"), final_ckpt(tmp_path / "b")
    assert a["step"] == b["step"] == 4 and _same_state(a["model"], b["model"]) and _same_state(a["ema"], b["ema"])
    # step 3 followed the cosine decay towards step 10: another length is refused, with the way out
    with pytest.raises(SystemExit, match=r"max_steps: checkpoint has 10, this run has 12 \(the cosine decay's "
                                         r"length.*--stop_at=STEP\)"):  # fmt: skip
        run_mg(tmp_path / "a", tok, "vq", "--max_steps=12", "--sample_every=100")


def test_resume_pins_the_tokenizer_and_text_encoder(tmp_path, tok_runs, capsys):
    """Other weights at the same --tokenizer path (a replaced checkpoint) would
    resume on other tokens; the checkpoint's hashes of both frozen models refuse it."""
    import checkpoint

    tok = shutil.copytree(tok_runs / "vq", tmp_path / "tok")
    out = tmp_path / "mg"
    run_mg(out, tok, "vq", "--max_steps=4", "--stop_at=2", "--sample_every=100")
    recorded = final_ckpt(out)["inputs"]
    tok_file = sorted(tok.glob("ckpt_*.pt"))[-1]
    original = tok_file.read_bytes()

    def replace_tokenizer_checkpoint(part):  # a different tokenizer file at the same path
        ck = torch.load(tok_file, weights_only=True)
        del ck["sha256"]
        weight = next(v for v in ck[part].values() if v.is_floating_point())
        weight.add_(1e-3)
        torch.save({**ck, "sha256": checkpoint.content_digest(ck)}, tok_file)
        tokenizer, text = checkpoint.load_tokenizer(str(tok))
        return {"ema": "tokenizer", "text_encoder": "text_encoder"}[part], {
            "tokenizer": checkpoint.content_digest(tokenizer.state_dict()),
            "text_encoder": checkpoint.content_digest(text.state_dict())}  # fmt: skip

    for part in ("ema", "text_encoder"):
        name, now = replace_tokenizer_checkpoint(part)
        assert now[name] != recorded[name]
        with pytest.raises(SystemExit) as e:
            run_mg(out, tok, "vq", "--max_steps=4", "--sample_every=100")
        msg = str(e.value)
        want = f"  {name}: the checkpoint was trained on sha256 {recorded[name][:16]}, this run has {now[name][:16]}"
        assert want in msg
        other = {"tokenizer": "text_encoder", "text_encoder": "tokenizer"}[name]
        assert f"  {other}: the checkpoint" not in msg and "Give the run the files it started with" in msg
        assert str(out / "ckpt_00000002.pt") in msg
        tok_file.write_bytes(original)
    run_mg(out, tok, "vq", "--max_steps=4", "--sample_every=100")  # the same files: resumes
    assert f"resumed from {out / 'ckpt_00000002.pt'} at step 2" in capsys.readouterr().out
    assert final_ckpt(out)["step"] == 4 and final_ckpt(out)["inputs"] == recorded


# -----------------------------------------------------------------------------
# Training curves: curves.png from log.jsonl


def _write_log(path, records, tail=""):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)


def test_last_record_per_step_wins_and_junk_is_ignored(tmp_path):
    # A run logged steps 10..40, was killed after its checkpoint at 20 and resumed: steps
    # 30 and 40 appear twice, the later (resumed) records are the ones that count.
    first = [{"step": s, "lr": 1e-3, "loss": 1.0 / s} for s in (10, 20, 30, 40)]
    resumed = [{"step": s, "lr": 1e-3, "loss": 2.0 / s} for s in (30, 40, 50)]
    _write_log(tmp_path / "log.jsonl", first + resumed, tail='{"step": 60, "lo')  # a line cut by a kill
    recs = train_common.read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 50]
    assert recs[2]["loss"] == 2.0 / 30 and recs[1]["loss"] == 1.0 / 20


def test_series_keeps_curves_only_and_drops_nonfinite():
    recs = [{"step": 1, "lr": 0.1, "grad_norm": float("nan"), "l2_loss": 0.5, "img_per_s": 9.0, "mfu": 0.1,
             "skipped_nonfinite": 1, "skipped": {"corrupt_image": 2}},
            {"step": 2, "lr": 0.2, "grad_norm": 3.0, "l2_loss": 0.4, "img_per_s": 9.0}]  # fmt: skip
    s = train_common.series(recs)
    assert list(s) == ["l2_loss", "lr", "grad_norm"]  # losses first; throughput and counters are not curves
    assert s["grad_norm"] == ([2], [3.0]) and s["l2_loss"] == ([1, 2], [0.5, 0.4])


def test_plot_curves_writes_one_panel_per_curve(tmp_path):
    assert train_common.plot_curves(str(tmp_path)) is None  # no log yet: nothing drawn, no error
    recs = [{"step": s, "lr": min(1.0, s / 5) * 1e-3, "grad_norm": 1.0 / s, "loss": 3.0 / s, "kl_loss": 0.1}
            for s in range(1, 21)]  # fmt: skip
    _write_log(tmp_path / "log.jsonl", recs)
    path = train_common.plot_curves(str(tmp_path))
    assert path == str(tmp_path / "curves.png")
    img = Image.open(path)
    # 4 curves, 3 per row: 2 rows x 3 panels.
    assert img.size == (3 * train_common.PANEL_W, 2 * train_common.PANEL_H)
    # The lines are drawn in blue: every one of the four used panels holds blue pixels, the
    # two empty ones none.
    px = img.convert("RGB").load()

    def blue_in(col, row):
        x0, y0 = col * train_common.PANEL_W, row * train_common.PANEL_H
        return any(px[x, y] == (31, 119, 180) for x in range(x0, x0 + train_common.PANEL_W, 2)
                   for y in range(y0, y0 + train_common.PANEL_H, 2))  # fmt: skip

    assert [blue_in(c, r) for r in range(2) for c in range(3)] == [True, True, True, True, False, False]
    assert not (tmp_path / "curves.png.tmp.png").exists()


def test_curves_command_redraws_a_run_folder(tmp_path):
    _write_log(tmp_path / "log.jsonl", [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    out = subprocess.run([sys.executable, "train_common.py", "curves", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "curves.png"), out.stderr[-2000:]
    bad = subprocess.run([sys.executable, "train_common.py", "curves", str(tmp_path / "none")], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert "has no log.jsonl; pass a train_tokenizer.py / train_maskgen.py run folder" in bad.stderr


# -----------------------------------------------------------------------------
# The one shapes-batch path: ShapesWorld.batch, used by the trainers and data.ShapesDataset


def test_shapes_batch_is_the_one_path():
    import numpy as np
    import torch.nn.functional as F

    import data

    world = shapes.ShapesWorld(seed=3)
    images, samples = world.batch(range(5, 9))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    # 64 px: exactly the rendered pixels, k / 255
    assert np.array_equal((images * 255).round().byte().permute(0, 2, 3, 1).numpy(), np.stack([s.image for s in samples]))
    assert torch.equal(images * 255, (images * 255).round())
    small, _ = world.batch(range(5, 9), image_size=32)
    want = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.equal(small, want) and small.min() >= 0 and small.max() <= 1
    # the trainers' data slots and the dataset's items are the same tensors
    cfg = types.SimpleNamespace(data="shapes", seed=3, batch_size=4, grad_accum=1, shapes_mix="")
    got, captions = train_common.image_batches(cfg, 32, rank=0, world=1, start_step=0)(0, 0)
    first, _ = world.batch(range(4), image_size=32)
    assert torch.equal(got, first) and captions == [s.caption for s in world.batch(range(4))[1]]
    for size, batch in ((64, world.batch(range(4))[0]), (32, first)):
        ds = data.ShapesDataset(seed=3, image_size=size)
        assert all(torch.equal(ds.item(i)["image"], batch[i]) for i in range(4)), size

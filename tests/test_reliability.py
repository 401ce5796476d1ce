"""Fault cases of the trainers on the tiny presets, on CPU: checkpoints that are
corrupt, stray, damaged or hold inf are never resumed from nor counted by retention;
non-finite steps are skipped and stop the run when they persist; SIGTERM writes a
checkpoint and exits non-zero, under torchrun too, and a second signal stops at once;
the collective timeout reaches the process group."""

import dataclasses
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import losses
import tokenizer
import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tok(out, *args):
    train_tokenizer.main([f"--out_dir={out}", "--config=tiny", "--sample_every=1000", *args])


def ckpts(out):
    return sorted(p.name for p in out.glob("ckpt_*.pt"))


def test_stray_and_corrupt_checkpoints_are_not_resumed_nor_counted(tmp_path, capsys):
    run_tok(tmp_path, "--max_steps=6", "--stop_at=4", "--ckpt_every=2")
    (tmp_path / "ckpt_99999999.pt").write_bytes(b"not a checkpoint")  # a stray / corrupt newest file
    capsys.readouterr()
    run_tok(tmp_path, "--max_steps=6", "--ckpt_every=2")
    out = capsys.readouterr().out
    assert "ckpt_99999999.pt is unreadable" in out and "falling back to the previous one" in out
    assert "resumed from" in out and "ckpt_00000004.pt at step 4" in out
    # keep_ckpts=2 good ones (4 and 6); the bad file is left alone and named, never counted
    assert ckpts(tmp_path) == ["ckpt_00000004.pt", "ckpt_00000006.pt", "ckpt_99999999.pt"]
    assert "left alone" in out and "ckpt_99999999.pt" in out.split("left alone")[1]
    # readers fall back the same way
    path, ck = checkpoint.newest_checkpoint(str(tmp_path), log=lambda s: None)
    assert path.endswith("ckpt_00000006.pt") and ck["step"] == 6


def test_no_usable_checkpoint_says_so_and_starts_from_scratch(tmp_path, capsys):
    for step in (2, 4):
        (tmp_path / f"ckpt_{step:08d}.pt").write_bytes(b"garbage")
    run_tok(tmp_path, "--max_steps=2", "--ckpt_every=2")
    out = capsys.readouterr().out
    assert "ckpt_00000002.pt is unreadable (" in out and out.count("falling back") == 1  # only when there is one
    assert f"no usable checkpoint in {tmp_path} (2 unreadable: ckpt_00000004.pt, ckpt_00000002.pt); " \
           "starting from scratch" in out  # fmt: skip
    # the new checkpoint (step 2) replaced nothing good; the garbage at step 4 is left alone
    path, ck = checkpoint.newest_checkpoint(str(tmp_path), log=lambda s: None)
    assert ck["step"] == 2 and ckpts(tmp_path) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]


def test_only_ckpt_step_files_are_checkpoints_ordered_by_step(tmp_path):
    """Steps sort as numbers (1e8 has 9 digits); ckpt_best.pt, .bak copies and files without a checksum are never
    resumed from nor deleted; retention keeps the file just written even when a higher step is good."""
    payload = {"model": {"w": torch.ones(2)}, "ema": {}}
    for step in (99999999, 100000000):
        checkpoint.save_checkpoint(str(tmp_path), step, payload, keep=5)
    names = [os.path.basename(p) for p in checkpoint.run_checkpoints(str(tmp_path))]
    assert names == ["ckpt_100000000.pt", "ckpt_99999999.pt"]
    good = (tmp_path / "ckpt_99999999.pt").read_bytes()
    for stray in ("ckpt_best.pt", "ckpt_00000010.pt.bak"):
        (tmp_path / stray).write_bytes(good)
    torch.save(payload, tmp_path / "ckpt_200000000.pt")  # checkpoint-shaped, but not written by a run
    lines = []
    path, ck = checkpoint.newest_checkpoint(str(tmp_path), log=lines.append, strict=True)
    assert path.endswith("ckpt_100000000.pt")
    assert lines[0] == f"note: ignoring ckpt_00000010.pt.bak, ckpt_best.pt in {tmp_path}: only ckpt_<step>.pt " \
                       "files are checkpoints"  # fmt: skip
    assert "ckpt_200000000.pt is without a checksum (not written by a training run); falling back" in lines[1]
    assert sum("ignoring" in line for line in lines) == 1
    checkpoint.save_checkpoint(str(tmp_path), 5, payload, keep=1, log=lines.append)  # an older step than the newest
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_00000005.pt", "ckpt_00000010.pt.bak", "ckpt_100000000.pt", "ckpt_200000000.pt", "ckpt_best.pt"]
    assert "left alone" in lines[-1] and "ckpt_200000000.pt" in lines[-1]


class _Log(list):
    """A stand-in for the trainers' Logger that keeps the lines (enabled: rank 0)."""

    def __init__(self, enabled=True):
        super().__init__()
        self.enabled = enabled

    def __call__(self, record=None, text=None):
        self.append(text)


def _run_folder(out, steps):
    cfg = dataclasses.replace(train_tokenizer.PRESETS["tiny"], out_dir=str(out))
    out.mkdir(exist_ok=True)
    for step in steps:
        payload = {"config": dataclasses.asdict(cfg), "step": step, "model": {"w": torch.ones(2)}, "ema": {}}
        checkpoint.save_checkpoint(str(out), step, payload, keep=5)
    return cfg


def test_a_checkpoint_without_checksum_is_skipped_on_resume(tmp_path):
    import train_common

    cfg = _run_folder(tmp_path, [2])
    torch.save({"model": {"w": torch.ones(2)}, "ema": {}}, tmp_path / "ckpt_00000004.pt")  # no config, step, sha256
    log = _Log()
    path, ck = train_common.find_resume(cfg, log)
    assert path.endswith("ckpt_00000002.pt") and ck["step"] == 2
    assert any("ckpt_00000004.pt is without a checksum" in line for line in log)


def _resume_on_rank(rank, init, dirs, damaged_rank, results):
    import train_common

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    if rank == damaged_rank:  # this rank cannot read the file rank 0 chose (another node's damaged copy)
        train_common.load_good = lambda path, strict: (None, "unreadable (its copy on this node is damaged)")
    cfg = dataclasses.replace(train_tokenizer.PRESETS["tiny"], out_dir=dirs[rank])
    try:
        path, ck = train_common.find_resume(cfg, _Log(enabled=rank == 0))
        results.put((rank, path, ck["step"]))
    except SystemExit as e:
        results.put((rank, str(e.code), None))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("damaged_rank", [None, 1])
def test_every_rank_resumes_from_rank_0s_choice(tmp_path, damaged_rank):
    """Rank 1's folder has a newer checkpoint (its view differs): it still loads rank 0's; a rank that cannot
    read that file stops every rank, naming the rank, the file and the cause."""
    _run_folder(tmp_path / "rank0", [2])
    _run_folder(tmp_path / "rank1", [2, 4])
    ctx = torch.multiprocessing.get_context("fork")
    results = ctx.Queue()
    args = (f"file://{tmp_path}/pg", [str(tmp_path / "rank0"), str(tmp_path / "rank1")], damaged_rank, results)
    procs = [ctx.Process(target=_resume_on_rank, args=(rank, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    chosen = str(tmp_path / "rank0" / "ckpt_00000002.pt")
    if damaged_rank is None:
        assert got == [(0, chosen, 2), (1, chosen, 2)]
    else:
        msg = f"error: rank 1 cannot read {chosen}, the checkpoint rank 0 resumes from: it is unreadable (its copy " \
              "on this node is damaged)"  # fmt: skip
        assert got == [(0, msg, None), (1, msg, None)]


def _rewrite(path, change, rehash):
    ck = torch.load(path, weights_only=True)
    digest = ck.pop("sha256")
    change(ck)
    torch.save({**ck, "sha256": checkpoint.content_digest(ck) if rehash else digest}, path)


@pytest.mark.parametrize("fault", ["inf_weights", "damaged_bytes"])
def test_damaged_or_nonfinite_checkpoint_is_never_resumed(fault, tmp_path, capsys):
    run_tok(tmp_path, "--max_steps=4", "--ckpt_every=2")
    newest = tmp_path / "ckpt_00000004.pt"
    if fault == "inf_weights":  # a valid checksum over weights that hold inf
        _rewrite(newest, lambda ck: ck["ema"]["decoder.ln_post.weight"].fill_(float("inf")), rehash=True)
        why = "non-finite weights (ema.decoder.ln_post.weight)"
    else:  # content changed but the file still unpickles: the checksum no longer matches
        _rewrite(newest, lambda ck: ck["model"]["decoder.ln_post.weight"].add_(1e-3), rehash=False)
        why = "checksum mismatch"
    capsys.readouterr()
    run_tok(tmp_path, "--max_steps=5", "--ckpt_every=5", "--log_every=1")
    out = capsys.readouterr().out
    assert f"ckpt_00000004.pt is {why}" in out and "ckpt_00000002.pt at step 2" in out
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert all(r["skipped_nonfinite"] == 0 and math.isfinite(r["total"]) for r in records)
    assert ckpts(tmp_path) == ["ckpt_00000002.pt", "ckpt_00000004.pt", "ckpt_00000005.pt"]  # bad file kept, named


def test_nonfinite_weights_are_never_written(tmp_path):
    payload = {"model": {"w": torch.tensor([1.0, float("nan")])}, "ema": {}}
    with pytest.raises(ValueError, match=r"non-finite weights \(model.w\)"):
        checkpoint.save_checkpoint(str(tmp_path), 1, payload)
    assert list(tmp_path.iterdir()) == []


def _nan_loss_at(monkeypatch, bad_steps):
    """Make the tokenizer's generator loss nan at the given steps (a nan spike)."""
    original = losses.TokenizerLoss.generator_loss

    def spiky(self, images, recon, extras, step):
        loss, terms = original(self, images, recon, extras, step)
        return (loss * float("nan") if step in bad_steps else loss), terms

    monkeypatch.setattr(losses.TokenizerLoss, "generator_loss", spiky)


def test_nonfinite_step_is_skipped(tmp_path, monkeypatch):
    run_tok(tmp_path / "a", "--max_steps=2", "--ckpt_every=2", "--log_every=1")
    _nan_loss_at(monkeypatch, {2})
    run_tok(tmp_path / "a", "--max_steps=3", "--ckpt_every=3", "--log_every=1")  # step index 2 is nan
    before = torch.load(tmp_path / "a" / "ckpt_00000002.pt", weights_only=True)
    after = torch.load(tmp_path / "a" / "ckpt_00000003.pt", weights_only=True)
    # No optimizer update and no EMA update. (The VQ codebook's code revival runs in the
    # forward pass, before the loss is known, so it is not the optimizer's to skip.)
    params = [n for n, _ in tokenizer.TATiTok(tokenizer.PRESETS["tiny"]).named_parameters() if "quantize." not in n]
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in params)
    assert all(torch.equal(before["ema"][k], after["ema"][k]) for k in before["ema"])
    assert [r["skipped_nonfinite"] for r in map(json.loads, open(tmp_path / "a" / "log.jsonl"))] == [0, 0, 1]


def test_persistent_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, set(range(2, 100)))
    with pytest.raises(SystemExit, match=r"3 steps in a row \(up to step 5\).*last good checkpoint is "
                                         r".*ckpt_00000004.pt"):  # fmt: skip
        run_tok(tmp_path, "--max_steps=20", "--ckpt_every=2", "--max_nonfinite_steps=3")
    # steps 3 and 4 were skipped, so the checkpoint at 4 holds step 2's (finite) weights
    a, b = (torch.load(tmp_path / f"ckpt_{s:08d}.pt", weights_only=True)["ema"] for s in (2, 4))
    assert ckpts(tmp_path) == ["ckpt_00000002.pt", "ckpt_00000004.pt"] and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, capsys):
    cmd = [sys.executable, "train_tokenizer.py", "--config=tiny", f"--out_dir={tmp_path}", "--max_steps=100000",
           "--ckpt_every=100000", "--sample_every=100000", "--log_every=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    saved = ckpts(tmp_path)
    assert len(saved) == 1 and f"stopped by SIGTERM at step {int(saved[0][5:13])}; checkpoint " in out, out
    assert str(tmp_path / saved[0]) in out and "Traceback" not in out
    step = int(saved[0][5:13])
    capsys.readouterr()
    run_tok(tmp_path, "--max_steps=100000", f"--stop_at={step + 1}", "--ckpt_every=100000", "--sample_every=100000",
            "--log_every=1")  # fmt: skip
    assert f"ckpt_{step:08d}.pt at step {step}" in capsys.readouterr().out
    assert torch.load(tmp_path / f"ckpt_{step + 1:08d}.pt", weights_only=True)["step"] == step + 1


def test_dist_timeout_reaches_the_process_group(tmp_path, monkeypatch):
    seen = {}

    def fake_init(backend, timeout=None):
        seen["timeout"] = timeout
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.distributed, "init_process_group", fake_init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="stop here"):
        run_tok(tmp_path, "--dist_timeout_s=7")
    assert seen["timeout"] == datetime.timedelta(seconds=7)


class _Quiet:
    """A stand-in for the trainers' Logger."""

    def __call__(self, record=None, text=None):
        pass

    def close(self):
        pass


def test_a_second_signal_during_a_checkpoint_write_exits_at_once_and_leaves_no_partial_file(tmp_path):
    import train_common

    cfg = train_tokenizer.PRESETS["tiny"]
    before = signal.getsignal(signal.SIGTERM)
    control = train_common.RunControl(dataclasses.replace(cfg, out_dir=str(tmp_path)), 1, _Quiet())
    seen = {}

    class SecondSignal:  # a payload value whose checksum pass (inside the write) brings the second signal
        def __repr__(self):
            seen["tmp"] = [p.name for p in tmp_path.iterdir()]
            os.kill(os.getpid(), signal.SIGTERM)
            return "x"

    control.ECHO_S = 0  # no echo window: the second signal counts however soon it comes
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: a flag (finish the step, then save)
        assert control.signum == signal.SIGTERM
        with pytest.raises(SystemExit) as e:
            control.save(1, {"model": {"w": torch.ones(2)}, "ema": {}, "late": SecondSignal()})
    finally:
        control.close(logs=False)
    assert e.value.code == 143 and seen["tmp"] == ["ckpt_00000001.pt.tmp"]  # it arrived mid-write
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before


def test_a_signal_after_the_ranks_agreed_waits_for_the_next_step(tmp_path):
    """A race the torchrun test below could hit: a signal landing on one rank after
    stop_requested() read its flag must not make that rank exit alone (the other ranks, told
    to go on, would crash in the next step's collectives); the next step's check sees it."""
    import train_common

    cfg = dataclasses.replace(train_tokenizer.PRESETS["tiny"], out_dir=str(tmp_path))
    control = train_common.RunControl(cfg, 1, _Quiet())
    try:
        assert control.stop_requested() is False
        os.kill(os.getpid(), signal.SIGTERM)  # lands after the agreement, still inside the step
        assert control.signum == signal.SIGTERM
        control.exit_if_stopped(5, master=True)  # goes on: no SystemExit
        assert control.stop_requested() is True  # the next step agrees to stop ...
        with pytest.raises(SystemExit) as e:
            control.exit_if_stopped(6, master=True)  # ... and then exits with 128 + SIGTERM
        assert e.value.code == 128 + signal.SIGTERM
    finally:
        control.close(logs=False)


def _start(cmd, out_dir, lines=1):
    """Start a training command and wait until its log has `lines` records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log, deadline = out_dir / "log.jsonl", time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= lines) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    return proc


LONG_RUN = ["--config=tiny", "--max_steps=100000", "--ckpt_every=100000", "--sample_every=100000", "--log_every=1"]


def test_a_second_sigterm_stops_at_once(tmp_path):
    # The trainer with no echo window (a repeat within RunControl.ECHO_S s counts as the first, tested
    # below): a tiny step is over before 2 s, so the second signal is sent right after the first.
    no_echo = ("import runpy, train_common; train_common.RunControl.ECHO_S = 0; "
               "runpy.run_path('train_tokenizer.py', run_name='__main__')")
    proc = _start([sys.executable, "-c", no_echo, f"--out_dir={tmp_path}", *LONG_RUN], tmp_path)
    proc.send_signal(signal.SIGTERM)
    head = ""
    for line in proc.stdout:  # the first is taken: the step goes on
        head += line
        if "received SIGTERM" in line:
            break
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out = head + proc.communicate(timeout=60)[0]
    assert proc.returncode == 143 and time.time() - t0 < 20, out
    assert "send it again after 0 s to stop at once" in out and "stopped by SIGTERM" not in out, out
    assert "Traceback" not in out, out
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written; any checkpoint there is a good one
    assert all(checkpoint.load_good(str(p))[0] is not None for p in tmp_path.glob("ckpt_*.pt"))


def test_one_signal_delivered_twice_still_checkpoints(tmp_path):
    """Under SLURM a rank gets the job's SIGTERM and, a moment later, torchrun's copy of it: the
    two arrive together and must count as one request (finish the step, checkpoint, exit 143)."""
    proc = _start([sys.executable, "train_tokenizer.py", f"--out_dir={tmp_path}", *LONG_RUN], tmp_path)
    proc.send_signal(signal.SIGTERM)
    out = ""
    for line in proc.stdout:  # the first is taken; its copy comes while the step goes on
        out += line
        if "received SIGTERM" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out += proc.communicate(timeout=120)[0]
    saved = sorted(p.name for p in tmp_path.glob("ckpt_*.pt"))
    assert proc.returncode == 143 and len(saved) == 1, out
    assert f"stopped by SIGTERM at step {int(saved[0][5:13])}; checkpoint " in out, out


def _torchrun(out_dir, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_tokenizer.py",
            f"--out_dir={out_dir}", *LONG_RUN, *args]  # fmt: skip


def test_sigterm_under_torchrun_every_rank_saves_and_the_job_resumes(tmp_path):
    """SIGTERM to torchrun (as SLURM or Kubernetes send it): its agent passes it to both ranks,
    which finish the step, write one checkpoint together and exit 143; the job fails (non-zero),
    and the same command resumes."""
    proc = _start(_torchrun(tmp_path), tmp_path, lines=2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and out.count("received SIGTERM: finishing this step") == 2, out[-3000:]
    saved = ckpts(tmp_path)
    assert len(saved) == 1, out[-3000:]  # one checkpoint: no rank exited alone (the race tested above)
    step = int(saved[0][5:13])
    assert f"stopped by SIGTERM at step {step}; checkpoint {tmp_path / saved[0]}" in out
    ck = torch.load(tmp_path / saved[0], weights_only=True)
    assert ck["step"] == step and len(ck["rng"]) == 2  # both ranks' states: both took part
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = subprocess.run(_torchrun(tmp_path, f"--stop_at={step + 1}"), cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed from {tmp_path / saved[0]} at step {step}" in again.stdout
    assert torch.load(tmp_path / f"ckpt_{step + 1:08d}.pt", weights_only=True)["step"] == step + 1

"""Preemption with DataLoader workers, on CPU and tiny presets: SIGTERM / SIGINT sent to the
whole process group (as torchrun and a shell's job control do) reaches the workers too, yet
the run finishes its step, writes a checkpoint and exits 143 / 130, in one process and under
torchrun (2 ranks, gloo), and resuming equals the uninterrupted run bit for bit. The workers
leave with their main process, whether it exits or is killed."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import train_maskgen
import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")  # the subprocesses' thread count: the same float rounding
LONG = ["--max_steps=1000", "--ckpt_every=1000", "--sample_every=1000", "--log_every=1"]  # stopped by a signal


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    data.make_shapes_shards(str(folder), n=48, per_shard=8)  # 6 shards of 64 px images
    return folder


def _interrupt(cmd, out, signum, lines=2):
    """Start cmd in a new session, wait for `lines` log records, send `signum` to its whole process group.
    Returns (exit status, output, the pids of the main process's children before the signal)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    log, deadline = out / "log.jsonl", time.time() + 180
    while not (log.exists() and log.read_text().count("\n") >= lines) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    children = [p for p in os.listdir("/proc") if p.isdigit() and _stat(p)[1:2] == [str(proc.pid)]]
    os.killpg(proc.pid, signum)
    return proc.wait(timeout=120), proc.stdout.read(), children


def _stat(pid):
    """[state, parent pid, ...] of a process from /proc, [] if it is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _gone(pids, within=15.0):
    """Whether every process in pids has exited (a zombie, exited but not yet reaped, has), waiting up to `within` s."""
    deadline = time.time() + within
    while any(_stat(p)[:1] not in ([], ["Z"]) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    return all(_stat(p)[:1] in ([], ["Z"]) for p in pids)


def _ckpt(out, step):
    return torch.load(out / f"ckpt_{step:08d}.pt", weights_only=True)


def _assert_same(a, b):
    """Two checkpoints hold the same weights, EMA and reader positions, bit for bit."""
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for pa, pb in zip(a["data_positions"], b["data_positions"]):
        assert torch.equal(pa["positions"], pb["positions"])


def _stopped(out, text, signame):
    """The step a signal stopped the run at: its one checkpoint, named in the output."""
    saved = sorted(p.name for p in out.glob("ckpt_*.pt"))
    assert len(saved) == 1, text[-3000:]
    step = int(saved[0][5:13])
    assert f"stopped by {signame} at step {step}; checkpoint {out / saved[0]}" in text, text[-3000:]
    assert "Traceback" not in text and "DataLoader worker" not in text, text[-3000:]
    return step


def test_group_sigterm_with_workers_checkpoints_and_resumes_exactly(tmp_path, shard_dir):
    opts = ["--config=tiny", f"--data={shard_dir}", "--num_workers=2", "--batch_size=4", "--disc_start=1000"]
    out = tmp_path / "run"
    rc, text, workers = _interrupt([sys.executable, "train_tokenizer.py", f"--out_dir={out}", *opts, *LONG], out,
                                   signal.SIGTERM)  # fmt: skip
    assert rc == 143 and "received SIGTERM" in text, text[-3000:]
    step = _stopped(out, text, "SIGTERM")
    assert len(workers) == 2 and _gone(workers)  # the workers left with it
    assert _ckpt(out, step)["data_positions"][0]["num_workers"] == 2
    train_tokenizer.main([f"--out_dir={out}", *opts, *LONG, f"--stop_at={step + 2}"])
    train_tokenizer.main([f"--out_dir={tmp_path / 'straight'}", *opts, *LONG, f"--stop_at={step + 2}"])
    _assert_same(_ckpt(out, step + 2), _ckpt(tmp_path / "straight", step + 2))


def test_group_sigint_with_workers_on_pretokenized_tokens(tmp_path):
    """MaskGen on pretokenized shards: the token loader's workers (not persistent), Ctrl-C's SIGINT."""
    tok = tmp_path / "tok"
    train_tokenizer.main([f"--out_dir={tok}", "--config=tiny", "--max_steps=1", "--sample_every=100"])
    made = subprocess.run([sys.executable, "data.py", "pretokenize", "--tokenizer", str(tok), "--data", "shapes:48",
                           "--out", str(tmp_path / "tokens"), "--num-workers", "0", "--per-shard", "8"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    opts = ["--config=tiny_vq", f"--tokenizer={tok}", f"--data=pretokenized:{tmp_path}/tokens/*.tar",
            "--num_workers=2", "--batch_size=4"]  # fmt: skip
    out = tmp_path / "run"
    rc, text, workers = _interrupt([sys.executable, "train_maskgen.py", f"--out_dir={out}", *opts, *LONG], out,
                                   signal.SIGINT)  # fmt: skip
    assert rc == 130 and "received SIGINT" in text, text[-3000:]
    step = _stopped(out, text, "SIGINT")
    assert len(workers) == 2 and _gone(workers)
    train_maskgen.main([f"--out_dir={out}", *opts, *LONG, f"--stop_at={step + 1}"])
    train_maskgen.main([f"--out_dir={tmp_path / 'straight'}", *opts, *LONG, f"--stop_at={step + 1}"])
    _assert_same(_ckpt(out, step + 1), _ckpt(tmp_path / "straight", step + 1))


def _torchrun(out, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_tokenizer.py",
            f"--out_dir={out}", *args]  # fmt: skip


def test_group_sigterm_under_torchrun_with_workers(tmp_path, shard_dir):
    """SIGTERM to the job's process group reaches torchrun, which signals each rank's own process
    group, workers included: both ranks finish the step, write one checkpoint together (both ranks'
    RNG and reader positions) and exit 143; torchrun reports the signal (status 1). The same command
    resumes, bit-identical to an uninterrupted job."""
    opts = ["--config=tiny", f"--data={shard_dir}", "--num_workers=1", "--batch_size=4", "--disc_start=1000", *LONG]
    out = tmp_path / "run"
    rc, text, _ = _interrupt(_torchrun(out, *opts), out, signal.SIGTERM)
    assert rc != 0 and text.count("received SIGTERM: finishing this step") == 2, text[-3000:]
    assert "got signal: 15" in text  # torchrun's own exit
    text = text.split("Traceback")[0]  # torchrun's traceback for its SignalException comes last
    step = _stopped(out, text, "SIGTERM")
    ck = _ckpt(out, step)
    assert len(ck["rng"]) == 2 and [p["num_workers"] for p in ck["data_positions"]] == [1, 1]
    jobs = [subprocess.Popen(_torchrun(run, *opts, f"--stop_at={step + 1}"), cwd=ROOT, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for run in (out, tmp_path / "straight")]  # resumed, and uninterrupted, side by side (own ports)
    for job in jobs:
        text = job.communicate(timeout=300)[0]
        assert job.returncode == 0, text[-3000:]
    _assert_same(_ckpt(out, step + 1), _ckpt(tmp_path / "straight", step + 1))


WORKERS_SCRIPT = """
import os, signal, sys
import data
loader = data.image_text_loader(sys.argv[1], image_size=32, batch_size=2, num_workers=2, start_batch=0)
it = iter(loader)
next(it)
print(" ".join(str(w.pid) for w in it._workers), flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
# "exit": the iterator, a global, is still alive when the interpreter exits
"""


@pytest.mark.parametrize("how", ["exit", "die"])
def test_workers_leave_with_their_main_process(how, tmp_path, shard_dir):
    """Workers ignore group signals, not their main process: one exiting with the loader still
    alive stops them (multiprocessing's SIGTERM at exit), and one killed (SIGKILL) leaves no orphans."""
    proc = subprocess.Popen([sys.executable, "-c", WORKERS_SCRIPT, str(shard_dir), how], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    workers = proc.stdout.readline().split()
    rc = proc.wait(timeout=60)
    assert len(workers) == 2 and rc == (-signal.SIGKILL if how == "die" else 0), proc.stderr.read()[-2000:]
    assert _gone(workers)

"""Shard streams: O(1) exact resume from saved reader positions (tar shards, image
batches over DataLoader workers and DDP ranks, pretokenized tokens, a trainer), the shard
list checkpoints record (a changed one is refused, or re-planned on request), and shards
read through `pipe:` commands and http:// URLs. Fast (CPU, tiny shards)."""

import functools
import glob
import http.server
import io
import logging
import os
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import checkpoint
import data
import shards
import train_tokenizer


def _png(i):
    """An 8x8 PNG whose pixels depend on i (so that crops and flips are visible)."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shards(root, n_shards=4, per_shard=9, compress=False):
    """n_shards tar shards of per_shard image-caption samples; one sample per shard has
    no caption (a skip in every pass). Returns the brace pattern."""
    os.makedirs(root, exist_ok=True)
    ext = "tar.gz" if compress else "tar"
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, f"{s:03d}.{ext}"), "w:gz" if compress else "w") as tf:
            for i in range(per_shard):
                members = {"png": _png(100 * s + i), "txt": f"shard {s} sample {i}".encode()}
                if i == 4:
                    del members["txt"]
                for e, payload in members.items():
                    info = tarfile.TarInfo(f"{s:03d}{i:03d}.{e}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return os.path.join(root, f"{{000..{n_shards - 1:03d}}}.{ext}")


def _batches(make, start, positions, workers, n):
    """n batches from a fresh DataLoader over make(start_batch, positions)."""
    it = iter(DataLoader(make(start, positions), batch_size=3, num_workers=workers))
    return [next(it) for _ in range(n)]


def _same(a, b):
    """Two batches hold the same values, bit for bit (NaN, an unknown aesthetic, equals NaN)."""
    def equal(x, y):
        if not torch.is_tensor(x):
            return x == y
        return x.dtype == y.dtype and torch.equal(torch.nan_to_num(x, nan=-7.0), torch.nan_to_num(y, nan=-7.0))

    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


def _check_resume(make, workers, points, total):
    """Resuming at each point from the positions of the batches before it gives exactly
    the uninterrupted run's batches (keys, pixels, crops, flips, positions)."""
    full = _batches(make, 0, None, workers, total)
    for n in points:
        positions = shards.StreamPositions(workers, 0)
        for batch in full[:n]:
            positions.consumed(batch)
        resumed = _batches(make, n, positions.state()["positions"], workers, total - n)
        assert all(_same(a, b) for a, b in zip(resumed, full[n:])), f"resume at batch {n} differs"
    return full


@pytest.mark.parametrize("workers,world", [(0, 1), (2, 1), (0, 2), (2, 2)])
def test_tar_resume_is_exact(tmp_path, workers, world):
    # (2, 2): 4 readers over 3 shards, so every reader reads every shard and keeps every 4th sample.
    pattern = _shards(tmp_path, n_shards={(0, 2): 5, (2, 2): 3}.get((workers, world), 4))
    # DataLoader workers take a while to start: with them, fewer resume points and only the last rank.
    for rank in range(world) if workers == 0 else [world - 1]:
        def make(start, positions):
            return data.TarShardDataset(pattern, image_size=8, shuffle_buffer=5, seed=3, batch_size=3, rank=rank,
                                        world_size=world, start_batch=start, positions=positions)  # fmt: skip

        # 14 batches of 3 cross epochs, shuffle blocks and shards.
        full = _check_resume(make, workers, points=(1, 4, 7, 11) if workers == 0 else (3, 8), total=14)
        assert len({k for b in full for k in b["key"]}) > 12  # shuffled, not a replay of one block


def test_resume_reads_only_one_block(tmp_path, monkeypatch):
    """With saved positions a reader seeks into the shard and re-reads one shuffle block,
    however far the run had come; without them it reads (and checks) everything before."""
    pattern = _shards(tmp_path, n_shards=4, per_shard=30)
    read, decoded = [], []
    real_groups, real_decode = shards.iter_tar_groups, data._ImageStream._decode

    def counting_groups(source, skipped=None, offset=0):
        for group in real_groups(source, skipped, offset):
            read.append(offset)
            yield group

    def counting_decode(self, group, check_only=False):
        decoded.append(check_only)
        return real_decode(self, group, check_only)

    monkeypatch.setattr(shards, "iter_tar_groups", counting_groups)
    monkeypatch.setattr(data._ImageStream, "_decode", counting_decode)

    def make(start, positions):
        return data.TarShardDataset(pattern, image_size=8, shuffle_buffer=6, seed=1, batch_size=3, start_batch=start,
                                    positions=positions)  # fmt: skip

    full = _batches(make, 0, None, 0, 36)  # 108 samples: most of the 116 usable
    cost = {}
    for n in (2, 34):
        positions = shards.StreamPositions(0, 0)
        for batch in full[:n]:
            positions.consumed(batch)
        read.clear(), decoded.clear()
        (batch,) = _batches(make, n, positions.state()["positions"], 0, 1)
        assert _same(batch, full[n])
        cost[n] = (len(read), len(decoded))
        assert not any(decoded) and len(decoded) <= 4  # no fast-forward: 3 samples (+ the one without caption)
    assert max(cost[2][0], cost[34][0]) <= 3 * 6  # early or late: the current block, and the next one or two
    assert any(offset > 0 for offset in read)  # the late resume opened its shard at a byte offset
    read.clear(), decoded.clear()
    _batches(make, 34, None, 0, 1)  # no positions (a checkpoint without them): the fast-forward
    assert sum(decoded) >= 34 * 3 and len(read) > 100


def test_pretokenized_resume_is_exact(tmp_path):
    with shards.ShardWriter(str(tmp_path), "tok", per_shard=7) as w:
        for i in range(26):
            tokens = np.arange(4, dtype=np.int64) + 10 * i
            w.write(f"{i:04d}", data.pretokenized_members(f"cap {i}", tokens=tokens, aesthetic=5.0 + i % 3))

    def make(start, positions):
        return data.PretokenizedDataset(str(tmp_path), shuffle_buffer=4, seed=2, batch_size=3,
                                               start_batch=start, positions=positions)  # fmt: skip

    for workers in (0, 2):
        full = _check_resume(make, workers, points=(1, 5, 10), total=12)
        assert full[0]["tokens"].shape == (3, 4)


def test_image_folder_resume_is_exact(tmp_path):
    for i in range(11):
        Image.open(io.BytesIO(_png(i))).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"picture {i}")

    def make(start, positions):
        return data.ImageFolderDataset(str(tmp_path), image_size=8, seed=4, batch_size=3, start_batch=start,
                                       positions=positions)  # fmt: skip

    _check_resume(make, 0, points=(2, 5), total=8)  # 24 samples: past the end of two passes


def test_gzip_shards_resume_by_reading_forward(tmp_path):
    pattern = _shards(tmp_path, n_shards=3, compress=True)

    def make(start, positions):
        return data.TarShardDataset(pattern, image_size=8, shuffle_buffer=4, seed=5, batch_size=3, start_batch=start,
                                    positions=positions)  # fmt: skip

    _check_resume(make, 0, points=(3, 6), total=9)


def test_positions_refuse_another_worker_count():
    saved = {"num_workers": 2, "positions": torch.zeros(2, 5, dtype=torch.int64)}
    with pytest.raises(ValueError, match="num_workers=2"):
        shards.StreamPositions(4, 10, saved)
    assert shards.StreamPositions(3, 0).state() is None  # nothing consumed from a stream: nothing to save


def test_trainer_resume_on_shards_is_exact(tmp_path):
    # Resumed at batch 1 with 2 DataLoader workers: worker 0 plays logical worker 1, whose
    # saved position is its start, and worker 1 plays logical worker 0, which seeks.
    data.make_shapes_shards(str(tmp_path / "shards"), n=30, per_shard=10)
    opts = [f"--data={tmp_path / 'shards'}", "--num_workers=2", "--batch_size=3", "--ckpt_every=1",
            "--sample_every=100", "--log_every=100", "--disc_start=100"]  # fmt: skip

    def run(out, steps):
        train_tokenizer.main([f"--out_dir={tmp_path / out}", "--config=tiny", f"--max_steps={steps}", *opts])
        return torch.load(sorted(glob.glob(f"{tmp_path / out}/ckpt_*.pt"))[-1], weights_only=True)

    straight = run("straight", 2)
    first = run("resumed", 1)
    resumed = run("resumed", 2)
    saved = first["data_positions"][0]
    assert saved["num_workers"] == 2 and saved["positions"][0, 4] > 0 and saved["positions"][1].eq(0).all()
    assert resumed["step"] == straight["step"] == 2
    for key in ("model", "ema"):
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    assert torch.equal(straight["data_positions"][0]["positions"], resumed["data_positions"][0]["positions"])


def test_shard_list_changes_are_named(tmp_path):
    _shards(tmp_path / "a", n_shards=5)

    def record(spec):
        return data.TarShardDataset(spec, image_size=8).sources()

    before = record(str(tmp_path / "a"))
    assert before["count"] == 5 and len(before["list"]) < 100  # compressed names and sizes
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # the same files elsewhere: nothing changed
    assert shards.source_changes(before, record(str(tmp_path / "moved"))) is None
    order = "::".join(str(tmp_path / "a" / f"{i:03d}.tar") for i in (1, 0, 2, 3, 4))
    assert shards.source_changes(before, record(order)).endswith("the same shards in another order")
    os.remove(tmp_path / "a" / "003.tar")  # a brace pattern keeps a missing name (counted when read)
    assert shards.source_changes(before, record(str(tmp_path / "a" / "{000..004}.tar"))) == \
        "5 shards then, 5 now; 1 missing: 003.tar"  # fmt: skip
    for i in range(5, 10):
        shutil.copy(tmp_path / "a" / "000.tar", tmp_path / "a" / f"{i:03d}.tar")
    assert shards.source_changes(before, record(str(tmp_path / "a"))) == \
        "5 shards then, 9 now; 5 added: 005.tar, 006.tar, 007.tar ...; 1 missing: 003.tar"  # fmt: skip
    piped = f"pipe:cat {tmp_path}/a/{{000..002}}.tar"  # pipes and URLs: by name only
    assert shards.source_changes(record(piped), record(piped)) is None


def test_changed_shard_list_is_refused_or_replanned(tmp_path, capsys):
    """Resuming on shards added, removed or rewritten since the checkpoint is refused, naming
    them; --replan_data starts every reader on a new epoch over the new list, with a warning.
    A checkpoint without the record resumes as before, with a warning."""
    folder, away = tmp_path / "shards", tmp_path / "away.tar"
    data.make_shapes_shards(str(folder), n=30, per_shard=10)  # shapes-000000.tar .. shapes-000002.tar
    opts = [f"--data={folder}", "--batch_size=3", "--max_steps=10", "--sample_every=100", "--disc_start=100"]

    def run(stop, *args):
        train_tokenizer.main([f"--out_dir={tmp_path / 'run'}", "--config=tiny", *opts, f"--stop_at={stop}", *args])
        return torch.load(tmp_path / "run" / f"ckpt_{stop:08d}.pt", weights_only=True)

    first = run(1)
    faults = {  # each fault, then how it is undone, and what the refusal names
        "added": (lambda: shutil.copy(folder / "shapes-000000.tar", folder / "shapes-000003.tar"),
                  lambda: os.remove(folder / "shapes-000003.tar"), "3 shards then, 4 now; 1 added: shapes-000003.tar"),
        "removed": (lambda: os.replace(folder / "shapes-000001.tar", away),
                    lambda: os.replace(away, folder / "shapes-000001.tar"),
                    "3 shards then, 2 now; 1 missing: shapes-000001.tar"),
        "resized": (lambda: open(folder / "shapes-000002.tar", "ab").write(bytes(10240)), None,  # padded: same samples
                    "3 shards then, 3 now; 1 resized: shapes-000002.tar \\(\\d+ -> \\d+ bytes\\)"),
    }  # fmt: skip
    for fault, (do, undo, named) in faults.items():
        do()
        with pytest.raises(SystemExit, match=rf"^error: the data changed since the checkpoint at step 1: {named}\. "
                                             r"Restore the shards .* or pass --replan_data"):  # fmt: skip
            run(2)
        if undo:
            undo()
    capsys.readouterr()
    second = run(2, "--replan_data")  # on the resized shard
    assert "warning: the data changed (3 shards then, 3 now; 1 resized" in capsys.readouterr().out
    assert first["data_positions"][0]["positions"][0, 0] == 0 and second["data_positions"][0]["positions"][0, 0] == 1
    assert second["data_sources"]["sha256"] != first["data_sources"]["sha256"]  # the new list, from now on
    ck = torch.load(tmp_path / "run" / "ckpt_00000002.pt", weights_only=True)
    del ck["sha256"], ck["data_sources"]  # as written before checkpoints recorded the list
    torch.save({**ck, "sha256": checkpoint.content_digest(ck)}, tmp_path / "run" / "ckpt_00000002.pt")
    assert run(3)["step"] == 3 and "predates recording its shard list" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# pipe: and http:// shards


def _read_all(spec, **kwargs):
    ds = data.TarShardDataset(spec, image_size=8, infinite=False, seed=7, **kwargs)
    return list(ds), ds


def test_pipe_shards_equal_local_files(tmp_path):
    pattern = _shards(tmp_path, n_shards=2)
    local, _ = _read_all(pattern)
    piped, ds = _read_all(f"pipe:cat {pattern}")
    assert [s["key"] for s in piped] == [s["key"] for s in local] and len(local) == 16
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(piped, local))  # same crops and flips
    assert ds.shards == [f"pipe:cat {tmp_path}/000.tar", f"pipe:cat {tmp_path}/001.tar"]

    # Resume through a pipe: it cannot seek, so it reads its shard forward to the offset.
    def make(start, positions):
        return data.TarShardDataset(f"pipe:cat {pattern}", image_size=8, shuffle_buffer=4, seed=1, batch_size=3,
                                    start_batch=start, positions=positions)  # fmt: skip

    _check_resume(make, 0, points=(2, 5), total=7)


def test_failing_pipe_is_counted_not_fatal(tmp_path, caplog):
    pattern = _shards(tmp_path, n_shards=1)
    spec = f"pipe:cat {pattern}::pipe:echo no such bucket >&2; exit 3::pipe:no_such_program_4711"
    with caplog.at_level(logging.WARNING, logger="data"):
        out, ds = _read_all(spec)
    assert len(out) == 8
    assert {k: v for k, v in ds.skipped.counts().items() if v} == {"missing_caption": 1, "unreadable_shard": 2}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "status 3: no such bucket" in messages and "status 127" in messages
    # A pipe whose tar is cut: the complete samples are kept, the cut counted once.
    raw = open(f"{tmp_path}/000.tar", "rb").read()
    open(tmp_path / "cut.tar", "wb").write(raw[: raw.index(b"shard 0 sample 6")])
    out, ds = _read_all(f"pipe:cat {tmp_path}/cut.tar")
    assert len(out) == 5 and ds.skipped.counts()["truncated_member"] == 1


def test_http_shards(tmp_path):
    pattern = _shards(tmp_path, n_shards=2)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        local, _ = _read_all(pattern)
        remote, _ = _read_all(f"{url}/{{000..001}}.tar")
        assert [s["key"] for s in remote] == [s["key"] for s in local]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(remote, local))
        out, ds = _read_all(f"{url}/000.tar::{url}/missing.tar")
        assert len(out) == 8 and ds.skipped.counts()["unreadable_shard"] == 1
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_other_url_schemes_are_refused_with_a_pipe_hint():
    with pytest.raises(ValueError, match="pipe:aws s3 cp"):
        shards.list_shards("s3://bucket/{000..009}.tar")
    assert shards.list_shards("pipe:aws s3 cp s3://b/{000..002}.tar -") == [
        f"pipe:aws s3 cp s3://b/{i:03d}.tar -" for i in range(3)]  # fmt: skip

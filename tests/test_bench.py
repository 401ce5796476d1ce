"""bench.py smoke run on the tiny preset: every row is printed with finite, positive
figures (no timing assertions: this machine's speed is not under test)."""

import math

import pytest
import torch

import bench


def test_bench_tiny(capsys):
    n = torch.get_num_threads()
    try:
        args = ["--preset", "tiny", "--warmup", "0", "--repeats", "1", "--threads", "1"]
        bench.main(args + ["--dtype", "fp32"])  # CPU peak measured by torch.matmul
        # bf16 with a given peak: on CPUs without bf16 matrix units the 2048^3 peak matmul
        # alone takes minutes (0.3 GFLOP/s measured on one such machine).
        bench.main(args + ["--dtype", "bf16", "--peak_tflops", "1"])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("TA-TiTok", "MaskGen"))]
    assert len(rows) == 2 * 10  # 10 rows per dtype
    for line in rows:
        img_s, ms, gflop, tflops, mfu = line[50:].split()[:5]
        assert float(img_s) > 0 and float(ms) > 0 and float(gflop) > 0
        assert math.isfinite(float(tflops)) and mfu.endswith("%")
    assert "generate, CFG (8 steps)" in out and "(4 steps x 10 diff.)" in out


def test_bench_help_is_a_plain_description(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert "Throughput, MFU and memory" in out and "issue" not in out.lower()
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--compile", "2"])
    assert "--compile takes 0 and/or 1" in capsys.readouterr().err


def test_data_resume_bench_resumes_exactly(tmp_path, monkeypatch, capsys):
    """`bench.py --data-resume N`: both resume paths give the uninterrupted stream's batch."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the shards go to the test's folder
    bench.main(["--data-resume", "1000"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume at batch")]
    assert len(lines) == 2 and all(line.endswith("same batch as uninterrupted: True") for line in lines)


def test_peak_only_prints_one_peak_per_dtype(capsys):
    bench.main(["--peak-only", "--dtype", "fp32"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("fp32: torch.matmul peak ") and float(out[-1].split()[-2]) > 0


def test_grad_ckpt_memory_tiny(capsys):
    """--grad-ckpt on the tiny preset: one line per model, the method named, and checkpointing needs less
    memory than not (it keeps each block's input instead of all its activations)."""
    bench.main(["--preset", "tiny", "--grad-ckpt", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "CPU" in out.splitlines()[0] and "torch.profiler's events" in out.splitlines()[0]
    lines = [line for line in out.splitlines() if "peak activation memory with / without checkpointing" in line]
    assert [line.split(" (")[0] for line in lines] == ["MaskGen-VQ tiny_vq", "TA-TiTok-VQ tiny"]
    for line in lines:
        mib = line.split("checkpointing ")[1].split(" MiB")[0]  # "with / without"
        with_, without = (float(v.replace(",", "")) for v in mib.split(" / "))
        saved = float(line.split("saved ")[1].rstrip("%"))
        assert 0 < with_ < without and 0 < saved < 100

"""curves.py: the training-curve PNG drawn from log.jsonl."""

import json

from PIL import Image

import curves


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
    recs = curves.read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 50]
    assert recs[2]["loss"] == 2.0 / 30 and recs[1]["loss"] == 1.0 / 20


def test_series_keeps_curves_only_and_drops_nonfinite():
    recs = [{"step": 1, "lr": 0.1, "grad_norm": float("nan"), "l2_loss": 0.5, "img_per_s": 9.0, "mfu": 0.1,
             "skipped_nonfinite": 1, "skipped": {"corrupt_image": 2}},
            {"step": 2, "lr": 0.2, "grad_norm": 3.0, "l2_loss": 0.4, "img_per_s": 9.0}]  # fmt: skip
    s = curves.series(recs)
    assert list(s) == ["l2_loss", "lr", "grad_norm"]  # losses first; throughput and counters are not curves
    assert s["grad_norm"] == ([2], [3.0]) and s["l2_loss"] == ([1, 2], [0.5, 0.4])


def test_plot_curves_writes_one_panel_per_curve(tmp_path):
    assert curves.plot_curves(str(tmp_path)) is None  # no log yet: nothing drawn, no error
    recs = [{"step": s, "lr": min(1.0, s / 5) * 1e-3, "grad_norm": 1.0 / s, "loss": 3.0 / s, "kl_loss": 0.1}
            for s in range(1, 21)]  # fmt: skip
    _write_log(tmp_path / "log.jsonl", recs)
    path = curves.plot_curves(str(tmp_path))
    assert path == str(tmp_path / "curves.png")
    img = Image.open(path)
    # 4 curves, 3 per row: 2 rows x 3 panels.
    assert img.size == (3 * curves.PANEL_W, 2 * curves.PANEL_H)
    # The lines are drawn in blue: every one of the four used panels holds blue pixels, the
    # two empty ones none.
    px = img.convert("RGB").load()

    def blue_in(col, row):
        x0, y0 = col * curves.PANEL_W, row * curves.PANEL_H
        return any(px[x, y] == (31, 119, 180) for x in range(x0, x0 + curves.PANEL_W, 2)
                   for y in range(y0, y0 + curves.PANEL_H, 2))  # fmt: skip

    assert [blue_in(c, r) for r in range(2) for c in range(3)] == [True, True, True, True, False, False]
    assert not (tmp_path / "curves.png.tmp.png").exists()

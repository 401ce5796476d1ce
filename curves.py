"""
Training curves: one PNG of every logged loss, the learning rate and the gradient norm
against the step, drawn from a run's log.jsonl with PIL only (no plotting library).

Both trainers call `plot_curves(out_dir)` at each sample interval, so `curves.png` in the
run folder is always current; `python curves.py RUN_DIR [RUN_DIR ...]` redraws it by hand.

A resumed run appends to log.jsonl the steps it replays after its last checkpoint, so a
step can appear twice: the last record of each step wins (it is the one the surviving
run made).
"""

import json
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

# Logged fields that are not curves of the optimisation (throughput, counters).
NOT_CURVES = {"step", "img_per_s", "mfu", "skipped_nonfinite", "skipped"}
PANEL_W, PANEL_H, MARGIN = 360, 200, 56  # pixels per panel and the room for its labels


def read_log(path):
    """log.jsonl -> [record, ...] sorted by step, one per step (the last one written).
    Lines that are not JSON objects with a step (a line cut by a kill) are ignored."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def series(records):
    """{name: ([step, ...], [value, ...])} for every numeric field worth a curve, finite
    values only (a skipped non-finite step logs nan)."""
    out = {}
    for rec in records:
        for key, v in rec.items():
            if key in NOT_CURVES or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(rec["step"])
            ys.append(float(v))
    # Losses first (in logged order), then the learning rate and the gradient norm.
    order = [k for k in out if k not in ("lr", "grad_norm")] + [k for k in ("lr", "grad_norm") if k in out]
    return {k: out[k] for k in order}


def _fmt(v):
    return f"{v:.2e}" if v and abs(v) < 1e-2 else f"{v:.3g}"  # short labels: 1.67e-04, not 0.000167


def _panel(draw, font, x0, y0, name, xs, ys):
    """One curve in the box at (x0, y0): title, frame, min/max labels, the line. The y axis
    is logarithmic when every value is positive and they span more than a factor of 20
    (losses and the learning-rate warm-up do), linear otherwise."""
    left, top = x0 + MARGIN, y0 + 18
    w, h = PANEL_W - MARGIN - 8, PANEL_H - 18 - 22
    draw.text((x0 + MARGIN, y0 + 2), name, fill="black", font=font)
    draw.rectangle([left, top, left + w, top + h], outline=(160, 160, 160))
    lo, hi = min(ys), max(ys)
    log_y = lo > 0 and hi / lo > 20
    f = math.log10 if log_y else (lambda v: v)
    a, b = f(lo), f(hi)
    if b - a < 1e-12:  # a flat line: centre it
        a, b = a - 1, b + 1
    x_lo, x_hi = min(xs), max(xs)
    x_span = max(x_hi - x_lo, 1)
    pts = [(left + (x - x_lo) / x_span * w, top + h - (f(y) - a) / (b - a) * h) for x, y in zip(xs, ys)]
    if len(pts) == 1:
        px, py = pts[0]
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(31, 119, 180))
    else:
        draw.line(pts, fill=(31, 119, 180), width=2)
    # Labels: the value range on the left (with "log" when the axis is), steps below.
    draw.text((x0 + 2, top - 2), _fmt(hi), fill="black", font=font)
    draw.text((x0 + 2, top + h - 10), _fmt(lo), fill="black", font=font)
    if log_y:
        draw.text((x0 + 2, top + h // 2 - 5), "log", fill=(120, 120, 120), font=font)
    draw.text((left, top + h + 4), str(int(x_lo)), fill="black", font=font)
    label = f"step {int(x_hi)}"
    draw.text((left + w - draw.textlength(label, font=font), top + h + 4), label, fill="black", font=font)


def plot_curves(run_dir, out=None, cols=3):
    """Draw RUN_DIR/log.jsonl into RUN_DIR/curves.png (or `out`). Returns the PNG's path,
    or None when the log has nothing to draw yet."""
    log_path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        return None
    curves = series(read_log(log_path))
    if not curves:
        return None
    rows = math.ceil(len(curves) / cols)
    cols = min(cols, len(curves))
    image = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        _panel(draw, font, (i % cols) * PANEL_W, (i // cols) * PANEL_H, name, xs, ys)
    out = out or os.path.join(run_dir, "curves.png")
    tmp = out + ".tmp.png"  # written then renamed: a reader never sees half a PNG
    image.save(tmp)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit("usage: python curves.py RUN_DIR [RUN_DIR ...]   (writes RUN_DIR/curves.png from its log.jsonl)")
    for d in sys.argv[1:]:
        if not os.path.isfile(os.path.join(d, "log.jsonl")):
            sys.exit(f"error: {d} has no log.jsonl; pass a train_tokenizer.py / train_maskgen.py run folder")
        print(plot_curves(d) or f"{d}: nothing logged yet")

"""The trainers' command line (train_common.parse_config): --help / -h / --list /
--print_config, a bare train_maskgen.py, value checks with messages naming what is allowed,
config.json and the lines a run prints, and the optional trackers (faked: neither wandb
nor tensorboard is a dependency)."""

import dataclasses
import json
import re
import subprocess
import sys
import types

import pytest

import train_maskgen
import train_tokenizer
from train_common import RunConfig

TRAINERS = {"tokenizer": train_tokenizer, "maskgen": train_maskgen}
DEFAULTS = {"tokenizer": "tiny", "maskgen": "tiny_vq"}
ROW = re.compile(r"^  --(\w+)=(\S*)\s+(\w+)\s+(.*)$")  # a field's --help row: --name=value  type  description


def exits(fn, *args):
    """Run fn(*args), which must exit; returns the exit code."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return e.value.code


def help_rows(out):
    return {m[1]: (m[2], m[3], m[4]) for m in map(ROW.match, out.splitlines()) if m}


@pytest.mark.parametrize("which", ["tokenizer", "maskgen"])
def test_help_lists_every_field(which, capsys):
    mod = TRAINERS[which]
    assert exits(mod.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python train_{which}.py --config=PRESET")
    rows, preset = help_rows(out), mod.PRESETS[DEFAULTS[which]]
    fields = dataclasses.fields(mod.TrainConfig)
    assert list(rows) == [f.name for f in fields if f.name not in RunConfig.__dataclass_fields__] + [
        f.name for f in dataclasses.fields(RunConfig)]  # the trainer's own fields first, then the run's
    for f in fields:
        value, kind, note = rows[f.name]
        assert kind == f.type.__name__ and note, f.name  # every field has a type and a description
        want = getattr(preset, f.name)
        assert value == ('""' if want == "" else str(want).lower() if isinstance(want, bool) else str(want)), f.name
    # descriptions are the help texts the fields declare (their metadata)
    assert rows["batch_size"][2] == "per GPU, per micro-step"
    assert rows["dtype"][2] == "bf16 | fp16 | fp32 (autocast is used on CUDA only)"
    assert exits(mod.main, ["-h"]) == 0 and capsys.readouterr().out == out


def test_help_shows_the_chosen_preset(capsys):
    assert exits(train_tokenizer.main, ["--config=shapes", "--help"]) == 0
    out = capsys.readouterr().out
    assert "values in preset shapes" in out and help_rows(out)["max_steps"][0] == "28000"
    assert exits(train_tokenizer.main, []) == 0  # a bare run prints the help, not a training
    assert "values in preset tiny" in capsys.readouterr().out


def test_bare_train_maskgen_prints_help():
    # A bare run prints the help of its default preset (which must exist).
    out = subprocess.run([sys.executable, "train_maskgen.py"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: python train_maskgen.py") and "values in preset tiny_vq" in out.stdout
    assert help_rows(out.stdout)["maskgen"][0] == "tiny_vq" and "error" not in out.stderr


@pytest.mark.parametrize("which", ["tokenizer", "maskgen"])
def test_list_names_the_presets(which, capsys):
    mod = TRAINERS[which]
    assert exits(mod.main, ["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].removesuffix(" (default)") for line in lines] == list(mod.PRESETS)
    assert f"{DEFAULTS[which]} (default): " in "\n".join(lines)
    if which == "tokenizer":
        assert "tatitok_bl32_vq: tokenizer=tatitok_bl32_vq" in lines


def test_print_config_shows_the_resolved_config(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["--config=tiny_kl", "--lr=2e-3", "--compile", f"--out_dir={out_dir}", "--print_config"]
    assert exits(train_maskgen.main, argv) == 0
    want = dataclasses.asdict(dataclasses.replace(train_maskgen.PRESETS["tiny_kl"], lr=2e-3, compile=True,
                                                  out_dir=str(out_dir)))  # fmt: skip
    assert json.loads(capsys.readouterr().out) == want
    assert not out_dir.exists()  # nothing was started


@pytest.mark.parametrize("which, arg, message", [
    ("maskgen", "--lr", r"--lr needs a value: --lr=0.001$"),
    ("tokenizer", "--out_dir", r"--out_dir needs a value: --out_dir=runs/tiny_tokenizer$"),
    ("maskgen", "--config", r"--config needs a value: --config=tiny_vq \(--list names the presets\)"),
    ("maskgen", "--schedule=foo", r"--schedule=foo is not allowed; choose one of \['constant', 'cosine'\]"),
    ("maskgen", "--caption_drop=2", r"--caption_drop=2.0 is not allowed; it must be in \[0, 1\]"),
    ("maskgen", "--recaption_prob=-0.1", r"--recaption_prob=-0.1 is not allowed; it must be in \[0, 1\]"),
    ("tokenizer", "--dtype=fp8", r"--dtype=fp8 is not allowed; choose one of \['bf16', 'fp16', 'fp32'\]"),
    ("tokenizer", "--batch_size=0", r"--batch_size=0 is not allowed; it must be >= 1"),
    ("maskgen", "--max_steps=-5", r"--max_steps=-5 is not allowed; it must be >= 1"),
    ("tokenizer", "--grad_accum=0", r"--grad_accum=0 is not allowed; it must be >= 1"),
    ("tokenizer", "--warmup_steps=-1", r"--warmup_steps=-1 is not allowed; it must be >= 0"),
    ("tokenizer", "--lr=-1e-4", r"--lr=-0.0001 is not allowed; it must be >= 0"),
    ("maskgen", "--lr=nan", r"--lr=nan is not allowed; it must be >= 0"),
    ("tokenizer", "--beta2=1", r"--beta2=1.0 is not allowed; it must be in \[0, 1\)"),
    ("tokenizer", "--ema_decay=1.5", r"--ema_decay=1.5 is not allowed; it must be in \[0, 1\]"),
    ("tokenizer", "--grad_clip=0", r"--grad_clip=0.0 is not allowed; it must be > 0"),
    ("tokenizer", "--ckpt_every=0", r"--ckpt_every=0 is not allowed; it must be >= 1"),
    ("tokenizer", "--keep_ckpts=0", r"--keep_ckpts=0 is not allowed; it must be >= 1"),
    ("tokenizer", "--num_workers=-1", r"--num_workers=-1 is not allowed; it must be >= 0"),
    ("tokenizer", "--device=gpu", r"--device=gpu is not allowed; use auto, cpu, cuda or cuda:N"),
    ("tokenizer", "--tokenizer=huge", r"--tokenizer=huge is not allowed; choose one of \["),
    ("tokenizer", "--loss=lpips", r"--loss=lpips is not allowed; choose one of \["),
    ("tokenizer", "--disc_start=-2", r"--disc_start=-2 is not allowed; it must be >= -1"),
    ("tokenizer", "--data=pretokenized:x/*.tar", r"--data=pretokenized:x/\*.tar is not allowed; the tokenizer"),
    ("maskgen", "--maskgen=tiny", r"--maskgen=tiny is not allowed; choose one of \["),
    ("maskgen", "--scale_factor=0", r"--scale_factor=0.0 is not allowed; it must be > 0, or -1"),
    ("maskgen", "--aesthetic_default=inf", r"--aesthetic_default=inf is not allowed; it must be a finite number"),
    ("tokenizer", "--seed=-1", r"--seed=-1 is not allowed; it must be >= 0"),
    ("maskgen", "--seed=-1", r"--seed=-1 is not allowed; it must be >= 0"),
    ("maskgen", "--compile=maybe", r"--compile=maybe is not a valid bool"),
    ("maskgen", "-x", r"arguments must look like --field=value, got \['-x'\]"),
])  # fmt: skip
def test_bad_values_are_refused_with_what_is_allowed(which, arg, message, tmp_path):
    # The checks run before anything starts. (The bad argument comes last: a bare --config or
    # --out_dir then replaces the value given before it.)
    with pytest.raises(SystemExit, match="^error: " + message):
        TRAINERS[which].main([f"--config={DEFAULTS[which]}", f"--out_dir={tmp_path}/run", arg])
    assert not (tmp_path / "run").exists()


def test_a_missing_tokenizer_is_refused_before_the_run_folder(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: tokenizer checkpoint 'missing_dir' does not exist; pass --tokenizer"):
        train_maskgen.main(["--config=tiny_vq", "--tokenizer=missing_dir", "--device=cpu", f"--out_dir={tmp_path}/run"])
    assert not (tmp_path / "run").exists()


def test_fp8_is_refused_on_cpu_too(tmp_path):
    # Refused before the run starts, on CPU too (where there is no autocast to use it).
    with pytest.raises(SystemExit, match="--dtype=fp8 is not allowed"):
        train_tokenizer.main(["--config=tiny", "--dtype=fp8", "--device=cpu", f"--out_dir={tmp_path}"])
    assert list(tmp_path.iterdir()) == []


def test_a_run_writes_config_json_and_says_where(tmp_path, capsys):
    out = tmp_path / "run"
    train_tokenizer.main(["--config=tiny", f"--out_dir={out}", "--max_steps=1", "--sample_every=100", "--lr=0.01"])
    text = capsys.readouterr().out
    want = dataclasses.asdict(dataclasses.replace(train_tokenizer.PRESETS["tiny"], out_dir=str(out), max_steps=1,
                                                  sample_every=100, lr=0.01))  # fmt: skip
    assert json.loads((out / "config.json").read_text()) == want
    assert f"run folder: {out} (config.json, log.jsonl, checkpoints)" in text
    assert text.rstrip().endswith(f"done: checkpoint {out / 'ckpt_00000001.pt'}")
    # --stop_at ends a run early, with a checkpoint; the done line names it
    train_tokenizer.main(["--config=tiny", f"--out_dir={out}", "--max_steps=5", "--stop_at=3", "--sample_every=100",
                          "--lr=0.01"])  # fmt: skip
    text = capsys.readouterr().out
    assert "resumed from" in text and text.rstrip().endswith(f"done: checkpoint {out / 'ckpt_00000003.pt'}")
    assert json.loads((out / "config.json").read_text())["stop_at"] == 3  # the latest start's config


class FakeTrackers:
    """Stand-ins for wandb and torch.utils.tensorboard that record every call."""

    def __init__(self, monkeypatch):
        self.calls = []
        wandb = types.ModuleType("wandb")
        wandb.init = lambda **kw: self.calls.append(("wandb.init", kw)) or types.SimpleNamespace(
            log=lambda rec, step: self.calls.append(("wandb.log", step, rec)),
            finish=lambda: self.calls.append(("wandb.finish",)),
        )  # fmt: skip
        tb = types.ModuleType("torch.utils.tensorboard")
        tb.SummaryWriter = lambda log_dir: self.calls.append(("tb.writer", log_dir)) or types.SimpleNamespace(
            add_scalar=lambda k, v, step: self.calls.append(("tb.scalar", step, k, v)),
            close=lambda: self.calls.append(("tb.close",)),
        )  # fmt: skip
        monkeypatch.setitem(sys.modules, "wandb", wandb)
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


def test_trackers_receive_the_log_records(tmp_path, monkeypatch):
    fake = FakeTrackers(monkeypatch)
    out = tmp_path / "run"
    train_tokenizer.main(["--config=tiny", f"--out_dir={out}", "--max_steps=2", "--log_every=1", "--sample_every=100",
                          "--wandb_project=tatitok", f"--tensorboard_dir={tmp_path / 'tb'}"])  # fmt: skip
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    (_, init), = fake.named("wandb.init")
    assert init["project"] == "tatitok" and init["name"] == "run" and init["config"]["max_steps"] == 2
    numbers = [{k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))} for r in records]
    assert [(c[1], c[2]) for c in fake.named("wandb.log")] == [(r["step"], n) for r, n in zip(records, numbers)]
    assert fake.named("tb.writer") == [("tb.writer", str(tmp_path / "tb"))]
    assert [c[1:] for c in fake.named("tb.scalar")] == [(r["step"], k, v) for r, n in zip(records, numbers)
                                                        for k, v in n.items()]  # fmt: skip
    assert fake.calls[-2:] == [("wandb.finish",), ("tb.close",)]  # closed at the end of the run


def test_nested_log_fields_are_flattened_for_trackers():
    import train_common

    rec = {"step": 3, "loss": 0.5, "skipped": {"corrupt_image": 2, "too_small": 1}, "note": "x"}
    assert train_common.scalars(rec) == {"loss": 0.5, "skipped/corrupt_image": 2, "skipped/too_small": 1}


@pytest.mark.parametrize("flag, package", [("--wandb_project=p", "wandb"), ("--tensorboard_dir=tb", "tensorboard")])
def test_a_missing_tracker_package_is_named(flag, package, tmp_path, monkeypatch):
    module = "wandb" if package == "wandb" else "torch.utils.tensorboard"
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as when the package is not installed
    with pytest.raises(SystemExit, match=rf"error: --{flag[2:].split('=')[0]} needs the {package} package .*"
                                         rf"pip install {package}, or leave"):  # fmt: skip
        train_tokenizer.main(["--config=tiny", f"--out_dir={tmp_path}", flag])

"""
The trainers' command line (train_tokenizer.py, train_maskgen.py): RunConfig, the fields
every training run has; `--config=PRESET --field=value` overrides, checked for type and
for value; and what --help, --list and --print_config show. Each trainer's TrainConfig
extends RunConfig with its model, data and optimisation fields, and the comment that ends
a field's line in the source is its --help text.

No maths here, and no torch: train_common.py holds the run's plumbing.
"""

import copy
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Callable, NamedTuple


@dataclass
class RunConfig:
    """The fields of every training run that are not about the model, the data or the
    optimisation (each trainer's TrainConfig adds those). The comment after each field is
    its --help text."""

    dtype: str = "bf16"  # bf16 | fp16 | fp32 (autocast is used on CUDA only)
    compile: bool = True  # torch.compile the model (faster; changes float rounding, not the maths)
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto = this process's GPU, else the CPU
    peak_tflops: float = 0.0  # per device, for MFU; 0 = the bf16 peak of a known GPU (runtime.PEAK_BF16_TFLOPS)
    seed: int = 42  # seeds the initial weights, the data order and every random draw
    log_every: int = 50  # steps between log records (log.jsonl and the trackers)
    sample_every: int = 5_000  # steps between sample / reconstruction grids
    ckpt_every: int = 5_000  # steps between checkpoints
    stop_at: int = 0  # stop (with a checkpoint) at this step, short of max_steps; 0 = run to max_steps
    keep_ckpts: int = 2  # the newest good checkpoints kept (the newest good one is never deleted)
    max_nonfinite_steps: int = 20  # stop after this many consecutive steps with a non-finite grad norm
    dist_timeout_s: int = 600  # a collective that waits longer (a stuck rank) ends the job with an error
    wandb_project: str = ""  # also log to this Weights & Biases project (pip install wandb); empty = off
    tensorboard_dir: str = ""  # also log to TensorBoard files in this folder (pip install tensorboard); empty = off


class Rule(NamedTuple):
    """The values a config field allows: ok(value) -> bool, and how to say which."""

    ok: Callable
    allowed: str


def one_of(choices):
    """A field that takes one of `choices` (a preset name, a schedule, a dtype)."""
    return Rule(lambda v: v in choices, f"choose one of {sorted(choices)}")


def at_least(low):
    """A number >= low (a count, a step, a rate)."""
    return Rule(lambda v: v >= low, f"it must be >= {low}")


def within(low, high, open_high=False):
    """A number in [low, high], or [low, high) with open_high (a probability, a beta)."""
    ok = (lambda v: low <= v < high) if open_high else (lambda v: low <= v <= high)
    return Rule(ok, f"it must be in [{low}, {high}{')' if open_high else ']'}")


# The allowed values of the fields both trainers have; each trainer adds its own (RULES).
# lr may be 0 (a frozen run that only replays data, as a test does); nan fails every bound.
COMMON_RULES = {
    "dtype": one_of(("bf16", "fp16", "fp32")),
    "device": Rule(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "use auto, cpu, cuda or cuda:N"),
    "beta1": within(0, 1, open_high=True), "beta2": within(0, 1, open_high=True), "ema_decay": within(0, 1),
    "grad_clip": Rule(lambda v: v > 0, "it must be > 0 (inf: no clipping)"),
    **dict.fromkeys(("batch_size", "grad_accum", "max_steps", "log_every", "sample_every", "ckpt_every",
                     "keep_ckpts", "max_nonfinite_steps", "dist_timeout_s"), at_least(1)),
    **dict.fromkeys(("lr", "end_lr", "warmup_steps", "weight_decay", "num_workers", "stop_at", "peak_tflops"),
                    at_least(0)),
}  # fmt: skip


def parse_config(cls, presets, argv=None, default="tiny", rules=None):
    """Build a config dataclass from `--config=NAME` (a preset; `default` when not given) plus
    `--field=value` overrides (argv: default sys.argv[1:]), then check every value.

    Values are converted to the field's declared type (a bool may be given bare: --compile);
    an unknown field, a badly typed value or one outside `rules` (COMMON_RULES plus the
    trainer's) stops with a message saying what is allowed. No arguments, -h or --help
    print the fields; --list the presets; --print_config the resolved config as JSON.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    stray = [a for a in argv if not a.startswith("--") and a != "-h"]
    if stray:
        sys.exit(f"error: arguments must look like --field=value, got {stray} (--help lists the fields)")
    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], None) for a in argv if a.startswith("--"))
    wants = {k for k in ("help", "list", "print_config") if args.pop(k, False) is None}
    name = args.pop("config", default)
    if name is None:
        sys.exit(f"error: --config needs a value: --config={default} (--list names the presets)")
    check_choice("config", name, presets)
    if not argv or "help" in wants or "-h" in argv:  # a bare run would start a long training: say how instead
        print_help(cls, presets, name)
    if "list" in wants:
        print_presets(cls, presets, default)
    cfg, fields = copy.deepcopy(presets[name]), {f.name: f for f in dataclasses.fields(cls)}
    for key, raw in args.items():
        if key not in fields:
            sys.exit(f"error: unknown option --{key}; valid options: {', '.join(sorted(fields))} (--help says more)")
        t = field_type(fields[key])
        if raw is None:  # --key with no "=value": only a boolean may be given bare (--compile)
            if t is not bool:
                example = show(getattr(cfg, key)) if getattr(cfg, key) != "" else f"<{t.__name__}>"
                sys.exit(f"error: --{key} needs a value: --{key}={example}")
            raw = "true"
        try:
            if t is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                val = raw.lower() in ("true", "1")
            else:
                val = t(raw)
        except ValueError:
            sys.exit(f"error: --{key}={raw} is not a valid {t.__name__}")
        setattr(cfg, key, val)
    for key, rule in {**COMMON_RULES, **(rules or {})}.items():
        value = getattr(cfg, key, None)
        if key in fields and not rule.ok(value):
            sys.exit(f"error: --{key}={show(value)} is not allowed; {rule.allowed}")
    if "print_config" in wants:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        sys.exit(0)
    return cfg


def check_choice(option, name, choices):
    """Stop with the valid choices when --option=name is not one of them."""
    if name not in choices:
        sys.exit(f"error: unknown --{option}={name}; choose one of {sorted(choices)}")


def field_type(f):
    """A dataclass field's type, as a class."""
    return f.type if isinstance(f.type, type) else eval(f.type)  # annotations may be strings


def show(value):
    """A config value the way it is typed on the command line."""
    return str(value).lower() if isinstance(value, bool) else value if value != "" else '""'


def own_fields_first(cls):
    """The trainer's own fields, then RunConfig's, each in source order."""
    return sorted(dataclasses.fields(cls), key=lambda f: f.name in RunConfig.__dataclass_fields__)


def field_comments(cls):
    """{field: the comment that ends its line in the source} for a config dataclass and its
    bases: the one-line descriptions --help prints."""
    out = {}
    for c in [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]:
        names = {f.name for f in dataclasses.fields(c)}
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(c)).readline))
        except (OSError, TypeError):  # no source (a frozen build): fields without descriptions
            continue
        for tok in tokens:
            name = tok.line.split(":")[0].strip()
            if tok.type == tokenize.COMMENT and name in names and name not in out and "fmt:" not in tok.string:
                out[name] = tok.string.lstrip("# ")
    return out


def print_help(cls, presets, name):
    """Print what --help shows: usage, every field with its type, its value in preset `name`
    and its description; then exit 0."""
    module = sys.modules[cls.__module__]
    script = os.path.basename(getattr(module, "__file__", "") or "train.py")
    about = (module.__doc__ or "").strip().split("\n\n")[0]  # the first paragraph of the trainer's docstring
    print(f"usage: python {script} --config=PRESET [--field=value ...]     (torchrun takes the same arguments)\n"
          f"       python {script} --list | --print_config | --help\n\n{about}\n\n"
          f"Fields, with their values in preset {name} (--config=NAME --help shows another's):")  # fmt: skip
    notes, cfg = field_comments(cls), presets[name]
    rows = [(f"--{f.name}={show(getattr(cfg, f.name))}", field_type(f).__name__, notes.get(f.name, ""))
            for f in own_fields_first(cls)]  # fmt: skip
    width = min(36, max(len(r[0]) for r in rows))
    for option, kind, note in rows:
        print(f"  {option:<{width}}  {kind:<5}  {note}")
    print("\n" + textwrap.fill(f"Presets (--list): {', '.join(presets)}. A bool may be given bare (--compile). "
                               f"Runs resume by themselves from the newest good checkpoint in --out_dir.", 100))
    sys.exit(0)


def print_presets(cls, presets, default):
    """Print what --list shows: each preset and the fields it sets apart from the defaults; exit 0."""
    base, order = dataclasses.asdict(cls()), own_fields_first(cls)
    for name, p in presets.items():
        changed = [f"{f.name}={show(getattr(p, f.name))}" for f in order if getattr(p, f.name) != base[f.name]]
        print(f"{name}{' (default)' if name == default else ''}: {', '.join(changed) or 'the field defaults'}")
    sys.exit(0)

"""
What the two trainers (train_tokenizer.py, train_maskgen.py) share: the command line, where a process runs,
the optimiser and its schedule (paper App. A, Tab. 7 and 8: AdamW, linear warm-up then cosine or constant,
EMA weights), deterministic data slots, exact resume, preemption, logging and the training-curve picture.
The maths of a step stays in each trainer's main().

Exact resume and DDP == one process rest on two rules: every random draw of a micro-step is seeded from
(seed, step, global micro-batch slot) and the data of a slot is fixed (`seed_for_slot`, `image_batches`);
a checkpoint holds everything a run's future depends on: weights, EMA, optimiser, grad scaler, step and
every rank's RNG state (`run_state`).
"""

import copy
import dataclasses
import importlib
import json
import math
import os
import random
import re
import signal
import sys
import textwrap
import time
from datetime import timedelta
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from checkpoint import atomic_write, load_good, newest_checkpoint, pick_device, save_checkpoint
from shapes import ShapesWorld

# data.py and shards.py are imported where a stream is opened: they import this file.


# 1. Config: typed dataclasses, --field=value, --help / --list / --print_config --------------------
def option(default, help):
    """A config field with its one-line --help text (kept in the field's metadata)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class RunConfig:
    """The fields of every training run; each trainer's TrainConfig adds its model's and data's. The defaults
    are the tokenizer's official recipe (Tab. 7: AdamW (0.9, 0.999), wd 1e-4, lr 1e-4, 10k warm-up, cosine to
    1e-5); MaskGen's presets set their own (Tab. 8)."""

    num_workers: int = option(4, "DataLoader processes reading shards / folders (the data order depends on it)")
    replan_data: bool = option(False, "resume on a changed shard list: each reader starts a new epoch over it")
    batch_size: int = option(32, "per GPU, per micro-step")
    grad_accum: int = option(1, "micro-steps per optimiser step (global batch = batch_size x grad_accum x GPUs)")
    max_steps: int = option(650_000, "optimiser steps; a cosine schedule decays until here")
    lr: float = option(1e-4, "peak learning rate, after the linear warm-up")
    end_lr: float = option(1e-5, "learning rate at the end of a cosine decay")
    warmup_steps: int = option(10_000, "steps of linear warm-up from 0")
    weight_decay: float = option(1e-4, "AdamW's, on weight matrices only (not gains, biases, latent tokens)")
    beta1: float = option(0.9, "AdamW's first-moment decay")
    beta2: float = option(0.999, "AdamW's second-moment decay")
    grad_clip: float = option(1.0, "the global gradient norm is clipped to this")
    ema_decay: float = option(0.999, "of the EMA weights (warmed up as (1+t)/(10+t))")
    dtype: str = option("bf16", "bf16 | fp16 | fp32 (autocast is used on CUDA only)")
    compile: bool = option(True, "torch.compile the model (faster; changes float rounding, not the maths)")
    grad_checkpointing: bool = option(False, "recompute each block's activations in backward: less memory, more time")
    device: str = option("auto", "auto | cpu | cuda | cuda:N; auto = this process's GPU, else the CPU")
    peak_tflops: float = option(0.0, "per device, for MFU; 0 = the bf16 peak of a known GPU (PEAK_BF16_TFLOPS)")
    seed: int = option(42, "seeds the initial weights, the data order and every random draw")
    log_every: int = option(50, "steps between log records (log.jsonl and the trackers)")
    sample_every: int = option(5_000, "steps between sample / reconstruction grids")
    ckpt_every: int = option(5_000, "steps between checkpoints")
    stop_at: int = option(0, "stop (with a checkpoint) at this step, short of max_steps; 0 = run to max_steps")
    keep_ckpts: int = option(2, "the newest good checkpoints kept (the newest good one is never deleted)")
    max_nonfinite_steps: int = option(20, "stop after this many consecutive steps with a non-finite grad norm")
    dist_timeout_s: int = option(600, "a collective that waits longer (a stuck rank) ends the job with an error")
    wandb_project: str = option("", "also log to this Weights & Biases project (pip install wandb); empty = off")
    tensorboard_dir: str = option("", "also log to TensorBoard files in this folder (pip install tensorboard)")


# The values a config field allows: ok(value) -> bool, and how to say which.
Rule = NamedTuple("Rule", [("ok", Callable), ("allowed", str)])


def one_of(choices):
    return Rule(lambda v: v in choices, f"choose one of {sorted(choices)}")


def at_least(low):
    return Rule(lambda v: v >= low, f"it must be >= {low}")


def within(low, high, open_high=False):
    """A number in [low, high], or [low, high) with open_high (a probability, a beta)."""
    ok = (lambda v: low <= v < high) if open_high else (lambda v: low <= v <= high)
    return Rule(ok, f"it must be in [{low}, {high}{')' if open_high else ']'}")


# The allowed values of RunConfig's fields; each trainer adds its own (RULES).
# lr may be 0 (a frozen run that only replays data, as a test does); nan fails every bound.
COMMON_RULES = {
    "dtype": one_of(("bf16", "fp16", "fp32")),
    "device": Rule(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "use auto, cpu, cuda or cuda:N"),
    "beta1": within(0, 1, open_high=True), "beta2": within(0, 1, open_high=True), "ema_decay": within(0, 1),
    "grad_clip": Rule(lambda v: v > 0, "it must be > 0 (inf: no clipping)"),
    **dict.fromkeys(("batch_size", "grad_accum", "max_steps", "log_every", "sample_every", "ckpt_every",
                     "keep_ckpts", "max_nonfinite_steps", "dist_timeout_s"), at_least(1)),
    **dict.fromkeys(("lr", "end_lr", "warmup_steps", "weight_decay", "num_workers", "stop_at", "peak_tflops",
                     "seed"), at_least(0)),
}  # fmt: skip


def parse_config(cls, presets, argv=None, default="tiny", rules=None):
    """A config dataclass from `--config=NAME` (a preset, else `default`) and `--field=value` overrides (argv:
    default sys.argv[1:]) of each field's type (a bool may be given bare: --compile), checked against
    COMMON_RULES and `rules`. No arguments, -h or --help print the fields; --list the presets; --print_config
    the config."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if stray := [a for a in argv if not a.startswith("--") and a != "-h"]:
        sys.exit(f"error: arguments must look like --field=value, got {stray} (--help lists the fields)")
    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], None) for a in argv if a.startswith("--"))
    wants = {k for k in ("help", "list", "print_config") if args.pop(k, False) is None}
    name = args.pop("config", default)
    if name is None:
        sys.exit(f"error: --config needs a value: --config={default} (--list names the presets)")
    if name not in presets:
        sys.exit(f"error: unknown --config={name}; choose one of {sorted(presets)}")
    # The trainer's own fields first, then RunConfig's, each in declared order (as --help and --list show them).
    order = sorted(dataclasses.fields(cls), key=lambda f: f.name in RunConfig.__dataclass_fields__)
    fields = {f.name: f for f in order}
    if not argv or "help" in wants or "-h" in argv:  # a bare run would start a long training: say how instead
        # Usage, then every field (in `order`) with its type, its value in preset `name`, its help.
        module = sys.modules[cls.__module__]
        script = os.path.basename(getattr(module, "__file__", "") or "train.py")
        about = (module.__doc__ or "").strip().split("\n\n")[0]  # the first paragraph of the trainer's docstring
        print(f"usage: python {script} --config=PRESET [--field=value ...]     (torchrun takes the same arguments)\n"
              f"       python {script} --list | --print_config | --help\n\n{about}\n\n"
              f"Fields, with their values in preset {name} (--config=NAME --help shows another's):")  # fmt: skip
        rows = [(f"--{f.name}={show(getattr(presets[name], f.name))}", f.type.__name__, f.metadata.get("help", ""))
                for f in order]  # fmt: skip
        width = min(36, max(len(r[0]) for r in rows))
        for option_, kind, note in rows:
            print(f"  {option_:<{width}}  {kind:<5}  {note}")
        print("\n" + textwrap.fill(f"Presets (--list): {', '.join(presets)}. A bool may be given bare (--compile). "
                                   f"Runs resume by themselves from the newest good checkpoint in --out_dir.", 100))
        sys.exit(0)
    if "list" in wants:  # each preset, with the fields it sets apart from the defaults
        base = cls()
        for key, p in presets.items():
            changed = [f"{f}={show(getattr(p, f))}" for f in fields if getattr(p, f) != getattr(base, f)]
            print(f"{key}{' (default)' if key == default else ''}: {', '.join(changed) or 'the field defaults'}")
        sys.exit(0)
    cfg = copy.deepcopy(presets[name])
    for key, raw in args.items():
        if key not in fields:
            sys.exit(f"error: unknown option --{key}; valid options: {', '.join(sorted(fields))} (--help says more)")
        t = fields[key].type
        if raw is None:  # --key with no "=value": only a boolean may be given bare (--compile)
            if t is not bool:
                example = show(getattr(cfg, key)) if getattr(cfg, key) != "" else f"<{t.__name__}>"
                sys.exit(f"error: --{key} needs a value: --{key}={example}")
            raw = "true"
        try:
            val = {"true": True, "1": True, "false": False, "0": False}[raw.lower()] if t is bool else t(raw)
        except (KeyError, ValueError):
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


def show(value):
    """A config value the way it is typed on the command line."""
    return str(value).lower() if isinstance(value, bool) else value if value != "" else '""'


# 2. Processes: device, process group, numerics, seeds, peak FLOP/s (also for sample, evaluate, data, bench) --
def rank_world():
    """(rank, world_size): from the process group, else torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed(device="auto", mps=True, backend=None, timeout=None):
    """(rank, world_size, device); under torchrun with several processes, joins the process
    group: NCCL for GPUs, else gloo (so the scripts and tests run several processes on CPU)."""
    device = pick_device(device, mps)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL, and every bare .cuda(), use the current device
    rank, world = rank_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=timeout)
    return rank, world, device


def teardown():
    """Wait for every rank, then leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def allow_tf32():
    """Let fp32 matmuls and convolutions use TF32 on Ampere and newer GPUs: ~8x the fp32 throughput with a
    10-bit mantissa, plenty for these models (the official configs do too)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def autocast(device, dtype):
    """A mixed-precision context for `dtype` ("fp32" | "bf16" | "fp16"); fp32 turns it off."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Dense bf16 tensor-core peaks in TFLOP/s per GPU (vendor data sheets), matched in this order against
# torch.cuda.get_device_name(): first hit wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0)]  # fmt: skip


def peak_flops(device, override_tflops=0.0):
    """Peak FLOP/s of one device for MFU: the override, else the table's figure for a known GPU, else None
    (then no MFU is reported: a guess would mislead)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


# 3. Set-up of a training run ----------------------------------------------------------------------
def setup_run(cfg):
    """DDP under torchrun (a collective timeout ends a stuck job with an error), the numerics and the rank-0
    logger. Returns (rank, world, device, autocast, scaler, log)."""
    try:
        rank, world, device = setup_distributed(cfg.device, mps=False, timeout=timedelta(seconds=cfg.dist_timeout_s))
    except ValueError as e:  # a device this machine does not have
        sys.exit(f"error: {e}")
    # The one place where training numerics are chosen: TF32 for fp32 matmuls, autocast on CUDA only (CPU
    # bf16 is slow on most machines, and tests want fp32), loss scaling for fp16 only, whose narrow exponent
    # range would flush small gradients to zero. A disabled scaler passes everything through.
    allow_tf32()
    amp = cfg.dtype if device.type == "cuda" else "fp32"
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    log = Logger(cfg, rank == 0)
    log(text=f"run folder: {os.path.abspath(cfg.out_dir)} (config.json, log.jsonl, checkpoints)")
    return rank, world, device, (lambda: autocast(device, amp)), scaler, log


# 4. Optimisation ----------------------------------------------------------------------------------
def lr_at(step, base_lr, warmup, max_steps, schedule="cosine", end_lr=0.0):
    """Linear warm-up from 0, then cosine decay to end_lr or constant (official schedules)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(model, lr, betas, weight_decay):
    """AdamW, no weight decay on ndim < 2, LayerNorms, biases, latent tokens (the official rule)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or "ln" in n or "norm" in n or "bias" in n or "latent_tokens" in n
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step for all tensors instead of a dozen ops per tensor, on CUDA and (PyTorch >= 2.4)
    # CPU; the same maths up to float rounding.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=next(model.parameters()).device.type in ("cuda", "cpu"))


@torch.no_grad()
def ema_update(ema, model, step, max_decay):
    """ema <- decay * ema + (1 - decay) * model; buffers are copied. The decay warms up as (1+t)/(10+t) (a copy
    at step 0), so early EMA weights are not the random initialisation's."""
    decay = min(max_decay, (1 + step) / (10 + step)) if step > 0 else 0.0
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m.detach(), 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


# 5. Data: an endless, deterministic stream of (images, captions) batches --------------------------
def shapes_mix(text):
    """"0.2,0.3,0.5" -> [0.2, 0.3, 0.5]: weights of single, count, relation scenes; "" -> None (thirds)."""
    return [float(w) for w in text.split(",")] if text.strip() else None


def shapes_mix_ok(text):
    """Whether --shapes_mix is "" or three weights ShapesWorld accepts."""
    try:
        return ShapesWorld(category_mix=shapes_mix(text)) is not None
    except ValueError:
        return False


def image_batches(cfg, image_size, rank, world, start_step, recaption_prob=0.0, resume=None):
    """get(step, k) -> (images (B,3,S,S) in [0,1], captions) for micro-step k, whose global slot is rank *
    grad_accum + k. The shapes world is indexed, so a slot is a fixed set of sample ids: one process with
    grad_accum=2 sees the data of two DDP ranks with grad_accum=1, and a resumed run the data it would have
    seen. Shards and folders are streams: get.positions (shards.StreamPositions) follows each reader,
    run_state saves it, and resume=<the checkpoint> starts every reader there, exactly, at any step."""
    B, A = cfg.batch_size, cfg.grad_accum
    if cfg.data == "shapes":
        shapes = ShapesWorld(seed=cfg.seed, category_mix=shapes_mix(getattr(cfg, "shapes_mix", "")))

        def get(step, k):
            first = ((step * world * A) + rank * A + k) * B  # the slot's first sample id
            images, samples = shapes.batch(range(first, first + B), image_size)  # (B, 3, S, S)
            return images, [s.caption for s in samples]

        return get
    import data  # a seeded stream per rank; corrupt or filtered samples are skipped and counted (get.skipped)
    loader = data.image_text_loader(cfg.data, image_size=image_size, batch_size=B, rank=rank, world_size=world,
                                    num_workers=cfg.num_workers, seed=cfg.seed, start_batch=start_step * A)
    positions = resume_positions(resume, rank, cfg, start_step * A, loader.dataset)
    stream = iter(loader)

    def get(step, k):
        b = next(stream)
        positions.consumed(b)  # where this batch's reader now stands, for the checkpoint
        # MaskGen prefers a sample's recaption (where it has one) with probability 0.95.
        caps = data.pick_captions(b["caption"], b["recaption"], recaption_prob) if recaption_prob else b["caption"]
        return b["image"], caps

    get.skipped, get.positions = loader.dataset.skipped, positions
    return get


def resume_positions(resume, rank, cfg, start_batch, dataset):
    """This rank's shards.StreamPositions from the checkpoint resumed (None: a fresh run; none saved: unknown),
    given to `dataset`, a stream not yet iterated. They are offsets into the shard list the checkpoint records
    (names, sizes): another list stops the run naming the change, or cfg.replan_data starts a new epoch over it."""
    from shards import StreamPositions, source_changes
    saved = resume["data_positions"][rank] if resume is not None and resume.get("data_positions") else None
    sources = dataset.sources() if hasattr(dataset, "sources") else None
    recorded = resume.get("data_sources", {}) if saved is not None else None  # {}: not recorded
    change = recorded and source_changes(recorded, sources)
    if change and not cfg.replan_data:
        sys.exit(f"error: the data changed since the checkpoint at step {resume['step']}: {change}. Restore the "
                 f"shards it was trained on, or pass --replan_data to go on with these (the data order changes)")
    if rank == 0 and (change or recorded == {}):  # re-planned, or a checkpoint older than the record
        tqdm.write(f"warning: the data changed ({change}); --replan_data: each reader starts a new epoch over it" if
                   change else "warning: the checkpoint predates recording its shard list: changes go unnoticed")
    try:
        positions = StreamPositions(cfg.num_workers, start_batch, saved, sources, new_epoch=bool(change))
    except ValueError as e:  # another num_workers
        sys.exit(f"error: {e}")
    dataset.positions = positions.saved
    return positions


def seed_for_slot(seed, step, slot):
    """Reseed every RNG from (seed, step, global micro-batch slot) before each micro-step: random draws (masks,
    noise) then depend on which data they belong to, not on which rank runs them, so DDP equals one process
    with the same global batch, and resuming needs no RNG bookkeeping to be exact."""
    seed_everything(hash((seed, step, slot)) % 2**62)


# 6. Exact resume: what may change, the checkpoint's run state, the checks on resuming -------------
# Fields that may change between a run and its resumption, as they leave the maths alone (tests/test_train.py
# shows each, bit for bit): what is logged, sampled and kept, where and when, the stop conditions, trackers,
# compile and device (float rounding only), grad_checkpointing, init_from (read by fresh runs only). max_steps: below.
RESUMABLE_FIELDS = {"log_every", "sample_every", "ckpt_every", "stop_at", "keep_ckpts", "out_dir", "compile", "device",
                    "peak_tflops", "max_nonfinite_steps", "dist_timeout_s", "wandb_project", "tensorboard_dir",
                    "sample_prompts", "init_from", "replan_data", "grad_checkpointing"}  # fmt: skip
WHY_FIXED = {"max_steps": " (the cosine decay's length, which the steps so far followed; to stop early and go on "
                          "later, keep it and pass --stop_at=STEP)",
             "num_workers": " (the order of the shard data depends on it)"}  # fmt: skip


def check_resume_config(saved, current, step, pinned=()):
    """Stop, naming every differing field, when a run would resume a checkpoint written with other maths
    (fields outside RESUMABLE_FIELDS). `pinned`: fields naming files whose content the checkpoint pins by hash
    (find_resume), which may therefore move. max_steps may change where no trained step's LR depended on it
    (a constant schedule, or a run still in warm-up). The tokenizer has no `schedule`: cosine."""
    def lr(max_steps):  # the LR of the last trained step
        return lr_at(step - 1, current["lr"], current["warmup_steps"], max_steps, current.get("schedule", "cosine"),
                     current["end_lr"])  # fmt: skip

    free = RESUMABLE_FIELDS | set(pinned)
    if step == 0 or lr(saved.get("max_steps")) == lr(current["max_steps"]):
        free = free | {"max_steps"}
    if diff := {k: (saved.get(k), v) for k, v in current.items() if k not in free and saved.get(k) != v}:
        lines = "\n".join(f"  {k}: checkpoint has {a!r}, this run has {b!r}{WHY_FIXED.get(k, '')}"
                          for k, (a, b) in diff.items())  # fmt: skip
        sys.exit(f"error: the config does not match the checkpoint being resumed:\n{lines}\n"
                 f"Pass the same values, or use a new --out_dir to start a fresh run.")  # fmt: skip


def find_resume(cfg, log, inputs=None):
    """(path, checkpoint) of the newest good checkpoint in cfg.out_dir, checked to be written with this config
    and, for `inputs` ({name: sha256} of the frozen models the run trains on, recorded in its checkpoints), on
    the same weights; (None, None) for a fresh run. Rank 0 then writes the config to out_dir/config.json.
    Under torchrun rank 0 picks the checkpoint and every rank loads that one: a rank that cannot stops the job."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rejected, path, ckpt = [], None, None
    if rank == 0:
        path, ckpt = newest_checkpoint(cfg.out_dir, lambda s: log(text=s), rejected, strict=True)
    if world > 1:  # rank 0's path, then every rank's cause of failure (None: loaded) for all to see
        chosen, whys = [path], [None] * world
        dist.broadcast_object_list(chosen)
        path, why = chosen[0], None
        if rank > 0 and path is not None:
            ckpt, why = load_good(path, strict=True)
        dist.all_gather_object(whys, why)
        if bad := next(((r, w) for r, w in enumerate(whys) if w), None):
            sys.exit(f"error: rank {bad[0]} cannot read {path}, the checkpoint rank 0 resumes from: it is {bad[1]}")
    if ckpt is not None:
        check_resume_config(ckpt["config"], dataclasses.asdict(cfg), ckpt["step"], pinned=ckpt.get("inputs") or ())
        recorded = ckpt.get("inputs")
        if inputs and recorded is None:
            log(text=f"warning: {path} predates recording the frozen models' hashes; {', '.join(inputs)} not checked")
        diff = [f"  {k}: the checkpoint was trained on sha256 {recorded.get(k, 'none')[:16]}, this run has {h[:16]}"
                for k, h in (inputs or {}).items() if recorded is not None and recorded.get(k) != h]  # fmt: skip
        if diff:
            sys.exit(f"error: the frozen weights this run would train on are not those {path} was trained on:\n"
                     + "\n".join(diff) + "\nResuming would go on with other tokens or text features. Give the run "
                     "the files it started with (--tokenizer: that run or release, unchanged), or start a new "
                     "--out_dir (--init_from=<that checkpoint> starts from its weights).")  # fmt: skip
    elif rejected:
        names = ", ".join(os.path.basename(p) for p, _ in rejected)
        log(text=f"no usable checkpoint in {cfg.out_dir} ({len(rejected)} unreadable: {names}); starting from scratch")
    if log.enabled:
        text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
        atomic_write(os.path.join(cfg.out_dir, "config.json"), lambda f: f.write(text.encode()))
    return path, ckpt


def run_state(cfg, step, scaler, world, data=None):
    """A checkpoint's part besides models and optimisers: config, step, grad scaler, every rank's RNG state
    and, for a stream (`data`: the batch function, with .positions), every rank's reader positions. A
    collective: every rank calls it."""
    def every_rank(mine):  # [rank 0's, rank 1's, ...]
        out = [mine] * world
        if world > 1:
            dist.all_gather_object(out, mine)
        return out

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
           "torch": torch.get_rng_state()}  # tensors and plain values only: checkpoints load with weights_only=True
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    scaler_state = scaler.state_dict() if scaler.is_enabled() else None
    state = {"config": dataclasses.asdict(cfg), "step": step, "scaler": scaler_state, "rng": every_rank(rng)}
    mine = data.positions.state() if getattr(data, "positions", None) is not None else None
    if mine is not None:  # the same kind of data on every rank, so every rank gathers
        state["data_positions"] = every_rank(mine)
        state["data_sources"] = data.positions.sources  # the shard list they point into: alike on every rank
    return state


def restore_run_state(ckpt, scaler, rank, world):
    """Restore the scaler and this rank's RNG state (the inverse of run_state); returns the step. (Stream
    positions go to image_batches / the token loader: resume=ckpt.)"""
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) != world:
        sys.exit(f"error: checkpoint was written by {len(ckpt['rng'])} processes, this run has {world}; "
                 f"resume with the same number of processes (or start a new --out_dir)")  # fmt: skip
    state = ckpt["rng"][rank]
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return ckpt["step"]


# 7. Stopping: non-finite steps, preemption, the checkpoint on the way out -------------------------
class RunControl:
    """What stops a run early, alike on every rank: cfg.max_nonfinite_steps skipped steps in a row
    (naming the last good checkpoint), or SIGTERM / SIGINT (from SLURM, Kubernetes, torchrun, Ctrl-C):
    a flag the ranks agree on after every step (a tiny all-reduce), then a checkpoint and exit 128 +
    signal. A second signal exits at once with that status, leaving no partial checkpoint; a third is
    the default action. A repeat within ECHO_S seconds is the first seen twice (SLURM signals every
    process of a job, torchrun forwards its own copy). Every way out goes through close()."""

    ECHO_S = 2.0

    def __init__(self, cfg, world, log, last_ckpt=None):
        self.cfg, self.world, self.log, self.last_ckpt = cfg, world, log, last_ckpt
        # stopping: the signal every rank agreed on at the last stop_requested(); 0 = go on
        self.in_a_row = self.skipped = self.signum = self.stopping = self.t_signal = 0
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame):
        if self.signum and time.monotonic() - self.t_signal >= self.ECHO_S:  # the second: stop now, wherever
            self.close(logs=False)  # the run is. Raised, not killed, so cleanup runs (a checkpoint being
            raise SystemExit(128 + signum)  # written removes its .tmp; the trackers are left to exit)
        if not self.signum:  # the first (an echo of it within ECHO_S is ignored)
            self.signum, self.t_signal = signum, time.monotonic()
            tqdm.write(f"received {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                       f"(send it again after {self.ECHO_S:g} s to stop at once)")  # fmt: skip

    def close(self, logs=True, leave=False):
        """Restore SIGTERM / SIGINT's handlers; close log.jsonl and the trackers (and the group)."""
        for s, h in self.old.items():
            signal.signal(s, h)
        if logs:
            self.log.close()
        if leave:
            teardown()

    def count_skipped(self, ok, step):
        """Count a skipped step; too many in a row stop the run (on every rank: the grad norm is all-reduced)."""
        self.in_a_row = 0 if ok else self.in_a_row + 1
        self.skipped += not ok
        if self.in_a_row >= self.cfg.max_nonfinite_steps:
            self.close()
            sys.exit(f"error: {self.in_a_row} steps in a row (up to step {step + 1}) had a non-finite loss or gradient "
                     f"norm; stopping. The last good checkpoint is {self.last_ckpt or 'none (nothing was saved)'}; "
                     f"lower --lr or raise --grad_clip / use --dtype=fp32, and resume from it")  # fmt: skip

    def stop_requested(self):
        """Whether any rank got a signal (a collective: every rank gets the same answer). A signal landing
        after the flag was read waits for the next step (one rank stopping alone would crash the others)."""
        flag = self.signum
        if self.world > 1:
            t = torch.tensor([flag], device="cuda" if dist.get_backend() == "nccl" else "cpu")  # NCCL: CUDA only
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        self.t_signal = time.monotonic() if flag and not self.signum else self.t_signal  # its own copy may follow
        self.signum, self.stopping = self.signum or flag, flag  # a rank that got none: its next one is the 2nd
        return bool(flag)

    def save(self, step, payload):
        """save_checkpoint into the run folder (rank 0); weights that are not finite stop the run."""
        try:
            self.last_ckpt = save_checkpoint(self.cfg.out_dir, step, payload, self.cfg.keep_ckpts,
                                             log=lambda s: self.log(text=s))  # fmt: skip
        except ValueError as e:
            self.close()
            sys.exit(f"error: at step {step}: {e}. The last good checkpoint is {self.last_ckpt or 'none'}")

    def exit_if_stopped(self, step, master):
        """After a preempted step's checkpoint (all ranks agreed): say where it is, exit 128 + signal."""
        if self.stopping:
            if master:
                self.log(text=f"stopped by {signal.Signals(self.stopping).name} at step {step}; checkpoint "
                              f"{self.last_ckpt}; run the same command to resume")  # fmt: skip
            self.close(leave=True)
            sys.exit(128 + self.stopping)

    def finish(self, progress, master):
        """The end of a run that reached its last step: say where its checkpoint is."""
        progress.bar.close()
        if master:
            self.log(text=f"done: checkpoint {self.last_ckpt}")
        self.close(leave=True)


# 8. Logging: log.jsonl and the trackers, progress and MFU, image grids ----------------------------
class Logger:
    """Rank 0 only: a JSONL record per log interval, also sent to the trackers asked for (W&B,
    TensorBoard: neither is a dependency), and a readable line. Every rank makes out_dir."""

    def __init__(self, cfg, enabled):
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.enabled, self.trackers = enabled, []  # (write(scalars, step), close) pairs
        self.f = open(os.path.join(cfg.out_dir, "log.jsonl"), "a", buffering=1) if enabled else None  # line-buffered
        if enabled and cfg.wandb_project:  # one W&B run per start of the run, named after its folder
            run = self.need("wandb", "wandb", "--wandb_project").init(project=cfg.wandb_project, dir=cfg.out_dir,
                name=os.path.basename(os.path.abspath(cfg.out_dir)), config=dataclasses.asdict(cfg))  # fmt: skip
            self.trackers.append((lambda rec, step: run.log(rec, step=step), run.finish))
        if enabled and cfg.tensorboard_dir:
            tb = self.need("torch.utils.tensorboard", "tensorboard", "--tensorboard_dir")
            writer = tb.SummaryWriter(cfg.tensorboard_dir)
            self.trackers.append((lambda rec, n: [writer.add_scalar(k, v, n) for k, v in rec.items()], writer.close))

    @staticmethod
    def need(module, package, flag):
        """import `module`, or stop naming the pip package that `flag` needs."""
        try:
            return importlib.import_module(module)
        except ImportError as e:
            sys.exit(f"error: {flag} needs the {package} package ({e}); pip install {package}, or leave {flag} unset")

    def __call__(self, record=None, text=None):
        if self.enabled and record is not None:
            self.f.write(json.dumps(record) + "\n")  # flushed at once: a reader (plot_curves) sees every record
            for write, _ in self.trackers:
                write(scalars(record), record.get("step"))
        if self.enabled and text is not None:
            tqdm.write(text)  # keeps the progress bar intact

    def close(self):
        if self.enabled:
            self.enabled = False
            self.f.close()
            for _, close in self.trackers:
                close()


def scalars(record, prefix=""):
    """A log record's numbers without the step, nested dicts flattened ("skipped/corrupt_image")."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and k != "step":
            out[prefix + k] = v
    return out


class Progress:
    """The progress bar (rank 0) and the throughput since the last read(): images per second
    over all ranks, and MFU (model FLOP/s over all devices' peak, where known: peak_flops)."""

    def __init__(self, cfg, step, world, device, flops_per_image, enabled):
        self.bar = tqdm(total=cfg.max_steps, initial=step, disable=not enabled, dynamic_ncols=True)
        self.images_per_step = cfg.batch_size * cfg.grad_accum * world
        self.flops_per_image, self.world = flops_per_image, world
        self.peak, self.t0, self.steps = peak_flops(device, cfg.peak_tflops), time.time(), 0

    def update(self):
        self.bar.update(1)
        self.steps += 1

    def read(self):
        rec = {"img_per_s": self.steps * self.images_per_step / (time.time() - self.t0)}
        if self.peak:
            rec["mfu"] = rec["img_per_s"] * self.flops_per_image / (self.world * self.peak)
        self.t0, self.steps = time.time(), 0
        return rec


def save_grid(images, path, nrow):
    """Tile (B, 3, H, W) images in [0, 1] into one PNG, nrow per row, 2 px white gaps. Rounded to the 256 levels
    first, halves to even (data.to_uint8's rounding): save_image alone rounds halves up, and resized shapes
    images hold many exact halves."""
    from torchvision.utils import save_image  # here: sample.py imports this file and never needs torchvision
    levels = (images.detach().float().clamp(0, 1) * 255).round()
    save_image(levels / 255, path, nrow=nrow, padding=2, pad_value=1.0)


# 9. Training curves: curves.png from log.jsonl, drawn with PIL only -------------------------------
NOT_CURVES = {"step", "img_per_s", "mfu", "skipped_nonfinite", "skipped"}  # throughput and counters
PANEL_W, PANEL_H, MARGIN = 360, 200, 56  # pixels per panel and the room for its labels


def read_log(path):
    """log.jsonl -> [record, ...] sorted by step, one per step: a resumed run appends the steps it replays after
    its last checkpoint, so the last record of a step wins. Lines that are not JSON objects with a step (cut
    by a kill) are ignored."""
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
    """{name: ([step, ...], [value, ...])} for every numeric field worth a curve, finite values only (a skipped
    non-finite step logs nan): the losses in logged order, then lr, grad_norm."""
    out = {}
    for rec in records:
        for key, v in rec.items():
            if key not in NOT_CURVES and type(v) in (int, float) and math.isfinite(v):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(rec["step"])
                ys.append(float(v))
    last = [k for k in ("lr", "grad_norm") if k in out]
    return {k: out[k] for k in [k for k in out if k not in last] + last}


def plot_curves(run_dir, out=None, cols=3):
    """Draw RUN_DIR/log.jsonl into RUN_DIR/curves.png (or `out`): every logged loss, the LR and the gradient
    norm against the step, one panel each. The trainers call it at each sample interval; `python
    train_common.py curves RUN_DIR ...` redraws by hand. Returns the PNG's path, or None if nothing is logged."""
    log_path = os.path.join(run_dir, "log.jsonl")
    curves = series(read_log(log_path)) if os.path.isfile(log_path) else {}
    if not curves:
        return None
    rows, cols = math.ceil(len(curves) / cols), min(cols, len(curves))
    image = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        # One panel per curve, in its box at (x0, y0): title, frame, the line, the value range on the left (short
        # numbers: 1.67e-04, not 0.000167) and the steps below. The y axis is logarithmic (marked "log") when every
        # value is positive and they span more than a factor of 20 (losses and the LR warm-up do), linear otherwise.
        x0, y0 = (i % cols) * PANEL_W, (i // cols) * PANEL_H
        left, top, w, h = x0 + MARGIN, y0 + 18, PANEL_W - MARGIN - 8, PANEL_H - 18 - 22
        draw.text((left, y0 + 2), name, fill="black", font=font)
        draw.rectangle([left, top, left + w, top + h], outline=(160, 160, 160))
        lo, hi = min(ys), max(ys)
        log_y = lo > 0 and hi / lo > 20
        f = math.log10 if log_y else (lambda v: v)
        a, b = (f(lo) - 1, f(hi) + 1) if f(hi) - f(lo) < 1e-12 else (f(lo), f(hi))  # a flat line: centred
        x_lo, x_span = min(xs), max(max(xs) - min(xs), 1)
        pts = [(left + (x - x_lo) / x_span * w, top + h - (f(y) - a) / (b - a) * h) for x, y in zip(xs, ys)]
        if len(pts) == 1:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(31, 119, 180))
        else:
            draw.line(pts, fill=(31, 119, 180), width=2)
        for value, y in ((hi, top - 2), (lo, top + h - 10)):
            text = f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:.3g}"
            draw.text((x0 + 2, y), text, fill="black", font=font)
        if log_y:
            draw.text((x0 + 2, top + h // 2 - 5), "log", fill=(120, 120, 120), font=font)
        label = f"step {int(max(xs))}"
        draw.text((left, top + h + 4), str(int(x_lo)), fill="black", font=font)
        draw.text((left + w - draw.textlength(label, font=font), top + h + 4), label, fill="black", font=font)
    out = out or os.path.join(run_dir, "curves.png")
    image.save(out + ".tmp.png")  # written then renamed: a reader never sees half a PNG
    os.replace(out + ".tmp.png", out)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "curves":
        sys.exit("usage: python train_common.py curves RUN_DIR [RUN_DIR ...]   "
                 "(writes RUN_DIR/curves.png from its log.jsonl)")  # fmt: skip
    for d in sys.argv[2:]:
        if not os.path.isfile(os.path.join(d, "log.jsonl")):
            sys.exit(f"error: {d} has no log.jsonl; pass a train_tokenizer.py / train_maskgen.py run folder")
        print(plot_curves(d) or f"{d}: nothing logged yet")

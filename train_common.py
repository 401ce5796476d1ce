"""
The plumbing both trainers share (train_tokenizer.py, train_maskgen.py): the run's
set-up, numerics, the optimiser and its schedule (paper App. A, Tab. 7 and 8: AdamW,
linear warm-up then cosine or constant, EMA weights), deterministic data slots, atomic
checkpoints with exact resume, preemption, and logging (log.jsonl, optional trackers).
Each trainer's main() reads top to bottom and calls these; its command line and config
checks come from train_config.py, the device and process group from runtime.py.

Exact resume and DDP == one process rest on two rules kept here:
  - every random draw of a micro-step is seeded from (seed, step, global micro-batch
    slot) (`seed_for_slot`), and the data of a slot is fixed (`image_batches`);
  - a checkpoint holds everything a run's future depends on: weights, EMA, optimiser,
    grad scaler, step and every rank's RNG state (`run_state` / `restore_run_state`).
"""

import dataclasses
import importlib
import json
import math
import os
import random
import signal
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torchvision.utils import save_image
from tqdm import tqdm

import data
import runtime
from checkpoint import atomic_write, newest_checkpoint, save_checkpoint
from shapes import ShapesWorld
from shards import StreamPositions

# -----------------------------------------------------------------------------
# Run set-up


def setup_run(cfg):
    """The start both trainers share: DDP when launched by torchrun (with a collective
    timeout, so a stuck rank ends the job with an error instead of hanging it), the
    precision, and the rank-0 logger, which says where the run folder is.
    Returns (rank, world, device, autocast, scaler, log)."""
    timeout = timedelta(seconds=cfg.dist_timeout_s)
    try:
        rank, world, device = runtime.setup_distributed(cfg.device, mps=False, timeout=timeout)
    except ValueError as e:  # a device this machine does not have
        sys.exit(f"error: {e}")
    autocast, scaler = setup_precision(cfg.dtype, device)
    log = Logger(cfg, rank == 0)
    log(text=f"run folder: {os.path.abspath(cfg.out_dir)} (config.json, log.jsonl, checkpoints)")
    return rank, world, device, autocast, scaler, log


def setup_precision(dtype, device):
    """The one place where training numerics are chosen. Returns (autocast context
    factory, GradScaler)."""
    runtime.allow_tf32()
    # No autocast on CPU: CPU bf16 is slow on most machines and tests want fp32.
    amp = dtype if device.type == "cuda" else "fp32"
    # fp16 has a narrow exponent range, so its gradients need loss scaling; bf16 does not.
    # A disabled scaler passes everything through: scale(loss) is loss, step(opt) is opt.step().
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    return (lambda: runtime.autocast(device, amp)), scaler


# -----------------------------------------------------------------------------
# Optimisation


def lr_at(step, base_lr, warmup, max_steps, schedule="cosine", end_lr=0.0):
    """Linear warm-up from 0, then cosine decay to end_lr or constant (official schedules)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(model, lr, betas, weight_decay):
    """AdamW with no weight decay on gains, biases, embeddings-as-vectors and latent tokens
    (the official exclusion rule: ndim < 2, LayerNorms, biases, latent tokens)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "ln" in n or "norm" in n or "bias" in n or "latent_tokens" in n
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW updates all tensors in one kernel per step instead of a dozen ops per
    # tensor: on CUDA, and on CPU too since PyTorch 2.4 (the shapes tokenizer's
    # optimizer.step 2.1 -> 0.4 ms on 2 cores, README); the same maths up to float rounding.
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def optimizer_step(opt, params, scaler, clip):
    """Unscale (fp16), clip the global grad norm, step, clear grads. Returns (norm tensor, ok).

    A step whose grad norm is not finite is skipped (ok False: no update; the caller skips
    EMA too). A nan/inf loss gives non-finite gradients, so the norm catches it as well;
    under DDP the norm is of the all-reduced gradients, so every rank decides the same.
    Reading it is this step's one host sync. scaler.update() stays with the caller: with
    two optimizers it must run once per iteration, after both steps."""
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    ok = bool(torch.isfinite(norm))
    if ok:
        scaler.step(opt)
    opt.zero_grad(set_to_none=True)
    return norm, ok


@torch.no_grad()
def ema_update(ema, model, step, max_decay):
    """EMA of the weights. The decay warms up as (1+t)/(10+t), so at step 0 it is a copy
    (decay 0 at initialisation) and early EMA weights are not dominated by random init."""
    decay = min(max_decay, (1 + step) / (10 + step)) if step > 0 else 0.0
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m.detach(), 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


# -----------------------------------------------------------------------------
# Data: an endless, deterministic stream of (images, captions) batches


def shapes_mix(text):
    """"0.2,0.3,0.5" -> [0.2, 0.3, 0.5], the shapes world's weights of single, count and
    relation scenes; "" -> None (equal thirds). ShapesWorld checks the weights."""
    return [float(w) for w in text.split(",")] if text.strip() else None


def shapes_mix_ok(text):
    """Whether --shapes_mix is "" or three weights ShapesWorld accepts."""
    try:
        ShapesWorld(category_mix=shapes_mix(text))
    except ValueError:
        return False
    return True


def image_batches(cfg, image_size, rank, world, start_step, recaption_prob=0.0, resume=None):
    """Returns get(step, k) -> (images (B,3,S,S) in [0,1], captions) for micro-step k.

    Every micro-batch of the run has a global slot = rank * grad_accum + k. The shapes
    world is indexed, so slot n of step s is a fixed set of sample ids: one process with
    grad_accum=2 sees exactly the data of two DDP ranks with grad_accum=1, and a resumed
    run sees exactly the data it would have seen.

    Tar shards and image folders are streams: get.positions (shards.StreamPositions)
    follows where each reader stands, run_state(..., data=get) saves it, and
    resume=<the checkpoint resumed> starts every reader there, exactly and at the same
    cost at any step (older checkpoints without positions fast-forward)."""
    B, A = cfg.batch_size, cfg.grad_accum
    if cfg.data == "shapes":
        shapes = ShapesWorld(seed=cfg.seed, category_mix=shapes_mix(getattr(cfg, "shapes_mix", "")))

        def get(step, k):
            first = ((step * world * A) + rank * A + k) * B
            samples = [shapes.sample(i) for i in range(first, first + B)]
            images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
            if images.shape[-1] != image_size:
                images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear", antialias=True)
            return images, [s.caption for s in samples]

        return get
    # Tar shards or an image folder: a seeded stream per rank, started where the run
    # stopped. Corrupt or filtered samples are skipped and counted (get.skipped).
    positions = resume_positions(resume, rank, cfg.num_workers, start_step * A)
    loader = data.image_text_loader(
        cfg.data, image_size=image_size, batch_size=B, rank=rank, world_size=world, num_workers=cfg.num_workers,
        seed=cfg.seed, start_batch=start_step * A, positions=positions.saved,
    )  # fmt: skip
    stream = iter(loader)

    def get(step, k):
        b = next(stream)
        positions.consumed(b)  # where this batch's reader now stands, for the checkpoint
        # MaskGen prefers a sample's recaption (where it has one) with probability 0.95.
        caps = data.pick_captions(b["caption"], b["recaption"], recaption_prob) if recaption_prob else b["caption"]
        return b["image"], caps

    get.skipped, get.positions = loader.dataset.skipped, positions
    return get


def resume_positions(resume, rank, num_workers, start_batch):
    """This rank's StreamPositions from the checkpoint being resumed (None: a fresh run);
    a checkpoint written with another num_workers stops the run with the reason."""
    try:
        return StreamPositions.resume(resume, rank, num_workers, start_batch)
    except ValueError as e:
        sys.exit(f"error: {e}")


def seed_for_slot(seed, step, slot):
    """Reseed every RNG from (seed, step, global micro-batch slot) before each micro-step:
    random draws (masks, noise) then depend on which data they belong to, not on which
    rank runs them, so DDP equals one process with the same global batch, and resuming
    needs no RNG bookkeeping to be exact."""
    runtime.seed_everything(hash((seed, step, slot)) % 2**62)


# -----------------------------------------------------------------------------
# Checkpoints and exact resume


def rng_state():
    """This process's Python, NumPy, torch (and CUDA) RNG states, as tensors and plain
    Python values only, so that checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """The inverse of rng_state()."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world):
    """Every rank's RNG state, so that a resumed run continues every rank's random stream."""
    if world == 1:
        return [rng_state()]
    out = [None] * world
    dist.all_gather_object(out, rng_state())
    return out


# Fields that may change between a run and its resumption, because they do not change the
# maths (tests/test_train.py shows each, bit for bit): what is logged, sampled and kept,
# where and when, the stop conditions, the trackers, compile and device (float rounding
# only), and init_from (read by fresh runs only). Not num_workers: the order of shard data
# depends on it. max_steps only where no step trained so far depended on it (below).
RESUMABLE_FIELDS = {"log_every", "sample_every", "ckpt_every", "stop_at", "keep_ckpts", "out_dir", "compile", "device",
                    "peak_tflops", "max_nonfinite_steps", "dist_timeout_s", "wandb_project", "tensorboard_dir",
                    "sample_prompts", "init_from"}  # fmt: skip
WHY_FIXED = {"max_steps": " (the cosine decay's length, which the steps so far followed; to stop early and go on "
                          "later, keep it and pass --stop_at=STEP)",
             "num_workers": " (the order of the shard data depends on it)"}  # fmt: skip


def max_steps_may_change(saved, current, step):
    """Whether a run resumed at `step` may change max_steps: when no step trained so far had
    a learning rate that depended on it (a constant schedule, or a run still in warm-up).
    The schedules read it only after warm-up, so the last trained step decides. (The
    tokenizer's config has no schedule field: it is always cosine.)"""
    def lr(max_steps):
        return lr_at(step - 1, current["lr"], current["warmup_steps"], max_steps, current.get("schedule", "cosine"),
                     current["end_lr"])  # fmt: skip

    return step == 0 or lr(saved.get("max_steps")) == lr(current["max_steps"])


def check_resume_config(saved, current, step, pinned=()):
    """Stop, naming every differing field, when a run would resume a checkpoint written
    with different maths (fields outside RESUMABLE_FIELDS). `pinned`: fields naming files
    whose content the checkpoint pins by hash (check_inputs), which may therefore move."""
    free = RESUMABLE_FIELDS | set(pinned) | ({"max_steps"} if max_steps_may_change(saved, current, step) else set())
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in free and saved.get(k) != v}
    if diff:
        lines = "\n".join(f"  {k}: checkpoint has {a!r}, this run has {b!r}{WHY_FIXED.get(k, '')}"
                          for k, (a, b) in diff.items())  # fmt: skip
        sys.exit(
            f"error: the config does not match the checkpoint being resumed:\n{lines}\n"
            f"Pass the same values, or use a new --out_dir to start a fresh run."
        )


def check_inputs(recorded, current, path, log):
    """Stop when a frozen model the run trains on is not the one the checkpoint at `path`
    was trained on. recorded / current: {name: sha256 of its weights}."""
    if not current:
        return
    if recorded is None:
        log(text=f"warning: {path} predates recording the frozen models' hashes; {', '.join(current)} not checked")
        return
    diff = [f"  {k}: the checkpoint was trained on sha256 {recorded.get(k, 'none')[:16]}, this run has {h[:16]}"
            for k, h in current.items() if recorded.get(k) != h]  # fmt: skip
    if diff:
        sys.exit(f"error: the frozen weights this run would train on are not those {path} was trained on:\n"
                 + "\n".join(diff) + "\nResuming would go on with other tokens or text features. Give the run "
                 "the files it started with (--tokenizer: that run or release, unchanged), or start a new --out_dir "
                 "(--init_from=<that checkpoint> starts from its weights).")  # fmt: skip


def find_resume(cfg, log, inputs=None):
    """(path, checkpoint) of the newest good checkpoint in cfg.out_dir, after checking that
    it was written with this config and, for `inputs` ({name: sha256} of the frozen models
    the run trains on, recorded in its checkpoints), on the same weights; (None, None) for a
    fresh run. Then rank 0 writes the resolved config to out_dir/config.json."""
    rejected = []
    path, ckpt = newest_checkpoint(cfg.out_dir, log=lambda s: log(text=s), rejected=rejected)
    if ckpt is not None:
        check_resume_config(ckpt["config"], dataclasses.asdict(cfg), ckpt["step"], pinned=ckpt.get("inputs") or ())
        check_inputs(ckpt.get("inputs"), inputs, path, log)
    elif rejected:
        names = ", ".join(os.path.basename(p) for p, _ in rejected)
        log(text=f"no usable checkpoint in {cfg.out_dir} ({len(rejected)} unreadable: {names}); starting from scratch")
    if log.enabled:  # the config of the latest start (resumable fields may differ from the first's)
        text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
        atomic_write(os.path.join(cfg.out_dir, "config.json"), lambda f: f.write(text.encode()))
    return path, ckpt


class RunControl:
    """What stops a run early, the same way on every rank:
      - non-finite steps: after cfg.max_nonfinite_steps skipped steps in a row the run
        stops, naming the last good checkpoint;
      - preemption: SIGTERM / SIGINT (what SLURM, Kubernetes, torchrun and Ctrl-C send) set
        a flag; the ranks agree on it after every step (one tiny all-reduce), write a
        checkpoint and exit with 128 + the signal number. A second signal exits at once,
        with the same status, leaving no partial checkpoint; a third is the default action.
    Every way out goes through close(), which also closes log.jsonl and the trackers."""

    def __init__(self, cfg, world, log, last_ckpt=None):
        self.cfg, self.world, self.log, self.last_ckpt = cfg, world, log, last_ckpt
        self.in_a_row, self.skipped, self.signum = 0, 0, 0
        self.stopping = 0  # the signal every rank agreed on at the last stop_requested(); 0 = go on
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame):
        if self.signum:  # the second signal: stop now, wherever the run is. Raised, not killed,
            self.close(logs=False)  # so cleanup runs (a checkpoint being written removes its .tmp)
            raise SystemExit(128 + signum)  # (the trackers are left to exit: wandb may sync for long)
        self.signum = signum
        tqdm.write(f"received {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                   f"(send it again to stop at once)")  # fmt: skip

    def close(self, logs=True):
        """Give SIGTERM / SIGINT their previous handlers; close log.jsonl and the trackers."""
        for s, h in self.old.items():
            signal.signal(s, h)
        if logs:
            self.log.close()

    def step_done(self, ok, step, scaler, ema, model):
        """End of an iteration: update the loss scale (once, after every optimizer step), the
        EMA (only when the step was applied), and count a skipped (non-finite) step; stop
        after too many in a row."""
        scaler.update()
        if ok:  # a skipped (non-finite) step updates nothing
            ema_update(ema, model, step, self.cfg.ema_decay)
        self.in_a_row = 0 if ok else self.in_a_row + 1
        self.skipped += not ok
        if self.in_a_row >= self.cfg.max_nonfinite_steps:
            self.close()
            sys.exit(f"error: {self.in_a_row} steps in a row (up to step {step + 1}) had a non-finite loss or gradient "
                     f"norm; stopping. The last good checkpoint is {self.last_ckpt or 'none (nothing was saved)'}; "
                     f"lower --lr or raise --grad_clip / use --dtype=fp32, and resume from it")  # fmt: skip

    def stop_requested(self):
        """Whether any rank got a signal (a collective: every rank calls it every step).

        The answer is the same on every rank, and it is what exit_if_stopped acts on. A
        signal that lands on one rank after its flag was read here (during the all-reduce,
        or later in the step) is not acted on by that rank alone: the others would run on
        into the next step's collectives and crash. It is seen at the next step's call."""
        flag = self.signum
        if self.world > 1:
            t = torch.tensor([flag], device=runtime.collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        self.signum = self.signum or flag  # a rank that got none treats the next signal as the second
        self.stopping = flag
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
        """After the checkpoint of a preempted step: say where it is and exit 128 + signal.
        Only on the decision all ranks share (stop_requested), never on this rank's own flag."""
        if not self.stopping:
            return
        if master:
            self.log(text=f"stopped by {signal.Signals(self.stopping).name} at step {step}; checkpoint "
                          f"{self.last_ckpt}; run the same command to resume")  # fmt: skip
        self.close()
        runtime.teardown()
        sys.exit(128 + self.stopping)

    def finish(self, progress, master):
        """The end of a run that reached its last step: say where its checkpoint is."""
        progress.close()
        if master:
            self.log(text=f"done: checkpoint {self.last_ckpt}")
        self.close()
        runtime.teardown()


def run_state(cfg, step, scaler, world, data=None):
    """The part of a checkpoint both trainers write besides their models and optimisers:
    config, step, grad scaler, every rank's RNG state and, for a streamed dataset (`data`:
    the batch function, with its .positions), every rank's reader positions. A
    collective: every rank calls it."""
    scaler_state = scaler.state_dict() if scaler.is_enabled() else None
    state = {"config": dataclasses.asdict(cfg), "step": step, "scaler": scaler_state, "rng": gather_rng_states(world)}
    positions = getattr(data, "positions", None)
    mine = positions.state() if positions is not None else None
    if mine is not None:  # the same kind of data on every rank, so every rank gathers
        state["data_positions"] = [mine]
        if world > 1:
            state["data_positions"] = [None] * world
            dist.all_gather_object(state["data_positions"], mine)
    return state


def restore_run_state(ckpt, scaler, rank, world):
    """The part of a resume both trainers share: scaler, this rank's RNG state, the step.
    (The data stream's positions go to image_batches / the token loader: resume=ckpt.)"""
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) != world:
        sys.exit(f"error: checkpoint was written by {len(ckpt['rng'])} processes, this run has {world}; "
                 f"resume with the same number of processes (or start a new --out_dir)")  # fmt: skip
    set_rng_state(ckpt["rng"][rank])
    return ckpt["step"]


# -----------------------------------------------------------------------------
# Logging


class Logger:
    """A JSONL record per log interval plus a readable line, rank 0 only; the records also
    go to the trackers asked for (--wandb_project, --tensorboard_dir). Every rank makes the
    run folder (out_dir)."""

    def __init__(self, cfg, enabled):
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.enabled = enabled
        self.f = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if enabled else None
        self.trackers = open_trackers(cfg) if enabled else []

    def __call__(self, record=None, text=None):
        if not self.enabled:
            return
        if record is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
            for write, _ in self.trackers:
                write(scalars(record), record.get("step"))
        if text is not None:
            tqdm.write(text)  # keeps the progress bar intact

    def close(self):
        if self.enabled:
            self.enabled = False
            self.f.close()
            for _, close in self.trackers:
                close()


def open_trackers(cfg):
    """The optional trackers, as (write(scalars, step), close) pairs. Each package is
    imported only when asked for, so neither is a dependency."""
    out = []
    if cfg.wandb_project:  # one W&B run per start of the run, named after its folder
        wandb = import_for("wandb", "wandb", "--wandb_project")
        run = wandb.init(project=cfg.wandb_project, name=os.path.basename(os.path.abspath(cfg.out_dir)),
                         config=dataclasses.asdict(cfg), dir=cfg.out_dir)  # fmt: skip
        out.append((lambda rec, step: run.log(rec, step=step), run.finish))
    if cfg.tensorboard_dir:
        tensorboard = import_for("torch.utils.tensorboard", "tensorboard", "--tensorboard_dir")
        writer = tensorboard.SummaryWriter(cfg.tensorboard_dir)

        def write(rec, step):
            for k, v in rec.items():
                writer.add_scalar(k, v, step)

        out.append((write, writer.close))
    return out


def import_for(module, package, flag):
    """import `module`, or stop naming the pip package that `flag` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        sys.exit(f"error: {flag} needs the {package} package ({e}); pip install {package}, or leave {flag} unset")


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
    """The progress bar (rank 0), and the throughput since the last reading: images per
    second over all ranks, and the model FLOPs utilisation, model FLOP/s over the peak of
    all devices (only where that peak is known: runtime.peak_flops)."""

    def __init__(self, cfg, step, world, device, flops_per_image, enabled):
        self.bar = tqdm(total=cfg.max_steps, initial=step, disable=not enabled, dynamic_ncols=True)
        self.images_per_step = cfg.batch_size * cfg.grad_accum * world
        self.flops_per_image, self.world = flops_per_image, world
        self.peak = runtime.peak_flops(device, cfg.peak_tflops)
        self.t0, self.steps = time.time(), 0

    def update(self):
        self.bar.update(1)
        self.steps += 1

    def read(self):
        """{"img_per_s", and "mfu" where the peak is known} since the last read."""
        rec = {"img_per_s": self.steps * self.images_per_step / (time.time() - self.t0)}
        if self.peak:
            rec["mfu"] = rec["img_per_s"] * self.flops_per_image / (self.world * self.peak)
        self.t0, self.steps = time.time(), 0
        return rec

    def close(self):
        self.bar.close()


def save_grid(images, path, nrow):
    """Tile (B, 3, H, W) images in [0, 1] into one PNG, nrow per row, 2 px white gaps."""
    # Rounded to levels first by data.to_uint8 (halves to even), as these grids always were:
    # save_image rounds halves up, and resized shapes images hold many exact halves.
    save_image(data.to_uint8(images) / 255, path, nrow=nrow, padding=2, pad_value=1.0)

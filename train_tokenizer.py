"""
Train TA-TiTok with the one-stage recipe (paper §4.1 "Improved one-stage training
recipe", App. A, Tab. 7): L2 + perceptual + quantizer (VQ) or KL (KL) losses from the
first step, a PatchGAN discriminator with LeCAM regularisation switched on later,
AdamW with a cosine schedule, EMA weights.

Single process (CPU or one GPU):
    python train_tokenizer.py --config=tiny
    python train_tokenizer.py --config=tatitok_bl32_vq --data='shards/{000000..000999}.tar'
Many GPUs / nodes (the same script, launched by torchrun):
    torchrun --nproc_per_node=8 train_tokenizer.py --config=tatitok_bl32_vq --data=...

Any config field can be overridden with --field=value (types are checked). Runs resume
automatically from the newest good checkpoint in --out_dir.

The first half of the file holds the pieces both trainers share (train_maskgen.py
imports them): config overrides, DDP set-up, precision, LR schedule, EMA, atomic
checkpoints with exact resume, logging. Then comes the flat main().
"""

import copy
import dataclasses
import glob
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# Shared plumbing (used by train_maskgen.py too)


def parse_config(cls, presets, argv):
    """Build a config dataclass from `--config=NAME` (a preset) plus `--field=value` overrides.

    Values are converted to the field's declared type, and an unknown field or a
    badly typed value stops with a message saying what is allowed.
    """
    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "true") for a in argv if a.startswith("--"))
    stray = [a for a in argv if not a.startswith("--")]
    if stray:
        sys.exit(f"error: arguments must look like --field=value, got {stray}")
    name = args.pop("config", "tiny")
    if name not in presets:
        sys.exit(f"error: unknown --config={name}; choose one of {sorted(presets)}")
    cfg = copy.deepcopy(presets[name])
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, raw in args.items():
        if key not in types:
            sys.exit(f"error: unknown option --{key}; valid options: {', '.join(sorted(types))}")
        t = types[key] if isinstance(types[key], type) else eval(types[key])  # annotations may be strings
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
    return cfg


def setup_distributed(device_arg="auto"):
    """Returns (rank, local_rank, world_size, device). torchrun sets RANK; plain python does not."""
    if "RANK" in os.environ:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
        # NCCL for GPUs; gloo lets the same script (and the tests) run DDP on CPU.
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, local_rank, world = 0, 0, 1
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
    return rank, local_rank, world, device


def setup_precision(dtype, device):
    """The one place where numerics are chosen. Returns (autocast context factory, GradScaler or None)."""
    # TF32 matmuls on Ampere+ are ~8x faster than fp32 with a 10-bit mantissa,
    # which is plenty for training these models (the official configs enable it).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if device.type != "cuda" or dtype == "fp32":
        # No autocast on CPU: CPU bf16 is slow on most machines and tests want fp32.
        return (lambda: torch.autocast(device.type, enabled=False)), None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # fp16 has a narrow exponent range, so its gradients need loss scaling; bf16 does not.
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    return (lambda: torch.autocast("cuda", dtype=amp_dtype)), scaler


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s per GPU, from the vendor data
# sheets, matched in this order against torch.cuda.get_device_name(): first hit wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0),
]  # fmt: skip


def peak_flops(device, override_tflops=0.0):
    """Peak FLOP/s of one device for MFU: the override when given, else the table's bf16
    figure for a known GPU, else None (then no MFU is logged: a guess would mislead)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops * 1e12
    return None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    # fused AdamW is one kernel per step on CUDA; fall back elsewhere.
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


@torch.no_grad()
def ema_update(ema, model, step, max_decay):
    """EMA of the weights. The decay warms up as (1+t)/(10+t), so at step 0 it is a copy
    (decay 0 at initialisation) and early EMA weights are not dominated by random init."""
    decay = min(max_decay, (1 + step) / (10 + step)) if step > 0 else 0.0
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m.detach(), 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


def rng_state():
    # Only tensors and plain Python values, so checkpoints load with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
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


def save_checkpoint(out_dir, step, payload, keep=2):
    """Write atomically: a temporary file, fsync, then rename. A crash mid-write leaves
    the previous checkpoint intact, and only the newest `keep` are kept."""
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX
    for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))[:-keep]:
        os.remove(old)
    return path


def load_latest_checkpoint(out_dir, log=print):
    """The newest checkpoint that loads, or None. A truncated or corrupt file is
    reported and skipped, and the one before it is used."""
    for path in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")), reverse=True):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            return path, ckpt
        except Exception as e:  # truncated zip, bad pickle, ...
            log(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                f"falling back to the previous one")  # fmt: skip
    return None, None


def optimizer_step(opt, params, scaler, clip):
    """Unscale (fp16), clip the global grad norm, step, clear grads. Returns the norm (a tensor:
    reading it is left to logging, so there is no host sync here). scaler.update() stays with
    the caller: with two optimizers it must run once per iteration, after both steps."""
    if scaler:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt) if scaler else opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def restore_run_state(ckpt, scaler, rank, world):
    """The part of a resume both trainers share: scaler, this rank's RNG state, the step."""
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) != world:
        sys.exit(f"error: checkpoint was written by {len(ckpt['rng'])} processes, this run has {world}; "
                 f"resume with the same number of processes (or start a new --out_dir)")  # fmt: skip
    set_rng_state(ckpt["rng"][rank])
    return ckpt["step"]


# Fields that may change between a run and its resumption without changing the maths.
RESUMABLE_FIELDS = {"max_steps", "log_every", "sample_every", "ckpt_every", "compile", "out_dir", "device",
                    "num_workers", "keep_ckpts", "peak_tflops"}  # fmt: skip


def check_resume_config(saved, current):
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in RESUMABLE_FIELDS and saved.get(k) != v}
    if diff:
        lines = "\n".join(f"  {k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
        sys.exit(
            f"error: the config does not match the checkpoint being resumed:\n{lines}\n"
            f"Pass the same values, or use a new --out_dir to start a fresh run."
        )


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers (for saving and EMA)."""
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


class Logger:
    """A JSONL record per log interval plus a readable line, rank 0 only."""

    def __init__(self, out_dir, enabled):
        self.enabled = enabled
        self.f = open(os.path.join(out_dir, "log.jsonl"), "a") if enabled else None

    def __call__(self, record=None, text=None):
        if not self.enabled:
            return
        if record is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        if text is not None:
            from tqdm import tqdm

            tqdm.write(text)  # keeps the progress bar intact


def to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 numpy."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow):
    """Tile (B, 3, H, W) images in [0, 1] into one PNG, nrow per row, 2 px white gaps."""
    from PIL import Image

    arr = to_uint8(images)
    B, H, W, _ = arr.shape
    rows = math.ceil(B / nrow)
    canvas = np.full((rows * (H + 2) + 2, nrow * (W + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(arr):
        r, c = divmod(i, nrow)
        canvas[2 + r * (H + 2) : 2 + r * (H + 2) + H, 2 + c * (W + 2) : 2 + c * (W + 2) + W] = im
    Image.fromarray(canvas).save(path)


# -----------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    tokenizer: str = "tiny"  # a tokenizer.PRESETS name
    text_encoder: str = "ViT-L-14-336"  # open_clip model name, or a tokenizer.TEXT_PRESETS name
    text_pretrained: str = "openai"
    # data: "shapes" (the procedural world), a tar-shard pattern, or an image folder
    data: str = "shapes"
    num_workers: int = 4
    # optimisation (official: AdamW (0.9, 0.999), wd 1e-4, lr 1e-4, 10k warm-up, cosine to 1e-5)
    batch_size: int = 32  # per GPU, per micro-step
    grad_accum: int = 1
    max_steps: int = 650_000
    lr: float = 1e-4
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # losses: a losses.PRESETS name ("official": LPIPS + ConvNeXt-S, "paper_resnet50", "shapes", "tiny")
    loss: str = "official"
    disc_start: int = -1  # step at which the GAN switches on; -1 keeps the loss preset's (official 200k)
    # system
    out_dir: str = "runs/tokenizer"
    dtype: str = "bf16"  # bf16 | fp16 | fp32 (autocast is used on CUDA only)
    compile: bool = True
    device: str = "auto"
    peak_tflops: float = 0.0  # per device, for MFU; 0 = the bf16 peak of a known GPU (PEAK_BF16_TFLOPS)
    seed: int = 42
    log_every: int = 50
    sample_every: int = 5_000
    ckpt_every: int = 5_000
    keep_ckpts: int = 2


# -----------------------------------------------------------------------------
# Data: an endless, deterministic stream of (images, captions) batches


def image_batches(cfg, image_size, rank, world, start_step, recaption_prob=0.0):
    """Returns get(step, k) -> (images (B,3,S,S) in [0,1], captions) for micro-step k.

    Every micro-batch of the run has a global slot = rank * grad_accum + k. The shapes
    world is indexed, so slot n of step s is a fixed set of sample ids: one process with
    grad_accum=2 sees exactly the data of two DDP ranks with grad_accum=1, and a resumed
    run sees exactly the data it would have seen."""
    import data

    B, A = cfg.batch_size, cfg.grad_accum
    if cfg.data == "shapes":
        shapes = data.ShapesWorld(seed=cfg.seed)

        def get(step, k):
            first = ((step * world * A) + rank * A + k) * B
            samples = [shapes.sample(i) for i in range(first, first + B)]
            images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
            if images.shape[-1] != image_size:
                images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear", antialias=True)
            return images, [s.caption for s in samples]

        return get
    # Tar shards or an image folder: a seeded stream per rank, started at the batch where
    # the run stopped. Corrupt or filtered samples are skipped and counted (get.skipped).
    loader = data.image_text_loader(
        cfg.data, image_size=image_size, batch_size=B, rank=rank, world_size=world,
        num_workers=cfg.num_workers, seed=cfg.seed, start_batch=start_step * A,
    )  # fmt: skip
    stream = iter(loader)

    def get(step, k):
        b = next(stream)
        # MaskGen prefers a sample's recaption (where it has one) with probability 0.95.
        caps = data.pick_captions(b["caption"], b["recaption"], recaption_prob) if recaption_prob else b["caption"]
        return b["image"], caps

    get.skipped = loader.dataset.skipped
    return get


def seed_for_slot(seed, step, slot):
    """Reseed every RNG from (seed, step, global micro-batch slot) before each micro-step:
    random draws (masks, noise) then depend on which data they belong to, not on which
    rank runs them, so DDP equals one process with the same global batch, and resuming
    needs no RNG bookkeeping to be exact."""
    seed_everything(hash((seed, step, slot)) % 2**62)


# -----------------------------------------------------------------------------


def main(argv=None):
    import losses
    import tokenizer as T

    cfg = parse_config(TrainConfig, PRESETS, sys.argv[1:] if argv is None else argv)
    rank, local_rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    autocast, scaler = setup_precision(cfg.dtype, device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = Logger(cfg.out_dir, master)

    # ---- models. Built with the same seed on every rank, so DDP starts in sync.
    seed_everything(cfg.seed)
    if cfg.tokenizer not in T.PRESETS:
        sys.exit(f"error: unknown --tokenizer={cfg.tokenizer}; choose one of {sorted(T.PRESETS)}")
    tcfg = T.PRESETS[cfg.tokenizer]
    model = T.TATiTok(tcfg).to(device)
    if cfg.text_encoder in T.TEXT_PRESETS:  # a small random tower (tests, shapes world)
        text_encoder = T.TextEncoder.from_config(**T.TEXT_PRESETS[cfg.text_encoder])
    else:
        text_encoder = T.TextEncoder(cfg.text_encoder, cfg.text_pretrained)
    text_encoder.to(device)
    if (text_encoder.context_length, text_encoder.width) != (tcfg.text_context_length, tcfg.text_embed_dim):
        sys.exit(
            f"error: text encoder {cfg.text_encoder} gives (L={text_encoder.context_length}, W={text_encoder.width}) "
            f"but tokenizer {cfg.tokenizer} expects (L={tcfg.text_context_length}, W={tcfg.text_embed_dim})"
        )
    if cfg.loss not in losses.PRESETS:
        sys.exit(f"error: unknown --loss={cfg.loss}; choose one of {sorted(losses.PRESETS)}")
    lcfg = copy.deepcopy(losses.PRESETS[cfg.loss])
    if cfg.disc_start >= 0:
        lcfg.discriminator_start = cfg.disc_start
    loss_fn = losses.TokenizerLoss(lcfg).to(device)
    disc = loss_fn.discriminator
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # eval: no code revival, no dropout
    opt = adamw(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    opt_d = adamw(disc, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay) if disc is not None else None
    # MFU counts the tokenizer's own FLOPs (3x its forward per image); the frozen text
    # encoder and the loss networks are extra work it leaves out, so it is a lower bound.
    f = model.flops()
    train_flops, peak = 3 * (f["encode"] + f["decode"]), peak_flops(device, cfg.peak_tflops)
    if master:
        n = sum(p.numel() for p in model.parameters())
        log(text=f"TA-TiTok {cfg.tokenizer}: {n / 1e6:.1f}M parameters, {train_flops / 1e9:.2f} GFLOP per "
                 f"image per step, {world} process(es) on {device}")  # fmt: skip

    # ---- resume (config check, weights, optimisers, step, RNG of every rank)
    step = 0
    path, ckpt = load_latest_checkpoint(cfg.out_dir, log=lambda s: log(text=s) if master else None)
    if ckpt is not None:
        check_resume_config(ckpt["config"], dataclasses.asdict(cfg))
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        loss_fn.load_state_dict(ckpt["loss_state"])  # the discriminator and the LeCAM EMAs
        opt.load_state_dict(ckpt["optimizer"])
        if opt_d is not None:
            opt_d.load_state_dict(ckpt["optimizer_d"])
        step = restore_run_state(ckpt, scaler, rank, world)
        log(text=f"resumed from {path} at step {step}")

    # ---- compile, then wrap for DDP (compile the plain module; DDP syncs its grads)
    fwd_model = torch.compile(model) if cfg.compile else model
    fwd_disc = torch.compile(disc) if cfg.compile and disc is not None else disc
    if world > 1:
        ids = [local_rank] if device.type == "cuda" else None
        fwd_model = DDP(fwd_model, device_ids=ids)
        fwd_disc = DDP(fwd_disc, device_ids=ids) if disc is not None else None

    get_batch = image_batches(cfg, tcfg.image_size, rank, world, start_step=step)
    fixed = get_batch(0, 0) if cfg.data == "shapes" else None  # grid inputs (shards: set in the loop)
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, "cosine", cfg.end_lr)
        for opt_ in (opt, opt_d):
            for g in opt_.param_groups:
                g["lr"] = lr
        disc_on = loss_fn.discriminator_active(step)

        # ---- generator (tokenizer) update, with gradient accumulation
        model.train()
        stats = {}
        micro = []  # (images, reconstruction) of each micro-step, for the discriminator update
        for k in range(cfg.grad_accum):
            seed_for_slot(cfg.seed, step, rank * cfg.grad_accum + k)
            images, captions = get_batch(step, k)
            images = images.to(device, non_blocking=True)
            text = text_encoder(captions).final  # (B, 77, 768), frozen CLIP
            if fixed is None:  # the reconstruction grids follow the first batch this run trains on
                fixed = (images[:8], captions[:8])
            # Only the last micro-step all-reduces gradients across ranks.
            if world > 1:
                fwd_model.require_backward_grad_sync = k == cfg.grad_accum - 1
            with autocast():
                recon, extras = fwd_model(images, text)
                loss, terms = loss_fn.generator_loss(images, recon, extras, step)
            loss = loss / cfg.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            for name, v in terms.items():  # detached tensors: no host sync until logging
                stats[name] = stats.get(name, 0.0) + v / cfg.grad_accum
            micro.append((images, recon.detach()))
        grad_norm = optimizer_step(opt, model.parameters(), scaler, cfg.grad_clip)

        # ---- discriminator update on the same reconstructions (after disc_start)
        if disc_on:
            for k, (images, recon) in enumerate(micro):
                if world > 1:
                    fwd_disc.require_backward_grad_sync = k == cfg.grad_accum - 1
                with autocast():
                    d_loss, d_terms = loss_fn.discriminator_loss(images, recon, step, discriminator=fwd_disc)
                ((scaler.scale(d_loss) if scaler else d_loss) / cfg.grad_accum).backward()
                for name, v in d_terms.items():
                    stats[name] = stats.get(name, 0.0) + v / cfg.grad_accum
            optimizer_step(opt_d, disc.parameters(), scaler, cfg.grad_clip)
        if scaler:
            scaler.update()
        ema_update(ema, model, step, cfg.ema_decay)
        step += 1
        seen += cfg.batch_size * cfg.grad_accum * world
        bar.update(1)

        # ---- logging, grids, checkpoints
        if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
            dt = time.time() - t0
            rec = {"step": step, "lr": lr, "grad_norm": float(grad_norm), "img_per_s": seen / dt}
            if peak:  # model FLOP/s over the peak of all devices
                rec["mfu"] = rec["img_per_s"] * train_flops / (world * peak)
            rec.update({k: float(v) for k, v in stats.items()})
            if hasattr(get_batch, "skipped"):  # corrupt / filtered samples so far, by reason
                rec["skipped"] = get_batch.skipped.counts()
            line = " | ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("step", "skipped"))
            if "skipped" in rec:
                line += f" | skipped {get_batch.skipped.summary()}"
            log(rec, f"step {step:7d} | {line}")
            t0, seen = time.time(), 0
        if master and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            with torch.no_grad():  # EMA weights; KL decodes the posterior mean, for a stable picture
                x = fixed[0][:8].to(device)
                r = ema.decode(ema.encode(x), text_encoder(fixed[1][:8]).final)
            save_grid(torch.cat([x, r.float().clamp(0, 1)]), os.path.join(cfg.out_dir, f"recon_{step:08d}.png"), 8)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            rngs = gather_rng_states(world)  # collective: every rank takes part
            if master:
                payload = {
                    "model": model.state_dict(), "ema": ema.state_dict(), "loss_state": loss_fn.state_dict(),
                    "optimizer": opt.state_dict(), "optimizer_d": opt_d.state_dict() if opt_d else None,
                    "scaler": scaler.state_dict() if scaler else None, "step": step, "rng": rngs,
                    "config": dataclasses.asdict(cfg), "tokenizer_config": dataclasses.asdict(tcfg),
                    "text_encoder": text_encoder.state_dict() if cfg.text_encoder in T.TEXT_PRESETS else None,
                }  # fmt: skip
                save_checkpoint(cfg.out_dir, step, payload, cfg.keep_ckpts)
    bar.close()
    if world > 1:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Presets: the paper's six tokenizers (official training configs) and small ones.

PRESETS = {name: TrainConfig(tokenizer=name) for name in
           ["tatitok_bl32_vq", "tatitok_bl64_vq", "tatitok_bl128_vq",
            "tatitok_bl32_vae", "tatitok_bl64_vae", "tatitok_sl128_vae"]}  # fmt: skip
PRESETS["tiny"] = TrainConfig(
    tokenizer="tiny", text_encoder="tiny", batch_size=4, max_steps=20, warmup_steps=2, lr=3e-3,
    loss="tiny", disc_start=10, out_dir="runs/tiny_tokenizer",
    dtype="fp32", compile=False, log_every=5, sample_every=20, ckpt_every=10, num_workers=0,
)  # fmt: skip
# The shapes world on 2 CPU cores (~15 min): L2 and quantizer (or KL) losses only (the GAN
# never switches on: in so short a run it costs more than it sharpens). beta2 = 0.99: with
# 0.999 the second moments remember the huge first-step gradients for ~1k steps, which
# stalls a run this short.
_SHAPES = dict(
    text_encoder="shapes", batch_size=16, max_steps=16_000, warmup_steps=200, lr=2e-3, end_lr=2e-4, beta2=0.99,
    loss="shapes",
    disc_start=16_000, dtype="fp32", compile=False, log_every=200, sample_every=2000, ckpt_every=2000,
    num_workers=0,
)  # fmt: skip
PRESETS["shapes"] = TrainConfig(tokenizer="shapes", out_dir="runs/shapes_tokenizer", **_SHAPES)
PRESETS["shapes_kl"] = TrainConfig(tokenizer="shapes_kl", out_dir="runs/shapes_tokenizer_kl", **_SHAPES)

if __name__ == "__main__":
    main()

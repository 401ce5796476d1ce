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

Any config field can be overridden with --field=value; runs resume from the newest good
checkpoint in --out_dir. What train_maskgen.py shares (command line, processes, schedule,
EMA, exact resume, logging) is train_common.py; main()'s loop shows each step's maths.
"""

import copy
import os
import sys
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import losses
import tokenizer as T
from text import TEXT_PRESETS, TextEncoder
from train_common import (
    adamw, at_least, ema_update, find_resume, image_batches, lr_at, one_of, option, parse_config, plot_curves,
    Progress, restore_run_state, Rule, run_state, RunConfig, RunControl, save_grid, seed_everything, seed_for_slot,
    setup_run, shapes_mix_ok, within,
)  # fmt: skip


def drop_captions(captions, p, generator=None):
    """Replace each caption by "" with probability p (drawn from torch's CPU RNG). The
    text-aware decoder can take *what* is in the image from the caption and leave the tokens
    only *where*; then it must bind each word to the right object, and on the shapes world a
    VQ tokenizer that fails to draws two objects with one shape. Decoding some samples without
    their caption makes the tokens carry the whole scene. The paper has no such dropout."""
    if p <= 0:
        return list(captions)
    drop = (torch.rand(len(captions), generator=generator) < p).tolist()
    return ["" if d else c for c, d in zip(captions, drop)]


@dataclass
class TrainConfig(RunConfig):  # RunConfig: optimisation, numerics, device, seed, intervals, trackers
    tokenizer: str = option("tiny", "a tokenizer.PRESETS name")
    text_encoder: str = option("ViT-L-14-336", "open_clip model name, or a text.TEXT_PRESETS name")
    text_pretrained: str = option("openai", "open_clip weights tag of a named text encoder")
    data: str = option("shapes", '"shapes" (the procedural world), a tar-shard pattern, or an image folder')
    shapes_mix: str = option("", 'shapes world: weights of single,count,relation scenes, e.g. 0.2,0.3,0.5; "" = '
                                 "thirds")  # fmt: skip
    loss: str = option("official", "a losses.PRESETS name (official: LPIPS + ConvNeXt-S; paper_resnet50, shapes, "
                                   "tiny)")  # fmt: skip
    disc_start: int = option(-1, "step at which the GAN switches on; -1 keeps the loss preset's (official 200k)")
    caption_drop: float = option(0.0, 'share of training samples decoded with the empty caption "" (official: 0)')
    init_from: str = option("", "fine-tune: start from these weights (EMA if any; a fresh discriminator): a release "
                                "dir or Hub id, a run or ckpt file; the preset must build its model")  # fmt: skip
    out_dir: str = option("runs/tokenizer", "checkpoints, log.jsonl, config.json, reconstruction grids")


# The allowed values of this trainer's own fields (train_common.COMMON_RULES has the shared ones).
RULES = {
    "tokenizer": one_of(T.PRESETS), "loss": one_of(losses.PRESETS), "disc_start": at_least(-1),
    "caption_drop": within(0.0, 1.0, open_high=True),
    "shapes_mix": Rule(shapes_mix_ok, "empty, or three weights >= 0 for single,count,relation with a positive "
                       "sum, comma-separated: 0.2,0.3,0.5"),
    "data": Rule(lambda v: not v.startswith("pretokenized:"), "the tokenizer trains on images: shapes, a "
                 "tar-shard pattern or an image folder (pretokenized: shards are for train_maskgen.py)"),
}  # fmt: skip


def main(argv=None):
    cfg = parse_config(TrainConfig, PRESETS, argv, default="tiny", rules=RULES)  # no arguments: --help
    rank, world, device, autocast, scaler, log = setup_run(cfg)  # DDP, precision, rank-0 logger
    master = rank == 0

    # ---- models. Built with the same seed on every rank, so DDP starts in sync.
    seed_everything(cfg.seed)
    tcfg = T.PRESETS[cfg.tokenizer]
    model = T.TATiTok(tcfg).to(device)
    text_encoder = (TextEncoder.from_config(**TEXT_PRESETS[cfg.text_encoder]) if cfg.text_encoder in TEXT_PRESETS
                    else TextEncoder(cfg.text_encoder, cfg.text_pretrained)).to(device)  # random: tests, shapes world
    if (text_encoder.context_length, text_encoder.width) != (tcfg.text_context_length, tcfg.text_embed_dim):
        sys.exit(f"error: text encoder {cfg.text_encoder} gives (L={text_encoder.context_length}, "
                 f"W={text_encoder.width}) but tokenizer {cfg.tokenizer} expects (L={tcfg.text_context_length}, "
                 f"W={tcfg.text_embed_dim})")  # fmt: skip
    lcfg = copy.deepcopy(losses.PRESETS[cfg.loss])
    if cfg.disc_start >= 0:
        lcfg.discriminator_start = cfg.disc_start
    loss_fn = losses.TokenizerLoss(lcfg).to(device)
    disc = loss_fn.discriminator
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # eval: no code revival, no dropout
    opt = adamw(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    opt_d = adamw(disc, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay) if disc is not None else None
    # MFU counts the tokenizer's own FLOPs (3x its forward per image): a lower bound (not the text encoder, losses).
    f = model.flops()
    train_flops = 3 * (f["encode"] + f["decode"])
    if master:
        n = sum(p.numel() for p in model.parameters())
        log(text=f"TA-TiTok {cfg.tokenizer}: {n / 1e6:.1f}M parameters, {train_flops / 1e9:.2f} GFLOP per "
                 f"image per step, {world} process(es) on {device}")  # fmt: skip

    # ---- resume: config check, weights, optimisers, step, every rank's RNG
    step = 0
    path, ckpt = find_resume(cfg, log)
    if ckpt is None and cfg.init_from:
        # A fine-tune: step 0 of a run of its own (schedule, warm-up, optimisers) from the init's tokenizer, the
        # decoder reading the text tower it was trained with. Releases hold no discriminator, and one from the
        # init's run would have learnt to tell its reconstructions of other data: it starts afresh (disc_start
        # counts from here).
        try:
            init, src = checkpoint.init_weights(cfg.init_from, "tokenizer", tcfg, T.PRESETS, "--tokenizer")
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: --init_from={cfg.init_from}: {e}")
        t = src.text  # the text encoder it was trained with (a small random tower: with its weights)
        if t.name not in (None, cfg.text_encoder) or t.state is None and t.pretrained != cfg.text_pretrained:
            sys.exit(f"error: --init_from={cfg.init_from} was trained with text encoder {t.name} ({t.pretrained}); "
                     f"pass --text_encoder={t.name} --text_pretrained={t.pretrained}")
        if t.state is not None:
            text_encoder.load_state_dict(t.state)
        ema.load_state_dict(checkpoint.load_checked(model, init, src.where).state_dict())
        log(text=f"initialised from {src.where}")
    if ckpt is not None:
        if ckpt.get("text_encoder") is not None:  # a small random tower: the run's own weights
            text_encoder.load_state_dict(ckpt["text_encoder"])
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        loss_fn.load_state_dict(ckpt["loss_state"])  # the discriminator and the LeCAM EMAs
        opt.load_state_dict(ckpt["optimizer"])
        if opt_d is not None:
            opt_d.load_state_dict(ckpt["optimizer_d"])
        step = restore_run_state(ckpt, scaler, rank, world)
        log(text=f"resumed from {path} at step {step}")
    control = RunControl(cfg, world, log, last_ckpt=path)  # non-finite steps, SIGTERM / SIGINT

    # ---- compile, then wrap for DDP (compile the plain module; DDP syncs its grads)
    model.encoder.grad_checkpointing = model.decoder.grad_checkpointing = cfg.grad_checkpointing  # per block
    fwd_model = torch.compile(model.before_compile()) if cfg.compile else model
    fwd_disc = torch.compile(disc) if cfg.compile and disc is not None else disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        fwd_model = DDP(fwd_model, device_ids=ids)
        fwd_disc = DDP(fwd_disc, device_ids=ids) if disc is not None else None

    get_batch = image_batches(cfg, tcfg.image_size, rank, world, start_step=step, resume=ckpt)  # ckpt: reader positions
    fixed = get_batch(0, 0) if cfg.data == "shapes" else None  # grid inputs (shards: set in the loop)
    # The shapes world has a finite set of captions: encode each once (TextEncoder.cached).
    encode_text = text_encoder.cached if cfg.data == "shapes" else text_encoder
    progress = Progress(cfg, step, world, device, train_flops, enabled=master)  # the bar, img/s, MFU
    end = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)  # --stop_at ends a run early, with a checkpoint
    while step < end:
        # ---- the learning rate of this step: linear warm-up, then cosine (both optimisers)
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, "cosine", cfg.end_lr)
        for g in opt.param_groups + (opt_d.param_groups if opt_d is not None else []):
            g["lr"] = lr
        disc_on = loss_fn.discriminator_active(step)

        # ---- generator (tokenizer) gradients, with gradient accumulation
        model.train()
        stats = {}
        micro = []  # (images, reconstruction) of each micro-step, for the discriminator update
        for k in range(cfg.grad_accum):
            seed_for_slot(cfg.seed, step, rank * cfg.grad_accum + k)
            images, captions = get_batch(step, k)
            images = images.to(device, non_blocking=True)
            captions = drop_captions(captions, cfg.caption_drop)  # after seed_for_slot: reproducible
            text = encode_text(captions).final  # (B, 77, 768), frozen CLIP
            if fixed is None:  # the reconstruction grids follow the first batch this run trains on
                fixed = (images[:8], captions[:8])
            # Only the last micro-step all-reduces gradients across ranks.
            if world > 1:
                fwd_model.require_backward_grad_sync = k == cfg.grad_accum - 1
            with autocast():
                recon, extras = fwd_model(images, text)
                loss, terms = loss_fn.generator_loss(images, recon, extras, step)
            loss = loss / cfg.grad_accum
            scaler.scale(loss).backward()  # fp16: the loss times the loss scale, so small grads survive
            for name, v in terms.items():  # detached tensors: no host sync until logging
                stats[name] = stats.get(name, 0.0) + v / cfg.grad_accum
            micro.append((images, recon.detach()))

        # ---- the tokenizer's optimiser step. unscale_ divides fp16 gradients by the loss scale, so
        # the clip sees their true size; the norm is of the all-reduced gradients, so every rank
        # decides alike. A non-finite norm (nan/inf loss or gradient) skips the update and the
        # EMA's; reading it is the step's one host sync. scaler.step is opt.step() unless fp16 found an inf.
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        ok = bool(torch.isfinite(grad_norm))
        if ok:
            scaler.step(opt)
        opt.zero_grad(set_to_none=True)

        # ---- discriminator update on the same reconstructions (after disc_start), stepped the same way
        if disc_on:
            for k, (images, recon) in enumerate(micro):
                if world > 1:
                    fwd_disc.require_backward_grad_sync = k == cfg.grad_accum - 1
                with autocast():
                    d_loss, d_terms = loss_fn.discriminator_loss(images, recon, step, discriminator=fwd_disc)
                (scaler.scale(d_loss) / cfg.grad_accum).backward()
                for name, v in d_terms.items():
                    stats[name] = stats.get(name, 0.0) + v / cfg.grad_accum
            scaler.unscale_(opt_d)
            d_ok = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)))
            if d_ok:
                scaler.step(opt_d)
            opt_d.zero_grad(set_to_none=True)
            ok = ok and d_ok
        scaler.update()  # the next loss scale (fp16): once per iteration, after both optimiser steps
        model.end_step(ok)  # VQ: dead-code revival over the step's global batch (all ranks)
        if ok:  # EMA: ema.lerp_(model, 1 - decay); a skipped step updates nothing
            ema_update(ema, model, step, cfg.ema_decay)
        control.count_skipped(ok, step)  # too many non-finite steps in a row stop the run
        step += 1
        progress.update()

        # ---- logging, grids, checkpoints
        if master and (step % cfg.log_every == 0 or step == end):
            rec = {"step": step, "lr": lr, "grad_norm": float(grad_norm), **progress.read()}
            rec["skipped_nonfinite"] = control.skipped  # steps skipped so far (non-finite grad norm)
            rec.update({k: float(v) for k, v in stats.items()})
            if hasattr(get_batch, "skipped"):  # corrupt / filtered samples so far, by reason
                rec["skipped"] = get_batch.skipped.counts()
            line = " | ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("step", "skipped"))
            if "skipped" in rec:
                line += f" | skipped {get_batch.skipped.summary()}"
            log(rec, f"step {step:7d} | {line}")
        if master and (step % cfg.sample_every == 0 or step == end):
            with torch.no_grad():  # EMA weights; KL decodes the posterior mean, for a stable picture
                x = fixed[0][:8].to(device)
                r = ema.decode(ema.encode(x), text_encoder(fixed[1][:8]).final)
            save_grid(torch.cat([x, r]), os.path.join(cfg.out_dir, f"recon_{step:08d}.png"), 8)
            plot_curves(cfg.out_dir)  # curves.png: every loss, the LR and the grad norm so far (log.jsonl)
        stop = control.stop_requested()  # a signal on any rank: every rank saves, then exits
        if step % cfg.ckpt_every == 0 or step == end or stop:
            state = run_state(cfg, step, scaler, world, data=get_batch)  # collective: every rank takes part
            if master:
                payload = {
                    "model": model.state_dict(), "ema": ema.state_dict(), "loss_state": loss_fn.state_dict(),
                    "optimizer": opt.state_dict(), "optimizer_d": opt_d.state_dict() if opt_d else None,
                    "tokenizer_config": asdict(tcfg),
                    "text_encoder": text_encoder.state_dict() if cfg.text_encoder in TEXT_PRESETS else None,
                }  # fmt: skip
                control.save(step, {**payload, **state})
        control.exit_if_stopped(step, master)
    control.finish(progress, master)  # "done: checkpoint ...", closes the logs, leaves the process group


# -----------------------------------------------------------------------------
# Presets: the paper's six tokenizers (official training configs: RunConfig's defaults) and small ones.
PRESETS = {name: TrainConfig(tokenizer=name) for name in
           ["tatitok_bl32_vq", "tatitok_bl64_vq", "tatitok_bl128_vq",
            "tatitok_bl32_vae", "tatitok_bl64_vae", "tatitok_sl128_vae"]}  # fmt: skip
PRESETS["tiny"] = TrainConfig(
    tokenizer="tiny", text_encoder="tiny", batch_size=4, max_steps=20, warmup_steps=2, lr=3e-3, loss="tiny",
    disc_start=10, out_dir="runs/tiny_tokenizer", dtype="fp32", compile=False, log_every=5, sample_every=20,
    ckpt_every=10, num_workers=0)  # fmt: skip
# The shapes world on 2 CPU cores (README): L2 and quantizer (or KL) losses only (the GAN
# never switches on: in so short a run it costs more than it sharpens). beta2 = 0.99: with
# 0.999 the second moments remember the huge first-step gradients for ~1k steps, which
# stalls a run this short.
_SHAPES = dict(
    text_encoder="shapes", batch_size=16, max_steps=16_000, warmup_steps=200, lr=2e-3, end_lr=2e-4, beta2=0.99,
    loss="shapes", disc_start=16_000, dtype="fp32", compile=False, log_every=200, sample_every=2000,
    ckpt_every=2000, num_workers=0)  # fmt: skip
# VQ: longer, on a relation-heavy mix of scenes, compiled, and with 30% of the captions dropped
# (drop_captions): then MaskGen-VQ's tokens, too, carry each object's shape.
PRESETS["shapes"] = TrainConfig(
    tokenizer="shapes", out_dir="runs/shapes_tokenizer",
    **{**_SHAPES, "max_steps": 28_000, "disc_start": 28_000, "shapes_mix": "0.2,0.3,0.5", "caption_drop": 0.3,
       "compile": True})  # fmt: skip
PRESETS["shapes_kl"] = TrainConfig(tokenizer="shapes_kl", out_dir="runs/shapes_tokenizer_kl", **_SHAPES)

if __name__ == "__main__":
    main()

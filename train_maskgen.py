"""
Train MaskGen (paper §3.3, §4.2, App. A, Tab. 8) on the tokens of a frozen TA-TiTok,
conditioned on a frozen CLIP text encoder and an aesthetic score.

    python train_maskgen.py --config=tiny_vq --tokenizer=runs/tiny_tokenizer
    torchrun --nproc_per_node=8 train_maskgen.py --config=maskgen_vq_l_stage1 \
        --tokenizer=tokenizer_tatitok_bl128_vq --data='pretokenized:tokens/{00000..00999}.tar'

The tokenizer is an official release directory or one of our train_tokenizer.py runs;
the text encoder comes with it (CLIP ViT-L-14-336 for official releases). Images are
encoded on the fly, or read as tokens written once by `python data.py pretokenize`
(much faster: the tokenizer's encoder costs as much as MaskGen itself).

Per micro-step: tokens + captions -> CLIP penultimate states and pooled embedding ->
caption dropout (10%: the "" encoding, for classifier-free guidance) -> MaskGen's loss
(VQ: masked cross-entropy; KL: masked diffusion loss). What train_tokenizer.py shares
(command line, processes, schedule, EMA, exact resume, logging) is train_common.py;
main()'s loop shows each step's maths.
"""

import copy
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import checkpoint
import maskgen as M
from checkpoint import content_digest, load_checked
from shapes import SHAPES_AESTHETIC
from train_common import (
    adamw, ema_update, find_resume, image_batches, lr_at, one_of, option, parse_config, plot_curves, Progress,
    restore_run_state, resume_positions, Rule, run_state, RunConfig, RunControl, save_grid, seed_everything,
    seed_for_slot, setup_run, within,
)  # fmt: skip


@dataclass
class TrainConfig(RunConfig):  # RunConfig: optimisation, numerics, device, seed, intervals, trackers
    maskgen: str = option("maskgen_vq_l", "a maskgen.PRESETS name (sizes; tokens follow the tokenizer)")
    tokenizer: str = option("", "official release dir, or a train_tokenizer.py run dir / checkpoint (required)")
    data: str = option("shapes", "shapes | a tar-shard pattern | an image folder (all encoded on the fly) | "
                                 "pretokenized:PATTERN (written by data.py pretokenize)")  # fmt: skip
    caption_drop: float = option(0.1, "fraction of samples trained on the empty caption (CFG's null condition)")
    recaption_prob: float = option(0.95, "use the recaption (if a sample has one) with this probability")
    aesthetic_default: float = option(6.5, "the aesthetic score of a sample that carries none")
    scale_factor: float = option(-1.0, "KL: token scale; -1: the init's, an official tokenizer's preset, or 1/std")
    schedule: str = option("cosine", "cosine | constant (after the warm-up)")
    init_from: str = option("", "fine-tune (stage 2): start from these weights (EMA if any): a release dir or Hub "
                                "id, a run or ckpt file; the preset must build its model")  # fmt: skip
    sample_prompts: str = option("", '"|"-separated prompts of the sample grids; empty = a fixed shapes-world set')
    out_dir: str = option("runs/maskgen", "checkpoints, log.jsonl, config.json, sample grids")


# The allowed values of this trainer's own fields (train_common.COMMON_RULES has the shared ones).
RULES = {
    "maskgen": one_of(M.PRESETS), "schedule": one_of(("cosine", "constant")),
    "caption_drop": within(0, 1), "recaption_prob": within(0, 1),
    "aesthetic_default": Rule(math.isfinite, "it must be a finite number (aesthetic scores are about 0..10)"),
    "scale_factor": Rule(lambda v: v == -1 or v > 0, "it must be > 0, or -1 (chosen by the run)"),
}  # fmt: skip


def token_batches(cfg, tokenizer, rank, world, start_step, device, resume=None):
    """Returns get(step, k) -> (tokens, captions, aesthetic (B,)) for micro-step k. VQ tokens are
    ids (B, K); KL tokens the posterior's cat(mean, logvar) (B, K, 2C), from which MaskGen draws
    a fresh sample each time. Streams keep get.positions and restart from resume= (as
    train_common.image_batches)."""
    B, tcfg, mode = cfg.batch_size, tokenizer.config, tokenizer.config.quantize_mode
    if cfg.data.startswith("pretokenized:"):
        start = start_step * cfg.grad_accum
        # Samples that do not fit this tokenizer (token count, codebook or width) are skipped and counted.
        fit = dict(codebook_size=tcfg.codebook_size) if mode == "vq" else dict(token_size=tcfg.token_size)
        ds = data.PretokenizedDataset(cfg.data.split(":", 1)[1], rank=rank, world_size=world, seed=cfg.seed,
                                      start_batch=start, batch_size=B, num_tokens=tcfg.num_latent_tokens, **fit)
        positions = resume_positions(resume, rank, cfg, start, ds)  # checked against ds's shards; given to ds
        loader = torch.utils.data.DataLoader(ds, batch_size=B, num_workers=cfg.num_workers, collate_fn=data.collate)
        stream = iter(loader)

        def get(step, k):
            b = next(stream)
            positions.consumed(b)  # where this batch's reader now stands, for the checkpoint
            aes = torch.tensor([cfg.aesthetic_default if a is None or math.isnan(a) else a for a in b["aesthetic"]])
            captions = data.pick_captions(b["caption"], b["recaption"], cfg.recaption_prob)  # 95% recaption
            return b["tokens" if mode == "vq" else "posterior"].to(device), captions, aes.to(device)

        get.positions, get.skipped = positions, ds.skipped
        return get

    get_images = image_batches(cfg, tokenizer.config.image_size, rank, world, start_step, cfg.recaption_prob, resume)
    aes_const = SHAPES_AESTHETIC if cfg.data == "shapes" else cfg.aesthetic_default

    def get(step, k):
        images, captions = get_images(step, k)
        with torch.no_grad():
            out = tokenizer.encode(images.to(device), return_posterior=mode == "kl")
        tokens = out if mode == "vq" else torch.cat([out.mean, out.logvar], dim=-1)  # (B, K, 2C)
        return tokens, captions, torch.full((len(captions),), aes_const, device=device)

    get.positions = getattr(get_images, "positions", None)  # shards / folders; the shapes world has none
    get.skipped = getattr(get_images, "skipped", None)  # corrupt / filtered samples, by reason
    return get


DEFAULT_PROMPTS = [
    "a red circle", "two blue squares", "a green triangle to the left of a yellow circle", "three purple circles",
    "a cyan square above a red triangle", "a yellow square", "a blue circle below a green square", "two red triangles"]


def main(argv=None):
    cfg = parse_config(TrainConfig, PRESETS, argv, default="tiny_vq", rules=RULES)  # no arguments: --help
    if not cfg.tokenizer:
        sys.exit("error: --tokenizer is required: an official TA-TiTok directory or a train_tokenizer.py run")
    # ---- frozen tokenizer and text encoder, loaded (on the CPU) before the run folder is made
    try:
        tokenizer, text_encoder = checkpoint.load_tokenizer(cfg.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    # ---- pretokenized shards pair with the tokenizer by content: ids written by other weights would
    # train without an error, and mean nothing to this decoder. Each folder's meta.json records its digest.
    tok_digest, unrecorded = content_digest(tokenizer.state_dict()), []  # sha256 of the weights
    try:
        paths = data.list_shards(cfg.data.split(":", 1)[1]) if cfg.data.startswith("pretokenized:") else []
        for folder in sorted({os.path.dirname(p) or "." for p in paths}):
            meta = data.read_pretokenized_meta(folder) or {}
            wrote, source = meta.get("tokenizer_digest"), meta.get("tokenizer")
            if wrote is None:
                unrecorded.append(folder)
            elif wrote != tok_digest:
                sys.exit(f"error: the tokens in {folder} were written by tokenizer {source} (weights "
                         f"{str(wrote)[:16]}), not by --tokenizer={cfg.tokenizer} (weights {tok_digest[:16]}); pass "
                         f"--tokenizer={source}, or pretokenize again with this tokenizer: python data.py "
                         f"pretokenize --tokenizer {cfg.tokenizer} --data ... --out NEW_FOLDER")  # fmt: skip
    except (ValueError, FileNotFoundError) as e:  # no shards there, a meta.json that does not parse
        sys.exit(f"error: --data={cfg.data}: {e}")
    rank, world, device, autocast, scaler, log = setup_run(cfg)  # DDP, precision, rank-0 logger
    if unrecorded:
        log(text=f"warning: no tokenizer digest recorded in {', '.join(unrecorded)} (meta.json of data.py "
                 f"pretokenize); the tokens are not checked against --tokenizer={cfg.tokenizer}")
    master = rank == 0
    tokenizer, text_encoder = tokenizer.to(device), text_encoder.to(device)
    tcfg = tokenizer.requires_grad_(False).config

    # ---- the MaskGen config: sizes from the preset, tokens from the tokenizer, text widths from CLIP
    mcfg = M.preset_for(cfg.maskgen, tcfg, text_encoder.width, text_encoder.embed_dim)
    if mcfg.mode != tcfg.quantize_mode:
        sys.exit(f"error: --maskgen={cfg.maskgen} is a {mcfg.mode.upper()} model but the tokenizer is "
                 f"{tcfg.quantize_mode.upper()}; pick a maskgen_{tcfg.quantize_mode}_* preset")  # fmt: skip

    # ---- resume or start. The frozen inputs are pinned by content: a resume on other weights
    # (same path, new files) would go on with other tokens.
    inputs = {"tokenizer": tok_digest, "text_encoder": content_digest(text_encoder.state_dict())}
    path, ckpt = find_resume(cfg, log, inputs)  # refuses a checkpoint trained on other inputs
    init = None
    if ckpt is not None:
        mcfg = M.MaskGenConfig(**ckpt["maskgen_config"])  # includes the scale factor chosen at the start
    elif cfg.init_from:  # a fine-tune: the init's weights and config (KL: its scale factor), a fresh optimizer
        presets = {n: M.preset_for(n, tcfg, text_encoder.width, text_encoder.embed_dim) for n in M.PRESETS}
        try:
            init, src = checkpoint.init_weights(cfg.init_from, "generator", mcfg, presets, "--maskgen",
                                                (tcfg, cfg.tokenizer))  # fmt: skip
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: --init_from={cfg.init_from}: {e}")
        mcfg = src.config
    elif mcfg.mode == "kl" and cfg.scale_factor < 0 and not checkpoint.is_release(cfg.tokenizer):
        # Our own tokenizer: tokens scaled to unit variance (as LDM), on global batch slot 0 (alike on every rank).
        tokens, _, _ = token_batches(cfg, tokenizer, 0, 1, 0, device)(0, 0)
        mean, logvar = tokens.chunk(2, dim=-1)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        sample = mean + torch.exp(0.5 * logvar) * noise if mcfg.kl_tokens == "sample" else mean
        mcfg.scale_factor = float(1.0 / sample.std())  # of what the model will be trained on
    elif cfg.scale_factor > 0:
        mcfg.scale_factor = cfg.scale_factor

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = M.build(mcfg).to(device)
    if init is not None:  # step 0 of a run of its own: this run's schedule, warm-up and EMA from the init
        load_checked(model, init, src.where)
        log(text=f"initialised from {src.where}")
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # eval: no code revival, no dropout
    opt = adamw(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    step = 0
    if ckpt is not None:
        load_checked(model, ckpt["model"], path)  # names every key that does not fit
        load_checked(ema, ckpt["ema"], path)
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # parameters grouped otherwise than this model's
            sys.exit(f"error: the optimizer state in {path} does not fit this model ({e}); its weights load, so "
                     f"start a new run from them with --init_from={path} in a new --out_dir")
        step = restore_run_state(ckpt, scaler, rank, world)
        log(text=f"resumed from {path} at step {step}")
    control = RunControl(cfg, world, log, last_ckpt=path)  # non-finite steps, SIGTERM / SIGINT
    # MFU counts MaskGen's own FLOPs (3x its forward per sample), not the frozen tokenizer's and CLIP's.
    train_flops = model.train_flops(text_encoder.context_length)
    n = sum(p.numel() for p in model.parameters())
    log(text=f"MaskGen-{mcfg.mode.upper()} ({cfg.maskgen}): {n / 1e6:.1f}M parameters, {mcfg.num_tokens} tokens, "
             f"{train_flops / 1e9:.2f} GFLOP per sample per step, {world} process(es) on {device}")  # rank 0 logs

    model.trunk.grad_checkpointing = cfg.grad_checkpointing  # recompute each joint block in backward
    fwd_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        fwd_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None)

    null = text_encoder([""])  # the CFG null condition: the encoding of the empty caption, computed once
    get_batch = token_batches(cfg, tokenizer, rank, world, step, device, resume=ckpt)  # ckpt: reader positions
    # The shapes world has a finite set of captions: encode each once (TextEncoder.cached).
    encode_text = text_encoder.cached if cfg.data == "shapes" else text_encoder
    prompts = cfg.sample_prompts.split("|") if cfg.sample_prompts else DEFAULT_PROMPTS
    prompt_feats = text_encoder(prompts) if master else None  # for the sample grids
    progress = Progress(cfg, step, world, device, train_flops, enabled=master)  # the bar, img/s, MFU
    end = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)  # --stop_at ends a run early, with a checkpoint
    while step < end:
        # ---- the learning rate of this step: linear warm-up, then cosine or constant
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule, cfg.end_lr)
        for g in opt.param_groups:
            g["lr"] = lr

        # ---- gradients, with gradient accumulation
        model.train()
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            seed_for_slot(cfg.seed, step, rank * cfg.grad_accum + k)
            tokens, captions, aes = get_batch(step, k)
            feats = encode_text(captions)
            # Caption dropout: the model learns p(x | "") too, which CFG needs at sampling.
            drop = torch.rand(len(captions), device=device) < cfg.caption_drop  # (B,)
            text = torch.where(drop[:, None, None], null.penultimate, feats.penultimate)  # (B, L, Dt)
            pooled = torch.where(drop[:, None], null.pooled, feats.pooled)  # (B, Dp)
            if world > 1:  # only the last micro-step all-reduces gradients across ranks
                fwd_model.require_backward_grad_sync = k == cfg.grad_accum - 1
            with autocast():
                loss = fwd_model(tokens, text, pooled, aes) / cfg.grad_accum
            scaler.scale(loss).backward()  # fp16: the loss times the loss scale, so small grads survive
            loss_sum += loss.detach()  # a tensor: no host sync until logging

        # ---- the optimiser step. unscale_ divides fp16 gradients by the loss scale, so the clip
        # sees their true size; the norm is of the all-reduced gradients, so every rank decides
        # alike. A non-finite norm (nan/inf loss or gradient) skips the update and the EMA's;
        # reading it is the step's one host sync.
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        ok = bool(torch.isfinite(grad_norm))
        if ok:
            scaler.step(opt)  # opt.step(), unless fp16 found an inf
        scaler.update()  # the next loss scale (fp16)
        opt.zero_grad(set_to_none=True)
        if ok:  # EMA: ema.lerp_(model, 1 - decay)
            ema_update(ema, model, step, cfg.ema_decay)
        control.count_skipped(ok, step)  # too many non-finite steps in a row stop the run
        step += 1
        progress.update()

        if master and (step % cfg.log_every == 0 or step == end):
            rec = {"step": step, "loss": float(loss_sum), "lr": lr, "grad_norm": float(grad_norm), **progress.read()}
            rec["skipped_nonfinite"] = control.skipped  # steps skipped so far (non-finite grad norm)
            line = " | ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "step")
            if get_batch.skipped is not None:  # streams: bad / filtered samples so far, by reason
                rec["skipped"] = get_batch.skipped.counts()
                line += f" | skipped {get_batch.skipped.summary()}"
            log(rec, f"step {step:7d} | {line}")
        if master and (step % cfg.sample_every == 0 or step == end):
            with torch.no_grad():
                f, gen = prompt_feats, torch.Generator(device=device).manual_seed(cfg.seed)
                toks = ema.generate(f.penultimate, f.pooled, null.penultimate, null.pooled, generator=gen)
                images = tokenizer.decode(toks, f.final)
            save_grid(images, os.path.join(cfg.out_dir, f"samples_{step:08d}.png"), nrow=len(prompts))
            plot_curves(cfg.out_dir)  # curves.png: every loss, the LR and the grad norm so far (log.jsonl)
        stop = control.stop_requested()  # a signal on any rank: every rank saves, then exits
        if step % cfg.ckpt_every == 0 or step == end or stop:
            state = run_state(cfg, step, scaler, world, data=get_batch)  # collective: every rank takes part
            if master:
                payload = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                           "maskgen_config": asdict(mcfg), "inputs": inputs}  # fmt: skip
                control.save(step, {**payload, **state})
        control.exit_if_stopped(step, master)
    control.finish(progress, master)  # "done: checkpoint ...", closes the logs, leaves the process group


# -----------------------------------------------------------------------------
# Presets: the paper's two stages for L/XL, VQ/KL (official configs), and tiny ones.
# Tab. 8 / official: VQ AdamW (0.9, 0.96) wd 0.03 lr 4e-4 cosine; KL (0.9, 0.95) wd 0.02 lr 1e-4 constant.
_VQ = dict(lr=4e-4, beta2=0.96, weight_decay=0.03, schedule="cosine", warmup_steps=10_000, batch_size=128)
_KL = dict(lr=1e-4, beta2=0.95, weight_decay=0.02, schedule="constant", warmup_steps=50_000, batch_size=32)
PRESETS = {}
for size in ("l", "xl"):
    PRESETS[f"maskgen_vq_{size}_stage1"] = TrainConfig(maskgen=f"maskgen_vq_{size}", max_steps=500_000, **_VQ)
    PRESETS[f"maskgen_vq_{size}_stage2"] = TrainConfig(
        maskgen=f"maskgen_vq_{size}", max_steps=250_000, **{**_VQ, "lr": 1e-4})  # fmt: skip
    PRESETS[f"maskgen_kl_{size}_stage1"] = TrainConfig(maskgen=f"maskgen_kl_{size}", max_steps=1_000_000, **_KL)
    PRESETS[f"maskgen_kl_{size}_stage2"] = TrainConfig(maskgen=f"maskgen_kl_{size}", max_steps=500_000, **_KL)
_TINY = dict(batch_size=8, max_steps=20, warmup_steps=2, lr=1e-3, beta2=0.96, weight_decay=0.03, dtype="fp32",
             compile=False, log_every=5, sample_every=20, ckpt_every=10, num_workers=0)  # fmt: skip
PRESETS["tiny_vq"] = TrainConfig(maskgen="tiny_vq", out_dir="runs/tiny_maskgen_vq", **_TINY)
PRESETS["tiny_kl"] = TrainConfig(maskgen="tiny_kl", out_dir="runs/tiny_maskgen_kl", schedule="constant", **_TINY)
# The shapes world on 2 CPU cores, on top of train_tokenizer.py --config=shapes(_kl): run
# lengths that keep each pipeline, tokenizer then MaskGen, within about an hour (README).
_SHAPES = dict(batch_size=64, warmup_steps=300, lr=1e-3, end_lr=1e-5, schedule="cosine",
               beta2=0.96, weight_decay=0.03, ema_decay=0.998, dtype="fp32", compile=False, log_every=100,
               sample_every=1000, ckpt_every=500, num_workers=0)  # fmt: skip
PRESETS["shapes_vq"] = TrainConfig(maskgen="shapes_vq", tokenizer="runs/shapes_tokenizer",
                                   out_dir="runs/shapes_maskgen_vq", max_steps=12500, **_SHAPES)  # fmt: skip
# KL: a step costs ~2x a VQ step (DiffLoss on 2 noise levels per token: 0.51 vs 0.24 GFLOP per sample): a shorter run.
PRESETS["shapes_kl"] = TrainConfig(
    maskgen="shapes_kl", tokenizer="runs/shapes_tokenizer_kl", out_dir="runs/shapes_maskgen_kl",
    **{**_SHAPES, "max_steps": 10400, "warmup_steps": 150, "sample_every": 1300, "ckpt_every": 650})  # fmt: skip

if __name__ == "__main__":
    main()

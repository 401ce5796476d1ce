"""Throughput, MFU and memory of TA-TiTok and MaskGen on this machine.

    python bench.py --preset tiny                                # seconds: a smoke run
    python bench.py --preset shapes                              # the CPU table in README.md
    python bench.py --preset l --compile 0,1 --dtype fp32,bf16   # MaskGen-L on a GPU
    python bench.py --data-resume 8000                           # resuming a shard stream, early vs late
    python bench.py --preset l --grad-ckpt --batch 2             # the memory --grad_checkpointing saves (CPU)

For each (compile, dtype) pair, on random weights and inputs of the real shapes, VQ and KL: TA-TiTok encode and
decode; MaskGen generate() with guidance at the preset's defaults; a MaskGen and a tokenizer (G + D) training step.
Each figure is the median of --repeats CUDA-synchronised runs after --warmup. MFU = model FLOP/s (TATiTok.flops,
MaskGen.flops) / peak FLOP/s: a known GPU's bf16 dense figure (train_common.PEAK_BF16_TFLOPS, or --peak_tflops),
else the torch.matmul peak measured in the same run and dtype. Memory: the CUDA peak per row, or the CPU's peak RSS.

--data-resume N writes N shapes samples as tar shards (once, under /tmp) and times a resumed stream's
first batch at a small and a large batch index, with the reader positions a checkpoint saves (seek,
re-read one shuffle block) and by replaying the stream; both must give the uninterrupted stream's batch.
"""

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

import data
import losses
import maskgen as M
import shards
import tokenizer as T
import train_common

# Which models a preset times: tokenizers (VQ, KL), MaskGens (VQ, KL), text (length,
# width of the per-token states, pooled width), and the batch size of every row.
PRESETS = {
    "tiny": dict(tok=("tiny", "tiny_kl"), gen=("tiny_vq", "tiny_kl"), text=(16, 32, 32), batch=4, loss="tiny"),
    "shapes": dict(tok=("shapes", "shapes_kl"), gen=("shapes_vq", "shapes_kl"), text=(16, 64, 64), batch=32,
                   loss="shapes"),
    # The paper's pairs, L and XL: MaskGen-VQ on 128 VQ tokens, MaskGen-KL on 32 KL tokens; CLIP-L/14 text.
    **{size: dict(tok=("tatitok_bl128_vq", "tatitok_bl32_vae"), gen=(f"maskgen_vq_{size}", f"maskgen_kl_{size}"),
                  text=(77, 768, 768), batch=32, loss="paper_resnet50") for size in ("l", "xl")},
}


def timed(fn, device, warmup, repeats, pick=statistics.median):
    """Seconds of one call, the median (or `pick`) of the repeats after warm-up (which absorbs compilation)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(warmup + repeats):
        t = time.perf_counter()
        fn()
        sync()  # the GPU's work is done, not only queued
        times.append(time.perf_counter() - t)
    return pick(times[warmup:])  # the warm-up runs are not counted


def matmul_peak(device, dtype, warmup=1, repeats=3):
    """FLOP/s of a large square torch.matmul, the best of many (robust to a busy machine): the attainable peak."""
    n = 4096 if device.type == "cuda" else 1024  # CPU: 1024 keeps a slow (non-native) bf16 under a minute
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, warmup, max(repeats, 10), pick=min)


def rows(p, device, dtype, compile_, args):
    """Yield (name, batch, seconds per call, steps per call, FLOPs per call, CUDA peak bytes)."""
    B, (L, Dt, Dp) = p["batch"], p["text"]  # batch; text length, per-token and pooled widths
    g = torch.Generator(device=device).manual_seed(0)  # the inputs' and the samplers' draws

    def run(name, fn, flops, steps=1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with train_common.autocast(device, dtype):  # bf16: autocast
            t = timed(fn, device, args.warmup, args.repeats)
        return name, B, t, steps, flops, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    for mode, tok_name, gen_name in zip(("VQ", "KL"), p["tok"], p["gen"]):
        torch.manual_seed(0)
        tc = T.PRESETS[tok_name]
        tok = T.TATiTok(tc).to(device).eval()  # random weights: the same cost as trained ones
        images = torch.rand(B, 3, tc.image_size, tc.image_size, device=device, generator=g)  # (B, 3, H, W)
        tok_text = torch.randn(B, tc.text_context_length, tc.text_embed_dim, device=device, generator=g)  # (B, L, D)
        f = tok.flops()  # per image: {"encode": ..., "decode": ...}
        encode, decode = (torch.compile(fn) if compile_ else fn for fn in (tok.encode, tok.decode))
        with torch.no_grad():
            tokens = tok.encode(images)  # VQ (B, K) ids | KL (B, K, C)
            yield run(f"TA-TiTok-{mode} encode", lambda: encode(images), B * f["encode"])
            yield run(f"TA-TiTok-{mode} decode", lambda: decode(tokens, tok_text), B * f["decode"])
        mc = M.preset_for(gen_name, tc, Dt, Dp)
        model = M.build(mc).to(device).eval()
        text, pooled = torch.randn(B, L, Dt, device=device), torch.randn(B, Dp, device=device)  # CLIP's stand-in
        null_text, null_pooled = torch.randn(1, L, Dt, device=device), torch.randn(1, Dp, device=device)  # CFG's null
        # KL: every MaskGen step runs DiffLoss's reverse diffusion on the tokens it unmasks.
        diff = f" x {model.diffloss.gen_diffusion.num_timesteps} diff." if mode == "KL" else ""
        with torch.no_grad():
            yield run(f"MaskGen-{mode} generate, CFG ({mc.num_steps} steps{diff})",
                      lambda: model.generate(text, pooled, null_text, null_pooled, generator=g, compile=compile_),
                      B * model.generate_flops(L, batch=B), mc.num_steps)
        # Training steps: fresh models in train mode, AdamW, gradient clipping.
        train = M.build(mc).to(device).train()
        opt = torch.optim.AdamW(train.parameters(), lr=1e-5, fused=device.type == "cuda")  # fused, as in training
        fwd = torch.compile(train) if compile_ else train
        # VQ: the code ids (B, K); KL: posterior parameters (B, K, 2C) = cat(mean, logvar).
        train_tokens = tokens if mode == "VQ" else torch.randn(B, mc.num_tokens, 2 * mc.token_size, device=device)

        def maskgen_step():  # forward, backward, clipping, AdamW
            fwd(train_tokens, text, pooled).backward()
            torch.nn.utils.clip_grad_norm_(train.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        yield run(f"MaskGen-{mode} train step", maskgen_step, B * train.train_flops(L))
        del model, train, opt, fwd
        tok.train()
        # The GAN on from the first step; random perceptual-network weights cost the same.
        lcfg = dataclasses.replace(losses.PRESETS[p["loss"]], discriminator_start=0, perceptual_pretrained=False)
        loss_fn = losses.TokenizerLoss(lcfg).to(device)  # reconstruction, perceptual and GAN losses
        opt_g = torch.optim.AdamW(tok.parameters(), lr=1e-5, fused=device.type == "cuda")
        opt_d = torch.optim.AdamW(loss_fn.discriminator.parameters(), lr=1e-5, fused=device.type == "cuda")
        fwd_tok = torch.compile(tok.before_compile()) if compile_ else tok  # VQ code revival stays eager

        def tokenizer_step():  # the generator's update, then the discriminator's
            recon, extras = fwd_tok(images, tok_text)
            loss_fn.generator_loss(images, recon, extras, step=1)[0].backward()
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            loss_fn.discriminator_loss(images, recon.detach(), step=1)[0].backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        # FLOPs: the tokenizer's 3x forward only (the loss networks are extra work), as in training.
        yield run(f"TA-TiTok-{mode} train step (G + D)", tokenizer_step, B * 3 * (f["encode"] + f["decode"]))
        del tok, loss_fn, opt_g, opt_d, fwd_tok


def grad_ckpt_memory(p):
    """Print what gradient checkpointing saves in a training forward + backward of the preset's MaskGen-VQ and
    TA-TiTok-VQ on CPU: the peak memory above the weights and their gradients, with and without, as the running sum
    of torch.profiler's allocation and free events (profile_memory=True)."""
    B, (L, Dt, Dp), tc = p["batch"], p["text"], T.PRESETS[p["tok"][0]]
    mc, S = M.preset_for(p["gen"][0], tc, Dt, Dp), tc.image_size
    print(f"bench.py --grad-ckpt: CPU, batch {B}; peak memory above weights and gradients (torch.profiler's events)")
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's log: no "GPU not found" error line
    for name, build, loss in [  # each model on random inputs (TA-TiTok: an L2 loss only)
            (f"MaskGen-VQ {p['gen'][0]}", lambda: M.build(mc), lambda m: m(
                torch.randint(mc.codebook_size, (B, mc.num_tokens)), torch.randn(B, L, Dt), torch.randn(B, Dp))),
            (f"TA-TiTok-VQ {p['tok'][0]}", lambda: T.TATiTok(tc), lambda m: m(
                torch.rand(B, 3, S, S), torch.randn(B, tc.text_context_length, tc.text_embed_dim))[0].pow(2).mean())]:
        model, peak = build().train(), {}
        vits = [model.trunk] if hasattr(model, "trunk") else [model.encoder, model.decoder]  # the block stacks
        for w in model.parameters():
            w.grad = torch.zeros_like(w)  # gradient buffers first: backward accumulates into them
        for on in (False, True):
            for vit in vits:
                vit.grad_checkpointing = on
            torch.manual_seed(0)  # the same inputs (and MaskGen masks) in both runs
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                loss(model).backward()
            # Its "[memory]" events, allocations (+ bytes) and frees (-), in time order: the peak of their running sum.
            mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.nbytes())
            peak[on] = torch.tensor([0] + [b for _, b in mem]).cumsum(0).max().item() / 2**20  # MiB
        print(f"{name} ({' + '.join(str(len(v.blocks)) for v in vits)} blocks): peak activation memory with / without "
              f"checkpointing {peak[True]:,.1f} / {peak[False]:,.1f} MiB, saved {1 - peak[True] / peak[False]:.1%}")
        del model


def data_resume(n, batch=32):
    """Print the resume cost of a shard stream (see the module docstring)."""
    root = os.path.join(tempfile.gettempdir(), f"bench_shapes_shards_{n}")
    if not os.path.isdir(root):
        data.make_shapes_shards(root, n=n, per_shard=500)

    def first_batch(start, positions):
        t = time.perf_counter()
        ds = data.TarShardDataset(root, image_size=64, seed=0, batch_size=batch, start_batch=start, positions=positions)
        out = next(iter(DataLoader(ds, batch_size=batch)))
        return time.perf_counter() - t, out["key"]

    # One uninterrupted pass, noting the reader positions after a small and a large batch index
    # (the large one ~90% through the first pass, so that replaying it is a fair comparison).
    points = (10, n * 9 // 10 // batch)
    loader = DataLoader(data.TarShardDataset(root, image_size=64, seed=0, batch_size=batch), batch_size=batch)
    tracker, saved = shards.StreamPositions(0, 0), {}  # the reader positions a checkpoint would save
    for b, out in zip(range(max(points) + 1), loader):
        if b in points:
            saved[b] = (tracker.state()["positions"].clone(), out["key"])  # where batch b starts; its keys
        tracker.consumed(out)
    print(f"bench.py --data-resume {n}: batch {batch}, one reader, CPU {torch.get_num_threads()} threads")
    for b, (positions, keys) in saved.items():
        (t_seek, k_seek), (t_replay, k_replay) = first_batch(b, positions), first_batch(b, None)
        print(f"resume at batch {b:5d} ({b * batch:6d} samples in): saved positions {t_seek * 1e3:8.1f} ms, "
              f"replaying {t_replay * 1e3:8.1f} ms, same batch as uninterrupted: {k_seek == keys == k_replay}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shapes", choices=sorted(PRESETS),
                    help="model sizes: tiny (seconds), shapes (the README's CPU table), l / xl (the paper's)")
    ap.add_argument("--device", default="auto", help="auto = the GPU if there is one, else the CPU")
    ap.add_argument("--compile", default="0", help="comma list of 0/1, e.g. 0,1 for eager and compiled")
    ap.add_argument("--dtype", default="fp32", help="comma list of fp32/bf16 (bf16 = autocast)")
    ap.add_argument("--batch", type=int, default=0, help="batch size of every row (0: the preset's)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed ones")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs; each figure is their median")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak for MFU (0: table or measured)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--peak-only", action="store_true", help="print the torch.matmul peak of each --dtype and exit")
    ap.add_argument("--data-resume", type=int, default=0, metavar="N",
                    help="instead of the models: time resuming a stream of N shapes samples in tar shards")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="instead of the timings: the memory --grad_checkpointing saves (CPU)")
    args = ap.parse_args(argv)
    if args.data_resume and args.data_resume < 1000:
        ap.error(f"--data-resume needs at least 1000 samples (a large and a small resume point), "
                 f"got {args.data_resume}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_resume:  # the shard stream instead of the models
        return data_resume(args.data_resume)
    compiles, dtypes = args.compile.split(","), args.dtype.split(",")
    if not set(compiles) <= {"0", "1"}:
        ap.error(f"--compile takes 0 and/or 1 (eager, compiled), got {args.compile}")
    if args.warmup < 0 or args.repeats < 1:
        ap.error(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    if not set(dtypes) <= {"fp32", "bf16"}:
        ap.error(f"--dtype takes fp32 and/or bf16, got {args.dtype}")
    device = train_common.pick_device(args.device, mps=False)
    train_common.allow_tf32()  # as in training
    p = dict(PRESETS[args.preset], batch=args.batch or PRESETS[args.preset]["batch"])  # --batch applied
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.grad_ckpt:
        return grad_ckpt_memory(p)
    print(f"bench.py --preset {args.preset}: {name}, torch {torch.__version__}, batch {p['batch']}, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    if args.peak_only:  # which dtype is fast here? (CPUs of the same kind differ by 50x in bf16)
        for dtype in dtypes:  # 1 warm-up, best of 10
            print(f"{dtype}: torch.matmul peak {matmul_peak(device, train_common.DTYPES[dtype]) / 1e9:.1f} GFLOP/s")
        return
    for dtype in dtypes:
        peak = train_common.peak_flops(device, args.peak_tflops)
        source = "table/override" if peak else "measured torch.matmul"
        peak = peak or matmul_peak(device, train_common.DTYPES[dtype], args.warmup, args.repeats)
        for compile_ in (c == "1" for c in compiles):
            print(f"\n## {dtype}, {['eager', 'torch.compile'][compile_]}; peak {peak / 1e12:.3g} TFLOP/s ({source})")
            print(f"{'':50s} {'img/s':>9s} {'ms/step':>9s} {'GFLOP/img':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem':>9s}")
            for row, B, t, steps, flops, mem in rows(p, device, dtype, compile_, args):
                mem_s = f"{mem / 2**20:.0f} MiB" if mem is not None else "-"  # CUDA peak of this row
                print(f"{row:50s} {B / t:9.1f} {1e3 * t / steps:9.2f} {flops / B / 1e9:10.3f} "
                      f"{flops / t / 1e12:8.3f} {flops / t / peak:6.1%} {mem_s:>9s}", flush=True)
    if device.type == "cpu":  # ru_maxrss is in KiB on Linux
        print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # e.g. a --device this machine does not have
        sys.exit(f"bench.py: error: {e}")

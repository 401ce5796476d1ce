"""Throughput, MFU and memory of TA-TiTok and MaskGen on this machine.

    python bench.py --preset tiny                            # seconds: a smoke run
    python bench.py --preset shapes                          # the CPU table in README.md
    python bench.py --preset l --compile 0,1 --dtype fp32,bf16   # MaskGen-L on a GPU
    python bench.py --data-resume 8000                       # resuming a shard stream, early vs late

For every (compile, dtype) pair it times, on random weights and random inputs of the
real shapes (no downloads; the text features stand in for CLIP's):
  - TA-TiTok encode and decode (VQ and KL tokenizers), img/s;
  - MaskGen generate() with classifier-free guidance at the preset's defaults (the
    paper's L/XL: VQ 16 steps; KL 32 steps with 100 DiffLoss steps), img/s, ms/step;
  - a MaskGen training step (forward, backward, AdamW) and a tokenizer training step
    (generator and discriminator updates), img/s.
Each figure is the median of --repeats timed runs after --warmup untimed ones, with
CUDA synchronisation. MFU = model FLOP/s (counted analytically: TATiTok.flops,
MaskGen.flops) / peak FLOP/s. The peak is the bf16 dense figure of a known GPU
(train_common.PEAK_BF16_TFLOPS, as in training; --peak_tflops overrides), else the
torch.matmul peak measured here, in the same run and dtype. Memory is the CUDA peak
per row; on CPU the process's peak RSS.

--data-resume N writes N shapes samples as tar shards (once, under /tmp) and times how
long a resumed stream takes to its first batch, at a small and at a large batch index:
with the reader positions a checkpoint saves (seek + re-read one shuffle block) and
without them (replaying the stream, what older checkpoints do). Both must give the batch
the uninterrupted stream gave.
"""

import argparse
import copy
import resource
import statistics
import sys
import time

import torch

import losses
import maskgen as M
import train_common
import tokenizer as T

# Which models a preset times: tokenizers (VQ, KL), MaskGens (VQ, KL), text (length,
# width of the per-token states, pooled width), and the batch size of every row.
PRESETS = {
    "tiny": dict(tok=("tiny", "tiny_kl"), gen=("tiny_vq", "tiny_kl"), text=(16, 32, 32), batch=4, loss="tiny"),
    "shapes": dict(tok=("shapes", "shapes_kl"), gen=("shapes_vq", "shapes_kl"), text=(16, 64, 64), batch=32,
                   loss="shapes"),
    # The paper's pairs: MaskGen-VQ on 128 VQ tokens, MaskGen-KL on 32 KL tokens; CLIP-L/14 text.
    "l": dict(tok=("tatitok_bl128_vq", "tatitok_bl32_vae"), gen=("maskgen_vq_l", "maskgen_kl_l"),
              text=(77, 768, 768), batch=32, loss="paper_resnet50"),
    "xl": dict(tok=("tatitok_bl128_vq", "tatitok_bl32_vae"), gen=("maskgen_vq_xl", "maskgen_kl_xl"),
               text=(77, 768, 768), batch=32, loss="paper_resnet50"),
}  # fmt: skip


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats):
    """Median seconds of one call, after warm-up (which also absorbs compilation)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(device, dtype, warmup, repeats):
    """FLOP/s of a large square torch.matmul, best of the repeats: the attainable peak."""
    n = 4096 if device.type == "cuda" else 1024  # CPU: 1024 keeps a slow (non-native) bf16 under a minute
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(warmup):
        a @ b
    best = float("inf")
    for _ in range(max(repeats, 10)):  # best of many: robust to a busy machine
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def rows(p, device, dtype, compile_, args):
    """Yield (name, batch, seconds per call, steps per call, FLOPs per call, CUDA peak bytes)."""
    amp = train_common.autocast(device, dtype)  # bf16: autocast
    B, (L, Dt, Dp) = p["batch"], p["text"]
    g = torch.Generator(device=device).manual_seed(0)

    def run(name, fn, flops, steps=1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with amp:
            t = timed(fn, device, args.warmup, args.repeats)
        mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return name, B, t, steps, flops, mem

    for mode, tok_name, gen_name in zip(("VQ", "KL"), p["tok"], p["gen"]):
        torch.manual_seed(0)
        tc = T.PRESETS[tok_name]
        tok = T.TATiTok(tc).to(device).eval()
        images = torch.rand(B, 3, tc.image_size, tc.image_size, device=device, generator=g)
        tok_text = torch.randn(B, tc.text_context_length, tc.text_embed_dim, device=device, generator=g)
        f = tok.flops()
        encode = torch.compile(tok.encode) if compile_ else tok.encode
        decode = torch.compile(tok.decode) if compile_ else tok.decode
        with torch.no_grad():
            tokens = tok.encode(images)
            yield run(f"TA-TiTok-{mode} encode", lambda: encode(images), B * f["encode"])
            yield run(f"TA-TiTok-{mode} decode", lambda: decode(tokens, tok_text), B * f["decode"])

        mc = M.preset_for(gen_name, tc, Dt, Dp)
        model = M.build(mc).to(device).eval()
        text, pooled = torch.randn(B, L, Dt, device=device), torch.randn(B, Dp, device=device)
        null_text, null_pooled = torch.randn(1, L, Dt, device=device), torch.randn(1, Dp, device=device)
        steps = mc.num_steps
        label = f"{steps} steps" + (f" x {model.diffloss.gen_diffusion.num_timesteps} diff." if mode == "KL" else "")
        with torch.no_grad():
            yield run(f"MaskGen-{mode} generate, CFG ({label})",
                      lambda: model.generate(text, pooled, null_text, null_pooled, generator=g, compile=compile_),
                      B * model.generate_flops(L, batch=B), steps)  # fmt: skip

        # Training steps: fresh models in train mode, AdamW, gradient clipping.
        train = M.build(mc).to(device).train()
        opt = torch.optim.AdamW(train.parameters(), lr=1e-5, fused=device.type == "cuda")
        fwd = torch.compile(train) if compile_ else train
        train_tokens = tokens if mode == "VQ" else torch.randn(B, mc.num_tokens, 2 * mc.token_size, device=device)

        def maskgen_step():
            loss = fwd(train_tokens, text, pooled)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        yield run(f"MaskGen-{mode} train step", maskgen_step, B * train.train_flops(L))
        del model, train, opt, fwd

        tok.train()
        lcfg = copy.deepcopy(losses.PRESETS[p["loss"]])
        lcfg.discriminator_start, lcfg.perceptual_pretrained = 0, False  # the GAN on; random weights, same cost
        loss_fn = losses.TokenizerLoss(lcfg).to(device)
        opt_g = torch.optim.AdamW(tok.parameters(), lr=1e-5, fused=device.type == "cuda")
        opt_d = torch.optim.AdamW(loss_fn.discriminator.parameters(), lr=1e-5, fused=device.type == "cuda")
        fwd_tok = torch.compile(tok.before_compile()) if compile_ else tok

        def tokenizer_step():
            recon, extras = fwd_tok(images, tok_text)
            loss, _ = loss_fn.generator_loss(images, recon, extras, step=1)
            loss.backward()
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            d_loss, _ = loss_fn.discriminator_loss(images, recon.detach(), step=1)
            d_loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

        # FLOPs: the tokenizer's 3x forward only (the loss networks are extra work), as in training.
        yield run(f"TA-TiTok-{mode} train step (G + D)", tokenizer_step, B * 3 * (f["encode"] + f["decode"]))
        del tok, loss_fn, opt_g, opt_d, fwd_tok


def data_resume(n, batch=32, threads=0):
    """Print the resume cost of a shard stream (see the module docstring)."""
    import os
    import tempfile

    from torch.utils.data import DataLoader

    import data
    import shards

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
    stream = iter(DataLoader(data.TarShardDataset(root, image_size=64, seed=0, batch_size=batch), batch_size=batch))
    tracker, saved = shards.StreamPositions(0, 0), {}
    for b in range(max(points) + 1):
        out = next(stream)
        if b in points:
            saved[b] = (tracker.state()["positions"].clone(), out["key"])
        tracker.consumed(out)
    print(f"bench.py --data-resume {n}: batch {batch}, one reader, CPU {torch.get_num_threads()} threads")
    for b in points:
        positions, keys = saved[b]
        t_seek, k_seek = first_batch(b, positions)
        t_replay, k_replay = first_batch(b, None)
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
    args = ap.parse_args(argv)
    if args.data_resume:
        if args.data_resume < 1000:
            ap.error(f"--data-resume needs at least 1000 samples (a large and a small resume point), got {args.data_resume}")
        if args.threads:
            torch.set_num_threads(args.threads)
        return data_resume(args.data_resume)
    if not set(args.compile.split(",")) <= {"0", "1"}:
        ap.error(f"--compile takes 0 and/or 1 (eager, compiled), got {args.compile}")
    if args.warmup < 0 or args.repeats < 1:
        ap.error(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    device = train_common.pick_device(args.device, mps=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_common.allow_tf32()  # as in training
    p = dict(PRESETS[args.preset])
    p["batch"] = args.batch or p["batch"]
    compiles = [c == "1" for c in args.compile.split(",")]
    dtypes = args.dtype.split(",")
    if not set(dtypes) <= {"fp32", "bf16"}:
        ap.error(f"--dtype takes fp32 and/or bf16, got {args.dtype}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench.py --preset {args.preset}: {name}, torch {torch.__version__}, batch {p['batch']}, "
          f"median of {args.repeats} after {args.warmup} warm-up")  # fmt: skip
    if args.peak_only:  # which dtype is fast here? (CPUs of the same kind differ by 50x in bf16)
        for dtype in dtypes:
            print(f"{dtype}: torch.matmul peak {matmul_peak(device, train_common.DTYPES[dtype], 1, 3) / 1e9:.1f} GFLOP/s")
        return
    for dtype in dtypes:
        peak = train_common.peak_flops(device, args.peak_tflops)
        source = "table/override"
        if peak is None:
            peak = matmul_peak(device, train_common.DTYPES[dtype], args.warmup, args.repeats)
            source = "measured torch.matmul"
        for compile_ in compiles:
            print(f"\n## {dtype}, {'torch.compile' if compile_ else 'eager'}; peak {peak / 1e12:.3g} TFLOP/s ({source})")
            print(f"{'':50s} {'img/s':>9s} {'ms/step':>9s} {'GFLOP/img':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem':>9s}")
            for row, B, t, steps, flops, mem in rows(p, device, dtype, compile_, args):
                mem_s = f"{mem / 2**20:.0f} MiB" if mem is not None else "-"
                print(f"{row:50s} {B / t:9.1f} {1e3 * t / steps:9.2f} {flops / B / 1e9:10.3f} "
                      f"{flops / t / 1e12:8.3f} {flops / t / peak:6.1%} {mem_s:>9s}", flush=True)  # fmt: skip
    if device.type == "cpu":  # ru_maxrss is in KiB on Linux
        print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # e.g. a --device this machine does not have
        sys.exit(f"bench.py: error: {e}")

"""Gradient checkpointing (--grad_checkpointing): TA-TiTok's encoder / decoder blocks and MaskGen's joint blocks
recompute their activations in backward, and the gradients stay bit-identical on CPU (the recomputation runs the
same kernels on the same inputs); under torch.compile too (up to compile's own rounding); and a trainer run with
it equals one without, weights and losses."""

import dataclasses
import glob
import json

import pytest
import torch
import torch.utils.checkpoint

import maskgen as M
import tokenizer as T
import train_maskgen
import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def counting(module, monkeypatch):
    """Patch module.checkpoint (torch.utils.checkpoint's function, as maskgen.py imports it) to count its calls (the
    checkpointed blocks): returns the counter."""
    calls, real = [], module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def tokenizer_grads(model, on):
    """Parameter gradients of one training loss (reconstruction + quantizer / KL term), fixed inputs and draws."""
    model.encoder.grad_checkpointing = model.decoder.grad_checkpointing = on
    c, g = model.config, torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, c.image_size, c.image_size, generator=g)  # (B, 3, H, W)
    text = torch.randn(2, c.text_context_length, c.text_embed_dim, generator=g)  # (B, L, D)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the KL posterior sample
    recon, extras = model(images, text)
    extra = extras["quantizer_loss"] if "quantizer_loss" in extras else extras["posterior"].kl().mean() * 1e-6
    ((recon - images).pow(2).mean() + extra).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny", "tiny_kl"])
def test_tokenizer_gradients_are_identical(name, monkeypatch):
    torch.manual_seed(0)
    model = T.TATiTok(T.PRESETS[name]).train()
    plain = tokenizer_grads(model, False)
    calls = counting(torch.utils.checkpoint, monkeypatch)  # tokenizer.py calls it by its full name
    ckpt = tokenizer_grads(model, True)
    assert len(calls) == model.config.enc_depth + model.config.dec_depth  # every block was checkpointed
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    assert all(torch.equal(plain[n], ckpt[n]) for n in plain)
    with torch.no_grad():  # inference never checkpoints
        model.eval().decode(model.encode(torch.rand(1, 3, 32, 32)), torch.randn(1, 16, 32))
    assert len(calls) == model.config.enc_depth + model.config.dec_depth


def maskgen_grads(model, on):
    model.trunk.grad_checkpointing = on
    c, g = model.config, torch.Generator().manual_seed(0)
    text, pooled = torch.randn(2, 7, c.text_width, generator=g), torch.randn(2, c.pooled_dim, generator=g)
    if c.mode == "vq":
        tokens = torch.randint(0, c.codebook_size, (2, c.num_tokens), generator=g)  # (B, K) ids
    else:
        tokens = torch.randn(2, c.num_tokens, 2 * c.token_size, generator=g)  # (B, K, 2C) posterior parameters
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the masks, posterior samples and diffusion noise
    model(tokens, text, pooled).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny_vq", "tiny_kl"])
def test_maskgen_gradients_are_identical(name, monkeypatch):
    torch.manual_seed(0)
    model = M.build(M.PRESETS[name]).train()
    plain = maskgen_grads(model, False)
    calls = counting(M, monkeypatch)
    ckpt = maskgen_grads(model, True)
    assert len(calls) == model.config.depth
    assert plain.keys() == ckpt.keys() and len(plain) > 0.9 * len(list(model.parameters()))
    assert all(torch.equal(plain[n], ckpt[n]) for n in plain)


def test_checkpointing_under_torch_compile():
    """Dynamo traces torch.utils.checkpoint as one higher-order op: the compiled module trains with it, and saves
    memory with it (one 6-block encoder here, to keep the test fast). aot_eager (graph capture, AOTAutograd's joint graph,
    eager kernels) stands in for inductor; its gradients equal eager's up to the float reordering its graph may make.
    Memory as bench.py --grad-ckpt measures it: the peak of torch.profiler's allocation events in a step."""
    torch.manual_seed(0)
    enc = T.TATiTok(dataclasses.replace(T.PRESETS["tiny"], enc_depth=6)).encoder.train()
    images, lat = torch.rand(8, 3, 32, 32), torch.randn(8, 32)  # (B, 3, H, W), (K, W)
    grads, peaks = [], []
    for on in (False, True):  # eager without checkpointing, then compiled with it
        enc.grad_checkpointing = on
        torch._dynamo.reset()
        fwd = torch.compile(enc, backend="aot_eager", fullgraph=True) if on else enc
        fwd(images, lat).pow(2).mean().backward()  # compiles; allocates the gradient buffers
        enc.zero_grad(set_to_none=False)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fwd(images, lat).pow(2).mean().backward()
        mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.nbytes())
        peaks.append(torch.tensor([0] + [b for _, b in mem]).cumsum(0).max().item())
        grads.append([p.grad.clone() for p in enc.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
    assert peaks[1] < 0.75 * peaks[0], peaks


def final(out):
    ckpt = torch.load(sorted(glob.glob(f"{out}/ckpt_*.pt"))[-1], weights_only=True)
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    return ckpt["model"], [(r["step"], r.get("total", r.get("loss"))) for r in logs if "step" in r]


def test_trainers_with_checkpointing_equal_the_runs_without(tmp_path):
    common = ["--max_steps=3", "--ckpt_every=3", "--sample_every=100", "--log_every=1"]
    runs = {}
    for on in ("false", "true"):
        tok = tmp_path / f"tok_{on}"
        train_tokenizer.main([f"--out_dir={tok}", "--config=tiny", "--disc_start=1", f"--grad_checkpointing={on}",
                              *common])  # fmt: skip
        mg = tmp_path / f"mg_{on}"
        train_maskgen.main([f"--out_dir={mg}", "--config=tiny_vq", f"--tokenizer={tmp_path / 'tok_false'}",
                            f"--grad_checkpointing={on}", *common])  # fmt: skip
        runs[on] = final(tok), final(mg)
    for (weights, losses), (weights_ckpt, losses_ckpt) in zip(runs["false"], runs["true"]):
        assert len(losses) == 3 and losses == losses_ckpt
        assert weights.keys() == weights_ckpt.keys() and all(torch.equal(weights[k], weights_ckpt[k]) for k in weights)

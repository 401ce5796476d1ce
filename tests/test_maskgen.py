"""MaskGen on the tiny presets: shapes, losses, weight tying, generate(), torch.compile,
initialisation. (Official-checkpoint round trips are in test_checkpoint.py.)"""

import dataclasses
import math
import types

import pytest
import torch

from maskgen import (
    PRESETS,
    MaskGenConfig,
    MaskGenKL,
    MaskGenVQ,
    aesthetic_embedding_kl,
    aesthetic_embedding_vq,
    build,
    vq_mask_schedule,
)

B, L = 3, 7  # batch, text length


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def text_inputs(cfg, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, L, cfg.text_width, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    null_text = torch.randn(1, L, cfg.text_width, generator=g)
    null_pooled = torch.randn(1, cfg.pooled_dim, generator=g)
    return text, pooled, null_text, null_pooled


def make(name, seed=0):
    torch.manual_seed(seed)
    return build(PRESETS[name]).eval()


@pytest.fixture(scope="module")
def vq():
    return make("tiny_vq")


@pytest.fixture(scope="module")
def kl():
    return make("tiny_kl")


# ---------------------------------------------------------------------------- shapes


def test_dispatch_and_shapes_vq(vq):
    c = vq.config
    assert isinstance(vq, MaskGenVQ)
    text, pooled, _, _ = text_inputs(c)
    txt, cond = vq.trunk.encode_condition(text, pooled, 6.0)
    assert txt.shape == (B, L, c.width) and cond.shape == (B, c.width)
    ids = torch.randint(0, c.codebook_size, (B, c.num_tokens))
    assert vq.logits(ids, text, pooled).shape == (B, c.num_tokens, c.codebook_size)
    assert vq.tok_emb.num_embeddings == c.codebook_size + 1 + c.num_class_rows + 1
    vq.train()
    loss = vq(ids, text, pooled, torch.full((B,), 5.0))
    vq.eval()
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_dispatch_and_shapes_kl(kl):
    c = kl.config
    assert isinstance(kl, MaskGenKL)
    text, pooled, _, _ = text_inputs(c)
    txt, cond = kl.trunk.encode_condition(text, pooled, torch.tensor([4.0, 5.0, 6.0]))
    x = torch.randn(B, c.num_tokens, c.token_size)
    mask = torch.zeros(B, c.num_tokens)
    mask[:, ::2] = 1
    assert kl.token_conditions(x, mask, txt, cond).shape == (B, c.num_tokens, c.width)
    posterior = torch.randn(B, c.num_tokens, 2 * c.token_size)  # cat(mean, logvar)
    loss = kl(posterior, text, pooled, 6.0)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_aesthetic_embedding_variants():
    s = torch.tensor([650.0, 3.0])
    vq, kl = aesthetic_embedding_vq(s, 8), aesthetic_embedding_kl(s, 8)
    # VQ: [sin | cos] halves, first frequency 1; KL: interleaved, first frequency 1.
    assert torch.allclose(vq[:, 0], torch.sin(s)) and torch.allclose(vq[:, 4], torch.cos(s))
    assert torch.allclose(kl[:, 0], torch.sin(s)) and torch.allclose(kl[:, 1], torch.cos(s))
    assert torch.allclose(vq[:, 1], torch.sin(s * math.exp(-math.log(1000) / 4)))
    assert torch.allclose(kl[:, 2], torch.sin(s * 10000 ** (-2 / 8)))


def test_tied_head_shares_storage(vq):
    head, table = vq.head_weight, vq.tok_emb.weight
    assert head.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
    assert head.shape == (vq.config.codebook_size, vq.config.width)
    assert not any("lm_head" in k for k in vq.state_dict())  # one tensor, not two


def test_vq_mask_schedule():
    counts = vq_mask_schedule(128, 16)
    assert counts[-1] == 1 and all(a > b for a, b in zip(counts[:-2], counts[1:-1]))
    # arccos: few tokens are decoded in the first steps, many in the last ones
    assert counts[0] == math.floor(128 * math.acos(1 / 16) / (math.pi / 2)) == 122


# ---------------------------------------------------------------------------- training


def overfit(model, batch, steps=50, lr=3e-3):
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert all(math.isfinite(x) for x in losses)
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def test_vq_loss_falls_on_one_batch():
    model = make("tiny_vq", seed=1)
    c = model.config
    text, pooled, _, _ = text_inputs(c, batch=4)
    tokens = torch.randint(0, c.codebook_size, (4, c.num_tokens), generator=torch.Generator().manual_seed(0))
    first, last = overfit(model, (tokens, text, pooled, 6.0))
    assert last < 0.4 * first, (first, last)


def test_kl_loss_falls_on_one_batch():
    model = make("tiny_kl", seed=1)
    c = model.config
    text, pooled, _, _ = text_inputs(c, batch=4)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, c.num_tokens, c.token_size, generator=g)
    posterior = torch.cat([mean, torch.full_like(mean, -8.0)], dim=-1)  # nearly deterministic tokens
    first, last = overfit(model, (posterior, text, pooled, 6.0), steps=60)
    assert last < 0.5 * first, (first, last)


# ---------------------------------------------------------------------------- generate


def test_vq_generate_valid_and_reproducible(vq):
    c = vq.config
    text, pooled, nt, npool = text_inputs(c)
    run = lambda seed: vq.generate(text, pooled, nt, npool, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, other = run(0), run(0), run(1)
    assert a.shape == (B, c.num_tokens) and a.dtype == torch.long
    assert (a != vq.mask_id).all() and a.min() >= 0 and a.max() < c.codebook_size
    assert torch.equal(a, b) and not torch.equal(a, other)
    # deterministic decoding needs no generator
    d1 = vq.generate(text, pooled, nt, npool, randomize_temperature=0.0)
    assert torch.equal(d1, vq.generate(text, pooled, nt, npool, randomize_temperature=0.0))


def test_aesthetic_score_changes_output(vq, kl):
    for model in (vq, kl):
        text, pooled, nt, npool = text_inputs(model.config)

        def run(aes):
            return model.generate(text, pooled, nt, npool, aesthetic=aes, generator=torch.Generator().manual_seed(0))

        assert torch.equal(run(6.0), run(torch.full((B,), 6.0)))
        assert not torch.equal(run(2.0), run(9.0)), type(model).__name__
        # per-sample scores: only the changed sample's condition changes
        _, c1 = model.trunk.encode_condition(text, pooled, torch.tensor([2.0, 5.0, 8.0]))
        _, c2 = model.trunk.encode_condition(text, pooled, torch.tensor([2.0, 5.0, 9.0]))
        assert torch.equal(c1[:2], c2[:2]) and not torch.equal(c1[2], c2[2])


@pytest.mark.parametrize("name", ["tiny_vq", "tiny_kl"])
def test_guidance_one_skips_unconditional_pass(name, vq, kl):
    model = vq if name == "tiny_vq" else kl
    text, pooled, nt, npool = text_inputs(model.config)
    seen = []
    hook = model.trunk.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    try:
        model.generate(text, pooled, guidance_scale=1.0, num_steps=3)  # no null condition needed
        assert seen and set(seen) == {B}
        seen.clear()
        model.generate(text, pooled, nt, npool, guidance_scale=3.0, num_steps=3)
        assert seen and set(seen) == {2 * B}
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="null_text"):
        model.generate(text, pooled, guidance_scale=3.0)


def test_kl_generate_shape_and_reproducible(kl):
    c = kl.config
    text, pooled, nt, npool = text_inputs(c)
    run = lambda seed: kl.generate(text, pooled, nt, npool, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a = run(0)
    assert a.shape == (B, c.num_tokens, c.token_size) and torch.isfinite(a).all()
    assert torch.equal(a, run(0)) and not torch.equal(a, run(1))

    # The static plan draws every token exactly once, also with more steps than tokens
    # (then some steps draw nothing).
    drawn, sample = [], kl.diffloss.sample

    def counting_sample(z, **kw):
        drawn.append(z.shape[0])
        return sample(z, **kw)

    kl.diffloss.sample = counting_sample
    try:
        for steps in (1, 3, 2 * c.num_tokens):
            drawn.clear()
            out = kl.generate(text, pooled, guidance_scale=1.0, num_steps=steps)
            assert sum(drawn) == B * c.num_tokens and torch.isfinite(out).all()
    finally:
        del kl.diffloss.sample



def per_image_vs_separate(model, guidance_scale, batch=4, seed=0):
    """generate() of `batch` captions with one generator per image, and the same images
    drawn one call each with identically seeded generators."""
    text, pooled, nt, npool = text_inputs(model.config, seed=seed, batch=batch)
    aes = torch.linspace(4.0, 7.0, batch)
    seeds = [10 * seed + b for b in range(batch)]
    kw = dict(guidance_scale=guidance_scale, num_steps=3)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batched = model.generate(text, pooled, nt, npool, aesthetic=aes, generator=gens, **kw)
    one = [model.generate(text[b : b + 1], pooled[b : b + 1], nt, npool, aesthetic=aes[b].item(),
                          generator=torch.Generator().manual_seed(seeds[b]), **kw) for b in range(batch)]  # fmt: skip
    return batched, torch.cat(one)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_vq_one_generator_per_image_equals_separate_calls(vq, guidance_scale):
    # Image b's Gumbel draws (ids and confidences) come from generator b alone: the batch
    # gives exactly the ids of B single-image calls (and the seeds do matter).
    for seed in range(3):
        batched, separate = per_image_vs_separate(vq, guidance_scale, seed=seed)
        assert torch.equal(batched, separate)
    gens = [torch.Generator().manual_seed(s) for s in (0, 0, 1)]
    text, pooled, nt, npool = text_inputs(vq.config)
    same_text = text[:1].expand(B, -1, -1), pooled[:1].expand(B, -1)
    ids = vq.generate(*same_text, nt, npool, guidance_scale=guidance_scale, generator=gens)
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_kl_one_generator_per_image_equals_separate_calls(kl, guidance_scale):
    # KL: the order and every DiffLoss noise draw of image b come from generator b. The
    # draws are identical, so only matmul rounding (batch of B vs 1) separates the two:
    # in float64 the tokens agree to 1e-9 (measured: bit-identical); in float32 to a
    # relative 2e-5 of the tokens' magnitude (measured: <= 3e-6; random weights make
    # tokens of ~1e5, and 100 diffusion steps amplify rounding). Different draws would
    # differ by O(1) of the magnitude.
    batched, separate = per_image_vs_separate(kl, guidance_scale)
    scale = separate.abs().max()
    assert (batched - separate).abs().max() <= 2e-5 * scale
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        kl64 = make("tiny_kl").double()
        batched, separate = per_image_vs_separate(kl64, guidance_scale)
    finally:
        torch.set_default_dtype(default)
    assert batched.dtype == torch.float64
    assert torch.allclose(batched, separate, rtol=1e-9, atol=1e-9 * separate.abs().max().item())
    assert not torch.allclose(batched[0], batched[1], rtol=1e-3)  # different seeds: different tokens


def test_generator_list_is_checked(vq, kl):
    text, pooled, nt, npool = text_inputs(vq.config)
    for model in (vq, kl):
        t, p, _, _ = text_inputs(model.config)
        with pytest.raises(ValueError, match=rf"got 2 generators for {B} images; pass one torch.Generator per image"):
            model.generate(t, p, guidance_scale=1.0, generator=[torch.Generator(), torch.Generator()])
        cuda_generator = types.SimpleNamespace(device=torch.device("cuda"))  # stands in for one
        with pytest.raises(ValueError, match=r"generator\[1\] is on cuda but the inputs are on cpu"):
            model.generate(t, p, guidance_scale=1.0, generator=[torch.Generator(), cuda_generator, torch.Generator()])
        with pytest.raises(ValueError, match=r"generator\[0\] is a int, not a torch.Generator"):
            model.generate(t, p, guidance_scale=1.0, generator=[0, 1, 2])

def test_kl_training_rows_stay_aligned(kl):
    # Row r of DiffLoss's (target, z, mask) must be one token of one sample, the same
    # token in all three, repeated diffusion_batch_mul times.
    c, seen = kl.config, {}
    text, pooled, _, _ = text_inputs(c)
    means = torch.randn(B, c.num_tokens, c.token_size)
    conditions, diffloss_forward = kl.token_conditions, kl.diffloss.forward

    def record_conditions(x, mask, txt, cond):
        seen["x"], seen["mask"] = x, mask
        seen["z"] = conditions(x, mask, txt, cond)
        return seen["z"]

    def record_loss(target, z, mask):
        seen["rows"] = (target, z, mask)
        return diffloss_forward(target, z, mask)

    kl.token_conditions, kl.diffloss.forward = record_conditions, record_loss
    try:
        kl(means, text, pooled)  # (B, K, C): the tokens themselves, no posterior sample
    finally:
        del kl.token_conditions, kl.diffloss.forward
    target, z, mask = seen["rows"]
    m = c.diffusion_batch_mul
    assert torch.equal(seen["x"], means * c.scale_factor)
    assert torch.equal(target.view(m, B, c.num_tokens, -1), seen["x"].expand(m, -1, -1, -1))
    assert torch.equal(z.view(m, B, c.num_tokens, -1), seen["z"].expand(m, -1, -1, -1))
    assert torch.equal(mask.view(m, B, c.num_tokens), seen["mask"].expand(m, -1, -1))
    assert (seen["mask"].sum(1) == seen["mask"][0].sum()).all() and seen["mask"].sum() >= B  # one rate per batch


def test_kl_generate_under_torch_compile(kl):
    # fullgraph=True: no graph breaks, so no host syncs or data-dependent shapes in the
    # loop. aot_eager keeps the test cheap (no C++ codegen) and reproduces eager RNG.
    text, pooled, nt, npool = text_inputs(kl.config, batch=2)
    torch._dynamo.reset()
    compiled = torch.compile(kl.generate, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    out = compiled(text, pooled, nt, npool, num_steps=2)
    torch.manual_seed(5)
    assert torch.equal(out, kl.generate(text, pooled, nt, npool, num_steps=2))


def test_bad_inputs_are_explained(vq, kl):
    text, pooled, _, _ = text_inputs(vq.config)
    with pytest.raises(ValueError, match="penultimate"):
        vq.logits(torch.zeros(B, 16, dtype=torch.long), text[..., :5], pooled)
    with pytest.raises(ValueError, match="LongTensor"):
        vq(torch.zeros(B, 16), text, pooled)
    with pytest.raises(ValueError, match="one score per sample"):
        vq.trunk.encode_condition(text, pooled, torch.ones(B + 1))
    with pytest.raises(ValueError, match="cat\\(mean, logvar\\)"):
        kl(torch.zeros(B, 8, 5), text, pooled)
    cuda_generator = types.SimpleNamespace(device=torch.device("cuda"))  # stands in for one
    with pytest.raises(ValueError, match="Generator"):
        vq.generate(text, pooled, guidance_scale=1.0, generator=cuda_generator)
    with pytest.raises(TypeError, match="MaskGenConfig"):
        build("tiny_vq")
    with pytest.raises(ValueError, match="divisible"):
        MaskGenConfig(width=60, heads=8)


def test_kl_init_treats_each_fused_projection_as_its_own_linear():
    # Xavier bound for a separate (D, D) projection, as the official init: sqrt(6 / 2D), not sqrt(6 / 4D).
    torch.manual_seed(0)
    model = MaskGenKL(MaskGenConfig(mode="kl", width=256, heads=4, depth=2, text_width=32, pooled_dim=32,
                                   diffloss_depth=1, diffloss_width=64, guidance_schedule="linear"))
    D = model.config.width
    bound = math.sqrt(6 / (2 * D))
    for w in model.trunk.blocks[0].attn.img_qkv.weight.chunk(3):
        assert 0.95 * bound < w.abs().max() <= bound


def test_kl_pos_init_std_sets_the_position_tables_and_mask_token():
    # Official init: std 0.02. pos_init_std (the shapes preset's 1.0) scales exactly the three
    # tables that mark positions and [MASK], and nothing else.
    kw = dict(mode="kl", width=256, heads=4, depth=1, num_tokens=64, text_width=32, pooled_dim=32, diffloss_depth=1,
              diffloss_width=64, guidance_schedule="linear")  # fmt: skip
    torch.manual_seed(0)
    official_init = MaskGenKL(MaskGenConfig(**kw))
    torch.manual_seed(0)
    wide = MaskGenKL(MaskGenConfig(pos_init_std=1.0, **kw))
    for name in ("pos_emb", "diff_pos_emb", "mask_token"):
        assert getattr(official_init, name).std().item() == pytest.approx(0.02, rel=0.1)
        assert getattr(wide, name).std().item() == pytest.approx(1.0, rel=0.1)
    assert torch.equal(official_init.z_proj.weight, wide.z_proj.weight)  # the rest is untouched
    assert MaskGenConfig().pos_init_std == 0.02 and PRESETS["maskgen_kl_l"].pos_init_std == 0.02


@pytest.mark.parametrize("name", ["vq", "kl"])
def test_prompt_only_work_runs_once_per_generate(name, vq, kl):
    # Text projections and every adaLN modulation depend only on the prompt: generate()
    # computes them once (both CFG halves in one batch), and the precomputed modulations
    # give exactly the per-step result.
    model = vq if name == "vq" else kl
    text, pooled, nt, npool = text_inputs(model.config)
    txt, cond = model.trunk.encode_condition(text, pooled)
    img = torch.randn(B, model.config.num_tokens, model.config.width)
    with torch.no_grad():
        assert torch.equal(model.trunk(img, txt, cond), model.trunk(img, txt, cond, model.trunk.modulations(cond)))
    calls = []
    hooks = [m.register_forward_hook(lambda *a, key=key: calls.append(key)) for key, m in [
        ("text", model.trunk.text_proj), ("pooled", model.trunk.pooled_proj),
        ("adaln0", model.trunk.blocks[0].img_adaln.linear), ("adaln_last", model.trunk.blocks[-1].txt_adaln.linear),
        ("final", model.trunk.norm_out.linear),
    ]]  # fmt: skip
    try:
        model.generate(text, pooled, nt, npool, num_steps=4)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(calls) == sorted(["text", "pooled", "adaln0", "adaln_last", "final"])


@pytest.mark.parametrize("name", ["vq", "kl"])
def test_compiled_sampling_never_recompiles(name):
    # generate(compile=...) compiles the step functions once; later steps (and later calls
    # with the same batch) must reuse the graph. aot_eager: no C++ codegen, cheap.
    model = make(f"tiny_{name}", seed=1)
    text, pooled, nt, npool = text_inputs(model.config, batch=2)
    torch.manual_seed(3)
    eager = model.generate(text, pooled, nt, npool)
    torch._dynamo.reset()
    compile = {"backend": "aot_eager"}
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.manual_seed(3)
            out = model.generate(text, pooled, nt, npool, compile=compile)
            model.generate(text, pooled, nt, npool, compile=compile)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(out.float(), eager.float(), atol=1e-5)
    # Compiled functions are kept beside the model, never assigned over its methods; the
    # weights and state_dict keys are untouched.
    assert len(model.compiled_steps) == (1 if name == "vq" else 2)
    assert "predict" not in vars(model) and "token_conditions" not in vars(model)
    assert name == "vq" or "denoise" not in vars(model.diffloss.net)
    assert all(k.startswith("trunk.") or not k.startswith(("blocks.", "text_proj.")) for k in model.state_dict())


def test_sampling_numbers_are_checked(vq, kl):
    text, pooled, nt, npool = text_inputs(vq.config)
    for kw, message in [
        (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number >= 0, got nan"),
        (dict(guidance_scale=-1.0), r"guidance_scale must be a finite number >= 0, got -1.0"),
        (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
        (dict(randomize_temperature=float("inf")), r"randomize_temperature must be a finite number >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            vq.generate(text, pooled, nt, npool, **kw)
    t, p, knt, knp = text_inputs(kl.config)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0, got -1.0"):
        kl.generate(t, p, knt, knp, temperature=-1.0)
    assert torch.isfinite(kl.generate(t, p, knt, knp, temperature=0.0, num_steps=2)).all()  # KL: no noise is fine


@pytest.mark.parametrize("kl_tokens", ["sample", "mean"])
def test_kl_tokens_picks_the_posterior_sample_or_its_mean(kl, kl_tokens):
    # Given cat(mean, logvar), "sample" (official) trains on mean + std * noise, a fresh draw
    # each call; "mean" trains on the mean itself, whatever the logvar.
    model = MaskGenKL(dataclasses.replace(kl.config, kl_tokens=kl_tokens))
    c, seen = model.config, []
    text, pooled, _, _ = text_inputs(c)
    mean = torch.randn(B, c.num_tokens, c.token_size)
    logvar = torch.zeros_like(mean)  # std 1: a sample is far from the mean
    conditions = model.token_conditions
    model.token_conditions = lambda x, *a: seen.append(x) or conditions(x, *a)
    for _ in range(2):
        model(torch.cat([mean, logvar], dim=-1), text, pooled)
    if kl_tokens == "mean":
        assert all(torch.equal(x, mean * c.scale_factor) for x in seen)
    else:
        assert not torch.allclose(seen[0], mean * c.scale_factor, atol=0.1)
        assert not torch.equal(seen[0], seen[1])  # a fresh draw each time
        assert (seen[0] / c.scale_factor - mean).std().item() == pytest.approx(1.0, rel=0.2)
    assert MaskGenConfig().kl_tokens == "sample" and PRESETS["maskgen_kl_l"].kl_tokens == "sample"
    with pytest.raises(ValueError, match="kl_tokens"):
        MaskGenConfig(kl_tokens="mode")

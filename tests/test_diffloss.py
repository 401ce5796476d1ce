"""Tests for diffloss.py on tiny sizes (a few seconds on CPU)."""

import math

import pytest
import torch

import diffloss as D

C, ZC, DEPTH, WIDTH = 4, 8, 2, 32


def make(num_sampling_steps="100", seed=0, randomise=True, clip_x0=0.0):
    torch.manual_seed(seed)
    dl = D.DiffLoss(C, ZC, DEPTH, WIDTH, num_sampling_steps, clip_x0=clip_x0)
    if randomise:
        # The zero-inits make the net output 0, which would hide most bugs; keep the output
        # small (O(0.1)) so samples stay in a sane range.
        with torch.no_grad():
            for name, p in dl.net.named_parameters():
                p.normal_(0, 0.02 if name.startswith("final_layer.linear") else 0.2)
    return dl


# ---- the net ---------------------------------------------------------------------------------

def test_state_dict_keys_match_official_layout():
    # These are the `diffloss.*` keys of the released MaskGen-KL checkpoints (depth shortened).
    block = ["in_ln.weight", "in_ln.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
             "mlp.2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]
    want = {f"net.{k}.{p}" for k in ("time_embed.mlp.0", "time_embed.mlp.2", "cond_embed",
                                     "input_proj", "final_layer.linear",
                                     "final_layer.adaLN_modulation.1") for p in ("weight", "bias")}
    want |= {f"net.res_blocks.{i}.{k}" for i in range(DEPTH) for k in block}
    dl = make(randomise=False)
    assert set(dl.state_dict()) == want  # the schedules are not in the state_dict
    sd = dl.state_dict()
    assert sd["net.time_embed.mlp.0.weight"].shape == (WIDTH, 256)
    assert sd["net.res_blocks.0.adaLN_modulation.1.weight"].shape == (3 * WIDTH, WIDTH)
    assert sd["net.final_layer.adaLN_modulation.1.weight"].shape == (2 * WIDTH, WIDTH)
    assert sd["net.final_layer.linear.weight"].shape == (2 * C, WIDTH)
    assert sd["net.cond_embed.weight"].shape == (WIDTH, ZC)


def test_zero_init_outputs_zero():
    dl = make(randomise=False)
    out = dl.net(torch.randn(5, C), torch.randint(0, 1000, (5,)), torch.randn(5, ZC))
    assert out.shape == (5, 2 * C) and torch.count_nonzero(out) == 0


def test_timestep_embedding_is_cos_then_sin():
    emb = D.TimestepEmbedder(WIDTH).sinusoids(torch.tensor([0, 7]))
    assert emb.shape == (2, 256)
    assert torch.allclose(emb[0, :128], torch.ones(128)) and torch.allclose(emb[0, 128:], torch.zeros(128))
    # frequency i is 10000^(-i/128): index 0 has period 2*pi, the last is ~1/10000
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(7.0)))
    assert torch.allclose(emb[1, 128 + 64], torch.sin(torch.tensor(7.0 * 10000 ** (-64 / 128))))


# ---- closed-form maths -----------------------------------------------------------------------

def test_normal_kl_closed_form():
    m, lv = torch.randn(10), torch.randn(10)
    assert torch.allclose(D.normal_kl(m, lv, m, lv), torch.zeros(10), atol=1e-6)
    m2, lv2 = torch.randn(10), torch.randn(10)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(D.normal_kl(m, lv, m2, lv2), ref, atol=1e-5)


def test_cosine_schedule():
    betas = D.cosine_betas(1000)
    ac = torch.cumprod(1 - betas, 0)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert (betas > 0).all() and (betas <= 0.999).all() and betas[-1] == 0.999  # the clip
    assert ((ac > 0) & (ac < 1)).all() and (ac[1:] < ac[:-1]).all()
    # before the clip, alpha_bar_t follows cos^2 exactly (normalised by alpha_bar(0))
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):
        assert abs(ac[t].item() - f((t + 1) / 1000) / f(0)) < 1e-12


def test_discretized_likelihood_sums_to_one():
    # The 256 bins tile the real line (end bins open), so the probabilities sum to 1 exactly
    # (the CDF telescopes), for any Gaussian.
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.0, -1.0), (0.3, -3.0), (-2.0, 0.5)):
        lp = D.discretized_gaussian_log_likelihood(
            grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale))
        assert abs(lp.exp().sum().item() - 1.0) < 1e-6


def test_space_timesteps():
    assert D.space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    s100 = D.space_timesteps(1000, "100")
    assert len(s100) == 100 and s100[0] == 0 and s100[-1] == 999
    assert D.space_timesteps(1000, "1000") == list(range(1000)) == D.space_timesteps(1000, 1000)
    assert D.space_timesteps(300, "1") == [0] and D.space_timesteps(300, 45)[:2] == [0, 7]
    for bad in ("1001", "0"):
        with pytest.raises(ValueError, match=f"cannot keep {bad} steps"):
            D.space_timesteps(1000, bad)
    for bad in ("ten", "10,15,20"):  # one count: the reference's per-section counts are not offered
        with pytest.raises(ValueError, match="not understood"):
            D.space_timesteps(1000, bad)


def test_respacing_keeps_the_marginals():
    betas = D.cosine_betas(1000)
    keep = D.space_timesteps(1000, "100")
    spaced = D.GaussianDiffusion.respaced(betas, keep)
    base = D.GaussianDiffusion(betas)
    assert spaced.num_timesteps == 100 and spaced.timestep_map.tolist() == keep
    # (float64; the tail, where alpha_bar ~ 1e-9, loses a few digits to 1 - (1 - x))
    assert torch.allclose(spaced.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-9, atol=0)


def test_perfect_prediction_has_zero_vlb_and_mse():
    # eps = the true noise and v = -1 (the posterior variance) make p equal the true posterior:
    # KL = 0 and MSE = 0 at every t >= 1. This exercises q(x_t | x0), x0-from-eps and the
    # posterior mean/variance together.
    diff = D.GaussianDiffusion(D.cosine_betas(1000))
    x0, noise = torch.randn(999, C) * 0.7, torch.randn(999, C)
    t = torch.arange(1, 1000)
    loss = diff.training_losses(lambda x_t, ts: torch.cat([noise, -torch.ones_like(noise)], -1),
                                x0, t, noise)
    assert loss.abs().max() < 1e-3


def test_vlb_does_not_train_the_mean():
    # The VLB sees eps through a stop-gradient: the gradient w.r.t. the eps half of the output
    # is exactly the MSE's, 2 (eps - noise) / C, while the v half does receive a gradient.
    diff = D.GaussianDiffusion(D.cosine_betas(1000))
    x0, noise = torch.randn(6, C), torch.randn(6, C)
    out = torch.randn(6, 2 * C, requires_grad=True)
    t = torch.tensor([0, 1, 5, 100, 700, 999])
    diff.training_losses(lambda x_t, ts: out, x0, t, noise).sum().backward()
    assert torch.allclose(out.grad[:, :C], 2 * (out[:, :C] - noise).detach() / C, atol=1e-6)
    assert out.grad[:, C:].abs().sum() > 0


# ---- DiffLoss: training ----------------------------------------------------------------------

def test_forward_shapes_and_finite():
    dl = make()
    target, z = torch.randn(12, C), torch.randn(12, ZC)
    loss = dl(target, z)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss = dl(target, z, torch.tensor([1.0, 0.0] * 6))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in dl.parameters())
    assert dl(target, z, torch.zeros(12)).item() == 0.0  # all-zero mask: 0, not NaN


def test_loss_only_counts_masked_tokens():
    dl = make()
    target, z = torch.randn(8, C), torch.randn(8, ZC)
    mask = torch.tensor([1.0, 1, 0, 1, 0, 0, 1, 0])
    torch.manual_seed(3)
    base = dl(target, z, mask)
    changed = target.clone()
    changed[mask == 0] += 5.0
    torch.manual_seed(3)
    assert torch.equal(dl(changed, z, mask), base)
    changed[0] += 5.0  # a token that counts
    torch.manual_seed(3)
    assert not torch.allclose(dl(changed, z, mask), base)


def test_loss_falls_when_overfitting_a_fixed_batch():
    dl = make(randomise=False)
    target, z = torch.randn(32, C) * 0.5, torch.randn(32, ZC)

    def evaluate():  # the same t / noise draws every time
        state = torch.get_rng_state()
        torch.manual_seed(1234)
        with torch.no_grad():
            value = sum(dl(target, z).item() for _ in range(8)) / 8
        torch.set_rng_state(state)
        return value

    opt = torch.optim.Adam(dl.parameters(), lr=3e-3)
    before = evaluate()
    torch.manual_seed(0)
    for _ in range(100):
        loss = dl(target, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert evaluate() < 0.5 * before


# ---- DiffLoss: sampling ----------------------------------------------------------------------

def test_sample_shapes_and_cfg_halves():
    dl = make()
    z = torch.randn(6, ZC)
    x = dl.sample(z)
    assert x.shape == (6, C) and x.dtype == torch.float32 and torch.isfinite(x).all()
    xg = dl.sample(z, cfg=3.0)  # z read as [cond (3); uncond (3)]
    assert xg.shape == (6, C) and torch.equal(xg[:3], xg[3:])
    xt = dl.sample(z, cfg=torch.tensor([1.5, 2.0, 3.0]))  # one scale per cond row
    assert xt.shape == (6, C)


def test_sampling_is_reproducible_with_a_generator():
    dl = make()
    z = torch.randn(4, ZC)
    a = dl.sample(z, generator=torch.Generator().manual_seed(7))
    b = dl.sample(z, generator=torch.Generator().manual_seed(7))
    c = dl.sample(z, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    zg = torch.randn(8, ZC)
    a = dl.sample(zg, cfg=2.5, generator=torch.Generator().manual_seed(7))
    b = dl.sample(zg, cfg=2.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)



@pytest.mark.parametrize("guided", [False, True])
def test_one_generator_per_image_draws_each_block_from_its_own(guided):
    # Rows in G equal blocks, one generator each: block j is what a call with block j's
    # rows alone draws from generator j (unguided and guided, whose rows are [cond; uncond]).
    dl = make(num_sampling_steps="10")
    n, G = 2, 3
    cond, uncond = torch.randn(G * n, ZC), torch.randn(G * n, ZC)
    rows = lambda j: slice(j * n, (j + 1) * n)  # noqa: E731
    kw = dict(cfg=2.5) if guided else {}

    def z_of(j=None):
        if j is None:
            return torch.cat([cond, uncond]) if guided else cond
        return torch.cat([cond[rows(j)], uncond[rows(j)]]) if guided else cond[rows(j)]

    gens = [torch.Generator().manual_seed(20 + j) for j in range(G)]
    batched = dl.sample(z_of(), generator=gens, **kw)[: G * n]
    for j in range(G):
        alone = dl.sample(z_of(j), generator=torch.Generator().manual_seed(20 + j), **kw)[:n]
        assert torch.allclose(batched[rows(j)], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"6 rows cannot be split evenly over 4 generators"):
        dl.sample(z_of(), generator=gens + [torch.Generator()], **kw)
    with pytest.raises(ValueError, match=r"DiffLoss.sample: generator\[0\] is a str"):
        dl.sample(z_of(), generator=["x"] * G, **kw)

def test_temperature_scales_only_the_step_noise():
    dl = make()
    z = torch.randn(4, ZC)
    a = dl.sample(z, temperature=0.0, generator=torch.Generator().manual_seed(1))
    b = dl.sample(z, temperature=0.0, generator=torch.Generator().manual_seed(1))
    c = dl.sample(z, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # the initial x_T is still random


def test_cfg_with_equal_conditions_is_the_unguided_sample():
    # cond == uncond makes the guided eps equal the conditional one, whatever the scale.
    dl = make()
    z = torch.randn(3, ZC)
    plain = dl.sample(z, generator=torch.Generator().manual_seed(4))
    guided = dl.sample(torch.cat([z, z]), cfg=4.0, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(guided[:3], plain, atol=1e-5)
    other = dl.sample(torch.cat([z, torch.randn(3, ZC)]), cfg=4.0,
                      generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(other[:3], plain, atol=1e-3)


def test_respaced_1000_equals_the_unrespaced_chain():
    dl = make(num_sampling_steps="1000")
    full, spaced = dl.train_diffusion, dl.gen_diffusion
    assert spaced.num_timesteps == full.num_timesteps == 1000
    assert torch.equal(spaced.timestep_map, torch.arange(1000))
    assert torch.allclose(spaced.betas, full.betas, rtol=1e-10, atol=0)
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod, rtol=1e-12, atol=0)
    z = torch.randn(3, ZC)
    fn = lambda x, t: dl.net(x, t, z)
    noise = torch.randn(3, C)
    a = full.p_sample_loop(fn, noise, 0.9, torch.Generator().manual_seed(9))
    b = spaced.p_sample_loop(fn, noise, 0.9, torch.Generator().manual_seed(9))
    assert torch.allclose(a, b, atol=1e-5)
    # and DiffLoss.sample runs that same chain: initial noise, then one draw per step
    g = torch.Generator().manual_seed(9)
    c = full.p_sample_loop(fn, torch.randn((3, C), generator=g), 1.0, g)
    d = dl.sample(z, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(c, d, atol=1e-5)


def test_respaced_sampler_feeds_original_timesteps_to_the_net():
    dl = make(num_sampling_steps="10")
    seen = []
    dl.gen_diffusion.p_sample_loop(lambda x, t: (seen.append(t[0].item()), torch.zeros(2, 2 * C))[1],
                                   torch.randn(2, C))
    assert seen == D.space_timesteps(1000, "10")[::-1]


def test_clip_x0_keeps_an_inexact_net_in_range():
    # A net whose eps = 2 tanh(x_t / 2): right near 0, saturating beyond its range, as an
    # MLP does. At t = 999, x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab) multiplies its small error
    # by ~1e4; the tokens leave the range, where eps no longer tracks x_t, and the unclipped
    # chain never comes back (what a briefly trained MaskGen-KL did). With clip_x0 every x0
    # estimate stays within the bound, and so does the result; clip_x0=0 is the reference.
    off = lambda x, t: torch.cat([2 * torch.tanh(x / 2), torch.zeros_like(x)], dim=-1)
    noise = torch.randn(64, C, generator=torch.Generator().manual_seed(0))
    free = make(num_sampling_steps="50").gen_diffusion.p_sample_loop(off, noise, 1.0, torch.Generator().manual_seed(1))
    assert free.abs().max() > 100
    dl = make(num_sampling_steps="50", clip_x0=3.0)
    clipped = dl.gen_diffusion.p_sample_loop(off, noise, 1.0, torch.Generator().manual_seed(1), clip_x0=3.0)
    assert clipped.abs().max() <= 3.0 + 1e-4
    # DiffLoss.sample hands its bound to the chain, guided or not.
    seen, chain = [], dl.gen_diffusion.p_sample_loop
    dl.gen_diffusion.p_sample_loop = lambda *a: (seen.append(a[-1]), chain(*a))[1]
    dl.sample(torch.randn(2, ZC))
    dl.sample(torch.randn(4, ZC), cfg=2.0)
    assert seen == [3.0, 3.0]
    z = torch.randn(4, ZC)
    ref, ours = make(), make(clip_x0=0.0)
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ref.sample(z, generator=torch.Generator().manual_seed(2)),
                       ours.sample(z, generator=torch.Generator().manual_seed(2)))
    assert make(clip_x0=2.0).clip_x0 == 2.0
    with pytest.raises(ValueError, match="clip_x0 must be >= 0"):
        make(clip_x0=-1.0)


# ---- errors ----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    dl = make()
    with pytest.raises(ValueError, match=r"target must be \(N, 4\)"):
        dl(torch.randn(3, C + 1), torch.randn(3, ZC))
    with pytest.raises(ValueError, match="z must be"):
        dl(torch.randn(3, C), torch.randn(4, ZC))
    with pytest.raises(ValueError, match="mask must be"):
        dl(torch.randn(3, C), torch.randn(3, ZC), torch.ones(3, 1))
    with pytest.raises(ValueError, match="even number of rows"):
        dl.sample(torch.randn(3, ZC), cfg=2.0)
    with pytest.raises(ValueError, match="positive int"):
        D.DiffLoss(C, ZC, 0, WIDTH)
    with pytest.raises(ValueError, match="num_sampling_steps"):
        D.DiffLoss(C, ZC, DEPTH, WIDTH, num_sampling_steps="fast")

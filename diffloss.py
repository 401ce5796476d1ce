"""DiffLoss: a per-token diffusion model that replaces the softmax head for continuous tokens.

MaskGen-KL (TA-TiTok/MaskGen paper, arXiv 2501.07730: §3.3, "Masked Generative Models with
Continuous Tokens", and §4.2) predicts *continuous* KL tokens, so there is no codebook for a
cross-entropy. As in MAR (Li et al. 2024, "Autoregressive Image Generation without Vector
Quantization", §3), the transformer emits a vector z for every masked token, and a small MLP
denoiser models p(x0 | z) as a Gaussian diffusion over the token's C channels: training minimises
the diffusion loss of x0 given z; sampling runs the reverse chain from noise, conditioned on z.

Bottom-up: the denoiser net(x_t, t, z) -> (N, 2C) = cat(eps, v), v in [-1, 1] interpolating the
log-variance ("learned range"); the diffusion maths; GaussianDiffusion (q(x_t | x0), the posterior,
improved DDPM's hybrid loss (Nichol & Dhariwal 2021), ancestral sampling, respacing); DiffLoss.

    dl = DiffLoss(target_channels=16, z_channels=1024, depth=8, width=1024, num_sampling_steps="100")
    loss = dl(target (N, C), z (N, Zc), mask (N,) float or None)       -> scalar
    x = dl.sample(z (N, Zc), temperature=1.0, cfg=1.0, generator=None) -> (N, C)
    dl.net's parameter names equal the official checkpoints' `diffloss.net.*` keys.
"""

import math

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# The denoiser: an MLP with adaLN conditioning (a DiT block without attention)

class TimestepEmbedder(nn.Module):
    """Integer diffusion step t (N,) -> (N, width): fixed sinusoids, then a learned MLP."""

    def __init__(self, width, freq_dim=256, max_period=10000):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def sinusoids(self, t):
        half = self.freq_dim // 2
        # Frequencies from 1 down to ~1/max_period: near and far steps both get distinct codes.
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(self.max_period) * i / half)          # (half,)
        args = t.float()[:, None] * freqs[None, :]                          # (N, half)
        # cos first, then sin: the released weights were trained with this order.
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)       # (N, freq_dim)

    def forward(self, t):  # (N,) -> sinusoids (N, freq_dim) -> (N, width)
        return self.mlp(self.sinusoids(t).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(adaLN(LayerNorm(x), y)); the gate starts at zero, so the block at identity."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)     # 3 x (N, W)
        # adaLN; (1 + scale), so a zero-initialised modulation starts as the identity
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)    # (N, W)


class FinalLayer(nn.Module):
    """LayerNorm (no affine: adaLN supplies it) -> adaLN shift/scale -> Linear to the output."""

    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)           # 2 x (N, W)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)        # (N, out)


class SimpleMLPAdaLN(nn.Module):
    """net(x_t (N, C), t (N,), c (N, Zc)) -> (N, out_channels): the token runs through the residual
    stream, the timestep and condition embeddings summed into y modulate every block."""

    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks):
        super().__init__()
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        # DiT's: Xavier-uniform linears, zero biases, normal(0.02) timestep MLP, zero adaLN outputs and
        # output layer, so the net starts at eps = 0, v = 0 (log-variance halfway: posterior's, beta_t's).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1]]
        for lin in zeroed + [self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, c):  # -> (N, out); the shared condition y (N, W) sums both embeddings
        return self.denoise(x, self.time_embed(t) + self.cond_embed(c))

    def denoise(self, x, y):
        """The residual stream for an embedded condition y (N, W); sample() reuses y's parts."""
        x = self.input_proj(x)                                   # (N, W)
        for block in self.res_blocks:
            x = block(x, y)                                      # (N, W)
        return self.final_layer(x, y)                            # (N, out) = cat(eps, v)


# ----------------------------------------------------------------------------------------------
# Closed-form pieces of the diffusion maths

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) in nats for x on a 256-level grid in [-1, 1] under N(means, e^(2 log_scales)): each
    value owns [x - 1/255, x + 1/255], the end bins extend to -inf / +inf. The decoder term L_0 for
    8-bit pixels, which MAR and MaskGen apply unchanged to latent tokens (off the grid, outside
    [-1, 1]); kept because the released models trained with it. It acts only at t = 0."""
    # improved DDPM's tanh approximation of Phi(x), not erf: the released models trained with it
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))  # noqa: E731
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255.0)), cdf(inv_std * (centered - 1.0 / 255.0))
    # clamp before log: far-off bins have probability that underflows to 0
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def cosine_betas(num_steps, max_beta=0.999):
    """Improved DDPM's cosine schedule alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2) as float64
    betas (num_steps,), beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), clipped to max_beta so
    that 1/alpha_bar and the log-variances stay finite."""
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2           # (T+1,)
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)      # (T,)


def space_timesteps(num_steps, count):
    """The sorted original steps a respaced chain of `count` steps keeps (MAR / improved DDPM's respacing,
    as one section): evenly strided, both ends included ("100" of 1000: 0, 10, ..., 999). count: int or str."""
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"num_sampling_steps={count!r} is not understood; pass a step count such as '100'") from None
    if not 1 <= n <= num_steps:
        raise ValueError(f"num_sampling_steps={count!r}: cannot keep {n} steps of the {num_steps}-step chain; "
                         f"pass 1 to {num_steps}")
    stride, pos, kept = (num_steps - 1) / (n - 1) if n > 1 else 1, 0.0, []
    for _ in range(n):  # the fractional position, accumulated and rounded as the reference does
        kept.append(round(pos))
        pos += stride
    return sorted(set(kept))


def _at(table, t):
    # one coefficient per row: table (T,), t (N,) -> (N, 1), broadcast over channels
    return table[t].unsqueeze(-1)


def randn_rows(shape, generator, device, dtype=None):
    """Normal noise; with a list of G generators (one per image) the rows are G equal blocks, block j
    drawn by generator j alone: an image's noise is what a batch of that image alone would draw."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    rows, G = shape[0], len(generator)
    if rows % G:
        raise ValueError(f"{rows} rows cannot be split evenly over {G} generators (one per image)")
    block = (rows // G, *shape[1:])
    return torch.cat([torch.randn(block, generator=g, device=device, dtype=dtype) for g in generator])


# ----------------------------------------------------------------------------------------------
# Gaussian diffusion: forward process, hybrid loss, ancestral sampling, respacing

class GaussianDiffusion:
    """A discrete Gaussian diffusion over len(betas) steps, eps-prediction, learned-range variance.

    Not an nn.Module: its tables stay out of state_dict (the checkpoints hold only `net.*`) and away
    from `module.to(bfloat16)`, which would ruin alpha_bar values close to 1. They live in float64
    on the CPU and go to the device as float32 per call (as the reference computes and uses them).
    timestep_map[i] is the original (1000-step) index of step i: the net always sees original
    indices, so one net serves the training chain and the respaced sampling chain."""

    def __init__(self, betas, timestep_map=None):
        betas = torch.as_tensor(betas, dtype=torch.float64)  # (T,), each in (0, 1]
        self.num_timesteps = T = betas.shape[0]
        self.timestep_map = (torch.arange(T) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long))
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)                 # alpha_bar_t
        ac, ac_prev = self.alphas_cumprod, torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance)
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The variance is 0 at t = 0: its log is clipped to the t = 1 value (a 1-step chain has no
        # t = 1, and never uses the value, so log(beta) stands in).
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if T > 1 else betas
        self.tables = {
            "log_betas": torch.log(betas),
            "sqrt_ac": torch.sqrt(ac),
            "sqrt_one_minus_ac": torch.sqrt(1.0 - ac),
            "sqrt_recip_ac": torch.sqrt(1.0 / ac),
            "sqrt_recipm1_ac": torch.sqrt(1.0 / ac - 1.0),
            "posterior_log_variance": torch.log(clipped),
            "posterior_coef1": betas * torch.sqrt(ac_prev) / (1.0 - ac),
            "posterior_coef2": (1.0 - ac_prev) * torch.sqrt(1.0 - betas) / (1.0 - ac),
        }

    @classmethod
    def respaced(cls, betas, keep):
        """The chain of the original steps `keep` with the same marginals: each kept step jumps from
        the previous one, beta = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}], so q(x_t | x0) is unchanged."""
        alphas_cumprod = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
        keep = sorted(set(int(k) for k in keep))                             # space_timesteps' steps
        kept = alphas_cumprod[keep]                                          # (N,)
        prev = torch.cat([kept.new_ones(1), kept[:-1]])
        return cls(1.0 - kept / prev, timestep_map=keep)

    def tables_on(self, device):
        return {k: v.to(device=device, dtype=torch.float32) for k, v in self.tables.items()}

    def q_posterior(self, x0, x_t, t, tab):
        # mean and clipped log-variance of q(x_{t-1} | x_t, x0)                 (N, C) each
        mean = _at(tab["posterior_coef1"], t) * x0 + _at(tab["posterior_coef2"], t) * x_t
        return mean, _at(tab["posterior_log_variance"], t).expand_as(x_t)

    def p_mean_log_variance(self, out, x_t, t, tab, clip_x0=0.0):
        """The model's p(x_{t-1} | x_t) from the net output (N, 2C) = cat(eps, v); clip_x0 > 0 clamps
        the x0 estimate to [-clip_x0, clip_x0] (ours: the reference never clips, see DiffLoss)."""
        eps, v = out.chunk(2, dim=-1)                                        # (N, C) each
        # Learned range: v = -1 gives the posterior variance (lower bound), v = +1 gives beta_t.
        frac = (v + 1) / 2
        log_variance = frac * _at(tab["log_betas"], t) + (1 - frac) * _at(tab["posterior_log_variance"], t)
        # Mean: estimate x0 from eps, then take the true posterior's mean.
        x0_hat = _at(tab["sqrt_recip_ac"], t) * x_t - _at(tab["sqrt_recipm1_ac"], t) * eps
        if clip_x0 > 0:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        mean, _ = self.q_posterior(x0_hat, x_t, t, tab)
        return mean, log_variance

    def training_losses(self, model_fn, x0, t, noise=None):
        """Hybrid loss per token (N,), improved DDPM's "learned range": MSE(eps) + vb (bits, not rescaled),
        vb = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, -log p(x0 | x_1) (discretised) at
        t = 0, with a detached eps in p's mean: the VLB trains only the variance, the MSE the mean.
        model_fn(x_t (N, C), t_original (N,)) -> (N, 2C); t indexes this chain's steps."""
        x0 = x0.float()
        noise = torch.randn_like(x0) if noise is None else noise.float()
        tab = self.tables_on(x0.device)
        # q(x_t | x0): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
        x_t = _at(tab["sqrt_ac"], t) * x0 + _at(tab["sqrt_one_minus_ac"], t) * noise  # (N, C)
        out = model_fn(x_t, self.timestep_map.to(x0.device)[t]).float()      # (N, 2C)
        eps, v = out.chunk(2, dim=-1)
        mse = ((noise - eps) ** 2).mean(dim=-1)                              # (N,)
        mean_p, log_var_p = self.p_mean_log_variance(torch.cat([eps.detach(), v], dim=-1), x_t, t, tab)
        mean_q, log_var_q = self.q_posterior(x0, x_t, t, tab)
        kl = normal_kl(mean_q, log_var_q, mean_p, log_var_p).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x0, means=mean_p, log_scales=0.5 * log_var_p).mean(dim=-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)                                     # (N,) bits
        return mse + vb

    @torch.no_grad()
    def p_sample_loop(self, model_fn, noise, temperature=1.0, generator=None, clip_x0=0.0):
        """Ancestral sampling from x_T = noise (N, C) to x_0 (float32): x_{t-1} ~ N(mean, temperature^2
        variance), the last step the mean. temperature < 1 gives sharper tokens (MAR scales the step
        noise, not the initial noise). generator: see randn_rows."""
        x = noise.float()
        n, device = x.shape[0], x.device
        tab, tmap = self.tables_on(device), self.timestep_map.to(device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, dtype=torch.long, device=device)
            out = model_fn(x, tmap[t]).float()                              # (N, 2C)
            mean, log_variance = self.p_mean_log_variance(out, x, t, tab, clip_x0)
            if i > 0:                                                        # the last step is the mean
                z = randn_rows(x.shape, generator, device, x.dtype)           # (N, C)
                mean = mean + torch.exp(0.5 * log_variance) * z * temperature
            x = mean                                                          # (N, C)
        return x


# ----------------------------------------------------------------------------------------------
# DiffLoss: what MaskGen-KL holds

NUM_TRAIN_TIMESTEPS = 1000


class DiffLoss(nn.Module):
    """Diffusion loss and sampler for continuous tokens (MAR §3; MaskGen-KL, paper §3.3).

    target_channels C: channels of a token; z_channels Zc: width of its condition; depth, width: the
    MLP's blocks and width; num_sampling_steps: sample()'s respacing of the 1000 training steps.
    clip_x0: 0 (the reference) or a bound on the sampler's x0 estimates, in token units. At the
      first steps sqrt(alpha_bar) is ~1e-4, so x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
      multiplies an eps error by ~1e4: after a short run the tokens leave the range where the net's
      eps can bring them back (tokens ~1e4, a blank canvas). Training is unchanged."""

    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps="100", clip_x0=0.0):
        super().__init__()
        for name, value in (("target_channels", target_channels), ("z_channels", z_channels),
                            ("depth", depth), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiffLoss: {name} must be a positive int, got {value!r}")
        if not clip_x0 >= 0:
            raise ValueError(f"DiffLoss: clip_x0 must be >= 0 (0 = no clipping), got {clip_x0!r}")
        self.target_channels, self.z_channels, self.clip_x0 = target_channels, z_channels, float(clip_x0)
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth)  # out: eps, v
        betas = cosine_betas(NUM_TRAIN_TIMESTEPS)
        self.train_diffusion = GaussianDiffusion(betas)
        self.gen_diffusion = GaussianDiffusion.respaced(betas, space_timesteps(NUM_TRAIN_TIMESTEPS, num_sampling_steps))

    def _check_z(self, z, rows, where):
        if z.ndim != 2 or z.shape[1] != self.z_channels or (rows is not None and z.shape[0] != rows):
            want = f"({rows if rows is not None else 'N'}, {self.z_channels})"
            raise ValueError(f"DiffLoss.{where}: z must be {want}, got {tuple(z.shape)}; flatten "
                             f"(B, K, D) conditions to (B*K, D) and match the transformer width")

    def forward(self, target, z, mask=None):
        """Mean diffusion loss over the tokens with mask 1 (all if None): target (N, C), z (N, Zc),
        mask (N,). One random step and noise draw per token (global RNG: t first, then noise)."""
        if target.ndim != 2 or target.shape[1] != self.target_channels:
            raise ValueError(f"DiffLoss.forward: target must be (N, {self.target_channels}) tokens, "
                             f"got {tuple(target.shape)}; flatten (B, K, C) to (B*K, C)")
        n = target.shape[0]
        self._check_z(z, n, "forward")
        if mask is not None and tuple(mask.shape) != (n,):
            raise ValueError(f"DiffLoss.forward: mask must be ({n},), one weight per token, got "
                             f"{tuple(mask.shape)}; flatten it like target")
        t = torch.randint(0, self.train_diffusion.num_timesteps, (n,), device=target.device)
        loss = self.train_diffusion.training_losses(
            lambda x_t, ts: self.net(x_t.to(z.dtype), ts, z), target, t)    # (N,)
        if mask is None:
            return loss.mean()
        mask = mask.to(loss.dtype)
        # The clamp only turns an all-zero mask's NaN into 0 (without a host sync to check for it).
        return (loss * mask).sum() / mask.sum().clamp(min=torch.finfo(loss.dtype).tiny)

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, generator=None, denoise=None):
        """One token per row of z by reverse diffusion -> (N, C) float32.

        cfg: a Python 1.0 means no guidance. Otherwise (a float, or a tensor: 0-d or one value per
        cond row, so a per-step schedule needs no host sync) z is [cond; uncond] (2M rows), eps is
        uncond + cfg * (cond - uncond), and both halves of the 2M result hold the guided sample.
        generator: a torch.Generator on z's device, or one per image when the (cond) rows are equal
        blocks per image (randn_rows). denoise: net.denoise or a compiled version of it."""
        self._check_z(z, None, "sample")
        # The generator checks of maskgen.check_generators, kept here so DiffLoss stands alone: this file
        # cannot import maskgen.py (maskgen imports it), and VQ sampling never calls into this file.
        many = isinstance(generator, (list, tuple))
        for i, g in enumerate(generator if many else [] if generator is None else [generator]):
            name, g_device = f"generator[{i}]" if many else "the generator", getattr(g, "device", None)
            if not isinstance(g_device, torch.device):
                raise ValueError(f"DiffLoss.sample: {name} is a {type(g).__name__}, not a torch.Generator")
            if g_device.type != z.device.type:
                raise ValueError(f"DiffLoss.sample: {name} is on {g_device} but the inputs are on {z.device}; "
                                 f"create it with torch.Generator(device={str(z.device)!r}).manual_seed(seed)")
        C, net = self.target_channels, self.net
        denoise = net.denoise if denoise is None else denoise
        guided = isinstance(cfg, torch.Tensor) or cfg != 1.0
        # net(x, ts, z) for less work: z's embedding is fixed for the chain, and every row is at the
        # same step, so t is embedded for one row and broadcast.
        z_emb = net.cond_embed(z)                                             # (N, W)
        fn = lambda x, ts: denoise(x.to(z.dtype), net.time_embed(ts[:1]) + z_emb)  # noqa: E731  (N, 2C)
        if not guided:
            noise = randn_rows((z.shape[0], C), generator, z.device)
            return self.gen_diffusion.p_sample_loop(fn, noise, temperature, generator, self.clip_x0)
        if z.shape[0] % 2:
            raise ValueError(f"DiffLoss.sample: with cfg != 1.0, z must stack [cond; uncond] "
                             f"(an even number of rows), got {z.shape[0]} rows")
        m = z.shape[0] // 2
        if isinstance(cfg, torch.Tensor) and cfg.ndim == 1:
            cfg = cfg[:, None]                                                # (M, 1)

        def guided_fn(x, ts):
            # One shared state x (M, C): both halves see the same x_t and t, only the condition differs.
            out = fn(torch.cat([x, x]), ts).float()                          # (2M, 2C) = cat(eps, v)
            cond_eps, uncond_eps = out[:m, :C], out[m:, :C]                  # (M, C) each
            # Guidance on eps only; the variance from the cond half (the reference's forward_with_cfg).
            return torch.cat([uncond_eps + cfg * (cond_eps - uncond_eps), out[:m, C:]], dim=-1)

        # The reference carries 2M rows and drops the uncond half's own drift; we carry the M guided
        # rows (the same cond-half result for the same noise) and return them twice.
        noise = randn_rows((m, C), generator, z.device)                      # (M, C)
        x = self.gen_diffusion.p_sample_loop(guided_fn, noise, temperature, generator, self.clip_x0)  # (M, C)
        return torch.cat([x, x])                                              # (2M, C)

"""DiffLoss: a per-token diffusion model that replaces the softmax head for continuous tokens.

MaskGen-KL (TA-TiTok/MaskGen paper, arXiv 2501.07730: §3.3, "Masked Generative Models with
Continuous Tokens", and §4.2) predicts *continuous* KL tokens, so there is no codebook to put
a cross-entropy on. It follows MAR (Li et al. 2024, "Autoregressive Image Generation without
Vector Quantization", §3): for every masked token the transformer emits a vector z, and a
small MLP denoiser models p(x0 | z) as a Gaussian diffusion over the token's C channels. Training minimises the diffusion loss of x0 given z;
sampling runs the reverse diffusion chain from pure noise, conditioned on z.

Reading order (bottom-up, as data flows):
    TimestepEmbedder, ResBlock, FinalLayer, SimpleMLPAdaLN
        the denoiser net(x_t, t, z) -> (N, 2C): the noise estimate eps and a value v in
        [-1, 1] (nominally) that interpolates the log-variance ("learned range")
    normal_kl, discretized_gaussian_log_likelihood, cosine_betas, space_timesteps
        the closed-form pieces of the diffusion maths
    GaussianDiffusion
        q(x_t | x0), the posterior q(x_{t-1} | x_t, x0), the hybrid training loss
        (MSE on eps + variational bound, improved DDPM, Nichol & Dhariwal 2021), the ancestral
        sampler, and respacing 1000 training steps down to N sampling steps
    DiffLoss
        the module MaskGen-KL owns

Public API (MAR's shape):
    dl = DiffLoss(target_channels=16, z_channels=1024, depth=8, width=1024, num_sampling_steps="100")
    loss = dl(target (N, C), z (N, Zc), mask (N,) float or None)       -> scalar
    x = dl.sample(z (N, Zc), temperature=1.0, cfg=1.0, generator=None) -> (N, C)
        cfg != 1.0: z is [cond; uncond] stacked (2M rows) and the result has 2M rows; both
        halves hold the same guided sample. generator may be a list, one per image (whose
        rows then form equal contiguous blocks): each image's noise comes from its own.
    dl.net's parameter names equal the official checkpoints' `diffloss.net.*` keys.
"""

import math

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# The denoiser: an MLP with adaLN conditioning (a DiT block without attention)

def modulate(x, shift, scale):
    # adaLN: the condition sets a per-channel affine map of the normalised features. It is
    # written as (1 + scale) so that a zero-initialised modulation starts as the identity.
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Integer diffusion step t (N,) -> (N, width): fixed sinusoids, then a learned MLP."""

    def __init__(self, width, freq_dim=256, max_period=10000):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def sinusoids(self, t):
        half = self.freq_dim // 2
        # A geometric ladder of frequencies from 1 down to ~1/max_period, so that both
        # neighbouring steps and far-apart steps get distinguishable codes.
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(self.max_period) * i / half)          # (half,)
        args = t.float()[:, None] * freqs[None, :]                          # (N, half)
        # cos first, then sin: the released weights were trained with this order.
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)       # (N, freq_dim)

    def forward(self, t):
        emb = self.sinusoids(t).to(self.mlp[0].weight.dtype)                # (N, freq_dim)
        return self.mlp(emb)                                                # (N, width)


class ResBlock(nn.Module):
    """x + gate * MLP(adaLN(LayerNorm(x), y)): one residual MLP block conditioned on y."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        # The condition produces shift, scale and a residual gate; the gate starts at zero
        # (see SimpleMLPAdaLN.init_weights), so every block starts as the identity.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)     # 3 x (N, W)
        h = self.mlp(modulate(self.in_ln(x), shift, scale))                 # (N, W)
        return x + gate * h                                                 # (N, W)


class FinalLayer(nn.Module):
    """LayerNorm (no affine: adaLN supplies it) -> adaLN shift/scale -> Linear to the output."""

    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)           # 2 x (N, W)
        return self.linear(modulate(self.norm_final(x), shift, scale))      # (N, out)


class SimpleMLPAdaLN(nn.Module):
    """net(x_t (N, C), t (N,), c (N, Zc)) -> (N, out_channels).

    The token itself goes through the residual stream; the timestep and the transformer's
    condition are summed into one vector y that modulates every block. Attribute names
    (time_embed, cond_embed, input_proj, res_blocks, final_layer) are the checkpoint keys.
    """

    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.init_weights()

    def init_weights(self):
        # The official initialisation (DiT's): Xavier-uniform linears with zero biases, a
        # small normal init for the timestep MLP, and zeros for every adaLN output and for
        # the output layer. At init the net therefore outputs exactly 0: eps = 0 and v = 0,
        # i.e. the log-variance halfway between the posterior's and beta_t's.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, c):
        y = self.time_embed(t) + self.cond_embed(c)              # (N, W) shared condition
        return self.denoise(x, y)                                # (N, out)

    def denoise(self, x, y):
        """The residual stream for an already-embedded condition y (N, W). sample() calls
        this directly, so that the parts of y that do not change between diffusion steps
        are not recomputed at every step."""
        x = self.input_proj(x)                                   # (N, W)
        for block in self.res_blocks:
            x = block(x, y)                                      # (N, W)
        return self.final_layer(x, y)                            # (N, out) = cat(eps, v)


# ----------------------------------------------------------------------------------------------
# Closed-form pieces of the diffusion maths

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    # The tanh approximation of Phi(x) that improved DDPM uses; kept (instead of erf) so the
    # t = 0 term matches what the released checkpoints were trained on.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) in nats for x on a 256-level grid in [-1, 1], under N(means, e^(2 log_scales)).

    Each value owns the bin [x - 1/255, x + 1/255]; the end bins extend to -inf / +inf.
    This is the decoder term L_0 of the variational bound. It was designed for 8-bit pixels;
    MAR and MaskGen apply it unchanged to latent tokens, which are neither on that grid nor
    inside [-1, 1] (values beyond +-0.999 fall into the open end bins). We keep it as it is
    because it is part of the loss the released models were trained with, and it only acts
    at t = 0, i.e. on 1/1000 of the training samples.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # clamp before log: far-off bins have probability that underflows to 0
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def cosine_betas(num_steps, max_beta=0.999):
    """The cosine schedule (improved DDPM): alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2).

    beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), so that prod(1 - beta) follows alpha_bar.
    alpha_bar(1) is ~0, which would make the last beta ~1; it is clipped to max_beta so that
    1/alpha_bar and the log-variances stay finite. Returns float64 (num_steps,).
    """
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2           # (T+1,)
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)      # (T,)


def space_timesteps(num_steps, section_counts):
    """Which of num_steps original steps a respaced chain keeps (MAR/improved-DDPM semantics).

    section_counts is an int, a list of ints, or a string such as "100" or "10,15,20": the
    original steps are cut into that many equal sections and section k keeps counts[k] steps
    evenly strided over it, both ends included. "100" over 1000 steps keeps 0, 10, 20, 30, ...,
    999. Returns a sorted list of original step indices.
    """
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        try:
            counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"num_sampling_steps={section_counts!r} is not understood; pass a "
                             f"step count such as '100' or comma-separated counts such as '50,50'")
    else:
        counts = [int(c) for c in section_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"num_sampling_steps={section_counts!r}: every section needs >= 1 step")
    size, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for k, count in enumerate(counts):
        section = size + (1 if k < extra else 0)     # the first `extra` sections get one more
        if count > section:
            raise ValueError(f"num_sampling_steps={section_counts!r}: cannot keep {count} steps "
                             f"of a {section}-step section of the {num_steps}-step chain; use fewer")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        # Accumulate the fractional position and round it, as the reference does, so the kept
        # indices (and hence released-model samples) are the same.
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += section
    return sorted(set(kept))


def _at(table, t):
    # Read one coefficient per row: table (T,), t (N,) -> (N, 1), broadcasting over channels.
    return table[t].unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# Noise with one generator per image (diffusers' convention)

def randn_rows(shape, generator, device, dtype=None):
    """Standard normal noise (shape). generator: None, one torch.Generator, or a list of G, one
    per image: then the rows are G equal blocks (image j's rows in block j) and block j is drawn
    from generator j alone, so an image's noise is exactly what a batch of that image alone
    would draw from its generator."""
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
    """A discrete Gaussian diffusion over len(betas) steps, with eps-prediction and learned-range
    variance. Not an nn.Module: it has no parameters, and keeping its tables out of the module
    keeps them out of state_dict (the checkpoints hold only `net.*`) and away from
    `module.to(bfloat16)`, which would ruin alpha_bar values close to 1.

    The tables live in float64 on the CPU and are copied to the working device as float32
    once per call (the reference also computes them in float64 and uses them in float32).

    timestep_map[i] is the original (1000-step) index of step i. The net always sees original
    indices, which is what lets one net serve the 1000-step training chain and the respaced
    sampling chain.
    """

    def __init__(self, betas, timestep_map=None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D sequence of values in (0, 1]")
        T = betas.shape[0]
        self.num_timesteps = T
        self.timestep_map = (torch.arange(T) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long))
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)                 # alpha_bar_t
        ac, ac_prev = self.alphas_cumprod, torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance)
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is exactly 0 at t = 0; its log is clipped to the t = 1 value.
        # (A 1-step chain has no t = 1; there the value is never used, since t = 0 adds no
        # noise and gets the decoder term, so log(beta) stands in.)
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
        """The chain that keeps only the original steps `keep`, with the same marginals.

        Each kept step jumps from the previous kept step, so its beta is
        1 - alpha_bar[k_i] / alpha_bar[k_{i-1}]; the new chain's alpha_bar then equals the
        original one at every kept step, and q(x_t | x0) is unchanged there.
        """
        alphas_cumprod = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
        keep = sorted(set(int(k) for k in keep))
        if not keep or keep[0] < 0 or keep[-1] >= len(alphas_cumprod):
            raise ValueError(f"respaced: kept steps must lie in [0, {len(alphas_cumprod)}), got {keep[:3]}...")
        kept = alphas_cumprod[keep]                                          # (N,)
        prev = torch.cat([kept.new_ones(1), kept[:-1]])
        return cls(1.0 - kept / prev, timestep_map=keep)

    def tables_on(self, device):
        return {k: v.to(device=device, dtype=torch.float32) for k, v in self.tables.items()}

    # --- the forward process and its posterior ------------------------------------------------

    def q_sample(self, x0, t, noise, tab):
        # x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps                (N, C)
        return _at(tab["sqrt_ac"], t) * x0 + _at(tab["sqrt_one_minus_ac"], t) * noise

    def q_posterior(self, x0, x_t, t, tab):
        # mean and clipped log-variance of q(x_{t-1} | x_t, x0)                 (N, C) each
        mean = _at(tab["posterior_coef1"], t) * x0 + _at(tab["posterior_coef2"], t) * x_t
        return mean, _at(tab["posterior_log_variance"], t).expand_as(x_t)

    def p_mean_log_variance(self, out, x_t, t, tab, clip_x0=0.0):
        """The model's Gaussian p(x_{t-1} | x_t) from the net output (N, 2C) = cat(eps, v).
        clip_x0 > 0 clamps the x0 estimate to [-clip_x0, clip_x0] (see DiffLoss)."""
        eps, v = out.chunk(2, dim=-1)                                        # (N, C) each
        # Learned range: v in [-1, 1] interpolates the log-variance between the posterior
        # variance (the lower bound, v = -1) and beta_t (the upper bound, v = +1).
        frac = (v + 1) / 2
        log_variance = (frac * _at(tab["log_betas"], t)
                        + (1 - frac) * _at(tab["posterior_log_variance"], t))
        # Mean: estimate x0 from eps, then plug it into the true posterior's mean. The
        # reference never clips x0 (latent tokens have no [-1, 1] range); clip_x0 is ours.
        x0_hat = _at(tab["sqrt_recip_ac"], t) * x_t - _at(tab["sqrt_recipm1_ac"], t) * eps
        if clip_x0 > 0:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        mean, _ = self.q_posterior(x0_hat, x_t, t, tab)
        return mean, log_variance

    # --- training -----------------------------------------------------------------------------

    def training_losses(self, model_fn, x0, t, noise=None):
        """Hybrid loss per token (N,): MSE(eps) + L_vlb, the improved-DDPM "learned range" recipe.

        model_fn(x_t (N, C), t_original (N,)) -> (N, 2C). t indexes this chain's steps.
        The reference's MAR configuration is loss type "MSE" with a learned-range variance:
        the loss is mse + vb (vb in bits, not rescaled), where vb is
            KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))   for t > 0
            -log p(x0 | x_1) (discretised Gaussian)        for t = 0
        and the mean inside vb uses a detached eps: the VLB trains only the variance, and
        the mean is trained by the (better-behaved) MSE alone.
        """
        x0 = x0.float()
        noise = torch.randn_like(x0) if noise is None else noise.float()
        tab = self.tables_on(x0.device)
        x_t = self.q_sample(x0, t, noise, tab)                               # (N, C)
        out = model_fn(x_t, self.timestep_map.to(x0.device)[t]).float()      # (N, 2C)
        eps, v = out.chunk(2, dim=-1)
        mse = ((noise - eps) ** 2).mean(dim=-1)                              # (N,)

        frozen = torch.cat([eps.detach(), v], dim=-1)
        mean_p, log_var_p = self.p_mean_log_variance(frozen, x_t, t, tab)
        mean_q, log_var_q = self.q_posterior(x0, x_t, t, tab)
        kl = normal_kl(mean_q, log_var_q, mean_p, log_var_p).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x0, means=mean_p, log_scales=0.5 * log_var_p).mean(dim=-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)                                     # (N,) bits
        return mse + vb

    # --- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def p_sample_loop(self, model_fn, noise, temperature=1.0, generator=None, clip_x0=0.0):
        """Ancestral sampling from x_T = noise (N, C) down to x_0; returns (N, C) float32.

        Each step draws x_{t-1} ~ N(mean, temperature^2 * variance); temperature < 1 gives
        sharper, less diverse tokens (MAR scales the per-step noise, not the initial noise).
        The last step (t = 0) returns the mean. generator: None, one torch.Generator, or a
        list of G (one per image; the N rows are G equal blocks, see randn_rows). clip_x0: see
        p_mean_log_variance.
        """
        x = noise.float()
        n, device = x.shape[0], x.device
        tab = self.tables_on(device)
        tmap = self.timestep_map.to(device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, dtype=torch.long, device=device)
            out = model_fn(x, tmap[t]).float()                              # (N, 2C)
            mean, log_variance = self.p_mean_log_variance(out, x, t, tab, clip_x0)
            if i == 0:
                x = mean
            else:
                z = randn_rows(x.shape, generator, device, x.dtype)           # (N, C)
                x = mean + torch.exp(0.5 * log_variance) * z * temperature  # (N, C)
        return x


# ----------------------------------------------------------------------------------------------
# DiffLoss: what MaskGen-KL holds

NUM_TRAIN_TIMESTEPS = 1000


class DiffLoss(nn.Module):
    """Diffusion loss and sampler for continuous tokens (MAR §3; MaskGen-KL, paper §3.3).

    target_channels C: channels of one token (16 for the released KL tokenizers).
    z_channels Zc: width of the transformer's per-token condition.
    depth, width: residual blocks and width of the MLP (MaskGen-KL: 8 x transformer width).
    num_sampling_steps: respacing of the 1000 training steps used by sample() ("100").
    clip_x0: 0 (the reference) or a bound on the sampler's x0 estimates, in token units.
      At the first steps of the cosine schedule sqrt(alpha_bar) is ~1e-4, so x0 = (x_t -
      sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies any error in eps by ~1e4: a
      fully trained net predicts eps = x_t there almost exactly, but after a short run a
      small eps error sends the tokens far out of range, where the net's eps saturates and
      never brings them back (tokens ~1e4, a blank decoded canvas). A bound of a few token
      standard deviations keeps the chain in range. Training is unchanged.
    """

    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps="100", clip_x0=0.0):
        super().__init__()
        for name, value in (("target_channels", target_channels), ("z_channels", z_channels),
                            ("depth", depth), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiffLoss: {name} must be a positive int, got {value!r}")
        if not clip_x0 >= 0:
            raise ValueError(f"DiffLoss: clip_x0 must be >= 0 (0 = no clipping), got {clip_x0!r}")
        self.target_channels, self.z_channels, self.clip_x0 = target_channels, z_channels, float(clip_x0)
        # Output 2C: eps (C) and the variance interpolation v (C).
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth)
        betas = cosine_betas(NUM_TRAIN_TIMESTEPS)
        self.train_diffusion = GaussianDiffusion(betas)
        self.gen_diffusion = GaussianDiffusion.respaced(betas, space_timesteps(NUM_TRAIN_TIMESTEPS, num_sampling_steps))

    def _check_z(self, z, rows, where):
        if z.ndim != 2 or z.shape[1] != self.z_channels or (rows is not None and z.shape[0] != rows):
            want = f"({rows if rows is not None else 'N'}, {self.z_channels})"
            raise ValueError(f"DiffLoss.{where}: z must be {want}, got {tuple(z.shape)}; flatten "
                             f"(B, K, D) conditions to (B*K, D) and match the transformer width")

    def forward(self, target, z, mask=None):
        """Mean diffusion loss over the tokens with mask 1 (all tokens if mask is None).

        target (N, C) clean tokens, z (N, Zc) their conditions, mask (N,) float weights.
        One random step t and one noise draw per token (global RNG: t first, then noise).
        """
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
        # Masked mean. The denominator's clamp only matters for an all-zero mask, which then
        # gives loss 0 instead of NaN (no host sync to check it).
        return (loss * mask).sum() / mask.sum().clamp(min=torch.finfo(loss.dtype).tiny)

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, generator=None, denoise=None):
        """Draw one token per row of z by reverse diffusion. Returns (N, C) float32.

        cfg: a Python 1.0 means no guidance (z is N conditions). Anything else (a float or a
        tensor, 0-d or one value per cond row) means z is [cond; uncond] (2M rows) and the
        guided noise estimate eps = uncond + cfg * (cond - uncond) is used; the result has 2M
        rows, both halves the same guided sample. A tensor cfg always takes the guided path,
        so a per-step schedule never forces a host sync.
        generator: an optional torch.Generator on z's device, for reproducible samples; or a
        list of G, one per image, when the (cond) rows are G equal blocks, one per image: each
        block's noise then comes from its own generator only (randn_rows), so an image's
        tokens do not depend on the other images in the batch. Each generator is checked here,
        so DiffLoss stands alone.
        denoise: the residual MLP to run, net.denoise or a compiled version of it (MaskGenKL
        passes a torch.compile'd one under generate(compile=...)).
        """
        self._check_z(z, None, "sample")
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
        # The same result as net(x, ts, z) at every step, for less work: z is fixed for the
        # whole chain, so its embedding is computed once, not at each of the 100 steps; and
        # every row is at the same step, so t is embedded for one row and broadcast.
        z_emb = net.cond_embed(z)                                             # (N, W)

        def fn(x, ts):
            return denoise(x.to(z.dtype), net.time_embed(ts[:1]) + z_emb)   # (N, 2C)

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
            # x (M, C) is the one shared state. Both halves of the net's batch see the same
            # x_t and t, and differ only by their condition.
            out = fn(torch.cat([x, x]), ts).float()
            eps, v = out[:, :C], out[:, C:]                                  # (2M, C) each
            cond_eps, uncond_eps = eps[:m], eps[m:]
            # Guidance acts on eps only; the variance comes from the conditional half (as
            # the reference's forward_with_cfg, where the cond rows keep their own v).
            return torch.cat([uncond_eps + cfg * (cond_eps - uncond_eps), v[:m]], dim=-1)

        # The reference carries 2M rows whose uncond half drifts with its own noise and is then
        # thrown away by the caller. We carry only the M guided rows (same cond-half result for
        # the same noise) and return them twice, so either half is the guided sample.
        noise = randn_rows((m, C), generator, z.device)                      # (M, C)
        x = self.gen_diffusion.p_sample_loop(guided_fn, noise, temperature, generator, self.clip_x0)  # (M, C)
        return torch.cat([x, x])                                              # (2M, C)

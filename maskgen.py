"""
MaskGen: text-to-image masked generative models on compact 1D tokens.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact
Text-Aware One-Dimensional Tokens" (Kim et al., arXiv 2501.07730), §3 (masked
generation, diffusion loss), §4.2 (MaskGen), Tab. 1 (model sizes), Tab. 8
(training hyper-parameters).

MaskGen generates the K tokens of a TA-TiTok image (tokenizer.py) from a caption,
by iterative unmasking: start from K [MASK] tokens and, over a few steps, fill in the
tokens the model is most sure of. Two variants share one transformer trunk:

    MaskGen-VQ  discrete ids (K = 128, codebook 8192). Tokens are embedded from a
                table, the head is the same table (weight tying), training is
                cross-entropy on masked ids (MaskGIT / Muse), and sampling is
                MaskGIT's confidence-based parallel decoding.
    MaskGen-KL  continuous tokens (K = 32, C = 16). Tokens are linearly projected
                in; each output position becomes a condition z for a small
                per-token diffusion MLP (DiffLoss, from MAR, in diffloss.py) that
                models the token's distribution. Sampling is MAR's random-order
                decoding.

The trunk (mmdit.MMDiT) turns the caption's CLIP states and pooled embedding, plus an
aesthetic score, and the K tokens (B, K, D) into (B, K, D): VQ reads logits over the
codebook from it, KL per-token conditions for DiffLoss. This file adds the token layers,
the losses, the decoding loops and their schedules. The release format is in
checkpoint.py.

Public API:
    model = MaskGen(PRESETS["maskgen_vq_l"])          # a MaskGenVQ or MaskGenKL by config.mode
    model = checkpoint.load_generator("turkeyju/generator_maskgen_kl_l")   # a release (dir or Hub id)
    loss = model(tokens, text, pooled, aesthetic)     # training; VQ tokens (B,K) long,
                                                      # KL tokens (B,K,2C) = cat(mean, logvar)
    tokens = model.generate(text, pooled, null_text, null_pooled, aesthetic=6.5)
        # -> VQ (B,K) ids | KL (B,K,C) unscaled, ready for TATiTok.decode
    text/pooled are text.TextEncoder(...)(captions).penultimate / .pooled; null_* the "" caption's.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffloss import DiffLoss, check_generators, draw_rows
from mmdit import FUSED_QKV, AdaLNContinuous, MMDiT
from schedules import (
    arccos_mask_rate, check_guidance_schedule, gumbel, kl_draw_schedule, kl_guidance_scale, vq_guidance_scale,
    vq_mask_schedule,
)  # fmt: skip

# -----------------------------------------------------------------------------
# Config and the models.


@dataclass
class MaskGenConfig:
    mode: str = "vq"  # "vq": discrete ids + cross-entropy; "kl": continuous tokens + DiffLoss
    # Transformer (paper Tab. 1: L = 16 x 1024, XL = 20 x 1280, 16 heads; MLP ratio 4).
    width: int = 1024
    depth: int = 16
    heads: int = 16
    # Tokens, as the TA-TiTok tokenizer produces them.
    num_tokens: int = 128  # K
    codebook_size: int = 8192  # VQ: ids 0..V-1; id V is [MASK]
    num_class_rows: int = 1000  # VQ: unused embedding rows the released table carries
    token_size: int = 16  # KL: channels C per token (VQ: the tokenizer's, unused here)
    scale_factor: float = 0.7525  # KL: tokens are multiplied by this before the model
    pos_init_std: float = 0.02  # KL: init std of the position tables and the mask token (official 0.02)
    kl_tokens: str = "sample"  # KL: train on a fresh posterior "sample" each time (official) or its "mean"
    # Conditioning: CLIP ViT-L/14 penultimate states (B, 77, text_width), pooled (B, pooled_dim).
    text_width: int = 768
    pooled_dim: int = 768
    aes_embed_dim: int = 256  # sinusoidal aesthetic-score features; 0 = no score condition
    # Training (Tab. 8 and the official configs).
    label_smoothing: float = 0.1  # VQ
    unmasked_weight: float = 0.1  # VQ: loss weight of tokens that were not masked
    diffloss_depth: int = 8  # KL: DiffLoss MLP blocks x width (= transformer width)
    diffloss_width: int = 1024
    diffusion_batch_mul: int = 4  # KL: each token is seen with 4 noise levels per step
    num_sampling_steps: str = "100"  # KL: DiffLoss respacing at sampling time
    diffloss_clip_x0: float = 0.0  # KL: bound on the sampler's x0 estimates; 0 = none, as the reference (see DiffLoss)
    # generate() defaults (the official inference configs).
    num_steps: int = 16  # VQ 16, KL 32
    guidance_scale: float = 12.0  # VQ 12, KL 3
    guidance_schedule: str = "cosine"  # VQ: cosine | linear | none;  KL: linear | constant
    randomize_temperature: float = 2.0  # VQ: Gumbel temperature, annealed to 0
    temperature: Optional[float] = None  # VQ: None = annealed softmax temperature; KL: 1.0
    aesthetic: float = 6.5  # default aesthetic score when none is given

    def __post_init__(self):
        if self.mode not in ("vq", "kl"):
            raise ValueError(f"MaskGenConfig.mode must be 'vq' or 'kl', got {self.mode!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.kl_tokens not in ("sample", "mean"):
            raise ValueError(f"MaskGenConfig.kl_tokens must be 'sample' or 'mean', got {self.kl_tokens!r}")
        if self.mode == "kl" and self.aes_embed_dim % 2:
            raise ValueError(
                f"the KL aesthetic embedding interleaves sin/cos; aes_embed_dim must be even, got {self.aes_embed_dim}"
            )
        check_guidance_schedule(self.mode, self.guidance_schedule)


class MaskGen(MMDiT):
    """The MM-DiT trunk with what both variants share: dispatch, compiling, FLOPs, generate().

    MaskGen(config) returns a MaskGenVQ or a MaskGenKL according to config.mode, so a
    preset or a loaded config builds the right variant without the caller choosing.
    """

    def __new__(cls, config=None, *args, **kwargs):
        if cls is MaskGen:
            if not isinstance(config, MaskGenConfig):
                raise TypeError(
                    f"MaskGen(config) needs a MaskGenConfig, got {type(config).__name__}; use PRESETS[name]"
                )
            cls = MaskGenVQ if config.mode == "vq" else MaskGenKL
        return super().__new__(cls)

    def __init__(self, config, init_weights=True):
        if config.mode != self.mode:
            raise ValueError(
                f"{type(self).__name__} needs a config with mode={self.mode!r}, got {config.mode!r}; use MaskGen(config)"
            )
        super().__init__(config)  # the MM-DiT trunk
        self._token_layers(config)  # the variant's own input / output layers
        if init_weights:  # False when a checkpoint overwrites every weight anyway
            self.initialize_weights()

    def compile_sampling(self, **compile_kw):
        """torch.compile the per-step work of generate(); its Python loop stays eager (it
        only does index bookkeeping). VQ: the trunk and LM head (`predict`), whose shapes
        are the same at every step, so it compiles once. KL: the trunk
        (`token_conditions`, static too) and the DiffLoss MLP, compiled with dynamic rows
        because each step draws a different number of tokens (DiffLoss.sample runs its
        `denoise`). Set as instance attributes, so the weights and state_dict keys are
        untouched."""
        if self.config.mode == "vq":
            self.predict = torch.compile(self.predict, fullgraph=True, **compile_kw)
        else:
            self.token_conditions = torch.compile(self.token_conditions, fullgraph=True, **compile_kw)
            net = self.diffloss.net
            compiled = torch.compile(net.denoise, fullgraph=True, **compile_kw)

            def denoise(x, y):  # only the row count varies: one graph for every count
                for a in (x, y):
                    torch._dynamo.maybe_mark_dynamic(a, 0)
                return compiled(x, y)

            net.denoise = denoise
        return self

    # --- FLOP counts (for MFU in the trainers and bench.py) ----------------------

    def flops(self, text_len):
        """Forward FLOPs per sample, counted from the config, for a text stream of
        text_len tokens (77 for CLIP). 2 FLOPs per multiply-add of every matmul, plus
        attention's QK^T and AV; norms, activations and softmax are left out (the usual
        MFU convention, and torch.utils.flop_counter's, which the tests compare against).

        Returns {"condition": text + pooled projections and every adaLN modulation
                              (prompt-only: once per generate() call),
                 "step": one trunk pass over the K tokens incl. the token in/out layers,
                 "diffloss_row": one DiffLoss MLP pass for one token row (KL; else 0),
                 "diffloss_time", "diffloss_cond": the part of a row that is the timestep
                              MLP, and the condition embedding (sampling computes them
                              once per step and once per chain, see DiffLoss.sample)}."""
        c, D, N = self.config, self.config.width, self.config.num_tokens
        condition, step = self.trunk_flops(N, text_len)
        row = time = cond = 0
        if c.mode == "vq":
            step += 2 * N * D * c.codebook_size  # the tied LM head
        else:
            step += 2 * N * c.token_size * D  # z_proj
            W, C = c.diffloss_width, c.token_size
            time, cond = 2 * 256 * W + 2 * W * W, 2 * D * W  # timestep MLP, condition embedding
            row = 2 * C * W + time + cond  # + the input projection
            row += c.diffloss_depth * 10 * W * W + 4 * W * W + 2 * W * 2 * C  # res blocks, final layer
        return {"condition": condition, "step": step, "diffloss_row": row, "diffloss_time": time, "diffloss_cond": cond}

    def train_flops(self, text_len):
        """FLOPs of one training step per sample: 3x the forward (the backward is ~2x)."""
        f = self.flops(text_len)
        rows = self.config.diffusion_batch_mul * self.config.num_tokens  # KL: each token m times
        return 3 * (f["condition"] + f["step"] + rows * f["diffloss_row"])

    def generate_flops(self, text_len, num_steps=None, guided=True, batch=1):
        """FLOPs of generate() per image: the conditions once, then one trunk pass per
        step (both CFG halves when guided). KL adds, for each of the K tokens, one
        DiffLoss MLP pass per respaced diffusion step, less the condition embedding
        (once per token) and the timestep MLP (one row per step, shared by the `batch`
        images of one generate() call)."""
        c, f, halves = self.config, self.flops(text_len), 2 if guided else 1
        steps = c.num_steps if num_steps is None else num_steps
        if c.mode == "vq":
            return halves * (f["condition"] + steps * f["step"])
        draws, T = len(kl_draw_schedule(c.num_tokens, steps)), self.diffloss.gen_diffusion.num_timesteps
        total = halves * (f["condition"] + draws * f["step"])  # KL: steps that draw nothing are skipped
        per_step = f["diffloss_row"] - f["diffloss_time"] - f["diffloss_cond"]
        total += halves * c.num_tokens * (T * per_step + f["diffloss_cond"])
        return total + draws * T * f["diffloss_time"] / batch

    @torch.no_grad()
    def generate(
        self, text, pooled, null_text=None, null_pooled=None, aesthetic=None, num_steps=None, guidance_scale=None,
        guidance_schedule=None, randomize_temperature=None, temperature=None, generator=None, guidance_scale_pow=1.0,
    ):  # fmt: skip
        """Tokens for B captions, by iterative unmasking: VQ ids (B, K) in [0, V) (MaskGIT
        decoding), or KL tokens (B, K, C) (MAR decoding). Either goes straight into
        TATiTok.decode. Each variant's _decode describes its loop; None = the config's
        value (the official inference configs).

        text (B, L, Dt), pooled (B, Dp): the captions' CLIP features; null_text,
            null_pooled: the "" caption's (one row or B rows), needed when guided.
        aesthetic: a number or (B,) scores (None: config default 6.5). Unlike the
            official generate(), which ignores the score it is given and always uses the
            config's (a bug), the caller's score is used, guided or not.
        guidance_scale: classifier-free guidance, ramped by guidance_schedule (VQ: cosine |
            linear | none; KL: linear | constant). 1.0 means NO guidance: one conditional
            pass per step, no unconditional batch.
        randomize_temperature (VQ), temperature, guidance_scale_pow (VQ): see _decode.
        generator: optional torch.Generator on the inputs' device, for reproducibility; or
            a list of B of them, one per image (diffusers' convention): image b's random
            draws then come from generator[b] alone, so it equals image 0 of a call for
            caption b alone with an identically seeded generator (float rounding of the
            batched matmuls aside), whatever else is in the batch.
        """
        c = self.config
        g = float(c.guidance_scale if guidance_scale is None else guidance_scale)
        schedule = c.guidance_schedule if guidance_schedule is None else guidance_schedule
        check_guidance_schedule(c.mode, schedule)
        check_number("guidance_scale", g)
        generator = check_generators(generator, text.device, count=text.shape[0])
        txt, cond = self._prompt_conditions(text, pooled, null_text, null_pooled, aesthetic, g != 1.0)  # once
        mods = self.modulations(cond)  # once: every step reuses them
        N = c.num_steps if num_steps is None else int(num_steps)
        return self._decode(txt, cond, mods, text.shape[0], N, g, schedule, generator,
                            randomize_temperature, temperature, guidance_scale_pow)  # fmt: skip


class MaskGenVQ(MaskGen):
    """MaskGen over discrete TA-TiTok ids: embedding table in, the same table out."""

    mode = "vq"

    def _token_layers(self, config):
        V, D = config.codebook_size, config.width
        # Rows: V codes, then [MASK] (id V), then num_class_rows + 1 rows the released
        # table carries from the class-conditional MaskGIT code (unused here, kept so
        # the released weights load unchanged).
        self.mask_id = V
        self.tok_emb = nn.Embedding(V + 1 + config.num_class_rows + 1, D)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.num_tokens, D))

    def initialize_weights(self):
        # The official init: truncated normal(0.02) for linears, embeddings and the
        # position table, zero biases; only the AdaLNContinuous maps (final norm, last
        # block's text norm) start at zero. The adaLN-Zero maps are NOT zeroed.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        for m in self.modules():
            if isinstance(m, AdaLNContinuous):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)

    @property
    def head_weight(self):
        """The LM head: a view of the first V embedding rows (weight tying, shared storage)."""
        return self.tok_emb.weight[: self.config.codebook_size]  # (V, D)

    def predict(self, ids, txt, cond, mods=None):
        """ids (B, K) with [MASK] = V, txt (B, L, D), cond (B, D) -> logits (B, K, V).
        mods: the precomputed self.modulations(cond), if any."""
        x = self.tok_emb(ids) + self.pos_emb[:, : ids.shape[1]]  # (B, K, D)
        x = self.trunk(x, txt, cond, mods)  # (B, K, D)
        return torch.matmul(x, self.head_weight.t())  # (B, K, V)

    def logits(self, ids, text, pooled, aesthetic=None):
        """Logits for given (possibly masked) ids, from raw CLIP features: (B, K, V)."""
        self._check_ids(ids)
        txt, cond = self.encode_condition(text, pooled, aesthetic)
        return self.predict(ids, txt, cond)

    def _check_ids(self, ids):
        K = self.config.num_tokens
        if ids.dim() != 2 or ids.shape[1] != K or ids.dtype != torch.long:
            raise ValueError(
                f"VQ tokens must be a (B, {K}) LongTensor of code ids, got {tuple(ids.shape)} {ids.dtype}; "
                f"use TATiTok.encode(images)"
            )

    def forward(self, tokens, text, pooled, aesthetic=None):
        """Training loss for clean ids (B, K): mask, predict, weighted cross-entropy."""
        self._check_ids(tokens)
        B, K = tokens.shape
        # Masking rate per sample from the arccos schedule, at least one token masked.
        rate = arccos_mask_rate(torch.rand(B, device=tokens.device)).clamp(1e-6, 1.0)  # (B,)
        n_masked = (K * rate).round().clamp(min=1)  # (B,)
        # A random permutation per sample; positions whose rank is < n_masked are masked.
        rank = torch.rand(B, K, device=tokens.device).argsort(dim=-1)  # (B, K)
        masked = rank < n_masked[:, None]  # (B, K) bool
        ids = torch.where(masked, self.mask_id, tokens)

        logits = self.logits(ids, text, pooled, aesthetic)  # (B, K, V)
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), tokens.flatten(), label_smoothing=self.config.label_smoothing,
            reduction="none",
        ).view(B, K)  # fmt: skip
        # Every token is a target: masked ones with weight 1, visible ones (copying the
        # input) with weight 0.1; normalised by the total weight over the batch.
        w = torch.where(masked, 1.0, self.config.unmasked_weight)
        return (ce * w).sum() / w.sum()

    def _decode(self, txt, cond, mods, B, N, g, schedule, generator, randomize_temperature, temperature, power):
        """MaskGIT-style decoding (official defaults: 16 steps, guidance 12 with cosine ramp,
        randomize temperature 2). Returns ids (B, K) in [0, V).

        Each step predicts all tokens, samples ids for the masked ones (Gumbel-max with a
        temperature annealed to 0), and re-masks the least confident of them, fewer
        each step (arccos schedule), until none is left.

        guidance: logits = cond + (cond - uncond) * s, the official formula, with s ramped
            from 1 to g by the schedule (vq_guidance_scale; power: the cosine ramp's
            exponent). At g = 1 the official would still run both passes and use
            2*cond - uncond; every other scale matches the official exactly.
        randomize_temperature: Gumbel noise temperature, times (1 - step ratio); 0 gives
            deterministic decoding (equal to the official's).
        temperature: None = the official annealed softmax temperature 0.5 + 0.8 (1 - ratio);
            a number = that constant softmax temperature.
        """
        c = self.config
        rand_t = float(c.randomize_temperature if randomize_temperature is None else randomize_temperature)
        temperature = c.temperature if temperature is None else temperature
        check_number("randomize_temperature", rand_t)
        check_number("temperature", temperature, positive=True)  # it divides the logits
        device, K, guided = txt.device, c.num_tokens, g != 1.0
        remasked = vq_mask_schedule(K, N)
        # Gumbel noise; with one generator per image, image b's rows come from generator b.
        noise = lambda shape, gen: gumbel(shape, gen, device)  # noqa: E731
        ids = torch.full((B, K), self.mask_id, dtype=torch.long, device=device)
        for step in range(N):
            ratio = (step + 1) / N
            if guided:
                both = self.predict(torch.cat([ids, ids]), txt, cond, mods)  # (2B, K, V)
                cond_logits, uncond_logits = both[:B], both[B:]
                s = vq_guidance_scale(g, schedule, ratio, power)
                logits = cond_logits + (cond_logits - uncond_logits) * s  # (B, K, V)
            else:
                logits = self.predict(ids, txt, cond, mods)  # (B, K, V)
            logits = logits / (0.5 + 0.8 * (1 - ratio) if temperature is None else temperature)

            # Sample ids by Gumbel-max; the noise temperature anneals to 0 at the last step.
            noise_t = rand_t * (1 - ratio)
            noisy = logits + noise_t * draw_rows(noise, logits.shape, generator) if noise_t > 0 else logits
            sampled = noisy.argmax(dim=-1)  # (B, K)
            is_mask = ids == self.mask_id
            sampled = torch.where(is_mask, sampled, ids)  # already decoded tokens stay
            if step == N - 1:
                return sampled

            # Confidence = the chosen id's logit, plus fresh Gumbel noise (sampling which
            # tokens to keep, without replacement); decoded tokens are never re-masked.
            confidence = logits.gather(-1, sampled[..., None]).squeeze(-1)  # (B, K)
            confidence = torch.where(is_mask, confidence, torch.inf)
            if noise_t > 0:
                confidence = confidence + noise_t * draw_rows(noise, confidence.shape, generator)
            # Re-mask exactly the `remasked[step]` least confident tokens (a fixed count,
            # so the shapes are static; the official's `<= cut-off` picks the same set
            # unless two confidences tie exactly).
            low = confidence.topk(remasked[step], dim=-1, largest=False).indices  # (B, n)
            ids = sampled.scatter(1, low, self.mask_id)
        return ids  # only reached with num_steps == 0


class MaskGenKL(MaskGen):
    """MaskGen over continuous TA-TiTok tokens (MAR-style decoder + DiffLoss)."""

    mode = "kl"

    def _token_layers(self, config):
        C, D, K = config.token_size, config.width, config.num_tokens
        self.z_proj = nn.Linear(C, D)  # token (C) -> width
        self.z_norm = nn.LayerNorm(D, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_emb = nn.Parameter(torch.zeros(1, K, D))  # added before the blocks
        self.diff_pos_emb = nn.Parameter(torch.zeros(1, K, D))  # added to the conditions for DiffLoss
        self.diffloss = DiffLoss(C, D, config.diffloss_depth, config.diffloss_width,
                                 num_sampling_steps=config.num_sampling_steps, clip_x0=config.diffloss_clip_x0)

    def initialize_weights(self):
        # The official (and MAR's) init: normal(0.02) for the mask token and position
        # tables, then Xavier-uniform for EVERY linear with zero biases, and unit
        # LayerNorms. That pass also covers the DiffLoss MLP and so replaces its own
        # zero-init of the adaLN and output layers, exactly as in the official model.
        for p in (self.mask_token, self.pos_emb, self.diff_pos_emb):
            nn.init.normal_(p, std=self.config.pos_init_std)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                # A fused q|k|v Linear gets Xavier block by block: the same distribution as
                # the official separate (D, D) projections (fan-out D, not 3D).
                short = name.rpartition(".")[2]
                with torch.no_grad():
                    for w in m.weight.chunk(len(FUSED_QKV[short]) if short in FUSED_QKV else 1):
                        nn.init.xavier_uniform_(w)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def token_conditions(self, x, mask, txt, cond, mods=None):
        """The per-token conditions z that DiffLoss is conditioned on.

        x (B, K, C) scaled tokens (values at masked positions are ignored), mask (B, K)
        with 1 = masked, txt (B, L, D), cond (B, D) -> z (B, K, D). mods: the
        precomputed self.modulations(cond), if any.
        """
        x = self.z_norm(self.z_proj(x))  # (B, K, D)
        # The official drops the visible tokens and pads them back MAE-style; with no
        # separate encoder that is exactly "replace masked positions by the mask token".
        x = torch.where(mask[..., None].bool(), self.mask_token.to(x.dtype), x)
        x = self.trunk(x + self.pos_emb, txt, cond, mods)  # (B, K, D)
        return x + self.diff_pos_emb  # (B, K, D)

    def forward(self, tokens, text, pooled, aesthetic=None):
        """Training loss. tokens: (B, K, 2C) posterior parameters cat(mean, logvar), as
        TATiTok.encode(..., return_posterior=True) gives them; a sample is drawn here (or
        the mean is taken, kl_tokens="mean"). (B, K, C) is taken as the tokens themselves."""
        c = self.config
        B, K, C = tokens.shape[0], c.num_tokens, c.token_size
        if tokens.dim() != 3 or tokens.shape[1] != K or tokens.shape[2] not in (C, 2 * C):
            raise ValueError(
                f"KL tokens must be (B, {K}, {2 * C}) = cat(mean, logvar) or (B, {K}, {C}), "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.shape[2] == 2 * C:
            mean, logvar = tokens.float().chunk(2, dim=-1)  # (B, K, C) each
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the LDM Gaussian's clamp
            # kl_tokens="mean" drops the posterior noise: the target is the tokenizer's mean.
            x = mean + std * torch.randn_like(mean) if c.kl_tokens == "sample" else mean
        else:
            x = tokens.float()
        x = x * c.scale_factor  # (B, K, C), the diffusion target

        txt, cond = self.encode_condition(text, pooled, aesthetic)
        # One masking rate for the whole batch (arccos schedule, at least one token), as
        # the official and MAR; the order in which tokens get masked is per sample. The
        # count stays a 0-d tensor: no host sync, and one compiled graph serves every count.
        rate = arccos_mask_rate(torch.rand((), device=x.device)).clamp(1e-6, 1.0)
        n_masked = torch.ceil(K * rate)  # () float, in [1, K]
        order = torch.rand(B, K, device=x.device).argsort(dim=-1)  # (B, K)
        mask = (order.argsort(dim=-1) < n_masked).float()  # (B, K), 1 = masked: the first n_masked in the order

        z = self.token_conditions(x, mask, txt, cond)  # (B, K, D)
        # DiffLoss on every token, weighted by the mask, with each token's row repeated
        # diffusion_batch_mul times (more noise levels per forward pass). Row b*K + k of
        # target, z and mask all belong to token k of sample b. The official also passes
        # the pooled condition tiled with .repeat(K, 1), which lists samples in the
        # order 0..B-1, 0..B-1 (not each sample K times, as the token rows are) and,
        # as a `text_condition=` argument DiffLoss does not take, crashes (upstream
        # issue #117). z already carries the text condition, so nothing else is passed.
        m = c.diffusion_batch_mul
        target = x.reshape(B * K, C).repeat(m, 1)  # (m*B*K, C)
        z = z.reshape(B * K, -1).repeat(m, 1)  # (m*B*K, D)
        return self.diffloss(target, z, mask.reshape(B * K).repeat(m))

    def _decode(self, txt, cond, mods, B, N, g, schedule, generator, randomize_temperature, temperature, power):
        """MAR-style decoding (official defaults: 32 steps, cfg 3 with a linear ramp,
        temperature 1). Returns tokens (B, K, C), divided by scale_factor again, so
        they go straight into TATiTok.decode.

        Each sample gets a random order; at each step the next tokens in that order
        are drawn by DiffLoss, conditioned on the transformer's output at their
        positions. The number left masked after step s is floor(K cos(pi/2 (s+1)/N))
        (at least 1 until the last step). The counts are computed in Python beforehand
        (kl_draw_schedule), so the loop only gathers/scatters fixed-size index blocks:
        static shapes, no boolean indexing and no host syncs, and it runs under
        torch.compile.

        guidance: DiffLoss's eps-guidance uncond + s (cond - uncond); "linear" ramps
            s = 1 + (g - 1) (K - masked next) / K, "constant" keeps s = g (as the official,
            also at g = 1). randomize_temperature and power are VQ-only, not used here.
        temperature: DiffLoss noise temperature (None: config, 1.0).
        """
        c = self.config
        temperature = (1.0 if c.temperature is None else c.temperature) if temperature is None else temperature
        check_number("temperature", temperature)  # scales DiffLoss's noise: 0 = no noise
        device, K, C, D, guided = txt.device, c.num_tokens, c.token_size, c.width, g != 1.0
        # (B, K) generation order; with one generator per image, row b comes from generator b
        order = draw_rows(lambda shape, gen: torch.rand(shape, generator=gen, device=device), (B, K), generator)
        order = order.argsort(dim=-1)  # (B, K)
        tokens = torch.zeros(B, K, C, device=device)
        mask = torch.ones(B, K, device=device)  # 1 = still masked
        for lo, hi, left in kl_draw_schedule(K, N):
            s = kl_guidance_scale(g, schedule, K, left)
            # Masked positions are order[:, :hi]; this step draws order[:, lo:hi].
            idx = order[:, lo:hi]  # (B, n)
            n = hi - lo
            if guided:
                z = self.token_conditions(torch.cat([tokens, tokens]), torch.cat([mask, mask]), txt, cond, mods)
                z_idx = torch.cat([idx, idx])  # (2B, n)
            else:
                z = self.token_conditions(tokens, mask, txt, cond, mods)  # (B, K, D)
                z_idx = idx
            z = z.gather(1, z_idx[..., None].expand(-1, -1, D)).reshape(-1, D)  # ([2]B*n, D): [cond; uncond]
            new = self.diffloss.sample(z, temperature=temperature, cfg=s if guided else 1.0, generator=generator)
            new = new[: B * n].reshape(B, n, C)  # the guided (cond-half) samples
            tokens = tokens.scatter(1, idx[..., None].expand(-1, -1, C), new.to(tokens.dtype))
            mask = mask.scatter(1, idx, 0.0)
        return tokens / c.scale_factor  # (B, K, C)


def check_number(name, value, positive=False):
    """A sampling number of generate(): finite, and >= 0 (> 0 where `positive`); NaN or a
    wrong sign would not fail, only give garbage tokens."""
    if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"generate(): {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


# -----------------------------------------------------------------------------
# Presets (paper Tab. 1; tokens, codebook and scale factor from the official configs).

_VQ = dict(mode="vq", num_tokens=128, codebook_size=8192, token_size=64, num_steps=16, guidance_scale=12.0,
           guidance_schedule="cosine", randomize_temperature=2.0)  # fmt: skip
_KL = dict(mode="kl", num_tokens=32, token_size=16, scale_factor=0.7525, num_steps=32, guidance_scale=3.0,
           guidance_schedule="linear", temperature=1.0, diffloss_depth=8)  # fmt: skip

PRESETS = {
    "maskgen_vq_l": MaskGenConfig(width=1024, depth=16, heads=16, **_VQ),
    "maskgen_vq_xl": MaskGenConfig(width=1280, depth=20, heads=16, **_VQ),
    "maskgen_kl_l": MaskGenConfig(width=1024, depth=16, heads=16, diffloss_width=1024, **_KL),
    "maskgen_kl_xl": MaskGenConfig(width=1280, depth=20, heads=16, diffloss_width=1280, **_KL),
    # For tests: two blocks of width 64, a 64-entry codebook / 4-channel tokens, a
    # 32-wide text stream, and short sampling loops.
    "tiny_vq": MaskGenConfig(
        mode="vq", width=64, depth=2, heads=4, num_tokens=16, codebook_size=64, num_class_rows=10, token_size=8,
        text_width=32, pooled_dim=32, aes_embed_dim=16, num_steps=8, guidance_scale=3.0, randomize_temperature=1.0,
    ),
    "tiny_kl": MaskGenConfig(
        mode="kl", width=64, depth=2, heads=4, num_tokens=8, token_size=4, scale_factor=0.75, text_width=32,
        pooled_dim=32, aes_embed_dim=16, diffloss_depth=2, diffloss_width=64, num_sampling_steps="10", num_steps=4,
        guidance_scale=3.0, guidance_schedule="linear", temperature=1.0,
    ),
    # The shapes world: 32 tokens from tokenizer.PRESETS["shapes"/"shapes_kl"] and the
    # 64-wide "shapes" text tower (see train_maskgen's presets for the run lengths). VQ: four
    # 128-wide blocks (2.5M parameters with the 2,048-way head; 2.3M and 0.24 GFLOP per
    # training sample with a 512-way one): in a fixed hour the samples seen count for more
    # than width (5200 steps of 128x4 scored 0.88 / 0.63 / 0.70,
    # 2800 of 192x4 0.89 / 0.49 / 0.53, both at guidance 3, README), and more of them still
    # help (at 16 steps and guidance 2: 5200 steps 0.90 / 0.68 / 0.75, 9000 0.96 / 0.68 /
    # 0.85, 12600 0.96 / 0.78 / 0.86). Sampling: 32 steps (one token per step) at guidance
    # 1.5, chosen on prompts of another seed (evaluate.py shapes --seed 2000003 --sample-seed
    # 50000, 32 steps, overall: guidance 1.25 / 1.5 / 2 / 3 0.90 / 0.91 / 0.89 / 0.85; 16 / 24
    # / 32 steps at guidance 2, 200 prompts, 0.84 / 0.86 / 0.91): on the 12600-step model 0.99 / 0.83 / 0.92
    # against 0.96 / 0.78 / 0.86 at 16 steps and guidance 2 (300 held-out prompts/category).
    # The shipped model (12500 steps on the 2,048-code, 28,000-step tokenizer) scores 0.98 /
    # 0.90 / 0.92 at these defaults; the 512-code one of before (16000 steps) 0.99 / 0.91 / 0.89.
    "shapes_vq": MaskGenConfig(
        mode="vq", width=128, depth=4, heads=4, num_tokens=32, codebook_size=2048, num_class_rows=0, token_size=16,
        text_width=64, pooled_dim=64, aes_embed_dim=32, num_steps=32, guidance_scale=1.5, randomize_temperature=1.0,
    ),
    # KL: four 128-wide blocks (3.0M parameters with DiffLoss, 0.51 GFLOP per training
    # sample): as for VQ, a cheaper trunk that sees more samples wins (2700 steps of 128x4:
    # 0.58 / 0.27 / 0.04; 2200 of 128x6, 0.64 GFLOP: 0.52 / 0.18 / 0.01; 1800 of 192x4,
    # 0.80 GFLOP: 0.39 / 0.13 / 0.02; each about the same time, README); twice the steps
    # doubled the score (5400 of 128x4: 0.86 / 0.65 / 0.47 at guidance 3) and 7200 raised it
    # again (0.94 / 0.74 / 0.76; these at the 16-step sampling of before). The shipped model
    # has 10400 steps (0.99 / 0.87 / 0.94 at the sampling below; 8400 0.99 / 0.83 / 0.93, 7200
    # 0.98 / 0.82 / 0.87). DiffLoss on 2 noise levels per token (not 4) to cut the step cost,
    # and x0 clipped at sampling (diffloss_clip_x0: unclipped, the briefly trained DiffLoss
    # drew blanks).
    # pos_init_std 1.0, not 0.02: a visible token enters as LayerNorm(z_proj(token)), ~1 per
    # element, so a 0.02 position table hides which of the 32 positions it came from, and a
    # 1D token means nothing without its index. After 1800 steps at 0.02 a ridge from the
    # conditions z recovered R2 0.17 of a masked token's mean with half the tokens visible,
    # 0.61 at 1.0 (`python evaluate.py context`, README).
    # Sampling: 32 steps (the paper's KL count; one token per step here) and a constant
    # guidance of 3, where earlier models used 16 steps and a linear ramp: on the 7200-step
    # model 0.98 / 0.82 / 0.87 against 0.94 / 0.74 / 0.76 (300 held-out prompts/category).
    # Chosen on prompts of another seed (evaluate.py shapes --seed 2000003 --sample-seed
    # 50000), where at 32 steps the linear ramp scored 0.85 overall and constant guidance
    # 2 / 2.5 / 3 / 3.5 0.86 / 0.88 / 0.87 / 0.87. Temperature 0.5 (an earlier 192x4 model,
    # 100 prompts/category: 0.40 / 0.19 / 0.03 against 0.24 / 0.12 / 0.00 at 1.0; on the
    # 7200-step model 0.3 and 0.7 scored 0.88 and 0.87 on the other seed's prompts).
    "shapes_kl": MaskGenConfig(
        mode="kl", width=128, depth=4, heads=4, num_tokens=32, token_size=8, text_width=64, pooled_dim=64,
        aes_embed_dim=32, pos_init_std=1.0, diffloss_depth=3, diffloss_width=192, diffusion_batch_mul=2,
        num_sampling_steps="50", diffloss_clip_x0=3.0, num_steps=32, guidance_scale=3.0, guidance_schedule="constant",
        temperature=0.5,
    ),
}


def preset_for(name, tokenizer_config, text_width, pooled_dim):
    """PRESETS[name] fitted to its inputs: the preset gives the transformer sizes, the
    TA-TiTok config the token count, codebook and channels, the text encoder the widths."""
    t = tokenizer_config
    return dataclasses.replace(
        PRESETS[name], num_tokens=t.num_latent_tokens, codebook_size=t.codebook_size, token_size=t.token_size,
        text_width=text_width, pooled_dim=pooled_dim,
    )  # fmt: skip

"""MaskGen: text-to-image masked generative models on compact 1D tokens.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact Text-Aware
One-Dimensional Tokens" (Kim et al., arXiv 2501.07730): §3 (masked generation, diffusion
loss), §4.2 and Fig. 3 (MaskGen), Tab. 1 (model sizes), Tab. 8 (training hyper-parameters).

MaskGen generates the K tokens of a TA-TiTok image (tokenizer.py) from a caption by iterative
unmasking: from K [MASK] tokens, each step fills in those the model is most sure of.
    MaskGen-VQ  discrete ids (K = 128, codebook 8192), tied embedding / head, MaskGIT decoding.
    MaskGen-KL  continuous tokens (K = 32, C = 16); each output position conditions a per-token
                diffusion MLP (MAR's DiffLoss, diffloss.py); MAR's random-order decoding.
Both share an MM-DiT trunk (SD3): image tokens and CLIP text states as two streams with their own adaLN,
projections and MLP, and ONE joint attention, modulated by the pooled text embedding plus an aesthetic
score. A block is diffusers' `JointTransformerBlock` without qk-norm, as the official's. Read bottom-up.
Official names (config.json fields, weight keys) close the file; checkpoint.py reads and writes releases with them.

    model = build(PRESETS["maskgen_vq_l"])            # MaskGenVQ or MaskGenKL by config.mode
    model = checkpoint.load_generator("turkeyju/generator_maskgen_kl_l")   # a release (dir or Hub id)
    loss = model(tokens, text, pooled, aesthetic)     # VQ (B,K) long; KL (B,K,2C) = cat(mean, logvar)
    tokens = model.generate(text, pooled, null_text, null_pooled)  # VQ (B,K) ids | KL (B,K,C), for TATiTok.decode
    text/pooled: text.TextEncoder(...)(captions).penultimate / .pooled; null_*: the "" caption's.
    tokens = model.generate(text, pooled, null_text, null_pooled, init_tokens=ids, strength=0.5)  # image-to-image
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from diffloss import DiffLoss

# -----------------------------------------------------------------------------
# Adaptive LayerNorms: the pooled condition sets the normalisation's shift and scale.


class _AdaLN(nn.Module):
    """LayerNorm without affine, and silu(cond) (B, D) -> (B, n*D), prompt-only: generate() passes it as `mod`."""

    def __init__(self, dim):
        super().__init__()
        self.linear, self.norm = nn.Linear(dim, self.n * dim), nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulation(self, cond):
        return self.linear(F.silu(cond))


class AdaLNZero(_AdaLN):
    """adaLN-Zero (DiT): shift, scale, gate for attention, then the MLP (diffusers' order); modulates the input."""

    n = 6

    def forward(self, x, cond, mod=None):
        mod = self.modulation(cond) if mod is None else mod  # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)  # each (B, D)
        x = self.norm(x) * (1 + scale_a[:, None]) + shift_a[:, None]  # (B, T, D)
        return x, gate_a, shift_m, scale_m, gate_m


class AdaLNContinuous(_AdaLN):
    """(1 + scale) * LayerNorm(x) + shift (scale first, as diffusers): final and last text norm."""

    n = 2

    def forward(self, x, cond, mod=None):
        mod = self.modulation(cond) if mod is None else mod
        scale, shift = mod.chunk(2, dim=1)  # (B, D) each
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]  # (B, T, D)


# -----------------------------------------------------------------------------
# The MM-DiT joint block (SD3's MM-DiT, paper §4.2): two streams, one attention.
# FUSED_QKV: JointAttention's fused projections and the separate ones they stack, in row order.
FUSED_QKV = {"img_qkv": ("img_q", "img_k", "img_v"), "txt_qkv": ("txt_q", "txt_k", "txt_v"),
             "txt_kv": ("txt_k", "txt_v")}


class JointAttention(nn.Module):
    """Attention over [image, text], each stream with its own fused q|k|v Linear (one matmul). txt_queries=False
    (the last block, whose text outputs would be thrown away): text gives only keys and values."""

    def __init__(self, dim, heads, txt_queries=True):
        super().__init__()
        self.heads, self.txt_queries = heads, txt_queries
        self.img_qkv, self.img_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        if txt_queries:
            self.txt_qkv, self.txt_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        else:
            self.txt_kv = nn.Linear(dim, 2 * dim)

    def forward(self, img, txt):
        (B, N, D), h = img.shape, self.heads

        def heads_first(t, n):  # (B, T, n*D) -> n tensors (B, h, T, D/h)
            return t.view(B, t.shape[1], n, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)

        img_q, img_k, img_v = heads_first(self.img_qkv(img), 3)
        if self.txt_queries:
            txt_q, txt_k, txt_v = heads_first(self.txt_qkv(txt), 3)
            q = torch.cat([img_q, txt_q], dim=2)  # (B, h, N+L, d)
        else:
            (txt_k, txt_v), q = heads_first(self.txt_kv(txt), 2), img_q  # q: (B, h, N, d)
        k, v = torch.cat([img_k, txt_k], dim=2), torch.cat([img_v, txt_v], dim=2)  # (B, h, N+L, d) each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)  # (B, N or N+L, D)
        return self.img_out(out[:, :N]), self.txt_out(out[:, N:]) if self.txt_queries else None  # (B, N|L, D)


class FeedForward(nn.Module):
    """Linear -> GELU (tanh approximation, diffusers' "gelu-approximate") -> Linear, ratio 4."""

    def __init__(self, dim, ratio=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ratio * dim), nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class JointBlock(nn.Module):
    """One MM-DiT block: (img (B,N,D), txt (B,L,D), cond (B,D)) -> (img, txt). txt_pre_only (the
    last block): text only gives keys/values, with AdaLNContinuous and no MLP; None is returned."""

    def __init__(self, dim, heads, txt_pre_only=False):
        super().__init__()
        self.txt_pre_only = txt_pre_only
        self.img_adaln, self.txt_adaln = AdaLNZero(dim), AdaLNContinuous(dim) if txt_pre_only else AdaLNZero(dim)
        self.attn = JointAttention(dim, heads, txt_queries=not txt_pre_only)
        self.img_norm2, self.img_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), FeedForward(dim)
        if not txt_pre_only:
            self.txt_norm2, self.txt_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), FeedForward(dim)

    def forward(self, img, txt, cond, mods=None):
        img_mod, txt_mod = (None, None) if mods is None else mods  # precomputed by generate()
        img_in, gate_a, shift_m, scale_m, gate_m = self.img_adaln(img, cond, img_mod)  # img_in (B, N, D)
        if self.txt_pre_only:
            txt_in = self.txt_adaln(txt, cond, txt_mod)  # (B, L, D)
        else:
            txt_in, t_gate_a, t_shift_m, t_scale_m, t_gate_m = self.txt_adaln(txt, cond, txt_mod)
        img_att, txt_att = self.attn(img_in, txt_in)  # (B, N, D), (B, L, D) or None
        # Gated attention residual, then a gated MLP residual on LayerNorm modulated by the MLP shift/scale.
        img = img + gate_a[:, None] * img_att
        h = self.img_norm2(img) * (1 + scale_m[:, None]) + shift_m[:, None]
        img = img + gate_m[:, None] * self.img_mlp(h)  # (B, N, D)
        if self.txt_pre_only:
            return img, None
        txt = txt + t_gate_a[:, None] * txt_att  # the text stream: the same, with its own gates and MLP
        h = self.txt_norm2(txt) * (1 + t_scale_m[:, None]) + t_shift_m[:, None]
        txt = txt + t_gate_m[:, None] * self.txt_mlp(h)  # (B, L, D)
        return img, txt


# -----------------------------------------------------------------------------
# Aesthetic-score embeddings (§4.2: "projected into sinusoidal embeddings and appended to the pooled
# text embedding"): each variant's own, in the official operation order. score (B,) x100 -> (B, dim).


def aesthetic_embedding_vq(score, dim):  # [sin | cos] halves, frequencies exp(-ln(1000) * i / half)
    half = dim // 2
    freqs = torch.exp(-math.log(1000) * torch.arange(half, dtype=torch.float32, device=score.device) / half)
    angles = score.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, 2 * half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim)


def aesthetic_embedding_kl(score, dim):  # sin, cos interleaved (sin0, cos0, sin1, ...), freqs 10000^(-2i/dim)
    freqs = torch.pow(10000, -torch.arange(0, dim, 2, dtype=torch.float32, device=score.device) / dim)
    angles = score.float()[:, None] * freqs  # (B, dim/2)
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(1)  # (B, dim)


# -----------------------------------------------------------------------------
# The trunk: the caption's two CLIP features in, a stack of joint blocks, a final norm.


class MMDiT(nn.Module):
    """The MM-DiT trunk (Fig. 3; SD3's, the aesthetic score in the timestep's place):
        CLIP penultimate states (B, L, text_width)           -> text_proj   -> txt  (B, L, D)
        CLIP pooled (B, pooled_dim) ++ aesthetic embedding    -> pooled_proj -> cond (B, D)
        tokens (B, N, D), txt, cond -> depth x JointBlock -> AdaLNContinuous(cond) -> (B, N, D)"""

    def __init__(self, config):
        super().__init__()
        self.config, D = config, config.width
        self.text_proj = nn.Linear(config.text_width, D)
        self.pooled_proj = nn.Linear(config.pooled_dim + config.aes_embed_dim, D)
        self.blocks = nn.ModuleList([JointBlock(D, config.heads, txt_pre_only=(i == config.depth - 1))
                                     for i in range(config.depth)])  # fmt: skip
        self.norm_out = AdaLNContinuous(D)
        self.grad_checkpointing = False  # set True to trade compute for memory in training

    def _aesthetic(self, aesthetic, batch, device):
        """A number, a 0-d / (1,) / (B,) tensor, or None (config default) -> (B,) float32."""
        aesthetic = self.config.aesthetic if aesthetic is None else aesthetic
        score = torch.as_tensor(aesthetic, dtype=torch.float32, device=device)
        if score.dim() == 0 or tuple(score.shape) == (1,):
            return score.reshape(1).expand(batch)
        if tuple(score.shape) != (batch,):
            raise ValueError(f"aesthetic must be a number or a ({batch},) tensor, one score per sample; "
                             f"got shape {tuple(score.shape)}")  # fmt: skip
        return score

    def encode_condition(self, text, pooled, aesthetic=None):
        """text (B, L, text_width), pooled (B, [1,] pooled_dim) -> txt (B, L, D), cond (B, D)."""
        c = self.config
        if text.dim() != 3 or text.shape[-1] != c.text_width:
            raise ValueError(f"text must be (B, L, {c.text_width}) CLIP penultimate states, got {tuple(text.shape)}; "
                             f"pass TextEncoder(...)(captions).penultimate (or set MaskGenConfig.text_width)")
        B = text.shape[0]
        if pooled.shape[0] != B or pooled.numel() != B * c.pooled_dim:
            raise ValueError(f"pooled must be ({B}, {c.pooled_dim}), one CLIP pooled embedding per caption, "
                             f"got {tuple(pooled.shape)}; "
                             f"pass TextEncoder(...)(captions).pooled (or set MaskGenConfig.pooled_dim)")  # fmt: skip
        pooled = pooled.reshape(B, c.pooled_dim)
        if c.aes_embed_dim:
            embed = aesthetic_embedding_vq if c.mode == "vq" else aesthetic_embedding_kl
            score = self._aesthetic(aesthetic, B, text.device)  # (B,)
            pooled = torch.cat([pooled, embed(score * 100, c.aes_embed_dim).to(pooled.dtype)], dim=-1)
        return self.text_proj(text), self.pooled_proj(pooled)  # (B, L, D), (B, D)

    def prompt_conditions(self, text, pooled, null_text, null_pooled, aesthetic, guided):
        """encode_condition; when guided [cond; uncond] (2B rows), uncond from the "" caption."""
        if not guided:
            return self.encode_condition(text, pooled, aesthetic)
        if null_text is None or null_pooled is None:
            raise ValueError("guidance_scale != 1 needs the unconditional condition: pass null_text and null_pooled, "
                             "the empty caption's encoding (enc = TextEncoder()(['']); enc.penultimate, enc.pooled), "
                             "or use guidance_scale=1.0 for no guidance")  # fmt: skip
        B = text.shape[0]
        if null_text.shape[0] not in (1, B) or null_pooled.shape[0] not in (1, B):
            raise ValueError(f"null_text / null_pooled must have 1 or {B} rows (the '' caption's encoding), "
                             f"got {tuple(null_text.shape)} and {tuple(null_pooled.shape)}")  # fmt: skip
        null_pooled = null_pooled.reshape(null_pooled.shape[0], -1).expand(B, -1)
        score = self._aesthetic(aesthetic, B, text.device)
        # Project both halves in one batch, as the official does (same rounding).
        return self.encode_condition(torch.cat([text, null_text.expand(B, -1, -1).to(text.dtype)]),
                                     torch.cat([pooled.reshape(B, -1), null_pooled.to(pooled.dtype)]),
                                     torch.cat([score, score]))  # fmt: skip

    def modulations(self, cond):
        """Every adaLN modulation for cond (B, D), once per generate() (for a small batch these weight
        reads are ~1/5 of a step's memory traffic): an (img, txt) pair per block, then the final norm's."""
        mods = [(blk.img_adaln.modulation(cond), blk.txt_adaln.modulation(cond)) for blk in self.blocks]
        return mods + [self.norm_out.modulation(cond)]

    def forward(self, img, txt, cond, mods=None):
        """img (B, N, D), txt (B, L, D), cond (B, D) -> (B, N, D); mods: self.modulations(cond)."""
        mods = [None] * (len(self.blocks) + 1) if mods is None else mods
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk, m in zip(self.blocks, mods):
            img, txt = checkpoint(blk, img, txt, cond, m, use_reentrant=False) if ckpt else blk(img, txt, cond, m)
        return self.norm_out(img, cond, mods[-1])


# -----------------------------------------------------------------------------
# Schedules (§3, §4.2, Tab. 8) with the official numbers and float32 rounding; per-step counts are Python ints
# (static shapes, no host syncs under torch.compile). Then the sampling inputs: one torch.Generator per image.
GUIDANCE_SCHEDULES = {"vq": ("cosine", "linear", "none"), "kl": ("linear", "constant")}


def check_guidance_schedule(mode, schedule, name="guidance_schedule"):
    if schedule not in GUIDANCE_SCHEDULES[mode]:
        raise ValueError(f"{name} {schedule!r} is not available for MaskGen-{mode.upper()}; "
                         f"choose one of {GUIDANCE_SCHEDULES[mode]}")  # fmt: skip


def arccos_mask_rate(u):
    """Masking rate for progress u in [0, 1]; mean 2/pi for u ~ U(0, 1): mostly heavy masking."""
    return torch.acos(u) / (math.pi * 0.5)


def vq_mask_schedule(num_tokens, num_steps):
    """Tokens left masked after each VQ step: floor(K * arccos_rate(ratio)) in [1, masked - 1]."""
    counts, masked = [], num_tokens
    for step in range(num_steps):
        rate = arccos_mask_rate(torch.tensor((step + 1) / num_steps))  # float32, as official
        masked = max(1, min(masked - 1, int(torch.floor(num_tokens * rate))))
        counts.append(masked)
    return counts


def kl_draw_schedule(num_tokens, num_steps):
    """MAR's cosine schedule: (lo, hi, left) per step that draws order[:, lo:hi] of the masked
    order[:, :hi]; left = floor(K cos(pi/2 (s+1)/N)) in [1, hi - 1] sets the guidance ramp."""
    K, N, masked, draws = num_tokens, num_steps, num_tokens, []
    for step in range(N):
        left = max(1, min(masked - 1, math.floor(K * math.cos(math.pi / 2 * (step + 1) / N))))
        lo = 0 if step == N - 1 else left
        if masked - lo > 0:
            draws.append((lo, masked, left))
            masked = lo
    return draws


def vq_guidance_scale(scale, schedule, ratio, power=1.0):
    """VQ guidance weight at ratio (step + 1) / steps; "cosine" (MDT) in float32, as the official."""
    if schedule == "none":
        return scale
    if schedule == "linear":
        return ratio * (scale - 1) + 1
    p = torch.ones(1) * power
    ramp = (1 - torch.cos((ratio**p) * torch.pi)) * 1 / 2
    return float(((scale - 1) * ramp + 1)[0])


def check_generators(generator, device, count, where="generate"):
    """None, one torch.Generator, or a list of `count` (one per image) on the inputs' device type."""
    many = isinstance(generator, (list, tuple))
    if many and len(generator) != count:
        raise ValueError(f"{where}: got {len(generator)} generators for {count} images; pass one "
                         f"torch.Generator per image, or a single one for the whole batch")  # fmt: skip
    for i, g in enumerate(generator if many else [] if generator is None else [generator]):
        name = f"generator[{i}]" if many else "the generator"
        g_device = getattr(g, "device", None)
        if not isinstance(g_device, torch.device):
            raise ValueError(f"{where}: {name} is a {type(g).__name__}, not a torch.Generator")
        if g_device.type != device.type:
            raise ValueError(f"{where}: {name} is on {g_device} but the inputs are on {device}; create "
                             f"it with torch.Generator(device={str(device)!r}).manual_seed(seed)")  # fmt: skip
    return list(generator) if many else generator


def draw_rows(draw, shape, generator):
    """draw(shape, generator); with a list of G, dim 0 is G equal blocks, block j drawn by generator j
    alone, so an image's numbers equal those of a batch of that image alone."""
    if not isinstance(generator, (list, tuple)):
        return draw(shape, generator)
    G = len(generator)
    if shape[0] % G:
        raise ValueError(f"{shape[0]} rows cannot be split evenly over {G} generators (one per image)")
    return torch.cat([draw((shape[0] // G, *shape[1:]), g) for g in generator])


def check_number(name, value, positive=False):
    if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"generate(): {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


@dataclass
class MaskGenConfig:
    mode: str = "vq"  # "vq": discrete ids + cross-entropy; "kl": continuous tokens + DiffLoss
    width: int = 1024  # transformer (Tab. 1: L = 16 x 1024, XL = 20 x 1280, 16 heads; MLP ratio 4)
    depth: int = 16
    heads: int = 16
    num_tokens: int = 128  # K, as the TA-TiTok tokenizer produces them
    codebook_size: int = 8192  # VQ: ids 0..V-1; id V is [MASK]
    num_class_rows: int = 1000  # VQ: unused embedding rows the released table carries
    token_size: int = 16  # KL: channels C per token (VQ: the tokenizer's, unused here)
    scale_factor: float = 0.7525  # KL: tokens are multiplied by this before the model
    pos_init_std: float = 0.02  # KL: init std of the position tables and the mask token (official 0.02)
    kl_tokens: str = "sample"  # KL: train on a fresh posterior "sample" each time (official) or its "mean"
    text_width: int = 768  # CLIP ViT-L/14 penultimate states (B, 77, text_width), pooled (B, pooled_dim)
    pooled_dim: int = 768
    aes_embed_dim: int = 256  # sinusoidal aesthetic-score features; 0 = no score condition
    label_smoothing: float = 0.1  # VQ; the training values follow Tab. 8 and the official configs
    unmasked_weight: float = 0.1  # VQ: loss weight of tokens that were not masked
    diffloss_depth: int = 8  # KL: DiffLoss MLP blocks x width (= transformer width)
    diffloss_width: int = 1024
    diffusion_batch_mul: int = 4  # KL: each token is seen with 4 noise levels per step
    num_sampling_steps: str = "100"  # KL: DiffLoss respacing at sampling time
    diffloss_clip_x0: float = 0.0  # KL: bound on the sampler's x0 estimates; 0 = none, as the reference (see DiffLoss)
    num_steps: int = 16  # generate() defaults, the official inference configs: VQ 16, KL 32
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
            raise ValueError(f"the KL aesthetic embedding interleaves sin/cos; aes_embed_dim must be even, "
                             f"got {self.aes_embed_dim}")  # fmt: skip
        check_guidance_schedule(self.mode, self.guidance_schedule)


class MaskGenBase(nn.Module):
    """The shared trunk (state-dict keys "trunk.*"), generate(), compiled steps and FLOP counts."""

    mode = None  # "vq" | "kl", set by each variant

    def __init__(self, config):
        super().__init__()
        if config.mode != self.mode:
            raise ValueError(f"{type(self).__name__} needs a config with mode={self.mode!r}, got {config.mode!r}; "
                             f"use build(config)")  # fmt: skip
        self.config, self.trunk = config, MMDiT(config)
        self.compiled_steps = {}  # step_function's compiled functions; a plain dict keeps them out of state_dict

    def step_function(self, fn, compile, dynamic_rows=False):
        """fn, or with compile (True or torch.compile options) its fullgraph compiled version, made once.
        dynamic_rows: one graph for every row count (DiffLoss draws a varying number of tokens)."""
        if not compile:
            return fn
        options = {} if compile is True else dict(compile)
        key = (fn.__name__, tuple(sorted(options.items())))
        if key not in self.compiled_steps:
            compiled = torch.compile(fn, fullgraph=True, **options)

            def rows_dynamic(*args):
                for a in args:
                    torch._dynamo.maybe_mark_dynamic(a, 0)
                return compiled(*args)

            self.compiled_steps[key] = rows_dynamic if dynamic_rows else compiled
        return self.compiled_steps[key]

    def flops(self, text_len):
        """Forward FLOPs per sample (2 per multiply-add, as torch.utils.flop_counter): "condition" (prompt-only),
        "step" (one trunk pass), KL's "diffloss_row" (one token) with its "diffloss_time" / "_cond" parts."""
        c, D, N, L = self.config, self.config.width, self.config.num_tokens, text_len
        T = N + L
        condition = 2 * L * c.text_width * D + 2 * (c.pooled_dim + c.aes_embed_dim) * D
        # adaLN maps: 2 x 12 D^2 per block, but 4 D^2 for the last block's text norm and the final norm
        condition += (c.depth - 1) * 24 * D * D + 16 * D * D + 4 * D * D
        # Blocks before the last on all T tokens; the last: text k/v only, N queries over T keys.
        step = (c.depth - 1) * (24 * T * D * D + 4 * T * T * D) + 24 * N * D * D + 4 * L * D * D + 4 * N * T * D
        if self.mode == "vq":
            step += 2 * N * D * c.codebook_size  # the tied LM head
            return {"condition": condition, "step": step, "diffloss_row": 0, "diffloss_time": 0, "diffloss_cond": 0}
        W, C = c.diffloss_width, c.token_size
        step += 2 * N * C * D  # z_proj
        time, cond = 2 * 256 * W + 2 * W * W, 2 * D * W  # timestep MLP, condition embedding
        # + input projection, residual blocks, final layer
        row = 2 * C * W + time + cond + c.diffloss_depth * 10 * W * W + 4 * W * W + 2 * W * 2 * C
        return {"condition": condition, "step": step, "diffloss_row": row, "diffloss_time": time, "diffloss_cond": cond}

    def train_flops(self, text_len):
        """FLOPs of one training step per sample: 3x the forward (the backward is ~2x)."""
        f = self.flops(text_len)
        rows = self.config.diffusion_batch_mul * self.config.num_tokens  # KL: each token m times
        return 3 * (f["condition"] + f["step"] + rows * f["diffloss_row"])

    def generate_flops(self, text_len, num_steps=None, guided=True, batch=1):
        """FLOPs of generate() per image (x2 guided); DiffLoss embeds z once per token, t once per step and call."""
        c, f, halves = self.config, self.flops(text_len), 2 if guided else 1
        steps = c.num_steps if num_steps is None else num_steps
        if self.mode == "vq":
            return halves * (f["condition"] + steps * f["step"])
        draws, T = len(kl_draw_schedule(c.num_tokens, steps)), self.diffloss.gen_diffusion.num_timesteps
        total = halves * (f["condition"] + draws * f["step"])
        per_step = f["diffloss_row"] - f["diffloss_time"] - f["diffloss_cond"]
        total += halves * c.num_tokens * (T * per_step + f["diffloss_cond"])
        return total + draws * T * f["diffloss_time"] / batch

    @torch.no_grad()
    def generate(self, text, pooled, null_text=None, null_pooled=None, aesthetic=None, num_steps=None,
                 guidance_scale=None, guidance_schedule=None, randomize_temperature=None, temperature=None,
                 generator=None, guidance_scale_pow=1.0, compile=False, init_tokens=None, strength=1.0):  # fmt: skip
        """VQ ids (B, K) or KL tokens (B, K, C) for B captions, for TATiTok.decode; None = the config's value.
        null_*: the "" caption's, needed when guided. aesthetic: a number or (B,) scores, used as given (the
        official ignores it). guidance_scale 1.0 = no guidance. generator: a torch.Generator, or one per image
        (image b then equals a call for caption b alone). compile: True or torch.compile options.
        Image-to-image: of init_tokens, an image's TATiTok.encode (VQ (1|B, K) ids, KL (1|B, K, C) means),
        round(strength * K) at positions the generator draws are redrawn under the prompt, the rest returned as
        they are: strength 0 returns init_tokens, 1 is plain generation (the same draws, the same tokens)."""
        c, B, K = self.config, text.shape[0], self.config.num_tokens
        g = float(c.guidance_scale if guidance_scale is None else guidance_scale)
        schedule = c.guidance_schedule if guidance_schedule is None else guidance_schedule
        check_guidance_schedule(c.mode, schedule)
        check_number("guidance_scale", g)
        if not (isinstance(strength, (int, float)) and 0 <= strength <= 1) or (init_tokens is None and strength != 1):
            raise ValueError(f"generate(): strength, the share of init_tokens to redraw, must be a number in [0, 1] "
                             f"given with init_tokens; got {strength!r}" + " alone" * (init_tokens is None))
        n = round(strength * K)  # tokens to regenerate; K: all, as plain generation
        if init_tokens is not None:
            x, kl, want = init_tokens, self.mode == "kl", (K, c.token_size) if self.mode == "kl" else (K,)
            if (tuple(x.shape[1:]) != want or x.shape[0] not in (1, B) or x.is_floating_point() != kl
                    or not kl and (x.min() < 0 or x.max() >= c.codebook_size)):  # fmt: skip
                raise ValueError(f"init_tokens must be (1 or {B}, {', '.join(map(str, want))}) "
                                 f"{'float tokens' if kl else f'integer ids in [0, {c.codebook_size})'}, TATiTok.encode"
                                 f"(image) of this generator's tokenizer; got {tuple(x.shape)} {x.dtype}")
            init_tokens = init_tokens.expand(B, *want)
            if n == 0:
                return init_tokens.clone()
        generator = check_generators(generator, text.device, count=B)
        txt, cond = self.trunk.prompt_conditions(text, pooled, null_text, null_pooled, aesthetic, g != 1.0)
        mods = self.trunk.modulations(cond)  # once: every step reuses them
        N = c.num_steps if num_steps is None else int(num_steps)
        return self._decode(txt, cond, mods, B, N, g, schedule, generator, compile, temperature=temperature,
                            randomize_temperature=randomize_temperature, power=guidance_scale_pow,
                            init=init_tokens if n < K else None, n=n)  # fmt: skip


class MaskGenVQ(MaskGenBase):
    """MaskGen over discrete TA-TiTok ids: embedding table in, the same table out."""

    mode = "vq"

    def __init__(self, config, init_weights=True):
        super().__init__(config)
        V, D = config.codebook_size, config.width
        # V codes, [MASK] (id V), then num_class_rows + 1 unused rows the released table carries.
        self.mask_id, self.tok_emb = V, nn.Embedding(V + 1 + config.num_class_rows + 1, D)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.num_tokens, D))
        if init_weights:  # False when a checkpoint overwrites every weight anyway
            self.initialize_weights()

    def initialize_weights(self):
        # The official init: truncated normal(0.02), zero biases; only AdaLNContinuous maps start at zero.
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
    def head_weight(self):  # the LM head: a view of the first V embedding rows (weight tying)
        return self.tok_emb.weight[: self.config.codebook_size]  # (V, D)

    def predict(self, ids, txt, cond, mods=None):
        """ids (B, K) with [MASK] = V, txt (B, L, D), cond (B, D) -> logits (B, K, V)."""
        x = self.tok_emb(ids) + self.pos_emb[:, : ids.shape[1]]  # (B, K, D)
        x = self.trunk(x, txt, cond, mods)  # (B, K, D)
        return torch.matmul(x, self.head_weight.t())  # (B, K, V)

    def logits(self, ids, text, pooled, aesthetic=None):
        """Logits (B, K, V) for (possibly masked) ids, from raw CLIP features."""
        self._check_ids(ids)
        txt, cond = self.trunk.encode_condition(text, pooled, aesthetic)
        return self.predict(ids, txt, cond)

    def _check_ids(self, ids):
        K = self.config.num_tokens
        if ids.dim() != 2 or ids.shape[1] != K or ids.dtype != torch.long:
            raise ValueError(f"VQ tokens must be a (B, {K}) LongTensor of code ids, got {tuple(ids.shape)} "
                             f"{ids.dtype}; use TATiTok.encode(images)")  # fmt: skip

    def forward(self, tokens, text, pooled, aesthetic=None):
        """Training loss for clean ids (B, K): mask, predict, weighted cross-entropy."""
        self._check_ids(tokens)
        B, K = tokens.shape
        # Masking rate per sample (arccos, at least one token); ranks below n_masked are masked.
        rate = arccos_mask_rate(torch.rand(B, device=tokens.device)).clamp(1e-6, 1.0)  # (B,)
        n_masked = (K * rate).round().clamp(min=1)  # (B,)
        rank = torch.rand(B, K, device=tokens.device).argsort(dim=-1)  # (B, K)
        masked = rank < n_masked[:, None]  # (B, K) bool
        ids = torch.where(masked, self.mask_id, tokens)
        logits = self.logits(ids, text, pooled, aesthetic)  # (B, K, V)
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none",
                             label_smoothing=self.config.label_smoothing).view(B, K)  # fmt: skip
        # Visible tokens (copying the input) count with unmasked_weight, normalised over the batch.
        w = torch.where(masked, 1.0, self.config.unmasked_weight)
        return (ce * w).sum() / w.sum()

    def _decode(self, txt, cond, mods, B, N, g, schedule, generator, compile, temperature, randomize_temperature,
                power, init, n):  # fmt: skip
        """MaskGIT decoding -> ids (B, K): each step predicts all tokens, samples the masked ones by
        Gumbel-max (randomize_temperature, annealed to 0) and re-masks the least confident.
        guidance: cond + (cond - uncond) * s as the official, s ramped from 1 to g (cosine ramp's
        exponent: power). temperature: None = the official 0.5 + 0.8 (1 - ratio), else constant.
        init (B, K): the ids to edit, of which n, at random positions, start masked (None: all K)."""
        c = self.config
        rand_t = float(c.randomize_temperature if randomize_temperature is None else randomize_temperature)
        temperature = c.temperature if temperature is None else temperature
        check_number("randomize_temperature", rand_t)
        check_number("temperature", temperature, positive=True)  # it divides the logits
        device, K, guided = txt.device, c.num_tokens, g != 1.0
        predict = self.step_function(self.predict, compile)  # same shapes every step: one graph
        remasked = vq_mask_schedule(K, N)

        def noise(shape, gen):  # Gumbel(0, 1) noise, with the official clamps (u = 0 cannot give inf)
            u = torch.rand(shape, generator=gen, device=device)
            return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))

        ids = torch.full((B, K), self.mask_id, dtype=torch.long, device=device)
        if init is not None:  # n random positions masked, the rest keep the image's ids (and confidence inf)
            rank = draw_rows(lambda shape, gen: torch.rand(shape, generator=gen, device=device), (B, K), generator)
            ids = torch.where(rank.argsort(-1).argsort(-1) < n, self.mask_id, init)  # (B, K)
        # MaskGIT-style editing: decoding joins the schedule at the last step that starts with >= n masked (step
        # t starts with remasked[t - 1]; n = K, plain generation: step 0). The arccos schedule pairs each count of
        # masked tokens with how many a step may commit, its temperatures and guidance weight; joining it there
        # puts the model in the states plain generation visits and costs steps in proportion to what is redrawn
        # (as SDEdit skips the start of a noise schedule). Running all N steps over the n tokens instead would
        # commit them more slowly than the schedule does at that count, stretch the temperature and guidance ramps
        # over them and cost a full generation.
        for step in range(sum(r >= n for r in remasked[:-1]), N):
            ratio = (step + 1) / N
            if guided:
                cond_logits, uncond_logits = predict(torch.cat([ids, ids]), txt, cond, mods).chunk(2)  # (B, K, V) each
                logits = cond_logits + (cond_logits - uncond_logits) * vq_guidance_scale(g, schedule, ratio, power)
            else:
                logits = predict(ids, txt, cond, mods)  # (B, K, V)
            logits = logits / (0.5 + 0.8 * (1 - ratio) if temperature is None else temperature)
            noise_t = rand_t * (1 - ratio)  # Gumbel-max sampling, annealed to argmax at the last step
            noisy = logits + noise_t * draw_rows(noise, logits.shape, generator) if noise_t > 0 else logits
            is_mask = ids == self.mask_id
            sampled = torch.where(is_mask, noisy.argmax(dim=-1), ids)  # (B, K); decoded tokens stay
            if step == N - 1:
                return sampled
            # Confidence: the chosen id's logit plus fresh Gumbel noise. Exactly remasked[step] go back (static
            # shapes; the official's `<= cut-off` picks the same set unless two confidences tie).
            confidence = torch.where(is_mask, logits.gather(-1, sampled[..., None]).squeeze(-1), torch.inf)  # (B, K)
            if noise_t > 0:
                confidence = confidence + noise_t * draw_rows(noise, confidence.shape, generator)
            low = confidence.topk(remasked[step], dim=-1, largest=False).indices  # (B, n)
            ids = sampled.scatter(1, low, self.mask_id)
        return ids  # only reached with num_steps == 0


class MaskGenKL(MaskGenBase):
    """MaskGen over continuous TA-TiTok tokens (MAR-style decoder + DiffLoss)."""

    mode = "kl"

    def __init__(self, config, init_weights=True):
        super().__init__(config)
        C, D, K = config.token_size, config.width, config.num_tokens
        self.z_proj = nn.Linear(C, D)  # token (C) -> width
        self.z_norm, self.mask_token = nn.LayerNorm(D, eps=1e-6), nn.Parameter(torch.zeros(1, 1, D))
        self.pos_emb = nn.Parameter(torch.zeros(1, K, D))  # added before the blocks
        self.diff_pos_emb = nn.Parameter(torch.zeros(1, K, D))  # added to the conditions for DiffLoss
        self.diffloss = DiffLoss(C, D, config.diffloss_depth, config.diffloss_width,
                                 num_sampling_steps=config.num_sampling_steps, clip_x0=config.diffloss_clip_x0)
        if init_weights:  # False when a checkpoint overwrites every weight anyway
            self.initialize_weights()

    def initialize_weights(self):
        # The official (MAR's): normal(pos_init_std) tables; Xavier-uniform for EVERY linear (replacing DiffLoss's
        # zero-init), per block of a fused q|k|v as the official separate projections; LayerNorms stay at unit.
        for p in (self.mask_token, self.pos_emb, self.diff_pos_emb):
            nn.init.normal_(p, std=self.config.pos_init_std)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                parts = len(FUSED_QKV.get(name.rpartition(".")[2], ("",)))
                with torch.no_grad():
                    for w in m.weight.chunk(parts):
                        nn.init.xavier_uniform_(w)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def token_conditions(self, x, mask, txt, cond, mods=None):
        """DiffLoss's conditions z (B, K, D) for scaled tokens x (B, K, C), mask (B, K) (1 = masked)."""
        x = self.z_norm(self.z_proj(x))  # (B, K, D)
        # The official's MAE-style drop and pad-back, with no separate encoder, is exactly this.
        x = torch.where(mask[..., None].bool(), self.mask_token.to(x.dtype), x)
        return self.trunk(x + self.pos_emb, txt, cond, mods) + self.diff_pos_emb  # (B, K, D)

    def forward(self, tokens, text, pooled, aesthetic=None):
        """Training loss. tokens: (B, K, 2C) = cat(mean, logvar) from TATiTok.encode(...,
        return_posterior=True), sampled here (kl_tokens="mean": its mean); or (B, K, C) tokens."""
        c = self.config
        B, K, C = tokens.shape[0], c.num_tokens, c.token_size
        if tokens.dim() != 3 or tokens.shape[1] != K or tokens.shape[2] not in (C, 2 * C):
            raise ValueError(f"KL tokens must be (B, {K}, {2 * C}) = cat(mean, logvar) or (B, {K}, {C}), "
                             f"got {tuple(tokens.shape)}")  # fmt: skip
        x = tokens.float()
        if tokens.shape[2] == 2 * C:
            mean, logvar = x.chunk(2, dim=-1)  # (B, K, C) each
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the LDM Gaussian's clamp
            x = mean + std * torch.randn_like(mean) if c.kl_tokens == "sample" else mean
        x = x * c.scale_factor  # (B, K, C), the diffusion target
        txt, cond = self.trunk.encode_condition(text, pooled, aesthetic)
        # One masking rate for the batch (arccos, >= 1 token), as the official and MAR; the order is
        # per sample. The count stays a 0-d tensor: no host sync, one compiled graph for every count.
        rate = arccos_mask_rate(torch.rand((), device=x.device)).clamp(1e-6, 1.0)
        n_masked = torch.ceil(K * rate)  # () float, in [1, K]
        order = torch.rand(B, K, device=x.device).argsort(dim=-1)  # (B, K)
        mask = (order.argsort(dim=-1) < n_masked).float()  # (B, K), 1 = masked: the first n_masked in the order
        z = self.token_conditions(x, mask, txt, cond)  # (B, K, D)
        # DiffLoss on every token weighted by the mask, at diffusion_batch_mul noise levels; z carries the text.
        m = c.diffusion_batch_mul
        target = x.reshape(B * K, C).repeat(m, 1)  # (m*B*K, C), row b*K + k: token k of sample b
        z = z.reshape(B * K, -1).repeat(m, 1)  # (m*B*K, D)
        return self.diffloss(target, z, mask.reshape(B * K).repeat(m))

    def _decode(self, txt, cond, mods, B, N, g, schedule, generator, compile, temperature, init, n, **_):
        """MAR decoding -> tokens (B, K, C) / scale_factor: each step draws the next tokens of a random
        order per sample with DiffLoss (noise temperature, None: 1.0), conditioned on the trunk's
        output there, guided uncond + s (cond - uncond) with s ramped linearly (MAR) or constant.
        init (B, K, C): the tokens to edit; the first n of the order are redrawn, the rest returned as given."""
        c = self.config
        temperature = (1.0 if c.temperature is None else c.temperature) if temperature is None else temperature
        check_number("temperature", temperature)  # scales DiffLoss's noise: 0 = no noise
        device, K, C, D, halves = txt.device, c.num_tokens, c.token_size, c.width, 2 if g != 1.0 else 1
        conditions = self.step_function(self.token_conditions, compile)  # static shapes: one graph
        denoise = self.step_function(self.diffloss.net.denoise, compile, dynamic_rows=True)
        # (B, K) generation order; with one generator per image, row b comes from generator b
        order = draw_rows(lambda shape, gen: torch.rand(shape, generator=gen, device=device), (B, K), generator)
        order = order.argsort(dim=-1)  # (B, K)
        tokens = torch.zeros(B, K, C, device=device)
        mask = torch.ones(B, K, device=device)  # 1 = still masked
        # With an init: the image's tokens where plain decoding would have drawn them before n remain masked (the
        # posterior means, which training's samples (kl_tokens="sample") centre on and the reconstruction decodes,
        # scaled as in training). Steps that draw only kept tokens are skipped (MaskGenVQ's decoding gives the
        # reasons); the step under way when n remain masked draws the rest of its share.
        if init is not None:
            keep = order.argsort(dim=-1) >= n  # (B, K) bool: order[:, n:]
            tokens, mask = torch.where(keep[..., None], init.float() * c.scale_factor, tokens), (~keep).float()
        for lo, hi, left in [(lo, min(hi, n), left) for lo, hi, left in kl_draw_schedule(K, N) if lo < n]:
            s = 1 + (g - 1) * (K - left) / K if schedule == "linear" else g  # MAR's ramp, or constant
            idx = order[:, lo:hi]  # (B, n): this step's draws; order[:, :hi] is masked
            z = conditions(tokens.repeat(halves, 1, 1), mask.repeat(halves, 1), txt, cond, mods)  # ([2]B, K, D)
            z = z.gather(1, idx.repeat(halves, 1)[..., None].expand(-1, -1, D)).reshape(-1, D)  # [cond; uncond]
            new = self.diffloss.sample(z, temperature=temperature, cfg=s if halves == 2 else 1.0, generator=generator,
                                       denoise=denoise)  # fmt: skip
            new = new[: B * (hi - lo)].reshape(B, hi - lo, C)  # the guided (cond-half) samples
            tokens = tokens.scatter(1, idx[..., None].expand(-1, -1, C), new.to(tokens.dtype))
            mask = mask.scatter(1, idx, 0.0)
        tokens = tokens / c.scale_factor  # (B, K, C)
        return tokens if init is None else torch.where(keep[..., None], init.to(tokens.dtype), tokens)  # kept: exact


def build(config, init_weights=True):
    """MaskGenVQ or MaskGenKL, as config.mode says; init_weights=False when a checkpoint follows."""
    if not isinstance(config, MaskGenConfig):
        raise TypeError(f"build(config) needs a MaskGenConfig, got {type(config).__name__}; use PRESETS[name]")
    return (MaskGenVQ if config.mode == "vq" else MaskGenKL)(config, init_weights)


# -----------------------------------------------------------------------------
# Presets (paper Tab. 1; tokens, codebook and scale factor from the official configs).

_VQ = dict(mode="vq", num_tokens=128, codebook_size=8192, token_size=64, num_steps=16, guidance_scale=12.0,
           guidance_schedule="cosine", randomize_temperature=2.0)  # fmt: skip
_KL = dict(mode="kl", num_tokens=32, token_size=16, scale_factor=0.7525, num_steps=32, guidance_scale=3.0,
           guidance_schedule="linear", temperature=1.0, diffloss_depth=8)  # fmt: skip
_L, _XL = dict(width=1024, depth=16, heads=16), dict(width=1280, depth=20, heads=16)
# For tests: two 64-wide blocks, a 32-wide text stream, short sampling loops.
_TINY = dict(width=64, depth=2, heads=4, text_width=32, pooled_dim=32, aes_embed_dim=16, guidance_scale=3.0)
# The shapes world (tokenizer.PRESETS["shapes"/"shapes_kl"]): four 128-wide blocks, as in a fixed budget the samples
# seen count for more than width. Sampling chosen with `evaluate.py shapes` on a seed not used for scoring.
_SHAPES = dict(width=128, depth=4, heads=4, num_tokens=32, text_width=64, pooled_dim=64, aes_embed_dim=32, num_steps=32)

PRESETS = {
    "maskgen_vq_l": MaskGenConfig(**_L, **_VQ),
    "maskgen_vq_xl": MaskGenConfig(**_XL, **_VQ),
    "maskgen_kl_l": MaskGenConfig(**_L, diffloss_width=1024, **_KL),
    "maskgen_kl_xl": MaskGenConfig(**_XL, diffloss_width=1280, **_KL),
    "tiny_vq": MaskGenConfig(mode="vq", num_tokens=16, codebook_size=64, num_class_rows=10, token_size=8, num_steps=8,
                             randomize_temperature=1.0, **_TINY),  # fmt: skip
    "tiny_kl": MaskGenConfig(mode="kl", num_tokens=8, token_size=4, scale_factor=0.75, diffloss_depth=2,
                             diffloss_width=64, num_sampling_steps="10", num_steps=4, guidance_schedule="linear",
                             temperature=1.0, **_TINY),  # fmt: skip
    # 2.5M parameters with the 2,048-way head; one token per step at guidance 1.5.
    "shapes_vq": MaskGenConfig(mode="vq", codebook_size=2048, num_class_rows=0, token_size=16, guidance_scale=1.5,
                               randomize_temperature=1.0, **_SHAPES),  # fmt: skip
    # 2 noise levels per token (not 4) cut the step cost; unclipped, a briefly trained DiffLoss's x0 drifts out of
    # range (blank canvases). pos_init_std 1.0: a visible token enters as LayerNorm(z_proj(token)), ~1 per element,
    # which a 0.02 table would drown, and a 1D token means nothing without its index (`evaluate.py context`).
    "shapes_kl": MaskGenConfig(mode="kl", token_size=8, pos_init_std=1.0, diffloss_depth=3, diffloss_width=192,
                               diffusion_batch_mul=2, num_sampling_steps="50", diffloss_clip_x0=3.0,
                               guidance_scale=3.0, guidance_schedule="constant", temperature=0.5,  # sharper tokens
                               **_SHAPES),  # fmt: skip
}


def preset_for(name, tokenizer_config, text_width, pooled_dim):
    """PRESETS[name] with the TA-TiTok config's token count, codebook and channels and the text widths."""
    t = tokenizer_config
    return dataclasses.replace(PRESETS[name], num_tokens=t.num_latent_tokens, codebook_size=t.codebook_size,
                               token_size=t.token_size, text_width=text_width, pooled_dim=pooled_dim)  # fmt: skip


# -----------------------------------------------------------------------------
# Official names: the authors' releases (turkeyju/generator_maskgen_*) hold config.json, the official nested
# config, and weights under the official code's names. checkpoint.py reads and writes them with what follows.

# config.json field -> ours, as tokenizer.TATITOK_FIELDS. The official VQ "temperature" is our randomize_temperature
# (of the Gumbel noise that picks the tokens); KL's is the diffusion sampling temperature.
MASKGEN_FIELDS = {
    "any": [("vq_model.num_latent_tokens", "num_tokens"), ("vq_model.text_embed_dim", "text_width", 768),
            ("maskgen.decoder_embed_dim", "width"), ("maskgen.decoder_depth", "depth"),
            ("maskgen.decoder_num_heads", "heads"), ("maskgen.sample_aesthetic_score", "aesthetic", 6.5)],
    "vq": [("vq_model.token_size", "token_size", 64), ("vq_model.codebook_size", "codebook_size"),
           ("maskgen.cfg", "guidance_scale", 12.0), ("maskgen.cfg_schedule", "guidance_schedule", "cosine"),
           ("maskgen.num_iter", "num_steps", 16), ("maskgen.condition_num_classes", "num_class_rows", 1000),
           ("maskgen.temperature", "randomize_temperature", 2.0), ("losses.label_smoothing", "label_smoothing", 0.1),
           ("losses.loss_weight_unmasked_token", "unmasked_weight", 0.1)],
    "kl": [("vq_model.token_size", "token_size", 16), ("vq_model.scale_factor", "scale_factor"),
           ("maskgen.cfg", "guidance_scale", 3.0), ("maskgen.cfg_schedule", "guidance_schedule", "linear"),
           ("maskgen.num_iter", "num_steps", 32), ("maskgen.diffusion_batch_mul", "diffusion_batch_mul", 4),
           ("maskgen.temperature", "temperature", 1.0), ("losses.diffloss_d", "diffloss_depth"),
           ("losses.diffloss_w", "diffloss_width"), ("losses.num_sampling_steps", "num_sampling_steps", "100")],
}  # fmt: skip


def kwargs_from_official(s, kw, mode, path):
    """Complete the MaskGenConfig kwargs `kw` that MASKGEN_FIELDS read from config.json sections `s`.
    Official options MaskGen here does not implement are refused (ValueError naming `path`)."""
    mg = s["maskgen"]
    kw.update(mode=mode, pooled_dim=s["vq_model"].get("pooled_embed_dim", kw["text_width"]),
              aes_embed_dim=mg["micro_condition_embed_dim"] if mg.get("micro_condition", False) else 0)
    if mode == "kl":
        kw["num_sampling_steps"] = str(kw["num_sampling_steps"])
        return
    kw["randomize_temperature"] = mg.get("randomize_temperature", kw["randomize_temperature"])
    if not mg.get("weight_tying", True):
        raise ValueError(f"{path}: weight_tying: False (an untied LM head) is not supported; every release ties it")
    if mg.get("mask_schedule_strategy", "arccos") != "arccos":
        raise ValueError(f"{path}: only the arccos mask schedule is implemented, got {mg['mask_schedule_strategy']!r}")


def official_config(c, s):
    """The config.json dict of MaskGenConfig `c`, from the sections `s` that MASKGEN_FIELDS filled."""
    vq, mg = s["vq_model"], s["maskgen"]
    mg.update(micro_condition=c.aes_embed_dim > 0, micro_condition_embed_dim=c.aes_embed_dim, text_drop_prob=0.1)
    if c.pooled_dim != c.text_width:  # not in the official layout (it uses one width for both)
        vq["pooled_embed_dim"] = c.pooled_dim
    if c.mode == "kl" and c.temperature is None:
        mg["temperature"] = 1.0
    return {"model": {"vq_model": vq, "maskgen": mg}, "dataset": {"preprocessing": {"crop_size": 256}},
            "losses": s["losses"]}


# Weight names: official key -> ours at the top level, per variant (an entry ending in "." is a prefix). TRUNK is
# where our state dict keeps the MM-DiT trunk both variants share: one line to change if it moves.
TRUNK = "trunk."
MASKGEN_RENAMES = {
    "vq": [("text_embed_proj.", TRUNK + "text_proj."), ("cond_pooled_proj.", TRUNK + "pooled_proj."),
           ("blocks.", TRUNK + "blocks."), ("norm.linear.", TRUNK + "norm_out.linear."),
           ("embeddings.weight", "tok_emb.weight"), ("pos_embed", "pos_emb")],
    "kl": [("text_emb.", TRUNK + "text_proj."), ("text_pooled_emb.", TRUNK + "pooled_proj."),
           ("decoder_blocks.", TRUNK + "blocks."), ("decoder_norm.linear.", TRUNK + "norm_out.linear."),
           ("z_proj.", "z_proj."), ("z_proj_ln.", "z_norm."), ("mask_token", "mask_token"),
           ("decoder_pos_embed_learned", "pos_emb"), ("diffusion_pos_embed_learned", "diff_pos_emb"),
           ("diffloss.net.", "diffloss.net.")],
}  # fmt: skip
# Inside a block: diffusers' JointTransformerBlock names -> ours; q, k, v as split_qkv's parts of our fused ones.
BLOCK_RENAMES = [
    ("norm1.linear.", "img_adaln.linear."), ("norm1_context.linear.", "txt_adaln.linear."),
    ("attn.to_q.", "attn.img_q."), ("attn.to_k.", "attn.img_k."), ("attn.to_v.", "attn.img_v."),
    ("attn.to_out.0.", "attn.img_out."), ("attn.add_q_proj.", "attn.txt_q."), ("attn.add_k_proj.", "attn.txt_k."),
    ("attn.add_v_proj.", "attn.txt_v."), ("attn.to_add_out.", "attn.txt_out."),
    ("ff.net.0.proj.", "img_mlp.fc1."), ("ff.net.2.", "img_mlp.fc2."),
    ("ff_context.net.0.proj.", "txt_mlp.fc1."), ("ff_context.net.2.", "txt_mlp.fc2."),
]  # fmt: skip


def split_qkv(sd, copy=False):
    """Our state dict with each fused attention projection (FUSED_QKV, e.g. '...attn.img_qkv.weight')
    replaced by its parts ('...attn.img_q.weight', img_k, img_v): row-block views of the fused tensor (copying
    into one writes the model's weight: how a release's separate to_q / to_k / to_v load), or copies."""
    out = {}
    for key, t in sd.items():
        mod, _, param = key.rpartition(".")
        head, _, name = mod.rpartition(".")
        if name in FUSED_QKV and (head == "attn" or head.endswith(".attn")):
            for part, rows in zip(FUSED_QKV[name], t.chunk(len(FUSED_QKV[name]))):
                out[f"{head}.{part}.{param}"] = rows.clone() if copy else rows
        else:
            out[key] = t
    return out


def _rename(key, table):
    """`key` renamed by the first (from, to) entry of `table` that matches it, else None."""
    return next((b + key[len(a) :] for a, b in table if key == a or (a.endswith(".") and key.startswith(a))), None)


def last_q_proj(c):
    """The release name of the last block's text-query projection, which we do not hold (see JointAttention)."""
    return f"{'blocks' if c.mode == 'vq' else 'decoder_blocks'}.{c.depth - 1}.attn.add_q_proj"


def release_view(sd, mode):
    """Our state dict `sd` as {official key: tensor}, views (split_qkv's): copying into one loads it. The
    tied LM head, which the releases do not hold, is left out."""
    view, blocks, inverse = {}, TRUNK + "blocks.", [(b, a) for a, b in MASKGEN_RENAMES[mode]]
    for key, v in split_qkv(sd).items():
        if key.startswith(blocks):  # blocks.<i>.<inner>: the inner name by BLOCK_RENAMES
            i, _, inner = key[len(blocks) :].partition(".")
            inner = _rename(inner, [(b, a) for a, b in BLOCK_RENAMES])
            key = None if inner is None else f"{blocks}{i}.{inner}"
        name = None if key is None else _rename(key, inverse)
        if name is not None:
            view[name] = v
    return view

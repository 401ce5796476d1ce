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

Trunk, in the order the classes below appear:

    aesthetic score (B,) -> x100 -> sinusoidal embedding (B, 256)   [two official variants]
    CLIP pooled (B, 768) ++ aesthetic embedding -> pooled_proj  -> cond (B, D)
    CLIP penultimate states (B, 77, 768)        -> text_proj    -> txt  (B, 77, D)
    image tokens (B, K, D), txt, cond -> depth x JointBlock (MM-DiT: each stream has
        its own adaLN-Zero and projections, attention is joint over [image, text])
    -> AdaLNContinuous(cond) -> (B, K, D) -> VQ: logits over the codebook
                                             KL: per-token conditions for DiffLoss

The blocks are written here and behave exactly as diffusers'
`JointTransformerBlock(dim, heads, dim // heads, context_pre_only=last)` (no qk-norm),
which the official code uses; tests/test_mmdit_parity.py checks that.

Public API:
    model = MaskGen(PRESETS["maskgen_vq_l"])          # a MaskGenVQ or MaskGenKL by config.mode
    model = MaskGen.from_official("generator_maskgen_kl_l")   # a released directory
    loss = model(tokens, text, pooled, aesthetic)     # training; VQ tokens (B,K) long,
                                                      # KL tokens (B,K,2C) = cat(mean, logvar)
    tokens = model.generate(text, pooled, null_text, null_pooled, aesthetic=6.5)
        # -> VQ (B,K) ids | KL (B,K,C) unscaled, ready for TATiTok.decode
    text/pooled are TextEncoder(...)(captions).penultimate / .pooled; null_* the "" caption's.
"""

import json
import math
import os
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint

from diffloss import DiffLoss

# -----------------------------------------------------------------------------
# Aesthetic-score embeddings (§4.2: the score is "projected into sinusoidal
# embeddings and appended to the pooled text embedding").
#
# The two released variants embed the score differently, and each variant's weights
# only make sense with its own features, so both are kept. Both are written with the
# official operation order in float32 so the released weights see the same numbers.


def aesthetic_embedding_vq(score, dim):
    """MaskGen-VQ: [sin | cos] halves, frequencies exp(-ln(1000) * i / half).

    score: (B,) already x100. Returns (B, dim) float32.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=score.device)
    freqs = torch.exp(-math.log(1000) * i / half)  # (half,) from 1 down to ~1/1000
    angles = score.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, 2 * half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim)


def aesthetic_embedding_kl(score, dim):
    """MaskGen-KL: sin and cos interleaved (sin0, cos0, sin1, ...), frequencies 10000^(-2i/dim).

    score: (B,) already x100. Returns (B, dim) float32.
    """
    freqs = torch.pow(10000, -torch.arange(0, dim, 2, dtype=torch.float32, device=score.device) / dim)
    angles = score.float()[:, None] * freqs  # (B, dim/2)
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(1)  # (B, dim)


# -----------------------------------------------------------------------------
# Adaptive LayerNorms: the pooled condition sets the normalisation's shift and scale.


class AdaLNZero(nn.Module):
    """adaLN-Zero (DiT): LayerNorm without affine, modulated by the condition.

    One linear map of silu(cond) gives six vectors, in diffusers' order: shift, scale
    and gate for the attention branch, then shift, scale and gate for the MLP branch.
    The attention input is modulated here; the other three are returned for the block.
    ("Zero" is DiT's zero-init of this map, which makes each block start as the
    identity; the official MaskGen-VQ init does not actually zero it, see
    MaskGenVQ.initialize_weights.)
    """

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulation(self, cond):
        """(B, D) condition -> (B, 6D). It depends only on the prompt, so generate()
        computes it once (MaskGen.modulations) and passes it to every step as `mod`."""
        return self.linear(F.silu(cond))

    def forward(self, x, cond, mod=None):
        mod = self.modulation(cond) if mod is None else mod  # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)  # each (B, D)
        x = self.norm(x) * (1 + scale_a[:, None]) + shift_a[:, None]  # (B, T, D)
        return x, gate_a, shift_m, scale_m, gate_m


class AdaLNContinuous(nn.Module):
    """LayerNorm without affine, then (1 + scale) * x + shift from the condition.

    Used as the final norm of the image stream and as the text stream's norm in the
    last ("pre-only") block. Note the chunk order: scale first, then shift (diffusers).
    """

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulation(self, cond):  # (B, D) -> (B, 2D), prompt-only like AdaLNZero's
        return self.linear(F.silu(cond))

    def forward(self, x, cond, mod=None):
        mod = self.modulation(cond) if mod is None else mod
        scale, shift = mod.chunk(2, dim=1)  # (B, D) each
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]  # (B, T, D)


# -----------------------------------------------------------------------------
# The MM-DiT joint block (SD3's MM-DiT, paper §4.2): two streams, one attention.


class JointAttention(nn.Module):
    """Attention over the concatenated [image, text] sequence, with separate q/k/v/out
    projections per stream, so each modality keeps its own weights but every token
    can attend to every other.

    Each stream's q, k and v projections are one fused Linear (img_qkv: rows q | k | v),
    so they run as one matrix multiply instead of three. The official checkpoints hold
    them separately (to_q, to_k, to_v); from_official loads them into the row blocks and
    fuse_qkv() converts any state dict with separate projections.

    txt_queries=False is the last block's "pre-only" text stream: its outputs would be
    thrown away, so we do not compute text queries or a text output at all (txt_kv: rows
    k | v). Each query row of attention is independent, so the image outputs are
    unchanged. (The released checkpoints carry an `add_q_proj` for that block;
    from_official skips it.)
    """

    def __init__(self, dim, heads, txt_queries=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads; pick heads that divide it")
        self.heads = heads
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.img_out = nn.Linear(dim, dim)
        if txt_queries:
            self.txt_qkv, self.txt_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        else:
            self.txt_kv = nn.Linear(dim, 2 * dim)
        self.txt_queries = txt_queries

    def forward(self, img, txt):
        B, N, D = img.shape
        h = self.heads

        def heads_first(t, n):  # (B, T, n*D) -> n tensors (B, h, T, D/h)
            return t.view(B, t.shape[1], n, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)

        img_q, img_k, img_v = heads_first(self.img_qkv(img), 3)
        if self.txt_queries:
            txt_q, txt_k, txt_v = heads_first(self.txt_qkv(txt), 3)
            q = torch.cat([img_q, txt_q], dim=2)  # (B, h, N+L, d)
        else:
            (txt_k, txt_v), q = heads_first(self.txt_kv(txt), 2), img_q  # q: (B, h, N, d)
        k = torch.cat([img_k, txt_k], dim=2)  # (B, h, N+L, d)
        v = torch.cat([img_v, txt_v], dim=2)  # (B, h, N+L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N or N+L, d)
        out = out.transpose(1, 2).reshape(B, -1, D)  # (B, N or N+L, D)
        img_out = self.img_out(out[:, :N])  # (B, N, D)
        txt_out = self.txt_out(out[:, N:]) if self.txt_queries else None  # (B, L, D)
        return img_out, txt_out


class FeedForward(nn.Module):
    """Linear -> GELU (tanh approximation, as diffusers' "gelu-approximate") -> Linear, ratio 4."""

    def __init__(self, dim, ratio=4):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class JointBlock(nn.Module):
    """One MM-DiT block: diffusers' JointTransformerBlock without qk-norm.

    Both streams are modulated by the same pooled condition but through their own
    adaLN. forward(img (B,N,D), txt (B,L,D), cond (B,D)) -> (img, txt); in the last
    block (txt_pre_only=True) the text stream only supplies keys/values, gets an
    AdaLNContinuous instead of adaLN-Zero, has no MLP, and None is returned for it.
    """

    def __init__(self, dim, heads, txt_pre_only=False):
        super().__init__()
        self.txt_pre_only = txt_pre_only
        self.img_adaln = AdaLNZero(dim)
        self.txt_adaln = AdaLNContinuous(dim) if txt_pre_only else AdaLNZero(dim)
        self.attn = JointAttention(dim, heads, txt_queries=not txt_pre_only)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_mlp = FeedForward(dim)
        if not txt_pre_only:
            self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.txt_mlp = FeedForward(dim)

    def modulations(self, cond):
        """The adaLN maps of both streams for a (B, D) condition: (img_mod, txt_mod)."""
        return self.img_adaln.modulation(cond), self.txt_adaln.modulation(cond)

    def forward(self, img, txt, cond, mods=None):
        img_mod, txt_mod = (None, None) if mods is None else mods  # precomputed by generate()
        img_in, gate_a, shift_m, scale_m, gate_m = self.img_adaln(img, cond, img_mod)  # img_in (B, N, D)
        if self.txt_pre_only:
            txt_in = self.txt_adaln(txt, cond, txt_mod)  # (B, L, D)
        else:
            txt_in, t_gate_a, t_shift_m, t_scale_m, t_gate_m = self.txt_adaln(txt, cond, txt_mod)
        img_att, txt_att = self.attn(img_in, txt_in)  # (B, N, D), (B, L, D) or None

        # Image stream: gated attention residual, then a gated MLP residual whose input
        # is a plain LayerNorm modulated by the MLP shift/scale.
        img = img + gate_a[:, None] * img_att
        h = self.img_norm2(img) * (1 + scale_m[:, None]) + shift_m[:, None]
        img = img + gate_m[:, None] * self.img_mlp(h)  # (B, N, D)
        if self.txt_pre_only:
            return img, None

        # Text stream: the same, with its own gates and MLP.
        txt = txt + t_gate_a[:, None] * txt_att
        h = self.txt_norm2(txt) * (1 + t_scale_m[:, None]) + t_shift_m[:, None]
        txt = txt + t_gate_m[:, None] * self.txt_mlp(h)  # (B, L, D)
        return img, txt


# -----------------------------------------------------------------------------
# Small helpers for sampling: randomness from an optional generator, and the
# schedules, computed in Python before the loop so the loop has static shapes.


def _rand(shape, generator, device):
    return torch.rand(shape, generator=generator, device=device)


def _gumbel(shape, generator, device):
    # -log(-log(u)), with the official clamps (1e-20) so u = 0 cannot give inf.
    u = _rand(shape, generator, device)
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


def arccos_mask_rate(u):
    """The "arccos" masking schedule: rate = acos(u) / (pi/2) for progress u in [0, 1].

    With u ~ U(0, 1) its mean is 2/pi ~ 0.64, so training sees mostly heavy masking;
    during sampling u = step / steps gives few tokens early and many late.
    """
    return torch.acos(u) / (math.pi * 0.5)


def vq_mask_schedule(num_tokens, num_steps):
    """How many tokens stay masked after each VQ decoding step (a Python list).

    The official computes floor(K * arccos_rate(ratio)) in float32 on the device and
    clamps it to [1, (tokens masked now) - 1] using the first sample's count; every
    sample has the same count, so doing it once here in Python (in float32, for the
    same rounding) gives the same numbers without a host sync in the loop.
    """
    counts, masked = [], num_tokens
    for step in range(num_steps):
        rate = arccos_mask_rate(torch.tensor((step + 1) / num_steps))  # float32, as official
        masked = max(1, min(masked - 1, int(torch.floor(num_tokens * rate))))
        counts.append(masked)
    return counts


def kl_draw_schedule(num_tokens, num_steps):
    """MaskGen-KL's (MAR's) cosine schedule, as Python ints: one (lo, hi, left) per step
    that draws tokens. Positions order[:, :hi] are masked before the step, which draws
    order[:, lo:hi]; `left` = floor(K cos(pi/2 (s+1)/N)), kept in [1, hi - 1], sets the
    guidance ramp. The last step draws everything still masked (lo = 0); with N > K some
    steps would draw nothing and are left out."""
    K, N, masked, draws = num_tokens, num_steps, num_tokens, []
    for step in range(N):
        left = max(1, min(masked - 1, math.floor(K * math.cos(math.pi / 2 * (step + 1) / N))))
        lo = 0 if step == N - 1 else left
        if masked - lo > 0:
            draws.append((lo, masked, left))
            masked = lo
    return draws


def vq_guidance_scale(scale, schedule, ratio, power=1.0):
    """The VQ guidance weight s at step ratio (step + 1) / steps, official schedules.

    "cosine" (MDT) ramps s from ~1 at the first step to `scale` at the last, in float32
    as the official computes it (so guided logits match bit for bit); "linear" ramps
    linearly; "none" keeps `scale`.
    """
    if schedule == "none":
        return scale
    if schedule == "linear":
        return ratio * (scale - 1) + 1
    p = torch.ones(1) * power
    ramp = (1 - torch.cos((ratio**p) * torch.pi)) * 1 / 2
    return float(((scale - 1) * ramp + 1)[0])


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
        if self.mode == "kl" and self.aes_embed_dim % 2:
            raise ValueError(
                f"the KL aesthetic embedding interleaves sin/cos; aes_embed_dim must be even, got {self.aes_embed_dim}"
            )
        ok = ("cosine", "linear", "none") if self.mode == "vq" else ("linear", "constant")
        if self.guidance_schedule not in ok:
            raise ValueError(f"guidance_schedule {self.guidance_schedule!r} is not one of {ok} for mode {self.mode!r}")


class MaskGen(nn.Module):
    """The shared trunk: text conditioning, MM-DiT blocks, final adaptive norm.

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

    def __init__(self, config):
        super().__init__()
        self.config = config
        D = config.width
        self.text_proj = nn.Linear(config.text_width, D)
        self.pooled_proj = nn.Linear(config.pooled_dim + config.aes_embed_dim, D)
        self.blocks = nn.ModuleList(
            [JointBlock(D, config.heads, txt_pre_only=(i == config.depth - 1)) for i in range(config.depth)]
        )
        self.norm_out = AdaLNContinuous(D)
        self.grad_checkpointing = False  # set True to trade compute for memory in training

    # --- conditioning --------------------------------------------------------

    def _aesthetic(self, aesthetic, batch, device):
        """A scalar, a 0-d / (1,) / (B,) tensor, or None (config default) -> (B,) float32."""
        aesthetic = self.config.aesthetic if aesthetic is None else aesthetic
        score = torch.as_tensor(aesthetic, dtype=torch.float32, device=device)
        if score.dim() == 0 or tuple(score.shape) == (1,):
            return score.reshape(1).expand(batch)
        if tuple(score.shape) != (batch,):
            raise ValueError(
                f"aesthetic must be a number or a ({batch},) tensor, one score per sample; "
                f"got shape {tuple(score.shape)}"
            )
        return score

    def encode_condition(self, text, pooled, aesthetic=None):
        """Prompt-only conditions: txt (B, L, D) for the text stream, cond (B, D) for adaLN.

        text: (B, L, text_width) CLIP penultimate states; pooled: (B, pooled_dim) or the
        official (B, 1, pooled_dim); aesthetic: see _aesthetic.
        """
        c = self.config
        if text.dim() != 3 or text.shape[-1] != c.text_width:
            raise ValueError(
                f"text must be (B, L, {c.text_width}) CLIP penultimate states, got {tuple(text.shape)}; "
                f"pass TextEncoder(...)(captions).penultimate (or set MaskGenConfig.text_width)"
            )
        B = text.shape[0]
        if pooled.shape[0] != B or pooled.numel() != B * c.pooled_dim:
            raise ValueError(
                f"pooled must be ({B}, {c.pooled_dim}), one CLIP pooled embedding per caption, "
                f"got {tuple(pooled.shape)}; "
                f"pass TextEncoder(...)(captions).pooled (or set MaskGenConfig.pooled_dim)"
            )
        pooled = pooled.reshape(B, c.pooled_dim)
        if c.aes_embed_dim:
            embed = aesthetic_embedding_vq if c.mode == "vq" else aesthetic_embedding_kl
            score = self._aesthetic(aesthetic, B, text.device)  # (B,)
            pooled = torch.cat([pooled, embed(score * 100, c.aes_embed_dim).to(pooled.dtype)], dim=-1)
        return self.text_proj(text), self.pooled_proj(pooled)  # (B, L, D), (B, D)

    def _prompt_conditions(self, text, pooled, null_text, null_pooled, aesthetic, guided):
        """encode_condition for generate(): [cond; uncond] stacked (2B rows) when guided.

        The unconditional rows use the "" caption's encoding and the same aesthetic score.
        This runs once per generate() call: nothing here depends on the step.
        """
        if not guided:
            return self.encode_condition(text, pooled, aesthetic)
        if null_text is None or null_pooled is None:
            raise ValueError(
                "guidance_scale != 1 needs the unconditional condition: pass null_text and null_pooled, "
                "the empty caption's encoding (enc = TextEncoder()(['']); enc.penultimate, enc.pooled), "
                "or use guidance_scale=1.0 for no guidance"
            )
        B = text.shape[0]
        if null_text.shape[0] not in (1, B) or null_pooled.shape[0] not in (1, B):
            raise ValueError(
                f"null_text / null_pooled must have 1 or {B} rows (the '' caption's encoding), "
                f"got {tuple(null_text.shape)} and {tuple(null_pooled.shape)}"
            )
        null_text = null_text.expand(B, -1, -1) if null_text.shape[0] == 1 else null_text
        null_pooled = null_pooled.reshape(null_pooled.shape[0], -1)
        null_pooled = null_pooled.expand(B, -1) if null_pooled.shape[0] == 1 else null_pooled
        score = self._aesthetic(aesthetic, B, text.device)
        # Project both halves in one batch, as the official does (same rounding).
        return self.encode_condition(
            torch.cat([text, null_text.to(text.dtype)]),
            torch.cat([pooled.reshape(B, -1), null_pooled.to(pooled.dtype)]),
            torch.cat([score, score]),
        )

    # --- the trunk -----------------------------------------------------------

    def modulations(self, cond):
        """Every adaLN modulation of the trunk for a (B, D) condition: one (img, txt) pair
        per block, then the final norm's. They depend only on the prompt, so generate()
        computes them once instead of at every step (for a small batch these weight
        reads are ~1/5 of each step's memory traffic)."""
        return [blk.modulations(cond) for blk in self.blocks] + [self.norm_out.modulation(cond)]

    def trunk(self, img, txt, cond, mods=None):
        """img (B, N, D) tokens, txt (B, L, D) projected text, cond (B, D) -> (B, N, D).
        mods: self.modulations(cond), when precomputed."""
        mods = [None] * (len(self.blocks) + 1) if mods is None else mods
        for blk, m in zip(self.blocks, mods):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                img, txt = checkpoint(blk, img, txt, cond, m, use_reentrant=False)
            else:
                img, txt = blk(img, txt, cond, m)
        return self.norm_out(img, cond, mods[-1])

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
        c, D, N, L = self.config, self.config.width, self.config.num_tokens, text_len
        condition = 2 * L * c.text_width * D + 2 * (c.pooled_dim + c.aes_embed_dim) * D
        # adaLN maps: two adaLN-Zero per block (2 x 12 D^2), except the last block's text
        # AdaLNContinuous (4 D^2), and the final norm (4 D^2).
        condition += (c.depth - 1) * 24 * D * D + 16 * D * D + 4 * D * D
        T = N + L
        # Blocks before the last: q/k/v/out and the MLP on all T tokens (24 T D^2),
        # joint attention (4 T^2 D).
        step = (c.depth - 1) * (24 * T * D * D + 4 * T * T * D)
        # The last block: image q/k/v/out + MLP (24 N D^2), text k/v only (4 L D^2), N
        # queries over T keys.
        step += 24 * N * D * D + 4 * L * D * D + 4 * N * T * D
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

    def _check_generator(self, generator, device):
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"the generator is on {generator.device} but the inputs are on {device}; "
                f"create it with torch.Generator(device={str(device)!r}).manual_seed(seed)"
            )

    # --- official checkpoints ------------------------------------------------

    @classmethod
    def from_official(cls, path):
        """Load a released directory (turkeyju/generator_maskgen_{vq_l,vq_xl,kl_l,kl_xl}).

        The directory holds config.json (the official OmegaConf config) and
        model.safetensors (or pytorch_model.bin). Keys are renamed by OFFICIAL_RENAMES;
        every missing, unexpected or mis-shaped key is reported by name.
        """
        ckpt = _OfficialCheckpoint(path)
        config = config_from_official(ckpt.config, path)
        if cls is not MaskGen and config.mode != cls.mode:
            raise ValueError(
                f"{path!r} holds a MaskGen-{config.mode.upper()} model; load it with MaskGen.from_official"
            )
        model = MaskGen(config, init_weights=False)  # the checkpoint overwrites every weight
        own = split_qkv(model.state_dict())  # q, k, v as views into the fused weights

        # Checkpoint keys that are deliberately not loaded: the tied LM head (the
        # embedding table itself; safetensors keeps one name for shared tensors, and
        # only if that name is lm_head.weight is it read, as the table) and the last
        # block's text queries (unused, see JointAttention).
        blocks = "blocks." if config.mode == "vq" else "decoder_blocks."
        last_q = f"{blocks}{config.depth - 1}.attn.add_q_proj"
        skip = {f"{last_q}.weight", f"{last_q}.bias"}
        if config.mode == "vq" and "embeddings.weight" in ckpt.keys:
            skip.add("lm_head.weight")
        mapping, unexpected, shapes = {}, [], []
        for key in ckpt.keys:
            if key in skip:
                continue
            if key == "lm_head.weight" and config.mode == "vq":
                ours = "tok_emb.weight"
            else:
                ours = official_to_ours(key, config.mode)
            if ours is None or ours not in own:
                unexpected.append(key)
            elif ckpt.shape(key) != tuple(own[ours].shape):
                shapes.append(f"{key}: checkpoint {ckpt.shape(key)} vs model {tuple(own[ours].shape)}")
            else:
                mapping[ours] = key
        # Missing: our weights that have an official name but got nothing (and no shape report).
        expected = [ours_to_official(k, config.mode) for k in own if k not in mapping]
        misfit = {s.split(":")[0] for s in shapes}
        missing = [k for k in expected if k is not None and k not in misfit]
        if missing or unexpected or shapes:

            def show(xs):
                return "\n    ".join(xs[:20]) + (f"\n    ... and {len(xs) - 20} more" if len(xs) > 20 else "")

            variant = f"MaskGen-{config.mode.upper()}"
            msg = [f"checkpoint {path!r} does not match the {variant} model its config.json describes:"]
            if missing:
                msg.append(f"  missing keys ({len(missing)}):\n    {show(missing)}")
            if unexpected:
                msg.append(f"  unexpected keys ({len(unexpected)}):\n    {show(unexpected)}")
            if shapes:
                msg.append(f"  shape mismatches ({len(shapes)}):\n    {show(shapes)}")
            msg.append(
                "  Fix: use the config.json that was released with these weights (same variant and size); "
                "a directory written by this project must use official key names (MaskGen.official_state_dict)."
            )
            raise RuntimeError("\n".join(msg))
        with torch.no_grad():  # stream tensor by tensor: one copy of the weights in memory
            for ours, key in mapping.items():
                own[ours].copy_(ckpt.get(key))
        return model

    def official_state_dict(self):
        """Our weights under the official key names (the inverse of from_official).

        The last block's unused text-query projection is written as zeros so the
        official code can load the result strictly; the tied lm_head is left out, as in
        the released model.safetensors.
        """
        mode, D = self.config.mode, self.config.width
        own = split_qkv(self.state_dict(), copy=True)  # copies: safetensors refuses shared storage
        out = {ours_to_official(k, mode): v for k, v in own.items() if ours_to_official(k, mode)}
        blocks = "blocks." if mode == "vq" else "decoder_blocks."
        ref = self.blocks[-1].attn.txt_kv.weight
        last_q = f"{blocks}{self.config.depth - 1}.attn.add_q_proj"
        out[f"{last_q}.weight"] = torch.zeros(D, D, dtype=ref.dtype, device=ref.device)
        out[f"{last_q}.bias"] = torch.zeros(D, dtype=ref.dtype, device=ref.device)
        return out

    def official_config(self):
        """config.json content in the official (OmegaConf) layout; config_from_official inverts it."""
        c = self.config
        vq_model = dict(
            quantize_mode="vq" if c.mode == "vq" else "vae", num_latent_tokens=c.num_tokens,
            token_size=c.token_size, text_embed_dim=c.text_width,
        )  # fmt: skip
        if c.pooled_dim != c.text_width:  # not in the official layout (it uses one width for both)
            vq_model["pooled_embed_dim"] = c.pooled_dim
        maskgen = dict(
            decoder_embed_dim=c.width, decoder_depth=c.depth, decoder_num_heads=c.heads,
            micro_condition=c.aes_embed_dim > 0, micro_condition_embed_dim=c.aes_embed_dim, text_drop_prob=0.1,
            cfg=c.guidance_scale, cfg_schedule=c.guidance_schedule, num_iter=c.num_steps,
            sample_aesthetic_score=c.aesthetic,
        )  # fmt: skip
        if c.mode == "vq":
            vq_model["codebook_size"] = c.codebook_size
            maskgen.update(condition_num_classes=c.num_class_rows, temperature=c.randomize_temperature)
            losses = dict(label_smoothing=c.label_smoothing, loss_weight_unmasked_token=c.unmasked_weight)
        else:
            vq_model["scale_factor"] = c.scale_factor
            temperature = 1.0 if c.temperature is None else c.temperature
            maskgen.update(temperature=temperature, diffusion_batch_mul=c.diffusion_batch_mul)
            losses = dict(
                diffloss_d=c.diffloss_depth, diffloss_w=c.diffloss_width, num_sampling_steps=c.num_sampling_steps
            )
        return {
            "model": {"vq_model": vq_model, "maskgen": maskgen},
            "losses": losses,
            "dataset": {"preprocessing": {"crop_size": 256}},
        }


class MaskGenVQ(MaskGen):
    """MaskGen over discrete TA-TiTok ids: embedding table in, the same table out."""

    mode = "vq"

    def __init__(self, config, init_weights=True):
        if config.mode != "vq":
            raise ValueError(f"MaskGenVQ needs a config with mode='vq', got {config.mode!r}; use MaskGen(config)")
        super().__init__(config)
        V, D = config.codebook_size, config.width
        # Rows: V codes, then [MASK] (id V), then num_class_rows + 1 rows the released
        # table carries from the class-conditional MaskGIT code (unused here, kept so
        # the released weights load unchanged).
        self.mask_id = V
        self.tok_emb = nn.Embedding(V + 1 + config.num_class_rows + 1, D)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.num_tokens, D))
        if init_weights:
            self.initialize_weights()

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

    @torch.no_grad()
    def generate(
        self, text, pooled, null_text=None, null_pooled=None, aesthetic=None, num_steps=None, guidance_scale=None,
        guidance_schedule=None, randomize_temperature=None, temperature=None, generator=None, guidance_scale_pow=1.0,
    ):  # fmt: skip
        """MaskGIT-style decoding (official defaults: 16 steps, guidance 12 with cosine ramp,
        randomize temperature 2). Returns ids (B, K) in [0, V).

        Each step predicts all tokens, samples ids for the masked ones (Gumbel-max with a
        temperature annealed to 0), and re-masks the least confident of them, fewer
        each step (arccos schedule), until none is left.

        text (B, L, Dt), pooled (B, Dp): the captions' CLIP features; null_text,
            null_pooled: the "" caption's (one row or B rows), needed when guided.
        aesthetic: a number or (B,) scores (None: config default 6.5). Unlike the
            official generate(), which ignores the score it is given and always uses the
            config's (a bug), the caller's score is used, guided or not.
        guidance_scale: logits = cond + (cond - uncond) * s, the official formula, with s
            ramped by guidance_schedule ("cosine": 1 -> scale, "linear", "none": constant).
            guidance_scale == 1.0 means NO guidance: one conditional pass per step, no
            unconditional batch. (The official would run both passes and use
            2*cond - uncond there; every other scale matches the official exactly.)
        randomize_temperature: Gumbel noise temperature, times (1 - step ratio); 0 gives
            deterministic decoding (equal to the official's).
        temperature: None = the official annealed softmax temperature 0.5 + 0.8 (1 - ratio);
            a number = that constant softmax temperature.
        generator: optional torch.Generator on the inputs' device, for reproducibility.
        """
        c = self.config
        N = c.num_steps if num_steps is None else int(num_steps)
        g = float(c.guidance_scale if guidance_scale is None else guidance_scale)
        schedule = c.guidance_schedule if guidance_schedule is None else guidance_schedule
        rand_t = float(c.randomize_temperature if randomize_temperature is None else randomize_temperature)
        temperature = c.temperature if temperature is None else temperature
        if schedule not in ("cosine", "linear", "none"):
            raise ValueError(f"guidance_schedule must be 'cosine', 'linear' or 'none', got {schedule!r}")
        device, B, K = text.device, text.shape[0], c.num_tokens
        self._check_generator(generator, device)
        guided = g != 1.0

        txt, cond = self._prompt_conditions(text, pooled, null_text, null_pooled, aesthetic, guided)  # once
        mods = self.modulations(cond)  # once: every step reuses them
        remasked = vq_mask_schedule(K, N)
        ids = torch.full((B, K), self.mask_id, dtype=torch.long, device=device)
        for step in range(N):
            ratio = (step + 1) / N
            if guided:
                both = self.predict(torch.cat([ids, ids]), txt, cond, mods)  # (2B, K, V)
                cond_logits, uncond_logits = both[:B], both[B:]
                s = vq_guidance_scale(g, schedule, ratio, guidance_scale_pow)
                logits = cond_logits + (cond_logits - uncond_logits) * s  # (B, K, V)
            else:
                logits = self.predict(ids, txt, cond, mods)  # (B, K, V)
            logits = logits / (0.5 + 0.8 * (1 - ratio) if temperature is None else temperature)

            # Sample ids by Gumbel-max; the noise temperature anneals to 0 at the last step.
            noise_t = rand_t * (1 - ratio)
            noisy = logits + noise_t * _gumbel(logits.shape, generator, device) if noise_t > 0 else logits
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
                confidence = confidence + noise_t * _gumbel(confidence.shape, generator, device)
            # Re-mask exactly the `remasked[step]` least confident tokens (a fixed count,
            # so the shapes are static; the official's `<= cut-off` picks the same set
            # unless two confidences tie exactly).
            low = confidence.topk(remasked[step], dim=-1, largest=False).indices  # (B, n)
            ids = sampled.scatter(1, low, self.mask_id)
        return ids  # only reached with num_steps == 0


class MaskGenKL(MaskGen):
    """MaskGen over continuous TA-TiTok tokens (MAR-style decoder + DiffLoss)."""

    mode = "kl"

    def __init__(self, config, init_weights=True):
        if config.mode != "kl":
            raise ValueError(f"MaskGenKL needs a config with mode='kl', got {config.mode!r}; use MaskGen(config)")
        super().__init__(config)
        C, D, K = config.token_size, config.width, config.num_tokens
        self.z_proj = nn.Linear(C, D)  # token (C) -> width
        self.z_norm = nn.LayerNorm(D, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_emb = nn.Parameter(torch.zeros(1, K, D))  # added before the blocks
        self.diff_pos_emb = nn.Parameter(torch.zeros(1, K, D))  # added to the conditions for DiffLoss
        self.diffloss = DiffLoss(
            C, D, config.diffloss_depth, config.diffloss_width, num_sampling_steps=config.num_sampling_steps
        )
        if init_weights:
            self.initialize_weights()

    def initialize_weights(self):
        # The official (and MAR's) init: normal(0.02) for the mask token and position
        # tables, then Xavier-uniform for EVERY linear with zero biases, and unit
        # LayerNorms. That pass also covers the DiffLoss MLP and so replaces its own
        # zero-init of the adaLN and output layers, exactly as in the official model.
        for p in (self.mask_token, self.pos_emb, self.diff_pos_emb):
            nn.init.normal_(p, std=0.02)
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
        TATiTok.encode(..., return_posterior=True) gives them; a sample is drawn here.
        (B, K, C) is taken as the tokens themselves (e.g. posterior means)."""
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
            x = mean + std * torch.randn_like(mean)
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

    @torch.no_grad()
    def generate(
        self, text, pooled, null_text=None, null_pooled=None, aesthetic=None, num_steps=None, guidance_scale=None,
        guidance_schedule=None, randomize_temperature=None, temperature=None, generator=None,
    ):  # fmt: skip
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

        guidance_scale: DiffLoss's eps-guidance uncond + s (cond - uncond); "linear"
            ramps s = 1 + (scale - 1) (K - masked next) / K, "constant" keeps it.
            1.0 means no guidance (one conditional pass, as the official).
        temperature: DiffLoss noise temperature (None: config, 1.0).
        randomize_temperature: not used by the KL variant.
        Other arguments as MaskGenVQ.generate.
        """
        c = self.config
        N = c.num_steps if num_steps is None else int(num_steps)
        g = float(c.guidance_scale if guidance_scale is None else guidance_scale)
        schedule = c.guidance_schedule if guidance_schedule is None else guidance_schedule
        temperature = (1.0 if c.temperature is None else c.temperature) if temperature is None else temperature
        if schedule not in ("linear", "constant"):
            raise ValueError(f"guidance_schedule must be 'linear' or 'constant' for MaskGen-KL, got {schedule!r}")
        device, B, K, C, D = text.device, text.shape[0], c.num_tokens, c.token_size, c.width
        self._check_generator(generator, device)
        guided = g != 1.0

        txt, cond = self._prompt_conditions(text, pooled, null_text, null_pooled, aesthetic, guided)  # once
        mods = self.modulations(cond)  # once: every step reuses them
        order = _rand((B, K), generator, device).argsort(dim=-1)  # (B, K) generation order
        tokens = torch.zeros(B, K, C, device=device)
        mask = torch.ones(B, K, device=device)  # 1 = still masked
        for lo, hi, left in kl_draw_schedule(K, N):
            s = 1 + (g - 1) * (K - left) / K if schedule == "linear" else g
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


# -----------------------------------------------------------------------------
# Official checkpoints: key names, config.json, lazy reading.
#
# Official key -> ours. Top level, per variant (an entry ending in "." is a prefix):
OFFICIAL_RENAMES = {
    "vq": [
        ("text_embed_proj.", "text_proj."),
        ("cond_pooled_proj.", "pooled_proj."),
        ("blocks.", "blocks."),
        ("norm.linear.", "norm_out.linear."),
        ("embeddings.weight", "tok_emb.weight"),
        ("pos_embed", "pos_emb"),
    ],
    "kl": [
        ("text_emb.", "text_proj."),
        ("text_pooled_emb.", "pooled_proj."),
        ("decoder_blocks.", "blocks."),
        ("decoder_norm.linear.", "norm_out.linear."),
        ("z_proj.", "z_proj."),
        ("z_proj_ln.", "z_norm."),
        ("mask_token", "mask_token"),
        ("decoder_pos_embed_learned", "pos_emb"),
        ("diffusion_pos_embed_learned", "diff_pos_emb"),
        ("diffloss.net.", "diffloss.net."),
    ],
}
# Inside a block: diffusers' JointTransformerBlock names -> ours, with q, k and v as
# separate parts (split_qkv / fuse_qkv map them to and from the fused weights).
BLOCK_RENAMES = [
    ("norm1.linear.", "img_adaln.linear."),
    ("norm1_context.linear.", "txt_adaln.linear."),
    ("attn.to_q.", "attn.img_q."),
    ("attn.to_k.", "attn.img_k."),
    ("attn.to_v.", "attn.img_v."),
    ("attn.to_out.0.", "attn.img_out."),
    ("attn.add_q_proj.", "attn.txt_q."),
    ("attn.add_k_proj.", "attn.txt_k."),
    ("attn.add_v_proj.", "attn.txt_v."),
    ("attn.to_add_out.", "attn.txt_out."),
    ("ff.net.0.proj.", "img_mlp.fc1."),
    ("ff.net.2.", "img_mlp.fc2."),
    ("ff_context.net.0.proj.", "txt_mlp.fc1."),
    ("ff_context.net.2.", "txt_mlp.fc2."),
]

# JointAttention's fused projections and the separate ones they stack, in row order.
FUSED_QKV = {"img_qkv": ("img_q", "img_k", "img_v"), "txt_qkv": ("txt_q", "txt_k", "txt_v"), "txt_kv": ("txt_k", "txt_v")}
QKV_PARTS = {part for parts in FUSED_QKV.values() for part in parts}


def _attn_key(key):
    """'blocks.3.attn.img_qkv.weight' -> ('blocks.3.attn', 'img_qkv', 'weight'), else None."""
    mod, _, param = key.rpartition(".")
    head, _, name = mod.rpartition(".")
    return (head, name, param) if head == "attn" or head.endswith(".attn") else None


def split_qkv(sd, copy=False):
    """Our state dict with each fused projection replaced by its parts: row-block views of
    the fused tensor (copying into a part writes the model's weight), or copies."""
    out = {}
    for key, t in sd.items():
        parsed = _attn_key(key)
        if parsed is None or parsed[1] not in FUSED_QKV:
            out[key] = t
            continue
        head, name, param = parsed
        for part, rows in zip(FUSED_QKV[name], t.chunk(len(FUSED_QKV[name]))):
            out[f"{head}.{part}.{param}"] = rows.clone() if copy else rows
    return out


def fuse_qkv(sd):
    """The inverse of split_qkv: a state dict with separate q/k/v projections (checkpoints
    written before they were fused, or renamed diffusers weights) -> JointAttention's
    fused layout. Anything else, including an incomplete set of parts, passes unchanged."""
    out, groups = {}, {}
    for key, t in sd.items():
        parsed = _attn_key(key)
        if parsed is not None and parsed[1] in QKV_PARTS:
            groups.setdefault((parsed[0], parsed[2]), {})[parsed[1]] = t
        else:
            out[key] = t
    for (head, param), parts in groups.items():
        for fused, names in FUSED_QKV.items():  # txt_qkv before txt_kv: q decides
            if all(n in parts for n in names):
                out[f"{head}.{fused}.{param}"] = torch.cat([parts.pop(n) for n in names])
        out.update({f"{head}.{n}.{param}": t for n, t in parts.items()})
    return out


def _rename(key, table):
    for a, b in table:
        if key == a or (a.endswith(".") and key.startswith(a)):
            return b + key[len(a) :]
    return None


def block_key_from_official(key):
    """A diffusers JointTransformerBlock key ('attn.to_q.weight') -> ours, or None."""
    return _rename(key, BLOCK_RENAMES)


def official_to_ours(key, mode):
    """An official MaskGen key -> ours, or None if it has no counterpart."""
    new = _rename(key, OFFICIAL_RENAMES[mode])
    if new is not None and new.startswith("blocks."):
        i, _, inner = new[len("blocks.") :].partition(".")
        inner = block_key_from_official(inner)
        return None if inner is None or not i.isdigit() else f"blocks.{i}.{inner}"
    return new


def ours_to_official(key, mode):
    """Our key -> the official one, or None for state we hold that checkpoints do not."""
    inverse = [(b, a) for a, b in OFFICIAL_RENAMES[mode]]
    if key.startswith("blocks."):
        i, _, inner = key[len("blocks.") :].partition(".")
        inner = _rename(inner, [(b, a) for a, b in BLOCK_RENAMES])
        return None if inner is None else _rename(f"blocks.{i}.{inner}", inverse)
    return _rename(key, inverse)


def config_from_official(d, path="config.json"):
    """The official nested config dict (config.json) -> MaskGenConfig."""
    if "model" not in d and isinstance(d.get("config"), dict):  # a hub-mixin wrapper
        d = d["config"]
    try:
        vq, mg, losses = d["model"]["vq_model"], d["model"]["maskgen"], d.get("losses", {})
        mode = {"vq": "vq", "vae": "kl"}[vq.get("quantize_mode", "vq")]
        kw = dict(
            mode=mode, width=mg["decoder_embed_dim"], depth=mg["decoder_depth"], heads=mg["decoder_num_heads"],
            num_tokens=vq["num_latent_tokens"], token_size=vq.get("token_size", 16 if mode == "kl" else 64),
            text_width=vq.get("text_embed_dim", 768),
            pooled_dim=vq.get("pooled_embed_dim", vq.get("text_embed_dim", 768)),
            aes_embed_dim=mg["micro_condition_embed_dim"] if mg.get("micro_condition", False) else 0,
            guidance_scale=mg.get("cfg", 12.0 if mode == "vq" else 3.0),
            aesthetic=mg.get("sample_aesthetic_score", 6.5),
        )  # fmt: skip
        if mode == "vq":
            if not mg.get("weight_tying", True):
                raise ValueError(
                    f"{path}: weight_tying: False (an untied LM head) is not supported; every release ties it"
                )
            if mg.get("mask_schedule_strategy", "arccos") != "arccos":
                raise ValueError(
                    f"{path}: only the arccos mask schedule is implemented, got {mg['mask_schedule_strategy']!r}"
                )
            kw.update(
                codebook_size=vq["codebook_size"], num_class_rows=mg.get("condition_num_classes", 1000),
                num_steps=mg.get("num_iter", 16), guidance_schedule=mg.get("cfg_schedule", "cosine"),
                randomize_temperature=mg.get("randomize_temperature", mg.get("temperature", 2.0)),
                label_smoothing=losses.get("label_smoothing", 0.1),
                unmasked_weight=losses.get("loss_weight_unmasked_token", 0.1),
            )  # fmt: skip
        else:
            kw.update(
                scale_factor=vq["scale_factor"], diffloss_depth=losses["diffloss_d"],
                diffloss_width=losses["diffloss_w"],
                num_sampling_steps=str(losses.get("num_sampling_steps", "100")),
                diffusion_batch_mul=mg.get("diffusion_batch_mul", 4), num_steps=mg.get("num_iter", 32),
                guidance_schedule=mg.get("cfg_schedule", "linear"), temperature=mg.get("temperature", 1.0),
            )  # fmt: skip
    except KeyError as e:
        raise ValueError(
            f"{path} is not a MaskGen config.json: missing field {e} (expected model.vq_model, model.maskgen, losses)"
        ) from None
    return MaskGenConfig(**kw)


class _OfficialCheckpoint:
    """A released directory, read lazily: config dict, key list, shapes, one tensor at a time.

    Reading tensor by tensor into the model keeps one copy of the weights in memory,
    which matters for the 1.1B-parameter XL models.
    """

    def __init__(self, path):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"MaskGen checkpoint directory {path!r} does not exist; download a release, e.g. "
                f"`huggingface-cli download turkeyju/generator_maskgen_vq_l --local-dir {path}`"
            )
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(
                f"{path!r} has no config.json; a release directory holds config.json and model.safetensors"
            )
        with open(cfg_file) as f:
            self.config = json.load(f)
        st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st):
            self._st = safe_open(st, framework="pt", device="cpu")
            self.keys = list(self._st.keys())
        elif os.path.isfile(pt):
            try:  # memory-mapped when the file allows it
                self._sd = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                self._sd = torch.load(pt, map_location="cpu", weights_only=True)
            self._st = None
            self.keys = list(self._sd.keys())
        else:
            raise FileNotFoundError(
                f"{path!r} has neither model.safetensors nor pytorch_model.bin; re-download the release"
            )

    def shape(self, key):
        return tuple(self._st.get_slice(key).get_shape()) if self._st is not None else tuple(self._sd[key].shape)

    def get(self, key):
        return self._st.get_tensor(key) if self._st is not None else self._sd[key]


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
    # 64-wide "shapes" text tower; four 192-wide blocks (~5M parameters) train in ~25 min
    # on 2 CPU cores.
    "shapes_vq": MaskGenConfig(
        mode="vq", width=192, depth=4, heads=4, num_tokens=32, codebook_size=512, num_class_rows=0, token_size=16,
        text_width=64, pooled_dim=64, aes_embed_dim=32, num_steps=16, guidance_scale=3.0, randomize_temperature=1.0,
    ),
    "shapes_kl": MaskGenConfig(
        mode="kl", width=192, depth=4, heads=4, num_tokens=32, token_size=8, text_width=64, pooled_dim=64,
        aes_embed_dim=32, diffloss_depth=3, diffloss_width=192, num_sampling_steps="50", num_steps=16,
        guidance_scale=2.0, guidance_schedule="linear", temperature=1.0,
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

"""
MM-DiT: the text-conditioned transformer trunk of MaskGen, and its blocks.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact
Text-Aware One-Dimensional Tokens" (Kim et al., arXiv 2501.07730), §4.2 and Fig. 3:
MaskGen's trunk is a stack of MM-DiT blocks (Esser et al., "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", SD3, 2024). An MM-DiT block keeps two
streams, the image tokens and the caption's CLIP states, each with its own adaptive
LayerNorms, projections and MLP, and runs ONE attention over both, so that every token
attends to every other. The pooled text condition modulates both streams (adaLN, DiT).

The reference is diffusers' `JointTransformerBlock(dim, heads, dim // heads,
context_pre_only=last)` (no qk-norm), which the official MaskGen uses; these blocks
compute the same function (tests/test_mmdit_parity.py compares them when diffusers is
installed), and checkpoint.py maps diffusers' parameter names onto ours.

In the order below (bottom-up):
    AdaLNZero         LayerNorm modulated by the condition, + gates for the residuals
    AdaLNContinuous   LayerNorm modulated by the condition (final norm, last text norm)
    JointAttention    attention over [image, text], separate projections per stream
    FeedForward       Linear -> tanh-GELU -> Linear
    JointBlock        one MM-DiT block: forward(img (B,N,D), txt (B,L,D), cond (B,D))
    aesthetic_embedding_vq / _kl   the aesthetic score's sinusoidal features (§4.2)
    MMDiT             the trunk: CLIP text + pooled + aesthetic in, depth x JointBlock,
                      final norm; maskgen.MaskGen adds the token layers on top
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


# JointAttention's fused projections and the separate ones they stack, in row order.
FUSED_QKV = {"img_qkv": ("img_q", "img_k", "img_v"), "txt_qkv": ("txt_q", "txt_k", "txt_v"), "txt_kv": ("txt_k", "txt_v")}


class JointAttention(nn.Module):
    """Attention over the concatenated [image, text] sequence, with separate q/k/v/out
    projections per stream, so each modality keeps its own weights but every token
    can attend to every other.

    Each stream's q, k and v projections are one fused Linear (img_qkv: rows q | k | v),
    so they run as one matrix multiply instead of three. The official checkpoints hold
    them separately (to_q, to_k, to_v); checkpoint.py loads them into the row blocks
    (FUSED_QKV names them).

    txt_queries=False is the last block's "pre-only" text stream: its outputs would be
    thrown away, so we do not compute text queries or a text output at all (txt_kv: rows
    k | v). Each query row of attention is independent, so the image outputs are
    unchanged. (The released checkpoints carry an `add_q_proj` for that block;
    checkpoint.py skips it.)
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
# The trunk: the caption's two CLIP features in, a stack of joint blocks, a final norm.


class MMDiT(nn.Module):
    """MaskGen's MM-DiT trunk (paper Fig. 3), everything but the token layers:

        CLIP penultimate states (B, L, text_width)           -> text_proj   -> txt  (B, L, D)
        CLIP pooled (B, pooled_dim) ++ aesthetic embedding    -> pooled_proj -> cond (B, D)
        tokens (B, N, D), txt, cond -> depth x JointBlock -> AdaLNContinuous(cond) -> (B, N, D)

    As in SD3's MM-DiT (context embedder; pooled text + timestep embedding; joint blocks;
    final adaLN), with the aesthetic score in the timestep's place. The last block's text
    stream is "pre-only" (keys and values only). config: a maskgen.MaskGenConfig (width,
    depth, heads, text_width, pooled_dim, aes_embed_dim, and mode / aesthetic for the score).
    """

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

    def trunk_flops(self, N, L):
        """Forward FLOPs per sample of the trunk for N tokens and L text tokens, as
        (condition: the text / pooled projections and every adaLN modulation, which depend
        only on the prompt; one trunk pass over the N tokens). 2 FLOPs per multiply-add,
        attention's QK^T and AV; norms, activations and softmax left out."""
        c, D, T = self.config, self.config.width, N + L
        condition = 2 * L * c.text_width * D + 2 * (c.pooled_dim + c.aes_embed_dim) * D
        # adaLN maps: two adaLN-Zero per block (2 x 12 D^2), except the last block's text
        # AdaLNContinuous (4 D^2), and the final norm (4 D^2).
        condition += (c.depth - 1) * 24 * D * D + 16 * D * D + 4 * D * D
        # Blocks before the last: q/k/v/out and the MLP on all T tokens (24 T D^2),
        # joint attention (4 T^2 D).
        step = (c.depth - 1) * (24 * T * D * D + 4 * T * T * D)
        # The last block: image q/k/v/out + MLP (24 N D^2), text k/v only (4 L D^2), N
        # queries over T keys.
        step += 24 * N * D * D + 4 * L * D * D + 4 * N * T * D
        return condition, step

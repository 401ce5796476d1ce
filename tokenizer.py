"""TA-TiTok: the Text-Aware Transformer-based 1-Dimensional Tokenizer.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact
Text-Aware One-Dimensional Tokens" (Kim et al., arXiv 2501.07730), §3.2 and §4.1.

A ViT encoder reads an image's patches together with K learnable "latent tokens" and keeps only the
latter: the image becomes a 1D sequence of K tokens (K = 32, 64 or 128), quantized against a codebook
(VQ: discrete ids) or read as a diagonal Gaussian (KL: continuous tokens). A second ViT decodes the K
tokens, a grid of mask tokens that become the output patches and -- new in TA-TiTok (Eq. 3) -- the
caption's CLIP text embedding, so that the tokens can spend their capacity on what the caption does not say.

Data flow, in the order the classes appear:
    images (B,3,H,W) in [0,1]
      -> Encoder            patches + latent tokens -> ViT -> (B, K, C) or (B, K, 2C)
      -> VectorQuantizer    (VQ)  nearest codebook entry, straight-through gradient
         DiagonalGaussian   (KL)  mean / log-variance, sample() / mode() / kl()
      -> Decoder            tokens + mask grid + CLIP text -> ViT -> pixels

The official names (config.json fields, weight keys) close the file; checkpoint.py reads and writes releases with them.

Public API (the CLIP text encoder is in text.py):
    tok = TATiTok(PRESETS["tatitok_bl32_vq"])      or checkpoint.load_tokenizer(dir)[0]
    ids = tok.encode(images)                       # VQ: (B,K) long; KL: (B,K,C) mean
    text = TextEncoder()(["a photo of a cat"])     # text.py: .final / .penultimate / .pooled
    rec = tok.decode(ids, text.final)              # (B,3,H,W), nominally in [0,1]
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# -----------------------------------------------------------------------------
# Transformer building blocks (pre-LN ViT, as in CLIP / the official TiTok).


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, rows [q; k; v] as nn.MultiheadAttention's
    `in_proj_weight`, which the official checkpoints use, so loading is a rename."""

    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, keep=None):
        """keep: None, or a slice: return only those rows (every row still supplies keys and values)."""
        B, N, D = x.shape
        h, d = self.heads, D // self.heads
        if keep is None:
            q, k, v = self.qkv(x).view(B, N, 3, h, d).permute(2, 0, 3, 1, 4)  # each (B, h, N, d)
        else:  # queries for the kept rows only: rows [0, D) of the fused weight
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, keep], w[:D], b[:D]).view(B, -1, h, d).transpose(1, 2)  # (B, h, n, d)
            k, v = F.linear(x, w[D:], b[D:]).view(B, N, 2, h, d).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D))  # (B, N or n, D)


class MLP(nn.Module):
    def __init__(self, dim, ratio=4.0):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(dim, int(dim * ratio)), nn.Linear(int(dim * ratio), dim)
        self.gelu = nn.GELU()  # exact (erf) GELU, as nn.GELU() in the official blocks

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)); keep: only those (independent) output rows."""

    def __init__(self, dim, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x, keep=None):
        x = (x if keep is None else x[:, keep]) + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


def run_blocks(vit, x, keep):
    """x through vit.blocks, the last one returning only rows `keep`. With vit.grad_checkpointing, in training, each
    block saves only its input and recomputes the rest in backward (non-reentrant torch.utils.checkpoint: it works
    under torch.compile and DDP). Blocks draw no random numbers and change no state: the gradients are the same."""
    ckpt = vit.grad_checkpointing and vit.training and torch.is_grad_enabled()
    for i, blk in enumerate(vit.blocks):
        k = keep if i == len(vit.blocks) - 1 else None
        x = torch.utils.checkpoint.checkpoint(blk, x, k, use_reentrant=False) if ckpt else blk(x, k)
    return x


# -----------------------------------------------------------------------------
# Encoder: image patches + K latent tokens -> K token vectors (paper §3.2).


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        W, self.grid = cfg.enc_width, cfg.image_size // cfg.enc_patch_size
        # Non-overlapping patches: a conv whose stride equals its kernel is a per-patch linear map.
        self.patch_embed = nn.Conv2d(3, W, cfg.enc_patch_size, stride=cfg.enc_patch_size)
        s = W**-0.5  # CLIP-style init scale for the embeddings
        self.class_embedding = nn.Parameter(s * torch.randn(1, W))
        self.positional_embedding = nn.Parameter(s * torch.randn(self.grid**2 + 1, W))
        # The latent tokens' content is TATiTok.latent_tokens; here their positions, so each slot can specialise.
        self.latent_token_positional_embedding = nn.Parameter(s * torch.randn(cfg.num_latent_tokens, W))
        self.ln_pre, self.blocks = nn.LayerNorm(W), nn.ModuleList(Block(W, cfg.enc_heads) for _ in range(cfg.enc_depth))
        self.grad_checkpointing = False  # training: recompute each block in backward (run_blocks), saving memory
        self.ln_post = nn.LayerNorm(W)
        # The KL variant predicts a mean and a log-variance per channel.
        self.proj_out = nn.Linear(W, cfg.token_size * (2 if cfg.quantize_mode == "kl" else 1))

    def forward(self, images, latent_tokens):
        B = images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, G*G, W)
        x = torch.cat([self.class_embedding.expand(B, -1, -1), x], dim=1) + self.positional_embedding  # (B, 1+G*G, W)
        lat = latent_tokens + self.latent_token_positional_embedding  # (K, W)
        x = self.ln_pre(torch.cat([x, lat.expand(B, -1, -1)], dim=1))  # (B, 1+G*G+K, W)
        # Keep only the latent tokens: all the decoder sees of the image passes through these K slots.
        x = run_blocks(self, x, keep=slice(1 + self.grid**2, None))  # (B, K, W)
        return self.proj_out(self.ln_post(x))  # (B, K, C) or (B, K, 2C)


# -----------------------------------------------------------------------------
# The two bottlenecks: vector quantization (VQ) and a diagonal Gaussian (KL).


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with the straight-through estimator and VQ-VAE's losses: the codebook term
    pulls codes towards the (frozen) encoder outputs, the commitment term (x commitment_cost) the outputs towards the
    (frozen) codes. clustering_vq (CVQ-VAE, Zheng & Vedaldi 2023) revives dead codes: each code tracks an EMA of its
    usage, and rarely used codes move onto their nearest encoder output. Training forwards only collect statistics
    (`_collect`); the trainer calls `revive_codes()` once per step, so N ranks and one process with N x gradient
    accumulation make the same update (the official code revives inside every forward)."""

    def __init__(self, codebook_size, token_size, commitment_cost=0.25, use_l2_norm=False, clustering_vq=False):
        super().__init__()
        self.codebook_size, self.token_size = codebook_size, token_size
        self.commitment_cost, self.use_l2_norm, self.clustering_vq = commitment_cost, use_l2_norm, clustering_vq
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if clustering_vq:
            self.decay = 0.99
            self.register_buffer("embed_prob", torch.zeros(codebook_size))
        self._pending = None  # statistics collected since the last revive_codes() (not saved)

    def codebook(self):
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.use_l2_norm else w

    # Distances, losses and the revival update run in fp32 even under autocast:
    # bf16 argmin over 8192 near-equal distances would pick codes at random.
    @torch.autocast("cuda", enabled=False)
    def forward(self, z):
        z = z.float()  # (B, K, C)
        raw = flat = z.reshape(-1, self.token_size)  # (B*K, C); raw: un-normalised, for code revival
        if self.use_l2_norm:
            flat, z = F.normalize(flat, dim=-1), F.normalize(z, dim=-1)
        emb = self.codebook()  # (V, C)
        # Squared distance ||a-b||^2 = |a|^2 + |b|^2 - 2 a.b, for every (token, code).
        d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()  # (B*K, V)
        ids = d.argmin(dim=1)  # (B*K,)
        zq = F.embedding(ids, emb).view_as(z)  # (B, K, C)
        commitment, codebook = self.commitment_cost * (zq.detach() - z).pow(2).mean(), (zq - z.detach()).pow(2).mean()
        if self.clustering_vq and self.training:
            self._collect(ids, d, raw)
        # Straight-through: forward uses the code, backward copies the gradient to z.
        zq = z + (zq - z).detach()
        return zq, dict(quantizer_loss=commitment + codebook, commitment_loss=commitment, codebook_loss=codebook,
                        ids=ids.view(z.shape[:-1]))  # ids: (B, K)

    # Plain-tensor bookkeeping kept on the module: TATiTok.before_compile wraps it in torch.compiler.disable
    # (not a decorator: that imports torch._dynamo, ~2 s that loading a model to sample skips).
    @torch.no_grad()
    def _collect(self, ids, d, raw):
        """Add one micro-batch to the step's statistics: each code's pick count, and its nearest feature so
        far (distance, un-normalised feature). Micro-batches arrive in slot order and only a strictly smaller
        distance replaces the kept one: ties go to the earliest, as an argmin over the global batch would."""
        counts = torch.bincount(ids, minlength=self.codebook_size).float()  # (V,)
        rows = d.argmin(dim=0)  # (V,) the nearest feature to every code (first of equals)
        best = d.gather(0, rows[None])[0]  # (V,) its distance
        anchors = raw[rows]  # (V, C)
        if self._pending is None:
            self._pending = [counts, ids.new_tensor(ids.numel()).float(), best, anchors]
            return
        n_counts, n, n_best, n_anchors = self._pending
        closer = best < n_best  # (V,) codes for which this micro-batch holds a nearer feature
        self._pending = [n_counts + counts, n + ids.numel(), torch.where(closer, best, n_best),
                         torch.where(closer[:, None], anchors, n_anchors)]  # fmt: skip

    @torch.no_grad()
    def revive_codes(self):
        """Once per optimiser step, on every rank: update the usage EMA with the step's global batch
        and move rarely used codes onto their nearest feature (nothing if no training forward ran)."""
        if self._pending is None:
            return
        (counts, n, best, anchors), self._pending = self._pending, None
        # Under DDP every rank must make the same update: merge the ranks' statistics in
        # rank order (rank r holds global slots r*A .. r*A+A-1, so this is slot order).
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts, n = (_all_gather_stack(t).sum(0) for t in (counts, n))
            all_best, all_anchors = _all_gather_stack(best), _all_gather_stack(anchors)  # (R, V), (R, V, C)
            best, anchors = all_best[0], all_anchors[0]
            for b, a in zip(all_best[1:], all_anchors[1:]):
                closer = b < best
                best, anchors = torch.where(closer, b, best), torch.where(closer[:, None], a, anchors)
        # counts / n: (V,) the share of the step's tokens that picked each code.
        self.embed_prob.mul_(self.decay).add_(counts / n, alpha=1 - self.decay)
        # Official constants: codes in constant use get decay ~0 (untouched), unused ones ~1 (their anchor).
        decay = torch.exp(-(self.embed_prob * self.codebook_size * 10) / (1 - self.decay) - 1e-3)
        self.embedding.weight.data.mul_(1 - decay[:, None]).add_(anchors * decay[:, None])


def _all_gather_stack(t):
    """(...) on every rank -> (world, ...), in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) per token channel (LDM's distribution)."""

    def __init__(self, params):  # params: (B, K, 2C) -> mean, logvar each (B, K, C)
        self.mean, logvar = params.float().chunk(2, dim=-1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite early in training
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        return self.mean + self.std * torch.randn(self.mean.shape, device=self.mean.device, generator=generator)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) summed over tokens and channels: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2))


# -----------------------------------------------------------------------------
# Text-aware decoder (paper Eq. 3): [cls + mask grid] ++ [latent tokens] ++ [text].


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        W, self.grid, self.patch = cfg.dec_width, cfg.image_size // cfg.dec_patch_size, cfg.dec_patch_size
        s = W**-0.5
        self.decoder_embed = nn.Linear(cfg.token_size, W)
        self.class_embedding = nn.Parameter(s * torch.randn(1, W))
        self.positional_embedding = nn.Parameter(s * torch.randn(self.grid**2 + 1, W))
        # One shared learned vector fills every output slot; positions tell them apart, attention fills them.
        self.mask_token = nn.Parameter(s * torch.randn(1, 1, W))
        self.latent_token_positional_embedding = nn.Parameter(s * torch.randn(cfg.num_latent_tokens, W))
        # CLIP text states (B, 77, 768) -> decoder width, with their own positions.
        self.text_guidance_proj = nn.Linear(cfg.text_embed_dim, W)
        self.text_guidance_positional_embedding = nn.Parameter(s * torch.randn(cfg.text_context_length, W))
        self.ln_pre, self.blocks = nn.LayerNorm(W), nn.ModuleList(Block(W, cfg.dec_heads) for _ in range(cfg.dec_depth))
        self.grad_checkpointing = False  # as the encoder's
        self.ln_post = nn.LayerNorm(W)
        # Each grid slot predicts its p x p x 3 pixels directly (a 1x1 conv on the grid, written as a
        # Linear on tokens); a 3x3 conv then smooths the seams between neighbouring patches.
        self.to_pixels, self.conv_out = nn.Linear(W, self.patch * self.patch * 3), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z, text):  # z: (B, K, C); text: (B, L, Dt)
        B, G, p = z.shape[0], self.grid, self.patch
        x = self.decoder_embed(z) + self.latent_token_positional_embedding  # (B, K, W)
        grid = torch.cat([self.class_embedding[None], self.mask_token.expand(1, G * G, -1)], dim=1)
        grid = (grid + self.positional_embedding).expand(B, -1, -1)  # (B, 1+G*G, W)
        t = self.text_guidance_proj(text) + self.text_guidance_positional_embedding  # (B, L, W)
        x = self.ln_pre(torch.cat([grid, x, t], dim=1))  # (B, 1+G*G+K+L, W)
        x = run_blocks(self, x, keep=slice(1, 1 + G * G))  # the output patch slots: (B, G*G, W)
        x = self.to_pixels(self.ln_post(x))  # (B, G*G, p*p*3), channel order (p1, p2, rgb)
        x = x.view(B, G, G, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, G, p, G, p)
        return self.conv_out(x.reshape(B, 3, G * p, G * p))  # (B, 3, H, W)


# -----------------------------------------------------------------------------
# The tokenizer.


@dataclass
class TATiTokConfig:
    image_size: int = 256
    enc_patch_size: int = 16
    dec_patch_size: int = 16  # 16 for both in every release
    enc_width: int = 768  # ViT sizes (width/depth/heads): small 512/8/8, base 768/12/12, large 1024/24/16
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 1024  # the decoder is a ViT-Large in every release
    dec_depth: int = 24
    dec_heads: int = 16
    num_latent_tokens: int = 32  # K: 32, 64 or 128 in the releases
    quantize_mode: str = "vq"  # "vq" (discrete ids) or "kl" (continuous Gaussian tokens)
    codebook_size: int = 8192
    token_size: int = 64  # channels per token: 64 for VQ, 16 for KL in the paper
    commitment_cost: float = 0.25  # VQ-VAE's commitment weight
    use_l2_norm: bool = False
    clustering_vq: bool = True  # the training configs revive dead codes
    text_context_length: int = 77  # the CLIP text states the decoder reads: (B, 77, 768)
    text_embed_dim: int = 768
    init: str = "official"  # the released models' init, or "local" for small models trained briefly (_local_init)


class TATiTok(nn.Module):
    def __init__(self, cfg: TATiTokConfig):
        super().__init__()
        if cfg.quantize_mode not in ("vq", "kl"):
            raise ValueError(f"quantize_mode must be 'vq' or 'kl', got {cfg.quantize_mode!r}")
        for side in ("enc", "dec"):
            if cfg.image_size % getattr(cfg, f"{side}_patch_size"):
                raise ValueError(f"image_size {cfg.image_size} is not a multiple of {side}_patch_size")
        self.config, self.encoder, self.decoder = cfg, Encoder(cfg), Decoder(cfg)
        # The K latent tokens' content: learned, shared by every image.
        self.latent_tokens = nn.Parameter(cfg.enc_width**-0.5 * torch.randn(cfg.num_latent_tokens, cfg.enc_width))
        self.apply(_init_weights)
        if cfg.init == "local":
            _local_init(self)
        elif cfg.init != "official":
            raise ValueError(f"init must be 'official' or 'local', got {cfg.init!r}")
        if cfg.quantize_mode == "vq":  # after apply(): the codebook keeps its own init
            self.quantize = VectorQuantizer(cfg.codebook_size, cfg.token_size, cfg.commitment_cost,
                                            cfg.use_l2_norm, cfg.clustering_vq)  # fmt: skip

    def _check_images(self, images):
        S = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (S, S):
            raise ValueError(f"expected images of shape (B, 3, {S}, {S}) in [0, 1], got {tuple(images.shape)}; "
                             f"resize/crop them to {S}x{S} first (data.py does this)")  # fmt: skip

    def encode(self, images, return_posterior=False):
        """(B,3,H,W) in [0,1] -> VQ: ids (B,K) long; KL: posterior mean (B,K,C)
        (or the DiagonalGaussian itself with return_posterior=True)."""
        self._check_images(images)
        z = self.encoder(images, self.latent_tokens)  # (B, K, C) or (B, K, 2C)
        if self.config.quantize_mode == "vq":
            return self.quantize(z)[1]["ids"]
        post = DiagonalGaussian(z)
        return post if return_posterior else post.mode()

    def decode(self, tokens, text_hidden):
        """tokens: VQ ids (B,K) or KL tokens (B,K,C); text_hidden: (B,77,768) CLIP
        final states (TextEncoder(...).final). Returns (B,3,H,W), nominally [0,1]."""
        cfg = self.config
        if cfg.quantize_mode == "vq":
            if tokens.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"a VQ tokenizer decodes integer code ids, got {tokens.dtype}")
            if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.codebook_size):
                raise ValueError(f"code ids must lie in [0, {cfg.codebook_size}); got a value out of range")
            tokens = F.embedding(tokens.long(), self.quantize.codebook())  # (B, K, C): the code vectors
        want = (tokens.shape[0], cfg.num_latent_tokens, cfg.token_size)
        if tuple(tokens.shape) != want:
            raise ValueError(f"expected tokens of shape {want[1:]} per image, got {tuple(tokens.shape[1:])}")
        tshape = (tokens.shape[0], cfg.text_context_length, cfg.text_embed_dim)
        if tuple(text_hidden.shape) != tshape:
            raise ValueError(f"text_hidden must be (B, {tshape[1]}, {tshape[2]}) CLIP final-layer states for the "
                             f"same batch, got {tuple(text_hidden.shape)}; pass TextEncoder(...)(captions).final")
        return self.decoder(tokens, text_hidden.to(tokens.dtype))

    def flops(self):
        """Forward FLOPs per image: {"encode": ..., "decode": ...}. 2 per multiply-add of every matmul and conv,
        attention QK^T and AV included (4 T^2 W per layer); norms, activations and softmax left out (the MFU
        convention, as torch.utils.flop_counter). Training costs ~3x the forward."""
        c = self.config
        P, K, C, W = (c.image_size // c.enc_patch_size) ** 2, c.num_latent_tokens, c.token_size, c.enc_width

        def blocks(T, n, W, depth):  # T tokens, n rows kept by the last block
            full = 24 * T * W * W + 4 * T * T * W  # qkv 6TW^2 + proj 2TW^2 + MLP 16TW^2, attention 4T^2W
            last = 4 * T * W * W + 20 * n * W * W + 4 * n * T * W  # k/v for all, the rest for n rows
            return (depth - 1) * full + last

        enc = 2 * P * 3 * c.enc_patch_size**2 * W  # patch embedding
        enc += blocks(1 + P + K, K, W, c.enc_depth)  # [cls, patches, latent tokens]
        enc += 2 * K * W * C * (2 if c.quantize_mode == "kl" else 1)  # proj_out
        if c.quantize_mode == "vq":
            enc += 2 * K * C * c.codebook_size  # distances to every code
        W, Pd, L = c.dec_width, (c.image_size // c.dec_patch_size) ** 2, c.text_context_length
        dec = 2 * K * C * W + 2 * L * c.text_embed_dim * W  # token and text projections
        dec += blocks(1 + Pd + K + L, Pd, W, c.dec_depth)  # [cls, mask grid, tokens, text]
        dec += 2 * Pd * W * 3 * c.dec_patch_size**2  # to_pixels
        dec += 2 * 3 * c.image_size**2 * 3 * 9  # the 3x3 output conv
        return {"encode": enc, "decode": dec}

    def forward(self, images, text_hidden):
        """Training pass: (reconstruction (B,3,H,W), extras for the loss)."""
        self._check_images(images)
        z = self.encoder(images, self.latent_tokens)
        if self.config.quantize_mode == "vq":
            zq, extras = self.quantize(z)
        else:
            post = DiagonalGaussian(z)
            zq, extras = post.sample(), {"posterior": post}
        return self.decoder(zq.to(z.dtype), text_hidden), extras

    def before_compile(self):
        """Call before torch.compile(model) for training: VectorQuantizer._collect stays eager."""
        if self.config.quantize_mode == "vq" and self.quantize.clustering_vq:
            self.quantize._collect = torch.compiler.disable(self.quantize._collect)
        return self

    def end_step(self, applied=True):
        """Once per optimiser step, on every rank: the VQ dead-code revival (revive_codes) over the
        step's global batch. A skipped step (non-finite gradients) drops the statistics it collected."""
        if self.config.quantize_mode == "vq" and self.quantize.clustering_vq:
            if applied:
                self.quantize.revive_codes()
            self.quantize._pending = None


def _init_weights(m):
    # The official initialisation: truncated normal(0.02) for linear maps and convs, zero biases, unit LayerNorms.
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def sincos_2d(grid, width):
    """Fixed 2D sine-cosine position codes (as in MAE): (grid*grid, width), row-major;
    half the channels encode the row, half the column. Neighbours get similar codes."""
    assert width % 4 == 0, f"width {width} must be a multiple of 4 for 2D sin-cos codes"
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (W/4,)
    g = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(g, g, indexing="ij")  # (G, G) each
    angles = [pos.reshape(-1, 1) * omega for pos in (rows, cols)]  # 2 x (G*G, W/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()  # (G*G, W)


@torch.no_grad()
def _local_init(model, std=0.1, pos_scale=10.0, qk_std=0.4):
    """A locality-biased initialisation for small models trained briefly (init="local").

    With the official init a small TA-TiTok on the shapes world long sits at the mean image: attention starts uniform,
    so every latent token sees the image's average and every output patch the tokens' average, and neither side can
    learn where to look first. This init breaks the symmetry, changing values only (checkpoints stay interchangeable):
      - patches, grid slots and latent tokens get 2D sin-cos positions x pos_scale (position dominates
        after the LayerNorm), latent token k at an evenly spaced patch, no content;
      - W_k = W_q (std qk_std) in every attention, so q.k peaks at the same place: a latent token first
        reads "its" patch, an output patch the nearest token ("mimetic" init, Trockman & Kolter 2023);
        other weights ~ N(0, std), not 0.02, so inputs move outputs;
      - l2-normalised VQ codes (per-channel RMS 1/sqrt(C)) enter the decoder x sqrt(token_size), at a
        unit-variance token's scale, or the decoder first reads almost only the positions.
    """
    c, K = model.config, model.config.num_latent_tokens
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
    for side, part in (("enc", model.encoder), ("dec", model.decoder)):
        W, G = getattr(c, f"{side}_width"), c.image_size // getattr(c, f"{side}_patch_size")
        pos = pos_scale * sincos_2d(G, W)  # (G*G, W)
        part.positional_embedding[1:] = pos
        part.latent_token_positional_embedding.copy_(pos[torch.arange(K) * (G * G) // K])  # evenly spaced
        for blk in part.blocks:
            qkv = blk.attn.qkv.weight  # rows [q; k; v]
            nn.init.normal_(qkv[:W], std=qk_std)
            qkv[W : 2 * W] = qkv[:W]
    model.latent_tokens.zero_()
    if c.quantize_mode == "vq" and c.use_l2_norm:
        model.decoder.decoder_embed.weight.mul_(c.token_size**0.5)


# -----------------------------------------------------------------------------
# Presets. "BL" = ViT-Base encoder + ViT-Large decoder; "SL" = Small + Large.
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}  # official: (width, depth, heads)


def _preset(enc, dec, K, mode):
    (ew, ed, eh), (dw, dd, dh) = VIT_SIZES[enc], VIT_SIZES[dec]
    return TATiTokConfig(enc_width=ew, enc_depth=ed, enc_heads=eh, dec_width=dw, dec_depth=dd, dec_heads=dh,
                         num_latent_tokens=K, quantize_mode=mode, token_size=64 if mode == "vq" else 16)


# For tests: 32 px, patch 8, two blocks each side, a 16-entry text context.
_TINY = dict(image_size=32, enc_patch_size=8, dec_patch_size=8, enc_width=32, enc_depth=2, enc_heads=2,
             dec_width=32, dec_depth=2, dec_heads=2, num_latent_tokens=8, text_context_length=16, text_embed_dim=32)
# The shapes world (shapes.ShapesWorld): 64 px, patch 8 (64 patches) -> 32 tokens, small widths, init="local".
_SHAPES = dict(image_size=64, enc_patch_size=8, dec_patch_size=8, enc_width=64, enc_depth=2, enc_heads=2,
               dec_width=64, num_latent_tokens=32, text_context_length=16, text_embed_dim=64, init="local")

PRESETS = {
    "tatitok_bl32_vq": _preset("base", "large", 32, "vq"),
    "tatitok_bl64_vq": _preset("base", "large", 64, "vq"),
    "tatitok_bl128_vq": _preset("base", "large", 128, "vq"),
    "tatitok_bl32_vae": _preset("base", "large", 32, "kl"),
    "tatitok_bl64_vae": _preset("base", "large", 64, "kl"),
    "tatitok_sl128_vae": _preset("small", "large", 128, "kl"),
    "tiny": TATiTokConfig(**_TINY, codebook_size=64, token_size=8),
    "tiny_kl": TATiTokConfig(**_TINY, quantize_mode="kl", token_size=4),
    # l2-normalised codes; the VQ decoder has 3 blocks of 4 heads: 4 heads of 16 rather than 2 of
    # 32 give it more ways to bind caption words to token positions at the same cost. 2,048 codes:
    # with train_tokenizer's caption dropout the tokens must carry the shapes themselves.
    "shapes": TATiTokConfig(**_SHAPES, dec_depth=3, dec_heads=4, codebook_size=2048, token_size=16, use_l2_norm=True),
    "shapes_kl": TATiTokConfig(**_SHAPES, dec_depth=2, dec_heads=2, quantize_mode="kl", token_size=8),
}


# -----------------------------------------------------------------------------
# Official names: the authors' releases (turkeyju/tokenizer_tatitok_*) hold config.json, the official nested
# config, and weights under the official code's names. checkpoint.py reads and writes them with what follows.

# config.json field -> ours: ("section.official_key", our field[, the value assumed when a release leaves it
# out]); a field without one is required. "any" holds the fields of both quantize modes.
TATITOK_FIELDS = {
    "any": [("vq_model.vit_enc_patch_size", "enc_patch_size"), ("vq_model.token_size", "token_size"),
            ("vq_model.vit_dec_patch_size", "dec_patch_size"), ("preprocessing.crop_size", "image_size"),
            ("vq_model.num_latent_tokens", "num_latent_tokens"),
            ("vq_model.text_context_length", "text_context_length", 77),
            ("vq_model.text_embed_dim", "text_embed_dim", 768)],
    "vq": [("vq_model.codebook_size", "codebook_size"), ("vq_model.commitment_cost", "commitment_cost", 0.25),
           ("vq_model.use_l2_norm", "use_l2_norm", False), ("vq_model.clustering_vq", "clustering_vq", False)],
    "kl": [],
}  # fmt: skip
_ARCH = ("width", "depth", "heads")  # a ViT's size, in VIT_SIZES' order


def kwargs_from_official(s, kw, mode, path):
    """Complete the TATiTokConfig kwargs `kw` that TATITOK_FIELDS read from config.json sections `s`: the
    ViT sizes and the mode. Official options TA-TiTok does not use are refused (ValueError naming `path`)."""
    vq = s["vq_model"]
    for side in ("enc", "dec"):  # a named ViT size, or "custom" (our tiny presets) spelled out
        name = vq[f"vit_{side}_model_size"]
        if name != "custom" and name not in VIT_SIZES:
            raise ValueError(f"unknown vit_{side}_model_size {name!r}; expected one of {sorted(VIT_SIZES)}")
        arch = VIT_SIZES[name] if name != "custom" else [vq[f"vit_{side}_{k}"] for k in _ARCH]
        kw.update({f"{side}_{k}": v for k, v in zip(_ARCH, arch)}, quantize_mode=mode)
    if vq.get("is_legacy", True):  # it reshapes the encoder output without a permute (a bug); no release uses it
        raise ValueError(f"{path} has is_legacy: True; only is_legacy: False checkpoints are supported")
    if vq.get("finetune_decoder", False):
        raise ValueError(f"{path}: finetune_decoder: True (TiTok's two-stage decoder) is not part of TA-TiTok")


def official_config(c, s):
    """The config.json dict of TATiTokConfig `c`, from the sections `s` that TATITOK_FIELDS filled."""
    vq = s["vq_model"]
    vq.update(finetune_decoder=False, is_legacy=False)
    for side in ("enc", "dec"):
        arch = tuple(getattr(c, f"{side}_{k}") for k in _ARCH)
        names = [n for n, a in VIT_SIZES.items() if a == arch]
        vq[f"vit_{side}_model_size"] = names[0] if names else "custom"
        vq.update({} if names else {f"vit_{side}_{k}": v for k, v in zip(_ARCH, arch)})  # e.g. the tiny presets
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": s["preprocessing"]}}


# Weight names: official name fragment -> ours (everything else is named the same). The official 1x1 convs
# on a fake (B, C, 1, K) grid are our Linears on (B, K, C): weights (out, in, 1, 1) there, (out, in) here.
TATITOK_RENAMES = [(".transformer.", ".blocks."), (".attn.in_proj_weight", ".attn.qkv.weight"),
                   (".attn.in_proj_bias", ".attn.qkv.bias"), (".attn.out_proj.", ".attn.proj."),
                   ("encoder.conv_out.", "encoder.proj_out."), ("decoder.ffn.0.", "decoder.to_pixels.")]  # fmt: skip


def release_view(sd):
    """Our state dict `sd` as {official key: tensor in the release's shape}, views: copying into one loads it."""
    view = {}
    for key, v in sd.items():
        for official, ours in TATITOK_RENAMES:
            key = key.replace(ours, official)
        view[key] = v[:, :, None, None] if key in ("encoder.conv_out.weight", "decoder.ffn.0.weight") else v
    return view

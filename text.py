"""
The frozen CLIP text encoder, shared by the TA-TiTok decoder and MaskGen.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact
Text-Aware One-Dimensional Tokens" (Kim et al., arXiv 2501.07730), §3.2 (TA-TiTok's
decoder reads the caption's CLIP embedding, Eq. 3) and §4.2 (MaskGen is conditioned on
CLIP's penultimate states and its pooled embedding). Both use OpenAI's CLIP ViT-L/14 at
336 px through open_clip; the small presets (tests, the shapes world) use a randomly
initialised tower of the same design, written here (TextTower).

    text = TextEncoder()(["a photo of a cat"])   # TextFeatures: .final / .penultimate / .pooled
    enc = build_text_encoder(name, pretrained, state)   # the encoder a checkpoint was trained with
"""

import functools
import importlib.util
import os
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class TextFeatures(NamedTuple):
    final: torch.Tensor  # (B, L, W) last block + ln_final: the TA-TiTok decoder's input
    penultimate: torch.Tensor  # (B, L, W) all blocks but the last, no ln_final: MaskGen's text stream
    pooled: torch.Tensor  # (B, E) ln_final(last)[EOT] @ text_projection: MaskGen's pooled condition


# -----------------------------------------------------------------------------
# Small random towers, written here rather than built by open_clip: `import open_clip` pulls in
# timm, torchvision and torch._dynamo, which takes longer than importing torch itself and would
# dominate a small model's sampling time. Parameter names, shapes, init and maths are open_clip's
# TextTransformer (GELU, pre-LN, causal mask, packed q/k/v), so a tower's weights load into
# either; tests/test_text.py checks that the two agree.


@functools.lru_cache(maxsize=None)  # one per context length: the file and vocabulary are read once
def clip_tokenizer(context_length):
    """CLIP's BPE tokenizer (open_clip's SimpleTokenizer) without importing open_clip: its
    tokenizer module is self-contained, so we load that one file (and its vocabulary) from the
    installed package, and import the package only if the file moves."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("the CLIP tokenizer comes from open_clip_torch: pip install -r requirements.txt")
    try:
        path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
        file_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        SimpleTokenizer = module.SimpleTokenizer
    except Exception:  # another open_clip layout: the slow but certain way
        from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (one packed
    in_proj for q, k, v) and its init, drawn in the same order from the RNG."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, attn_mask):
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, W/H)
        mask = attn_mask.to(q.dtype) if attn_mask is not None else None  # autocast: match q's dtype
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, W/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))  # (B, L, W)


class TextBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x, attn_mask=None):  # (B, L, W) -> (B, L, W)
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    """A randomly initialised CLIP text tower: CLIP's 49408-word vocabulary, `layers`
    blocks, and a (width, embed_dim) projection of the end-of-text state."""

    def __init__(self, context_length, width, heads, layers, embed_dim, vocab_size=49408, mlp_ratio=4.0):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = nn.Module()  # a container, so the weight names match open_clip's
        self.transformer.resblocks = nn.ModuleList(TextBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        # Additive causal mask: token i sees tokens <= i.
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)  # (L, L)
        self.register_buffer("attn_mask", mask, persistent=False)
        # open_clip's init: small embeddings, residual projections scaled by depth.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for blk in self.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)


class TextEncoder(nn.Module):
    """A frozen CLIP text tower that returns the three features the system uses.

    TextEncoder()                       -> open_clip's ViT-L-14-336, OpenAI weights (downloads once)
    TextEncoder.from_config(cfg, dim)   -> a randomly initialised TextTower (tests, shapes world)
    The blocks are run here, not by encode_text(), which returns only the end: MaskGen needs
    the states before the last block.
    """

    def __init__(self, model_name="ViT-L-14-336", pretrained="openai", *, _tower=None, _tokenizer=None):
        super().__init__()
        if _tower is None:
            import open_clip  # imported only here: it is slow to import (timm, torchvision)

            # OpenAI's CLIP weights were trained with QuickGELU; recent open_clip
            # builds nn.GELU for this name unless told otherwise.
            model = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=True)
            _tower, _tokenizer = model, open_clip.get_tokenizer(model_name)
            del model.visual  # the image tower is never used: free ~300M parameters
        # The same attribute names exist on open_clip's CLIP, its TextTransformer and TextTower.
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            setattr(self, name, getattr(_tower, name))
        self.register_buffer("attn_mask", _tower.attn_mask, persistent=False)  # causal (L, L)
        self.tokenizer = _tokenizer
        self._memo = {}  # caption -> TextFeatures of one row, for cached(); a plain dict, not state
        self.context_length, self.width = self.positional_embedding.shape  # (L, W)
        proj = self.text_projection
        self.embed_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self.requires_grad_(False).eval()

    @classmethod
    def from_config(cls, text_cfg, embed_dim):
        """A randomly initialised TextTower; text_cfg holds its context_length, width, heads
        and layers (open_clip CLIPTextCfg names; a TEXT_PRESETS entry)."""
        known = {"context_length", "width", "heads", "layers", "vocab_size", "mlp_ratio"}
        unknown = sorted(set(text_cfg) - known)
        if unknown:
            raise ValueError(f"text tower config has unknown fields {unknown}; known: {sorted(known)}")
        tower = TextTower(**text_cfg, embed_dim=embed_dim)
        return cls(_tower=tower, _tokenizer=clip_tokenizer(text_cfg["context_length"]))

    def train(self, mode=True):  # always frozen: ignore .train() from a parent module
        return super().train(False)

    @torch.no_grad()
    def forward(self, text):
        ids = text if torch.is_tensor(text) else self.tokenizer(list(text))  # (B, L) long
        ids = ids.to(self.token_embedding.weight.device)
        x = self.token_embedding(ids) + self.positional_embedding  # (B, L, W)
        # Batch-first blocks, as open_clip >= 2.31 runs them (requirements.txt asks for >= 3.0).
        for blk in self.transformer.resblocks[:-1]:
            x = blk(x, attn_mask=self.attn_mask)
        penultimate, x = x, self.transformer.resblocks[-1](x, attn_mask=self.attn_mask)  # (B, L, W) each
        final = self.ln_final(x)  # (B, L, W)
        # The end-of-text token has the largest id in CLIP's vocabulary, so argmax finds it.
        eot = final[torch.arange(final.shape[0], device=final.device), ids.argmax(dim=-1)]  # (B, W)
        proj = self.text_projection
        pooled = proj(eot) if isinstance(proj, nn.Linear) else eot @ proj  # (B, E)
        return TextFeatures(final, penultimate, pooled)

    def cached(self, captions):
        """forward() with a memo per caption, for a finite set of captions (the shapes world has
        ~1,300): a frozen tower gives a caption the same features every time, so the trainers skip
        the tower's share of a shapes step (~3-5%). Each new caption is encoded alone (batch 1), so
        a row never depends on its batch and a resumed or multi-process run stays bit-exact.
        Unbounded: not for open-ended captions."""
        for c in dict.fromkeys(captions):  # new captions, in order of first use
            if c not in self._memo:
                self._memo[c] = self.forward([c])
        rows = [self._memo[c] for c in captions]
        return TextFeatures(*(torch.cat(parts) for parts in zip(*rows)))  # (B, L, W) x2, (B, E)


# Small random text towers (tests, the shapes world): open_clip CLIPTextCfg fields +
# projection dim. They are frozen, and a checkpoint trained with one carries its weights.
TEXT_PRESETS = {
    "tiny": dict(text_cfg=dict(context_length=16, width=32, heads=2, layers=2), embed_dim=32),
    # Shapes captions are at most 14 BPE tokens with start/end; a random, frozen tower
    # still gives every word a distinct embedding, which is all the generator needs.
    "shapes": dict(text_cfg=dict(context_length=16, width=64, heads=2, layers=2), embed_dim=64),
}


def build_text_encoder(name, pretrained="openai", state=None, where="checkpoint"):
    """The text encoder a checkpoint was trained with: a small random tower whose
    weights it carries (`state`, shape from TEXT_PRESETS[name]), or a named open_clip model."""
    if state is not None:
        if name not in TEXT_PRESETS:
            raise ValueError(f"{where!r} carries the weights of text tower {name!r}, which text.TEXT_PRESETS does "
                             f"not define; add its shape there (known: {sorted(TEXT_PRESETS)})")
        enc = TextEncoder.from_config(**TEXT_PRESETS[name])
        enc.load_state_dict(state)
        return enc
    if name is None or name in TEXT_PRESETS:
        raise ValueError(f"{where!r} was trained with the randomly initialised text tower {name!r} but does not carry "
                         f"its weights, so its text features cannot be reproduced; re-save the checkpoint with "
                         f"'text_encoder' weights")
    return TextEncoder(name, pretrained)  # downloads the weights once (open_clip cache)

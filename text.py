"""
The frozen CLIP text encoder, shared by the TA-TiTok decoder and MaskGen.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact
Text-Aware One-Dimensional Tokens" (Kim et al., arXiv 2501.07730), §3.2 (TA-TiTok's
decoder reads the caption's CLIP embedding, Eq. 3) and §4.2 (MaskGen is conditioned on
CLIP's penultimate states and its pooled embedding). Both use OpenAI's CLIP ViT-L/14 at
336 px through open_clip; the small presets use a randomly initialised tower instead.

    text = TextEncoder()(["a photo of a cat"])   # TextFeatures: .final / .penultimate / .pooled
    enc = build_text_encoder(name, pretrained, state)   # the encoder a checkpoint was trained with
"""

from typing import NamedTuple

import torch
import torch.nn as nn

class TextFeatures(NamedTuple):
    final: torch.Tensor  # (B, L, W) last block + ln_final: the TA-TiTok decoder's input
    penultimate: torch.Tensor  # (B, L, W) all blocks but the last, no ln_final: MaskGen's text stream
    pooled: torch.Tensor  # (B, E) ln_final(last)[EOT] @ text_projection: MaskGen's pooled condition


class TextEncoder(nn.Module):
    """A frozen open_clip text tower that returns the three features the system uses.

    TextEncoder()                       -> ViT-L-14-336 with OpenAI weights (downloads once)
    TextEncoder.from_config(cfg, dim)   -> a randomly initialised tower (tests, shapes world)

    We run the blocks ourselves instead of calling encode_text(), because MaskGen
    needs the states before the last block and encode_text() only returns the end.
    """

    def __init__(self, model_name="ViT-L-14-336", pretrained="openai", *, _tower=None, _tokenizer=None):
        super().__init__()
        import open_clip  # imported here so `import text` stays light and silent

        if _tower is None:
            # OpenAI's CLIP weights were trained with QuickGELU; recent open_clip
            # builds nn.GELU for this name unless told otherwise.
            model = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=True)
            _tower, _tokenizer = model, open_clip.get_tokenizer(model_name)
            del model.visual  # the image tower is never used: free ~300M parameters
        # The same attribute names exist on open_clip's CLIP and on its TextTransformer.
        self.token_embedding = _tower.token_embedding
        self.positional_embedding = _tower.positional_embedding
        self.transformer = _tower.transformer
        self.ln_final = _tower.ln_final
        self.text_projection = _tower.text_projection
        self.register_buffer("attn_mask", _tower.attn_mask, persistent=False)  # causal (L, L)
        self.tokenizer = _tokenizer
        self.context_length = self.positional_embedding.shape[0]
        self.width = self.token_embedding.weight.shape[1]
        proj = self.text_projection
        self.embed_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, text_cfg, embed_dim):
        """A randomly initialised tower from an open_clip CLIPTextCfg-style dict."""
        import open_clip
        from open_clip.model import CLIPTextCfg, _build_text_tower

        tower = _build_text_tower(embed_dim, CLIPTextCfg(**text_cfg))
        tok = open_clip.tokenizer.SimpleTokenizer(context_length=tower.context_length)
        return cls(_tower=tower, _tokenizer=tok)

    def train(self, mode=True):  # always frozen: ignore .train() from a parent module
        return super().train(False)

    def tokenize(self, captions):
        return self.tokenizer(list(captions))  # (B, L) long

    @torch.no_grad()
    def forward(self, text):
        ids = self.tokenize(text) if not torch.is_tensor(text) else text
        ids = ids.to(self.token_embedding.weight.device)  # (B, L)
        x = self.token_embedding(ids) + self.positional_embedding  # (B, L, W)
        blocks = self.transformer.resblocks
        # open_clip >= 2.31 runs its blocks batch-first; older versions want (L, B, W).
        seq_first = not getattr(self.transformer, "batch_first", False)
        x = x.transpose(0, 1) if seq_first else x
        for blk in blocks[:-1]:
            x = blk(x, attn_mask=self.attn_mask)
        penultimate = x
        x = blocks[-1](x, attn_mask=self.attn_mask)
        if seq_first:
            x, penultimate = x.transpose(0, 1), penultimate.transpose(0, 1)
        final = self.ln_final(x)  # (B, L, W)
        # The end-of-text token has the largest id in CLIP's vocabulary, so argmax finds it.
        eot = final[torch.arange(final.shape[0], device=final.device), ids.argmax(dim=-1)]  # (B, W)
        proj = self.text_projection
        pooled = proj(eot) if isinstance(proj, nn.Linear) else eot @ proj  # (B, E)
        return TextFeatures(final, penultimate, pooled)


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
            raise ValueError(
                f"{where!r} carries the weights of text tower {name!r}, which text.TEXT_PRESETS does not "
                f"define; add its shape there (known: {sorted(TEXT_PRESETS)})"
            )
        enc = TextEncoder.from_config(**TEXT_PRESETS[name])
        enc.load_state_dict(state)
        return enc
    if name is None or name in TEXT_PRESETS:
        raise ValueError(
            f"{where!r} was trained with the randomly initialised text tower {name!r} but does not carry its "
            f"weights, so its text features cannot be reproduced; re-save the checkpoint with 'text_encoder' weights"
        )
    return TextEncoder(name, pretrained)  # downloads the weights once (open_clip cache)

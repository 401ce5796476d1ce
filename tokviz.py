"""
The paper's tokenizer figures, for one image and its caption: latent-code swapping
(§5.2, Fig. 4) and the encoder's attention maps (App. G, Fig. 8).

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact Text-Aware
One-Dimensional Tokens" (Kim et al., arXiv 2501.07730). TA-TiTok (§3.2) describes an image
with K 1D latent tokens that each read the whole image, so a token often owns one semantic
element (an object, its colour, the style) rather than one fixed patch. Two views show it:
  (1) swap one token for another code and decode: that element changes (swap.png);
  (2) where each latent token looks in the encoder's last block (attention.png).

Usage:
    python tokviz.py --image img.png --caption "a red circle"            # shipped checkpoints/shapes.pt
    python tokviz.py --tokenizer PATH --image img.png --caption "..."    # any tokenizer reference (load.py)
    python tokviz.py --tokenizer PATH --image a.png --swap_image b.png   # replacements from a second image

Public API:
    swap_tokens(tok, tokens, text_final, positions, replacements) -> (P, J, 3, H, W)
    encoder_attention(tok, images) -> (B, K, G, G);  attention_overlays(image, attn) -> (K, 3, H, W)
    main(argv)
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

import load
import train_common
from data import load_image, to_uint8
from sample import labelled_grid

# -----------------------------------------------------------------------------
# The two views.
#
# (1) Latent-code swapping: encode an image, replace token i by code j, decode. With
#     1D tokens one token often owns one semantic element (a leaf, a head, the style),
#     so a swap changes that element rather than a fixed image region.
# (2) Attention maps: in the encoder's last block, how much each latent token's query
#     attends to each image patch: softmax(q k^T / sqrt(d)), averaged over heads.


@torch.no_grad()
def swap_tokens(tok, tokens, text_final, positions, replacements, batch_size=64):
    """Decode the image with token `positions[p]` replaced by `replacements[j]`, for all p, j.

    tokens: VQ ids (1,K) long, or KL tokens (1,K,C); text_final: (1,L,W) caption states.
    replacements: VQ code ids (J,) long, or KL token vectors (J,C).
    Returns (P, J, 3, H, W) in [0,1].
    """
    cfg = tok.config
    K, P, J = cfg.num_latent_tokens, len(positions), len(replacements)
    bad = [i for i in positions if not 0 <= i < K]
    if bad:
        raise ValueError(f"token positions {bad} are out of range: this tokenizer has K={K} tokens (0..{K - 1})")
    if cfg.quantize_mode == "vq":
        codes = torch.as_tensor(replacements, dtype=torch.long, device=tokens.device)
        if codes.numel() and (codes.min() < 0 or codes.max() >= cfg.codebook_size):
            raise ValueError(f"code ids must lie in [0, {cfg.codebook_size}); got {codes.tolist()}")
        x = tokens.expand(P * J, K).clone()  # (P*J, K)
    else:
        codes = torch.as_tensor(replacements, dtype=tokens.dtype, device=tokens.device)  # (J, C)
        x = tokens.expand(P * J, K, cfg.token_size).clone()  # (P*J, K, C)
    for n, i in enumerate(positions):
        x[n * J : (n + 1) * J, i] = codes  # rows n*J..: token i takes each replacement in turn
    out = [tok.decode(x[s : s + batch_size], text_final.expand(len(x[s : s + batch_size]), -1, -1))
           for s in range(0, P * J, batch_size)]  # fmt: skip
    return torch.cat(out).clamp(0, 1).view(P, J, 3, cfg.image_size, cfg.image_size)


@torch.no_grad()
def encoder_attention(tok, images):
    """Each latent token's attention over the image patches in the encoder's LAST block.

    images (B,3,H,W) in [0,1] -> (B, K, G, G): softmax(q k^T / sqrt(d)) of the latent
    tokens' queries against the patch keys, averaged over heads. The rows are the
    share of attention that lands on patches (the rest goes to the class token and
    the latent tokens themselves), so they sum to at most 1.
    """
    enc, cfg = tok.encoder, tok.config
    S = cfg.image_size
    if images.ndim != 4 or images.shape[1:] != (3, S, S):
        raise ValueError(f"expected images (B, 3, {S}, {S}) in [0, 1], got {tuple(images.shape)}; use load_image()")
    last = enc.blocks[-1]
    seen = {}
    # The input of the last block, caught on the way through an ordinary forward pass.
    hook = last.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    try:
        enc(images, tok.latent_tokens)
    finally:
        hook.remove()
    x = last.ln_1(seen["x"])  # (B, T, W), T = 1 + G*G + K
    B, Tn, W = x.shape
    h = last.attn.heads
    q, k, _ = last.attn.qkv(x).view(B, Tn, 3, h, W // h).permute(2, 0, 3, 1, 4)  # each (B, h, T, d)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // h), dim=-1).mean(dim=1)  # (B, T, T)
    G = enc.grid
    return att[:, 1 + G * G :, 1 : 1 + G * G].reshape(B, cfg.num_latent_tokens, G, G)  # latents -> patches


def _heat(a):
    """A 'jet'-like colour map: (N,H,W) in [0,1] -> (N,3,H,W), blue (low) to red (high)."""
    a = a[:, None]
    return torch.cat([(1.5 - (4 * a - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)], dim=1)


def attention_overlays(image, attn, alpha=0.55):
    """image (3,H,W) in [0,1], attn (K,G,G) -> (K,3,H,W): each map, stretched to [0,1]
    per token and upsampled, blended over the image."""
    H, W = image.shape[-2:]
    a = F.interpolate(attn[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]  # (K,H,W)
    lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
    a = (a - lo) / (hi - lo).clamp_min(1e-12)
    return ((1 - alpha) * image[None].float() + alpha * _heat(a)).clamp(0, 1)


def _pil(x):
    """(3,H,W) in [0,1] -> PIL image."""
    return Image.fromarray(to_uint8(x).permute(1, 2, 0).cpu().numpy())


def _spread(n, k):
    """k indices evenly spread over range(n)."""
    k = min(k, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})



def main(argv=None):
    p = argparse.ArgumentParser(
                description="The paper's tokenizer figures (Fig. 4, Fig. 8): latent-code swapping and encoder "
        "attention maps for one image and its caption. Writes swap.png and attention.png.",
    )
    p.add_argument("--tokenizer", help="official release dir, our run, or a bundled file (default: checkpoints/shapes.pt)")
    p.add_argument("--image", required=True)
    p.add_argument("--caption", default="", help="the image's caption (the decoder is text-aware)")
    p.add_argument("--positions", type=int, nargs="+", help="token positions to swap (rows; default: 8 spread over K)")
    p.add_argument("--codes", type=int, nargs="+", help="VQ: replacement code ids (columns; default: random)")
    p.add_argument("--swap_image", help="take the replacements from this image's tokens (KL; VQ if no --codes)")
    p.add_argument("--sources", type=int, nargs="+", help="token positions the replacements come from (default: spread)")
    p.add_argument("--num_codes", type=int, default=6, help="columns when --codes / --sources are not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", default="out/tokviz")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    device = train_common.pick_device(args.device)
    tok, text_enc = load.load_tokenizer(args.tokenizer or load.default_checkpoint("no --tokenizer given"), device)
    cfg = tok.config
    K, S = cfg.num_latent_tokens, cfg.image_size
    image = load_image(args.image, S)[None].to(device)  # (1,3,S,S)

    with torch.no_grad():
        final = text_enc([args.caption]).final  # (1,L,W)
        tokens = tok.encode(image)  # VQ (1,K) | KL (1,K,C)
        recon = tok.decode(tokens, final).clamp(0, 1)[0]
        positions = args.positions or _spread(K, 8)
        other = tok.encode(load_image(args.swap_image, S)[None].to(device)) if args.swap_image else tokens
        sources = args.sources or _spread(K, args.num_codes)
        prefix = "img2 " if args.swap_image else ""
        if cfg.quantize_mode == "vq" and args.codes:
            replacements, names = args.codes, [f"code {c}" for c in args.codes]
        elif cfg.quantize_mode == "vq" and not args.swap_image:
            g = torch.Generator().manual_seed(args.seed)
            replacements = torch.randperm(cfg.codebook_size, generator=g)[: args.num_codes].tolist()
            names = [f"code {c}" for c in replacements]
        else:  # token values from the second image (or this one) at the source positions
            replacements = other[0, sources]  # VQ (J,) ids | KL (J,C)
            names = [f"{prefix}tok {j}" + (f"={int(c)}" if cfg.quantize_mode == "vq" else "") for j, c in zip(sources, replacements)]
        swaps = swap_tokens(tok, tokens, final, positions, replacements)  # (P,J,3,S,S)
        attn = encoder_attention(tok, image)[0]  # (K,G,G)
        overlays = attention_overlays(image[0], attn)  # (K,3,S,S)

    os.makedirs(args.outdir, exist_ok=True)
    ids = tokens[0].tolist() if cfg.quantize_mode == "vq" else None
    rows = [[_pil(image[0]), _pil(recon)] + [_pil(x) for x in swaps[n]] for n in range(len(positions))]
    row_labels = [f"token {i}" + (f" (code {ids[i]})" if ids else "") + " replaced by ->" for i in positions]
    tile_labels = [["input", "reconstruction"] + names for _ in positions]
    swap_path = os.path.join(args.outdir, "swap.png")
    labelled_grid(rows, row_labels, tile_labels).save(swap_path)

    tiles = [_pil(image[0])] + [_pil(x) for x in overlays]
    labels = ["input"] + [f"latent {k}" for k in range(K)]
    cols = 8
    att_rows = [tiles[i : i + cols] for i in range(0, len(tiles), cols)]
    att_labels = [labels[i : i + cols] for i in range(0, len(labels), cols)]
    attn_path = os.path.join(args.outdir, "attention.png")
    labelled_grid(att_rows, None, att_labels).save(attn_path)
    print(f"wrote {swap_path} (latent-code swapping) and {attn_path} (encoder attention maps)")
    return {"swap": swap_path, "attention": attn_path, "swaps": swaps, "attention_maps": attn, "overlays": overlays}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        sys.exit(f"error: {e}")

"""
Sample images from text with MaskGen + TA-TiTok, and draw the paper's tokenizer figures.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact Text-Aware
One-Dimensional Tokens" (Kim et al., arXiv 2501.07730).
  §3 ("Masked Generative Models", sampling) and §4.2: MaskGen fills in K masked tokens
      over a few steps, conditioned on CLIP text features and an aesthetic score; the
      TA-TiTok decoder turns the tokens, plus the caption's CLIP features, into pixels.
  §5.1 and App. E: the evaluation protocol (no rejection sampling, classifier-free
      guidance, 16 steps for VQ / 32 for KL; GenEval prompts, COCO / MJHQ captions).
      `--geneval` writes exactly the folder layout GenEval's evaluation script reads.
  App. C, Fig. 7: the same prompt and seed at several aesthetic scores (`--aesthetic 5 6 7`).
  §5.2 Fig. 4 and App. G Fig. 8: latent-code swapping and encoder attention maps
      (`python sample.py tokviz ...`).

The pipeline, per batch of prompts:

    captions --TextEncoder--> .penultimate (B,L,W), .pooled (B,E)  -> MaskGen conditions
                              .final       (B,L,W)                 -> TA-TiTok decoder
    "" (computed once)    --> the classifier-free guidance null condition
    MaskGen.generate      --> tokens: VQ ids (B,K) | KL vectors (B,K,C)
    TATiTok.decode        --> images (B,3,H,W) in [0,1] -> PNG files

Usage:
    python sample.py --prompt "a red circle to the left of a blue square"   # shipped model
    python sample.py --prompts prompts.txt --num_images 4 --aesthetic 5 6 7
    python sample.py --generator runs/maskgen --prompt "..."      # our run (tokenizer from its config)
    python sample.py --tokenizer tokenizer_tatitok_bl128_vq --generator generator_maskgen_vq_l \
        --geneval evaluation_metadata.jsonl --num_images 4 --outdir geneval_out
    torchrun --nproc_per_node=8 sample.py ...                      # shards the prompts over GPUs
    python sample.py tokviz --tokenizer PATH --image img.png --caption "..."   # Fig. 4 / Fig. 8

Public API (importable, used by the tests):
    load_generator(path, device) -> LoadedGenerator(model, text, tokenizer, source, where)
    load_models(generator, tokenizer, device) -> Models(generator, tokenizer, gen_text, tok_text, ...)
    swap_tokens(tok, tokens, text_final, positions, replacements) -> (P, J, 3, H, W)
    encoder_attention(tok, images) -> (B, K, G, G);  attention_overlays(image, attn) -> (K, 3, H, W)
    labelled_grid(rows, row_labels, tile_labels) -> PIL.Image
    main(argv)
"""

import argparse
import datetime
import glob
import json
import math
import os
import sys
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import maskgen as M
import tokenizer as T

HERE = os.path.dirname(os.path.abspath(__file__))
# The small model trained on the shapes world that ships with the repository: one file
# holding both stages, {"tokenizer": {...}, "generator": {...}} (see issue 6 / README).
DEFAULT_CHECKPOINT = os.path.join(HERE, "checkpoints", "shapes.pt")
HOW_TO_GET_DEFAULT = (
    "It ships with the repository: restore it with `git checkout -- checkpoints/shapes.pt` (or re-clone; "
    "with Git LFS run `git lfs pull`), or train your own with train_tokenizer.py and then train_maskgen.py "
    "on the shapes world (exact commands in README.md) and pass --generator RUN_DIR. "
    "For the paper's models, download official releases and pass --tokenizer DIR --generator DIR."
)

# -----------------------------------------------------------------------------
# Checkpoints.
#
# Three kinds of input are accepted for each of --generator and --tokenizer:
#   an official release directory   config.json + model.safetensors (Hugging Face layout)
#   one of our runs                  a folder of ckpt_*.pt (the newest is used) or one such file
#   a bundled file                   {"tokenizer": ..., "generator": ...}, like checkpoints/shapes.pt
# Every check below runs before any image is generated, so a wrong pairing costs seconds.


class TextSpec(NamedTuple):
    """Which text encoder a model was trained with."""

    name: Optional[str]  # open_clip model name, or a tokenizer.TEXT_PRESETS key (None: unknown)
    pretrained: str  # open_clip weights tag, for named models
    state: Optional[dict]  # weights of a small random tower saved inside the checkpoint


# The official releases were all trained with OpenAI's CLIP ViT-L/14 at 336 px.
OFFICIAL_TEXT = TextSpec("ViT-L-14-336", "openai", None)

# Which official tokenizer each official generator was trained on (official inference configs).
OFFICIAL_PAIRS = "MaskGen-VQ (L, XL) <- tokenizer_tatitok_bl128_vq;  MaskGen-KL (L, XL) <- tokenizer_tatitok_bl32_vae"


class LoadedGenerator(NamedTuple):
    model: torch.nn.Module  # MaskGenVQ or MaskGenKL, eval mode, on the device
    text: TextSpec  # the text encoder its conditions come from
    tokenizer: object  # where its tokenizer is: a recorded path (str), a ckpt dict (bundle), or None
    source: str  # human-readable "path (EMA weights)"
    where: str  # the file or directory actually read


class Models(NamedTuple):
    generator: torch.nn.Module
    tokenizer: torch.nn.Module  # TATiTok, eval mode
    gen_text: torch.nn.Module  # TextEncoder for MaskGen's conditions (.penultimate, .pooled)
    tok_text: torch.nn.Module  # TextEncoder for the decoder (.final); usually the same object
    gen_source: str
    tok_source: str


def _torch_load(path):
    # weights_only: a checkpoint is data, never code. mmap avoids a second copy of big files.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _open_checkpoint(path, role):
    """path -> ("official", dir, dir) or ("file", ckpt dict, file). role: 'generator' | 'tokenizer'."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{role} checkpoint {path!r} does not exist; pass --{role} an official release directory "
            f"(config.json + model.safetensors), one of our run folders (ckpt_*.pt) or a checkpoint file"
        )
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "official", path, path
        found = sorted(glob.glob(os.path.join(path, "ckpt_*.pt")))
        if not found:
            raise FileNotFoundError(
                f"{role} directory {path!r} holds neither config.json (an official release) nor ckpt_*.pt "
                f"(one of our training runs); point --{role} at one of those"
            )
        path = found[-1]  # zero-padded step numbers: the last one is the newest
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} does not hold a checkpoint dict (got {type(ckpt).__name__}); is it a checkpoint?")
    return "file", ckpt, path


def _official_role(path):
    """A release directory's config.json says what it is: generators have model.maskgen."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if "model" not in cfg and isinstance(cfg.get("config"), dict):  # hub-mixin wrapper
        cfg = cfg["config"]
    return "generator" if "maskgen" in cfg.get("model", {}) else "tokenizer"


def _file_role(ckpt):
    if "generator" in ckpt and "tokenizer" in ckpt:
        return "bundle"
    if "maskgen_config" in ckpt:
        return "generator"
    if "tokenizer_config" in ckpt:
        return "tokenizer"
    return "unknown"


def _weights(ckpt, where):
    """The EMA weights when the checkpoint has them (they sample better), else the raw ones."""
    if ckpt.get("ema"):
        return ckpt["ema"], "EMA weights"
    if ckpt.get("model"):
        return ckpt["model"], "raw weights: the checkpoint has no EMA"
    raise ValueError(f"{where!r} has neither 'ema' nor 'model' weights; it is incomplete, re-save it")


def _text_spec(ckpt):
    cfg = ckpt.get("config") or {}
    return TextSpec(cfg.get("text_encoder"), cfg.get("text_pretrained", "openai"), ckpt.get("text_encoder"))


class _GeneratorSource(NamedTuple):
    """A generator checkpoint, opened and identified, with its config read: not built yet."""

    kind: str  # "official" | "ckpt"
    where: str
    ckpt: Optional[dict]  # our checkpoint dict (the generator part of a bundle)
    config: M.MaskGenConfig
    text: TextSpec
    tokenizer: object  # recorded tokenizer: a path (str), a ckpt dict (bundle), or None


def _resolve_generator(path):
    kind, payload, where = _open_checkpoint(path, "generator")
    if kind == "official":
        if _official_role(where) == "tokenizer":
            raise ValueError(
                f"{where!r} is a TA-TiTok tokenizer release (its config.json has no model.maskgen); pass it as "
                f"--tokenizer, and a MaskGen release (turkeyju/generator_maskgen_*) as --generator"
            )
        with open(os.path.join(where, "config.json")) as f:
            cfg = M.config_from_official(json.load(f), where)
        return _GeneratorSource("official", where, None, cfg, OFFICIAL_TEXT, None)

    ckpt, tokenizer_ref = payload, None
    role = _file_role(ckpt)
    if role == "bundle":  # the shipped single file: the generator part, and its own tokenizer
        ckpt, tokenizer_ref = ckpt["generator"], ckpt["tokenizer"]
    elif role == "tokenizer":
        raise ValueError(
            f"{where!r} is a TA-TiTok tokenizer checkpoint (it has 'tokenizer_config'), not a MaskGen one; "
            f"pass it as --tokenizer and give the MaskGen run (train_maskgen.py output) as --generator"
        )
    elif role != "generator":
        raise ValueError(
            f"{where!r} is not a MaskGen checkpoint: its keys are {sorted(ckpt)[:10]}, expected 'maskgen_config' "
            f"and 'ema'/'model' (written by train_maskgen.py) or 'generator' + 'tokenizer' (a bundled file)"
        )
    if "maskgen_config" not in ckpt:
        raise ValueError(f"the generator part of {where!r} has no 'maskgen_config'; the bundle is incomplete")
    if tokenizer_ref is None:
        tokenizer_ref = (ckpt.get("config") or {}).get("tokenizer")  # path recorded by train_maskgen.py
    return _GeneratorSource("ckpt", where, ckpt, M.MaskGenConfig(**ckpt["maskgen_config"]), _text_spec(ckpt), tokenizer_ref)


def _build_generator(src, device):
    if src.kind == "official":
        return M.MaskGen.from_official(src.where).to(device).eval(), f"{src.where} (official release)"
    model = M.MaskGen(src.config, init_weights=False)  # every weight comes from the checkpoint
    sd, which = _weights(src.ckpt, src.where)
    T.load_checked(model, M.fuse_qkv(sd), src.where)  # fuse: older files keep q/k/v apart
    return model.to(device).eval(), f"{src.where} ({which})"


def load_generator(path, device="cpu"):
    """Load MaskGen from an official release dir, one of our runs, or a bundled file
    (EMA weights when present).

    Returns LoadedGenerator(model, text, tokenizer, source, where); `tokenizer` is where
    the matching tokenizer is (None for official releases: pass --tokenizer).
    """
    src = _resolve_generator(path)
    model, source = _build_generator(src, device)
    return LoadedGenerator(model, src.text, src.tokenizer, source, src.where)


class _TokenizerSource(NamedTuple):
    kind: str  # "official" | "ckpt"
    where: str
    ckpt: Optional[dict]
    config: T.TATiTokConfig
    text: TextSpec


def _find_recorded_tokenizer(path, gen_where):
    """A tokenizer path recorded in a generator's config was relative to where training ran;
    try it as given, then next to the generator checkpoint, then next to this script."""
    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    base = os.path.dirname(os.path.abspath(gen_where))
    for cand in (path, os.path.join(base, path), os.path.join(os.path.dirname(base), path), os.path.join(HERE, path)):
        if os.path.exists(cand):
            return cand
    return None


def _resolve_tokenizer(ref, gen=None):
    """Read the tokenizer's config (cheaply, without building it).

    ref: a path given by the user, or (gen given) what the generator recorded: a path
    from its training config or, for a bundle, the tokenizer's checkpoint dict."""
    if ref is None:
        raise ValueError(
            f"the generator {gen.where!r} does not say which tokenizer it was trained with (official releases "
            f"never do); pass --tokenizer DIR. Official pairs: {OFFICIAL_PAIRS}"
        )
    if isinstance(ref, dict):  # the tokenizer part of a bundled file
        kind, ckpt, where = "file", ref, f"{gen.where} [tokenizer]"
    else:
        found = ref if gen is None else _find_recorded_tokenizer(ref, gen.where)
        if found is None:
            raise FileNotFoundError(
                f"the generator {gen.where!r} was trained with tokenizer {ref!r} (recorded in its config), which "
                f"is not found from here; pass --tokenizer PATH to that tokenizer run or release"
            )
        kind, ckpt, where = _open_checkpoint(found, "tokenizer")
    if kind == "official":
        if _official_role(where) == "generator":
            raise ValueError(f"{where!r} is a MaskGen release, not a tokenizer; pass it as --generator")
        with open(os.path.join(where, "config.json")) as f:
            return _TokenizerSource("official", where, None, T.config_from_official(json.load(f)), OFFICIAL_TEXT)
    role = _file_role(ckpt)
    if role == "bundle":
        ckpt, where = ckpt["tokenizer"], where + " [tokenizer]"
    elif role == "generator":
        raise ValueError(
            f"{where!r} is a MaskGen checkpoint (it has 'maskgen_config'), not a tokenizer; pass it as --generator "
            f"and the TA-TiTok run it was trained with as --tokenizer"
        )
    elif role != "tokenizer":
        raise ValueError(f"{where!r} is not a TA-TiTok checkpoint: no 'tokenizer_config' among {sorted(ckpt)[:10]}")
    return _TokenizerSource("ckpt", where, ckpt, T.TATiTokConfig(**ckpt["tokenizer_config"]), _text_spec(ckpt))


def _same_text(a, b):
    """Do two TextSpecs describe the same encoder? A generator that records no text encoder
    uses its tokenizer's (train_maskgen.py takes it from load_tokenizer), and a bundle
    stores the small tower's weights once, with the tokenizer."""
    if a.name is None or b.name is None:
        return True
    if a.name != b.name:
        return False
    if a.state is None or b.state is None:
        return a.state is not None or b.state is not None or a.pretrained == b.pretrained
    return a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def check_pair(tcfg, gcfg, tok_where, gen_where):
    """The tokenizer must produce exactly the tokens the generator was trained on."""
    problems = []
    tmode = tcfg.quantize_mode
    if tmode != gcfg.mode:
        problems.append(f"token type: tokenizer is {tmode.upper()} but the generator is MaskGen-{gcfg.mode.upper()}")
    if tcfg.num_latent_tokens != gcfg.num_tokens:
        problems.append(
            f"token count K: tokenizer has {tcfg.num_latent_tokens} latent tokens but the generator makes {gcfg.num_tokens}"
        )
    if tmode == gcfg.mode == "vq" and tcfg.codebook_size != gcfg.codebook_size:
        problems.append(f"codebook size: tokenizer {tcfg.codebook_size} vs generator {gcfg.codebook_size}")
    if tmode == gcfg.mode == "kl" and tcfg.token_size != gcfg.token_size:
        problems.append(f"token channels C: tokenizer {tcfg.token_size} vs generator {gcfg.token_size}")
    if problems:
        raise ValueError(
            f"tokenizer {tok_where!r} and generator {gen_where!r} do not fit together:\n  - "
            + "\n  - ".join(problems)
            + f"\nFix: pass --tokenizer the TA-TiTok the generator was trained with (for our runs it is recorded in "
            f"the generator's config; omit --tokenizer to use it). Official pairs: {OFFICIAL_PAIRS}"
        )


def check_text(gcfg, tcfg, gen_text, tok_text, gen_where, tok_where):
    problems = []
    if gen_text.width != gcfg.text_width:
        problems.append(f"generator {gen_where!r} expects text states of width {gcfg.text_width}, its text encoder gives {gen_text.width}")
    if gen_text.embed_dim != gcfg.pooled_dim:
        problems.append(f"generator {gen_where!r} expects pooled text of size {gcfg.pooled_dim}, its text encoder gives {gen_text.embed_dim}")
    if (tok_text.context_length, tok_text.width) != (tcfg.text_context_length, tcfg.text_embed_dim):
        problems.append(
            f"tokenizer {tok_where!r} expects text states ({tcfg.text_context_length}, {tcfg.text_embed_dim}), its text "
            f"encoder gives ({tok_text.context_length}, {tok_text.width})"
        )
    if problems:
        raise ValueError("text encoder mismatch:\n  - " + "\n  - ".join(problems) + "\nFix: use the checkpoints as trained (same text encoder).")


def load_models(generator=None, tokenizer=None, device="cpu"):
    """Load and cross-check the generator, its tokenizer and their text encoder(s).

    With neither path, the shipped checkpoints/shapes.pt is used. For our runs and the
    bundle, --tokenizer may be omitted: the generator knows its tokenizer.
    """
    if generator is None:
        if tokenizer is not None:
            raise ValueError("--tokenizer was given without --generator; pass the MaskGen checkpoint as --generator too")
        if not os.path.isfile(DEFAULT_CHECKPOINT):
            raise FileNotFoundError(f"no checkpoint given and the default {DEFAULT_CHECKPOINT} is missing. {HOW_TO_GET_DEFAULT}")
        generator = DEFAULT_CHECKPOINT
    # Read both configs and check that they fit before building anything big.
    gen = _resolve_generator(generator)
    # An explicit --tokenizer wins; otherwise the one the generator records.
    src = _resolve_tokenizer(tokenizer) if tokenizer is not None else _resolve_tokenizer(gen.tokenizer, gen)
    check_pair(src.config, gen.config, src.where, gen.where)

    # Only now build the models and the text encoder(s) (possibly a CLIP download).
    gen_model, gen_source = _build_generator(gen, device)
    if src.kind == "official":
        tok, tok_text = T.load_tokenizer(src.where, device)  # text encoder: CLIP ViT-L-14-336
        tok_source = f"{src.where} (official release)"
    else:
        tok = T.tokenizer_from_checkpoint(src.ckpt, src.where).to(device)
        which = _weights(src.ckpt, src.where)[1]
        tok_text = T.build_text_encoder(*src.text, src.where).to(device)
        tok_source = f"{src.where} ({which})"
    # One text encoder serves both models unless the generator was trained with another.
    if _same_text(gen.text, src.text):
        gen_text = tok_text
    else:
        print(f"note: the generator's text encoder {gen.text.name!r} differs from the tokenizer's {src.text.name!r}; using both")
        gen_text = T.build_text_encoder(*gen.text, gen.where).to(device)
    check_text(gen.config, src.config, gen_text, tok_text, gen.where, src.where)
    return Models(gen_model, tok, gen_text, tok_text, gen_source, tok_source)


# -----------------------------------------------------------------------------
# Prompts.


def read_prompt_file(path):
    """.txt: one prompt per non-empty line; .jsonl: one JSON object with a "prompt" per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                prompts.append(_jsonl_prompt(line, path, n))
            else:
                prompts.append(line.rstrip("\r\n"))
    if not prompts:
        raise ValueError(
            f"prompt file {path!r} holds no prompts; write one prompt per line (.txt) or one "
            f'{{"prompt": "..."}} object per line (.jsonl)'
        )
    return prompts


def _jsonl_prompt(line, path, n):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not valid JSON ({e}); a .jsonl file holds one JSON object per line") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f'{path}:{n} has no "prompt" string; each line must look like {{"prompt": "a red circle", ...}}')
    return obj["prompt"]


def read_geneval(path):
    """GenEval's evaluation_metadata.jsonl -> (prompts, the raw JSON lines, kept verbatim)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GenEval metadata file {path!r} does not exist (it is prompts/evaluation_metadata.jsonl in GenEval)")
    prompts, lines = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                prompts.append(_jsonl_prompt(line, path, n))
                lines.append(line.strip())
    if not prompts:
        raise ValueError(f"GenEval metadata file {path!r} holds no prompts; it should be GenEval's evaluation_metadata.jsonl")
    return prompts, lines


# -----------------------------------------------------------------------------
# The work list, sharded over ranks.
#
# Every image is one item (prompt p, image i, aesthetic score a). Its seed is
# seed + p * num_images + i: it depends on neither the batch size nor the number of
# processes, and the same (p, i) at different aesthetic scores shares a seed (Fig. 7).


class Item(NamedTuple):
    prompt_index: int
    image_index: int
    aes_index: int
    seed: int


def make_items(num_prompts, num_images, num_aesthetics, seed):
    return [
        Item(p, i, a, seed + p * num_images + i)
        for p in range(num_prompts)
        for a in range(num_aesthetics)
        for i in range(num_images)
    ]


def shard(items, rank, world):
    """Rank r takes items r, r + W, r + 2W, ...: every item exactly once over all ranks,
    and balanced to within one item."""
    return items[rank::world]


def image_path(outdir, item, aesthetics, geneval):
    if geneval:  # GenEval's layout: <outdir>/<prompt:05d>/samples/<image:04d>.png
        return os.path.join(outdir, f"{item.prompt_index:05d}", "samples", f"{item.image_index:04d}.png")
    name = f"{item.prompt_index:05d}_s{item.seed:04d}"
    if len(aesthetics) > 1:
        name += f"_aes{aesthetics[item.aes_index]:g}"
    return os.path.join(outdir, name + ".png")


# -----------------------------------------------------------------------------
# Sampling.


def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_uint8(images):
    """(B,3,H,W) nominally in [0,1] -> (B,H,W,3) uint8 numpy."""
    x = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def generate_images(models, prompts, aesthetics, seeds, null, opts, device, seeding="item"):
    """One batch: captions (list of B), aesthetic scores (list of B floats or None),
    seeds (list of B) -> images (B,3,H,W) in [0,1].

    seeding="item": each image gets its own torch.Generator(seed), so an image does not
    depend on what else is in its batch. MaskGen.generate takes one generator for the
    whole batch, so this runs generate() once per image (text encoding and decoding
    stay batched). seeding="batch": one generate() call per batch, seeded by the first
    item's seed: faster, but an image then depends on the batch size and world size.
    """
    gen, tok = models.generator, models.tokenizer
    text = models.gen_text(prompts)  # one forward: .penultimate (B,L,W), .pooled (B,E), .final (B,L,W)
    final = text.final if models.tok_text is models.gen_text else models.tok_text(prompts).final
    kw = dict(null_text=null.penultimate, null_pooled=null.pooled, **opts)
    if seeding == "item":
        tokens = []
        for b, seed in enumerate(seeds):
            g = torch.Generator(device=device).manual_seed(seed)
            tokens.append(gen.generate(text.penultimate[b : b + 1], text.pooled[b : b + 1], aesthetic=aesthetics[b], generator=g, **kw))
        tokens = torch.cat(tokens)  # VQ (B,K) ids | KL (B,K,C)
    else:
        g = torch.Generator(device=device).manual_seed(seeds[0])
        aes = None if aesthetics[0] is None else torch.tensor(aesthetics, dtype=torch.float32, device=device)
        tokens = gen.generate(text.penultimate, text.pooled, aesthetic=aes, generator=g, **kw)
    return tok.decode(tokens, final)  # (B,3,H,W)


def check_options(args, gcfg):
    """Sampler options that only make sense for one variant, checked before any work."""
    if args.guidance_schedule is not None:
        ok = ("cosine", "linear", "none") if gcfg.mode == "vq" else ("linear", "constant")
        if args.guidance_schedule not in ok:
            raise ValueError(
                f"--guidance_schedule {args.guidance_schedule!r} is not available for MaskGen-{gcfg.mode.upper()}; choose one of {ok}"
            )
    if gcfg.mode == "kl" and args.randomize_temperature is not None:
        print("note: --randomize_temperature only applies to MaskGen-VQ; ignored for this KL model")
    if args.aesthetic and any(a is not None for a in args.aesthetic) and not gcfg.aes_embed_dim:
        print("note: this generator has no aesthetic-score condition; --aesthetic is ignored")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")


# -----------------------------------------------------------------------------
# Labelled grids (PIL's default font; small images are enlarged so labels stay readable).


def _fit(draw, text, font, width):
    """Cut text to fit a width in pixels, marking the cut with '...'."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def labelled_grid(rows, row_labels=None, tile_labels=None, min_tile=128, pad=4):
    """rows: list of lists of equally sized PIL images (ragged rows are padded with white).
    row_labels: one string per row, drawn in a strip above the row.
    tile_labels: per-tile strings (same nesting as rows), drawn under each tile."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 4  # one text line, with a margin
    w0, h0 = rows[0][0].size
    s = max(1, math.ceil(min_tile / max(w0, h0)))  # integer nearest-neighbour upscaling
    tw, th = w0 * s, h0 * s
    ncols = max(len(r) for r in rows)
    row_h = (line if row_labels else 0) + th + (line if tile_labels else 0) + pad
    W, H = pad + ncols * (tw + pad), pad + len(rows) * row_h
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * row_h
        if row_labels:
            draw.text((pad, y + 1), _fit(draw, row_labels[r], font, W - 2 * pad), fill=(0, 0, 0), font=font)
            y += line
        for c, im in enumerate(row):
            x = pad + c * (tw + pad)
            grid.paste(im.resize((tw, th), Image.NEAREST), (x, y))
            if tile_labels and tile_labels[r][c]:
                draw.text((x, y + th + 1), _fit(draw, tile_labels[r][c], font, tw), fill=(60, 60, 60), font=font)
    return grid


def build_run_grid(outdir, prompts, items, aesthetics, geneval, max_rows, max_cols=16):
    """One row per (prompt, aesthetic score), one column per image, read back from disk
    (so under torchrun rank 0 sees every rank's images)."""
    rows, labels, tile_labels = {}, {}, {}
    for it in items:
        key = (it.prompt_index, it.aes_index)
        if key not in rows and len(rows) == max_rows:
            continue
        if len(rows.setdefault(key, [])) >= max_cols:
            continue
        with Image.open(image_path(outdir, it, aesthetics, geneval)) as im:
            rows[key].append(im.convert("RGB"))
        tile_labels.setdefault(key, []).append(f"seed {it.seed}")
        label = f"{it.prompt_index}: {prompts[it.prompt_index]}"
        if len(aesthetics) > 1:
            label = f"[aesthetic {aesthetics[it.aes_index]:g}] " + label
        labels[key] = label
    keys = list(rows)
    return labelled_grid([rows[k] for k in keys], [labels[k] for k in keys], [tile_labels[k] for k in keys])


# -----------------------------------------------------------------------------
# Multi-process (torchrun) helpers: a process group only for the final barrier.


def _dist_setup():
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # gloo runs anywhere (CPU or GPU); it is only used for barriers, no tensors move.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=4))
    return rank, world


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# The sampling command.


def build_parser():
    p = argparse.ArgumentParser(
        description="Generate images from text with MaskGen + TA-TiTok (see the module docstring). "
        "Run `python sample.py tokviz -h` for the tokenizer visualisations.",
    )
    src = p.add_argument_group("prompts (at least one source)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    src.add_argument("--prompts", help="a .txt file (one prompt per line) or .jsonl file (a \"prompt\" field per line)")
    src.add_argument("--geneval", help="GenEval's evaluation_metadata.jsonl: writes GenEval's folder layout")
    ck = p.add_argument_group("checkpoints (default: the shipped checkpoints/shapes.pt)")
    ck.add_argument("--generator", help="MaskGen: official release dir, our run folder / ckpt file, or a bundled file")
    ck.add_argument("--tokenizer", help="TA-TiTok: official release dir or our run; default: the one the generator records")
    s = p.add_argument_group("sampling (defaults: the generator's config)")
    s.add_argument("--steps", type=int, help="decoding steps (paper: 16 VQ, 32 KL)")
    s.add_argument("--guidance_scale", type=float, help="classifier-free guidance scale; 1 = no guidance")
    s.add_argument("--guidance_schedule", help="VQ: cosine | linear | none;  KL: linear | constant")
    s.add_argument("--randomize_temperature", type=float, help="VQ: Gumbel temperature, annealed to 0")
    s.add_argument("--temperature", type=float, help="VQ: softmax temperature (default annealed); KL: DiffLoss noise")
    s.add_argument("--aesthetic", type=float, nargs="+", help="aesthetic score(s); several give one grid row each (Fig. 7)")
    s.add_argument("--seed", type=int, default=0, help="image (p, i) uses seed + p * num_images + i")
    s.add_argument("--seeding", choices=("item", "batch"), default="item",
                   help="item: per-image generators, results independent of batch/world size; batch: faster")  # fmt: skip
    s.add_argument("--num_images", type=int, help="images per prompt (default 1; 4 with --geneval, as GenEval)")
    s.add_argument("--batch_size", type=int, default=16)
    o = p.add_argument_group("output and hardware")
    o.add_argument("--outdir", default="out/samples")
    o.add_argument("--grid_rows", type=int, default=16, help="rows in the run's grid.png (0: no grid)")
    o.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    o.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast precision of the models")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tokviz"]:
        return tokviz_main(argv[1:])
    if argv[:1] == ["bundle"]:
        return bundle_main(argv[1:])
    args = build_parser().parse_args(argv)

    # 1. Prompts, read and checked before anything is loaded.
    geneval_lines = None
    if args.geneval:
        if args.prompt or args.prompts:
            raise ValueError("--geneval takes its prompts from the metadata file; drop --prompt / --prompts")
        prompts, geneval_lines = read_geneval(args.geneval)
    else:
        prompts = list(args.prompt) + (read_prompt_file(args.prompts) if args.prompts else [])
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable), --prompts FILE or --geneval FILE")
    geneval = geneval_lines is not None
    num_images = args.num_images if args.num_images is not None else (4 if geneval else 1)
    aesthetics = list(args.aesthetic) if args.aesthetic else [None]
    if geneval and len(aesthetics) > 1:
        raise ValueError("--geneval writes one image set per prompt; give a single --aesthetic score")
    if num_images < 1 or args.batch_size < 1:
        raise ValueError(f"--num_images and --batch_size must be at least 1, got {num_images} and {args.batch_size}")

    # 2. Processes and device.
    rank, world = _dist_setup()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # 3. Checkpoints, cross-checked (tokens, codebook, text widths) before any sampling.
    models = load_models(args.generator, args.tokenizer, device)
    gcfg = models.generator.config
    check_options(args, gcfg)
    aesthetics = [gcfg.aesthetic if a is None else a for a in aesthetics]  # labels show the real score
    if rank == 0:
        print(f"generator: {models.gen_source} [MaskGen-{gcfg.mode.upper()}, K={gcfg.num_tokens}]")
        print(f"tokenizer: {models.tok_source}")
    opts = dict(num_steps=args.steps, guidance_scale=args.guidance_scale, guidance_schedule=args.guidance_schedule,
                randomize_temperature=args.randomize_temperature, temperature=args.temperature)  # fmt: skip

    # 4. The work list: this rank's share, in batches.
    items = make_items(len(prompts), num_images, len(aesthetics), args.seed)
    mine = shard(items, rank, world)
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    os.makedirs(args.outdir, exist_ok=True)
    if rank == 0 and not geneval:  # an index from file name to prompt (GenEval has metadata.jsonl)
        with open(os.path.join(args.outdir, "prompts.jsonl"), "w", encoding="utf-8") as f:
            for p, text in enumerate(prompts):
                f.write(json.dumps({"index": p, "prompt": text}) + "\n")

    written = []
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    with torch.inference_mode(), autocast:
        null = models.gen_text([""])  # the classifier-free guidance null condition, computed once
        for batch in tqdm(batches, desc=f"sampling (rank {rank})" if world > 1 else "sampling", disable=rank != 0):
            images = generate_images(
                models, [prompts[it.prompt_index] for it in batch], [aesthetics[it.aes_index] for it in batch],
                [it.seed for it in batch], null, opts, device, args.seeding,
            )  # fmt: skip
            for it, arr in zip(batch, to_uint8(images)):
                path = image_path(args.outdir, it, aesthetics, geneval)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(arr).save(path)
                if geneval and it.image_index == 0:  # the rank that owns image 0 writes the metadata
                    with open(os.path.join(args.outdir, f"{it.prompt_index:05d}", "metadata.jsonl"), "w", encoding="utf-8") as f:
                        f.write(geneval_lines[it.prompt_index] + "\n")  # the line verbatim, as GenEval expects
                written.append(path)

    # 5. After every rank is done, rank 0 draws the grid from the files on disk.
    _barrier()
    grid_path = None
    if rank == 0:
        if args.grid_rows > 0:
            grid_path = os.path.join(args.outdir, "grid.png")  # outside the numbered folders: GenEval skips it
            build_run_grid(args.outdir, prompts, items, aesthetics, geneval, args.grid_rows).save(grid_path)
        where = f"{args.outdir}/<prompt>/samples/" if geneval else f"{args.outdir}/"
        n = len(items)
        where = ", ".join(written) if world == 1 and n <= 4 else where  # a few images: name each file
        print(f"wrote {n} image{'s' * (n != 1)} to {where}" + (f"; grid: {grid_path}" if grid_path else ""))
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return {"images": written, "grid": grid_path, "items": mine}


# -----------------------------------------------------------------------------
# Tokenizer visualisations (paper Fig. 4 and Fig. 8).
#
# (1) Latent-code swapping: encode an image, replace token i by code j, decode. With
#     1D tokens one token often owns one semantic element (a leaf, a head, the style),
#     so a swap changes that element rather than a fixed image region.
# (2) Attention maps: in the encoder's last block, how much each latent token's query
#     attends to each image patch: softmax(q k^T / sqrt(d)), averaged over heads.


def load_image(path, size):
    """An image file -> (1,3,size,size) in [0,1]: shorter side resized to `size`, centre crop."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255  # (1,3,S,S)


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
    return Image.fromarray(to_uint8(x[None])[0])


def _spread(n, k):
    """k indices evenly spread over range(n)."""
    k = min(k, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def bundle_main(argv):
    """`python sample.py bundle --generator RUN --out FILE`: one self-contained file with
    the generator's and its tokenizer's EMA weights, configs and small text tower (how
    checkpoints/shapes.pt is made). Weights are stored in fp16 unless --fp32; they are
    loaded back into fp32 models."""
    p = argparse.ArgumentParser(prog="sample.py bundle", description=bundle_main.__doc__)
    p.add_argument("--generator", required=True, help="a train_maskgen.py run folder or checkpoint")
    p.add_argument("--tokenizer", help="its TA-TiTok run (default: the one the generator records)")
    p.add_argument("--out", required=True)
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights (twice the size)")
    args = p.parse_args(argv)
    gen = _resolve_generator(args.generator)
    src = _resolve_tokenizer(args.tokenizer) if args.tokenizer else _resolve_tokenizer(gen.tokenizer, gen)
    if gen.kind != "ckpt" or src.kind != "ckpt":
        raise ValueError("bundle packs our own runs; official releases are already self-contained directories")
    check_pair(src.config, gen.config, src.where, gen.where)

    def small(sd):
        return {k: v.half() if v.is_floating_point() and not args.fp32 else v for k, v in sd.items()}

    tok, gen_ck = src.ckpt, gen.ckpt
    bundle = {
        "tokenizer": {"tokenizer_config": tok["tokenizer_config"], "ema": small(_weights(tok, src.where)[0]),
                      "config": tok["config"], "text_encoder": small(tok["text_encoder"]) if tok.get("text_encoder") else None},
        "generator": {"maskgen_config": gen_ck["maskgen_config"], "ema": small(_weights(gen_ck, gen.where)[0]),
                      "config": gen_ck["config"]},
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    torch.save(bundle, tmp)
    os.replace(tmp, args.out)  # atomic: a crash never leaves a half-written bundle
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB) from {gen.where} + {src.where}")
    return args.out


def tokviz_main(argv):
    p = argparse.ArgumentParser(
        prog="sample.py tokviz",
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

    device = pick_device(args.device)
    ref = args.tokenizer
    if ref is None:
        if not os.path.isfile(DEFAULT_CHECKPOINT):
            raise FileNotFoundError(f"no --tokenizer given and the default {DEFAULT_CHECKPOINT} is missing. {HOW_TO_GET_DEFAULT}")
        ref = DEFAULT_CHECKPOINT
    src = _resolve_tokenizer(ref)
    if src.kind == "official":
        tok, text_enc = T.load_tokenizer(src.where, device)
    else:
        tok = T.tokenizer_from_checkpoint(src.ckpt, src.where).to(device)
        text_enc = T.build_text_encoder(*src.text, src.where).to(device)
    cfg = tok.config
    K, S = cfg.num_latent_tokens, cfg.image_size
    image = load_image(args.image, S).to(device)  # (1,3,S,S)

    with torch.no_grad():
        final = text_enc([args.caption]).final  # (1,L,W)
        tokens = tok.encode(image)  # VQ (1,K) | KL (1,K,C)
        recon = tok.decode(tokens, final).clamp(0, 1)[0]
        positions = args.positions or _spread(K, 8)
        other = tok.encode(load_image(args.swap_image, S).to(device)) if args.swap_image else tokens
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

"""
The one place that turns a reference to a trained model into the model: a TA-TiTok
tokenizer (paper §3.2) together with the text encoder its decoder was trained with, and
a MaskGen generator (§3.3), checked to fit each other (§4.2: MaskGen-VQ works on
TA-TiTok's VQ ids, MaskGen-KL on its continuous KL tokens; both read CLIP text features).

No model code here: the networks are in tokenizer.py, maskgen.py and text.py, the release
format in official.py, checkpoint files and run folders in checkpoint.py.

Every entry point (sample.py, tokviz.py, evaluate.py, data.py pretokenize, train_maskgen.py)
accepts the same references, for the tokenizer and for the generator alike:
    an official release directory   config.json + model.safetensors (Hugging Face layout)
    its Hugging Face Hub id          owner/name, hf-hub:owner/name, owner/name@revision: fetched
                                     into the Hub cache (official.local_path); a local path wins
    one of our training runs         a folder of ckpt_*.pt (the newest readable one is used)
    one checkpoint file              written by train_tokenizer.py / train_maskgen.py
    a bundle                         {"tokenizer": ..., "generator": ...}, like checkpoints/shapes.pt;
                                     given as the tokenizer, its tokenizer part is used
Weights: the EMA copy when a checkpoint has one (it samples better), else the raw one.

    tok, text = load_tokenizer(ref, device, with_text=True)   # frozen TATiTok + TextEncoder (or None)
    g = load_generator(ref, device)          # LoadedGenerator(model, text, tokenizer, source, where)
    m = load_models(generator, tokenizer, device)   # Models: both, cross-checked, with text encoder(s)
    write_bundle(generator, tokenizer, out)  # one self-contained file from our two runs
    export_release(ref, out)                 # a run / checkpoint / bundle -> release directories
Every check runs on the configs, before any model is built, so a wrong pairing costs seconds.
"""

import os
from typing import NamedTuple, Optional

import torch
from safetensors.torch import save_file

import maskgen as M
import official
import tokenizer as T
from checkpoint import (
    atomic_write, check_out_dir, check_out_file, load_checked, newest_checkpoint, run_checkpoints, torch_load, write_dir,
)  # fmt: skip
from text import TEXT_PRESETS, build_text_encoder

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


class TextSpec(NamedTuple):
    """Which text encoder a model was trained with."""

    name: Optional[str]  # open_clip model name, or a text.TEXT_PRESETS key (None: unknown)
    pretrained: str  # open_clip weights tag, for named models
    state: Optional[dict]  # weights of a small random tower saved inside the checkpoint


# The official releases were all trained with OpenAI's CLIP ViT-L/14 at 336 px. A release
# exported here from a run with another text encoder records it in config.json
# ("text_encoder": {"name", "pretrained"}), and a small random tower's weights beside it.
OFFICIAL_TEXT = TextSpec("ViT-L-14-336", "openai", None)
TEXT_FILE = "text_encoder.safetensors"

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


def default_checkpoint(missing):
    """The shipped bundle, or a FileNotFoundError starting with `missing` that says how to get it."""
    if not os.path.isfile(DEFAULT_CHECKPOINT):
        raise FileNotFoundError(f"{missing} and the default {DEFAULT_CHECKPOINT} is missing. {HOW_TO_GET_DEFAULT}")
    return DEFAULT_CHECKPOINT


# -----------------------------------------------------------------------------
# Opening a reference and saying what it is (cheap: configs only, nothing built).


def _open_checkpoint(path, role, revision=None):
    """path -> ("official", dir, dir) or ("file", ckpt dict, file). role: 'generator' | 'tokenizer'
    (or 'export': SRC of `sample.py export`). A Hub id becomes its snapshot directory
    (revision: for ids that name none)."""
    path = os.fspath(official.local_path(path, revision, f"{role} checkpoint"))
    flag = "SRC" if role == "export" else f"--{role}"
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{role} checkpoint {path!r} does not exist; pass {flag} an official release directory "
            f"(config.json + model.safetensors) or its Hub id (owner/name[@revision]), one of our run folders "
            f"(ckpt_*.pt) or a checkpoint file"
        )
    if not os.path.isdir(path):
        ckpt = torch_load(path)
    elif _release_dir(path):
        return "official", path, path
    else:
        found, ckpt = newest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{role} directory {path!r} holds neither config.json (an official release) nor ckpt_*.pt "
                f"(one of our training runs); point {flag} at one of those"
            )
        path = found
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} does not hold a checkpoint dict (got {type(ckpt).__name__}); is it a checkpoint?")
    return "file", ckpt, path


def _release_text(where, cfg):
    """The text encoder a release was trained with: OpenAI's CLIP ViT-L-14-336, unless its
    config.json records another (a release exported by export_release)."""
    spec = cfg.get("text_encoder")
    if spec is None:
        return OFFICIAL_TEXT
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{where}/config.json: 'text_encoder' must be {{\"name\": ..., \"pretrained\": ...}}, got {spec!r}")
    f = os.path.join(where, TEXT_FILE)
    return TextSpec(spec["name"], spec.get("pretrained", "openai"), official.load_tensors(f) if os.path.isfile(f) else None)


def _official_role(cfg):
    """A release's config says what it is: generators have model.maskgen."""
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


class Source(NamedTuple):
    """A checkpoint, opened and identified, with its model config read: not built yet."""

    kind: str  # "official" | "ckpt"
    where: str
    ckpt: Optional[dict]  # our checkpoint dict (a bundle's part)
    config: object  # MaskGenConfig | TATiTokConfig
    text: TextSpec
    tokenizer: object = None  # generators: the recorded tokenizer, a path (str), a ckpt dict (bundle), or None


def resolve_generator(path, revision=None):
    """A generator reference (module docstring) -> its Source. revision: for Hub ids."""
    return _generator_source(*_open_checkpoint(path, "generator", revision))


def _generator_source(kind, payload, where):
    if kind == "official":
        cfg = official.read_config(where)
        if _official_role(cfg) == "tokenizer":
            raise ValueError(
                f"{where!r} is a TA-TiTok tokenizer release (its config.json has no model.maskgen); pass it as "
                f"--tokenizer, and a MaskGen release (turkeyju/generator_maskgen_*) as --generator"
            )
        mcfg = M.MaskGenConfig(**official.maskgen_kwargs(cfg, os.path.join(where, "config.json")))
        return Source("official", where, None, mcfg, _release_text(where, cfg))

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
    return Source("ckpt", where, ckpt, M.MaskGenConfig(**ckpt["maskgen_config"]), _text_spec(ckpt), tokenizer_ref)


def _find_recorded_tokenizer(path, gen_where):
    """A tokenizer path recorded in a generator's config was relative to where training ran;
    try it as given, then next to the generator checkpoint, then next to this script. A Hub
    id found nowhere locally is returned as it is, to be fetched."""
    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    base = os.path.dirname(os.path.abspath(gen_where))
    for cand in (path, os.path.join(base, path), os.path.join(os.path.dirname(base), path), os.path.join(HERE, path)):
        if os.path.exists(cand):
            return cand
    return path if official.hub_id(path) else None


def resolve_tokenizer(ref, gen=None, revision=None):
    """Read the tokenizer's config (cheaply, without building it).

    ref: a reference given by the user (revision: for Hub ids), or (gen given) what the
    generator recorded: a path or Hub id from its training config or, for a bundle, the
    tokenizer's checkpoint dict."""
    if ref is None:
        raise ValueError(
            f"the generator {gen.where!r} does not say which tokenizer it was trained with (official releases "
            f"never do); pass --tokenizer DIR. Official pairs: {OFFICIAL_PAIRS}"
        )
    if isinstance(ref, dict):  # the tokenizer part of a bundled file
        kind, ckpt, where = "file", ref, f"{gen.where} [tokenizer]"
    else:
        found = ref if gen is None else _find_recorded_tokenizer(ref, gen.where)
        recorded = f"the generator {gen.where!r} was trained with tokenizer {ref!r} (recorded in its config)" if gen else ""
        if found is None:
            raise FileNotFoundError(f"{recorded}, which is not found from here; pass --tokenizer PATH to that "
                                    f"tokenizer run or release")  # fmt: skip
        try:
            kind, ckpt, where = _open_checkpoint(found, "tokenizer", None if gen else revision)
        except official.HubError as e:
            raise official.HubError(f"{recorded}: {e}" if gen else str(e)) from None
    return _tokenizer_source(kind, ckpt, where)


def _tokenizer_source(kind, ckpt, where):
    if kind == "official":
        cfg = official.read_config(where)
        if _official_role(cfg) == "generator":
            raise ValueError(f"{where!r} is a MaskGen release, not a tokenizer; pass it as --generator")
        tcfg = T.TATiTokConfig(**official.tatitok_kwargs(cfg, os.path.join(where, "config.json")))
        return Source("official", where, None, tcfg, _release_text(where, cfg))
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
    return Source("ckpt", where, ckpt, T.TATiTokConfig(**ckpt["tokenizer_config"]), _text_spec(ckpt))


# -----------------------------------------------------------------------------
# Building the models.


def _build_generator(src, device):
    if src.kind == "official":
        return M.MaskGenBase.from_official(src.where).to(device).eval(), f"{src.where} (official release)"
    model = M.build(src.config, init_weights=False)  # every weight comes from the checkpoint
    sd, which = _weights(src.ckpt, src.where)
    load_checked(model, official.fuse_qkv(sd), src.where)  # fuse: older files keep q/k/v apart
    return model.to(device).eval(), f"{src.where} ({which})"


def _build_tokenizer(src, device, with_text=True):
    """-> (frozen TATiTok, its TextEncoder or None, "where (which weights)")."""
    if src.kind == "official":
        model, source = T.TATiTok.from_official(src.where), f"{src.where} (official release)"
    else:
        model = T.TATiTok(src.config)
        sd, which = _weights(src.ckpt, src.where)
        load_checked(model, sd, src.where)
        source = f"{src.where} ({which})"
    model = model.to(device).eval().requires_grad_(False)
    if not with_text:  # e.g. pretokenization: no text needed, and no CLIP download
        return model, None, source
    text = build_text_encoder(*src.text, src.where)  # official releases: CLIP ViT-L-14-336
    return model, text.to(device), source


def load_tokenizer(ref, device="cpu", with_text=True, revision=None):
    """A frozen TA-TiTok (eval mode, no gradients) and the text encoder its decoder was trained
    with, from any reference in the module docstring (revision: for Hub ids that name none).
    Returns (tokenizer, text_encoder), or (tokenizer, None) with with_text=False."""
    tok, text, _ = _build_tokenizer(resolve_tokenizer(ref, revision=revision), device, with_text)
    return tok, text


def load_generator(path, device="cpu", revision=None):
    """MaskGen (eval mode) from any reference in the module docstring (revision: for Hub ids).

    Returns LoadedGenerator(model, text, tokenizer, source, where); `tokenizer` is where
    the matching tokenizer is (None for official releases: pass --tokenizer).
    """
    src = resolve_generator(path, revision)
    model, source = _build_generator(src, device)
    return LoadedGenerator(model, src.text, src.tokenizer, source, src.where)


def generator_weights(path):
    """(state dict, where) of one of our MaskGen runs or checkpoint files (a bundle's generator
    part included): EMA weights when present, q/k/v fused. For train_maskgen.py --init_from."""
    src = resolve_generator(path)
    if src.kind == "official":
        raise ValueError(f"{src.where!r} is an official release; --init_from takes one of our MaskGen runs or checkpoints")
    return official.fuse_qkv(_weights(src.ckpt, src.where)[0]), src.where  # fuse: older runs kept q/k/v apart


# -----------------------------------------------------------------------------
# Pairing checks.


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


def _resolve_pair(generator, tokenizer, revision=None, gen=None):
    """Both configs, read and checked to fit. An explicit tokenizer wins; otherwise the one
    the generator records (our runs, bundles). gen: the generator's Source, if resolved."""
    gen = gen or resolve_generator(generator, revision)
    src = resolve_tokenizer(tokenizer, revision=revision) if tokenizer is not None else resolve_tokenizer(gen.tokenizer, gen)
    check_pair(src.config, gen.config, src.where, gen.where)
    return gen, src


def load_models(generator=None, tokenizer=None, device="cpu", revision=None):
    """Load and cross-check the generator, its tokenizer and their text encoder(s).

    With neither path, the shipped checkpoints/shapes.pt is used. For our runs and the
    bundle, the tokenizer may be omitted: the generator knows its tokenizer. revision: the
    Hub revision for generator / tokenizer Hub ids that name none (owner/name@rev does).
    """
    if generator is None:
        if tokenizer is not None:
            raise ValueError("--tokenizer was given without --generator; pass the MaskGen checkpoint as --generator too")
        generator = default_checkpoint("no checkpoint given")
    gen, src = _resolve_pair(generator, tokenizer, revision)  # before building anything big
    # Only now build the models and the text encoder(s) (possibly a CLIP download).
    gen_model, gen_source = _build_generator(gen, device)
    tok, tok_text, tok_source = _build_tokenizer(src, device)
    # One text encoder serves both models unless the generator was trained with another.
    if _same_text(gen.text, src.text):
        gen_text = tok_text
    else:
        print(f"note: the generator's text encoder {gen.text.name!r} differs from the tokenizer's {src.text.name!r}; using both")
        gen_text = build_text_encoder(*gen.text, gen.where).to(device)
    check_text(gen.config, src.config, gen_text, tok_text, gen.where, src.where)
    return Models(gen_model, tok, gen_text, tok_text, gen_source, tok_source)


# The generate() defaults a bundle may change (`sample.py bundle --sampling K=V`): the sampling
# settings are often tuned after training, and they change no weight.
SAMPLING_FIELDS = ("num_steps", "guidance_scale", "guidance_schedule", "randomize_temperature", "temperature")


def sampling_overrides(pairs, config):
    """["guidance_scale=2", ...] -> {field: value}, typed like MaskGenConfig's fields and
    checked here, not at sampling: a number as generate() checks it, a schedule by building
    the config it changes ("temperature=none" restores VQ's annealed default)."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or key not in SAMPLING_FIELDS:
            raise ValueError(f"--sampling {pair!r}: give KEY=VALUE with KEY one of {', '.join(SAMPLING_FIELDS)}")
        kind = {"num_steps": int, "guidance_schedule": str}.get(key, float)
        try:
            out[key] = None if key == "temperature" and value == "none" else kind(value)
        except ValueError:
            raise ValueError(f"--sampling {pair!r}: {value!r} is not a{'n int' if kind is int else ' number'}") from None
    for key, value in out.items():
        if key != "guidance_schedule":
            M.check_number(key, value, positive=key == "num_steps")
    M.MaskGenConfig(**{**config, **out})  # its own checks (e.g. a schedule this mode lacks)
    return out


def write_bundle(generator, tokenizer, out, fp32=False, overwrite=False, sampling=None):
    """One self-contained file with our generator's and its tokenizer's EMA weights, configs
    and small text tower (how checkpoints/shapes.pt is made). Weights are stored in fp16
    unless fp32; they are loaded back into fp32 models. sampling: ["KEY=VALUE", ...] new
    generate() defaults (SAMPLING_FIELDS) for the bundle's generator config. An existing
    `out` is replaced only with overwrite; the file appears whole or not at all."""
    check_out_file(out, overwrite)  # before any work
    gen, src = _resolve_pair(generator, tokenizer)
    if gen.kind != "ckpt" or src.kind != "ckpt":
        raise ValueError("bundle packs our own runs; official releases are already self-contained directories")
    gen_config = {**gen.ckpt["maskgen_config"], **sampling_overrides(sampling, gen.ckpt["maskgen_config"])}

    def small(sd):
        return {k: v.half() if v.is_floating_point() and not fp32 else v for k, v in sd.items()}

    tok, gen_ck = src.ckpt, gen.ckpt
    bundle = {
        "tokenizer": {"tokenizer_config": tok["tokenizer_config"], "ema": small(_weights(tok, src.where)[0]),
                      "config": tok["config"], "text_encoder": small(tok["text_encoder"]) if tok.get("text_encoder") else None},
        "generator": {"maskgen_config": gen_config, "ema": small(_weights(gen_ck, gen.where)[0]),
                      "config": gen_ck["config"]},
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, lambda f: torch.save(bundle, f))  # a crash never leaves a half-written bundle
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) from {gen.where} + {src.where}")
    return out


# -----------------------------------------------------------------------------
# Exporting to the release layout, and recording references.


def _usable_text(text):
    """Can this TextSpec rebuild its encoder? A random tower needs its weights."""
    return text.name is not None and (text.state is not None or text.name not in TEXT_PRESETS)


def export_release(ref, out, which=None, tokenizer=None, overwrite=False, revision=None):
    """Write a model from `ref` (a run folder, checkpoint file, bundle, or release) in the
    official release layout, which from_official and the official code read. EMA weights
    when present, as the samplers use. which: "tokenizer" | "generator" | "both" (default:
    both for a generator or bundle, the tokenizer for a tokenizer); tokenizer: the
    generator's tokenizer when it records none. One model fills `out` itself; both go to
    out/generator and out/tokenizer. A text encoder other than the official CLIP is
    recorded in config.json ("text_encoder"), with a random tower's weights in
    text_encoder.safetensors. Returns {role: directory}."""
    if which not in (None, "tokenizer", "generator", "both"):
        raise ValueError(f"--which must be tokenizer, generator or both, got {which!r}")
    check_out_dir(out, overwrite)  # before any work
    kind, payload, where = opened = _open_checkpoint(ref, "export", revision)
    role = _official_role(official.read_config(where)) if kind == "official" else _file_role(payload)
    if role == "unknown":
        raise ValueError(f"{where!r} is neither a TA-TiTok nor a MaskGen checkpoint (keys: {sorted(payload)[:10]})")
    which = which or ("tokenizer" if role == "tokenizer" else "both")
    if role == "tokenizer" and which != "tokenizer":
        raise ValueError(f"{where!r} is a TA-TiTok tokenizer; it holds no generator: use --which tokenizer")
    gen = tok = None
    if role == "tokenizer":
        tok = _tokenizer_source(*opened)
    else:
        gen = _generator_source(*opened)
        if which != "generator" or tokenizer is not None or gen.tokenizer is not None:  # its text encoder too
            tok = _resolve_pair(None, tokenizer, revision, gen)[1]
    parts = {}  # role -> (Source, the TextSpec to record)
    if tok is not None and which != "generator":
        parts["tokenizer"] = (tok, tok.text)
    if gen is not None and which != "tokenizer":
        # A generator that records no text encoder, or a bundle's (its tower is stored once,
        # with the tokenizer), was trained with its tokenizer's.
        parts["generator"] = (gen, tok.text if tok is not None and _same_text(gen.text, tok.text) else gen.text)
    for role, (src, text) in parts.items():
        if not _usable_text(text):
            raise ValueError(f"the {role} {src.where!r} does not record the text encoder it was trained with (or a "
                             f"random tower's weights); pass --tokenizer, the TA-TiTok run it was trained with")  # fmt: skip

    def write(tmp):
        for role, (src, text) in parts.items():  # built one at a time: one model in memory
            model = _build_tokenizer(src, "cpu", with_text=False)[0] if role == "tokenizer" else _build_generator(src, "cpu")[0]
            d = os.path.join(tmp, role) if len(parts) > 1 else tmp
            extra = {} if text == OFFICIAL_TEXT else {"text_encoder": {"name": text.name, "pretrained": text.pretrained}}
            official.save(model, d, **extra)
            if text.state is not None:
                save_file({k: v.contiguous().clone() for k, v in text.state.items()}, os.path.join(d, TEXT_FILE))

    write_dir(out, write, overwrite)
    dirs = {role: os.path.join(out, role) if len(parts) > 1 else out for role in parts}
    for role, d in dirs.items():
        print(f"wrote the {role} release {d}/ from {where}; load it with --{role} {d}")
    return dirs


def record_ref(ref):
    """How to record a reference for later use (meta.json, configs): a Hub id as given,
    a local path made absolute."""
    return ref if official.hub_id(ref) else os.path.abspath(ref)


def is_release(ref, revision=None):
    """Is `ref` an official-layout release (a directory with config.json, or a Hub id of one)?"""
    return _release_dir(official.local_path(ref, revision))


def _release_dir(path):
    """A directory with config.json that is not one of our run folders (the trainers write a
    config.json of their own there, beside log.jsonl and ckpt_*.pt)."""
    run = os.path.isfile(os.path.join(path, "log.jsonl")) or run_checkpoints(path)
    return os.path.isfile(os.path.join(path, "config.json")) and not run

"""
The official release format, for both models: reading a released checkpoint
directory into our TA-TiTok / MaskGen, and writing one from them.

Paper: "Democratizing Text-to-Image Masked Generative Models with Compact
Text-Aware One-Dimensional Tokens" (Kim et al., arXiv 2501.07730). The authors
released TA-TiTok (§3.2) and MaskGen (§4.2) as Hugging Face repositories
(turkeyju/tokenizer_tatitok_*, turkeyju/generator_maskgen_*), each a directory with

    config.json         the official nested (OmegaConf) config: model.vq_model, model.maskgen, ...
    model.safetensors   the weights under the official code's names (or pytorch_model.bin)

Our modules hold the same weights under other names and, in places, other layouts:
TA-TiTok's 1x1 convs are Linears here, and MaskGen's separate q/k/v projections (diffusers'
`JointTransformerBlock`, see maskgen.py) are fused into one matrix per stream. This file is
the whole translation, so the model files hold only the models:

    Release(path, model)                 a release directory, read lazily (config, keys, shapes, tensors)
    tatitok_kwargs(d), maskgen_kwargs(d)  config.json -> keyword arguments of TATiTokConfig / MaskGenConfig
    load_weights(model, release)          copy a release's tensors into a model built from its config
    state_dict(model), config(model)      the inverse: our model -> release weights / config.json
    save(model, path)                     write a release directory
    split_qkv(sd), fuse_qkv(sd)           MaskGen's fused <-> separate q/k/v projections
    local_path(ref, revision)             a Hub id ('owner/name[@rev]') -> its downloaded snapshot directory

It does not import tokenizer.py or maskgen.py (they import it): models are told apart by
their config (a MaskGenConfig has `mode`, a TATiTokConfig `quantize_mode`).
"""

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import mismatch_error, torch_load

# -----------------------------------------------------------------------------
# Reading a release directory, lazily.

_EXAMPLE = {"TA-TiTok": "tokenizer_tatitok_bl32_vq", "MaskGen": "generator_maskgen_vq_l"}


class Release:
    """A released directory: .config (the config.json dict), .keys, .shape(key), .get(key).

    Tensors are read one at a time when asked for (safetensors: straight from the file;
    pytorch_model.bin: memory-mapped when the file allows it), so loading into a model
    holds one copy of the weights, which matters for the 1.1B-parameter MaskGen-XL.
    path may be a Hugging Face Hub id (see local_path; revision: for ids that name none).
    model ("TA-TiTok" or "MaskGen") only shapes the error messages.
    """

    def __init__(self, path, model="MaskGen", revision=None):
        path = local_path(path, revision, f"{model} checkpoint")
        self.path = path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{model} checkpoint directory {path!r} does not exist; download a release, e.g. "
                f"`hf download turkeyju/{_EXAMPLE[model]} --local-dir {path}` (`huggingface-cli download` before "
                f"huggingface_hub 1.0), or pass its Hub id turkeyju/{_EXAMPLE[model]}"
            )
        self.config_file = os.path.join(path, "config.json")
        if not os.path.isfile(self.config_file):
            raise FileNotFoundError(
                f"{path!r} has no config.json; a release directory holds config.json and model.safetensors"
            )
        self.config = read_config(self.config_file)
        st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st):
            self._st, self._sd = open_safetensors(st), None
            self.keys = list(self._st.keys())
        elif os.path.isfile(pt):
            self._st, self._sd = None, torch_load(pt)
            self.keys = list(self._sd.keys())
        else:
            raise FileNotFoundError(
                f"{path!r} has neither model.safetensors nor pytorch_model.bin; re-download the release"
            )

    def shape(self, key):
        return tuple(self._st.get_slice(key).get_shape()) if self._st is not None else tuple(self._sd[key].shape)

    def get(self, key):
        return self._st.get_tensor(key) if self._st is not None else self._sd[key]


def read_config(path):
    """A release's config.json (path: the file or its directory) -> dict. Anything else
    (empty, not JSON, not UTF-8, not an object) is a ValueError naming the file."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    fix = "re-download the release, or re-export it with `python sample.py export`"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (not UTF-8), so not a config.json; {fix}") from None
    if not text.strip():
        raise ValueError(f"{path} is empty (an interrupted download or copy?); {fix}")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}, not the object a config.json is; {fix}")
    return cfg


def open_safetensors(path):
    """safe_open(path), with a damaged or truncated file named in the error."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors' own error type: "Error while deserializing header: ..."
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it is damaged or incomplete: "
                         f"download or write it again") from None  # fmt: skip


def load_tensors(path):
    """Every tensor of a safetensors file, {name: tensor}."""
    f = open_safetensors(path)
    return {k: f.get_tensor(k) for k in f.keys()}


# -----------------------------------------------------------------------------
# TA-TiTok: names, layouts and config.json.

# The official ViT sizes, by name: (width, depth, heads).
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}

# Official name fragment -> ours. Everything else is already named the same.
TATITOK_RENAMES = [
    (".transformer.", ".blocks."),
    (".attn.in_proj_weight", ".attn.qkv.weight"),
    (".attn.in_proj_bias", ".attn.qkv.bias"),
    (".attn.out_proj.", ".attn.proj."),
    ("encoder.conv_out.", "encoder.proj_out."),
    ("decoder.ffn.0.", "decoder.to_pixels."),
]
# Their 1x1 convs on a fake (B, C, 1, K) grid, our Linears on (B, K, C): weights
# (out, in, 1, 1) there, (out, in) here.
_CONV_1X1 = ("encoder.conv_out.weight", "decoder.ffn.0.weight")


def _tatitok_name(key):
    """Our TA-TiTok key -> the official one ('encoder.blocks.0.attn.qkv.weight' ->
    'encoder.transformer.0.attn.in_proj_weight')."""
    for official, ours in TATITOK_RENAMES:
        key = key.replace(ours, official)
    return key


def _vit_arch(vq, side):
    """(width, depth, heads) from a named size, or from explicit fields for "custom"."""
    name = vq[f"vit_{side}_model_size"]
    if name == "custom":  # our extension, used by the tiny presets
        return tuple(vq[f"vit_{side}_{k}"] for k in ("width", "depth", "heads"))
    if name not in VIT_SIZES:
        raise ValueError(f"unknown vit_{side}_model_size {name!r}; expected one of {sorted(VIT_SIZES)}")
    return VIT_SIZES[name]


def tatitok_kwargs(d, path="config.json"):
    """The official TA-TiTok config.json dict -> TATiTokConfig(**kwargs)."""
    if "model" not in d and isinstance(d.get("config"), dict):  # a hub-mixin wrapper
        d = d["config"]
    try:
        vq, size = d["model"]["vq_model"], d["dataset"]["preprocessing"]["crop_size"]
        enc, dec = (_vit_arch(vq, side) for side in ("enc", "dec"))
        mode = {"vq": "vq", "vae": "kl"}[vq.get("quantize_mode", "vq")]
        kw = dict(
            image_size=size, enc_patch_size=vq["vit_enc_patch_size"], dec_patch_size=vq["vit_dec_patch_size"],
            enc_width=enc[0], enc_depth=enc[1], enc_heads=enc[2],
            dec_width=dec[0], dec_depth=dec[1], dec_heads=dec[2],
            num_latent_tokens=vq["num_latent_tokens"], quantize_mode=mode, token_size=vq["token_size"],
            text_context_length=vq.get("text_context_length", 77), text_embed_dim=vq.get("text_embed_dim", 768),
        )  # fmt: skip
        if mode == "vq":
            kw.update(codebook_size=vq["codebook_size"], commitment_cost=vq.get("commitment_cost", 0.25),
                      use_l2_norm=vq.get("use_l2_norm", False), clustering_vq=vq.get("clustering_vq", False))  # fmt: skip
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of the wrong kind
        what = f"missing field {e}" if isinstance(e, KeyError) else f"a field of the wrong kind ({e})"
        raise ValueError(f"{path} is not a TA-TiTok config: {what} (expected model.vq_model and "
                         f"dataset.preprocessing.crop_size)") from None  # fmt: skip
    if vq.get("is_legacy", True):
        # The legacy path reshapes the encoder output without a permute (a bug);
        # every released TA-TiTok config has is_legacy: False.
        raise ValueError(f"{path} has is_legacy: True; only is_legacy: False checkpoints are supported")
    if vq.get("finetune_decoder", False):
        raise ValueError(f"{path}: finetune_decoder: True (TiTok's two-stage decoder) is not part of TA-TiTok")
    return kw


def _tatitok_config(c):
    """A TATiTokConfig -> config.json content; tatitok_kwargs inverts it."""
    vq = dict(
        quantize_mode="vq" if c.quantize_mode == "vq" else "vae", token_size=c.token_size,
        vit_enc_patch_size=c.enc_patch_size, vit_dec_patch_size=c.dec_patch_size,
        num_latent_tokens=c.num_latent_tokens, finetune_decoder=False, is_legacy=False,
        text_context_length=c.text_context_length, text_embed_dim=c.text_embed_dim,
    )  # fmt: skip
    for side in ("enc", "dec"):
        arch = tuple(getattr(c, f"{side}_{k}") for k in ("width", "depth", "heads"))
        names = [n for n, a in VIT_SIZES.items() if a == arch]
        if names:
            vq[f"vit_{side}_model_size"] = names[0]
        else:  # not an official size (e.g. the tiny presets): spell it out
            vq[f"vit_{side}_model_size"] = "custom"
            vq.update({f"vit_{side}_{k}": v for k, v in zip(("width", "depth", "heads"), arch)})
    if c.quantize_mode == "vq":
        vq.update(codebook_size=c.codebook_size, commitment_cost=c.commitment_cost,
                  use_l2_norm=c.use_l2_norm, clustering_vq=c.clustering_vq)  # fmt: skip
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": c.image_size}}}


# -----------------------------------------------------------------------------
# MaskGen: names, the q/k/v layout and config.json.
#
# Official key -> ours. Top level, per variant (an entry ending in "." is a prefix):
OFFICIAL_RENAMES = {
    "vq": [
        ("text_embed_proj.", "trunk.text_proj."),
        ("cond_pooled_proj.", "trunk.pooled_proj."),
        ("blocks.", "trunk.blocks."),
        ("norm.linear.", "trunk.norm_out.linear."),
        ("embeddings.weight", "tok_emb.weight"),
        ("pos_embed", "pos_emb"),
    ],
    "kl": [
        ("text_emb.", "trunk.text_proj."),
        ("text_pooled_emb.", "trunk.pooled_proj."),
        ("decoder_blocks.", "trunk.blocks."),
        ("decoder_norm.linear.", "trunk.norm_out.linear."),
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
    fused layout. MaskGen trunk keys held at the top level (text_proj., pooled_proj.,
    blocks., norm_out.: checkpoints written before the trunk was its own module) gain the
    "trunk." prefix. Anything else, including an incomplete set of parts, passes unchanged."""
    out, groups = {}, {}
    top = ("text_proj.", "pooled_proj.", "blocks.", "norm_out.")
    sd = {("trunk." + k if k.startswith(top) else k): t for k, t in sd.items()}
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


def ours_to_official(key, mode):
    """Our key (q/k/v split) -> the official one, or None for state we hold that checkpoints do not."""
    inverse = [(b, a) for a, b in OFFICIAL_RENAMES[mode]]
    if key.startswith("trunk.blocks."):
        i, _, inner = key[len("trunk.blocks.") :].partition(".")
        inner = _rename(inner, [(b, a) for a, b in BLOCK_RENAMES])
        return None if inner is None else _rename(f"trunk.blocks.{i}.{inner}", inverse)
    return _rename(key, inverse)


def maskgen_kwargs(d, path="config.json"):
    """The official MaskGen config.json dict -> MaskGenConfig(**kwargs)."""
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
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of the wrong kind
        what = f"missing field {e}" if isinstance(e, KeyError) else f"a field of the wrong kind ({e})"
        raise ValueError(
            f"{path} is not a MaskGen config.json: {what} (expected model.vq_model, model.maskgen, losses)"
        ) from None
    return kw


def _maskgen_config(c):
    """A MaskGenConfig -> config.json content; maskgen_kwargs inverts it."""
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
        losses = dict(diffloss_d=c.diffloss_depth, diffloss_w=c.diffloss_width, num_sampling_steps=c.num_sampling_steps)
    return {
        "model": {"vq_model": vq_model, "maskgen": maskgen},
        "losses": losses,
        "dataset": {"preprocessing": {"crop_size": 256}},
    }


def _last_q_proj(c):
    """The release name of MaskGen's last-block text-query projection, which we do not
    hold (the last block's text stream only gives keys and values, see maskgen.JointAttention)."""
    return f"{'blocks' if c.mode == 'vq' else 'decoder_blocks'}.{c.depth - 1}.attn.add_q_proj"


# -----------------------------------------------------------------------------
# Both models: our weights seen under their release names; loading and writing.


def _is_maskgen(model):
    return hasattr(model.config, "mode")  # MaskGenConfig.mode; a TATiTokConfig has quantize_mode


def _release_view(model):
    """{official key: the model's tensor in the release's shape}. The tensors are views of
    the model's weights, so copying into one loads it: MaskGen's q, k and v are row blocks
    of the fused projections, TA-TiTok's 1x1-conv weights (out, in, 1, 1) views of Linears."""
    if _is_maskgen(model):
        pairs = ((ours_to_official(k, model.config.mode), v) for k, v in split_qkv(model.state_dict()).items())
        return {key: v for key, v in pairs if key is not None}  # None: state the releases do not hold
    view = {}
    for k, v in model.state_dict().items():
        key = _tatitok_name(k)
        view[key] = v[:, :, None, None] if key in _CONV_1X1 else v
    return view


def load_weights(model, release):
    """Copy the weights of `release` (a Release) into `model` (built from its config), one
    tensor at a time. Every missing, unexpected or mis-shaped key is reported by its
    release name before anything is copied. Returns the model."""
    view, skip, alias = _release_view(model), set(), {}
    if _is_maskgen(model):
        what = f"MaskGen-{model.config.mode.upper()}"
        # Not loaded on purpose: the last block's text queries (unused), and the tied LM
        # head, which is the embedding table itself. safetensors keeps one name for shared
        # tensors; only if that name is lm_head.weight is it read, as the table.
        skip = {f"{_last_q_proj(model.config)}.weight", f"{_last_q_proj(model.config)}.bias"}
        if model.config.mode == "vq":
            if "embeddings.weight" in release.keys:
                skip.add("lm_head.weight")
            else:
                alias["lm_head.weight"] = "embeddings.weight"
    else:
        what = "TA-TiTok"
    found, unexpected, shapes, misfit = {}, [], [], set()
    for key in release.keys:
        if key in skip:
            continue
        name = alias.get(key, key)
        if name not in view:
            unexpected.append(key)
        elif release.shape(key) != tuple(view[name].shape):
            shapes.append(f"{key}: checkpoint {release.shape(key)} vs model {tuple(view[name].shape)}")
            misfit.add(name)
        else:
            found[name] = key
    missing = [k for k in view if k not in found and k not in misfit]
    err = mismatch_error(
        release.path, missing, unexpected, shapes, model=f"the {what} model its config.json describes",
        fix="Fix: use the config.json that was released with these weights (same variant and size); "
        "a directory written by this project must use official key names (official.state_dict).",
    )  # fmt: skip
    if err is not None:
        raise err
    with torch.no_grad():  # tensor by tensor: one copy of the weights in memory
        for name, key in found.items():
            view[name].copy_(release.get(key))
    return model


def state_dict(model):
    """Our weights under the release's names and shapes (the inverse of load_weights), as
    copies (safetensors refuses tensors that share storage). MaskGen's unused last-block
    text-query projection is written as zeros so the official code can load the result
    strictly; its tied lm_head is left out, as in the released model.safetensors."""
    out = {k: v.clone() for k, v in _release_view(model).items()}
    if _is_maskgen(model):
        c, ref = model.config, model.trunk.blocks[-1].attn.txt_kv.weight
        out[f"{_last_q_proj(c)}.weight"] = torch.zeros(c.width, c.width, dtype=ref.dtype, device=ref.device)
        out[f"{_last_q_proj(c)}.bias"] = torch.zeros(c.width, dtype=ref.dtype, device=ref.device)
    return out


def config(model):
    """config.json content in the official (OmegaConf) layout."""
    return _maskgen_config(model.config) if _is_maskgen(model) else _tatitok_config(model.config)


def save(model, path, **extra):
    """Write `model` as a release directory (config.json + model.safetensors); returns path.
    extra: more top-level config.json entries (load.py records a text encoder this way)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config(model), **extra}, f, indent=2)
    save_file({k: v.contiguous() for k, v in state_dict(model).items()}, os.path.join(path, "model.safetensors"))
    return os.fspath(path)


# -----------------------------------------------------------------------------
# Hugging Face Hub ids. The releases live on the Hub (turkeyju/...), so wherever a release
# directory is accepted, so is its id: huggingface_hub (installed with open_clip) fetches
# it once into its cache, and the snapshot directory there is read like any other.

# owner/name, optionally with open_clip's "hf-hub:" before and "@revision" after (a branch,
# tag or commit; it may hold slashes itself, e.g. refs/pr/1).
_HUB_ID = re.compile(r"(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(.+))?")
_FILE_EXTS = (".pt", ".pth", ".bin", ".safetensors", ".json")  # 'runs/ckpt.pt' is a missing file, not an id


class HubError(FileNotFoundError):
    """A Hub id that could not be fetched; the message says what was tried and what to do."""


def hub_id(ref):
    """(repo_id, revision or None) when `ref` names a Hub repository, else None. A local
    path always wins: a path that exists is no id, nor is 'runs/x' when the folder runs/
    exists (a typo under a local folder stays a missing path), nor a file name."""
    if not isinstance(ref, (str, os.PathLike)):
        return None
    ref = os.fspath(ref)
    m = _HUB_ID.fullmatch(ref)
    if m is None or os.path.exists(ref) or m[1].endswith(_FILE_EXTS):
        return None
    if not ref.startswith("hf-hub:") and os.path.isdir(m[1].split("/")[0]):
        return None
    return m[1], m[2]


def local_path(ref, revision=None, what="checkpoint"):
    """`ref` as a local path: unchanged unless it is a Hub id (hub_id), which becomes the
    directory of its snapshot, downloaded by huggingface_hub.snapshot_download or found in
    the Hub cache (only there when HF_HUB_OFFLINE is set). revision: for ids that name
    none. A failure raises HubError naming the id, the revision, what was tried and the fix."""
    hub = hub_id(ref)
    if hub is None:
        return ref
    repo_id, rev = hub[0], hub[1] or revision
    from huggingface_hub import constants, snapshot_download  # here: only Hub ids need it

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(repo_id, revision=rev, local_files_only=offline)
    except Exception as e:  # the hub's errors, told apart by name (their module moved between versions)
        raise HubError(_hub_failure(ref, repo_id, rev, e, what, constants)) from None


def _hub_failure(ref, repo_id, rev, e, what, constants):
    """The message for a Hub id that could not be fetched (see local_path)."""
    names, offline = {c.__name__ for c in type(e).__mro__}, bool(constants.HF_HUB_OFFLINE)
    at = f"revision {rev!r}" if rev else "its main branch"
    if "RevisionNotFoundError" in names:
        why = f"the repository has no {at}"
    elif "GatedRepoError" in names:
        why = "the repository is gated: accept its terms on huggingface.co, then log in with `hf auth login`"
    elif "RepositoryNotFoundError" in names:
        why = "the Hub has no such repository (or it is private: log in with `hf auth login`)"
    elif offline:
        why = f"HF_HUB_OFFLINE is set and the Hub cache holds no snapshot of {at}"
    elif names & {"LocalEntryNotFoundError", "IncompleteSnapshotError"}:
        why = f"the Hub could not be reached (no network?) and the Hub cache holds no complete snapshot of {at}"
    else:
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no details'}"
    tried = f"the local path {os.path.abspath(ref)!r}, the Hub cache {constants.HF_HUB_CACHE}"
    tried += "" if offline else f", the Hub at {constants.ENDPOINT}"
    get = f"hf download {repo_id}" + (f" --revision {rev}" if rev else "") + " --local-dir DIR"
    return (
        f"{what} {ref!r} is not a local path, and as the Hugging Face Hub id {repo_id!r} ({at}) it could not be "
        f"fetched: {why}. Tried: {tried}. Fix: download it where there is network, `{get}` (`huggingface-cli "
        f"download` before huggingface_hub 1.0), and pass DIR"
        + ("; or unset HF_HUB_OFFLINE to let it download" if offline else "")
        + "; or, if a local path was meant, correct it."
    )

"""Hugging Face config translation: original <-> native <-> :class:`InternVLConfig`, in one place.

Three forms of one architecture:

* *original*: the remote-code ``InternVLChatConfig`` dict (``vision_config`` + ``llm_config``);
* *native*: the transformers ``InternVLConfig`` dict (``vision_config`` + ``text_config``);
* ours: :class:`~megatron_mpo.models.config.InternVLConfig`.

The original form reaches ours only through the native one, so each field is read by one
reader::

    original --native_config_from_original--> native --internvl_config_from_native--> ours
    ours --to_native_hf_config--> native --original_config_from_native--> original

:func:`internvl_config_from_hf` takes either form. The LLM families' names in each form
come from :data:`~megatron_mpo.conversion.families.FAMILIES`.

Best effort where a form lacks a field: the native config has no home for the original's
``force_image_size`` other than ``image_seq_length`` (tokens per tile), so it is encoded
there and decoded back by :func:`internvl_config_from_native`; ``template``,
``dynamic_image_size``, ``use_thumbnail``, ``min/max_dynamic_patch`` are not part of the
native config and get InternVL2.5 defaults on the way back (override with keyword
arguments; the exporter passes the run's). The tiling keys an original config states are
kept in ours (``InternVLConfig.dynamic_image_size`` ...), outside the architecture. ``image_token_id`` is not stored in an original config.json (the remote code
reads it from the tokenizer): pass it, or it is taken from ``img_context_token_id`` when
present, else guessed by family -- check it against
``tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")``. With ``base`` (the config.json the
model was converted from), :func:`to_native_hf_config` keeps the fields that do not
describe the architecture (token ids, sliding-window settings, ...).

Over the package's ~500 lines on purpose: one module owns every config translation, so
a field's name in all three forms is read and written in this file only (the per-family
table it consults is :mod:`.families`, the tensor tables are :mod:`.native` and
:mod:`.original`).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Optional

from megatron_mpo.conversion.families import (
    FAMILIES,
    MOE_FIELDS,
    NATIVE_TEXT_TYPES,
    ORIGINAL_ARCHITECTURES,
    check_llm_supported,
    check_no_sliding_window,
    check_not_flash,
    moe_fields,
)
from megatron_mpo.conversion.hf_io import NATIVE_ARCH, ORIGINAL_ARCH
from megatron_mpo.errors import UserError
from megatron_mpo.models.config import QK_NORM_FAMILIES, InternVLConfig, LanguageConfig, VisionConfig

__all__ = [
    "internvl_config_from_hf",
    "internvl_config_from_native",
    "internvl_config_from_original",
    "to_native_hf_config",
    "native_config_from_original",
    "original_config_from_native",
    "detect_llm_family",
    "as_dict",
    "vision_norm_type",
    "square",
    "shuffle_factor",
]

# Defaults of the remote-code InternVisionConfig (used only for keys a config.json lacks).
_INTERN_VISION_DEFAULTS = {
    "num_channels": 3, "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
    "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48,
    "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "dropout": 0.0,
    "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 0.1,
}
_INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
_CHAT_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
# llm_config / text_config keys that belong to the remote code or the loader, not the architecture.
_LOADER_KEYS = {
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "attn_implementation", "auto_map",
    "use_bfloat16", "use_flash_attn", "transformers_version", "architectures", "model_type", "torch_dtype",
    "dtype", "bias", "rope_theta", "rope_scaling", "rope_parameters",
}
_LLM_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# InternLM2 text keys carried between its remote-code config and a native llama one.
_INTERNLM2_KEYS = (("hidden_act", "silu"), ("initializer_range", 0.02), ("rms_norm_eps", 1e-6), ("use_cache", True),
                   ("pad_token_id", None), ("bos_token_id", None), ("eos_token_id", None))
# vision_config fields that differ between the forms at most by name: (native name, original
# name, native default); an original config lacking one gets InternViT-6B's (above).
_VISION_FIELDS = (
    ("hidden_size", "hidden_size", 1024), ("num_hidden_layers", "num_hidden_layers", 24),
    ("num_attention_heads", "num_attention_heads", 16), ("intermediate_size", "intermediate_size", 4096),
    ("hidden_act", "hidden_act", "gelu"), ("layer_norm_eps", "layer_norm_eps", 1e-6),
    ("attention_bias", "qkv_bias", False), ("use_qk_norm", "qk_normalization", False),
    ("layer_scale_init_value", "initializer_factor", 0.1), ("initializer_range", "initializer_range", 0.02),
    ("num_channels", "num_channels", 3), ("attention_dropout", "attention_dropout", 0.0),
    ("projection_dropout", "dropout", 0.0),
)
# What the original InternViT always is, in native vision_config terms.
_NATIVE_VISION_FIXED = {"use_mask_token": False, "use_absolute_position_embeddings": True, "use_mean_pooling": True}
_NORMS = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}
_NORM_TYPES = {v: k for k, v in _NORMS.items()}
# base text_config keys replaced by ``rope_parameters`` (transformers 5 naming)
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


# ---- small readers ----------------------------------------------------------------------


def as_dict(config: Any) -> dict:
    """A config object (``to_dict``) or mapping as a plain dict of its own."""
    return config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def square(value: Any, what: str) -> int:
    """One side of a size that configs write as ``n`` or ``[n, n]``."""
    if isinstance(value, (list, tuple)):
        _check(len(set(value)) == 1, f"{what} must be square, got {list(value)}")
        value = value[0]
    return int(value)


def shuffle_factor(ratio: Any) -> int:
    """Patches merged per side by the pixel shuffle: ``1 / downsample_ratio``."""
    k = int(round(1 / float(ratio)))
    _check(abs(1 / k - float(ratio)) <= 1e-9, f"downsample_ratio must be 1/k for an integer k, not {ratio}")
    return k


def vision_norm_type(name: Any) -> str:
    _check(name in _NORMS, f"vision_config.norm_type must be layer_norm or rms_norm, not {name!r}")
    return name


def _rope(text: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    """(rope_theta, the scaling beyond it as written, or None for plain RoPE), from
    transformers 5's ``rope_parameters`` or the legacy ``rope_theta`` + ``rope_scaling``."""
    params = dict(text.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", text.get("rope_theta", 10000.0)))
    if not params:
        params = dict(text.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, (None if kind == "default" else params)


def _rope_kind(scaling: Optional[Mapping[str, Any]]) -> tuple[str, dict]:
    """(kind, the other fields) of a scaling dict, either spelling of the kind's key."""
    rest = dict(scaling or {})
    kind = rest.pop("rope_type", None) or rest.pop("type", None) or "default"
    rest.pop("type", None)
    return kind, rest


def _rope_parameters(theta: float, scaling: Optional[Mapping[str, Any]]) -> dict:
    """transformers 5's ``rope_parameters``."""
    kind, rest = _rope_kind(scaling)
    return {"rope_type": kind, **rest, "rope_theta": float(theta)}


# ---- either form -> ours --------------------------------------------------------------


def internvl_config_from_hf(hf: Any) -> InternVLConfig:
    """Ours from a transformers ``InternVLConfig`` (object or ``to_dict()``) or from an
    original ``InternVLChatConfig`` dict (through :func:`native_config_from_original`).

    A native config is read as its ``vision_config`` states the image size
    (``image_seq_length`` is not consulted: transformers writes its default of 256 for any
    size); :func:`internvl_config_from_native` decodes it for converted directories."""
    data = as_dict(hf)
    if "llm_config" in data:
        config, _ = internvl_config_from_original(data)
        config.name = data.get("_name_or_path", "") or ""
        return config
    return _from_native(data)


def internvl_config_from_original(original: Any, *,
                                  image_token_id: Optional[int] = None) -> tuple[InternVLConfig, dict]:
    """(ours, the native config dict) of an original ``InternVLChatConfig`` dict; ours also
    states the tiling the dict states (``dynamic_image_size``, ``use_thumbnail``,
    ``min/max_dynamic_patch``: InternVL's trainer writes what it trained with)."""
    from megatron_mpo.data.tile_settings import CHECKPOINT_NAMES, check_stated_tiling

    cfg = as_dict(original)
    check_not_flash(cfg)
    native = native_config_from_original(cfg, image_token_id=image_token_id)
    config = internvl_config_from_native(native, family=detect_llm_family(cfg))
    for name in CHECKPOINT_NAMES.values():
        setattr(config, name, cfg.get(name))
    check_stated_tiling(config, "config.json ")
    return config, native


def internvl_config_from_native(native: Mapping[str, Any], family: Optional[str] = None) -> InternVLConfig:
    """Ours from a native config.json dict.

    An ``image_seq_length`` that implies a tile size other than ``vision_config.image_size``
    (how the original ``force_image_size`` is encoded) becomes ``vision.image_size`` with
    the position table kept at its trained size; ``family`` overrides the LLM family
    (``internlm2`` for an original InternLM2 model, which the native layout stores as llama).
    """
    config = _from_native(dict(native))
    vis = config.vision
    seq = native.get("image_seq_length")
    if seq:
        k, p = config.shuffle_factor, vis.patch_size
        side = math.isqrt(int(seq)) * k * p
        if side * side == int(seq) * k * k * p * p and side != vis.image_size:
            vis.pos_embed_image_size = vis.pos_embed_image_size or vis.image_size
            vis.image_size = side
    if family is not None:
        config.language.family = family
    return config.validate()


def _from_native(data: dict) -> InternVLConfig:
    check_not_flash(data)
    vis = data.get("vision_config") or {}
    text = data.get("text_config") or {}
    _check(vis.get("use_mean_pooling", True),
           "vision_config.use_mean_pooling=False (final vision norm) is not supported")
    _check(data.get("vision_feature_layer", -1) == -1, "only vision_feature_layer -1 is supported")
    _check(data.get("vision_feature_select_strategy", "default") == "default",
           "only vision_feature_select_strategy 'default' (drop the CLS token) is supported")
    vision = VisionConfig(
        image_size=square(vis.get("image_size", 448), "vision_config.image_size"),
        patch_size=square(vis.get("patch_size", 14), "vision_config.patch_size"),
        hidden_size=vis.get("hidden_size", 1024),
        num_layers=vis.get("num_hidden_layers", 24),
        num_heads=vis.get("num_attention_heads", 16),
        ffn_hidden_size=vis.get("intermediate_size", 4096),
        norm=_NORMS.get(vis.get("norm_type", "layer_norm"), vis.get("norm_type")),
        norm_eps=vis.get("layer_norm_eps", 1e-6),
        qkv_bias=bool(vis.get("attention_bias", False)),
        qk_norm=bool(vis.get("use_qk_norm", False)),
        layer_scale_init=vis.get("layer_scale_init_value", 0.1),
        act=vis.get("hidden_act", "gelu"),
    )
    family = text.get("model_type", "qwen2")
    check_llm_supported(family)
    _check(family in NATIVE_TEXT_TYPES,
           f"text model type {family!r} is not supported ({', '.join(NATIVE_TEXT_TYPES)})")
    _check(not text.get("mlp_bias", False), "text_config.mlp_bias=True is not supported")
    _check(not (family in ("llama", "internlm3") + QK_NORM_FAMILIES and text.get("attention_bias", False)),
           f"{family} attention_bias=True is not supported")
    check_no_sliding_window(text, "text_config")
    theta, scaling = _rope(text)
    heads = text.get("num_attention_heads", 32)
    hidden = text.get("hidden_size", 4096)
    head_dim = text.get("head_dim")
    language = LanguageConfig(
        family=family,
        vocab_size=text.get("vocab_size", 151655),
        hidden_size=hidden,
        num_layers=text.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        ffn_hidden_size=text.get("intermediate_size", 11008),
        rope_theta=theta,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        qkv_bias=family == "qwen2",
        qk_norm=family in QK_NORM_FAMILIES,
        tie_embeddings=bool(data.get("tie_word_embeddings", True)),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        head_dim=None if head_dim in (None, hidden // heads) else head_dim,
        rope_scaling=scaling,
        **moe_fields(text),
    )
    return InternVLConfig(
        vision=vision,
        language=language,
        downsample_ratio=data.get("downsample_ratio", 0.5),
        img_context_token_id=data.get("image_token_id", FAMILIES[family].image_token),
        projector_act=data.get("projector_hidden_act", "gelu"),
        name=data.get("_name_or_path", "") or "",
    ).validate()


# ---- ours -> native ---------------------------------------------------------------------


def _merge(base: Optional[Mapping[str, Any]], generated: Mapping[str, Any], drop: tuple = ()) -> dict:
    out = {k: copy.deepcopy(v) for k, v in (base or {}).items() if k not in drop}
    out.update(copy.deepcopy(dict(generated)))
    return out


def to_native_hf_config(config: InternVLConfig, base: Optional[Mapping[str, Any]] = None,
                        dtype: Optional[str] = None) -> dict:
    """Ours -> the config.json dict of ``InternVLForConditionalGeneration``.

    Architecture fields always come from ``config``; ``base`` (a native config.json dict,
    e.g. the one the model was converted from) contributes every other field. InternLM2
    LLMs become a ``llama`` text model (same maths, split q/k/v). ``dtype`` is written as
    the checkpoint dtype (``float32``, ``bfloat16``, ...).
    """
    vis, lang = config.vision, config.language
    base = dict(base or {})
    pos_size = vis.pos_embed_image_size or vis.image_size
    vision = {
        "model_type": "internvl_vision",
        "hidden_size": vis.hidden_size,
        "num_hidden_layers": vis.num_layers,
        "num_attention_heads": vis.num_heads,  # real heads: zero padding is megatron-only
        "intermediate_size": vis.ffn_hidden_size,
        "hidden_act": vis.act,
        "norm_type": _NORM_TYPES[vis.norm],
        "layer_norm_eps": vis.norm_eps,
        "attention_bias": bool(vis.qkv_bias),
        "use_qk_norm": bool(vis.qk_norm),
        "layer_scale_init_value": vis.layer_scale_init,
        "image_size": [pos_size, pos_size],
        "patch_size": [vis.patch_size, vis.patch_size],
        "num_channels": 3,
        **_NATIVE_VISION_FIXED,
    }
    for key, default in (("attention_dropout", 0.0), ("projection_dropout", 0.0),
                         ("hidden_dropout_prob", 0.0), ("initializer_range", 0.02)):
        vision.setdefault(key, (base.get("vision_config") or {}).get(key, default))
    family = FAMILIES[lang.family]
    text = {
        "model_type": family.native_type,
        "vocab_size": lang.vocab_size,
        "hidden_size": lang.hidden_size,
        "intermediate_size": lang.ffn_hidden_size,
        "num_hidden_layers": lang.num_layers,
        "num_attention_heads": lang.num_heads,
        "num_key_value_heads": lang.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": lang.max_position_embeddings,
        "rms_norm_eps": lang.rms_norm_eps,
        "rope_parameters": _rope_parameters(lang.rope_theta, lang.rope_scaling),
        "tie_word_embeddings": bool(lang.tie_embeddings),
    }
    if lang.head_dim is not None or family.explicit_fields:
        text["head_dim"] = lang.kv_channels
    if family.explicit_fields:
        text["attention_bias"] = False
        text["mlp_bias"] = False
    if lang.is_moe:
        text.update({key: copy.deepcopy(getattr(lang, key)) for key in MOE_FIELDS})
        text["num_local_experts"] = lang.num_experts  # transformers 5's own name for it
        text.pop("mlp_bias")
    base_text = dict(base.get("text_config") or {})
    if base_text.get("model_type", family.native_type) != family.native_type:
        base_text = {}  # a base for another text model says nothing about this one
    for key, default in (("use_cache", True), ("initializer_range", 0.02), ("attention_dropout", 0.0)):
        text.setdefault(key, base_text.get(key, default))
    top = {
        "architectures": [NATIVE_ARCH],
        "model_type": "internvl",
        "vision_config": _merge(base.get("vision_config"), vision),
        "text_config": _merge(base_text, text, drop=_ROPE_KEYS + ("torch_dtype", "dtype")),
        "image_token_id": int(config.img_context_token_id),
        "image_seq_length": config.tokens_per_tile,
        "downsample_ratio": config.downsample_ratio,
        "projector_hidden_act": config.projector_act,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": bool(lang.tie_embeddings),
    }
    out = _merge(base, top, drop=("torch_dtype", "dtype", "auto_map", "_name_or_path"))
    if dtype:
        out["dtype"] = dtype
    _check_roundtrip(config, out)
    return out


_ARCH_FIELDS_IGNORED = ("name", "template", "vision.num_padded_heads", "language.vocab_size_divisible_by",
                        "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch")


def _flat_arch(config: InternVLConfig) -> dict:
    data = config.to_dict()
    vis = data["vision"]
    vis["pos_embed_image_size"] = vis["pos_embed_image_size"] or vis["image_size"]
    flat = {}
    for key, value in data.items():
        if key in ("vision", "language"):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    for key in _ARCH_FIELDS_IGNORED:
        flat.pop(key, None)
    return flat


def _check_roundtrip(config: InternVLConfig, native: dict) -> None:
    """The written config must describe exactly the model we hold (else one clear line)."""
    family = config.language.family if config.language.family == "internlm2" else None
    ours, back = _flat_arch(config), _flat_arch(internvl_config_from_native(native, family=family))
    for key in sorted(ours):
        x, y = ours[key], back.get(key)
        same = x == y or (isinstance(x, (int, float)) and isinstance(y, (int, float)) and float(x) == float(y))
        if not same:
            raise UserError(
                f"this model cannot be expressed as a transformers InternVL config: {key} is {x!r} "
                f"but would be read back as {y!r}"
            )


# ---- original <-> native ----------------------------------------------------------------


def detect_llm_family(original_config: Mapping[str, Any]) -> str:
    """The LLM family of an original config (``llm_config.architectures``, else its
    ``model_type``); GPT-OSS and unknown LLMs are refused with one line."""
    llm = dict(original_config.get("llm_config") or {})
    if not llm:
        raise UserError("original InternVL config has no llm_config (is it an InternVLChatConfig?)")
    for name in list(llm.get("architectures") or []) + [llm.get("model_type")]:
        check_llm_supported(name)
    for arch in llm.get("architectures") or []:
        if arch in ORIGINAL_ARCHITECTURES:
            return ORIGINAL_ARCHITECTURES[arch]
    if llm.get("model_type") in FAMILIES:
        return llm["model_type"]
    raise UserError(
        f"LLM {llm.get('architectures') or llm.get('model_type')!r} in llm_config is not supported; "
        f"supported: {', '.join(ORIGINAL_ARCHITECTURES)}"
    )


def _llm_config(cfg: Mapping[str, Any]) -> dict:
    llm = dict(cfg.get("llm_config") or {})
    missing = [k for k in _LLM_REQUIRED if llm.get(k) is None]
    if missing:
        raise UserError(f"original InternVL config lacks llm_config.{missing[0]}")
    return llm


def native_config_from_original(original_config: Any, *, image_token_id: Optional[int] = None) -> dict:
    """``InternVLChatConfig`` dict -> transformers ``InternVLConfig`` dict (best effort)."""
    cfg = as_dict(original_config)
    family = detect_llm_family(cfg)
    vis = {**_INTERN_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    llm = _llm_config(cfg)
    _check(cfg.get("ps_version", "v1") == "v2",
           f"ps_version {cfg.get('ps_version', 'v1')!r}: the transformers-native InternVL only implements "
           "the v2 pixel shuffle")
    _check(not llm.get("bias", False), "llm_config.bias=True (InternLM2 with biased linears) is not supported")
    _check(not (family == "internlm3" and llm.get("qkv_bias", False)),
           "llm_config.qkv_bias=True (InternLM3 with q/k/v biases) is not supported")
    patch = square(vis["patch_size"], "vision_config.patch_size")
    pos_size = square(vis["image_size"], "vision_config.image_size")
    run_size = square(cfg.get("force_image_size") or pos_size, "force_image_size")
    ratio = float(cfg.get("downsample_ratio", 0.5))
    vision = {
        "model_type": "internvl_vision",
        **{n: bool(vis[o]) if isinstance(d, bool) else vis[o] for n, o, d in _VISION_FIELDS},
        "norm_type": vision_norm_type(vis["norm_type"]),
        "image_size": [pos_size, pos_size],
        "patch_size": [patch, patch],
        "hidden_dropout_prob": 0.0,
        **_NATIVE_VISION_FIXED,
    }
    theta, scaling = _rope(llm)
    tie = bool(llm.get("tie_word_embeddings", False))
    if family == "internlm2":
        heads = int(llm["num_attention_heads"])
        text = {
            "model_type": "llama",
            "vocab_size": llm["vocab_size"],
            "hidden_size": llm["hidden_size"],
            "intermediate_size": llm["intermediate_size"],
            "num_hidden_layers": llm["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": llm.get("num_key_value_heads") or heads,
            "head_dim": int(llm["hidden_size"]) // heads,
            "max_position_embeddings": llm.get("max_position_embeddings", 2048),
            **{key: llm.get(key, default) for key, default in _INTERNLM2_KEYS},
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
        }
    else:
        text = {k: v for k, v in llm.items() if k not in _LOADER_KEYS}
        text["model_type"] = FAMILIES[family].native_type
        if family == "internlm3":  # remote-code names -> transformers' InternLM3Config names
            text["attention_bias"] = bool(text.pop("qkv_bias", False))
            text["mlp_bias"] = bool(llm.get("bias", False))
    text["rope_parameters"] = _rope_parameters(theta, scaling)
    text["tie_word_embeddings"] = tie
    if image_token_id is None:
        image_token_id = cfg.get("img_context_token_id") or FAMILIES[family].image_token
    native = {
        "model_type": "internvl",
        "architectures": [NATIVE_ARCH],
        "vision_config": vision,
        "text_config": text,
        "image_token_id": int(image_token_id),
        "image_seq_length": (run_size // patch) ** 2 // shuffle_factor(ratio) ** 2,
        "downsample_ratio": ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": cfg.get("select_layer", -1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": tie,
    }
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or llm.get("torch_dtype")
    if dtype:
        native["dtype"] = str(dtype).replace("torch.", "")
    return native


def original_config_from_native(
    native_config: Any,
    llm_family: Optional[str] = None,
    *,
    template: str = "internvl2_5",
    dynamic_image_size: bool = True,
    use_thumbnail: bool = True,
    min_dynamic_patch: int = 1,
    max_dynamic_patch: int = 12,
) -> dict:
    """transformers ``InternVLConfig`` dict -> ``InternVLChatConfig`` dict (best effort; the
    keyword arguments are the pre/post-processing fields the native config lacks)."""
    cfg = as_dict(native_config)
    vis = dict(cfg.get("vision_config") or {})
    text = dict(cfg.get("text_config") or {})
    text_type = text.get("model_type", "qwen2")
    family = llm_family or text_type
    _check(family in FAMILIES, f"llm_family must be one of {', '.join(FAMILIES)}, not {family!r}")
    _check(FAMILIES[family].native_type == text_type,
           f"llm_family {family!r} needs a native {FAMILIES[family].native_type!r} text model, "
           f"but text_config.model_type is {text_type!r}")
    _check(cfg.get("vision_feature_select_strategy", "default") == "default",
           "only vision_feature_select_strategy 'default' (drop the CLS token) has an original layout")
    _check(vis.get("use_mean_pooling", True) and not vis.get("use_mask_token", False),
           "vision_config.use_mean_pooling=False / use_mask_token=True have no original layout")
    _check(vis.get("use_absolute_position_embeddings", True),
           "vision_config.use_absolute_position_embeddings=False has no original layout")
    patch = square(vis.get("patch_size", 14), "vision_config.patch_size")
    pos_size = square(vis.get("image_size", 448), "vision_config.image_size")
    ratio = float(cfg.get("downsample_ratio", 0.5))
    shuffle = shuffle_factor(ratio)
    seq = cfg.get("image_seq_length")
    run_size = pos_size
    if seq:
        side = math.isqrt(int(seq)) * shuffle * patch
        if side * side == int(seq) * shuffle**2 * patch**2:
            run_size = side
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        **{o: bool(vis.get(n, d)) if isinstance(d, bool) else vis.get(n, d) for n, o, d in _VISION_FIELDS},
        "norm_type": vision_norm_type(vis.get("norm_type", "layer_norm")),
        "image_size": pos_size,
        "patch_size": patch,
        "drop_path_rate": 0.0,
        "use_flash_attn": True,
    }
    theta, scaling = _rope(text)
    tie = bool(cfg.get("tie_word_embeddings", True))
    if family == "internlm2":
        heads = int(text.get("num_attention_heads", 32))
        hidden = int(text.get("hidden_size", 4096))
        _check(not (text.get("attention_bias") or text.get("mlp_bias")),
               "a llama text model with attention_bias/mlp_bias has no InternLM2 layout")
        _check(int(text.get("head_dim") or hidden // heads) * heads == hidden,
               "InternLM2 needs head_dim * num_attention_heads == hidden_size")
        llm = {
            "architectures": ["InternLM2ForCausalLM"],
            "auto_map": dict(_INTERNLM2_AUTO_MAP),
            "model_type": "internlm2",
            "bias": False,
            "vocab_size": text.get("vocab_size"),
            "hidden_size": hidden,
            "intermediate_size": text.get("intermediate_size"),
            "num_hidden_layers": text.get("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": text.get("num_key_value_heads") or heads,
            "max_position_embeddings": text.get("max_position_embeddings"),
            **{key: text.get(key, default) for key, default in _INTERNLM2_KEYS},
            "attn_implementation": "eager",
        }
    else:
        llm = {k: v for k, v in text.items() if k not in _LOADER_KEYS}
        llm["architectures"] = [FAMILIES[family].original_arch]
        llm["model_type"] = family
        if family == "internlm3":  # transformers' names -> the remote code's
            llm["qkv_bias"] = bool(llm.pop("attention_bias", False))
            llm["bias"] = bool(llm.pop("mlp_bias", False))
    llm["rope_theta"] = theta
    kind, rest = _rope_kind(scaling)
    # The remote code (InternLM2) reads rope_scaling["type"].
    llm["rope_scaling"] = None if scaling is None else {"type": kind, **rest}
    llm["tie_word_embeddings"] = tie
    original = {
        "architectures": [ORIGINAL_ARCH],
        "auto_map": dict(_CHAT_AUTO_MAP),
        "model_type": "internvl_chat",
        "vision_config": vision,
        "llm_config": llm,
        "downsample_ratio": ratio,
        "ps_version": "v2",
        "select_layer": cfg.get("vision_feature_layer", -1),
        "force_image_size": run_size,
        "template": template,
        "dynamic_image_size": dynamic_image_size,
        "use_thumbnail": use_thumbnail,
        "min_dynamic_patch": min_dynamic_patch,
        "max_dynamic_patch": max_dynamic_patch,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        # Not read by the remote code (it takes the id from the tokenizer); kept so the
        # native image_token_id survives a round trip.
        "img_context_token_id": cfg.get("image_token_id"),
    }
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype")
    if dtype:
        original["torch_dtype"] = str(dtype).replace("torch.", "")
        llm["torch_dtype"] = original["torch_dtype"]
    return original

"""Original remote-code InternVL layout <-> transformers-native layout (exact, pure tensors).

The *original* layout is what ``OpenGVLab/InternVL2-*`` (and 2.5 / 3 without ``-hf``)
ship: ``InternVLChatModel`` with ``trust_remote_code``. The *native* layout is the one
``transformers.InternVLForConditionalGeneration`` uses, which :mod:`.native` maps to
megatron. So ``original -> megatron`` is::

    native_sd, native_cfg = original_to_native(original_sd, original_config)
    mcore_sd = native.hf_to_megatron(native_sd, InternVLConfig.from_hf_config(native_cfg))

and ``megatron -> original`` is ``native.megatron_to_hf(..., layout="module")`` followed by
:func:`native_to_original`. Every tensor is copied bit-exactly (renames keep the very same
tensor object; split or packed tensors are fresh, contiguous, same dtype).

Tensor names (``N`` = layer; ``[..]`` only when the config has it)::

    original (InternVLChatModel.state_dict())            native (module names)
    vision_model.embeddings.class_embedding   [1,1,C]    model.vision_tower.embeddings.cls_token
    vision_model.embeddings.position_embedding [1,1+P,C] model.vision_tower.embeddings.position_embeddings
    vision_model.embeddings.patch_embedding.{weight,bias}  ...embeddings.patch_embeddings.projection.*
    vision_model.encoder.layers.N.                       model.vision_tower.encoder.layer.N.
      ls1 / ls2                                            lambda_1 / lambda_2
      norm1.{weight[,bias]} / norm2.*                      layernorm_before.* / layernorm_after.*
      attn.qkv.{weight[,bias]}  rows [Q; K; V]             attention.{q,k,v}_proj.*
      [attn.q_norm.weight / attn.k_norm.weight]            attention.q_norm.weight / k_norm.weight
      attn.proj.{weight,bias}                              attention.projection_layer.*
      mlp.fc1.* / mlp.fc2.*                                mlp.fc1.* / mlp.fc2.*
    mlp1.0.* / mlp1.1.* / mlp1.3.*                       model.multi_modal_projector.{layer_norm,linear_1,linear_2}.*
    language_model.model.X                               model.language_model.X'
    language_model.{output|lm_head}.weight               lm_head.weight

The two layouts have the same shapes for the class token ``[1, 1, C]`` and the position
embedding ``[1, 1 + (image_size/patch)^2, C]`` (``vision_config.image_size``, the size the
position table was trained for; ``force_image_size`` is only the run-time input size).

Language model, by family (``llm_config.architectures[0]``, else ``model_type``):

* ``internlm2`` (``InternLM2ForCausalLM``) becomes a native **llama** text model:
  ``tok_embeddings -> embed_tokens``, ``attention.wqkv -> self_attn.{q,k,v}_proj``,
  ``attention.wo -> self_attn.o_proj``, ``feed_forward.w1/w3/w2 -> mlp.gate/up/down_proj``,
  ``attention_norm -> input_layernorm``, ``ffn_norm -> post_attention_layernorm``,
  ``norm -> norm``, ``language_model.output -> lm_head``. ``wqkv`` is packed per KV group:
  viewed as ``[KV, G + 2, D, hidden]`` (``G = heads / KV``), rows ``[:G]`` are the
  group's queries, ``[-2]`` its key, ``[-1]`` its value.
* ``qwen2`` / ``qwen3`` / ``llama`` / ``internlm3`` / ``phi3``: the names are already the
  native ones (only the prefix changes); biases follow the config (Qwen2: q/k/v bias; Llama:
  ``attention_bias`` on q/k/v/o, ``mlp_bias``; Phi-3: fused ``qkv_proj`` / ``gate_up_proj``).
  Qwen3 (InternVL3.5, transformers' own ``Qwen3ForCausalLM`` in the remote code too) adds
  ``self_attn.{q,k}_norm.weight`` ``[head_dim]`` and states ``head_dim``; InternLM3
  (InternVL3-9B, ``InternLM3ForCausalLM`` remote code) has Llama names and an explicit
  ``head_dim`` and becomes a native ``internlm3`` text model (transformers runs it as Llama).

Tied embeddings (``tie_word_embeddings``): the original side omits the output matrix (as
``save_pretrained`` does) and accepts it when it equals the embedding; the native side
always carries ``lm_head.weight`` (the embedding tensor itself when tied), like
``InternVLForConditionalGeneration.state_dict()``. ``native_to_original`` also accepts the
checkpoint names ``save_pretrained`` writes (``vision_tower.*``, ``language_model.model.*``).
``rotary_emb.inv_freq`` buffers (old checkpoints) are derived from the config and dropped;
any other unexpected, missing or wrongly shaped tensor raises :class:`UserError`.

Configs (best effort; only the architecture fields matter for the weights):
:func:`native_config_from_original` / :func:`original_config_from_native` translate
``InternVLChatConfig`` <-> transformers ``InternVLConfig`` dicts. The native config has no
home for ``force_image_size`` other than ``image_seq_length`` (tokens per tile), so it is
encoded there and decoded back; ``template``, ``dynamic_image_size``, ``use_thumbnail``,
``min/max_dynamic_patch`` are not part of the native config and get InternVL2.5 defaults
on the way back (override with keyword arguments). ``image_token_id`` is not stored in an
original config.json (the remote code reads it from the tokenizer): pass it, or it is taken
from ``img_context_token_id`` when present, else guessed by family (InternLM2 92546,
otherwise 151667) -- check it against ``tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from megatron_mpo.conversion.native import normalize_hf_names
from megatron_mpo.errors import UserError
from megatron_mpo.conversion.experts import split_fused_experts
from megatron_mpo.models.config import (
    NATIVE_TEXT_TYPE,
    ORIGINAL_ARCHITECTURES,
    QK_NORM_FAMILIES,
    check_llm_supported,
    check_not_flash,
    moe_fields,
    moe_layer_flags,
)

__all__ = [
    "LLM_FAMILIES",
    "detect_llm_family",
    "original_to_native",
    "native_to_original",
    "native_config_from_original",
    "original_config_from_native",
]

LLM_FAMILIES = ("internlm2", "internlm3", "qwen2", "qwen3", "qwen3_moe", "llama", "phi3")

_FAMILY_TO_ARCH = {v: k for k, v in ORIGINAL_ARCHITECTURES.items()}

# <IMG_CONTEXT> id by LLM family when a config does not say (InternLM2 tokenizer; Qwen3's,
# whose <think> / </think> come before InternVL's tokens; else Qwen2 / Qwen2.5's).
_GUESSED_IMAGE_TOKEN = {"internlm2": 92546, "qwen3": 151671, "qwen3_moe": 151671}

# Defaults of the remote-code InternVisionConfig (used only for keys a config.json lacks).
_INTERN_VISION_DEFAULTS = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 0.1,
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

# Config keys that belong to the remote code / the loader, not to the architecture.
_LOADER_KEYS = {
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation_autoset",
    "attn_implementation",
    "auto_map",
    "use_bfloat16",
    "use_flash_attn",
    "transformers_version",
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "bias",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
}

# Native (module) prefixes and the names save_pretrained writes.
_NV = "model.vision_tower."
_NP = "model.multi_modal_projector."
_NL = "model.language_model."
_NHEAD = "lm_head.weight"


# ---- architecture ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    """What the tensor mapping needs to know, read from either config."""

    v_hidden: int
    v_layers: int
    v_heads: int
    v_ffn: int
    v_layer_norm: bool  # LayerNorm (weight + bias) vs RMSNorm (weight only)
    v_qkv_bias: bool
    v_qk_norm: bool
    v_channels: int
    patch: int
    pos_image_size: int  # image size the position table holds
    shuffle: int  # 1 / downsample_ratio
    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    attn_bias: bool  # q/k/v bias
    qk_norm: bool  # per-head q/k RMSNorm (Qwen3)
    o_bias: bool
    mlp_bias: bool
    tie: bool
    # Qwen3-MoE: experts per MoE layer, their FFN width, and which layers have them.
    experts: int = 0
    expert_ffn: int = 0
    moe_layers: tuple = ()

    @property
    def num_positions(self) -> int:
        return 1 + (self.pos_image_size // self.patch) ** 2


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserError(f"{what} must be square, got {list(value)}")
        value = value[0]
    return int(value)


def _as_dict(config: Any) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return copy.deepcopy(dict(config))


def detect_llm_family(original_config: Mapping[str, Any]) -> str:
    """One of :data:`LLM_FAMILIES` from an original ``llm_config``; Qwen3-MoE and GPT-OSS
    LLMs are refused with one line."""
    llm = dict(original_config.get("llm_config") or {})
    if not llm:
        raise UserError("original InternVL config has no llm_config (is it an InternVLChatConfig?)")
    for name in list(llm.get("architectures") or []) + [llm.get("model_type")]:
        check_llm_supported(name)
    for arch in llm.get("architectures") or []:
        if arch in ORIGINAL_ARCHITECTURES:
            return ORIGINAL_ARCHITECTURES[arch]
    if llm.get("model_type") in LLM_FAMILIES:
        return llm["model_type"]
    raise UserError(
        f"unsupported LLM {llm.get('architectures') or llm.get('model_type')!r} in llm_config; "
        f"supported: {', '.join(ORIGINAL_ARCHITECTURES)}"
    )


_LLM_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _llm_config(cfg: Mapping[str, Any]) -> dict:
    llm = dict(cfg.get("llm_config") or {})
    missing = [k for k in _LLM_REQUIRED if llm.get(k) is None]
    if missing:
        raise UserError(f"original InternVL config lacks llm_config.{missing[0]}")
    return llm


def _arch_from_original(cfg: Mapping[str, Any]) -> _Arch:
    vis = {**_INTERN_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    family = detect_llm_family(cfg)
    llm = _llm_config(cfg)
    if llm.get("bias", False):
        raise UserError("llm_config.bias=True (InternLM2 with biased linears) is not supported")
    if family == "internlm3" and llm.get("qkv_bias", False):
        raise UserError("llm_config.qkv_bias=True (InternLM3 with q/k/v biases) is not supported")
    heads = int(llm["num_attention_heads"])
    hidden = int(llm["hidden_size"])
    head_dim = hidden // heads if family == "internlm2" else int(llm.get("head_dim") or hidden // heads)
    attn_bias = family == "qwen2" or (family == "llama" and bool(llm.get("attention_bias", False)))
    return _Arch(
        v_hidden=int(vis["hidden_size"]),
        v_layers=int(vis["num_hidden_layers"]),
        v_heads=int(vis["num_attention_heads"]),
        v_ffn=int(vis["intermediate_size"]),
        v_layer_norm=_vision_norm(vis["norm_type"]) == "layer_norm",
        v_qkv_bias=bool(vis["qkv_bias"]),
        v_qk_norm=bool(vis["qk_normalization"]),
        v_channels=int(vis["num_channels"]),
        patch=_square(vis["patch_size"], "vision_config.patch_size"),
        pos_image_size=_square(vis["image_size"], "vision_config.image_size"),
        shuffle=_shuffle(cfg.get("downsample_ratio", 0.5)),
        family=family,
        vocab=int(llm["vocab_size"]),
        hidden=hidden,
        layers=int(llm["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(llm.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn=int(llm["intermediate_size"]),
        attn_bias=attn_bias,
        qk_norm=family in QK_NORM_FAMILIES,
        o_bias=family == "llama" and bool(llm.get("attention_bias", False)),
        mlp_bias=family == "llama" and bool(llm.get("mlp_bias", False)),
        tie=bool(llm.get("tie_word_embeddings", False)),
        **_moe_arch(llm),
    )


def _arch_from_native(cfg: Mapping[str, Any], family: str) -> _Arch:
    vis = dict(cfg.get("vision_config") or {})
    text = dict(cfg.get("text_config") or {})
    heads = int(text.get("num_attention_heads", 32))
    hidden = int(text.get("hidden_size", 4096))
    llama = text.get("model_type") == "llama"
    return _Arch(
        v_hidden=int(vis.get("hidden_size", 1024)),
        v_layers=int(vis.get("num_hidden_layers", 24)),
        v_heads=int(vis.get("num_attention_heads", 16)),
        v_ffn=int(vis.get("intermediate_size", 4096)),
        v_layer_norm=_vision_norm(vis.get("norm_type", "layer_norm")) == "layer_norm",
        v_qkv_bias=bool(vis.get("attention_bias", False)),
        v_qk_norm=bool(vis.get("use_qk_norm", False)),
        v_channels=int(vis.get("num_channels", 3)),
        patch=_square(vis.get("patch_size", 14), "vision_config.patch_size"),
        pos_image_size=_square(vis.get("image_size", 448), "vision_config.image_size"),
        shuffle=_shuffle(cfg.get("downsample_ratio", 0.5)),
        family=family,
        vocab=int(text.get("vocab_size", 151936)),
        hidden=hidden,
        layers=int(text.get("num_hidden_layers", 32)),
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        ffn=int(text.get("intermediate_size", 11008)),
        attn_bias=family == "qwen2" or (llama and bool(text.get("attention_bias", False))),
        qk_norm=text.get("model_type") in QK_NORM_FAMILIES,
        o_bias=llama and bool(text.get("attention_bias", False)),
        mlp_bias=llama and bool(text.get("mlp_bias", False)),
        tie=bool(cfg.get("tie_word_embeddings", True)),
        **_moe_arch(text),
    )


def _moe_arch(text: Mapping[str, Any]) -> dict:
    """The _Arch fields of a Qwen3-MoE llm / text config ({} when dense)."""
    flags = moe_layer_flags(text, int(text.get("num_hidden_layers", 32)))
    if not any(flags):
        return {}
    fields = moe_fields(text)
    return dict(experts=int(fields["num_experts"]), expert_ffn=int(fields["moe_intermediate_size"]), moe_layers=flags)


def _vision_norm(name: Any) -> str:
    if name not in ("layer_norm", "rms_norm"):
        raise UserError(f"vision_config.norm_type must be layer_norm or rms_norm, not {name!r}")
    return name


def _shuffle(ratio: Any) -> int:
    k = int(round(1 / float(ratio)))
    if abs(1 / k - float(ratio)) > 1e-9:
        raise UserError(f"downsample_ratio must be 1/k for an integer k, not {ratio}")
    return k


# ---- the mapping table ----------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One original tensor and the native tensor(s) it becomes.

    kind ``same``: one native tensor, same shape. ``qkv``: InternViT fused rows [Q; K; V]
    -> (q, k, v). ``wqkv``: InternLM2 per-group packing -> (q, k, v).
    """

    kind: str
    orig: str
    native: tuple
    shape: tuple  # of the original tensor


def _table(a: _Arch) -> list[_Entry]:
    C, out = a.v_hidden, []

    def same(orig: str, native: str, *shape: int) -> None:
        out.append(_Entry("same", orig, (native,), tuple(shape)))

    # vision embeddings
    same("vision_model.embeddings.class_embedding", _NV + "embeddings.cls_token", 1, 1, C)
    same("vision_model.embeddings.position_embedding", _NV + "embeddings.position_embeddings", 1, a.num_positions, C)
    same(
        "vision_model.embeddings.patch_embedding.weight",
        _NV + "embeddings.patch_embeddings.projection.weight",
        C, a.v_channels, a.patch, a.patch,
    )
    same("vision_model.embeddings.patch_embedding.bias", _NV + "embeddings.patch_embeddings.projection.bias", C)
    norm_params = ("weight", "bias") if a.v_layer_norm else ("weight",)
    for i in range(a.v_layers):
        o, n = f"vision_model.encoder.layers.{i}.", f"{_NV}encoder.layer.{i}."
        same(o + "ls1", n + "lambda_1", C)
        same(o + "ls2", n + "lambda_2", C)
        for p in norm_params:
            same(o + f"norm1.{p}", n + f"layernorm_before.{p}", C)
            same(o + f"norm2.{p}", n + f"layernorm_after.{p}", C)
        for p in ("weight", "bias") if a.v_qkv_bias else ("weight",):
            names = tuple(n + f"attention.{x}_proj.{p}" for x in "qkv")
            out.append(_Entry("qkv", o + f"attn.qkv.{p}", names, (3 * C, C) if p == "weight" else (3 * C,)))
        if a.v_qk_norm:
            same(o + "attn.q_norm.weight", n + "attention.q_norm.weight", C)
            same(o + "attn.k_norm.weight", n + "attention.k_norm.weight", C)
        same(o + "attn.proj.weight", n + "attention.projection_layer.weight", C, C)
        same(o + "attn.proj.bias", n + "attention.projection_layer.bias", C)
        same(o + "mlp.fc1.weight", n + "mlp.fc1.weight", a.v_ffn, C)
        same(o + "mlp.fc1.bias", n + "mlp.fc1.bias", a.v_ffn)
        same(o + "mlp.fc2.weight", n + "mlp.fc2.weight", C, a.v_ffn)
        same(o + "mlp.fc2.bias", n + "mlp.fc2.bias", C)

    # projector: LayerNorm(4C), Linear(4C -> H), GELU, Linear(H -> H)
    P, H = C * a.shuffle**2, a.hidden
    same("mlp1.0.weight", _NP + "layer_norm.weight", P)
    same("mlp1.0.bias", _NP + "layer_norm.bias", P)
    same("mlp1.1.weight", _NP + "linear_1.weight", H, P)
    same("mlp1.1.bias", _NP + "linear_1.bias", H)
    same("mlp1.3.weight", _NP + "linear_2.weight", H, H)
    same("mlp1.3.bias", _NP + "linear_2.bias", H)

    # language model (the output matrix is handled separately: tying)
    D, F = a.head_dim, a.ffn
    q_rows, kv_rows = a.heads * D, a.kv_heads * D
    o = "language_model.model."
    if a.family == "internlm2":
        same(o + "tok_embeddings.weight", _NL + "embed_tokens.weight", a.vocab, H)
        for i in range(a.layers):
            ol, nl = f"{o}layers.{i}.", f"{_NL}layers.{i}."
            names = tuple(nl + f"self_attn.{x}_proj.weight" for x in "qkv")
            out.append(_Entry("wqkv", ol + "attention.wqkv.weight", names, (q_rows + 2 * kv_rows, H)))
            same(ol + "attention.wo.weight", nl + "self_attn.o_proj.weight", H, q_rows)
            same(ol + "feed_forward.w1.weight", nl + "mlp.gate_proj.weight", F, H)
            same(ol + "feed_forward.w3.weight", nl + "mlp.up_proj.weight", F, H)
            same(ol + "feed_forward.w2.weight", nl + "mlp.down_proj.weight", H, F)
            same(ol + "attention_norm.weight", nl + "input_layernorm.weight", H)
            same(ol + "ffn_norm.weight", nl + "post_attention_layernorm.weight", H)
    else:
        same(o + "embed_tokens.weight", _NL + "embed_tokens.weight", a.vocab, H)
        for i in range(a.layers):
            ol, nl = f"{o}layers.{i}.", f"{_NL}layers.{i}."

            def keep(name: str, *shape: int) -> None:
                same(ol + name, nl + name, *shape)

            if a.family == "phi3":
                keep("self_attn.qkv_proj.weight", q_rows + 2 * kv_rows, H)
                keep("mlp.gate_up_proj.weight", 2 * F, H)
            else:
                for x, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                    keep(f"self_attn.{x}_proj.weight", rows, H)
                    if a.attn_bias:
                        keep(f"self_attn.{x}_proj.bias", rows)
                if a.qk_norm:
                    keep("self_attn.q_norm.weight", D)
                    keep("self_attn.k_norm.weight", D)
                if a.moe_layers and a.moe_layers[i]:  # router + per-expert SwiGLU, names kept
                    E, Fe = a.experts, a.expert_ffn
                    keep("mlp.gate.weight", E, H)
                    for e in range(E):
                        for x, shape in (("gate", (Fe, H)), ("up", (Fe, H)), ("down", (H, Fe))):
                            keep(f"mlp.experts.{e}.{x}_proj.weight", *shape)
                else:
                    for x, shape in (("gate", (F, H)), ("up", (F, H)), ("down", (H, F))):
                        keep(f"mlp.{x}_proj.weight", *shape)
                        if a.mlp_bias:
                            keep(f"mlp.{x}_proj.bias", shape[0])
            keep("self_attn.o_proj.weight", H, q_rows)
            if a.o_bias:
                keep("self_attn.o_proj.bias", H)
            if a.family == "phi3":
                keep("mlp.down_proj.weight", H, F)
            keep("input_layernorm.weight", H)
            keep("post_attention_layernorm.weight", H)
    same(o + "norm.weight", _NL + "norm.weight", H)
    return out


def _orig_head_name(family: str) -> str:
    return "language_model.output.weight" if family == "internlm2" else "language_model.lm_head.weight"


# ---- tensor transforms ----------------------------------------------------------------


def _split_vision_qkv(t: Tensor) -> tuple:
    return tuple(x.clone() for x in torch.chunk(t, 3, dim=0))


def _split_wqkv(t: Tensor, a: _Arch) -> tuple:
    G, D = a.heads // a.kv_heads, a.head_dim
    packed = t.reshape(a.kv_heads, G + 2, D, a.hidden)
    q = packed[:, :G].reshape(a.heads * D, a.hidden).clone()
    k = packed[:, G].reshape(a.kv_heads * D, a.hidden).clone()
    v = packed[:, G + 1].reshape(a.kv_heads * D, a.hidden).clone()
    return q, k, v


def _pack_wqkv(q: Tensor, k: Tensor, v: Tensor, a: _Arch) -> Tensor:
    G, D, kv = a.heads // a.kv_heads, a.head_dim, a.kv_heads
    packed = torch.cat(
        [q.reshape(kv, G, D, a.hidden), k.reshape(kv, 1, D, a.hidden), v.reshape(kv, 1, D, a.hidden)], dim=1
    )
    return packed.reshape(kv * (G + 2) * D, a.hidden)


def _native_shapes(e: _Entry, a: _Arch) -> tuple:
    if e.kind == "same":
        return (e.shape,)
    if e.kind == "qkv":
        third = (e.shape[0] // 3,) + e.shape[1:]
        return (third, third, third)
    kv = a.kv_heads * a.head_dim
    return ((a.heads * a.head_dim, a.hidden), (kv, a.hidden), (kv, a.hidden))


# ---- checked access -------------------------------------------------------------------


def _is_derived_buffer(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq") or key.endswith("_extra_state")


class _Source:
    def __init__(self, sd: Mapping[str, Tensor], side: str):
        self.sd = {k: v for k, v in sd.items() if not _is_derived_buffer(k)}
        self.side = side

    def pop(self, key: str, shape: tuple) -> Tensor:
        if key not in self.sd:
            raise UserError(f"{self.side} checkpoint lacks tensor {key!r}; checkpoint and config do not match")
        t = self.sd.pop(key)
        if tuple(t.shape) != tuple(shape):
            raise UserError(
                f"{self.side} tensor {key!r} has shape {list(t.shape)} but the config implies {list(shape)}"
            )
        return t

    def maybe(self, key: str) -> Optional[Tensor]:
        return self.sd.pop(key, None)

    def finish(self) -> None:
        if self.sd:
            left = sorted(self.sd)
            more = f" (+{len(left) - 1} more)" if len(left) > 1 else ""
            raise UserError(
                f"{self.side} checkpoint has unexpected tensor {left[0]!r}{more}; checkpoint and config do not match"
            )


def _head(src: _Source, key: str, embed: Tensor, a: _Arch) -> Optional[Tensor]:
    """The output matrix (None when tied); a tied one given anyway must equal the embedding."""
    if a.tie:
        head = src.maybe(key)
        if head is not None and not (head.shape == embed.shape and torch.equal(head, embed)):
            raise UserError(f"config ties word embeddings but {key!r} differs from the input embedding")
        return None
    return src.pop(key, (a.vocab, a.hidden))


# ---- public API: tensors --------------------------------------------------------------


def original_to_native(
    sd: Mapping[str, Tensor], original_config: Any, *, image_token_id: Optional[int] = None
) -> tuple[dict[str, Tensor], dict]:
    """An ``InternVLChatModel`` state dict + its config.json dict -> (transformers
    ``InternVLForConditionalGeneration.state_dict()``-named tensors, native config dict)."""
    cfg = _as_dict(original_config)
    check_not_flash(cfg, sd)
    native_config = native_config_from_original(cfg, image_token_id=image_token_id)
    a = _arch_from_original(cfg)
    src = _Source(sd, "original")
    out: dict[str, Tensor] = {}
    for e in _table(a):
        t = src.pop(e.orig, e.shape)
        if e.kind == "same":
            parts = (t,)
        elif e.kind == "qkv":
            parts = _split_vision_qkv(t)
        else:
            parts = _split_wqkv(t, a)
        out.update(zip(e.native, parts))
    embed = out[_NL + "embed_tokens.weight"]
    head = _head(src, _orig_head_name(a.family), embed, a)
    out[_NHEAD] = embed if head is None else head
    src.finish()
    return out, native_config


def native_to_original(
    sd: Mapping[str, Tensor],
    native_config: Any,
    llm_family: Optional[str] = None,
    **config_overrides: Any,
) -> tuple[dict[str, Tensor], dict]:
    """A transformers InternVL state dict (module or checkpoint names) + its config dict ->
    (``InternVLChatModel`` state dict, ``InternVLChatConfig`` dict).

    ``llm_family`` picks the original LLM naming: ``internlm2`` (native text model must be
    llama), ``qwen2``, ``llama`` or ``phi3``; None = the native text ``model_type``.
    ``config_overrides`` go to :func:`original_config_from_native` (``template=...``).
    """
    cfg = _as_dict(native_config)
    original_config = original_config_from_native(cfg, llm_family, **config_overrides)
    family = detect_llm_family(original_config)
    a = _arch_from_native(cfg, family)
    src = _Source(split_fused_experts(normalize_hf_names(sd)), "native")
    out: dict[str, Tensor] = {}
    for e in _table(a):
        parts = [src.pop(name, shape) for name, shape in zip(e.native, _native_shapes(e, a))]
        if e.kind == "same":
            out[e.orig] = parts[0]
        elif e.kind == "qkv":
            out[e.orig] = torch.cat(parts, dim=0)
        else:
            out[e.orig] = _pack_wqkv(*parts, a)
    embed = out["language_model.model." + ("tok_embeddings" if family == "internlm2" else "embed_tokens") + ".weight"]
    head = _head(src, _NHEAD, embed, a)
    if head is not None:
        out[_orig_head_name(family)] = head
    src.finish()
    return out, original_config


# ---- public API: configs --------------------------------------------------------------


def _rope_legacy(text: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from either naming (transformers 5 or legacy)."""
    params = dict(text.get("rope_parameters") or {})
    theta = params.pop("rope_theta", text.get("rope_theta", 10000.0))
    if not params:
        params = dict(text.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type")}
    return float(theta), {"type": kind, **scaling}


def _rope_native(theta: float, scaling: Optional[dict]) -> dict:
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("type", None)
    return {"rope_type": kind, "rope_theta": theta, **scaling}


def native_config_from_original(original_config: Any, *, image_token_id: Optional[int] = None) -> dict:
    """``InternVLChatConfig`` dict -> transformers ``InternVLConfig`` dict (best effort)."""
    cfg = _as_dict(original_config)
    family = detect_llm_family(cfg)
    vis = {**_INTERN_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    llm = _llm_config(cfg)
    if cfg.get("ps_version", "v1") != "v2":
        raise UserError(
            f"ps_version {cfg.get('ps_version', 'v1')!r}: the transformers-native InternVL only implements "
            "the v2 pixel shuffle"
        )
    if llm.get("bias", False):
        raise UserError("llm_config.bias=True (InternLM2 with biased linears) is not supported")
    patch = _square(vis["patch_size"], "vision_config.patch_size")
    pos_size = _square(vis["image_size"], "vision_config.image_size")
    run_size = _square(cfg.get("force_image_size") or pos_size, "force_image_size")
    ratio = float(cfg.get("downsample_ratio", 0.5))
    shuffle = _shuffle(ratio)
    vision = {
        "model_type": "internvl_vision",
        "hidden_size": vis["hidden_size"],
        "num_hidden_layers": vis["num_hidden_layers"],
        "num_attention_heads": vis["num_attention_heads"],
        "intermediate_size": vis["intermediate_size"],
        "hidden_act": vis["hidden_act"],
        "norm_type": _vision_norm(vis["norm_type"]),
        "layer_norm_eps": vis["layer_norm_eps"],
        "attention_bias": bool(vis["qkv_bias"]),
        "use_qk_norm": bool(vis["qk_normalization"]),
        "layer_scale_init_value": vis["initializer_factor"],
        "image_size": [pos_size, pos_size],
        "patch_size": [patch, patch],
        "num_channels": vis["num_channels"],
        "attention_dropout": vis.get("attention_dropout", 0.0),
        "projection_dropout": vis.get("dropout", 0.0),
        "hidden_dropout_prob": 0.0,
        "initializer_range": vis.get("initializer_range", 0.02),
        "use_mask_token": False,
        "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,
    }
    theta, scaling = _rope_legacy(llm)
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
            "hidden_act": llm.get("hidden_act", "silu"),
            "max_position_embeddings": llm.get("max_position_embeddings", 2048),
            "initializer_range": llm.get("initializer_range", 0.02),
            "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
            "use_cache": llm.get("use_cache", True),
            "pad_token_id": llm.get("pad_token_id"),
            "bos_token_id": llm.get("bos_token_id"),
            "eos_token_id": llm.get("eos_token_id"),
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
        }
    else:
        text = {k: v for k, v in llm.items() if k not in _LOADER_KEYS}
        text["model_type"] = NATIVE_TEXT_TYPE[family]
        if family == "internlm3":  # remote-code names -> transformers' InternLM3Config names
            text["attention_bias"] = bool(text.pop("qkv_bias", False))
            text["mlp_bias"] = bool(llm.get("bias", False))
    text["rope_parameters"] = _rope_native(theta, scaling)
    text["tie_word_embeddings"] = tie
    if image_token_id is None:
        image_token_id = cfg.get("img_context_token_id") or _GUESSED_IMAGE_TOKEN.get(family, 151667)
    native = {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "vision_config": vision,
        "text_config": text,
        "image_token_id": int(image_token_id),
        "image_seq_length": (run_size // patch) ** 2 // shuffle**2,
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
    cfg = _as_dict(native_config)
    vis = dict(cfg.get("vision_config") or {})
    text = dict(cfg.get("text_config") or {})
    text_type = text.get("model_type", "qwen2")
    family = llm_family or text_type
    if family not in LLM_FAMILIES:
        raise UserError(f"llm_family must be one of {', '.join(LLM_FAMILIES)}, not {family!r}")
    if NATIVE_TEXT_TYPE[family] != text_type:
        raise UserError(
            f"llm_family {family!r} needs a native {NATIVE_TEXT_TYPE[family]!r} text model, "
            f"but text_config.model_type is {text_type!r}"
        )
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise UserError("only vision_feature_select_strategy 'default' (drop the CLS token) has an original layout")
    if not vis.get("use_mean_pooling", True) or vis.get("use_mask_token", False):
        raise UserError("vision_config.use_mean_pooling=False / use_mask_token=True have no original layout")
    if not vis.get("use_absolute_position_embeddings", True):
        raise UserError("vision_config.use_absolute_position_embeddings=False has no original layout")
    patch = _square(vis.get("patch_size", 14), "vision_config.patch_size")
    pos_size = _square(vis.get("image_size", 448), "vision_config.image_size")
    ratio = float(cfg.get("downsample_ratio", 0.5))
    shuffle = _shuffle(ratio)
    seq = cfg.get("image_seq_length")
    run_size = pos_size
    if seq:
        side = math.isqrt(int(seq)) * shuffle * patch
        if side * side == int(seq) * shuffle**2 * patch**2:
            run_size = side
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vis.get("hidden_size", 1024),
        "num_hidden_layers": vis.get("num_hidden_layers", 24),
        "num_attention_heads": vis.get("num_attention_heads", 16),
        "intermediate_size": vis.get("intermediate_size", 4096),
        "hidden_act": vis.get("hidden_act", "gelu"),
        "norm_type": _vision_norm(vis.get("norm_type", "layer_norm")),
        "layer_norm_eps": vis.get("layer_norm_eps", 1e-6),
        "qkv_bias": bool(vis.get("attention_bias", False)),
        "qk_normalization": bool(vis.get("use_qk_norm", False)),
        "initializer_factor": vis.get("layer_scale_init_value", 0.1),
        "initializer_range": vis.get("initializer_range", 0.02),
        "image_size": pos_size,
        "patch_size": patch,
        "num_channels": vis.get("num_channels", 3),
        "attention_dropout": vis.get("attention_dropout", 0.0),
        "dropout": vis.get("projection_dropout", 0.0),
        "drop_path_rate": 0.0,
        "use_flash_attn": True,
    }
    theta, scaling = _rope_legacy(text)
    tie = bool(cfg.get("tie_word_embeddings", True))
    if family == "internlm2":
        heads = int(text.get("num_attention_heads", 32))
        hidden = int(text.get("hidden_size", 4096))
        if text.get("attention_bias") or text.get("mlp_bias"):
            raise UserError("a llama text model with attention_bias/mlp_bias has no InternLM2 layout")
        if int(text.get("head_dim") or hidden // heads) * heads != hidden:
            raise UserError("InternLM2 needs head_dim * num_attention_heads == hidden_size")
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
            "hidden_act": text.get("hidden_act", "silu"),
            "max_position_embeddings": text.get("max_position_embeddings"),
            "initializer_range": text.get("initializer_range", 0.02),
            "rms_norm_eps": text.get("rms_norm_eps", 1e-6),
            "use_cache": text.get("use_cache", True),
            "pad_token_id": text.get("pad_token_id"),
            "bos_token_id": text.get("bos_token_id"),
            "eos_token_id": text.get("eos_token_id"),
            "attn_implementation": "eager",
        }
    else:
        llm = {k: v for k, v in text.items() if k not in _LOADER_KEYS}
        llm["architectures"] = [_FAMILY_TO_ARCH[family]]
        llm["model_type"] = family
        if family == "internlm3":  # transformers' names -> the remote code's
            llm["qkv_bias"] = bool(llm.pop("attention_bias", False))
            llm["bias"] = bool(llm.pop("mlp_bias", False))
    llm["rope_theta"] = theta
    llm["rope_scaling"] = scaling
    llm["tie_word_embeddings"] = tie
    original = {
        "architectures": ["InternVLChatModel"],
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
        # native image_token_id survives a round trip and config.py can read it.
        "img_context_token_id": cfg.get("image_token_id"),
    }
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype")
    if dtype:
        original["torch_dtype"] = str(dtype).replace("torch.", "")
        llm["torch_dtype"] = original["torch_dtype"]
    return original

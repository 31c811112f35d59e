"""Original remote-code InternVL layout <-> transformers-native layout (exact, pure tensors).

The *original* layout is what ``OpenGVLab/InternVL2-*`` (and 2.5 / 3 without ``-hf``)
ship: ``InternVLChatModel`` with ``trust_remote_code``. The *native* layout is the one
``transformers.InternVLForConditionalGeneration`` uses, which :mod:`.native` maps to
megatron. So ``original -> megatron`` is::

    native_sd, _ = original_to_native(original_sd, original_config)
    config, _ = hf_config.internvl_config_from_original(original_config)
    mcore_sd = native.hf_to_megatron(native_sd, config)

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

The configs are translated by :mod:`.hf_config` (``original_to_native`` returns the
native config with the tensors); the table here reads the architecture from the native
config only, so the original config reaches it through that one translation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from megatron_mpo.conversion.experts import split_fused_experts
from megatron_mpo.conversion.families import check_not_flash, moe_fields, moe_layer_flags
from megatron_mpo.conversion.hf_config import (
    as_dict,
    detect_llm_family,
    native_config_from_original,
    original_config_from_native,
    shuffle_factor,
    square,
    vision_norm_type,
)
from megatron_mpo.conversion.native import normalize_hf_names
from megatron_mpo.conversion.tensor_source import TensorSource
from megatron_mpo.errors import UserError
from megatron_mpo.models.config import QK_NORM_FAMILIES

__all__ = ["original_to_native", "native_to_original"]

# Native (module) prefixes and the names save_pretrained writes.
_NV = "model.vision_tower."
_NP = "model.multi_modal_projector."
_NL = "model.language_model."
_NHEAD = "lm_head.weight"


# ---- architecture ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    """What the tensor mapping needs to know (read from the native config)."""

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


def _arch(cfg: Mapping[str, Any], family: str) -> _Arch:
    """What the table needs, from a native config dict (``family``: the original LLM naming)."""
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
        v_layer_norm=vision_norm_type(vis.get("norm_type", "layer_norm")) == "layer_norm",
        v_qkv_bias=bool(vis.get("attention_bias", False)),
        v_qk_norm=bool(vis.get("use_qk_norm", False)),
        v_channels=int(vis.get("num_channels", 3)),
        patch=square(vis.get("patch_size", 14), "vision_config.patch_size"),
        pos_image_size=square(vis.get("image_size", 448), "vision_config.image_size"),
        shuffle=shuffle_factor(cfg.get("downsample_ratio", 0.5)),
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


def _head(src: TensorSource, key: str, embed: Tensor, a: _Arch) -> Optional[Tensor]:
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
    cfg = as_dict(original_config)
    check_not_flash(cfg, sd)
    native_config = native_config_from_original(cfg, image_token_id=image_token_id)
    a = _arch(native_config, detect_llm_family(cfg))
    src = TensorSource(sd, "original")
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
    cfg = as_dict(native_config)
    original_config = original_config_from_native(cfg, llm_family, **config_overrides)
    family = detect_llm_family(original_config)
    a = _arch(cfg, family)
    src = TensorSource(split_fused_experts(normalize_hf_names(sd)), "native")
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

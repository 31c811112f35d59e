"""transformers-native InternVL <-> megatron InternVLModel parameter mapping.

``hf_to_megatron`` and ``megatron_to_hf`` are exact inverses on full (unsharded, TP=1,
PP=1) state dicts; sharding over TP/PP is left to megatron-core dist_checkpointing.

Hugging Face side (``InternVLForConditionalGeneration``), either naming is accepted:

* ``module`` -- ``model.state_dict()`` in transformers >= 5: ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.weight``;
* ``checkpoint`` -- what ``save_pretrained`` writes and the Hub holds: ``vision_tower.*``,
  ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``.

Megatron side (local-spec names; :func:`to_te_names` renames the fused norms for the
Transformer Engine spec)::

    vision_model.conv1.{weight,bias}                 patch embedding
    vision_model.class_token                         [1, 1, C]
    vision_model.position_embeddings.weight          [1 + grid^2, C]
    vision_model.decoder.layers.N.{ls1,ls2}          layer scale
      .input_layernorm.{weight[,bias]}  .pre_mlp_layernorm.{weight[,bias]}
      .self_attention.linear_qkv.{weight[,bias]}     rows per head: [q_h; k_h; v_h]
      .self_attention.{q,k}_layernorm.weight         qk-norm over all heads (6B)
      .self_attention.linear_proj.{weight,bias}
      .mlp.linear_fc1.{weight,bias}  .mlp.linear_fc2.{weight,bias}
    vision_projection.layer_norm.{weight,bias}       mlp1.0
    vision_projection.encoder.linear_fc{1,2}.{weight,bias}   mlp1.1 / mlp1.3
    language_model.embedding.word_embeddings.weight  [padded vocab, H]
    language_model.decoder.layers.N.input_layernorm.weight / .pre_mlp_layernorm.weight
      .self_attention.linear_qkv.{weight[,bias]}     rows per KV group: [q x G; k; v]
      [.self_attention.{q,k}_layernorm.weight]       per-head qk-norm [head_dim] (Qwen3)
      .self_attention.linear_proj.weight
      .mlp.linear_fc1.weight                         [gate; up]
      .mlp.linear_fc2.weight
    language_model.decoder.final_layernorm.weight
    language_model.output_layer.weight               (untied models only)

Vision heads padded to ``vision.num_padded_heads`` and vocabulary rows padded to
``language.padded_vocab_size`` are zeros here and dropped on the way back.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from megatron_mpo.conversion.experts import mlp_to_hf, mlp_to_megatron
from megatron_mpo.conversion.families import check_not_flash
from megatron_mpo.conversion.tensor_source import TensorSource
from megatron_mpo.errors import UserError
from megatron_mpo.models.config import InternVLConfig

__all__ = ["hf_to_megatron", "megatron_to_hf", "to_te_names", "from_te_names", "normalize_hf_names"]

_CHECKPOINT_TO_MODULE = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


_MODULE_TO_CHECKPOINT = tuple((new, old) for old, new in _CHECKPOINT_TO_MODULE)


def _rename_prefixes(sd: Mapping[str, Tensor], table: tuple) -> dict[str, Tensor]:
    """Replace the first matching ``(old, new)`` name prefix of ``table`` in every key."""
    out = {}
    for key, value in sd.items():
        for old, new in table:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def normalize_hf_names(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint-layout names -> module-layout names (module names pass through)."""
    return _rename_prefixes(hf_sd, _CHECKPOINT_TO_MODULE)


def _to_checkpoint_names(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return _rename_prefixes(hf_sd, _MODULE_TO_CHECKPOINT)


# ---- helpers: head interleaving and padding -------------------------------------------


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def _pad_cols(t: Tensor, cols: int) -> Tensor:
    if t.shape[1] == cols:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], cols - t.shape[1]))], dim=1)


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int, head_dim: int, padded_groups: int) -> Tensor:
    """Separate q/k/v (rows = heads x head_dim) -> megatron's grouped layout.

    Per KV group g: the group's ``heads/groups`` query heads, then key g, then value g.
    Zero groups are appended up to ``padded_groups`` (vision head padding, MHA only).
    """
    per_group = q.shape[0] // head_dim // groups
    rest = tuple(q.shape[1:])
    qg = q.reshape(groups, per_group * head_dim, *rest)
    kg = k.reshape(groups, head_dim, *rest)
    vg = v.reshape(groups, head_dim, *rest)
    fused = torch.cat([qg, kg, vg], dim=1)  # [groups, (G + 2) * D, ...]
    if padded_groups > groups:
        fused = torch.cat([fused, fused.new_zeros((padded_groups - groups,) + tuple(fused.shape[1:]))], dim=0)
    return fused.reshape(-1, *rest)


def _split_qkv(fused: Tensor, groups: int, heads: int, head_dim: int, padded_groups: int):
    per_group = heads // groups
    rest = tuple(fused.shape[1:])
    fused = fused.reshape(padded_groups, (per_group + 2) * head_dim, *rest)[:groups]
    q, k, v = torch.split(fused, [per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).clone() for t in (q, k, v))


# ---- vision ---------------------------------------------------------------------------

_PROJECTOR_NAMES = (
    ("layer_norm", "layer_norm"),  # mlp1.0
    ("linear_1", "encoder.linear_fc1"),  # mlp1.1
    ("linear_2", "encoder.linear_fc2"),  # mlp1.3
)
_HF_V = "model.vision_tower."
_HF_P = "model.multi_modal_projector."
_HF_L = "model.language_model."
_MC_V = "vision_model."
_MC_P = "vision_projection."
_MC_L = "language_model."


def _vision_to_megatron(src: TensorSource, out: dict, config: InternVLConfig) -> None:
    vis = config.vision
    out[_MC_V + "class_token"] = src.pop(_HF_V + "embeddings.cls_token")
    pos = src.pop(_HF_V + "embeddings.position_embeddings")
    out[_MC_V + "position_embeddings.weight"] = pos.reshape(vis.num_positions, vis.hidden_size)
    out[_MC_V + "conv1.weight"] = src.pop(_HF_V + "embeddings.patch_embeddings.projection.weight")
    out[_MC_V + "conv1.bias"] = src.pop(_HF_V + "embeddings.patch_embeddings.projection.bias")
    norm_params = ("weight", "bias") if vis.norm == "LayerNorm" else ("weight",)
    width = vis.heads * vis.head_dim
    for i in range(vis.num_layers):
        h, m = f"{_HF_V}encoder.layer.{i}.", f"{_MC_V}decoder.layers.{i}."
        out[m + "ls1"] = src.pop(h + "lambda_1")
        out[m + "ls2"] = src.pop(h + "lambda_2")
        for p in norm_params:
            out[m + f"input_layernorm.{p}"] = src.pop(h + f"layernorm_before.{p}")
            out[m + f"pre_mlp_layernorm.{p}"] = src.pop(h + f"layernorm_after.{p}")
        for p in ("weight", "bias") if vis.qkv_bias else ("weight",):
            q, k, v = (src.pop(h + f"attention.{x}_proj.{p}") for x in "qkv")
            out[m + f"self_attention.linear_qkv.{p}"] = _fuse_qkv(q, k, v, vis.num_heads, vis.head_dim, vis.heads)
        if vis.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = _pad_rows(src.pop(h + "attention.q_norm.weight"), width)
            out[m + "self_attention.k_layernorm.weight"] = _pad_rows(src.pop(h + "attention.k_norm.weight"), width)
        proj = src.pop(h + "attention.projection_layer.weight")
        out[m + "self_attention.linear_proj.weight"] = _pad_cols(proj, width)
        out[m + "self_attention.linear_proj.bias"] = src.pop(h + "attention.projection_layer.bias")
        for a, b in (("fc1", "linear_fc1"), ("fc2", "linear_fc2")):
            for p in ("weight", "bias"):
                out[m + f"mlp.{b}.{p}"] = src.pop(h + f"mlp.{a}.{p}")
    for a, b in _PROJECTOR_NAMES:
        for p in ("weight", "bias"):
            out[_MC_P + f"{b}.{p}"] = src.pop(_HF_P + f"{a}.{p}")


def _vision_to_hf(src: TensorSource, out: dict, config: InternVLConfig) -> None:
    vis = config.vision
    out[_HF_V + "embeddings.cls_token"] = src.pop(_MC_V + "class_token")
    out[_HF_V + "embeddings.position_embeddings"] = src.pop(_MC_V + "position_embeddings.weight").unsqueeze(0)
    out[_HF_V + "embeddings.patch_embeddings.projection.weight"] = src.pop(_MC_V + "conv1.weight")
    out[_HF_V + "embeddings.patch_embeddings.projection.bias"] = src.pop(_MC_V + "conv1.bias")
    norm_params = ("weight", "bias") if vis.norm == "LayerNorm" else ("weight",)
    width = vis.hidden_size
    for i in range(vis.num_layers):
        h, m = f"{_HF_V}encoder.layer.{i}.", f"{_MC_V}decoder.layers.{i}."
        out[h + "lambda_1"] = src.pop(m + "ls1")
        out[h + "lambda_2"] = src.pop(m + "ls2")
        for p in norm_params:
            out[h + f"layernorm_before.{p}"] = src.pop(m + f"input_layernorm.{p}")
            out[h + f"layernorm_after.{p}"] = src.pop(m + f"pre_mlp_layernorm.{p}")
        for p in ("weight", "bias") if vis.qkv_bias else ("weight",):
            fused = src.pop(m + f"self_attention.linear_qkv.{p}")
            qkv = _split_qkv(fused, vis.num_heads, vis.num_heads, vis.head_dim, vis.heads)
            for x, t in zip("qkv", qkv):
                out[h + f"attention.{x}_proj.{p}"] = t
        if vis.qk_norm:
            for x in "qk":
                norm = src.pop(m + f"self_attention.{x}_layernorm.weight")
                out[h + f"attention.{x}_norm.weight"] = norm[:width].clone()
        proj = src.pop(m + "self_attention.linear_proj.weight")
        out[h + "attention.projection_layer.weight"] = proj[:, :width].clone()
        out[h + "attention.projection_layer.bias"] = src.pop(m + "self_attention.linear_proj.bias")
        for a, b in (("fc1", "linear_fc1"), ("fc2", "linear_fc2")):
            for p in ("weight", "bias"):
                out[h + f"mlp.{a}.{p}"] = src.pop(m + f"mlp.{b}.{p}")
    for a, b in _PROJECTOR_NAMES:
        for p in ("weight", "bias"):
            out[_HF_P + f"{a}.{p}"] = src.pop(_MC_P + f"{b}.{p}")


# ---- language -------------------------------------------------------------------------


def _language_to_megatron(src: TensorSource, out: dict, config: InternVLConfig) -> None:
    lang = config.language
    fused_hf = lang.family == "phi3"  # Phi-3 stores qkv_proj and gate_up_proj fused
    rows = lang.padded_vocab_size
    embed = src.pop(_HF_L + "embed_tokens.weight")
    out[_MC_L + "embedding.word_embeddings.weight"] = _pad_rows(embed, rows)
    head = src.maybe("lm_head.weight")
    if lang.tie_embeddings:
        if head is not None and not torch.equal(head, embed):
            raise UserError("config ties word embeddings but lm_head.weight differs from embed_tokens.weight")
    else:
        if head is None:
            raise UserError("checkpoint lacks 'lm_head.weight' but the config has untied embeddings")
        out[_MC_L + "output_layer.weight"] = _pad_rows(head, rows)
    out[_MC_L + "decoder.final_layernorm.weight"] = src.pop(_HF_L + "norm.weight")
    d, kv = lang.kv_channels, lang.num_kv_heads
    for i in range(lang.num_layers):
        h, m = f"{_HF_L}layers.{i}.", f"{_MC_L}decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = src.pop(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = src.pop(h + "post_attention_layernorm.weight")
        for p in ("weight", "bias") if lang.qkv_bias else ("weight",):
            if fused_hf:
                q, k, v = torch.split(src.pop(h + f"self_attn.qkv_proj.{p}"), [lang.num_heads * d, kv * d, kv * d])
            else:
                q, k, v = (src.pop(h + f"self_attn.{x}_proj.{p}") for x in "qkv")
            out[m + f"self_attention.linear_qkv.{p}"] = _fuse_qkv(q, k, v, kv, d, kv)
        if lang.qk_norm:
            for x in "qk":
                out[m + f"self_attention.{x}_layernorm.weight"] = src.pop(h + f"self_attn.{x}_norm.weight")
        out[m + "self_attention.linear_proj.weight"] = src.pop(h + "self_attn.o_proj.weight")
        mlp_to_megatron(src, out, h, m, lang, i)


def _language_to_hf(src: TensorSource, out: dict, config: InternVLConfig, layout: str) -> None:
    lang = config.language
    fused_hf = lang.family == "phi3"
    vocab = lang.vocab_size
    embed = src.pop(_MC_L + "embedding.word_embeddings.weight")[:vocab].clone()
    out[_HF_L + "embed_tokens.weight"] = embed
    if lang.tie_embeddings:
        src.maybe(_MC_L + "output_layer.weight")
        if layout == "module":
            out["lm_head.weight"] = embed
    else:
        out["lm_head.weight"] = src.pop(_MC_L + "output_layer.weight")[:vocab].clone()
    out[_HF_L + "norm.weight"] = src.pop(_MC_L + "decoder.final_layernorm.weight")
    d, kv = lang.kv_channels, lang.num_kv_heads
    for i in range(lang.num_layers):
        h, m = f"{_HF_L}layers.{i}.", f"{_MC_L}decoder.layers.{i}."
        out[h + "input_layernorm.weight"] = src.pop(m + "input_layernorm.weight")
        out[h + "post_attention_layernorm.weight"] = src.pop(m + "pre_mlp_layernorm.weight")
        for p in ("weight", "bias") if lang.qkv_bias else ("weight",):
            q, k, v = _split_qkv(src.pop(m + f"self_attention.linear_qkv.{p}"), kv, lang.num_heads, d, kv)
            if fused_hf:
                out[h + f"self_attn.qkv_proj.{p}"] = torch.cat([q, k, v])
            else:
                for x, t in zip("qkv", (q, k, v)):
                    out[h + f"self_attn.{x}_proj.{p}"] = t
        if lang.qk_norm:
            for x in "qk":
                out[h + f"self_attn.{x}_norm.weight"] = src.pop(m + f"self_attention.{x}_layernorm.weight")
        out[h + "self_attn.o_proj.weight"] = src.pop(m + "self_attention.linear_proj.weight")
        mlp_to_hf(src, out, h, m, lang, i, layout)


# ---- public API -----------------------------------------------------------------------


def hf_to_megatron(hf_sd: Mapping[str, Tensor], config: InternVLConfig) -> dict[str, Tensor]:
    """A transformers InternVL state dict (module or checkpoint names) -> the full megatron
    ``InternVLModel`` state dict (local-spec names, no ``_extra_state`` entries)."""
    config.validate()
    check_not_flash({}, hf_sd)
    src = TensorSource(normalize_hf_names(hf_sd), "Hugging Face")
    out: dict[str, Tensor] = {}
    _vision_to_megatron(src, out, config)
    _language_to_megatron(src, out, config)
    src.finish()
    return out


def megatron_to_hf(
    mcore_sd: Mapping[str, Tensor], config: InternVLConfig, layout: str = "checkpoint"
) -> dict[str, Tensor]:
    """The full megatron state dict (local or TE names) -> transformers InternVL names.

    ``layout="checkpoint"`` gives the names ``save_pretrained`` writes (tied ``lm_head``
    omitted); ``"module"`` those of ``InternVLForConditionalGeneration.state_dict()``.
    """
    if layout not in ("checkpoint", "module"):
        raise ValueError(f"layout must be checkpoint or module, not {layout!r}")
    config.validate()
    src = TensorSource(from_te_names(mcore_sd), "megatron")
    out: dict[str, Tensor] = {}
    _vision_to_hf(src, out, config)
    _language_to_hf(src, out, config, layout)
    src.finish()
    return out if layout == "module" else _to_checkpoint_names(out)


_LAYER = re.compile(r"^(.*decoder\.layers\.\d+\.)(.*)$")
_LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_TE_TO_LOCAL = {v: k for k, v in _LOCAL_TO_TE.items()}
_MLP_NORMS = {k for k in _LOCAL_TO_TE if k.startswith("pre_mlp")} | {v for v in _TE_TO_LOCAL if v.startswith("mlp.")}


def _rename_layers(sd: Mapping[str, Tensor], table: dict) -> dict[str, Tensor]:
    # An MoE layer's pre-MLP norm is its own module under both specs (no fc1 to fuse into).
    moe = {m.group(1) for m in map(_LAYER.match, sd) if m and m.group(2) == "mlp.router.weight"}
    out = {}
    for key, value in sd.items():
        match = _LAYER.match(key)
        if match and match.group(2) in table and not (match.group(1) in moe and match.group(2) in _MLP_NORMS):
            key = match.group(1) + table[match.group(2)]
        out[key] = value
    return out


def to_te_names(mcore_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Local-spec names -> Transformer Engine spec names (norms fused into the next linear)."""
    return _rename_layers(mcore_sd, _LOCAL_TO_TE)


def from_te_names(mcore_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Transformer Engine spec names -> local-spec names (local names pass through)."""
    return _rename_layers(mcore_sd, _TE_TO_LOCAL)

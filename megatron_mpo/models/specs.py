"""Layer specs (megatron-core ``ModuleSpec``) for InternViT, the projector and the LLM.

Two flavours of each:

* ``local`` -- megatron-core's own torch modules (ColumnParallelLinear, DotProductAttention,
  torch norms). Runs everywhere, including CPU tests.
* ``transformer_engine`` -- Transformer Engine modules (fused norm+linear, fused attention,
  FP8). Imported lazily, only when chosen, so nothing here needs TE to be installed.

:func:`check_backend` is the single gate: choosing TE or FP8 on a machine that cannot
run them stops with a one-line UserError instead of an ImportError deep in a build.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_mpo import platform
from megatron_mpo.errors import UserError
from megatron_mpo.models.config import VisionConfig
from megatron_mpo.models.layers import (
    CrossHeadRMSNorm,
    HeadRMSNorm,
    LayerScaleTransformerLayer,
    FlexAttention,
    RMSNorm,
    SDPAttention,
    SwiGLUMLP,
    without_bias,
)

__all__ = [
    "SPECS",
    "ATTENTIONS",
    "FP8_FORMATS",
    "te_available",
    "check_backend",
    "vision_layer_spec",
    "language_layer_spec",
    "language_block_spec",
    "projector_spec",
    "ProjectorSubmodules",
]

SPECS = ("local", "transformer_engine")
# The LLM's core attention: torch SDPA (per pair for packed rows), FlexAttention (block
# sparse, GPUs), or the spec's own (TE's DotProductAttention; megatron-core's for local).
ATTENTIONS = ("sdpa", "flex", "te")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer

# Local-spec norms live outside the linears; TE fuses them into the next linear. Both
# save under the TE names in distributed checkpoints, so either spec loads either.
_TE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def te_available() -> bool:
    """True when the ``transformer_engine`` package is installed."""
    return importlib.util.find_spec("transformer_engine") is not None


def check_backend(spec: str, fp8: Optional[str] = None) -> None:
    """Refuse, with one line, a layer implementation or FP8 this machine cannot run."""
    if spec not in SPECS:
        raise UserError(f"unknown layer spec {spec!r}; use one of: {', '.join(SPECS)}")
    if fp8 is not None and fp8 not in FP8_FORMATS:
        raise UserError(f"unknown fp8 format {fp8!r}; use one of: {', '.join(FP8_FORMATS)} (or leave it unset)")
    if fp8 is not None and spec != "transformer_engine":
        raise UserError("fp8 needs the 'transformer_engine' layer spec; set spec: transformer_engine or turn fp8 off")
    if spec == "transformer_engine" and not te_available():
        what = "fp8" if fp8 else "layer spec 'transformer_engine'"
        raise UserError(
            f"{what} needs NVIDIA Transformer Engine, which is not installed; "
            "install transformer-engine or use spec: local without fp8"
        )
    if spec == "transformer_engine":
        platform.require_gpu_feature("layer spec 'transformer_engine'")
    if fp8 is not None:
        platform.require_gpu_feature("fp8", min_capability=FP8_MIN_CAPABILITY)


def _te():
    """megatron-core's Transformer Engine wrappers (imported only for the TE spec)."""
    if not te_available():
        raise UserError("layer spec 'transformer_engine' needs NVIDIA Transformer Engine, which is not installed")
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except Exception as exc:  # pragma: no cover - needs a broken TE install
        raise UserError(f"Transformer Engine is installed but cannot be imported: {exc}") from None
    return te_ext


def _local_norm(rms: bool) -> type:
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider().layer_norm(rms_norm=rms, for_qk=False)


def vision_layer_spec(vision: VisionConfig, spec: str = "local", tp_group=None) -> ModuleSpec:
    """InternViT layer: pre-norm, bidirectional TP attention (optional cross-head qk-norm),
    GELU MLP, layer scale on both residual branches."""
    if spec not in SPECS:
        raise UserError(f"unknown layer spec {spec!r}; use one of: {', '.join(SPECS)}")
    qk_norm: Union[ModuleSpec, type] = IdentityOp
    if vision.qk_norm:
        qk_norm = ModuleSpec(
            module=CrossHeadRMSNorm, params={"num_real_heads": vision.num_heads, "tp_group": tp_group}
        )
    if spec == "local":
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        norm = RMSNorm if vision.norm == "RMSNorm" else _local_norm(False)
        qkv = fc1 = ColumnParallelLinear
        proj = fc2 = RowParallelLinear
        attention = SDPAttention  # megatron-core's DotProductAttention, fused
        input_norm = pre_mlp_norm = norm
        keys_map = dict(_TE_NORM_KEYS)
    else:
        te = _te()
        qkv = fc1 = te.TELayerNormColumnParallelLinear
        proj = fc2 = te.TERowParallelLinear
        attention = te.TEDotProductAttention
        input_norm = pre_mlp_norm = IdentityOp
        keys_map = {}
    if not vision.qkv_bias:
        qkv = without_bias(qkv)
    return ModuleSpec(
        module=LayerScaleTransformerLayer,
        params={"layer_scale_init": vision.layer_scale_init},
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=attention,
                    linear_proj=proj,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def default_attention(spec: str) -> str:
    """The LLM core attention a spec uses unless told otherwise."""
    return "sdpa" if spec == "local" else "te"


def language_layer_spec(
    spec: str = "local",
    attn_mask_type: AttnMaskType = AttnMaskType.causal,
    qk_norm: bool = False,
    tp_group=None,
    attention: Optional[str] = None,
    num_experts: Optional[int] = None,
) -> ModuleSpec:
    """The LLM layer: megatron-core's own GPT spec (RMSNorm, GQA attention, SwiGLU MLP, or
    with ``num_experts`` megatron-core's MoE layer: router, token dispatcher, SwiGLU experts).

    ``attn_mask_type`` is ``causal`` for plain rows; ``arbitrary`` makes Transformer Engine
    honour a custom ``attention_mask`` (packed pair rows). The local spec always applies
    the mask it is given. ``qk_norm`` (Qwen3) adds a per-head RMSNorm on queries and keys
    before RoPE, the same module under both specs (:class:`HeadRMSNorm`, which reduces
    its gradient over ``tp_group``). ``attention`` picks the core attention (one of
    ``ATTENTIONS``; None: :func:`default_attention`); the linears stay the spec's own, so
    FlexAttention under the TE spec keeps TE's fused, FP8-capable linears. Experts are
    megatron-core's ``SequentialMLP`` under the local spec and ``TEGroupedMLP`` (grouped
    GEMM) under TE; both save experts under the same distributed-checkpoint keys, and the
    pre-MLP norm of an MoE layer stays its own module (``pre_mlp_layernorm``: no linear to
    fuse it into), under either spec.
    """
    attention_kind = attention or default_attention(spec)
    if attention_kind not in ATTENTIONS:
        raise UserError(f"unknown attention {attention_kind!r}; use one of: {', '.join(ATTENTIONS)}")
    if attention_kind == "te" and spec != "transformer_engine":
        raise UserError("attention `te` is Transformer Engine's: it needs model.spec=transformer_engine")
    if spec == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer = get_gpt_layer_local_spec(normalization="RMSNorm", num_experts=num_experts, moe_grouped_gemm=False)
        # Same maths, fewer tensors kept for backward (what TE's fused modules do on GPU).
        layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = RMSNorm
        if num_experts:
            keys = dict(layer.submodules.sharded_state_dict_keys_map)
            keys.pop("pre_mlp_layernorm.", None)
            layer.submodules.sharded_state_dict_keys_map = keys
        else:
            layer.submodules.mlp.module = SwiGLUMLP
    elif spec == "transformer_engine":
        _te()
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=bool(num_experts))
    else:
        raise UserError(f"unknown layer spec {spec!r}; use one of: {', '.join(SPECS)}")
    attention = layer.submodules.self_attention
    attention.params = dict(attention.params, attn_mask_type=attn_mask_type)
    if attention_kind != "te":
        attention.submodules.core_attention = FlexAttention if attention_kind == "flex" else SDPAttention
    if qk_norm:
        head_norm = ModuleSpec(module=HeadRMSNorm, params={"tp_group": tp_group})
        attention.submodules.q_layernorm = attention.submodules.k_layernorm = head_norm
    return layer


def language_block_spec(
    spec: str, attn_mask_type: AttnMaskType, num_layers: int, qk_norm: bool = False, tp_group=None,
    attention: Optional[str] = None, moe_layers: Sequence[bool] = (), num_experts: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """The LLM block of one pipeline chunk: ``num_layers`` layers and a final RMSNorm.

    ``moe_layers``: for each of the chunk's layers, whether it has ``num_experts`` experts
    (empty: none has).

    The final norm is named here rather than left to megatron-core's import-time default
    (TENorm whenever Transformer Engine is importable, else a torch norm that refuses
    sequence parallelism): the local spec is then the same on every machine, with or
    without TE, and runs sequence parallel too.
    """
    final_norm = RMSNorm if spec == "local" else _te().TENorm
    moe_layers = list(moe_layers) or [False] * num_layers
    if len(moe_layers) != num_layers:
        raise ValueError(f"moe_layers has {len(moe_layers)} entries for {num_layers} layers")
    kinds = {moe: language_layer_spec(spec, attn_mask_type, qk_norm=qk_norm, tp_group=tp_group,
                                      attention=attention, num_experts=num_experts if moe else None)
             for moe in set(moe_layers)}
    return TransformerBlockSubmodules(layer_specs=[kinds[moe] for moe in moe_layers], layer_norm=final_norm)


@dataclass
class ProjectorSubmodules:
    """mlp1: LayerNorm(4C) then a TP MLP (column-parallel fc1, GELU, row-parallel fc2)."""

    layer_norm: Union[ModuleSpec, type]
    mlp: MLPSubmodules


def projector_spec(spec: str = "local") -> ProjectorSubmodules:
    if spec == "local":
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        return ProjectorSubmodules(_local_norm(False), mlp)
    if spec == "transformer_engine":
        te = _te()
        mlp = MLPSubmodules(linear_fc1=te.TEColumnParallelLinear, linear_fc2=te.TERowParallelLinear)
        return ProjectorSubmodules(te.TENorm, mlp)
    raise UserError(f"unknown layer spec {spec!r}; use one of: {', '.join(SPECS)}")

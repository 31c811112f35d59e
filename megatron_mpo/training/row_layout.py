"""How a micro-batch's rows are laid out for the model: packed or plain causal rows, the
core attention kernel that reads them, and the multiple rows are padded to.

Model, parallelism and precision decisions that the data pipeline must follow (it builds
the rows) and the model builder must match (it picks the kernel), so they live below both
``data_setup`` and ``model_setup``.
"""

from __future__ import annotations

from typing import Optional

from megatron_mpo.config import RunConfig
from megatron_mpo.training import precision

__all__ = ["pad_multiple", "packing_layout", "attention_kind", "packing_warning"]


def pad_multiple(cfg: RunConfig, plan) -> int:
    """Rows are padded to a multiple of this: what TP + sequence parallelism and FP8 need,
    and FlexAttention's block size under ``model.attention: flex``."""
    import math

    from megatron_mpo.models.packed_attention import FLEX_BLOCK_SIZE

    multiple = precision.sequence_multiple(cfg.parallel.tensor, cfg.parallel.sequence, plan.fp8_recipe)
    if attention_kind(cfg) == "flex":
        multiple = math.lcm(multiple, FLEX_BLOCK_SIZE)
    return multiple


def packing_layout(cfg: RunConfig) -> str:
    """``packed`` (pairs share their prompt, several per row) or ``unpacked`` (causal rows).

    ``data.packing: null`` (default) packs with the local spec only. Under the Transformer
    Engine spec packed rows run on FlexAttention's block-sparse kernel (``model.attention``
    null), which this project has not yet measured against FlashAttention on plain rows
    on a GPU (``benchmarks/gpu_bench.py`` does, in the GPU kit); until it has, the TE
    default stays the plain rows whose kernel is known. Set ``data.packing: true`` to
    pack under TE.
    """
    packing = cfg.data.packing
    if packing is None:
        packing = cfg.model.spec != "transformer_engine"
    return "packed" if packing else "unpacked"


def attention_kind(cfg: RunConfig) -> str:
    """The LLM core attention: ``model.attention``, else ``sdpa`` for the local spec, and
    for Transformer Engine ``te`` on plain rows, ``flex`` on packed rows (TE has no fused
    kernel for their mask)."""
    if cfg.model.attention:
        return cfg.model.attention
    if cfg.model.spec != "transformer_engine":
        return "sdpa"
    return "flex" if packing_layout(cfg) == "packed" else "te"


def packing_warning(cfg: RunConfig, model_config) -> Optional[str]:
    """A warning line when packed rows are forced onto TE's unfused attention, with its cost."""
    if attention_kind(cfg) != "te" or packing_layout(cfg) != "packed":
        return None
    lang = model_config.language
    heads = lang.num_heads // cfg.parallel.tensor
    bytes_per = 2 if cfg.precision.dtype == "bf16" else 4
    per_layer = cfg.train.micro_batch * heads * cfg.data.max_length**2 * bytes_per
    total = per_layer * lang.num_layers / cfg.parallel.pipeline
    return (
        f"data.packing=true with model.attention=te: packed rows run on TE's unfused "
        f"attention, which keeps [b, heads/TP, S, S] probabilities per layer: up to "
        f"{total / 2**30:.1f} GiB per rank at data.max_length={cfg.data.max_length}; "
        "use model.attention=flex (block sparse), or data.packing=false (FlashAttention on causal rows)"
    )

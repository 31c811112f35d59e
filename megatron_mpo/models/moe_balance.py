"""The router's load-balancing loss as the checkpoint's coefficient means it.

A Qwen3-MoE ``config.json``'s ``router_aux_loss_coef`` weighs transformers'
``load_balancing_loss_func``: ONE term, ``E x sum_e f_e P_e`` over all MoE layers' tokens
pooled (``f_e``: share of the top-k choices that go to expert ``e``, ``P_e``: its mean
router probability), which is ``top_k`` at perfect balance. megatron-core's ``aux_loss``
adds one term PER MoE layer, ``E / (k T^2) x sum_e tokens_e x probs_e``, which is 1 at
perfect balance; on one layer's logits it is transformers' formula divided by ``top_k``.
So with ``moe_aux_loss_coeff = coef x top_k / num_moe_layers`` (the ``transformers``
convention, the default) the added term is ``coef`` x the mean over MoE layers of
transformers' formula on each layer's logits: the same value at balance (``coef x
top_k``), and exactly transformers' value and gradient for one MoE layer. Over several
layers transformers pools the counts, so its value also holds cross-layer products
(``f`` of one layer times ``P`` of another); a per-layer loss cannot hold those, and the
two agree where every layer's counts are equal (at balance). ``megatron`` keeps
megatron-core's own reading: the coefficient per layer, ``num_moe_layers / top_k`` times
the strength (6 for InternVL3.5-30B-A3B: 48 layers, top-8).

Padding: megatron-core 0.16.1 takes a ``padding_mask`` ([B, S], True = padding) down
GPTModel -> TransformerBlock -> TransformerLayer -> MoELayer -> router, and leaves those
positions out of the load-balancing statistics and gradient (as transformers'
``attention_mask`` does). They are still dispatched to experts and computed: the
dropless all-to-all dispatcher assumes ``tokens x top_k`` routes. Being dropless, a
padded position changes no real token's experts or outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megatron_mpo.errors import UserError
from megatron_mpo.models.config import LanguageConfig

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig
    from torch import Tensor

__all__ = ["AUX_LOSS_CONVENTIONS", "num_moe_layers", "megatron_aux_loss_coeff", "sequence_parallel_padding"]

AUX_LOSS_CONVENTIONS = ("transformers", "megatron")


def num_moe_layers(language: LanguageConfig) -> int:
    """LLM layers with experts (the layers whose router logits transformers pools)."""
    return sum(language.is_moe_layer(i) for i in range(language.num_layers))


def megatron_aux_loss_coeff(language: LanguageConfig, convention: str = "transformers") -> float:
    """megatron-core's ``moe_aux_loss_coeff`` for ``language.router_aux_loss_coef`` read in
    ``convention`` (see the module doc)."""
    if convention not in AUX_LOSS_CONVENTIONS:
        raise UserError(f"load-balancing convention {convention!r} is not known (mpo.router_aux_loss_convention); "
                        f"choose one of {', '.join(AUX_LOSS_CONVENTIONS)}")
    coef = float(language.router_aux_loss_coef)
    layers = num_moe_layers(language)
    if convention == "megatron" or not layers:
        return coef
    return coef * language.num_experts_per_tok / layers


def sequence_parallel_padding(padding: Optional["Tensor"], config: "TransformerConfig",
                              tp_group=None) -> Optional["Tensor"]:
    """``padding`` [B, S] cut to this rank's sequence part under sequence parallelism (the
    MoE layers see ``S / TP`` positions). GPTModel does this only for a mask it embeds
    itself; InternVLModel passes the embeddings, and later pipeline stages embed nothing."""
    if padding is None or not config.sequence_parallel:
        return padding
    from megatron.core import tensor_parallel

    part = tensor_parallel.scatter_to_sequence_parallel_region(padding.transpose(0, 1).contiguous(), group=tp_group)
    return part.transpose(0, 1).contiguous()


def reset_load_balancing_tracker() -> None:
    """Forget megatron-core's per-layer aux-loss log of any earlier model in this process.

    The tracker is a module-level dict whose per-layer vector is sized by the first model
    that logs into it; a later model with more MoE layers (a test, an evaluation beside the
    trainer) would index past its end. Building a mixture-of-experts model starts it anew,
    and forgets the aux loss's backward scale (another module-level value, whose shape the
    first caller fixes: the schedules pass [1], a direct caller may pass []).
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None

"""Per-rank memory of a training layout: model state, activations in flight, FP8 caches.

Model state follows what megatron-core's DistributedDataParallel and DistributedOptimizer
hold, as :mod:`megatron_mpo.training.optim` builds them: weights in ``precision.dtype``
(the local spec's torch LayerNorms stay fp32), gradients in fp32 buffers
(``grad_reduce_in_fp32``), and -- sharded over the data-parallel ranks, expert parameters
over the expert-data-parallel ranks -- Adam's two fp32 moments plus, under bf16, an fp32
master copy: 2 + 4 + 12 / DP bytes per bf16 parameter, Megatron-LM's
``6 + 12 / data_parallel_size``. Frozen parts keep only their weights. Transformer
Engine's FP8 linears cache an FP8 weight and its transpose between micro-batches (2 bytes
per LLM GEMM parameter). Activations come from :mod:`~megatron_mpo.plan.activations`, times
the micro-batches 1F1B keeps in flight on the stage; the working set adds the largest
transient buffer of a step (the bf16 logits of the scored tokens, or one layer's
gradients in its backward).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mpo.plan.activations import Phases, Rows, in_flight, stage_activations
from megatron_mpo.plan.params import Parallelism, StageParams, stage_params

__all__ = ["Precision", "StageMemory", "model_state", "stage_memory"]

GIB = 2**30


@dataclass(frozen=True)
class Precision:
    """What the model runs in and is built with (the run config's model and precision)."""

    dtype: str = "bf16"  # fp32 | bf16
    fp8: bool = False
    spec: str = "local"
    attention: str = "sdpa"
    frozen: tuple = ()

    @property
    def bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2


@dataclass(frozen=True)
class StageMemory:
    """Bytes one rank of a pipeline stage holds at its peak."""

    params: StageParams
    weights: float
    grads: float
    master: float
    adam: float
    fp8_cache: float
    micro_batch: Phases  # one micro-batch's activations
    in_flight: float
    working_set: float

    @property
    def model_state(self) -> float:
        return self.weights + self.grads + self.master + self.adam

    @property
    def activations(self) -> float:
        """Activations of every micro-batch in flight, one of them at its backward peak."""
        return (self.in_flight - 1) * self.micro_batch.stored + self.micro_batch.peak

    @property
    def total(self) -> float:
        return self.model_state + self.fp8_cache + self.activations + self.working_set


def _trainable(params: StageParams, frozen: tuple) -> tuple[int, int, int]:
    """(dense, expert, fp32) parameters that train (enter the gradient buffers)."""
    dense = sum(n for part, n in (("vision", params.vision), ("projector", params.projector),
                                  ("language", params.llm)) if part not in frozen)
    experts = params.experts if "language" not in frozen else 0
    fp32 = params.fp32 if "vision" not in frozen else 0  # the local spec's LayerNorms: vision + projector
    return dense, experts, min(fp32, dense)


def model_state(params: StageParams, layout: Parallelism, precision: Precision) -> tuple[float, float, float, float]:
    """(weights, gradients, fp32 master weights, Adam moments) bytes of one rank."""
    b = precision.bytes
    weights = b * (params.total - params.fp32) + 4 * params.fp32
    dense, experts, fp32 = _trainable(params, precision.frozen)
    grads = 4.0 * (dense + experts)
    master = 0.0
    if b != 4:  # fp32 parameters are their own master copy
        master = 4.0 * (dense - fp32) / layout.data + 4.0 * experts / layout.expert_data
    adam = 8.0 * dense / layout.data + 8.0 * experts / layout.expert_data
    return weights, grads, master, adam


def stage_memory(model, layout: Parallelism, stage: int, rows: Rows, micro_batches: int,
                 precision: Precision) -> StageMemory:
    """One rank of ``stage``: model state, FP8 cache, activations of the micro-batches in
    flight (``micro_batches`` per step on this data-parallel rank) and a working set."""
    params = stage_params(model, layout, stage, precision.spec, precision.dtype, precision.frozen)
    weights, grads, master, adam = model_state(params, layout, precision)
    fp8_cache = 2.0 * params.llm_linear if precision.fp8 else 0.0
    phases = stage_activations(model, layout, stage, params.layers, rows, dtype_bytes=precision.bytes,
                               attention=precision.attention, spec=precision.spec, frozen=precision.frozen)
    return StageMemory(params=params, weights=weights, grads=grads, master=master, adam=adam,
                       fp8_cache=fp8_cache, micro_batch=phases,
                       in_flight=in_flight(layout, stage, micro_batches),
                       working_set=_working_set(model, layout, stage, params, rows, precision))


def _working_set(model, layout: Parallelism, stage: int, params: StageParams, rows: Rows,
                 precision: Precision) -> float:
    """The largest transient of a step on this stage: the scored tokens' logits in the
    compute dtype (last stage), or a layer's output gradient and recomputed inputs --
    taken as one LLM layer's hidden states x 4 -- or one vision layer over the tiles."""
    lang, b, t = model.language, precision.bytes, layout.tensor
    logits = rows.scored * lang.padded_vocab_size // t * b if stage == layout.pipeline - 1 else 0
    hidden = 4 * rows.tokens * lang.hidden_size * b
    vision = 0
    if stage == 0 and rows.tiles:
        vis = model.vision
        vision = 4 * rows.tiles * rows.pairs * (vis.grid**2 + 1) * vis.hidden_size * b
    return float(max(logits, hidden, vision))

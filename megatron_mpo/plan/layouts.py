"""Layouts a model can train with on a number of GPUs, and the ones that fit, fastest first.

Candidates are every tensor size that fits the model (:func:`_tensor_problems`, the
run's own rule) and stays inside a node, every pipeline size whose replicas tile the GPUs,
every expert-parallel size dividing the experts (tensor x expert inside a node), with
sequence parallelism whenever TP > 1 (the recipes' rule: it only saves memory), and no or
full recomputation. Each candidate passes :func:`~megatron_mpo.parallel_layout.check_layout`
and needs a data-parallel size that divides the global batch. A pipeline's LLM layers are
split to balance compute: the first stage also runs the vision tower, the last the output
layer.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

from megatron_mpo.errors import UserError
from megatron_mpo.plan.params import Parallelism

__all__ = ["balanced_split", "candidates", "suggest"]

MAX_PIPELINE = 16


def balanced_split(layers: int, stages: int, first: float = 0.0, last: float = 0.0) -> Optional[tuple]:
    """LLM layers per stage (each >= 1) that even out the stages' compute, the first stage
    costing ``first`` layers' worth more and the last ``last`` more; None for one stage,
    () when there are fewer layers than stages."""
    if stages == 1:
        return None
    if layers < stages:
        return ()
    extra = [first] + [0.0] * (stages - 2) + [last]
    pinned: set = set()  # stages whose extra alone exceeds the common cost: one layer each
    while True:
        free = [s for s in range(stages) if s not in pinned]
        cost = (layers - len(pinned) + sum(extra[s] for s in free)) / len(free)
        short = {s for s in free if cost - extra[s] < 1}
        if not short or len(short) == len(free):
            break
        pinned |= short
    target = [1.0 if s in pinned else max(1.0, cost - extra[s]) for s in range(stages)]
    counts = [int(t) for t in target]
    for s in sorted(range(stages), key=lambda s: counts[s] - target[s])[: max(0, layers - sum(counts))]:
        counts[s] += 1
    while sum(counts) > layers:  # targets raised to one layer: take the surplus from the largest
        counts[counts.index(max(counts))] -= 1
    return tuple(counts)


def candidates(model, gpus: int, *, global_batch: int, micro_batch: int, gpus_per_node: int = 8,
               stage_costs: tuple = (0.0, 0.0)) -> Iterator[Parallelism]:
    """Every valid layout on ``gpus`` GPUs (recompute off and full); ``stage_costs``: the
    (first, last) stage's extra compute in LLM layers' worth, for the pipeline split."""
    from megatron_mpo.parallel_layout import _tensor_problems, check_layout

    lang = model.language
    experts = [e for e in range(1, lang.num_experts + 1) if lang.num_experts % e == 0] if lang.is_moe else [1]
    for tensor in (1, 2, 4, 8, 16):
        if tensor > gpus_per_node or gpus % tensor or _tensor_problems(model, tensor):
            continue
        for pipeline in range(1, min(MAX_PIPELINE, lang.num_layers) + 1):
            if gpus % (tensor * pipeline):
                continue
            data = gpus // (tensor * pipeline)
            if global_batch % (data * micro_batch):
                continue
            split = balanced_split(lang.num_layers, pipeline, *stage_costs)
            if split == ():
                continue
            for expert in experts:
                if data % expert or tensor * expert > gpus_per_node:
                    continue
                try:
                    check_layout(model, tensor, pipeline, expert, sequence=tensor > 1, pipeline_layers=split)
                except UserError:
                    continue
                for recompute in (None, "full"):
                    yield Parallelism(tensor=tensor, pipeline=pipeline, data=data, expert=expert,
                                      sequence=tensor > 1, pipeline_layers=split, recompute=recompute)


def suggest(cfg, model, hardware, assumptions, limit: int = 5) -> list:
    """The fastest fitting plans on ``hardware`` (worst case first; typical-only fits after
    them, marked by :meth:`Plan.fits`), at most ``limit``."""
    from megatron_mpo.plan.run import make_plan, workloads

    costs = _stage_costs(model, workloads(cfg, model, assumptions)["typical"])
    plans = []
    for layout in candidates(model, hardware.gpus, global_batch=cfg.train.global_batch,
                             micro_batch=cfg.train.micro_batch, gpus_per_node=hardware.gpus_per_node,
                             stage_costs=costs):
        plan = make_plan(cfg, model, layout, hardware, dataclasses.replace(assumptions, pairs=0))
        if plan.fits("typical"):
            plans.append(plan)
    plans.sort(key=lambda p: (not p.fits("worst"), p.time.seconds))
    return plans[:limit]


def _stage_costs(model, rows) -> tuple:
    """(vision + projector, output layer) FLOPs of a micro-batch in LLM layers' worth."""
    from megatron_mpo.training.flops import FlopCounter

    counter = FlopCounter(model)
    layer = (rows.tokens * counter.llm_linear_flops_per_token()
             + rows.attended * counter.llm_score_flops_per_key()) / model.language.num_layers
    vision = rows.tiles * rows.pairs * counter.vision_flops_per_tile()
    logits = rows.scored * counter.logits_flops_per_token()
    return vision / layer, logits / layer

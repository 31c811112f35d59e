"""A run config and the hardware -> the plan: the rows a micro-batch holds, each pipeline
stage's memory for the worst and a typical pair, and the step and epoch time.

The worst case fills both rows of a pair to ``data.max_length``, once with the most image
tiles a sample may have (``data.max_tiles`` plus the thumbnail) and once text-only (the
longest responses, so the most scored tokens); a stage's worst case is the larger of the
two. The typical pair fills ``--fill`` of ``data.max_length`` per row with ``--fill`` of
those tiles (stated assumptions, not measured data).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_mpo.config import RunConfig
from megatron_mpo.errors import UserError
from megatron_mpo.plan.activations import Rows
from megatron_mpo.plan.memory import GIB, Precision, StageMemory, stage_memory
from megatron_mpo.plan.params import Parallelism
from megatron_mpo.plan.timing import GpuKind, StepTime, step_time

__all__ = ["Hardware", "Assumptions", "Plan", "model_of", "layout_of", "precision_of", "workloads", "make_plan",
           "PROMPT_TEXT_TOKENS", "DEFAULT_FILL", "WORST_CASES"]

PROMPT_TEXT_TOKENS = 64  # template, question and image markers around the image tokens
DEFAULT_FILL = 0.5
DEFAULT_RESERVE_GIB = 4.0
WORST_CASES = ("worst, image-heavy", "worst, text only")


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu: GpuKind
    gpus_per_node: int = 8
    reserve_gib: float = DEFAULT_RESERVE_GIB  # CUDA context, NCCL buffers, allocator fragmentation

    @property
    def usable(self) -> float:
        """Bytes the estimate (what torch.cuda.max_memory_allocated shows) may reach."""
        return (self.gpu.memory_gib - self.reserve_gib) * GIB


@dataclass(frozen=True)
class Assumptions:
    fill: float = DEFAULT_FILL
    tiles: Optional[int] = None  # typical tiles per pair; None: fill x (max_tiles + thumbnail)
    mfu: Optional[float] = None
    pairs: Optional[int] = None  # pairs per epoch when the shards' index.json does not say


@dataclass
class Plan:
    model: object
    layout: Parallelism
    hardware: Hardware
    precision: Precision
    micro_batches: int  # per step, per data-parallel rank
    rows: dict  # case -> Rows
    memory: dict  # case -> [StageMemory per pipeline stage]
    time: StepTime  # at the typical pair
    steps: Optional[int] = None  # per epoch
    pairs: Optional[int] = None
    run_steps: Optional[int] = None  # the whole run: train.steps, or train.epochs over the pairs
    run_source: str = ""

    def worst(self) -> StageMemory:
        """The fullest rank over the worst cases."""
        return max((m for case in WORST_CASES for m in self.memory[case]), key=lambda m: m.total)

    def typical(self) -> StageMemory:
        return max(self.memory["typical"], key=lambda m: m.total)

    def fits(self, case: str = "worst") -> bool:
        peak = self.worst() if case == "worst" else self.typical()
        return peak.total <= self.hardware.usable

    def stage(self, index: int) -> StageMemory:
        """Stage ``index`` in its own worst case."""
        return max((self.memory[case][index] for case in WORST_CASES), key=lambda m: m.total)


def model_of(cfg: RunConfig, config_path: Optional[str] = None, preset: Optional[str] = None):
    """The architecture: ``preset`` (a flag), ``model.preset``, ``model.init``'s model dir,
    or -- for a recipe whose checkpoint is not converted yet -- its ``# preset: NAME`` line."""
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.model_setup import model_config

    if preset:
        return get_preset(preset)
    if cfg.model.preset or (cfg.model.init and Path(cfg.model.init).exists()):
        return model_config(cfg)
    if config_path:
        for line in Path(config_path).read_text().splitlines():
            if not line.startswith("#"):
                break
            found = re.match(r"#\s*preset:\s*(\S+)\s*$", line)
            if found:
                return get_preset(found.group(1))
    raise UserError(f"model.init {cfg.model.init} does not exist yet: name the architecture with --preset NAME "
                    "(or model.preset=NAME)")


def precision_of(cfg: RunConfig) -> Precision:
    from megatron_mpo.training.row_layout import attention_kind

    return Precision(dtype=cfg.precision.dtype, fp8=cfg.precision.fp8 is not None, spec=cfg.model.spec,
                     attention=attention_kind(cfg), frozen=tuple(cfg.model.freeze))


def layout_of(cfg: RunConfig, model, gpus: int) -> Parallelism:
    """The config's layout on ``gpus`` GPUs (the rest is data parallelism); UserError when
    they cannot hold it."""
    from megatron_mpo.parallel_layout import check_layout

    p = cfg.parallel
    check_layout(model, p.tensor, p.pipeline, p.expert, sequence=p.sequence, virtual_pipeline=p.virtual_pipeline,
                 pipeline_layers=p.pipeline_layers)
    group = p.tensor * p.pipeline
    if gpus % (group * p.expert):
        raise UserError(f"{gpus} GPUs do not hold whole tensor x pipeline x expert = {group * p.expert} groups; "
                        f"use a multiple of {group * p.expert} (--gpus)")
    data = gpus // group
    if cfg.train.global_batch % (data * cfg.train.micro_batch):
        raise UserError(f"train.global_batch {cfg.train.global_batch} is not a multiple of micro_batch "
                        f"{cfg.train.micro_batch} x data-parallel size {data} on {gpus} GPUs")
    return Parallelism(tensor=p.tensor, pipeline=p.pipeline, data=data, expert=p.expert, sequence=p.sequence,
                       virtual_pipeline=p.virtual_pipeline,
                       pipeline_layers=tuple(p.pipeline_layers) if p.pipeline_layers else None,
                       recompute=cfg.model.recompute)


def workloads(cfg: RunConfig, model, assumptions: Assumptions) -> dict:
    """case -> the :class:`Rows` of one micro-batch (see the module docstring)."""
    from megatron_mpo.training import precision
    from megatron_mpo.training.data_setup import run_tiling
    from megatron_mpo.training.row_layout import pad_multiple, packing_layout

    tiling = run_tiling(cfg, model)[0]
    most = tiling.max_tiles + (1 if tiling.thumbnail and tiling.max_tiles > 1 else 0) if tiling.dynamic_tiling else 1
    tpt, length = model.tokens_per_tile, cfg.data.max_length
    common = dict(pairs=cfg.train.micro_batch, packed=packing_layout(cfg) == "packed",
                  pad_multiple=pad_multiple(cfg, precision.training_precision(cfg)), tokens_per_tile=tpt)

    def pair(row: int, tiles: int) -> Rows:
        tiles = max(0, min(tiles, (row - PROMPT_TEXT_TOKENS - 1) // tpt))
        prompt = min(row - 1, tiles * tpt + PROMPT_TEXT_TOKENS)
        return Rows(prompt=prompt, response=row - prompt, tiles=tiles, **common)

    if not 0 < assumptions.fill <= 1:
        raise UserError(f"--fill must be in (0, 1], got {assumptions.fill}")
    typical_tiles = assumptions.tiles if assumptions.tiles is not None else max(1, round(assumptions.fill * most))
    return {WORST_CASES[0]: pair(length, most), WORST_CASES[1]: pair(length, 0),
            "typical": pair(max(2, int(assumptions.fill * length)), typical_tiles)}


def make_plan(cfg: RunConfig, model, layout: Parallelism, hardware: Hardware,
              assumptions: Assumptions = Assumptions()) -> Plan:
    """Memory of every pipeline stage for each case, and the time at the typical pair."""
    from megatron_mpo.training.data_setup import shard_total

    precision = precision_of(cfg)
    micro = cfg.train.global_batch // (cfg.train.micro_batch * layout.data)
    rows = workloads(cfg, model, assumptions)
    memory = {case: [stage_memory(model, layout, s, r, micro, precision) for s in range(layout.pipeline)]
              for case, r in rows.items()}
    timing = step_time(model, layout, rows["typical"], global_batch=cfg.train.global_batch,
                       micro_batch=cfg.train.micro_batch, gpu=hardware.gpu, mfu=assumptions.mfu,
                       fp8=precision.fp8, frozen=precision.frozen)
    pairs = assumptions.pairs if assumptions.pairs is not None else shard_total(cfg)
    steps = int(math.floor(pairs / cfg.train.global_batch)) if pairs else None
    run_steps, source = cfg.train.steps, f"train.steps {cfg.train.steps}"
    if run_steps is None and pairs:  # as the trainer counts: whole global batches in the epochs' pairs
        run_steps, source = int(math.floor(cfg.train.epochs * pairs / cfg.train.global_batch)), \
            f"train.epochs {cfg.train.epochs:g}"
    return Plan(model=model, layout=layout, hardware=hardware, precision=precision, micro_batches=micro, rows=rows,
                memory=memory, time=timing, steps=steps, pairs=pairs, run_steps=run_steps, run_source=source)

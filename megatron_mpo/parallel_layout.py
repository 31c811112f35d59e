"""The rules a parallel layout must satisfy, in one place.

A layout is tensor x pipeline x expert parallelism, virtual pipeline stages, sequence
parallelism and an optional uneven layer split. The run config (no model, no world yet),
the trainer's and reference tool's start-up (the model and torchrun's world size), the
model builder and the HF converter all call :func:`check_layout`, so a layout is refused
with the same one line wherever it is met first. Standard library only: the config
module checks layouts without importing torch.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_mpo.errors import UserError

__all__ = ["check_layout", "check_world"]


def check_layout(
    model: Any = None,
    tensor: int = 1,
    pipeline: int = 1,
    expert: int = 1,
    *,
    sequence: Optional[bool] = False,
    virtual_pipeline: Optional[int] = None,
    pipeline_layers: Optional[Sequence[int]] = None,
    world_size: Optional[int] = None,
) -> None:
    """Refuse a layout with one line. ``model``: an ``InternVLConfig`` (None before it is
    known: the rules that need it wait); ``world_size``: the launch's process count (None
    before torchrun says). ``sequence=None``: not known here (the model builder), its rules
    wait."""
    for name, value in (("tensor", tensor), ("pipeline", pipeline), ("expert", expert)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"parallel.{name} must be a positive number, got {value!r}")
    if virtual_pipeline is not None:
        if virtual_pipeline < 1:
            raise UserError(f"parallel.virtual_pipeline must be a positive number, got {virtual_pipeline!r}")
        if pipeline < 2:
            raise UserError("parallel.virtual_pipeline needs parallel.pipeline >= 2")
    if sequence and tensor < 2:
        raise UserError("parallel.sequence (sequence_parallel splits the sequence over tensor-parallel ranks) "
                        "needs tensor parallel size >= 2 (parallel.tensor)")
    chunks = pipeline * (virtual_pipeline or 1)
    if pipeline_layers is not None and len(pipeline_layers) != chunks:
        raise UserError(
            f"parallel.pipeline_layers has {len(pipeline_layers)} entries; it needs one per "
            f"pipeline stage{' and virtual stage' if virtual_pipeline else ''} ({chunks})"
        )
    # megatron-core trains MoE layers under tensor parallelism only with sequence
    # parallelism. Before the model is known, expert > 1 says the model must have experts.
    moe = model.language.is_moe if model is not None else expert > 1
    if moe and tensor > 1 and sequence is False:
        raise UserError("a mixture-of-experts LLM with parallel.tensor > 1 needs parallel.sequence: true "
                        "(megatron-core trains MoE layers under tensor parallelism only with it)")
    if model is not None:
        _check_model(model, tensor, pipeline, expert)
    if world_size is not None:
        check_world(world_size, tensor, pipeline, expert)


def check_world(world_size: int, tensor: int, pipeline: int, expert: int = 1) -> None:
    """The world must be a whole number of TP x PP model replicas, and the expert-parallel
    groups (TP x EP ranks per pipeline stage) must tile it too."""
    if world_size == 1 and tensor * pipeline * expert > 1 and "LOCAL_RANK" not in os.environ:
        need = tensor * pipeline * expert
        command = _this_command()
        raise UserError(
            f"this layout (tensor={tensor} x pipeline={pipeline} x expert={expert}) needs {need} processes, but "
            f"this one was started without torchrun; start it as: torchrun --nproc-per-node {need} {command}"
        )
    if world_size % (tensor * pipeline) != 0:
        raise UserError(
            f"{world_size} processes cannot hold whole model replicas of tensor={tensor} x "
            f"pipeline={pipeline}; launch a multiple of {tensor * pipeline} processes"
        )
    if world_size % (tensor * pipeline * expert) != 0:
        raise UserError(
            f"{world_size} processes cannot hold whole expert-parallel groups of parallel.expert={expert} "
            f"(tensor x pipeline x expert = {tensor * pipeline * expert}); launch a multiple of "
            f"{tensor * pipeline * expert} processes or lower parallel.expert"
        )


def _this_command() -> str:
    """This process's command line as torchrun takes it (``-m module`` for the package's own
    entry points, which ``python -m`` reports as a file path)."""
    if not sys.argv or not sys.argv[0]:
        return "<your command and its arguments>"
    program = Path(sys.argv[0]).resolve()
    package = Path(__file__).resolve().parent
    head = [sys.argv[0]]
    if program.suffix == ".py" and package in program.parents:
        module = program.relative_to(package.parent).with_suffix("")
        head = ["-m", ".".join(module.parts)]
    return " ".join(shlex.quote(a) for a in head + sys.argv[1:])


def _check_model(model: Any, tensor: int, pipeline: int, expert: int) -> None:
    """What the architecture can be split into: experts over EP, layers over PP, every
    split dimension over TP."""
    lang, vis = model.language, model.vision
    if expert > 1 and not lang.is_moe:
        raise UserError(f"parallel.expert={expert} but the model's LLM ({lang.family}) has no experts; "
                        "set parallel.expert: 1")
    if lang.is_moe and lang.num_experts % expert:
        raise UserError(f"parallel.expert={expert} does not divide the model's {lang.num_experts} experts")
    if lang.num_layers < pipeline:
        raise UserError(f"pipeline size {pipeline} exceeds the LLM's {lang.num_layers} layers")
    problems = _tensor_problems(model, tensor)
    if problems:
        fits = [str(t) for t in range(1, 17) if not _tensor_problems(model, t)]
        raise UserError(f"parallel.tensor={tensor} does not fit the model: {'; '.join(problems)}; tensor sizes "
                        f"that fit: {', '.join(fits)}")


def _tensor_problems(model: Any, tensor: int) -> list[str]:
    """Each rule of megatron-core's tensor-parallel split that ``tensor`` breaks, in words."""
    lang, vis = model.language, model.vision
    problems = []
    if lang.num_heads % tensor:
        problems.append(f"the LLM's {lang.num_heads} attention heads must be a multiple of it")
    if lang.num_kv_heads % tensor and tensor % lang.num_kv_heads:
        problems.append(f"the LLM's {lang.num_kv_heads} KV heads must be a multiple of it, or it a multiple of "
                        "them (each KV head is then shared by several tensor ranks)")
    if lang.ffn_hidden_size % tensor or lang.hidden_size % tensor:
        problems.append("the LLM's hidden and FFN sizes must be multiples of it")
    if lang.is_moe and lang.moe_intermediate_size % tensor:
        problems.append(f"the expert FFN size {lang.moe_intermediate_size} must be a multiple of it")
    if lang.padded_vocab_size % tensor:
        problems.append(f"the padded vocabulary {lang.padded_vocab_size} must be a multiple of it "
                        "(raise vocab_size_divisible_by)")
    if vis.heads % tensor:
        problems.append(f"the vision tower's {vis.heads} heads must be a multiple of it "
                        f"(or set vision.num_padded_heads to a multiple of {tensor})")
    if vis.ffn_hidden_size % tensor:
        problems.append(f"the vision FFN size {vis.ffn_hidden_size} must be a multiple of it")
    return problems

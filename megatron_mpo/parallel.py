"""Process groups for tensor / pipeline / data parallelism (megatron-core parallel_state).

The layout is computed once and passed around explicitly as a :class:`Layout`; modules
that need a group take it from there rather than from globals of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mpo import platform
from megatron_mpo.parallel_layout import check_world


@dataclass(frozen=True)
class Layout:
    """This rank's coordinates in the (DP, PP, TP) grid; ``expert``: expert-parallel ranks
    (carved out of the data-parallel ones: each holds 1/expert of every MoE layer's experts)."""

    tensor: int
    pipeline: int
    data: int
    tensor_rank: int
    pipeline_rank: int
    data_rank: int
    virtual_pipeline: Optional[int] = None
    expert: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.pipeline - 1

    @property
    def data_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()


def initialize(
    tensor: int = 1,
    pipeline: int = 1,
    virtual_pipeline: Optional[int] = None,
    seed: int = 1234,
    expert: int = 1,
    device: str = "auto",
    timeout_minutes: float = 10.0,
) -> Layout:
    """Start torch.distributed (if needed) and megatron-core's model-parallel groups.

    ``timeout_minutes``: how long any collective waits for a missing rank (a lost node)
    before the job fails, on the default group and on every model-parallel group.
    """
    platform.setup(device)
    platform.init_distributed(timeout_minutes)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mpo.models import drop_path

    world = torch.distributed.get_world_size()
    check_world(world, tensor, pipeline, expert)
    if parallel_state.model_parallel_is_initialized():
        release_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Same seed on every rank for replicated weights; megatron-core offsets the
    # tensor-parallel stream per TP rank inside the tracker, the vision tower's drop-path
    # stream is offset per data-parallel rank.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    drop_path.seed_rng(seed)
    return current_layout()


def current_layout() -> Layout:
    """The layout of the already-initialised parallel state."""
    from megatron.core import parallel_state as ps

    return Layout(
        tensor=ps.get_tensor_model_parallel_world_size(),
        pipeline=ps.get_pipeline_model_parallel_world_size(),
        data=ps.get_data_parallel_world_size(),
        tensor_rank=ps.get_tensor_model_parallel_rank(),
        pipeline_rank=ps.get_pipeline_model_parallel_rank(),
        data_rank=ps.get_data_parallel_rank(),
        virtual_pipeline=ps.get_virtual_pipeline_model_parallel_world_size(),
        expert=ps.get_expert_model_parallel_world_size(),
    )


def release_model_parallel() -> None:
    """Tear down megatron-core's model-parallel groups, keeping the default process group.

    ``destroy_model_parallel`` only forgets its groups: torch.distributed keeps every one
    (and each gloo group's two run-loop threads and TCP loop) until the default group is
    destroyed. A process that lays out its ranks again -- the planner's checks, a tool
    building several layouts, a test module -- piled up ~60 threads per layout, which
    wake and compete for the CPU (seen: 3300 threads in one test process). Destroying a
    subgroup is local to the rank: no collective.
    """
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    parallel_state.destroy_model_parallel()
    world = torch.distributed.group.WORLD
    for group in list(distributed_c10d._world.pg_map):  # torch.distributed lists its groups nowhere public
        if group is not None and group is not world:
            torch.distributed.destroy_process_group(group)


def shutdown() -> None:
    """Tear down model-parallel groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # every group


def all_ranks_true(flag: bool) -> bool:
    """True on every rank when ``flag`` holds on every rank (one all-reduce)."""
    return max_over_ranks(0 if flag else 1) == 0


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value``, on every rank (one all-reduce)."""
    tensor = torch.tensor([float(value)], device=platform.device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())

"""Step arithmetic and the one driver of megatron-core's forward/backward schedules."""

from __future__ import annotations

import math

from megatron_mpo.config import RunConfig
from megatron_mpo.errors import UserError
from megatron_mpo.parallel import Layout

__all__ = ["forward_backward_func", "run_schedule", "micro_batches_per_step", "total_steps"]


def forward_backward_func():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


def run_schedule(schedule, forward_step, chunks: list, micro_batches: list, pad_id: int, *, forward_only: bool):
    """One call of megatron-core's schedule over ``micro_batches`` (trainer and reference tool).

    With several chunks (interleaved schedule) every chunk reads the micro-batches through
    its own iterator, and all are padded to one length: that schedule sends one fixed
    activation shape between stages. Padding is causal and unlabelled, so log-probs do not
    change.
    """
    from megatron.core import parallel_state

    from megatron_mpo.batch import pad_to_length

    seq_len = max(b.input_ids.shape[1] for b in micro_batches)
    real = len(micro_batches)
    if len(chunks) > 1:
        micro_batches = [pad_to_length(b, seq_len, pad_id) for b in micro_batches]
        # That schedule runs whole groups of pipeline-size micro-batches. The trainer's
        # step size is checked up front; a forward-only tail is topped up with repeats
        # whose results are dropped below.
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if len(micro_batches) % pp:
            if not forward_only:
                raise UserError(f"{len(micro_batches)} micro-batches is not a multiple of the pipeline size {pp}")
            micro_batches += [micro_batches[-1]] * (pp - len(micro_batches) % pp)
    results = schedule(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=max(b.input_ids.shape[0] for b in micro_batches),
        forward_only=forward_only,
    )
    return results[:real] if results else results


def micro_batches_per_step(cfg: RunConfig, layout: Layout) -> int:
    per_step = cfg.train.micro_batch * layout.data
    if cfg.train.global_batch % per_step:
        raise UserError(
            f"train.global_batch {cfg.train.global_batch} is not a multiple of micro_batch "
            f"{cfg.train.micro_batch} x data-parallel size {layout.data}"
        )
    count = cfg.train.global_batch // per_step
    if cfg.parallel.virtual_pipeline and count % cfg.parallel.pipeline:
        raise UserError(
            f"the interleaved schedule needs micro-batches per step ({count} = global_batch / "
            f"(micro_batch x data-parallel size)) to be a multiple of parallel.pipeline "
            f"({cfg.parallel.pipeline}); change train.global_batch or drop parallel.virtual_pipeline"
        )
    return count


def total_steps(cfg: RunConfig, layout: Layout) -> int:
    """``train.steps``, or whole global batches in ``train.epochs`` passes over the index's pairs.

    Fewer pairs than one global batch is refused: the single step it would round up to
    would repeat pairs, and says nothing a user asked for.
    """
    from megatron_mpo.training.data_setup import shard_total

    if cfg.train.steps is not None:
        return cfg.train.steps
    total = shard_total(cfg)
    if total is None:
        raise UserError("train.epochs needs a shard index.json with sample counts; set train.steps instead")
    pairs = cfg.train.epochs * total
    steps = int(math.floor(pairs / cfg.train.global_batch))
    if steps < 1:
        per_step = cfg.train.micro_batch * layout.data
        raise UserError(
            f"train.epochs={cfg.train.epochs:g} over {total} pairs is {pairs:g} pairs, less than one step of "
            f"train.global_batch={cfg.train.global_batch}; lower train.global_batch to at most {int(pairs)} "
            f"(a multiple of micro_batch x data-parallel size = {per_step}), or set train.steps"
        )
    return steps

"""Data-parallel wrapping, optimizer and learning-rate schedule, all from megatron-core.

megatron-core's DistributedDataParallel keeps gradients in contiguous fp32 buffers and
its DistributedOptimizer shards fp32 master weights and Adam moments across data-parallel
ranks (ZeRO-1). The Adam kernel is Transformer Engine's or apex's fused one when present,
torch AdamW otherwise -- megatron-core makes that choice at import time.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

from megatron_mpo.config import PrecisionSection, TrainSection
from megatron_mpo.errors import UserError
from megatron_mpo.training.perf_settings import PerfSettings

FREEZABLE = {"vision": "vision_model", "projector": "vision_projection", "language": "language_model"}


def freeze(model: torch.nn.Module, parts: list[str]) -> int:
    """Turn off gradients for the named parts; returns how many parameters were frozen.

    Frozen parameters never enter the gradient buffers or the optimizer.
    """
    frozen = 0
    for part in parts:
        prefix = FREEZABLE[part]
        for name, param in model.named_parameters():
            if name == prefix or name.startswith(prefix + "."):
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


def _skip_single_rank_buffer_collectives() -> None:
    """Make megatron-core DDP's buffer collectives no-ops on a one-rank group.

    With the distributed optimizer, every step reduce-scatters the grad buffer and
    all-gathers the param buffer over the data-parallel group. On a group of one rank
    both are a copy of a buffer onto itself (gloo really copies: ~0.25 s per step for
    27M fp32 parameters on a CPU core). Only those exact self-copies are skipped; every
    other call goes to torch.distributed unchanged.
    """
    from megatron.core.distributed import param_and_grad_buffer as pgb

    if getattr(pgb, "_mpo_skips_self_copies", False):
        return
    all_gather, reduce_scatter = pgb.dist_all_gather_func, pgb.dist_reduce_scatter_func
    dist = torch.distributed

    def self_copy(output: torch.Tensor, input_: torch.Tensor, group) -> bool:
        size = group.size() if group is not None else dist.get_world_size()
        return (
            size == 1 and output.dtype == input_.dtype and output.numel() == input_.numel()
            and output.data_ptr() == input_.data_ptr()
        )

    def all_gather_into_tensor(output, input_, group=None, async_op=False):
        if self_copy(output, input_, group):
            return None
        return all_gather(output, input_, group=group, async_op=async_op)

    def reduce_scatter_tensor(output, input_, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if self_copy(output, input_, group) and op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            return None
        return reduce_scatter(output, input_, op=op, group=group, async_op=async_op)

    pgb.dist_all_gather_func = all_gather_into_tensor
    pgb.dist_reduce_scatter_func = reduce_scatter_tensor
    pgb._mpo_skips_self_copies = True


def wrap_data_parallel(model_chunks: list[torch.nn.Module], precision: PrecisionSection,
                       speed: Optional[PerfSettings] = None) -> list:
    """Wrap each chunk in megatron-core DDP with a distributed-optimizer grad buffer.

    ``speed``: the run's :class:`~megatron_mpo.training.perf_settings.PerfSettings` (None: no
    overlap). With overlap, each bucket's reduce-scatter starts in the backward of the
    step's last micro-batch as soon as its gradients are complete (the schedules get
    Megatron-LM's ``no_sync_func`` and ``grad_sync_func``, training.py), and their
    ``finalize_model_grads`` waits for every one, so the gradients the loop checks for
    non-finite values are the reduced ones. The updated weights' all-gathers run during the
    next forward, dispatched and waited for by forward pre-hooks (and by the interleaved
    schedule's ``param_sync_func``). Both assume every data-parallel rank runs the same
    modules in the same order (see :mod:`~megatron_mpo.training.perf_settings` for where
    that fails). Checkpoint saves and evaluations make the weights whole first
    (:func:`sync_params`, :func:`whole_weights`).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    _skip_single_rank_buffer_collectives()
    speed = speed or PerfSettings()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=True,
        overlap_grad_reduce=speed.overlap_grad_reduce,
        overlap_param_gather=speed.overlap_param_gather,
        align_param_gather=speed.align_param_gather,
        bucket_size=speed.bucket_size,
        check_for_nan_in_grad=False,  # the loop skips non-finite steps itself
    )
    wrapped = []
    for index, chunk in enumerate(model_chunks):
        # Run by the schedules after the last backward: data-parallel gradient reduction,
        # tied-embedding gradients across pipeline stages, sequence-parallel norms.
        chunk.config.finalize_model_grads_func = finalize_model_grads
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Later chunks' communication overlaps with compute anyway (Megatron-LM).
                disable_bucketing=index > 0,
            )
        )

    def hooks(name: str, wanted: bool):
        funcs = [getattr(chunk, name) for chunk in wrapped] if wanted else None
        return funcs[0] if funcs and len(funcs) == 1 else funcs

    for chunk in model_chunks:
        chunk.config.no_sync_func = hooks("no_sync", True)
        # Launch a chunk's reduce-scatter when its last backward is done (interleaved),
        # or on every stage but the first after the pipeline's last backward.
        chunk.config.grad_sync_func = hooks("start_grad_sync", speed.overlap_grad_reduce)
        # The interleaved schedule dispatches each chunk's all-gathers itself (aligned).
        chunk.config.param_sync_func = hooks("start_param_sync", speed.overlap_param_gather and speed.align_param_gather)
    return wrapped


def sync_params(model_chunks: list) -> None:
    """Finish the weights' all-gather now (Megatron-LM's ``force_param_sync`` before a save).

    With ``overlap_param_gather`` an optimizer step updates only this rank's shard of the
    weights; the other shards arrive in the next forward. A checkpoint written before then
    would hold the previous step's values for them. No-op for chunks without that overlap
    (or without DDP); collective over the data-parallel group otherwise.
    """
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


@contextlib.contextmanager
def whole_weights(model_chunks: list) -> Iterator[None]:
    """Forward-only passes between steps (evaluation) on whole weights and without
    all-gathers of their own: Megatron-LM's ``disable_forward_pre_hook`` / ``enable_forward_pre_hook``
    around evaluation (training.py).

    With ``overlap_param_gather`` the weights are gathered once here, on every rank at the
    same point, and the forward pre-hooks are off inside, so ranks may run different numbers
    of passes; the next training forward then finds the weights current. No-op otherwise.
    """
    hooked = [chunk for chunk in model_chunks if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def build_optimizer(model_chunks: list, train: TrainSection, precision: PrecisionSection):
    """megatron-core's DistributedOptimizer (bf16 params keep fp32 master weights)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if not any(p.requires_grad for chunk in model_chunks for p in chunk.parameters()):
        raise UserError("no trainable parameters on this rank: check model.freeze")
    config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=1e-8,
        clip_grad=train.clip_grad,
        bf16=precision.dtype == "bf16",
        params_dtype=torch.bfloat16 if precision.dtype == "bf16" else torch.float32,
        use_distributed_optimizer=True,
        # The same value as DDP's (Megatron-LM passes one flag to both).
        overlap_param_gather=model_chunks[0].ddp_config.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    use_fused_torch_adam(optimizer)
    return optimizer


def use_fused_torch_adam(optimizer) -> int:
    """Switch megatron-core's torch AdamW fallback (no TE / apex) to torch's fused kernel.

    Without Transformer Engine or apex, megatron-core builds ``torch.optim.AdamW`` with the
    multi-tensor ``foreach`` update. torch's ``fused`` AdamW (CPU and CUDA) computes the same
    update in one pass per tensor: 0.10 s -> 0.02 s per step for 25M fp32 parameters on the
    2-core benchmark machine. TE's / apex's fused Adam, when megatron-core picked one, is left
    alone. Returns how many torch optimizers were switched.
    """
    wrappers = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    switched = 0
    for wrapper in wrappers:
        inner = getattr(wrapper, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if not params or any(p.device.type not in ("cpu", "cuda") or not p.is_floating_point() for p in params):
            continue
        for settings in [inner.defaults, *inner.param_groups]:
            settings.update(fused=True, foreach=False)
        switched += 1
    return switched


def warmup_steps(train: TrainSection, total_steps: int) -> int:
    """``train.warmup`` is a fraction of the run when < 1, else a step count."""
    if train.warmup < 1:
        return int(math.ceil(train.warmup * total_steps)) if train.warmup > 0 else 0
    return int(train.warmup)


def scheduled_warmup(train: TrainSection, total_steps: int) -> int:
    """The warm-up the scheduler runs: ``warmup_steps`` cut to ``total_steps - 1``, so that
    the run's last step trains at ``train.lr``."""
    return min(warmup_steps(train, total_steps), max(total_steps - 1, 0))


def warmup_warning(train: TrainSection, total_steps: int) -> Optional[str]:
    """A line for a ``train.warmup`` step count the run is too short for: it is cut, not
    refused, and used to be cut silently (a fraction of the run always fits)."""
    asked, runs = warmup_steps(train, total_steps), scheduled_warmup(train, total_steps)
    if train.warmup < 1 or asked <= runs:
        return None
    return (f"train.warmup={train.warmup:g} does not fit this {total_steps}-step run: the warm-up is cut to "
            f"{runs} step{'' if runs == 1 else 's'} (train.lr is reached at the last step); lower train.warmup "
            "or give it as a fraction of the run (< 1)")


def build_scheduler(optimizer, train: TrainSection, total_steps: int):
    """megatron-core's OptimizerParamScheduler: linear warmup then cosine/linear/constant."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warm = scheduled_warmup(train, total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warm > 0 else train.lr,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=warm,
        lr_decay_steps=max(total_steps, warm + 1),
        lr_decay_style=train.schedule,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def grads_are_finite(model_chunks: list) -> bool:
    """True when every local gradient buffer is finite (checked before the step).

    megatron-core DDP keeps the gradients of expert-parallel MoE weights in buffers of their
    own (``expert_parallel_buffers``, reduced over the expert data-parallel group): without
    them a NaN expert gradient would pass (bf16 has no loss scaler to catch it).
    """
    for chunk in model_chunks:
        buffers = [*(getattr(chunk, "buffers", None) or []), *(getattr(chunk, "expert_parallel_buffers", None) or [])]
        for buffer in buffers:
            # One sum instead of torch.isfinite(...).all() (abs + two compares over the whole
            # buffer; 80 ms vs 6 ms for 27M fp32 values on a CPU core): a NaN or Inf anywhere
            # makes the sum non-finite. A sum can only overflow for gradients far beyond
            # what the fp32 grad-norm / clipping that follows can handle anyway.
            if not torch.isfinite(buffer.grad_data.sum()):
                return False
    return True

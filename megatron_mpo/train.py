"""MPO training, top to bottom.

    torchrun --nproc-per-node N -m megatron_mpo.train --config FILE [section.key=value ...]
    python -m megatron_mpo.train --print-config [--config FILE] [...]   # every key, its value and help

The loop reads like a recipe: parse config -> checks that need no model (preflight) ->
process groups -> model (+ weights) ->
DDP + distributed optimizer -> data -> resume -> for each step: draw the step's
micro-batches, run megatron-core's forward/backward schedule, skip non-finite updates,
step optimizer and schedule, fold the step's rewards into the MPO running mean, log,
checkpoint. Components live in megatron_mpo.{models,data,losses,training}.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_mpo import parallel
from megatron_mpo.config import RunConfig, load_config
from megatron_mpo.config_args import print_config_if_asked, run_config_parser
from megatron_mpo.console import exit_on_user_error, setup_console
from megatron_mpo.errors import UserError
from megatron_mpo.losses import MPOLoss
from megatron_mpo.parallel import Layout, all_ranks_true
from megatron_mpo.plan import startup as plan_startup
from megatron_mpo.processes import reap_helpers
from megatron_mpo.training import checkpoint as ckpt_lib
from megatron_mpo.training import run_report
from megatron_mpo.training import data_setup, disk_space, model_setup, precision, preflight, row_layout, schedule
from megatron_mpo.training.flops import FlopCounter
from megatron_mpo.training.forward import StepContext, make_forward_step
from megatron_mpo.training.metrics import (MetricsLogger, StepCounter, global_sum, interval_peak_memory_gib,
                                          reduce_loss_metrics, router_aux_loss)
from megatron_mpo.training.heldout import HeldOutEval
from megatron_mpo.training.preemption import PreemptionFlag
from megatron_mpo.training.reference_gap import reference_gap_warning
from megatron_mpo.training.rng_state import capture_rng_state, restore_rng_state
from megatron_mpo.training.sample_log import SampleLog
from megatron_mpo.training.optim import (build_optimizer, build_scheduler, grads_are_finite, warmup_warning,
                                         whole_weights, wrap_data_parallel)
from megatron_mpo.training.perf_settings import for_run as perf_settings_for_run


def parse_args(argv: Optional[list[str]] = None, prog: str = "megatron_mpo.train") -> argparse.Namespace:
    return run_config_parser(prog, __doc__.split("\n")[0]).parse_args(argv)


def resolve_resume(cfg: RunConfig, manager: Optional[ckpt_lib.CheckpointManager]) -> Optional[Path]:
    """The checkpoint to resume from: checkpoint.load (a path or ``auto``), else none."""
    load = cfg.checkpoint.load
    if load is None:
        return None
    if manager is None:
        manager = ckpt_lib.CheckpointManager(Path(load).absolute().parent)
    return manager.resolve(load)


def mpo_state(mpo: MPOLoss, layout: Layout) -> dict:
    """The running reward mean lives on the last stage; every rank saves the same copy."""
    state = [mpo.state_dict() if layout.is_last_stage else None]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        src = torch.distributed.get_world_size() - 1  # the last global rank is a last-stage rank
        torch.distributed.broadcast_object_list(state, src=src)
    return state[0]


def train(cfg: RunConfig) -> dict:
    """Run training to the configured end (or a preemption signal); returns a summary."""
    # Data, template, batch split, model dir, tokenizer, precision: before any group or model.
    model_config, total_steps = preflight.check_training(cfg)
    layout = model_setup.start_parallel(cfg)
    rank = torch.distributed.get_rank()
    is_writer = rank == 0

    # ---- model ------------------------------------------------------------------------
    speed = perf_settings_for_run(layout, model_config, training=True)  # Megatron-LM's fast paths
    chunks = model_setup.build_model_chunks(cfg, model_config, layout, speed=speed)
    manager = ckpt_lib.CheckpointManager(cfg.checkpoint.save, cfg.checkpoint.keep_last,
                                         cfg.checkpoint.optimizer_format) if cfg.checkpoint.save else None
    resume_from = resolve_resume(cfg, manager)
    if cfg.model.init and resume_from is None:  # a resumed run loads its weights below
        ckpt_lib.load_model_weights(cfg.model.init, chunks)
    model = wrap_data_parallel(chunks, cfg.precision, speed)
    optimizer = build_optimizer(model, cfg.train, cfg.precision)

    # ---- data -------------------------------------------------------------------------
    tokenizer = data_setup.tokenizer(cfg)
    loader = data_setup.build_loader(cfg, model_config, tokenizer, layout)
    micro_per_step = schedule.micro_batches_per_step(cfg, layout)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    mpo = MPOLoss(cfg.mpo, group=layout.data_group)
    heldout = HeldOutEval(cfg, model_config, tokenizer, layout, model, mpo) if cfg.eval.shards else None

    # ---- resume -----------------------------------------------------------------------
    step = 0
    if resume_from is not None:
        reader = manager or ckpt_lib.CheckpointManager(resume_from.parent)
        common, per_rank = reader.load(resume_from, model, optimizer)
        step = int(common["step"])
        scheduler.load_state_dict(common["scheduler"])
        mpo.load_state_dict(common["mpo"])
        data_line = data_setup.resume_loader(loader, common, cfg, resume_from)
        if per_rank is not None:
            restore_rng_state(per_rank["rng"])
        if is_writer:
            print(data_line, flush=True)
            if per_rank is None:
                print("parallel layout changed since the checkpoint: the RNG streams restart "
                      "(weights, optimizer, schedule, MPO state and data position are restored)", flush=True)
        if is_writer:
            print(f"resumed from {resume_from} at step {step}", flush=True)

    logger = MetricsLogger(
        cfg.logging.metrics, cfg.logging.tensorboard, cfg.logging.wandb_project,
        is_writer=is_writer, run_config=cfg.to_dict(), resume_step=step, total_steps=total_steps,
    )
    sample_log = SampleLog(cfg.logging.sample_log, layout, step)
    preemption = PreemptionFlag()
    counted = StepCounter()
    step_context = StepContext()
    forward_step = make_forward_step(mpo, on_batch=counted.add, step=step_context)
    forward_backward = schedule.forward_backward_func()
    flops = FlopCounter(model_config, frozen=cfg.model.freeze, fp8=cfg.precision.fp8 is not None)
    if is_writer:
        template, template_source = data_setup.run_template(cfg, model_config)
        print(run_report.banner(
            cfg, layout, total_steps=total_steps, start_step=step, pairs=data_setup.shard_total(cfg),
            template=template, template_source=template_source,
            tiling=data_setup.describe_tiling(cfg, model_config),
            precision=precision.training_precision(cfg).describe(),
            reference_precision=precision.reference_precision(cfg).describe(),
            rows=row_layout.packing_layout(cfg), mfu_peak=flops.peak().describe(), speed=speed.describe()),
            flush=True)
        for warning in (row_layout.packing_warning(cfg, model_config), warmup_warning(cfg.train, total_steps)):
            if warning:
                print(f"warning: {warning}", flush=True)
    memory_plan = plan_startup.estimate(cfg, model_config, layout.data) if is_writer else None
    if memory_plan is not None:
        print(memory_plan.line(), flush=True)
    batches = iter(loader)

    checkpoint_bytes = 0
    if manager is not None:
        checkpoint_bytes = disk_space.estimate_checkpoint_bytes(model, cfg.precision.dtype, layout.data_rank,
                                                                newest=manager.latest())
        free = disk_space.free_bytes(manager.save_dir)
        if is_writer and free < checkpoint_bytes * ((cfg.checkpoint.keep_last or 1) + 1):
            print(f"warning: {manager.save_dir} has {disk_space.describe(free)} free; each checkpoint takes "
                  f"~{disk_space.describe(checkpoint_bytes)} and up to keep_last + 1 exist during a save",
                  flush=True)

    def save(at_step: int) -> None:
        nonlocal checkpoint_bytes
        if manager is None:
            return
        common = {"step": at_step, "scheduler": scheduler.state_dict(), "mpo": mpo_state(mpo, layout),
                  "config": cfg.to_dict(), "data": data_setup.loader_checkpoint_state(loader, layout)}
        per_rank = {"rng": capture_rng_state()}
        disk_space.ensure_room(manager, checkpoint_bytes, at_step, is_writer)
        began = time.perf_counter()
        try:
            saved = manager.save(at_step, model, optimizer, common, per_rank)
        except Exception as exc:
            why = disk_space.explain_write_error(exc, manager.save_dir, checkpoint_bytes)
            if why is None:
                raise
            raise UserError(why) from None
        if is_writer:
            checkpoint_bytes = disk_space.directory_bytes(saved)
            print(run_report.saved_line(at_step, time.perf_counter() - began), flush=True)

    try:
        bad_in_a_row = 0
        bad_total = 0
        last_saved = step
        save_due = False
        while step < total_steps:
            step += 1
            started = time.perf_counter()
            try:
                micro_batches = [next(batches) for _ in range(micro_per_step)]
            except RuntimeError:
                if not preemption.is_set:
                    raise
                # SIGTERM to every process of the job killed the loader workers mid-step.
                step -= 1
                if manager is not None and last_saved < step:
                    save(step)
                    last_saved = step
                if is_writer:
                    print(f"preempted: saved step {last_saved}, exiting", flush=True)
                break
            seq_len = max(b.input_ids.shape[1] for b in micro_batches)
            step_context.start(mpo, micro_batches, layout.data_group)  # the step's chosen-token count
            counted.reset()
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            results = schedule.run_schedule(forward_backward, forward_step, model, micro_batches,
                                           tokenizer.pad_id, forward_only=False)
            losses = reduce_loss_metrics(results, layout.is_last_stage, layout.tensor_rank)
            aux_loss = router_aux_loss(model, micro_per_step, layout.pipeline_rank)
            finite = math.isfinite(losses["loss"]) and all_ranks_true(grads_are_finite(model))
            grad_norm = float("nan")
            lr = optimizer.param_groups[0]["lr"]  # this step's rate (the scheduler moves on below)
            if finite:
                _, grad_norm, _ = optimizer.step()
                scheduler.step(increment=1)
                if layout.is_last_stage:
                    mpo.end_step(layout.data_group)
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                bad_total += 1
                mpo.reward_shift.discard_step()
            elapsed = time.perf_counter() - started
            sample_log.write(step, micro_batches, applied=finite)

            evaluated = None
            if heldout is not None and heldout.due(step, total_steps):
                with whole_weights(model):  # overlap_param_gather: no all-gathers inside evaluation
                    evaluated = heldout.run()
            if step % cfg.logging.interval == 0 or step == total_steps or step == 1 or evaluated is not None:
                first = layout.tensor_rank == 0 and layout.pipeline_rank == 0
                names = ("tokens", "tiles", "scored", "attended")
                counts = global_sum({n: getattr(counted, n) if first else 0 for n in names})
                tokens = counts["tokens"]
                skipped = global_sum(loader.skip_counts if first else {})
                record = {
                    **{k: v for k, v in losses.items() if not k.startswith("abs_logratio")},
                    **({"aux_loss": aux_loss} if aux_loss is not None else {}),
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "samples_per_s": cfg.train.global_batch / elapsed,
                    "tokens_per_s": tokens / elapsed,
                    "mfu": flops.mfu(tokens, elapsed, torch.distributed.get_world_size(), seq_len=seq_len,
                                     tiles=counts["tiles"], scored=counts["scored"], attended=counts["attended"]),
                    "skipped": {**{k: int(v) for k, v in skipped.items()}, "nonfinite_steps": bad_total},
                    "peak_memory_gib": interval_peak_memory_gib(),  # the largest rank's, this interval
                }
                if evaluated:
                    record["eval"] = evaluated
                if step == 1 and resume_from is None:
                    record["ref_logratio_step0"] = losses["abs_logratio"]
                    record["ref_logratio_step0_per_token"] = losses["abs_logratio_per_token"]
                    gap = reference_gap_warning(losses["abs_logratio"], losses["abs_logratio_per_token"],
                                                cfg.mpo.beta, precision.training_precision(cfg).describe(),
                                                precision.reference_precision(cfg).describe())
                    if gap and is_writer:
                        print(f"warning: {gap}", flush=True)
                logger.log(step, record)
                if memory_plan is not None:  # this process's first logged step: the real peak next to the plan
                    print(memory_plan.after_step(record["peak_memory_gib"], step), flush=True)
                    memory_plan = None
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise UserError(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (step {step}); "
                    "lower train.lr, check the data, or raise train.max_bad_steps"
                )

            stop = preemption.should_stop()
            # Interval saves wait for a step that updated the model: a non-finite streak
            # writes no checkpoints (keep_last would rotate good ones out). The final step
            # and a preemption save regardless -- the weights are the last good update's.
            save_due = save_due or step % cfg.checkpoint.interval == 0
            if manager is not None and ((save_due and finite) or step == total_steps or stop):
                save(step)
                last_saved = step
                save_due = False
            if stop:
                if is_writer:
                    print(f"preempted: saved step {last_saved}, exiting", flush=True)
                break

    finally:
        batches.close()  # stop loader workers now, not at interpreter exit
        reap_helpers()
        logger.close()
        sample_log.close()
    summary = {"step": step, "total_steps": total_steps}
    if is_writer:
        print(run_report.summary_line(
            step=step, total_steps=total_steps, start_step=logger.progress.start_step,
            global_batch=cfg.train.global_batch, seconds=logger.progress.elapsed(), last=logger.last,
            checkpoint=manager.latest() if manager else None, metrics=cfg.logging.metrics), flush=True)
    parallel.shutdown()
    return summary


@exit_on_user_error
def main(argv: Optional[list[str]] = None, prog: str = "megatron_mpo.train") -> None:
    setup_console()
    args = parse_args(argv, prog)
    if print_config_if_asked(args):  # keys and types are checked; a config still being written prints too
        return
    cfg = load_config(args.config, args.overrides)  # all config errors surface before any process group work
    train(cfg)


if __name__ == "__main__":
    main()

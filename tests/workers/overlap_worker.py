"""Multi-rank half of tests/test_perf_settings.py: Megatron-LM's speed settings change no update.

Launched on 2 gloo processes. Each layout trains the tiny InternVL through the trainer's own
pieces (model_setup, wrap_data_parallel, the distributed optimizer, run_schedule, the MPO
forward step, grads_are_finite) twice from the same weights and data: with every setting off
and with what :func:`~megatron_mpo.training.perf_settings.choose` turns on for that layout
on a CUDA machine with apex and TE (the CUDA-only ones left off: gloo cannot run them):

* DP2, the whole model training (vision tower with drop path, projector, LLM):
  overlap_grad_reduce + overlap_param_gather, with small buckets so that several
  reduce-scatters start inside the backward and the forward pre-hooks wait for several
  all-gathers; micro-batches with and without images at different positions on the two
  ranks (a text-only micro-batch runs the vision tower on a blank tile, so both ranks fire
  the same gradient hooks in the same order; without it gloo stops with "Received data size
  doesn't match expected size"). Step 3 has a non-finite loss on rank 1 only and must be
  skipped on both ranks. An evaluation
  (rank 0 only) after step 2 runs inside ``whole_weights``. After the last step the "on"
  run's other shards are stale until :func:`sync_params`, and a checkpoint it saves
  (CheckpointManager, as the trainer's save) holds the updated weights.
* PP2: deallocate_pipeline_outputs, with more micro-batches than stages (1F1B warm-up and
  cool-down), checking the schedule really freed the sent activations.

Per step the losses and whether the step was applied, and at the end every weight, must be
bit-identical to the "off" run's. Gradient clipping is off: with other bucket boundaries the
gradient norm sums the shards' squares in another order (~1e-7 relative), which clipping
would carry into the weights; the norms are compared to 1e-6. (Run by hand on 4 ranks with
this CPU's rule: DP2 x PP2 with and without 2 virtual stages, the whole model training with
drop path, so overlapped on the vision stage too, bit-identical too.)
Usage: python -m torch.distributed.run --nproc-per-node=2 tests/workers/overlap_worker.py OUT
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

STEPS = 4
NAN_STEP = 3  # rank 1's loss is not finite at this step
EVAL_STEP = 2  # an evaluation follows this step
SMALL_BUCKET = 20_000  # parameters: several buckets for the tiny model (megatron's default: 40M)
CUDA_ONLY_OFF = dict(gradient_accumulation_fusion=False, moe_permute_fusion=False)  # gloo cannot run them


def run_config(pipeline: int, freeze: list, drop_path: float = 0.0):
    from megatron_mpo.config import from_dict

    return from_dict({"model": {"preset": "tiny", "freeze": freeze, "drop_path_rate": drop_path},
                      "parallel": {"pipeline": pipeline},
                      "data": {"shards": "unused", "ref_logps": "unused"},
                      "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 1, "lr": 1e-2, "clip_grad": 1e9,
                                "warmup": 0, "device": "cpu", "seed": 5}})


def micro_batches(model_config, step: int, rank: int, count: int, nan: bool) -> list:
    """``count`` one-pair micro-batches for (step, data-parallel rank), every other one text-only:
    the even ones on rank 0, the odd ones on rank 1 (ranks run the vision tower at different
    micro-batches, as with real data)."""
    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.data.samples import TokenizedPair

    gen = torch.Generator().manual_seed(100 * step + 10 * rank)
    context = model_config.img_context_token_id
    high = min(context, model_config.language.vocab_size) - 1
    side = model_config.vision.image_size
    batches = []
    for i in range(count):
        tiles = (i + rank + 1) % 2
        prompt = (torch.randint(1, high, (4,), generator=gen).tolist() + [context] * (tiles * model_config.tokens_per_tile)
                  + torch.randint(1, high, (3 + i,), generator=gen).tolist())
        chosen = torch.randint(1, high, (5 + i,), generator=gen).tolist()
        rejected = torch.randint(1, high, (4 + 2 * i,), generator=gen).tolist()
        ref = float("nan") if nan and i == 0 else -1.5 * len(chosen)
        pair = TokenizedPair(key=f"s{step}/r{rank}/{i}", prompt=prompt, chosen=chosen, rejected=rejected,
                             pixel_values=torch.randn(tiles, 3, side, side, generator=gen),
                             ref_chosen=ref, ref_rejected=-1.5 * len(rejected))
        batches.append(collate_pairs([pair], 0, context, model_config.tokens_per_tile))
    return batches


def train(cfg, layout, model_config, speed, micro: int, save_dir=None) -> dict:
    """STEPS trainer steps from seed 5; per step (applied, summed loss, grad norm), then the
    weights (after the trainer's checkpoint path made them whole)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.models.drop_path import seed_rng
    from megatron_mpo.parallel import all_ranks_true
    from megatron_mpo.training import model_setup, schedule
    from megatron_mpo.training.checkpoint import CheckpointManager
    from megatron_mpo.training.forward import StepContext, make_forward_step
    from megatron_mpo.training.optim import build_optimizer, grads_are_finite, whole_weights, wrap_data_parallel

    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    seed_rng(5)
    chunks = model_setup.build_model_chunks(cfg, model_config, layout, speed=speed)
    model = wrap_data_parallel(chunks, cfg.precision, speed)
    initial = named(model)
    optimizer = build_optimizer(model, cfg.train, cfg.precision)
    mpo = MPOLoss(cfg.mpo, group=layout.data_group)
    context = StepContext()
    forward_step = make_forward_step(mpo, step=context)
    forward_backward = schedule.forward_backward_func()
    steps, out_eval = [], {}
    for step in range(1, STEPS + 1):
        nan = step == NAN_STEP and layout.data_rank == 1
        batches = micro_batches(model_config, step, layout.data_rank, micro, nan)
        context.start(mpo, batches, layout.data_group)
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        results = schedule.run_schedule(forward_backward, forward_step, model, batches, 0, forward_only=False)
        applied = all_ranks_true(grads_are_finite(model))
        norm = float("nan")
        if applied:
            _, norm, _ = optimizer.step()
            if layout.is_last_stage:
                mpo.end_step(layout.data_group)
        else:
            mpo.reward_shift.discard_step()
        loss = sum(float(r["loss"]) for r in results) if layout.is_last_stage else 0.0
        steps.append([applied, loss, float(norm)])
        if step == EVAL_STEP:
            # An evaluation between steps (the trainer's held-out pass), on rank 0 only.
            stale = named(model)
            with whole_weights(model):
                inside = named(model)
                hooks = sum(len(c.remove_forward_pre_hook_handles) for c in model)
                if layout.data_rank == 0:
                    extra = micro_batches(model_config, 99, 0, 2, nan=False)
                    with torch.no_grad():
                        schedule.run_schedule(forward_backward, make_forward_step(None), model, extra, 0,
                                              forward_only=True)
            out_eval = {"inside": inside, "hooks_inside": hooks,
                        "stale": sum(not torch.equal(stale[n], v) for n, v in inside.items())}
    out = {"steps": steps, "bucket_groups": sum(len(c.bucket_groups) for c in model),
           "pre_hooks": sum(len(c.remove_forward_pre_hook_handles) for c in model), "eval": out_eval}
    out["before_sync"] = named(model)
    if save_dir is not None:
        manager = CheckpointManager(save_dir)
        out["saved"] = str(manager.save(STEPS, model, optimizer, {"step": STEPS}, {}))
    out["weights"] = named(model)
    vision = [n for n in initial if ".vision_" in n]
    out["vision_moved"] = [sum(not torch.equal(out["weights"][n], initial[n]) for n in vision), len(vision)]
    return out


def named(model: list) -> dict:
    """Every weight of the DDP-wrapped chunks, as this rank holds it now."""
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(model) for n, p in c.module.named_parameters()}


def loaded_weights(cfg, layout, model_config, path: str) -> dict:
    """The weights of checkpoint ``path``, read into a freshly built (other seed) model."""
    from megatron_mpo.training import model_setup
    from megatron_mpo.training.checkpoint import load_model_weights

    torch.manual_seed(99)
    chunks = model_setup.build_model_chunks(cfg, model_config, layout)
    load_model_weights(path, chunks)
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()}


def compare(where: str, off: dict, on: dict, failures: list) -> None:
    for step, (a, b) in enumerate(zip(off["steps"], on["steps"]), 1):
        if a[0] != b[0]:
            failures.append(f"{where} step {step}: applied {a[0]} (off) vs {b[0]} (on)")
        for what, x, y, tolerance in (("loss", a[1], b[1], 0.0), ("grad norm", a[2], b[2], 1e-6)):
            if not (math.isnan(x) and math.isnan(y)) and not math.isclose(x, y, rel_tol=tolerance, abs_tol=0.0):
                failures.append(f"{where} step {step}: {what} {x!r} (off) vs {y!r} (on)")
    if off["weights"].keys() != on["weights"].keys():
        failures.append(f"{where}: other parameters")
        return
    for name, value in off["weights"].items():
        if not torch.equal(on["weights"][name], value):
            failures.append(f"{where}: weight {name} differs by {float((on['weights'][name] - value).abs().max()):.3g}")


def _run(out: Path, failures: list, facts: dict) -> None:
    from megatron.core.pipeline_parallel import schedules

    from megatron_mpo import parallel
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.perf_settings import Machine, PerfSettings, choose

    model_config = get_preset("tiny")
    gpu = Machine(cuda=True, apex_wgrad=True, te_permute=True)

    # ---- DP2: overlapped reduce-scatter and all-gather, the whole model training --------
    cfg = run_config(pipeline=1, freeze=[], drop_path=0.2)
    layout = parallel.initialize(1, 1, seed=5, device="cpu")
    chosen = choose(gpu, data_parallel=2, pipeline=1, interleaved=False, moe=False, training=True)
    facts["dp2_chosen"] = [chosen.overlap_grad_reduce, chosen.overlap_param_gather, chosen.bucket_size]
    on = dataclasses.replace(chosen, bucket_size=SMALL_BUCKET, **CUDA_ONLY_OFF)
    off_run = train(cfg, layout, model_config, PerfSettings(), micro=2)
    on_run = train(cfg, layout, model_config, on, micro=2, save_dir=out / "ckpt")
    compare("DP2", off_run, on_run, failures)
    facts["dp2_applied"] = [s[0] for s in on_run["steps"]]
    facts["dp2_bucket_groups"] = [off_run["bucket_groups"], on_run["bucket_groups"]]
    facts["dp2_vision_moved"] = on_run["vision_moved"]
    # Inside whole_weights (evaluation): the weights of the step just taken, no pre-hooks.
    facts["dp2_eval"] = {"stale_before": on_run["eval"]["stale"], "hooks_inside": on_run["eval"]["hooks_inside"],
                         "differ_from_off": sum(not torch.equal(on_run["eval"]["inside"][n], v)
                                                for n, v in off_run["eval"]["inside"].items())}
    facts["dp2_pre_hooks"] = [off_run["pre_hooks"], on_run["pre_hooks"]]
    # The update reached only this rank's shard until the trainer's save made the weights whole.
    facts["dp2_stale_before_sync"] = sum(not torch.equal(on_run["before_sync"][n], v) for n, v in on_run["weights"].items())
    facts["dp2_off_stale_before_sync"] = sum(not torch.equal(off_run["before_sync"][n], v)
                                            for n, v in off_run["weights"].items())
    restored = loaded_weights(cfg, layout, model_config, on_run["saved"])
    compare("DP2 saved", off_run, {"steps": off_run["steps"], "weights": restored}, failures)

    # ---- PP2: deallocated pipeline outputs ----------------------------------------------
    cfg = run_config(pipeline=2, freeze=[])
    layout = parallel.initialize(1, 2, seed=5, device="cpu")
    freed = []
    original = schedules.deallocate_output_tensor

    def spy(out_tensor, deallocate_pipeline_outputs=False):
        before = out_tensor.numel() if out_tensor is not None else 0
        original(out_tensor, deallocate_pipeline_outputs)
        if out_tensor is not None and deallocate_pipeline_outputs:
            freed.append([before, out_tensor.numel()])

    schedules.deallocate_output_tensor = spy
    try:
        chosen = choose(gpu, data_parallel=1, pipeline=2, interleaved=False, moe=False, training=True)
        facts["pp2_chosen"] = chosen.deallocate_pipeline_outputs
        off_run = train(cfg, layout, model_config, PerfSettings(), micro=4)
        facts["pp2_freed_off"] = len(freed)
        on_run = train(cfg, layout, model_config, dataclasses.replace(chosen, **CUDA_ONLY_OFF), micro=4)
    finally:
        schedules.deallocate_output_tensor = original
    facts["pp2_freed_on"] = freed  # [numel before, after] of each output the schedule freed
    compare("PP2", off_run, on_run, failures)


def main() -> int:
    out = Path(sys.argv[1])
    failures: list = []
    facts: dict = {}
    try:
        _run(out, failures, facts)
    except Exception:
        failures.append(traceback.format_exc())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (out / f"result_rank{rank}.json").write_text(json.dumps({"failures": failures, "facts": facts}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

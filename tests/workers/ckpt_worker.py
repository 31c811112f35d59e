"""Worker for tests/test_checkpoint.py: a small GPTModel in megatron-core DDP + distributed Adam.

Modes (argv[1]), all writing ``result_rank{R}.pt`` into the work dir (argv[2]):

* ``resume`` (2 procs): DP=2 -- train 2 steps, save, train 2 more (reference); fresh
  model + optimizer load the save and train 2 steps (must match exactly). Then TP=2 --
  train 1 step, save (dp_reshardable); re-form as TP=1 x DP=2 and load the weights (the
  optimizer is refused). Then :func:`reshard`: reshardable Adam state carried to TP2, PP2
  and (MoE) EP1 and back to EP2. Then SIGUSR1 on rank 1 only must make ``should_stop()`` true on both ranks.
* ``crash`` (2 procs): save step 2 (dp_reshardable), then die by SIGKILL inside the save of step 4.
* ``after_crash`` (1 proc): resume "auto" from the crashed run's directory (other world
  size: weights + optimizer load, per-rank extras come back None); then keep_last pruning.
"""

import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SEQ = 12
PARTS = 2  # sub-batches per global batch in train_scheduled


def build(layout, seed, experts=None):
    """GPTModel (as in gpt_logps.py) wrapped in DDP, with megatron-core's distributed Adam."""
    from gpt_logps import build_gpt
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_gpt(layout, experts)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
        module=model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.05, clip_grad=1.0,
                        use_distributed_optimizer=True, params_dtype=torch.float32),
        [ddp],
    )
    return ddp, opt


def batch(step, layout):
    """Deterministic tokens per (step, data-parallel rank); TP ranks of a replica share them."""
    return sub_batch(step, layout.data_rank)


def sub_batch(step, index):
    """Part ``index`` of step ``step``'s global batch (2 rows)."""
    gen = torch.Generator().manual_seed(1000 + 10 * step + index)
    ids = torch.randint(0, 96, (2, SEQ), generator=gen)
    from megatron_mpo.segments import causal_mask

    return dict(input_ids=ids, position_ids=torch.arange(SEQ).expand(2, SEQ).clone(),
                attention_mask=causal_mask(SEQ), labels=torch.roll(ids, -1, dims=1))


def train(ddp, opt, layout, steps):
    for step in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(**batch(step, layout)).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, _norm, _ = opt.step()
        assert ok


def train_scheduled(ddp, opt, layout, steps):
    """Train through megatron-core's schedule (pipelines too) on a fixed global batch of
    ``PARTS`` sub-batches, split over data-parallel ranks; returns each step's global loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides ``loss`` in place

    def forward_step(data_iterator, model):
        return model(**next(data_iterator)), loss_func

    per_rank = PARTS // layout.data
    losses = []
    for step in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        parts = [sub_batch(step, layout.data_rank * per_rank + i) for i in range(per_rank)]
        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(parts), model=[ddp],
            num_microbatches=per_rank, seq_length=SEQ, micro_batch_size=2, forward_only=False,
        )
        ddp.finish_grad_sync()
        ok, _norm, _ = opt.step()
        assert ok
        # The global loss: mean over sub-batches, summed from one rank per data-parallel replica.
        mine = layout.is_last_stage and layout.tensor_rank == 0
        local = torch.tensor([sum(float(r["loss"]) for r in results) / PARTS if mine else 0.0], dtype=torch.float64)
        torch.distributed.all_reduce(local)
        losses.append(float(local))
    return losses


def _global_name(ddp, name, layout):
    """Local parameter name -> its name in the whole model (global layer and expert numbers)."""
    from megatron.core import parallel_state as ps

    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(ddp.module.decoder.layers[int(parts[2])].layer_number - 1)
    if "local_experts" in parts:
        at = parts.index("local_experts") + 1
        per_rank = ddp.module.config.num_moe_experts // layout.expert
        parts[at] = str(ps.get_expert_model_parallel_rank() * per_rank + int(parts[at]))
    return ".".join(parts)


def full_optim_state(ddp, opt, layout):
    """{global param name: {"param", "exp_avg", "exp_avg_sq": whole tensors}, "steps": set} on
    every rank: the distributed optimizer's shards gathered over data-, tensor-, expert- and
    pipeline-parallel ranks, independently of the checkpoint code."""
    from megatron.core import parallel_state as ps

    keys = ("param", "exp_avg", "exp_avg_sq")
    named = list(ddp.module.named_parameters())
    flat = {n: {k: torch.zeros(p.numel()) for k in keys} for n, p in named}
    owner = {p: n for n, p in named}
    steps = set()
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for param in sub.model_param_group_index_map:
            rng = sub._get_model_param_range_map(param)["param"]
            state = sub._get_main_param_and_optimizer_states(param)
            steps.add(float(state["step"]))
            for k in keys:
                flat[owner[param]][k][rng.start:rng.end] = state[k].detach().float()
    for expert in (False, True):  # each rank owns a disjoint slice: a sum over the group joins them
        pieces = [(n, k) for n, p in named if getattr(p, "allreduce", True) != expert for k in keys]
        if pieces:
            joined = torch.cat([flat[n][k] for n, k in pieces])
            group = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
            torch.distributed.all_reduce(joined, group=group)
            for (n, k), piece in zip(pieces, joined.split([flat[n][k].numel() for n, k in pieces])):
                flat[n][k] = piece.clone()  # a view would pickle all of ``joined`` below
    mine = {}
    for name, p in named:
        mine[_global_name(ddp, name, layout)] = {
            k: _tp_full(name, p, flat[name][k].view(p.shape), layout) for k in keys
        }
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, (mine, steps))
    out = {}
    for part, rank_steps in everyone:
        out.update(part)
        out.setdefault("steps", set()).update(rank_steps)
    return out


def params(ddp):
    return {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


def optim_state(opt):
    """Every tensor the inner torch optimizers hold for this rank's shard (Adam moments, step)."""
    out = []
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                st = sub.optimizer.state[p]
                out.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()})
                out[-1]["param"] = p.detach().clone()
    return out


def optim_by_param(ddp, opt):
    """{param name: (start, end) of this rank's shard, exp_avg, exp_avg_sq, step} for DP resharding."""
    names = {p: n for n, p in ddp.module.named_parameters()}
    out = {}
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for param in sub.model_param_group_index_map:
            rng = sub._get_model_param_range_map(param)["param"]
            st = sub._get_main_param_and_optimizer_states(param)
            out[names[param]] = (rng.start, rng.end, st["exp_avg"].clone(), st["exp_avg_sq"].clone(), float(st["step"]))
    return out


def full_weights(ddp, layout):
    """Whole (TP-gathered) parameters; GLU fc1 shards are [gate; up] per rank."""
    from megatron.core import parallel_state as ps

    return {name: _tp_full(name, p, p.detach(), layout).clone() for name, p in ddp.module.named_parameters()}


def _tp_full(name, p, t, layout):
    """``t`` (shaped like parameter ``p``) gathered over tensor-parallel ranks."""
    from megatron.core import parallel_state as ps

    if layout.tensor == 1 or not getattr(p, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(layout.tensor)]
    torch.distributed.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    if name.endswith("linear_fc1.weight"):
        halves = [x.chunk(2, dim=p.partition_dim) for x in parts]
        parts = [h[0] for h in halves] + [h[1] for h in halves]
    return torch.cat(parts, dim=p.partition_dim)


def logits(ddp, layout):
    from megatron.core import parallel_state as ps

    b = batch(99, dataclasses.replace(layout, data_rank=0))  # same input on every rank
    b.pop("labels")
    with torch.no_grad():
        out = ddp(**b)
    if layout.tensor > 1:
        parts = [torch.empty_like(out) for _ in range(layout.tensor)]
        torch.distributed.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def resume(work):
    from megatron_mpo import parallel
    from megatron_mpo.training.checkpoint import (
        CheckpointManager, load_model_weights,
        save_model_weights,
    )
    from megatron_mpo.training.preemption import PreemptionFlag
    from megatron_mpo.training.rng_state import capture_rng_state, restore_rng_state

    result = {}
    # --- exact resume at DP=2 with the distributed optimizer ---
    layout = parallel.initialize(1, 1, seed=5)
    rank = torch.distributed.get_rank()
    ddp, opt = build(layout, seed=5)
    train(ddp, opt, layout, [0, 1])
    manager = CheckpointManager(work / "run", keep_last=None)
    common = {"step": 2, "mpo": {"delta": 0.25, "count": 7}, "config": {"lr": 1e-2}}
    rng = capture_rng_state()
    manager.save(2, [ddp], opt, common=common, per_rank={"rng": rng, "loader": 100 + layout.data_rank})
    result["after_save_rand"] = torch.rand(4)
    train(ddp, opt, layout, [2, 3])
    result["ref_params"], result["ref_optim"] = params(ddp), optim_state(opt)

    ddp2, opt2 = build(layout, seed=77)  # other seed: everything must come from the checkpoint
    manager2 = CheckpointManager(work / "run", keep_last=None)
    path = manager2.resolve("auto")
    result["resolved"] = str(path)
    loaded_common, per_rank = manager2.load(path, [ddp2], opt2)
    restore_rng_state(per_rank["rng"])
    result["restored_rand"] = torch.rand(4)
    result["common"], result["loader"] = loaded_common, per_rank["loader"]
    train(ddp2, opt2, layout, [2, 3])
    result["new_params"], result["new_optim"] = params(ddp2), optim_state(opt2)

    # --- save at TP=2, load weights at TP=1 x DP=2 ---
    layout = parallel.initialize(2, 1, seed=6)
    ddp, opt = build(layout, seed=6)
    train(ddp, opt, layout, [0])
    tp_manager = CheckpointManager(work / "tp2", keep_last=None, optimizer_format="dp_reshardable")
    saved = tp_manager.save(1, [ddp], opt, common={"step": 1}, per_rank={})
    model_only = save_model_weights(work / "converted", [ddp], extra_files={"info.json": '{"source": "test"}'})
    result["tp2_weights"], result["tp2_logits"] = full_weights(ddp, layout), logits(ddp, layout)
    layout = parallel.initialize(1, 1, seed=8)
    ddp, opt = build(layout, seed=8)
    common, extras = tp_manager.load(saved, [ddp])  # weights only: the layout changed
    result["tp1_common"], result["tp1_extras"] = common, extras
    result["tp1_weights"], result["tp1_logits"] = full_weights(ddp, layout), logits(ddp, layout)
    ddp3, _ = build(layout, seed=9)
    load_model_weights(saved, [ddp3])
    result["tp1_weights_standalone"] = full_weights(ddp3, layout)
    ddp4, opt4 = build(layout, seed=10)
    load_model_weights(model_only, [ddp4], opt4)  # opt4: master copies re-read from the weights
    result["tp1_weights_model_only"] = full_weights(ddp4, layout)
    result["model_only_files"] = sorted(os.listdir(model_only))
    try:
        tp_manager.load(saved, [ddp], opt)
        result["optim_layout_error"] = None
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        result["optim_layout_error"] = (type(exc).__name__, str(exc))

    reshard(work, result)

    # --- preemption: only rank 1 gets the signal, both ranks stop ---
    flag = PreemptionFlag()
    result["stop_before"] = flag.should_stop()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    torch.distributed.barrier()
    result["stop_after"] = flag.should_stop()
    result["local_flag"] = flag.is_set
    flag.uninstall()

    torch.save(result, work / f"result_rank{rank}.pt")
    parallel.shutdown()


def reshard(work, result):
    """Adam state carried to another layout: dense TP1 x DP2 -> TP2 and -> PP2, MoE EP2 -> EP1
    and back (megatron-core builds one sub-optimizer at EP1, two above).

    Each case trains 2 steps, saves (reshardable, and dp_reshardable for the refusals), and
    goes on 3 steps (the straight run); each target loads its source's save into a differently
    seeded model (and saves it again for a later target) and trains the same 3 global batches.
    """
    from megatron_mpo import parallel
    from megatron_mpo.training.checkpoint import CheckpointManager

    cases = {"dense": ((1, 1, 1, None), {"tp2": ((2, 1, 1), "dense"), "pp2": ((1, 2, 1), "dense")}),
             "moe": ((1, 1, 2, 4), {"ep1": ((1, 1, 1), "moe"), "ep2": ((1, 1, 2), "ep1")})}
    for case, ((tp, pp, ep, experts), targets) in cases.items():
        layout = parallel.initialize(tp, pp, seed=11, expert=ep)
        ddp, opt = build(layout, seed=11, experts=experts)
        train_scheduled(ddp, opt, layout, [0, 1])
        saved = {case: CheckpointManager(work / case).save(2, [ddp], opt, common={"step": 2}, per_rank={})}
        stiff = CheckpointManager(work / f"{case}_dp", optimizer_format="dp_reshardable")
        stiff_saved = stiff.save(2, [ddp], opt, common={"step": 2}, per_rank={})
        result[f"{case}_state"] = full_optim_state(ddp, opt, layout)
        result[f"{case}_losses"] = train_scheduled(ddp, opt, layout, [2, 3, 4])
        for name, (target, source) in targets.items():
            layout = parallel.initialize(*target[:2], seed=12, expert=target[2])
            ddp, opt = build(layout, seed=12, experts=experts)
            if target != (tp, pp, ep):
                try:
                    stiff.load(stiff_saved, [ddp], opt)
                    result[f"{name}_refusal"] = None
                except Exception as exc:  # noqa: BLE001 - the test checks the type
                    result[f"{name}_refusal"] = (type(exc).__name__, str(exc))
            _, result[f"{name}_extras"] = CheckpointManager(work / source).load(saved[source], [ddp], opt)
            result[f"{name}_state"] = full_optim_state(ddp, opt, layout)
            if name in {s for _, s in targets.values()}:
                saved[name] = CheckpointManager(work / name).save(2, [ddp], opt, common={"step": 2}, per_rank={})
            result[f"{name}_losses"] = train_scheduled(ddp, opt, layout, [2, 3, 4])


def crash(work):
    from megatron_mpo import parallel
    from megatron_mpo.training.checkpoint import CheckpointManager

    layout = parallel.initialize(1, 1, seed=5)
    ddp, opt = build(layout, seed=5)
    manager = CheckpointManager(work / "run", keep_last=None, optimizer_format="dp_reshardable")
    train(ddp, opt, layout, [0, 1])
    manager.save(2, [ddp], opt, common={"step": 2}, per_rank={"loader": 2})
    torch.save({"params": params(ddp), "optim": optim_by_param(ddp, opt)}, work / f"result_rank{layout.data_rank}.pt")
    train(ddp, opt, layout, [2, 3])

    def die(tmp):
        (work / f"dying_rank{torch.distributed.get_rank()}").write_text(str(sorted(os.listdir(tmp))))
        torch.distributed.barrier()  # both ranks have written their part of the tmp dir
        if torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        torch.distributed.barrier()  # rank 1 waits here until torchrun tears it down

    manager._before_commit = die
    manager.save(4, [ddp], opt, common={"step": 4}, per_rank={"loader": 4})
    raise AssertionError("the save of step 4 should not have returned")


def after_crash(work):
    from megatron_mpo import parallel
    from megatron_mpo.training.checkpoint import CheckpointManager

    result = {}
    result["entries_before"] = sorted(os.listdir(work / "run"))
    layout = parallel.initialize(1, 1, seed=5)
    manager = CheckpointManager(work / "run", keep_last=2)
    result["entries_after_start"] = sorted(os.listdir(work / "run"))
    path = manager.resolve("auto")
    result["resolved"] = str(path)
    ddp, opt = build(layout, seed=31)
    common, per_rank = manager.load(path, [ddp], opt)  # DP 2 -> 1: dp_reshardable optimizer
    result["common"], result["per_rank"] = common, per_rank
    result["params"], result["optim"] = params(ddp), optim_by_param(ddp, opt)
    train(ddp, opt, layout, [2])
    for step in (3, 4, 5):
        manager.save(step, [ddp], opt, common={"step": step}, per_rank={})
        result[f"entries_after_{step}"] = sorted(os.listdir(work / "run"))
    result["latest"] = (work / "run" / "latest").read_text().strip()
    # Loading into another architecture is a one-line UserError, not a traceback.
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_mpo.errors import UserError

    wider = dataclasses.replace(ddp.module.config, ffn_hidden_size=256)
    other = GPTModel(config=wider, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=96,
                     max_sequence_length=64, position_embedding_type="rope")
    try:
        manager.load(manager.latest(), [other])
    except UserError as exc:
        result["mismatch_error"] = str(exc)
    torch.save(result, work / "result_after.pt")
    parallel.shutdown()


if __name__ == "__main__":
    mode, work_dir = sys.argv[1], Path(sys.argv[2])
    {"resume": resume, "crash": crash, "after_crash": after_crash}[mode](work_dir)

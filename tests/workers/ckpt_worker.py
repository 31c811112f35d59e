"""Worker for tests/test_checkpoint.py: a small GPTModel in megatron-core DDP + distributed Adam.

Modes (argv[1]), all writing ``result_rank{R}.pt`` into the work dir (argv[2]):

* ``resume`` (2 procs): DP=2 -- train 2 steps, save, train 2 more (reference); fresh
  model + optimizer load the save and train 2 steps (must match exactly). Then TP=2 --
  train 1 step, save; re-form as TP=1 x DP=2 and load the weights. Then SIGUSR1 on rank 1
  only must make ``should_stop()`` true on both ranks.
* ``crash`` (2 procs): save step 2, then die by SIGKILL inside the save of step 4.
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


def build(layout, seed):
    """GPTModel (as in gpt_logps.py) wrapped in DDP, with megatron-core's distributed Adam."""
    from gpt_logps import build_gpt
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_gpt(layout)
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
    gen = torch.Generator().manual_seed(1000 + 10 * step + layout.data_rank)
    ids = torch.randint(0, 96, (2, SEQ), generator=gen)
    from megatron_mpo.batch import causal_mask

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

    out = {}
    for name, p in ddp.module.named_parameters():
        t = p.detach()
        if layout.tensor > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(layout.tensor)]
            torch.distributed.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
            if name.endswith("linear_fc1.weight"):
                halves = [x.chunk(2, dim=p.partition_dim) for x in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t.clone()
    return out


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
    tp_manager = CheckpointManager(work / "tp2", keep_last=None)
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


def crash(work):
    from megatron_mpo import parallel
    from megatron_mpo.training.checkpoint import CheckpointManager

    layout = parallel.initialize(1, 1, seed=5)
    ddp, opt = build(layout, seed=5)
    manager = CheckpointManager(work / "run", keep_last=None)
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

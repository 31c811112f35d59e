"""What every process pays before its first step: megatron-core's import and the
checkpoint writer's set-up (each rank of every launch pays them)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys

import psutil
import torch

from tests.distributed import REPO, worker_env


def test_deferred_compile_builds_the_wrapper_on_first_call_only():
    from megatron_mpo.lazy_compile import deferred

    built = []

    def fake_compile(fn, **options):
        built.append((fn.__name__, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    jit = deferred(fake_compile)

    @jit
    def add(a, b):
        """adds"""
        return a + b

    @jit(mode="max-autotune")
    def mul(a, b):
        return a * b

    assert built == [] and add.__name__ == "add" and add.__doc__ == "adds"
    assert add(1, 2) == ("compiled", 3) and add(3, 4) == ("compiled", 7)
    assert mul(2, 5) == ("compiled", 10)
    assert built == [("add", {}), ("mul", {"mode": "max-autotune"})]  # once each, with the options


def test_importing_megatron_core_through_the_package_builds_no_compile_wrapper():
    """Old: every megatron-core import built ~40 torch.compile wrappers, importing TorchDynamo
    and Inductor (~1.6 s per process); the decorated functions still compile with
    torch.compile, on their first call."""
    probe = (
        "import json, sys, torch, megatron_mpo, megatron.core\n"
        "from megatron.core import jit\n"
        "from megatron.core.fusions.fused_bias_gelu import bias_gelu\n"
        "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules,\n"
        "                  'compiles_with': getattr(bias_gelu, '__wrapped_compile__', None) is torch.compile,\n"
        "                  'eager': bias_gelu.__wrapped__.__name__, 'fuser_is_compile': jit.jit_fuser is torch.compile}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=worker_env(), cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"dynamo": False, "compiles_with": True, "eager": "bias_gelu", "fuser_is_compile": False}, seen


def test_a_checkpoint_save_starts_no_helper_process(tmp_path):
    """Old: the first save (and the trainer's start-up) spawned a multiprocessing.Manager per
    rank that lived as long as the trainer."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer
    from megatron_mpo.training.checkpoint import CheckpointManager, load_model_weights
    from megatron_mpo.training.model_dir import _single_process_model, init_model_dir, read_model_dir

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    build_tiny_tokenizer(str(tmp_path / "tok"))
    config, state = read_model_dir(init_model_dir("tiny", tmp_path / "tok", tmp_path / "init", seed=1))
    model = _single_process_model(config)
    model.load_state_dict(state, strict=False)
    step = CheckpointManager(tmp_path / "save").save(2, [model], None, common={}, per_rank={})
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert started == [], [p.cmdline()[:4] for p in started]
    assert isinstance(filesystem_async._results_queue, queue.Queue)  # not a manager process's proxy
    assert filesystem_async._results_queue.empty()  # the save took its results off the queue
    again = _single_process_model(config)
    load_model_weights(str(step), [again])
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again.state_dict()[name], value), name


def test_laying_out_ranks_again_leaves_no_process_group_behind(world):
    """Old: each new layout in a process (the planner's checks, a tool building several
    layouts, a test module) kept all of the previous layout's gloo groups alive in
    torch.distributed, ~60 threads each; one test process reached 3300 threads."""
    import os

    from torch.distributed import distributed_c10d

    from megatron_mpo import parallel

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    parallel.initialize(1, 1, device="cpu")
    groups, before = len(distributed_c10d._world.pg_map), threads()
    for expert in (1, 1, 1):
        parallel.initialize(1, 1, expert=expert, device="cpu")
    assert len(distributed_c10d._world.pg_map) == groups
    assert threads() <= before + 2, (before, threads())

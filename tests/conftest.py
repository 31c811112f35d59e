"""Shared fixtures: a tiny end-to-end workspace (tokenizer, shards, initial checkpoint,
reference values) built once per test session, and helpers to write run configs."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.distributed import REPO, worker_env


def run_tool(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a tools/ script or ``-m module`` in a fresh process (spawn-safe entry points)."""
    target = list(args[0].split()) if args[0].startswith("-m ") else [str(REPO / args[0])]
    proc = subprocess.run([sys.executable, *target, *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=worker_env(), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def base_config(ws: Path, **sections) -> dict:
    """A small CPU training config over the workspace; ``sections`` update it."""
    cfg = {
        "model": {"init": str(ws / "init")},
        "data": {
            "shards": str(ws / "shards"),
            "ref_logps": str(ws / "refs"),
            "max_length": 512,
            "max_tiles": 4,
            "num_workers": 1,
            "shuffle_buffer": 16,
            "packing": False,
        },
        "train": {"global_batch": 4, "micro_batch": 1, "steps": 5, "lr": 2.0e-3, "warmup": 1,
                  "device": "cpu", "seed": 5},
        "checkpoint": {"interval": 100},
        "logging": {"interval": 1},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# The longest files first, so that two workers (``-n 2 --dist loadfile --no-loadscope-reorder``,
# .ci/run) do not end with one of them alone on a long file; the rest keep their order.
LONGEST_FIRST = ("test_demo.py", "test_training.py", "test_moe.py", "faults/test_run_faults.py", "test_reference.py",
                 "test_model.py", "faults/test_elastic_resume.py", "test_generation_engine.py", "test_plan.py",
                 "test_cli.py", "test_gpu_kit.py", "test_checkpoint.py", "test_parallel_logps.py",
                 "test_sequence_parallel.py", "test_benchmark_smoke.py", "test_perf_settings.py")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return next((i for i, name in enumerate(LONGEST_FIRST) if path == f"tests/{name}"), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: each file's tests keep their order


_TASKS = "/proc/self/task"
_threads_after_collect = [0]


def _threads() -> int:
    return len(os.listdir(_TASKS)) if os.path.isdir(_TASKS) else 0


@pytest.fixture(autouse=True)
def _reclaim_process_groups():
    """Collect garbage once a test leaves 20+ more threads than the last collection did.

    A model, optimizer or schedule built in this process holds its process groups in
    reference cycles; each gloo group keeps three threads that wake and compete for the CPU
    until the cycle is collected, which Python's generational collector does rarely. Left
    alone they reached 3300 threads in one test process, and every later launch ran 2-4x
    slower. Counting threads is cheap; a full collection runs only when they piled up.
    """
    yield
    if _threads() > _threads_after_collect[0] + 20:
        gc.collect()
        _threads_after_collect[0] = _threads()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """tokenizer/, raw/, shards/ (4 shards), init/ (tiny InternVL), refs/ (TP=1)."""
    ws = tmp_path_factory.mktemp("ws")
    from megatron_mpo.data.synthetic import write_synthetic_mmpr
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(str(ws / "tok"))
    meta = write_synthetic_mmpr(str(ws / "raw"), num_records=48, seed=3)
    run_tool("tools/make_shards.py", "--meta", meta, "--out", str(ws / "shards"), "--samples-per-shard", "16")
    run_tool("tools/init_checkpoint.py", "--preset", "tiny", "--tokenizer", str(ws / "tok"), "--out",
             str(ws / "init"), "--seed", "1")
    cfg = write_config(ws / "ref.yaml", base_config(ws))
    run_tool("tools/precompute_ref_logps.py", "--config", str(cfg))
    return ws


STRAIGHT_STEPS = 8


@pytest.fixture(scope="session")
def straight_run(workspace, tmp_path_factory) -> Path:
    """8 uninterrupted steps at TP1 from the workspace (base_config settings: cosine, one
    loader worker), checkpoints at 4 and 8: the reference run of layout and resume tests."""
    run = tmp_path_factory.mktemp("straight")
    cfg = base_config(workspace, checkpoint={"save": str(run / "ckpt"), "interval": 4, "keep_last": 5},
                      logging={"metrics": str(run / "metrics.jsonl")})
    cfg["train"]["steps"] = STRAIGHT_STEPS
    proc = run_tool("-m megatron_mpo.train", "--config", str(write_config(run / "config.yaml", cfg)), timeout=600)
    (run / "stdout.txt").write_text(proc.stdout)  # its console, checked by tests/test_console.py
    (run / "stderr.txt").write_text(proc.stderr)
    return run


@pytest.fixture(scope="module")
def world():
    """A one-process CPU world for the module (torn down after, unless another test owns it)."""
    import torch

    from megatron_mpo import parallel

    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    parallel.initialize(1, 1, device="cpu")
    yield
    if owned:
        parallel.shutdown()


def loader_settings(**keys) -> tuple:
    """(data section, loader plan) for :func:`megatron_mpo.data.build_loader`: each keyword
    goes to the one of the two that declares it."""
    import dataclasses

    from megatron_mpo.data import DataConfig, LoaderPlan

    planned = {f.name for f in dataclasses.fields(LoaderPlan)}
    return (DataConfig(**{k: v for k, v in keys.items() if k not in planned}),
            LoaderPlan(**{k: v for k, v in keys.items() if k in planned}))


def resumed_loader(cfg, tok, k: int):
    """A loader restored from the JSON state another one had after ``k`` micro-batches
    (``cfg``: :func:`loader_settings`)."""
    from megatron_mpo.data import build_loader

    first = build_loader(*cfg, tok)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = build_loader(*cfg, tok)
    resumed.load_state_dict(state)
    return resumed


@pytest.fixture(scope="module")
def megatron_tp1():
    """megatron-core parallel state for TP=1/PP=1 in this process (torn down after)."""
    import torch

    from megatron_mpo import platform

    saved_env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    platform.setup("cpu")
    own_group = not torch.distributed.is_initialized()
    platform.init_distributed()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    if own_group:
        torch.distributed.destroy_process_group()
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

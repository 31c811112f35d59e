"""Runs stopped by signals save and resume exactly (tests/faults: the fault suite).

Each resume case compares 8 steps from the workspace's initial checkpoint run straight
(the session's straight run, or one with a constant schedule) with a run stopped by a real signal -- SIGTERM to every process of the job (what
Slurm does at preemption), Ctrl-C's SIGINT to torchrun -- and then resumed with
``checkpoint.load=auto``. Checkpoints are saved every 2 steps, so the resumed run saves
before its last steps: the losses of every step after the interruption must equal the
straight run's bit for bit. SIGTERM to the launcher script (which asks the ranks with
SIGUSR1, the Slurm launcher's path) must stop two ranks with loader workers cleanly.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import base_config, read_jsonl, write_config
from tests.distributed import REPO, launch_command, worker_env

STEPS = 8
COMPARED = ("loss", "loss_preference", "loss_quality", "loss_generation", "reward_margin", "delta", "lr",
            "grad_norm")


def _config(ws: Path, run: Path, nproc: int = 1, **train_data) -> Path:
    """base_config (the session's straight run) plus a run dir, checkpoints every 2 steps,
    ``load=auto``; ``train_data``: train / data section updates."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = base_config(ws, train={"steps": STEPS, **train_data.get("train", {})},
                      data=train_data.get("data", {}), parallel={"tensor": nproc},
                      checkpoint={"save": str(run / "ckpt"), "interval": 2, "load": "auto"},
                      logging={"metrics": str(run / "metrics.jsonl")})
    return write_config(run / "config.yaml", cfg)


def _run(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _torchrun(config: Path, nproc: int) -> list[str]:
    return launch_command("-m megatron_mpo.train", nproc, "--config", config)


def _wait_for_steps(proc: subprocess.Popen, metrics: Path, count: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(read_jsonl(metrics)) >= count:
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"training did not reach step {count}:\n{proc.communicate()[0][-3000:]}")


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for p in _tree(proc.pid):
            p.kill()
        pytest.fail(f"the stopped run did not exit:\n{proc.communicate()[0][-3000:]}")


def _stop_resume_compare(ws: Path, root: Path, straight: list[dict], stop, **train_data) -> None:
    """Start, ``stop(proc)`` after step 2, resume to the end, compare with ``straight``."""
    run = root / "stopped"
    config = _config(ws, run, **train_data)
    metrics = run / "metrics.jsonl"
    proc = _run(stop.command(config, 1))
    _wait_for_steps(proc, metrics, 2)
    stop(proc)
    output = _finish(proc)
    assert "preempted: saved step" in output, output[-3000:]
    saved = int((run / "ckpt" / "latest").read_text().split("_")[1])
    assert 2 <= saved <= 5, saved  # later saves follow in the resumed run: they must not disturb it
    resumed = subprocess.run(stop.command(config, 1), cwd=REPO, env=worker_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = [r for r in read_jsonl(metrics) if r["step"] > saved]
    assert [r["step"] for r in after] == list(range(saved + 1, STEPS + 1))
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    for a, b in zip(straight[saved:], after):
        for key in COMPARED:
            assert a[key] == b[key], (key, a["step"], a[key], b[key])


class _SigtermEveryProcess:
    """What Slurm does at preemption or scancel: SIGTERM to every process of the job,
    torchrun, the ranks and their loader workers alike."""

    command = staticmethod(_torchrun)

    def __call__(self, proc: subprocess.Popen) -> None:
        for p in _tree(proc.pid):
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass


class _CtrlC:
    """Ctrl-C at the terminal: SIGINT to torchrun (its ranks run in sessions of their own)."""

    command = staticmethod(_torchrun)

    def __call__(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGINT)


class _SigtermToLauncher:
    """SIGTERM to examples/launch/torchrun_single_node.sh, which asks the ranks with SIGUSR1
    (the Slurm launcher's path before the time limit)."""

    @staticmethod
    def command(config: Path, nproc: int) -> list[str]:
        from megatron_mpo.platform import free_port

        return ["env", f"NPROC_PER_NODE={nproc}", f"MASTER_PORT={free_port()}", str(REPO / "examples" / "launch" / "torchrun_single_node.sh"),
                str(config)]

    def __call__(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)


def test_sigterm_to_every_process_saves_and_resumes_exactly_constant_schedule(workspace, tmp_path):
    sections = {"train": {"schedule": "constant"}, "data": {"num_workers": 0}}
    straight = tmp_path / "straight"
    subprocess.run(_torchrun(_config(workspace, straight, **sections), 1), cwd=REPO, env=worker_env(),
                   capture_output=True, timeout=600, check=True)
    _stop_resume_compare(workspace, tmp_path, read_jsonl(straight / "metrics.jsonl"), _SigtermEveryProcess(),
                         **sections)


def test_ctrl_c_to_torchrun_saves_and_resumes_exactly_cosine_schedule(workspace, straight_run, tmp_path):
    _stop_resume_compare(workspace, tmp_path, read_jsonl(straight_run / "metrics.jsonl"), _CtrlC())


def test_launcher_sigterm_stops_two_ranks_with_loader_workers(workspace, tmp_path):
    """The launcher's SIGUSR1 reaches both ranks, which save at the same step and exit 0."""
    stop = _SigtermToLauncher()
    run = tmp_path / "stopped"
    proc = _run(stop.command(_config(workspace, run, nproc=2), 2))
    _wait_for_steps(proc, run / "metrics.jsonl", 2)
    stop(proc)
    output = _finish(proc)
    assert proc.returncode == 0 and "preempted: saved step" in output, output[-3000:]
    saved = (run / "ckpt" / "latest").read_text().strip()
    assert sorted(p.name for p in (run / "ckpt" / saved).glob("rank_*")) == ["rank_00000.pt", "rank_00001.pt"]

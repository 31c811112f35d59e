"""Launch real multi-process jobs (gloo on CPU) from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch_command(script: Path | str, nproc: int, *args: str) -> list[str]:
    """The torch.distributed.run command line; ``script`` "-m pkg.mod" runs a module."""
    target = str(script).split() if str(script).startswith("-m ") else [str(script)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *target,
        *map(str, args),
    ]


def worker_env(env: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}


def launch(script: Path | str, nproc: int, *args: str, timeout: int = 600, env: dict | None = None,
           check: bool = True):
    """Run ``script`` under torch.distributed.run with ``nproc`` local processes.

    Fails the calling test with the workers' output when any rank fails (``check``).
    """
    cmd = launch_command(script, nproc, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(env), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} failed with code {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc

"""Helper processes (data-loader workers, checkpoint writer) and job signals.

Schedulers deliver SIGUSR1 / SIGTERM (and Ctrl-C its SIGINT) to every process of a job. Helpers
must not die of them -- the trainer catches the signal, saves a checkpoint and exits, and
needs its helpers alive for that -- and must not outlive the trainer either (kill -9
included).
"""

from __future__ import annotations

import os
import signal
from typing import Optional

# SIGTERM too: torchrun stops its ranks by signalling each rank's whole process group, and
# Slurm signals every process of a job. The trainer turns the signal into a checkpoint and
# needs its helpers alive for that (a loader worker's death surfaces as a RuntimeError
# wherever the trainer happens to be). Helpers also leave the trainer's process group, so
# group-wide signals (torchrun's killpg, Ctrl-C at a terminal) do not reach them at all.
# They still end: on the loader's shutdown message, with the trainer (PR_SET_PDEATHSIG),
# and by SIGKILL from :func:`reap_helpers` at the trainer's exit.
JOB_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)


def init_helper_process(parent: Optional[int] = None) -> None:
    """Ignore job signals (meant for the trainer), leave its process group, die with ``parent``."""
    parent = parent if parent is not None else os.getppid()
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        os.setpgid(0, 0)
    except OSError:  # already a group / session leader
        pass
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def reap_helpers(timeout: float = 5.0) -> int:
    """SIGKILL daemonic helper processes still alive ``timeout`` seconds from now.

    Helpers ignore SIGTERM, which is how multiprocessing stops daemonic children at
    interpreter exit before joining them: one stuck in I/O would otherwise hang the exit.
    Returns how many had to be killed.
    """
    import multiprocessing
    import time

    deadline = time.monotonic() + timeout
    killed = 0
    for child in multiprocessing.active_children():
        if not child.daemon:
            continue
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)
            killed += 1
    return killed


def data_worker_init(_worker_id: int) -> None:
    """``worker_init_fn`` for torch DataLoader workers."""
    init_helper_process()

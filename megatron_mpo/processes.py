"""Helper processes (data-loader workers, checkpoint writer) and job signals.

Schedulers deliver SIGUSR1 (and Ctrl-C its SIGINT) to every process of a job. Helpers
must not die of them -- the trainer catches the signal, saves a checkpoint and exits, and
needs its helpers alive for that -- and must not outlive the trainer either (kill -9
included).
"""

from __future__ import annotations

import os
import signal
from typing import Optional

# SIGTERM stays deadly: multiprocessing stops helpers with it at exit, and a helper that
# ignored it would hang the trainer's exit. A scheduler's SIGTERM to every process is
# handled by the trainer instead (a failed data fetch after the signal ends the run with
# the last checkpoint, see megatron_mpo.train).
JOB_SIGNALS = (signal.SIGINT, signal.SIGUSR1)


def init_helper_process(parent: Optional[int] = None) -> None:
    """Ignore SIGINT/SIGUSR1 (meant for the trainer) and die with ``parent`` (Linux)."""
    parent = parent if parent is not None else os.getppid()
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def data_worker_init(_worker_id: int) -> None:
    """``worker_init_fn`` for torch DataLoader workers."""
    init_helper_process()

"""Helper processes (data-loader workers, checkpoint writer) and job signals.

Schedulers deliver SIGTERM / SIGUSR1 to every process of a job. Helpers must not die of
them -- the trainer catches the signal, saves a checkpoint and exits, and needs its
helpers alive for that -- and must not outlive the trainer either (kill -9 included).
"""

from __future__ import annotations

import os
import signal
from typing import Optional

JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def init_helper_process(parent: Optional[int] = None) -> None:
    """Ignore job signals and die with ``parent`` (default: the parent right now; Linux)."""
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

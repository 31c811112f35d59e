"""Preemption: job signals become a flag that the training loop polls, so it saves and exits."""

from __future__ import annotations

import signal
from typing import Any, Optional, Sequence

import torch

from megatron_mpo import platform

__all__ = ["PreemptionFlag"]


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class PreemptionFlag:
    """Turns SIGTERM / SIGUSR1 / SIGINT into a flag, so a stopped job saves before it exits.

    SIGTERM is what torchrun sends its ranks when it is stopped itself (and schedulers at
    preemption), SIGUSR1 what the Slurm launcher sends before the time limit, SIGINT what
    torchrun forwards on Ctrl-C. The handler only sets the flag; the training loop polls
    :meth:`should_stop`, which all ranks must call at the same step (it is a collective) so
    that they stop together. A second SIGINT interrupts at once (KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, signals: Sequence[int] = SIGNALS):
        self.received: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def is_set(self) -> bool:
        """This rank got a signal (no communication)."""
        return self.received is not None

    def should_stop(self, group: Any = None) -> bool:
        """True on every rank when any rank got a signal (all-reduce MAX)."""
        if not _dist():
            return self.is_set
        flag = torch.tensor([1 if self.is_set else 0], dtype=torch.int32, device=platform.device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

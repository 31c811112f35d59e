"""Forward-only passes over a stream of micro-batch groups: the reference tool's and the
held-out evaluation's one loop.

Each group is one schedule call (``forward_only=True``, no grad). With expert parallelism
the tokens of every forward travel between data-parallel ranks, so those ranks must make
the same collectives whatever their shards hold: each round every rank says where it
stands (one all-reduce), and while any rank still has micro-batches every rank runs one
schedule call of ``per_call`` micro-batches, topped up with fillers whose results are
dropped. Without expert parallelism every rank just runs its own groups.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from megatron_mpo import parallel
from megatron_mpo.training import schedule

_THROUGH, _NO_MICRO_BATCHES, _MICRO_BATCHES = 0, 1, 2  # a rank's state in a lockstep round


def groups_of(iterator: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    group: list = []
    for item in iterator:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class ForwardOnly:
    """Runs forward-only schedule calls of micro-batch groups on model chunks.

    ``filler`` returns one real micro-batch (any), read when a lockstep round needs one;
    ``lockstep`` is true under expert parallelism (:func:`needs_lockstep`).
    """

    def __init__(self, chunks: list, forward_step: Callable, pad_id: int, *, lockstep: bool, per_call: int,
                 filler: Callable[[], Any]) -> None:
        self.chunks = chunks
        self.forward_step = forward_step
        self.pad_id = pad_id
        self.lockstep = lockstep
        self.per_call = per_call
        self.filler = filler
        self._forward_backward = schedule.forward_backward_func()

    def forward(self, group: list) -> list:
        """The results of one schedule call (the last pipeline stage's; others get [])."""
        real = len(group)
        if self.lockstep:
            group = group + [group[0] if group else self.filler()] * (self.per_call - real)
        with torch.no_grad():
            results = schedule.run_schedule(self._forward_backward, self.forward_step, self.chunks, group,
                                            self.pad_id, forward_only=True)
        return results[:real] if results else results

    def rounds(self, items: Iterable, group_of: Callable[[Any], list]) -> Iterator[tuple[Optional[Any], list]]:
        """(item, results) per item of this rank; in lockstep also (None, []) for the rounds
        this rank has finished but another has not. ``group_of(item)`` is its micro-batches
        (may be empty: nothing to run for that item)."""
        items = iter(items)
        while True:
            item = next(items, None)
            group = group_of(item) if item is not None else []
            if self.lockstep:
                state = parallel.max_over_ranks(
                    _MICRO_BATCHES if group else _NO_MICRO_BATCHES if item is not None else _THROUGH)
                if state == _THROUGH:
                    return
                results = self.forward(group) if state == _MICRO_BATCHES else []
            elif item is None:
                return
            else:
                results = self.forward(group) if group else []
            yield item, results


def needs_lockstep(model_config: Any, expert: int) -> bool:
    """Expert parallelism makes every forward a collective over data-parallel ranks."""
    return bool(model_config.language.is_moe and expert > 1)

"""Balanced data-parallel steps over one rank's :class:`~megatron_mpo.data.pipeline.PairLoader`.

Each rank keeps a look-ahead buffer of pairs from its own shards (the step's share plus
``lookahead``), all-gathers only their costs, and every rank computes the same plan
(:func:`~megatron_mpo.data.balance.plan_step`): which of its buffered pairs each rank trains
this step. A rank's pairs are dealt into the step's micro-batches
(:func:`~megatron_mpo.data.balance.split_micro_batches`) and collated here; the number of
micro-batches per step is the trainer's, the same on every rank.

Why this and not a plan over all pairs of the epoch with random access into the shards:
shards stream (http, ``pipe:``), read in order and shuffled through a buffer; random
access would need seekable local tars and a second read path. Images never move between
ranks either way; here nothing but one row of costs per rank and step does.

Every pair still trains once per epoch: a pair waits in the buffer at most two buffers'
worth of reads (then it is due and taken), pairs of an epoch left in the buffer when the
rank's streams go on to the next epoch train with it, keeping their epoch. Resume is
exact: the state is the loader position before the oldest untrained buffered pair, plus
the samples after it that were already trained (``ahead``); a restarted rank reads from
there, skips those, refills its buffer with the same pairs and so plans the same steps. A
resume at another layout counts ``ahead`` as consumed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence

from megatron_mpo.batch import PairBatch
from megatron_mpo.data.balance import CostModel, buffer_capacity, due, plan_step, split_micro_batches
from megatron_mpo.data.consumed import SampleSet, merge_epochs
from megatron_mpo.data.pipeline import LoadedPair, PairLoader, collate

__all__ = ["BalancedLoader"]

Gather = Callable[[List[float]], List[List[float]]]


@dataclass
class _Entry:
    loaded: LoadedPair
    cost: float
    trained: bool = False  # set when the last micro-batch of its step is handed out

    @property
    def seq(self) -> int:  # pulls before this one (the loader's pair count: restored on resume)
        return int(self.loaded.before["pairs"])


class BalancedLoader:
    """Micro-batches of balanced steps for one data-parallel rank: ``micro_batches`` per step,
    ``global_batch`` pairs per step over all ranks, split by cost.

    ``gather(row)`` all-gathers one list of floats per rank (the same length on every rank)
    over the data-parallel group and returns them in rank order: a collective every rank
    calls once per step. The trainer takes ``micro_batches`` at a time; :meth:`state_dict`
    between steps is exact, within a step it is the state before the step.
    """

    def __init__(self, loader: PairLoader, cost: CostModel, global_batch: int, micro_batches: int, lookahead: int,
                 gather: Gather):
        self.loader = loader
        self.cost = cost
        self.global_batch, self.micro_batches = global_batch, micro_batches
        self.capacity = buffer_capacity(global_batch, loader.dp_size, lookahead)
        self.gather = gather
        loader.extra_fingerprint = {"balance": {
            "global_batch": global_batch, "micro_batches": micro_batches, "lookahead": lookahead,
            "cost": [cost.position, cost.key, cost.scored, cost.tile, cost.packed]}}
        self._window: Deque[_Entry] = deque()  # pulled pairs, from the oldest untrained one on

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The loader position before the oldest untrained pair, and what was trained after it."""
        head = next((e for e in self._window if not e.trained), None)
        trained: Dict[int, SampleSet] = {}
        for e in self._window:
            if e.trained:
                trained.setdefault(e.loaded.epoch, SampleSet()).add(*e.loaded.sample)
        ahead = merge_epochs([trained, self.loader.ahead])
        return self.loader.state_dict(at=head.loaded.before if head is not None else None, ahead=ahead)

    def resume(self, saved: dict, share=(0, 1), gather=None, allow_changed_data: bool = False) -> str:
        """:meth:`PairLoader.resume` of the wrapped loader (its buffer starts empty)."""
        line = self.loader.resume(saved, share, gather, allow_changed_data)
        self._window.clear()
        return line

    @property
    def skip_counts(self) -> Dict[str, int]:
        return self.loader.skip_counts

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PairBatch]:
        pairs = self.loader.iter_pairs()
        try:
            while True:
                step = self._plan(pairs)
                if step is None:
                    return
                entries, groups = step
                for n, group in enumerate(groups, start=1):
                    batch = self._collate([entries[i] for i in group])
                    if n == len(groups):  # the step is the trainer's once it has all of it
                        self._commit(entries)
                    yield batch
        finally:
            pairs.close()

    def _fill(self, pairs: Iterator[LoadedPair]) -> List[_Entry]:
        """The untrained buffered pairs, oldest first, after reading up to ``capacity`` of them."""
        waiting = [e for e in self._window if not e.trained]
        while len(waiting) < self.capacity:
            loaded = next(pairs, None)
            if loaded is None:
                break
            p = loaded.pair
            entry = _Entry(loaded, self.cost.pair_cost(len(p.prompt), len(p.chosen), len(p.rejected), p.num_tiles))
            self._window.append(entry)
            if loaded.done:
                self._commit([entry])
            else:
                waiting.append(entry)
        self._drop_trained_head()
        return waiting

    def _plan(self, pairs: Iterator[LoadedPair]) -> Optional[tuple]:
        """This rank's entries of the next step and their micro-batch groups; None when the
        ranks' buffers together cannot fill a step (every rank sees the same)."""
        waiting = self._fill(pairs)
        ready = due([self.loader.pairs - e.seq for e in waiting], self.capacity)
        row = [float(len(waiting)), float(ready)] + [e.cost for e in waiting]
        row += [0.0] * (2 + self.capacity - len(row))
        rows = self.gather(row)
        sizes = [int(r[0]) for r in rows]
        if sum(sizes) < self.global_batch or min(sizes) < self.micro_batches:
            return None
        costs = [r[2:2 + n] for r, n in zip(rows, sizes)]
        mine = plan_step(costs, [int(r[1]) for r in rows], self.global_batch, self.micro_batches)[self.loader.dp_rank]
        entries = [waiting[i] for i in mine]
        return entries, split_micro_batches([e.cost for e in entries], self.micro_batches)

    def _commit(self, entries: Sequence[_Entry]) -> None:
        for e in entries:
            e.trained = True
            e.loaded.pair = None  # its tiles: only the sample's identity stays until the head moves past it
        self._drop_trained_head()

    def _drop_trained_head(self) -> None:
        """Trained pairs before the oldest untrained one lie behind the state's position."""
        while self._window and self._window[0].trained:
            self._window.popleft()

    def _collate(self, entries: Sequence[_Entry]) -> PairBatch:
        loader = self.loader
        batch = collate([e.loaded.pair for e in entries], loader.config, loader.loading, loader.tokenizer)
        batch.epoch = [e.loaded.epoch for e in entries]
        return batch

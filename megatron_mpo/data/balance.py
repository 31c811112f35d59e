"""Balanced data-parallel steps: what a pair costs, and which pairs each rank trains.

Preference pairs differ in cost by an order of magnitude (1-13 tiles of 256 tokens,
answers of tens to a thousand tokens) and a step waits for its slowest data-parallel rank.
Each rank keeps a look-ahead buffer of pairs from its own shards -- no image moves between
ranks -- and the ranks all-gather only the buffers' costs. :func:`plan_step`, a pure
function of those costs, then says which of its buffered pairs each rank trains: every
rank computes the same plan. Ranks take different numbers of pairs where the micro-batch
count leaves room (cheap ranks take more) and pick among their buffered pairs, so that
their costs come close while the step keeps its global batch, every micro-batch gets a
pair, and a pair that waited too long is taken first. :func:`split_micro_batches` deals a
rank's pairs into its micro-batches with similar costs (pipeline stages see even
micro-batches).

Costs are model FLOPs in the trainer's own terms (:class:`CostModel`, built from
``training.flops.FlopCounter``): LLM positions, attention per query-key pair computed,
output layer per scored token, vision tower per tile -- all known once the loader has
tokenised and tiled a pair, before the model sees it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Sequence

__all__ = ["CostModel", "plan_step", "split_micro_batches", "busy_share", "loads", "buffer_capacity", "due"]

PATIENCE = 2  # a buffered pair is due once this many buffers' worth of pairs were read after it
POLISH_ROUNDS = 3  # passes of pair swaps towards the mean load after the first plan
MAX_SWAPS = 32  # swaps per rank and pass: enough to settle, bounded for large buffers


@dataclass(frozen=True)
class CostModel:
    """Model FLOPs of one pair collated alone: ``position`` per LLM position, ``key`` per
    query-key pair the attention computes, ``scored`` per response token (the output layer
    runs on those only), ``tile`` per image tile (vision tower + projector). ``packed``:
    the pair's rows as ``data.packing`` lays them out (one row with the prompt once, or a
    row per response)."""

    position: float
    key: float
    scored: float
    tile: float
    packed: bool = True

    def pair_cost(self, prompt: int, chosen: int, rejected: int, tiles: int) -> float:
        """FLOPs of a pair of ``prompt`` / ``chosen`` / ``rejected`` tokens and ``tiles`` tiles."""
        if self.packed:  # prompt, chosen, the repeated last prompt token, rejected (data/collate.py)
            positions = prompt + chosen + 1 + rejected
            head, tail = prompt + chosen, rejected + 1
            keys = head * (head + 1) // 2 + tail * (prompt - 1) + tail * (tail + 1) // 2
        else:  # two causal rows, the shorter padded to the longer
            row = prompt + max(chosen, rejected)
            positions, keys = 2 * row, row * (row + 1)
        return positions * self.position + keys * self.key + (chosen + rejected) * self.scored + tiles * self.tile


def buffer_capacity(global_batch: int, dp_size: int, lookahead: int) -> int:
    """Pairs a rank buffers: its share of a step plus the look-ahead."""
    return global_batch // dp_size + lookahead


def due(ages: Sequence[int], capacity: int) -> int:
    """How many of the buffered pairs (oldest first; ``ages``: pairs read since each) are
    due: they waited ``PATIENCE`` buffers' worth of reads, so no pair waits for ever."""
    return sum(1 for age in ages if age > PATIENCE * capacity)


def loads(costs: Sequence[Sequence[float]], picks: Sequence[Sequence[int]]) -> List[float]:
    """Per rank, the summed cost of the picked buffer entries."""
    return [sum(costs[r][i] for i in picks[r]) for r in range(len(costs))]


def busy_share(rank_loads: Sequence[float]) -> float:
    """The share of a step each rank computes on average: mean load / largest load."""
    top = max(rank_loads)
    return sum(rank_loads) / len(rank_loads) / top if top > 0 else 1.0


def _lower_bounds(sizes: Sequence[int], forced: Sequence[int], total: int, minimum: int) -> List[int]:
    """Pairs each rank must take: its micro-batch count, or more when more of its pairs are
    due; due pairs beyond what the global batch allows wait (the most loaded ranks' first)."""
    due = [min(f, n) for f, n in zip(forced, sizes)]
    lower = [max(minimum, d) for d in due]
    while sum(lower) > total:
        r = max((r for r in range(len(lower)) if lower[r] > minimum), key=lambda r: (lower[r], -r))
        lower[r] -= 1
    return lower


def plan_step(costs: Sequence[Sequence[float]], forced: Sequence[int], total: int, minimum: int) -> List[List[int]]:
    """Which buffered pairs each rank trains this step: per rank, ascending buffer indices.

    ``costs[r]``: rank ``r``'s buffer, oldest first; its first ``forced[r]`` entries are due
    (they waited long enough) and are taken. Every rank takes at least ``minimum`` pairs (one
    per micro-batch), all ranks together ``total``. The target load is the step's share of
    the buffers' mean cost, so buffers do not drift towards pairs nobody takes. Ranks first
    take pairs oldest first while they fit the target; counts are then brought to ``total``
    on the most / least loaded ranks; last, swaps within each rank's buffer bring every
    load towards the mean. Deterministic: ties go to the lower rank and index.
    """
    sizes = [len(c) for c in costs]
    if len(costs) != len(forced) or minimum < 1 or any(n < minimum for n in sizes) or sum(sizes) < total:
        raise ValueError(f"no plan: {total} pairs of {minimum}+ per rank from buffers of {sizes}")
    lower = _lower_bounds(sizes, forced, total, minimum)
    keep = [min(f, n) for f, n in zip(forced, lower)]  # due entries taken: never dropped or swapped out
    # The step's share of the buffers' mean cost, or more when some rank cannot go below that
    # (its due pairs and cheapest others): then the others take costlier pairs too.
    floor = max(sum(c[:k]) + sum(sorted(c[k:])[:n - k]) for c, k, n in zip(costs, keep, lower))
    target = max(total * sum(sum(c) for c in costs) / sum(sizes) / len(costs), floor)
    picks: List[List[int]] = []
    load: List[float] = []
    for r, c in enumerate(costs):
        mine: List[int] = []
        total_r = 0.0
        for i, cost in enumerate(c):
            if len(mine) < lower[r] or total_r + cost <= target:
                mine.append(i)
                total_r += cost
        picks.append(mine)
        load.append(total_r)
    _fit_count(costs, picks, load, lower, keep, total, target)
    for _ in range(POLISH_ROUNDS):
        goal = max(sum(load) / len(load), floor)
        if not any([_swap_towards(costs[r], picks[r], load, r, keep[r], goal) for r in range(len(costs))]):
            break
    return [sorted(p) for p in picks]


def _fit_count(costs, picks, load, lower, keep, total: int, target: float) -> None:
    """Drop pairs from the most loaded ranks (or add to the least loaded) until ``total``:
    each time the pair that leaves the rank's load closest to ``target``."""
    count = sum(len(p) for p in picks)
    while count > total:
        r = max((r for r in range(len(picks)) if len(picks[r]) > lower[r]), key=lambda r: (load[r], -r))
        i = min((i for i in picks[r] if i >= keep[r]), key=lambda i: (abs(load[r] - costs[r][i] - target), i))
        picks[r].remove(i)
        load[r] -= costs[r][i]
        count -= 1
    while count < total:
        r = min((r for r in range(len(picks)) if len(picks[r]) < len(costs[r])), key=lambda r: (load[r], r))
        taken = set(picks[r])
        i = min((i for i in range(len(costs[r])) if i not in taken),
                key=lambda i: (abs(load[r] + costs[r][i] - target), i))
        picks[r].append(i)
        load[r] += costs[r][i]
        count += 1


def _swap_towards(c: Sequence[float], mine: List[int], load: List[float], r: int, keep: int, goal: float) -> bool:
    """Swap picked entries (beyond the first ``keep`` buffer entries, which are due) for
    unpicked ones while that brings ``load[r]`` closer to ``goal``; True if any moved."""
    taken = set(mine)
    rest = sorted((c[i], i) for i in range(len(c)) if i not in taken)
    moved = False
    for _ in range(MAX_SWAPS):
        best, move = abs(load[r] - goal), None
        for out in mine:
            if out < keep:
                continue
            want = goal - load[r] + c[out]
            k = bisect.bisect_left(rest, (want, -1))
            for j in (k - 1, k):
                if 0 <= j < len(rest):
                    gap = abs(load[r] - c[out] + rest[j][0] - goal)
                    if gap < best - 1e-12 * abs(goal):
                        best, move = gap, (out, j)
        if move is None:
            return moved
        out, j = move
        cost_in, into = rest.pop(j)
        bisect.insort(rest, (c[out], out))
        mine[mine.index(out)] = into
        load[r] += cost_in - c[out]
        moved = True
    return moved


def split_micro_batches(costs: Sequence[float], count: int) -> List[List[int]]:
    """Indices of ``costs`` dealt into ``count`` micro-batches of similar cost (largest first
    to the least loaded; every micro-batch gets at least one); each ascending."""
    if len(costs) < count:
        raise ValueError(f"{len(costs)} pairs cannot fill {count} micro-batches")
    bins: List[List[int]] = [[] for _ in range(count)]
    total = [0.0] * count
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(count), key=lambda b: (len(bins[b]) > 0, total[b], b))
        bins[b].append(i)
        total[b] += costs[i]
    return [sorted(b) for b in bins]

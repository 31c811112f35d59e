"""What an epoch has already consumed, and which data it was: the parts of a loader's
state that must survive a change of layout or a rebuilt shard set.

A loader's stream positions (raw samples read) mean something only under the layout that
produced them (data-parallel size, workers, seed, shuffle buffer). To continue an epoch at
another layout, the old streams are replayed into the samples they consumed -- a
:class:`SampleSet` of (shard, ordinal in the shard) -- and the new layout reads the rest.
:func:`data_identity` names the shard contents a position refers to, so a resume on
shards rebuilt under the same names is caught instead of training some pairs twice and
others never.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union

from megatron_mpo.data.refs import shard_name
from megatron_mpo.errors import UserError

WHOLE = "all"  # JSON marker of a shard consumed entirely


class SampleSet:
    """Samples of one epoch by shard: a whole shard, or a set of ordinals (0-based, tar order)."""

    def __init__(self) -> None:
        self._whole: Set[str] = set()
        self._some: Dict[str, Set[int]] = {}

    def add(self, shard: str, ordinal: int) -> None:
        if shard not in self._whole:
            self._some.setdefault(shard, set()).add(ordinal)

    def add_shard(self, shard: str) -> None:
        self._whole.add(shard)
        self._some.pop(shard, None)

    def discard(self, shard: str, ordinal: int) -> None:
        """Forget one sample of a partly consumed shard (whole shards stay whole)."""
        self._some.get(shard, set()).discard(ordinal)

    def has(self, shard: str, ordinal: int) -> bool:
        return shard in self._whole or ordinal in self._some.get(shard, ())

    def is_whole(self, shard: str) -> bool:
        return shard in self._whole

    def ordinals(self, shard: str) -> Set[int]:
        """The ordinals of a partly consumed shard (empty for a whole or untouched one)."""
        return set(self._some.get(shard, ()))

    def update(self, other: "SampleSet") -> None:
        for shard in other._whole:
            self.add_shard(shard)
        for shard, ordinals in other._some.items():
            if shard not in self._whole:
                self._some.setdefault(shard, set()).update(ordinals)

    def count(self, sizes: Mapping[str, Optional[int]]) -> Optional[int]:
        """Samples in the set; None when a whole shard's size is unknown."""
        total = sum(len(o) for o in self._some.values())
        for shard in self._whole:
            if sizes.get(shard) is None:
                return None
            total += int(sizes[shard])
        return total

    def covers(self, shards: Iterable[str]) -> bool:
        """Every one of ``shards`` consumed entirely."""
        return all(s in self._whole for s in shards)

    def __bool__(self) -> bool:
        return bool(self._whole or self._some)

    def to_json(self) -> dict:
        """``{shard: "all" | [[start, end), ...]}``: ranges keep a mostly-read shard small."""
        out: dict = {shard: WHOLE for shard in sorted(self._whole)}
        for shard, ordinals in sorted(self._some.items()):
            ranges: List[List[int]] = []
            for i in sorted(ordinals):
                if ranges and ranges[-1][1] == i:
                    ranges[-1][1] = i + 1
                else:
                    ranges.append([i, i + 1])
            out[shard] = ranges
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "SampleSet":
        out = cls()
        for shard, value in data.items():
            if value == WHOLE:
                out.add_shard(shard)
                continue
            for start, end in value:
                out._some.setdefault(shard, set()).update(range(int(start), int(end)))
        return out


def shard_keys(urls: Sequence[str]) -> Dict[str, str]:
    """The key each shard is known by in a position: its name (a moved shard folder still
    matches), or its URL when two shards share a name."""
    names = Counter(shard_name(u) for u in urls)
    return {u: shard_name(u) if names[shard_name(u)] == 1 else u for u in urls}


def data_identity(sources: Sequence) -> Dict[str, Optional[str]]:
    """``{shard key: sha256 from index.json | "bytes:<size>" of a local file | None}``."""
    keys = shard_keys([s.url for s in sources])
    out: Dict[str, Optional[str]] = {}
    for source in sources:
        if source.sha256:
            out[keys[source.url]] = f"sha256:{source.sha256}"
        elif os.path.isfile(source.url):
            out[keys[source.url]] = f"bytes:{os.path.getsize(source.url)}"
        else:
            out[keys[source.url]] = None  # a remote shard without an index: known by name only
    return out


def identity_change(saved: Mapping[str, Optional[str]], now: Mapping[str, Optional[str]]) -> Optional[str]:
    """What differs between two shard sets (one phrase), or None when they are the same data."""
    removed = [k for k in saved if k not in now]
    added = [k for k in now if k not in saved]
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if not (removed or added or changed):
        return None
    parts = []
    for what, keys in (("changed", changed), ("added", added), ("removed", removed)):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            parts.append(f"{what}: {keys[0]}{more}")
    return "; ".join(parts)


def fingerprint_changes(theirs: Mapping, mine: Mapping) -> List[str]:
    """``key old -> new`` of the loader-state fingerprint entries that differ (None counts as
    absent); a wrapper's settings (balanced steps: a dict) read ``on`` / ``off`` / ``changed``."""
    out = []
    for k in dict.fromkeys([*mine, *theirs]):
        a, b = theirs.get(k), mine.get(k)
        if a != b:
            both = isinstance(a, dict) and isinstance(b, dict)
            out.append(f"{k} changed" if both else f"{k} {_shown(a)} -> {_shown(b)}")
    return out


def _shown(value: object) -> object:
    return "on" if isinstance(value, dict) else "off" if value is None else value


def changed_data_error(change: str) -> UserError:
    """The one line for a checkpoint whose data position refers to other shards
    (``change``: :func:`identity_change`'s phrase)."""
    return UserError(
        f"the shards differ from those the checkpoint's data position refers to ({change}); resuming "
        "would train some pairs twice and others never. Point data.shards at the original shards, or "
        "set data.allow_changed_data: true to restart the data position at epoch 0 of these shards"
    )


def epochs_from_json(data: Mapping[str, Mapping]) -> Dict[int, SampleSet]:
    return {int(e): SampleSet.from_json(s) for e, s in data.items()}


def epochs_to_json(epochs: Mapping[int, SampleSet]) -> Dict[str, dict]:
    return {str(e): s.to_json() for e, s in sorted(epochs.items()) if s}


def merge_epochs(parts: Iterable[Mapping[int, SampleSet]]) -> Dict[int, SampleSet]:
    """Union of per-epoch sets."""
    out: Dict[int, SampleSet] = {}
    for part in parts:
        for epoch, samples in part.items():
            out.setdefault(epoch, SampleSet()).update(samples)
    return out


def summed_counters(states: Sequence[Mapping], names: Sequence[str]) -> Dict[str, Union[int, dict]]:
    """Totals of the per-rank counters of old loader states (handed to one new rank)."""
    out: Dict[str, Union[int, dict]] = {n: sum(int(s.get(n, 0)) for s in states) for n in names}
    skips: Counter = Counter()
    for s in states:
        skips.update(s.get("skip_counts", {}))
    out["skip_counts"] = dict(skips)
    return out

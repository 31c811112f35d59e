"""Token lengths of the pairs under a run's template, tokenizer and tiling, and what
``data.max_length`` does to them, measured before the expensive steps.

A probe run at ``max_length`` 512 had every response cut and learned nothing; the loader
only counts that as it goes (``response_truncated``). This reads a deterministic sample of
the shards and reports, per dataset (the ``dataset`` key make_shards writes into each
sample) and overall, percentiles of the prompt (and of its image tokens), of the chosen and
the rejected response, and of prompt + longer response (the ``max_length`` that keeps a pair
whole), with the shares of pairs ``max_length`` would drop and of responses it would cut.

It builds nothing of its own: a :class:`~megatron_mpo.data.pipeline.PairLoader` supplies
the shards and the pair builder, each sample goes through the loader's reading
(:func:`~megatron_mpo.data.pipeline.sample_parts`) and :meth:`PairBuilder.measure`, which
shares the prompt rule with training and applies the loader's length rule
(:func:`~megatron_mpo.data.samples.fit_lengths`). No image is decoded: its tile count
follows from the size in its header.

The sample: evenly spaced shards, the first samples of each (at least :data:`PER_SHARD`
per shard, so a small sample opens few shards). make_shards shuffles all datasets before
it cuts shards, so a shard's head is a random draw of the whole set.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

from megatron_mpo.data.pipeline import PairLoader, sample_parts
from megatron_mpo.data.samples import PairLengths, SampleError
from megatron_mpo.data.tar_reader import SkipCounter, iter_shard

__all__ = ["PER_SHARD", "PERCENTILES", "GroupLengths", "LengthReport", "percentile", "spread_shards", "shard_quotas",
           "measure_lengths"]

PER_SHARD = 16
PERCENTILES = (50, 90, 99)
MEASURES = ("prompt", "image", "chosen", "rejected", "whole")
_TITLES = {"prompt": "prompt", "image": "image", "chosen": "chosen", "rejected": "rejected",
           "whole": "prompt+longer"}
NO_DATASET = "(no dataset)"


def percentile(values: Sequence[int], p: float) -> int:
    """The nearest-rank ``p``-th percentile: the smallest value with at least p% of the values
    at or below it (a length some sample really has)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered) / 100) - 1)]


@dataclass
class GroupLengths:
    """The measured pairs of one dataset (or all of them)."""

    prompt: List[int] = field(default_factory=list)
    image: List[int] = field(default_factory=list)
    chosen: List[int] = field(default_factory=list)
    rejected: List[int] = field(default_factory=list)
    whole: List[int] = field(default_factory=list)  # prompt + longer response: max_length keeping it uncut
    dropped: int = 0  # prompt_too_long
    chosen_cut: int = 0
    rejected_cut: int = 0
    pairs_cut: int = 0  # either response cut: the loader's response_truncated
    unusable: Counter = field(default_factory=Counter)  # what the loader would skip for bad data

    def add(self, m: PairLengths) -> None:
        self.prompt.append(m.prompt)
        self.image.append(m.image)
        self.chosen.append(m.chosen)
        self.rejected.append(m.rejected)
        self.whole.append(m.prompt + max(m.chosen, m.rejected))
        self.dropped += m.fit.dropped
        self.chosen_cut += m.fit.chosen_cut
        self.rejected_cut += m.fit.rejected_cut
        self.pairs_cut += m.fit.chosen_cut or m.fit.rejected_cut

    @property
    def pairs(self) -> int:
        return len(self.prompt)

    @property
    def dropped_share(self) -> float:
        return self.dropped / self.pairs if self.pairs else 0.0

    @property
    def cut_share(self) -> float:
        """Cut responses over all responses measured (two per pair)."""
        return (self.chosen_cut + self.rejected_cut) / (2 * self.pairs) if self.pairs else 0.0

    def response_percentile(self, p: float) -> int:
        """Over the chosen and the rejected responses together."""
        return percentile(self.chosen + self.rejected, p)

    def stats(self, measure: str) -> Dict[str, int]:
        values = getattr(self, measure)
        if not values:
            return {}
        return {**{f"p{p}": percentile(values, p) for p in PERCENTILES}, "max": max(values)}

    def to_json(self) -> dict:
        return {"pairs": self.pairs, **{m: self.stats(m) for m in MEASURES},
                "dropped": self.dropped, "chosen_cut": self.chosen_cut, "rejected_cut": self.rejected_cut,
                "pairs_cut": self.pairs_cut, "dropped_share": self.dropped_share, "cut_share": self.cut_share,
                "unusable": dict(self.unusable)}


@dataclass
class LengthReport:
    """Lengths of a sample of the shards at one ``max_length``."""

    max_length: int
    read: int  # raw samples read
    total: Optional[int]  # samples the index promises (None: unknown)
    shards_read: int
    shards: int
    seconds: float
    groups: Dict[str, GroupLengths] = field(default_factory=dict)
    overall: GroupLengths = field(default_factory=GroupLengths)
    setting: str = ""  # template, tokenizer, tiling: said above the tables

    def sample_line(self) -> str:
        total = f"{self.total}" if self.total is not None else "an unknown number of"
        return (f"read {self.read} of {total} samples (the first samples of {self.shards_read} of {self.shards} "
                f"shards, evenly spaced) in {self.seconds:.1f} s")

    def to_json(self) -> dict:
        return {"max_length": self.max_length, "setting": self.setting, "read": self.read, "total": self.total,
                "shards_read": self.shards_read, "shards": self.shards, "seconds": round(self.seconds, 3),
                "datasets": {name: g.to_json() for name, g in sorted(self.groups.items())},
                "all": self.overall.to_json()}

    def table(self) -> str:
        """Two tables, a row per dataset and one for all: lengths, then what max_length does."""
        rows = sorted(self.groups.items()) if len(self.groups) > 1 or NO_DATASET not in self.groups else []
        rows.append(("all", self.overall))
        width = max(12, *(len(name) for name, _ in rows))
        lines = ([self.setting] if self.setting else []) + [self.sample_line(), "",
                 "tokens per pair, p50/p90/p99/max (prompt: image tokens included; prompt+longer: the "
                 "max_length that keeps the pair uncut)"]
        cells = [[name, str(g.pairs)] + ["/".join(str(v) for v in g.stats(m).values()) or "-" for m in MEASURES]
                 for name, g in rows]
        head = ["dataset", "pairs"] + [_TITLES[m] for m in MEASURES]
        widths = [width, 6] + [max(len(head[2 + i]), *(len(c[2 + i]) for c in cells)) for i in range(len(MEASURES))]
        lines += [_row(head, widths)] + [_row(c, widths) for c in cells]
        lines += ["", f"at data.max_length {self.max_length}"]
        head = ["dataset", "pairs", "dropped (prompt too long)", "chosen cut", "rejected cut", "pairs cut"]
        cells = [[name, str(g.pairs), _share(g.dropped, g.pairs), _share(g.chosen_cut, g.pairs),
                  _share(g.rejected_cut, g.pairs), _share(g.pairs_cut, g.pairs)] for name, g in rows]
        widths = [width, 6] + [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(2, len(head))]
        lines += [_row(head, widths)] + [_row(c, widths) for c in cells]
        if self.overall.unusable:
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.overall.unusable.items()))
            lines += ["", f"not measured (the loader skips them too): {skipped}"]
        return "\n".join(lines)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])


def _share(count: int, of: int) -> str:
    return f"{count} ({100 * count / of:.1f}%)" if of else "-"


def spread_shards(urls: Sequence[str], limit: int) -> List[str]:
    """The shards a sample of ``limit`` reads: evenly spaced, at least :data:`PER_SHARD` samples each."""
    visit = min(len(urls), max(1, math.ceil(limit / PER_SHARD)))
    return [urls[k * len(urls) // visit] for k in range(visit)]


def shard_quotas(sizes: Sequence[Optional[int]], limit: int) -> List[int]:
    """``limit`` split as evenly as the shards' sizes allow (None: unknown, taken as enough);
    the smaller shards are served first, so what they lack goes to the others."""
    quotas = [0] * len(sizes)
    left = limit
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i] is None, sizes[i] or 0))
    for n, i in enumerate(order):
        share = math.ceil(left / (len(order) - n))
        quotas[i] = share if sizes[i] is None else min(share, sizes[i])
        left -= quotas[i]
    return quotas


def _spread(loader: PairLoader, shards: Sequence[str], limit: int) -> Iterator[dict]:
    """Up to ``limit`` raw samples, the first ones of each shard; a shard with fewer samples
    than its index promised leaves the rest of its quota to the next."""
    carry = 0
    for url, quota in zip(shards, shard_quotas([loader.expected.get(u) for u in shards], limit)):
        quota += carry
        if quota < 1:
            continue
        reader = iter_shard(url, SkipCounter(), warn=False, report=False,
                            allow_pipe=loader.config.allow_pipe_sources)
        got = 0
        try:
            for raw in reader:
                if got >= quota:
                    break
                yield raw
                got += 1
        finally:
            reader.close()
        carry = quota - got


def measure_lengths(loader: PairLoader, limit: int, setting: str = "") -> LengthReport:
    """Measure up to ``limit`` samples of the loader's shards with its pair builder."""
    started = time.perf_counter()
    builder = loader.builder
    total = sum(loader.expected.values()) if len(loader.expected) == len(loader.urls) else None
    groups: Dict[str, GroupLengths] = {}
    overall = GroupLengths()
    shards = spread_shards(loader.urls, limit)
    read = 0
    for raw in _spread(loader, shards, limit):
        read += 1
        name = NO_DATASET
        try:
            meta, images = sample_parts(raw)
            if isinstance(meta.get("dataset"), str) and meta["dataset"]:
                name = meta["dataset"]
            lengths = builder.measure(meta, images)
        except SampleError as exc:
            overall.unusable[exc.reason] += 1
            groups.setdefault(name, GroupLengths()).unusable[exc.reason] += 1
            continue
        overall.add(lengths)
        groups.setdefault(name, GroupLengths()).add(lengths)
    return LengthReport(builder.max_length, read, total, len(shards), len(loader.urls),
                        time.perf_counter() - started, groups, overall, setting)

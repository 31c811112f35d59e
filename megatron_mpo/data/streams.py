"""What each stream of a loader reads in an epoch, and how a stream's reading is replayed.

The loader (:mod:`megatron_mpo.data.pipeline`) and a resume at another layout share these
rules: a stream's plan of shards (:func:`plan_streams`), its raw samples before the shuffle
(:func:`stream_samples`), the shuffle itself (:func:`shuffle_buffer`, seeded by
:func:`stream_rng`). :func:`replay_stream` runs them again to find which samples an old
stream consumed, so they are one implementation, not two that could drift apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Set

from megatron_mpo.data.config import DataConfig
from megatron_mpo.data.consumed import SampleSet
from megatron_mpo.data.plan import LoaderPlan
from megatron_mpo.data.tar_reader import SkipCounter, iter_shards

__all__ = ["ShardSet", "StreamPlan", "plan_streams", "shuffle_buffer", "stream_rng", "stream_samples",
           "replay_stream"]


class ShardSet(NamedTuple):
    """The shards a loader reads: URLs in order, promised sample counts, position keys."""

    urls: List[str]
    expected: Dict[str, int]  # url -> samples promised by index.json
    keys: Dict[str, str]  # url -> the key a position knows it by


@dataclass
class StreamPlan:
    """What one stream reads in one epoch."""

    urls: List[str]
    stride: int = 1  # keep samples whose index % stride == offset
    offset: int = 0


def plan_streams(
    urls: List[str], epoch: int, seed: int, dp_rank: int, dp_size: int, num_streams: int, shuffle_shards: bool = True,
    consumed: Optional[SampleSet] = None, keys: Optional[Dict[str, str]] = None,
) -> List[StreamPlan]:
    """The epoch's reading plan of each stream of ``dp_rank``; shards ``consumed`` entirely
    (by their ``keys``) earlier in the epoch are left out."""
    order = list(urls)
    if shuffle_shards:
        random.Random(f"{seed}:shards:{epoch}").shuffle(order)
    if consumed:
        order = [u for u in order if not consumed.is_whole(keys[u])]
    total = dp_size * num_streams
    if len(order) >= total:
        mine = order[dp_rank::dp_size]
        return [StreamPlan(mine[w::num_streams]) for w in range(num_streams)]
    return [StreamPlan(order, total, dp_rank * num_streams + w) for w in range(num_streams)]


def shuffle_buffer(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Seeded buffer shuffle: each output is a random pick among the next ``size`` inputs."""
    if size <= 1:
        yield from samples
        return
    buf: list = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


def stream_rng(seed: int, epoch: int, dp_rank: int, stream: int) -> random.Random:
    """The sample shuffle of one stream in one epoch."""
    return random.Random(f"{seed}:samples:{epoch}:{dp_rank}:{stream}")


def stream_samples(plan: StreamPlan, counter: SkipCounter, config: DataConfig, loading: LoaderPlan,
                   expected: Dict[str, int], consumed: Optional[SampleSet] = None,
                   keys: Optional[Dict[str, str]] = None) -> Iterator[dict]:
    """Raw samples a stream reads, before its shuffle: its shards in order, samples
    ``consumed`` earlier in the epoch left out, then every ``stride``-th kept."""
    samples = iter_shards(plan.urls, counter, warn=loading.warn_bad_shards, expected=expected,
                          report=plan.offset == 0, allow_pipe=config.allow_pipe_sources)
    if consumed:
        samples = (s for s in samples if not consumed.has(keys[s["__url__"]], s["__index__"]))
    if plan.stride > 1:
        samples = (s for i, s in enumerate(samples) if i % plan.stride == plan.offset)
    return samples


def replay_stream(source: "ShardSet", config: DataConfig, loading: LoaderPlan, state: dict,
                  base: Dict[int, SampleSet], stream: int, epoch: int) -> SampleSet:
    """The samples that stream ``stream`` of the old rank with loader ``state`` consumed in
    ``epoch`` (``base``: what earlier layouts consumed): its plan and shuffle run again over
    the raw samples (read, not decoded)."""
    fp = state["fingerprint"]
    rank = int(fp["dp_rank"])
    full = int(state["epoch"]) > epoch or bool(state["done"][stream])
    before = base.get(epoch)
    plan = plan_streams(source.urls, epoch, fp["seed"], rank, fp["dp_size"], fp["num_streams"],
                        fp["shuffle_shards"], before, source.keys)[stream]
    out = SampleSet()
    if full and plan.stride == 1:  # whole shards: nothing to read
        for url in plan.urls:
            out.add_shard(source.keys[url])
        return out
    seen: Dict[str, Set[int]] = {}
    ended: List[str] = []

    def watched(samples: Iterator[dict]) -> Iterator[dict]:
        current = None
        for sample in samples:
            key = source.keys[sample["__url__"]]
            if key != current:
                if current is not None:
                    ended.append(current)
                current = key
            seen.setdefault(key, set()).add(sample["__index__"])
            yield sample
        if current is not None:
            ended.append(current)

    counter = SkipCounter()
    counter.muted = True
    raws = watched(stream_samples(plan, counter, config, loading, source.expected, before, source.keys))
    limit = None if full else int(state["positions"][stream])
    rng = stream_rng(fp["seed"], epoch, rank, stream)
    if limit != 0:
        for i, raw in enumerate(shuffle_buffer(raws, fp["shuffle_buffer"], rng), start=1):
            out.add(source.keys[raw["__url__"]], raw["__index__"])
            if i == limit:
                break
    if plan.stride == 1:  # a shard read to its end with every sample consumed
        for key in ended:
            if seen[key] <= out.ordinals(key):
                out.add_shard(key)
    return out

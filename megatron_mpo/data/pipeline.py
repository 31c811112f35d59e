"""Streaming, resumable loader of preference micro-batches from WebDataset shards.

Order (a pure function of seed, epoch, dp_rank, dp_size and num_workers):

1. Epoch ``e`` shuffles the shard list with ``(seed, e)`` — identically on every rank.
2. Data-parallel rank ``r`` takes shards ``r::dp_size``; its stream ``w`` (one per
   DataLoader worker, one when ``num_workers == 0``) takes ``w::W`` of those. When
   there are fewer shards than ``dp_size * W`` streams, every stream reads all shards
   and keeps every ``(dp_size*W)``-th sample instead; then only the stream of offset 0
   counts shard faults (``bad_tar``, ``truncated_shard``), so the sum over ranks counts
   each once. Only ``dp_rank``/``dp_size`` are used: tensor- and pipeline-parallel ranks
   of a replica get identical micro-batches.
3. Each stream shuffles samples with a buffer seeded by ``(seed, e, r, w)``, builds
   pairs and collates ``micro_batch`` consecutive pairs in the worker.
4. The main process takes micro-batches from streams round-robin (a stream that ends
   drops out), independent of DataLoader timing.

Resume: every micro-batch records how many raw samples its stream had consumed. The
loader state holds, per stream, that position for the last micro-batch handed out; a
restarted stream skips that many raw samples without decoding them (reading the tar
is all it costs) and goes on, so the restarted loader yields exactly the micro-batches
the uninterrupted one would have.

Skips are counted per reason (``bad_tar``, ``truncated_shard`` (samples index.json
promised that a shard did not deliver), ``bad_json``, ``missing_field``, ``bad_field``,
``missing_image``, ``bad_image``, ``placeholder_mismatch``, ``image_token_in_text``,
``missing_ref``, ``prompt_too_long``; ``response_truncated`` counts kept pairs whose responses were cut;
``incomplete_batch`` counts pairs dropped by ``drop_last``). Counts travel with the
micro-batches and reach the loader's ``last_skip_counts`` / ``skip_counts``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch

from megatron_mpo.batch import PairBatch
from megatron_mpo.data.collate import collate_pairs
from megatron_mpo.data.config import DataConfig
from megatron_mpo.data.refs import RefLogps
from megatron_mpo.data.samples import PairBuilder, SampleError, TokenizedPair, build_pair_builder
from megatron_mpo.data.shardlist import list_shards, refuse_pipes
from megatron_mpo.data.tar_reader import SkipCounter, iter_shards
from megatron_mpo.data.tokenizer import Tokenizer
from megatron_mpo.errors import UserError
from megatron_mpo.processes import data_worker_init

STATE_VERSION = 1


@dataclass
class StreamPlan:
    """What one stream reads in one epoch."""

    urls: List[str]
    stride: int = 1  # keep samples whose index % stride == offset
    offset: int = 0


def plan_streams(
    urls: List[str], epoch: int, seed: int, dp_rank: int, dp_size: int, num_streams: int, shuffle_shards: bool = True
) -> List[StreamPlan]:
    """The epoch's reading plan of each stream of ``dp_rank``."""
    order = list(urls)
    if shuffle_shards:
        random.Random(f"{seed}:shards:{epoch}").shuffle(order)
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


@dataclass
class _Item:
    """What a stream sends to the main process."""

    kind: str  # "batch", "end" or "error"
    stream: int
    epoch: int
    pos: int = 0  # raw samples consumed by this stream after this item
    batch: Optional[PairBatch] = None
    skips: Dict[str, int] = field(default_factory=dict)
    message: str = ""


def _identity(x):
    return x


class _EpochStreams(torch.utils.data.IterableDataset):
    """One epoch of one rank's streams; each DataLoader worker runs one stream."""

    def __init__(self, config: DataConfig, builder: PairBuilder, plans: List[StreamPlan], epoch: int,
                 dp_rank: int, start: List[int], done: List[bool], expected: Dict[str, int]):
        super().__init__()
        self.config, self.builder, self.plans = config, builder, plans
        self.epoch, self.dp_rank = epoch, dp_rank
        self.start, self.done = start, done
        self.expected = expected  # url -> samples promised by index.json

    def __iter__(self) -> Iterator[_Item]:
        info = torch.utils.data.get_worker_info()
        streams = [info.id] if info is not None else list(range(len(self.plans)))
        for w in streams:
            try:
                yield from self._stream(w)
            except UserError as exc:
                yield _Item("error", w, self.epoch, message=str(exc))
                return

    def _raw(self, plan: StreamPlan, counter: SkipCounter) -> Iterator[dict]:
        samples = iter_shards(plan.urls, counter, warn=self.config.warn_bad_shards, expected=self.expected,
                              report=plan.offset == 0, allow_pipe=self.config.allow_pipe_sources)
        if plan.stride == 1:
            return samples
        return (s for i, s in enumerate(samples) if i % plan.stride == plan.offset)

    def _stream(self, w: int) -> Iterator[_Item]:
        cfg = self.config
        counter = SkipCounter()
        if self.done[w]:
            yield _Item("end", w, self.epoch, self.start[w])
            return
        refs = RefLogps(cfg.ref_logps) if cfg.ref_logps else None
        rng = random.Random(f"{cfg.seed}:samples:{self.epoch}:{self.dp_rank}:{w}")
        skip = self.start[w]
        counter.muted = skip > 0
        pos = 0
        pairs: List[TokenizedPair] = []
        for raw in shuffle_buffer(self._raw(self.plans[w], counter), cfg.shuffle_buffer, rng):
            pos += 1
            if pos <= skip:
                if pos == skip:
                    counter.muted = False
                continue
            pair = self._pair(raw, refs, counter)
            if pair is None:
                continue
            pairs.append(pair)
            if len(pairs) == cfg.micro_batch:
                yield _Item("batch", w, self.epoch, pos, self._collate(pairs), counter.pop())
                pairs = []
        counter.muted = False
        if pairs:
            if cfg.drop_last:
                counter.add("incomplete_batch", len(pairs))
            else:
                yield _Item("batch", w, self.epoch, pos, self._collate(pairs), counter.pop())
        yield _Item("end", w, self.epoch, pos, None, counter.pop())

    def _collate(self, pairs: List[TokenizedPair]) -> PairBatch:
        tok = self.builder.tokenizer
        c = self.config
        return collate_pairs(pairs, tok.pad_id, tok.img_context_id, c.tokens_per_tile, c.pad_multiple, c.layout,
                             row_length=c.max_length, max_pairs_per_row=c.pairs_per_row)

    def _pair(self, raw: dict, refs: Optional[RefLogps], counter: SkipCounter) -> Optional[TokenizedPair]:
        shard, key = raw["__shard__"], raw["__key__"]
        try:
            if "json" not in raw:
                raise SampleError("missing_field", "json")
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise SampleError("bad_json", str(exc)) from None
            if not isinstance(meta, dict):
                raise SampleError("bad_json", "not an object")
            names = meta.get("images")
            if names is None:  # shards written elsewhere: take img{i}.* members
                names = sorted((k for k in raw if re.fullmatch(r"img\d+\.\w+", k)), key=lambda k: int(k[3:].split(".")[0]))
            if not isinstance(names, list) or any(not isinstance(n, str) or n not in raw for n in names):
                raise SampleError("missing_image", str(names))
            ref = None
            if refs is not None:
                ref = refs.lookup(shard, key)
                if ref is None:
                    if self.config.on_missing_ref == "error":
                        raise UserError(
                            f"no reference log-probs for sample {key} of shard {shard} in {self.config.ref_logps}; "
                            "recompute them or set on_missing_ref: skip"
                        )
                    raise SampleError("missing_ref", key)
            pair = self.builder.build(f"{shard}/{key}", meta, [raw[n] for n in names], ref)
        except SampleError as exc:
            counter.add(exc.reason)
            return None
        for flag in pair.flags:
            counter.add(flag)
        return pair


class PairLoader:
    """Iterable of :class:`PairBatch` for one data-parallel rank, resumable.

    ``state_dict()`` after a micro-batch and ``load_state_dict()`` on a fresh loader
    (same config, tokenizer, dp_rank, dp_size) continue with the next micro-batch.
    ``last_skip_counts``: counts that arrived with the latest micro-batch (merged over
    streams since the previous one); ``skip_counts``: totals (kept in the state).
    """

    def __init__(self, config: DataConfig, tokenizer: Tokenizer, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        self.config = config
        self.tokenizer = tokenizer
        self.dp_rank, self.dp_size = dp_rank, dp_size
        sources = list_shards(config.shards)
        refuse_pipes(sources, config.allow_pipe_sources)
        self.urls = [s.url for s in sources]
        self.expected = {s.url: s.samples for s in sources if s.samples is not None}
        self.builder = build_pair_builder(config, tokenizer)
        if config.ref_logps:
            RefLogps(config.ref_logps)  # fail early on a missing folder
        self.num_streams = max(1, config.num_workers)
        self._reset_epoch(0)
        self._totals: Counter = Counter()
        self._last: Dict[str, int] = {}
        self.micro_batches = 0
        self.pairs = 0

    # -- state ----------------------------------------------------------------------------
    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._pos = [0] * self.num_streams
        self._done = [False] * self.num_streams
        self._next = 0
        self._epoch_batches = 0

    def _fingerprint(self) -> dict:
        c = self.config
        return {
            "seed": c.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "num_streams": self.num_streams,
            "micro_batch": c.micro_batch, "shuffle_buffer": c.shuffle_buffer, "shards": len(self.urls),
        }

    def state_dict(self) -> dict:
        """Position after the last micro-batch handed out (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "epoch": self.epoch,
            "positions": list(self._pos),
            "done": list(self._done),
            "next_stream": self._next,
            "epoch_batches": self._epoch_batches,
            "micro_batches": self.micro_batches,
            "pairs": self.pairs,
            "skip_counts": dict(self._totals),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; UserError if it was taken with other settings."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        mine = self._fingerprint()
        theirs = state.get("fingerprint", {})
        diff = [f"{k}: {theirs.get(k)} -> {v}" for k, v in mine.items() if theirs.get(k) != v]
        if diff:
            raise UserError("cannot resume the data loader with changed settings (" + "; ".join(diff) + ")")
        self.epoch = int(state["epoch"])
        self._pos = [int(p) for p in state["positions"]]
        self._done = [bool(d) for d in state["done"]]
        self._next = int(state["next_stream"])
        self._epoch_batches = int(state["epoch_batches"])
        self.micro_batches = int(state["micro_batches"])
        self.pairs = int(state["pairs"])
        self._totals = Counter(state.get("skip_counts", {}))
        self._last = {}

    @property
    def skip_counts(self) -> Dict[str, int]:
        """Totals by reason since the run began (restored on resume)."""
        return dict(self._totals)

    @property
    def last_skip_counts(self) -> Dict[str, int]:
        """Counts delivered with the latest micro-batch (since the previous one)."""
        return dict(self._last)

    # -- iteration ------------------------------------------------------------------------
    def _epoch_items(self) -> Iterator[_Item]:
        plans = plan_streams(self.urls, self.epoch, self.config.seed, self.dp_rank, self.dp_size,
                             self.num_streams, self.config.shuffle_shards)
        dataset = _EpochStreams(self.config, self.builder, plans, self.epoch, self.dp_rank,
                                list(self._pos), list(self._done), self.expected)
        if self.config.num_workers == 0:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.config.num_workers,
            prefetch_factor=self.config.prefetch_factor,
            collate_fn=_identity,
            persistent_workers=False,
            worker_init_fn=data_worker_init,  # survive job signals, die with the trainer
        )
        return iter(loader)

    def _next_active(self, after: int) -> int:
        for k in range(1, self.num_streams + 1):
            w = (after + k) % self.num_streams
            if not self._done[w]:
                return w
        return after

    def __iter__(self) -> Iterator[PairBatch]:
        pending: Counter = Counter()
        while self.config.epochs is None or self.epoch < self.config.epochs:
            items = self._epoch_items()
            buffers = [deque() for _ in range(self.num_streams)]
            if self._done[self._next]:
                self._next = self._next_active(self._next)
            while not all(self._done):
                w = self._next
                while not buffers[w]:
                    try:
                        item = next(items)
                    except StopIteration:
                        raise RuntimeError(f"data stream {w} ended without an end marker") from None
                    if item.kind == "error":
                        raise UserError(item.message)
                    buffers[item.stream].append(item)
                item = buffers[w].popleft()
                pending.update(item.skips)
                self._totals.update(item.skips)
                self._pos[w] = item.pos
                if item.kind == "end":
                    self._done[w] = True
                    self._next = self._next_active(w)
                    continue
                self._next = self._next_active(w)
                self._epoch_batches += 1
                self.micro_batches += 1
                self.pairs += item.batch.num_pairs
                self._last = dict(pending)
                pending.clear()
                yield item.batch
            del items
            if self._epoch_batches == 0:
                counts = ", ".join(f"{k}={v}" for k, v in sorted(self._totals.items())) or "none"
                raise UserError(
                    f"the shards yielded no usable sample for data-parallel rank {self.dp_rank}/{self.dp_size} "
                    f"in epoch {self.epoch} ({len(self.urls)} shards; skip counts: {counts})"
                )
            self._reset_epoch(self.epoch + 1)


def build_loader(config: DataConfig, tokenizer: Tokenizer, dp_rank: int = 0, dp_size: int = 1) -> PairLoader:
    """The micro-batch loader of data-parallel rank ``dp_rank`` of ``dp_size``."""
    return PairLoader(config, tokenizer, dp_rank, dp_size)

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

Resume at another layout (data-parallel size, workers, seed, shuffle buffer, micro-batch)
cannot continue the old streams. :meth:`PairLoader.resume` then replays every old stream
into the samples it consumed (:mod:`megatron_mpo.data.consumed`) and the new layout reads
the rest of the epoch: shards consumed entirely are left out of its plan, samples already
consumed are skipped inside the others. Every pair is still trained once per epoch; the
order of the rest differs from the uninterrupted run's. The state also names the data
(index sha256 per shard): a resume on other shards is refused unless allowed.

:meth:`PairLoader.iter_pairs` hands out the same pairs one at a time, each with the position
to read it again from (balanced steps buffer them: :mod:`.balanced_loader`). A state may then
name samples consumed beyond its positions (``ahead``): an exact resume hands them out
``done``, a resume at another layout counts them as consumed.

Skips are counted per reason (``bad_tar``, ``truncated_shard`` (samples index.json
promised that a shard did not deliver), ``bad_json``, ``missing_field``, ``bad_field``,
``missing_image``, ``bad_image`` (undecodable, or over ``max_image_pixels``),
``placeholder_mismatch``, ``image_token_in_text``,
``missing_ref``, ``prompt_too_long``; ``response_truncated`` counts kept pairs whose responses were cut;
``incomplete_batch`` counts pairs dropped by ``drop_last``). Counts travel with the
micro-batches and reach the loader's ``last_skip_counts`` / ``skip_counts``.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_mpo.batch import PairBatch
from megatron_mpo.data.collate import collate_pairs
from megatron_mpo.data.config import DataConfig
from megatron_mpo.data.consumed import (
    SampleSet, changed_data_error, data_identity, epochs_from_json, epochs_to_json, fingerprint_changes,
    identity_change, merge_epochs, shard_keys, summed_counters,
)
from megatron_mpo.data.plan import LoaderPlan
from megatron_mpo.data.refs import RefLogps
from megatron_mpo.data.samples import PairBuilder, SampleError, TokenizedPair, build_pair_builder
from megatron_mpo.data.shardlist import list_shards, refuse_pipes
from megatron_mpo.data.streams import (
    ShardSet, StreamPlan, plan_streams, replay_stream, shuffle_buffer, stream_rng, stream_samples,
)
from megatron_mpo.data.tar_reader import SkipCounter
from megatron_mpo.data.tokenizer import Tokenizer
from megatron_mpo.errors import UserError
from megatron_mpo.processes import data_worker_init

STATE_VERSION = 2
PREFETCH_FACTOR = 2  # micro-batches each DataLoader worker keeps ready
# Per-rank counters of a loader state (summed onto one rank when the layout changes).
_COUNTERS = ("micro_batches", "pairs")


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
    pair: Optional[TokenizedPair] = None  # iter_pairs: one pair instead of a batch
    sample: Tuple[str, int] = ("", -1)  # the pair's (shard key, ordinal in its shard)


@dataclass
class LoadedPair:
    """One pair of :meth:`PairLoader.iter_pairs`: its epoch, sample identity (shard key,
    ordinal), the loader position to restart from to hand it out again (``before``), and
    ``done``: consumed before a resume (trained from a look-ahead), not to be trained again."""

    pair: Optional[TokenizedPair]
    epoch: int
    sample: Tuple[str, int]
    before: dict
    done: bool = False


def _identity(x):
    return x


def collate(pairs: Sequence[TokenizedPair], config: DataConfig, loading: LoaderPlan, tok: Tokenizer) -> PairBatch:
    """``pairs`` as one micro-batch in the rows the loader's settings ask for."""
    return collate_pairs(pairs, tok.pad_id, tok.img_context_id, loading.tokens_per_tile, loading.pad_multiple,
                         loading.layout, row_length=config.max_length, max_pairs_per_row=config.pairs_per_row)


def sample_parts(raw: dict) -> Tuple[dict, List[bytes]]:
    """(the sample's JSON, its image bytes in placeholder order) of a raw shard sample;
    SampleError when they cannot be read."""
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
    return meta, [raw[n] for n in names]


class _EpochStreams(torch.utils.data.IterableDataset):
    """One epoch of one rank's streams; each DataLoader worker runs one stream."""

    def __init__(self, config: DataConfig, loading: LoaderPlan, builder: PairBuilder, plans: List[StreamPlan],
                 epoch: int, dp_rank: int, start: List[int], done: List[bool], expected: Dict[str, int],
                 consumed: Optional[SampleSet] = None, keys: Optional[Dict[str, str]] = None, pairs: bool = False):
        super().__init__()
        self.one_by_one = pairs  # hand out single pairs, not collated micro-batches
        self.config, self.loading, self.builder, self.plans = config, loading, builder, plans
        self.epoch, self.dp_rank = epoch, dp_rank
        self.start, self.done = start, done
        self.expected = expected  # url -> samples promised by index.json
        self.consumed, self.keys = consumed, keys  # samples an earlier layout consumed this epoch

    def __iter__(self) -> Iterator[_Item]:
        info = torch.utils.data.get_worker_info()
        streams = [info.id] if info is not None else list(range(len(self.plans)))
        for w in streams:
            try:
                yield from self._stream(w)
            except UserError as exc:
                yield _Item("error", w, self.epoch, message=str(exc))
                return

    def _stream(self, w: int) -> Iterator[_Item]:
        cfg = self.config
        counter = SkipCounter()
        if self.done[w]:
            yield _Item("end", w, self.epoch, self.start[w])
            return
        refs = RefLogps(cfg.ref_logps) if cfg.ref_logps else None
        rng = stream_rng(cfg.seed, self.epoch, self.dp_rank, w)
        skip = self.start[w]
        counter.muted = skip > 0
        pos = 0
        pairs: List[TokenizedPair] = []
        raws = stream_samples(self.plans[w], counter, cfg, self.loading, self.expected, self.consumed, self.keys)
        for raw in shuffle_buffer(raws, cfg.shuffle_buffer, rng):
            pos += 1
            if pos <= skip:
                if pos == skip:
                    counter.muted = False
                continue
            pair = self._pair(raw, refs, counter)
            if pair is None:
                continue
            if self.one_by_one:
                sample = (self.keys[raw["__url__"]], raw["__index__"])
                yield _Item("pair", w, self.epoch, pos, pair=pair, sample=sample, skips=counter.pop())
                continue
            pairs.append(pair)
            if len(pairs) == self.loading.micro_batch:
                yield _Item("batch", w, self.epoch, pos, self._collate(pairs), counter.pop())
                pairs = []
        counter.muted = False
        if pairs:
            if self.loading.drop_last:
                counter.add("incomplete_batch", len(pairs))
            else:
                yield _Item("batch", w, self.epoch, pos, self._collate(pairs), counter.pop())
        yield _Item("end", w, self.epoch, pos, None, counter.pop())

    def _collate(self, pairs: List[TokenizedPair]) -> PairBatch:
        return collate(pairs, self.config, self.loading, self.builder.tokenizer)

    def _pair(self, raw: dict, refs: Optional[RefLogps], counter: SkipCounter) -> Optional[TokenizedPair]:
        shard, key = raw["__shard__"], raw["__key__"]
        try:
            meta, images = sample_parts(raw)
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
            pair = self.builder.build(f"{shard}/{key}", meta, images, ref)
        except SampleError as exc:
            counter.add(exc.reason)
            return None
        for flag in pair.flags:
            counter.add(flag)
        return pair


class PairLoader:
    """Iterable of :class:`PairBatch` for one data-parallel rank, resumable.

    ``state_dict()`` after a micro-batch and ``load_state_dict()`` on a fresh loader
    (same config, plan, tokenizer, dp_rank, dp_size) continue with the next micro-batch;
    :meth:`resume` takes the states of every rank (:func:`bundle_states`) and continues
    at any layout. ``last_skip_counts``: counts that arrived with the latest micro-batch
    (merged over streams since the previous one); ``skip_counts``: totals (kept in the state).
    """

    def __init__(self, config: DataConfig, loading: LoaderPlan, tokenizer: Tokenizer, dp_rank: int = 0,
                 dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        self.config, self.loading = config, loading
        self.tokenizer = tokenizer
        self.dp_rank, self.dp_size = dp_rank, dp_size
        sources = list_shards(config.shards, config.allow_outside_index)
        refuse_pipes(sources, config.allow_pipe_sources)
        self.urls = [s.url for s in sources]
        self.expected = {s.url: s.samples for s in sources if s.samples is not None}
        self.keys = shard_keys(self.urls)
        self.identity = data_identity(sources)
        # Samples consumed under an earlier layout, per epoch still in progress there.
        self.base: Dict[int, SampleSet] = {}
        self.builder = build_pair_builder(config, tokenizer, image_size=loading.image_size,
                                          tokens_per_tile=loading.tokens_per_tile)
        if config.ref_logps:
            RefLogps(config.ref_logps)  # fail early on a missing folder
        self.num_streams = max(1, config.num_workers)
        self.ahead: Dict[int, SampleSet] = {}  # consumed beyond the positions (see iter_pairs)
        self.extra_fingerprint: dict = {}  # what a wrapper's own state depends on
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
            "micro_batch": self.loading.micro_batch, "shuffle_buffer": c.shuffle_buffer,
            "shuffle_shards": self.loading.shuffle_shards,
            "shards": len(self.urls), **self.extra_fingerprint,
        }

    def position(self) -> dict:
        """Where the streams stand: the part of the state that moves (JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "positions": list(self._pos),
            "done": list(self._done),
            "next_stream": self._next,
            "epoch_batches": self._epoch_batches,
            "micro_batches": self.micro_batches,
            "pairs": self.pairs,
            "skip_counts": dict(self._totals),
        }

    def state_dict(self, at: Optional[dict] = None, ahead: Optional[Dict[int, SampleSet]] = None) -> dict:
        """Position after the last micro-batch handed out (JSON-serialisable); or the
        :meth:`position` ``at`` with the samples consumed beyond it (``ahead``)."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "identity": dict(self.identity),
            "base": epochs_to_json(self.base),
            **(at if at is not None else self.position()),
            "ahead": epochs_to_json(ahead or {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; UserError if it was taken with other settings."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        change = identity_change(state.get("identity", {}), self.identity)
        if change is not None:
            raise changed_data_error(change)
        mine = self._fingerprint()
        diff = fingerprint_changes(state.get("fingerprint", {}), mine)
        if diff:
            raise UserError("cannot resume the data loader with changed settings (" + "; ".join(diff) + ")")
        self.base = epochs_from_json(state.get("base", {}))
        self.epoch = int(state["epoch"])
        self._pos = [int(p) for p in state["positions"]]
        self._done = [bool(d) for d in state["done"]]
        self._next = int(state["next_stream"])
        self._epoch_batches = int(state["epoch_batches"])
        self.micro_batches = int(state["micro_batches"])
        self.pairs = int(state["pairs"])
        self._totals = Counter(state.get("skip_counts", {}))
        self._last = {}
        self.ahead = epochs_from_json(state.get("ahead", {}))

    # -- resume at any layout -------------------------------------------------------------
    def resume(self, saved: dict, share: Tuple[int, int] = (0, 1),
               gather: Optional[Callable[[object], list]] = None, allow_changed_data: bool = False) -> str:
        """Continue from every data-parallel rank's state (:func:`bundle_states`); returns one
        line saying how.

        Same layout: exactly where this rank stopped. Another layout: the epoch goes on
        without the samples the old ranks consumed (replayed here; ``share`` = (index,
        count) splits the replays over processes and ``gather`` all-gathers a picklable
        object across them). Other shards than the checkpoint's: refused, or with
        ``allow_changed_data`` the data position restarts at epoch 0.
        """
        if saved.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {saved.get('version')} is not {STATE_VERSION}; "
                            "the checkpoint was written by another megatron_mpo version")
        ranks = saved["ranks"]
        change = identity_change(saved["identity"], self.identity)
        if change is not None:
            if not allow_changed_data:
                raise changed_data_error(change)
            self._take_counters(ranks)
            return (f"the shards changed since the checkpoint ({change}); data.allow_changed_data: "
                    "the data position restarts at epoch 0")
        states = [{**r, "version": STATE_VERSION, "identity": saved["identity"], "base": saved["base"]}
                  for r in ranks]
        theirs = states[self.dp_rank]["fingerprint"] if len(states) == self.dp_size else None
        if theirs is not None and not fingerprint_changes(theirs, self._fingerprint()):
            self.load_state_dict(states[self.dp_rank])
            return "data position restored exactly"
        base = epochs_from_json(saved["base"])
        start = min(int(s["epoch"]) for s in ranks)
        tasks = [(s, w, e) for s in ranks for e in range(start, int(s["epoch"]) + 1)
                 for w in range(int(s["fingerprint"]["num_streams"]))]
        shards = ShardSet(self.urls, self.expected, self.keys)
        found = [{e: replay_stream(shards, self.config, self.loading, s, base, w, e)}
                 for s, w, e in tasks[share[0]::share[1]]]
        mine = epochs_to_json(merge_epochs(found))
        parts = gather(mine) if gather is not None else [mine]
        ahead = [epochs_from_json(r.get("ahead", {})) for r in ranks]  # taken from look-ahead buffers
        consumed = merge_epochs([base] + [epochs_from_json(p) for p in parts] + ahead)
        self.base = {e: s for e, s in consumed.items() if e >= start}
        self.ahead = {}
        self._take_counters(ranks)
        self._reset_epoch(start)
        old = ranks[0]["fingerprint"]
        changed = ", ".join(d for d in fingerprint_changes(old, self._fingerprint()) if not d.startswith("dp_rank "))
        sizes = {self.keys[u]: n for u, n in self.expected.items()}
        done = self.base[start].count(sizes) if start in self.base else 0
        done_text = f"{done} samples" if done is not None else "the samples"
        return (f"data layout changed ({changed}): epoch {start} goes on without {done_text} the old layout "
                "consumed; the order of the rest differs from an uninterrupted run")

    def _take_counters(self, ranks: Sequence[dict]) -> None:
        """Run totals of the old ranks, kept on data-parallel rank 0 (the logs sum over ranks)."""
        totals = summed_counters(ranks, _COUNTERS) if self.dp_rank == 0 else {}
        self.micro_batches = int(totals.get("micro_batches", 0))
        self.pairs = int(totals.get("pairs", 0))
        self._totals = Counter(totals.get("skip_counts", {}))
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
    def _epoch_items(self, pairs: bool) -> Iterator[_Item]:
        consumed = self.base.get(self.epoch)
        plans = plan_streams(self.urls, self.epoch, self.config.seed, self.dp_rank, self.dp_size,
                             self.num_streams, self.loading.shuffle_shards, consumed, self.keys)
        dataset = _EpochStreams(self.config, self.loading, self.builder, plans, self.epoch, self.dp_rank,
                                list(self._pos), list(self._done), self.expected, consumed, self.keys, pairs)
        if self.config.num_workers == 0:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.config.num_workers,
            prefetch_factor=PREFETCH_FACTOR,
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
        for item, _ in self._items(pairs=False):
            item.batch.epoch = item.epoch
            yield item.batch

    def iter_pairs(self) -> Iterator[LoadedPair]:
        """The streams' pairs one at a time, in the loader's fixed order; pairs the state
        names ``ahead`` come marked ``done``."""
        for item, before in self._items(pairs=True):
            ahead = self.ahead.get(item.epoch, SampleSet())
            done = ahead.has(*item.sample)
            ahead.discard(*item.sample)
            yield LoadedPair(item.pair, item.epoch, item.sample, before, done)

    def _items(self, pairs: bool) -> Iterator[Tuple[_Item, dict]]:
        """Every stream's batches (or pairs) round-robin, each with the position before it."""
        pending: Counter = Counter()
        while self.loading.epochs is None or self.epoch < self.loading.epochs:
            items = self._epoch_items(pairs)
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
                before = self.position() if pairs and item.kind == "pair" else {}
                pending.update(item.skips)
                self._totals.update(item.skips)
                self._pos[w] = item.pos
                if item.kind == "end":
                    self._done[w] = True
                    self._next = self._next_active(w)
                    continue
                self._next = self._next_active(w)
                self._epoch_batches += 1
                self.micro_batches += 0 if pairs else 1
                self.pairs += 1 if pairs else item.batch.num_pairs
                self._last = dict(pending)
                pending.clear()
                yield item, before
            del items
            # An endless stream that finds nothing would spin; a finite read (the reference
            # tool's one pass over a shard) may be empty. A resumed epoch may have nothing left.
            if self._epoch_batches == 0 and self.loading.epochs is None and self.epoch not in self.base:
                counts = ", ".join(f"{k}={v}" for k, v in sorted(self._totals.items())) or "none"
                raise UserError(
                    f"the shards yielded no usable sample for data-parallel rank {self.dp_rank}/{self.dp_size} "
                    f"in epoch {self.epoch} ({len(self.urls)} shards; skip counts: {counts})"
                )
            # ``base`` stays (all ranks' states share one copy); a later layout change prunes it.
            self._reset_epoch(self.epoch + 1)


def bundle_states(states: Sequence[dict]) -> dict:
    """The loader states of every data-parallel rank, in rank order, as one checkpoint
    entry for :meth:`PairLoader.resume` (the data identity and earlier consumption once)."""
    first = states[0]
    shared = ("version", "identity", "base")
    return {"version": STATE_VERSION, "identity": first["identity"], "base": first["base"],
            "ranks": [{k: v for k, v in s.items() if k not in shared} for s in states]}


def build_loader(config: DataConfig, loading: LoaderPlan, tokenizer: Tokenizer, dp_rank: int = 0,
                 dp_size: int = 1) -> PairLoader:
    """The micro-batch loader of data-parallel rank ``dp_rank`` of ``dp_size``: the ``data``
    section's shards read as ``loading`` (what the model and the run decide) says."""
    return PairLoader(config, loading, tokenizer, dp_rank, dp_size)

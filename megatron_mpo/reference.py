"""Offline reference log-probs: the training forward with ``forward_only=True``.

For every sample of every shard this computes ``log pi_0(y_c|x)`` and ``log pi_0(y_r|x)``
(sums over response tokens) with the frozen initial policy, through the same model
chunks, tokenizer, template, tiling and length rules the trainer uses, under any TP / PP /
DP layout. Results go to one small JSON sidecar per shard (image bytes are never copied),
written atomically once the shard is complete, so a killed run restarted with the same
arguments recomputes only the shards that have no complete sidecar.

Each sidecar records a *fingerprint* of everything that changes the numbers, the content
of its shard and a checksum (the contract lives in :mod:`megatron_mpo.data.refs`); the
trainer refuses to start on a damaged, stale or mismatching sidecar, and so does this tool
before it calls a shard complete.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import torch

from megatron_mpo import parallel
from megatron_mpo.config import RunConfig
from megatron_mpo.data.refs import StaleSidecar, check_sidecar, shard_contents, shard_name, sidecar_path, write_ref_logps
from megatron_mpo.errors import UserError
from megatron_mpo.training import data_setup, model_setup, precision, preflight
from megatron_mpo.training.forward import make_forward_step
from megatron_mpo.training.forward_only import ForwardOnly, groups_of, needs_lockstep

MICRO_BATCHES_PER_CALL = 8  # micro-batches per schedule call (bounds memory on long shards)


# ---- which shards are done -------------------------------------------------------------


def _is_complete(path: str, expected: dict, content: dict) -> bool:
    """True for a sound sidecar of this run's settings and of the shard's current content.

    A stale one (its shard was rewritten) is redone; a damaged or mismatching one is a
    UserError (:func:`megatron_mpo.data.refs.check_sidecar`).
    """
    if not os.path.exists(path):
        return False
    try:
        check_sidecar(path, expected, content)
    except StaleSidecar:
        return False
    return True


# ---- computation -----------------------------------------------------------------------


class _Reference(NamedTuple):
    """The frozen initial policy on this rank and the run's loader settings, built once for
    every shard set of the run."""

    cfg: RunConfig
    model_config: Any
    layout: Any
    chunks: list
    tok: Any
    data: Any
    loading: Any
    expected: dict


def precompute(cfg: RunConfig, log=print) -> dict:
    """Compute missing sidecars for the shards of ``cfg.data.shards`` and, when the run sets
    ``eval.shards``, for the held-out shards into ``eval.ref_logps`` (the same initial model
    and settings, as the trainer checks both); returns a summary."""
    from megatron_mpo.training.checkpoint import load_model_weights
    from megatron_mpo.training.heldout import eval_run_config

    if not cfg.data.ref_logps:
        raise UserError("set data.ref_logps: the directory the reference sidecars go to")
    # Shards, template, model dir, tokenizer, precision, sidecars: before any group or model.
    model_config = preflight.check_reference(cfg)
    layout = model_setup.start_parallel(cfg)
    chunks = model_setup.build_model_chunks(cfg, model_config, layout, precision.reference_precision(cfg))
    load_model_weights(cfg.model.init, chunks)
    for chunk in chunks:
        chunk.eval()
    model = _Reference(cfg, model_config, layout, chunks, data_setup.tokenizer(cfg),
                       data_setup.loader_data(cfg, model_config, for_reference=True),
                       data_setup.loader_plan(cfg, model_config, for_reference=True),
                       data_setup.reference_fingerprint(cfg, model_config))
    if torch.distributed.get_rank() == 0:
        log(f"reference log-probs in {precision.reference_precision(cfg).describe()}, template "
            f"{data_setup.describe_template(cfg, model_config)}, "
            f"tiling {data_setup.describe_tiling(cfg, model_config)}")
    summary = _compute(model, cfg.data.shards, cfg.data.ref_logps, log)
    heldout = eval_run_config(cfg)
    if heldout is not None:
        if torch.distributed.get_rank() == 0:
            log(f"held-out pairs (eval.shards) into {heldout.data.ref_logps}:")
        summary["heldout"] = _compute(model, heldout.data.shards, heldout.data.ref_logps, log)
    parallel.shutdown()
    return summary


def _compute(model: _Reference, shards, out_dir: str, log) -> dict:
    """The missing sidecars of one shard set (this rank's share of its shards)."""
    from megatron_mpo.data import build_loader
    from megatron_mpo.data.shardlist import expand_shards, read_index_counts

    cfg, model_config, layout, chunks, tok, data, loading, expected = model
    is_writer = layout.is_last_stage and layout.tensor_rank == 0
    os.makedirs(out_dir, exist_ok=True)

    urls = expand_shards(shards, cfg.data.allow_outside_index)
    counts = read_index_counts(shards) if isinstance(shards, str) else {}
    mine = [u for i, u in enumerate(urls) if i % layout.data == layout.data_rank]
    contents = shard_contents(mine)
    todo = [u for u in mine if not _is_complete(sidecar_path(out_dir, shard_name(u)), expected, contents[u])]
    planned = sum(counts.get(os.path.basename(u), 0) for u in todo)
    if torch.distributed.get_rank() == 0:
        log(f"  {len(urls)} shards, {len(mine) - len(todo)} of this rank's {len(mine)} already complete, "
            f"{len(todo)} to compute")

    def loader_for(url: str):
        import dataclasses

        return build_loader(dataclasses.replace(data, shards=[url]), loading, tok, dp_rank=0, dp_size=1)

    def work():
        """(url, loader, micro-batch group, last) for this rank's shards; ``last`` marks a
        shard's final group, ``[]`` the one group of a shard without a usable sample."""
        for url in todo:
            loader = loader_for(url)
            groups = groups_of(iter(loader), MICRO_BATCHES_PER_CALL)
            group = next(groups, [])
            while group is not None:
                following = next(groups, None)
                yield url, loader, group, following is None
                group = following

    fillers: list = []

    def filler():
        """Any real micro-batch (the first of the shard set), read once when first needed."""
        if not fillers:
            fillers.extend(next((g for u in urls for g in groups_of(iter(loader_for(u)), 1)), []))
        return fillers[0]

    passes = ForwardOnly(chunks, make_forward_step(None), tok.pad_id, per_call=MICRO_BATCHES_PER_CALL,
                         lockstep=needs_lockstep(model_config, cfg.parallel.expert), filler=filler)
    started = time.perf_counter()
    done_pairs = 0
    computed = []
    values: dict[str, tuple] = {}
    for item, results in passes.rounds(work(), group_of=lambda item: item[2]):
        if item is None:  # a lockstep round after this rank's last shard
            continue
        url, loader, group, last = item
        if is_writer:
            for r in results:
                for i, sample_id in enumerate(r["keys"]):
                    key = sample_id.rpartition("/")[2]
                    values[key] = (
                        float(r["policy_chosen_logps"][i]), float(r["policy_rejected_logps"][i]),
                        int(r["chosen_tokens"][i]), int(r["rejected_tokens"][i]),
                    )
        if group:
            done_pairs += sum(b.num_pairs for b in group)
            if torch.distributed.get_rank() == 0:
                rate = done_pairs / max(time.perf_counter() - started, 1e-9)
                eta = (planned - done_pairs) / rate if planned > done_pairs and rate > 0 else 0.0
                log(f"  {shard_name(url)}: {done_pairs} pairs done, {rate:.1f} pairs/s, ETA {eta:.0f}s")
        if last:
            if is_writer:
                write_ref_logps(
                    out_dir, shard_name(url), values, fingerprint=expected, content=contents[url],
                    extra={"complete": True, "skipped": loader.skip_counts},
                )
                if not group:
                    skips = ", ".join(f"{k}={v}" for k, v in sorted(loader.skip_counts.items())) or "none"
                    log(f"warning: shard {url} holds no usable sample (skip counts: {skips}); "
                        "its sidecar is empty, the trainer reads nothing from it")
            computed.append(shard_name(url))
            values = {}
    torch.distributed.barrier()
    elapsed = time.perf_counter() - started
    if torch.distributed.get_rank() == 0:
        log(f"reference log-probs done: {len(computed)} shards computed on this rank in {elapsed:.1f}s")
    return {"computed": computed, "skipped_complete": len(mine) - len(todo), "pairs": done_pairs}

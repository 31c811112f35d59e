"""Offline reference log-probs: the training forward with ``forward_only=True``.

For every sample of every shard this computes ``log pi_0(y_c|x)`` and ``log pi_0(y_r|x)``
(sums over response tokens) with the frozen initial policy, through the same model
chunks, tokenizer, template, tiling and length rules the trainer uses, under any TP / PP /
DP layout. Results go to one small JSON sidecar per shard (image bytes are never copied),
written atomically once the shard is complete, so a killed run restarted with the same
arguments recomputes only the shards that have no complete sidecar.

Each sidecar records a *fingerprint* of everything that changes the numbers; the trainer
refuses to start when its own fingerprint differs (:func:`check_fingerprint`).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_mpo import parallel
from megatron_mpo.config import RunConfig
from megatron_mpo.conversion.megatron_dir import TOKENIZER_FILES
from megatron_mpo.data.refs import read_sidecar, shard_name, sidecar_path, write_ref_logps
from megatron_mpo.errors import UserError
from megatron_mpo.training import data_setup, model_setup, precision, schedule
from megatron_mpo.training.forward import make_forward_step

MICRO_BATCHES_PER_CALL = 8  # micro-batches per schedule call (bounds memory on long shards)
FINGERPRINT_FIELDS = ("checkpoint", "tokenizer", "template", "max_length", "max_tiles", "image_size",
                      "tokens_per_tile", "dtype", "fp8", "fp8_recipe")


# ---- fingerprints ----------------------------------------------------------------------


def _hash_files(root: Path, names: Optional[list[str]] = None, head_bytes: int = 64 << 20) -> str:
    """Content hash of the files under ``root`` (large files: size + first/last 4 MiB)."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if names is None else [root / n for n in names]
    for path in files:
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}:{size}\n".encode())
        with path.open("rb") as f:
            if size <= head_bytes:
                digest.update(f.read())
            else:
                digest.update(f.read(4 << 20))
                f.seek(-(4 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def fingerprint(cfg: RunConfig, model_config) -> dict:
    """Every setting the reference numbers depend on, the reference forward's precision included."""
    if not cfg.model.init:
        raise UserError("reference values need model.init: the initial policy checkpoint")
    init = Path(cfg.model.init)
    data = data_setup.data_config(cfg, model_config, for_reference=True)
    return {
        "checkpoint": _hash_files(init),
        "tokenizer": _hash_files(Path(cfg.model.tokenizer or cfg.model.init), list(TOKENIZER_FILES)),
        "template": data.template,
        "max_length": data.max_length,
        "max_tiles": data.max_tiles,
        "image_size": data.image_size,
        "tokens_per_tile": data.tokens_per_tile,
        # What the reference forward computes in (precision.reference_precision): the
        # training dtype without FP8 unless precision.reference_fp8 is set.
        **precision.reference_precision(cfg).fingerprint(),
    }


def _explain(found: dict, expected: dict) -> Optional[str]:
    for key in FINGERPRINT_FIELDS:
        if found.get(key) != expected.get(key):
            if key == "checkpoint":
                return "they were computed from another initial checkpoint than model.init"
            return f"they were computed with {key}={found.get(key)!r}, this run uses {key}={expected.get(key)!r}"
    return None


def check_fingerprint(ref_dir: str, expected: dict) -> None:
    """UserError naming the first differing setting when any sidecar disagrees."""
    directory = Path(ref_dir)
    sidecars = sorted(directory.glob("*.ref.json")) if directory.is_dir() else []
    if not sidecars:
        raise UserError(
            f"data.ref_logps {ref_dir} holds no reference sidecars: run tools/precompute_ref_logps.py "
            "with this config first"
        )
    for path in sidecars:
        body = read_sidecar(str(path))
        if body is None:
            continue
        why = _explain(body.get("fingerprint", {}), expected)
        if why:
            raise UserError(
                f"reference values in {ref_dir} do not match this run: {why}; "
                "recompute them with tools/precompute_ref_logps.py"
            )


# ---- computation -----------------------------------------------------------------------


def _is_complete(path: str, expected: dict) -> bool:
    body = read_sidecar(path)
    if body is None or not body.get("complete"):
        return False
    why = _explain(body.get("fingerprint", {}), expected)
    if why:
        raise UserError(
            f"{path} was written with other settings ({why}); use another data.ref_logps "
            "directory or delete the old sidecars"
        )
    return True


def _chunks(iterator, size: int):
    chunk = []
    for item in iterator:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def precompute(cfg: RunConfig, log=print) -> dict:
    """Compute missing sidecars for the shards of ``cfg.data.shards``; returns a summary."""
    from megatron_mpo.data import build_loader
    from megatron_mpo.data.shardlist import expand_shards, read_index_counts
    from megatron_mpo.training.checkpoint import load_model_weights

    if not cfg.data.ref_logps:
        raise UserError("set data.ref_logps: the directory the reference sidecars go to")
    layout = parallel.initialize(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline,
                                 seed=cfg.train.seed, device=cfg.train.device)
    is_writer = layout.is_last_stage and layout.tensor_rank == 0
    model_config = model_setup.model_config(cfg)
    precision.check_precision(cfg)
    chunks = model_setup.build_model_chunks(cfg, model_config, layout, precision.reference_precision(cfg))
    load_model_weights(cfg.model.init, chunks)
    for chunk in chunks:
        chunk.eval()
    tok = data_setup.tokenizer(cfg)
    data = data_setup.data_config(cfg, model_config, for_reference=True)
    expected = fingerprint(cfg, model_config)
    out_dir = cfg.data.ref_logps
    os.makedirs(out_dir, exist_ok=True)

    urls = expand_shards(cfg.data.shards)
    counts = read_index_counts(cfg.data.shards) if isinstance(cfg.data.shards, str) else {}
    mine = [u for i, u in enumerate(urls) if i % layout.data == layout.data_rank]
    todo = [u for u in mine if not _is_complete(sidecar_path(out_dir, shard_name(u)), expected)]
    planned = sum(counts.get(os.path.basename(u), 0) for u in todo)
    if torch.distributed.get_rank() == 0:
        log(f"reference log-probs in {precision.reference_precision(cfg).describe()}: {len(urls)} shards, {len(mine) - len(todo)} of this rank's "
            f"{len(mine)} already complete, {len(todo)} to compute")

    forward_step = make_forward_step(None)
    forward_backward = schedule.forward_backward_func()
    started = time.perf_counter()
    done_pairs = 0
    computed = []
    for url in todo:
        import dataclasses

        loader = build_loader(dataclasses.replace(data, shards=[url]), tok, dp_rank=0, dp_size=1)
        values: dict[str, tuple] = {}
        for group in _chunks(iter(loader), MICRO_BATCHES_PER_CALL):
            with torch.no_grad():
                results = schedule.run_schedule(forward_backward, forward_step, chunks, group,
                                               tok.pad_id, forward_only=True)
            if is_writer:
                for r in results:
                    for i, sample_id in enumerate(r["keys"]):
                        key = sample_id.rpartition("/")[2]
                        values[key] = (
                            float(r["policy_chosen_logps"][i]), float(r["policy_rejected_logps"][i]),
                            int(r["chosen_tokens"][i]), int(r["rejected_tokens"][i]),
                        )
            done_pairs += sum(b.num_pairs for b in group)
            if torch.distributed.get_rank() == 0:
                rate = done_pairs / max(time.perf_counter() - started, 1e-9)
                eta = (planned - done_pairs) / rate if planned > done_pairs and rate > 0 else 0.0
                log(f"  {shard_name(url)}: {done_pairs} pairs done, {rate:.1f} pairs/s, ETA {eta:.0f}s")
        if is_writer:
            write_ref_logps(
                out_dir, shard_name(url), values, fingerprint=expected,
                extra={"complete": True, "pairs": len(values), "skipped": loader.skip_counts},
            )
        computed.append(shard_name(url))
    torch.distributed.barrier()
    elapsed = time.perf_counter() - started
    if torch.distributed.get_rank() == 0:
        log(f"reference log-probs done: {len(computed)} shards computed on this rank in {elapsed:.1f}s")
    parallel.shutdown()
    return {"computed": computed, "skipped_complete": len(mine) - len(todo), "pairs": done_pairs}

"""Precomputed reference log-probs stored beside the shards, one sidecar file per shard.

Layout: ``DIR/{shard}.ref.json`` or ``DIR/{shard}.ref.npz`` where ``{shard}`` is the
shard's file name without ``.tar`` (see :func:`shard_name`).

- JSON: ``{"format": "megatron_mpo.ref_logps/1", "shard": name,
  "logps": {key: [chosen_sum, rejected_sum], ...}}``
- NPZ: arrays ``keys`` (str), ``chosen`` and ``rejected`` (float64).

Sums are over response tokens (including ``<|im_end|>``), exactly the slots the trainer
sums. :func:`write_ref_logps` writes either format atomically; :class:`RefLogps` reads
them lazily with a small per-process cache.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from megatron_mpo.errors import UserError
from megatron_mpo.fileio import write_atomic

REF_FORMAT = "megatron_mpo.ref_logps/1"


def shard_name(url: str) -> str:
    """The name a shard is known by: its file name without ``.tar``.

    Works for paths, URLs (query dropped) and ``pipe:`` commands (last word).
    """
    text = url.strip()
    if text.startswith("pipe:"):  # the word naming the tar, else the last word
        words = text[5:].split() or [text]
        text = next((w for w in reversed(words) if re.search(r"\.(tar|tgz)\b", w)), words[-1])
    text = text.split("?", 1)[0].rstrip("/")
    base = text.rsplit("/", 1)[-1]
    return re.sub(r"\.(tar|tar\.gz|tgz)$", "", base)


def split_sample_id(sample_id: str) -> Tuple[str, str]:
    """``"shard/key"`` (as in ``PairBatch.keys``) -> ``(shard, key)``."""
    shard, _, key = sample_id.rpartition("/")
    return shard, key


def write_ref_logps(
    directory: str,
    shard: str,
    logps: Mapping[str, Tuple[float, ...]],
    fmt: str = "json",
    fingerprint: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> str:
    """Write one shard's sidecar (``fmt`` "json" or "npz"); returns its path.

    Values are ``(chosen_sum, rejected_sum[, chosen_tokens, rejected_tokens])``. The JSON
    form also records the settings ``fingerprint`` the numbers depend on and ``extra``
    bookkeeping (e.g. how many samples of the shard were read).
    """
    os.makedirs(directory, exist_ok=True)
    if fmt == "json":
        path = os.path.join(directory, f"{shard}.ref.json")
        body = {
            "format": REF_FORMAT,
            "shard": shard,
            "fingerprint": fingerprint or {},
            **(extra or {}),
            "logps": {k: [float(x) for x in v] for k, v in logps.items()},
        }
        write_atomic(path, json.dumps(body, sort_keys=True), tmp=path + ".tmp", durable=False)
    elif fmt == "npz":
        path = os.path.join(directory, f"{shard}.ref.npz")
        keys = sorted(logps)
        tmp = path + ".tmp.npz"
        np.savez(
            tmp,
            keys=np.array(keys, dtype=str),
            chosen=np.array([logps[k][0] for k in keys], dtype=np.float64),
            rejected=np.array([logps[k][1] for k in keys], dtype=np.float64),
        )
        os.replace(tmp, path)
    else:
        raise ValueError(f"fmt must be 'json' or 'npz', not {fmt!r}")
    return path


def read_sidecar(path: str) -> Optional[dict]:
    """A JSON sidecar's body, or None when it is absent or unreadable (e.g. half-written)."""
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("format") == REF_FORMAT else None


def sidecar_path(directory: str, shard: str) -> str:
    return os.path.join(directory, f"{shard}.ref.json")


class RefLogps:
    """Reads reference sums for ``(shard, key)`` from a sidecar directory."""

    def __init__(self, directory: str, cache_shards: int = 4):
        if not os.path.isdir(directory):
            raise UserError(f"reference log-prob directory {directory} does not exist")
        self.directory = directory
        self._cache: "OrderedDict[str, Dict[str, Tuple[float, float]]]" = OrderedDict()
        self._cache_shards = cache_shards

    def _load(self, shard: str) -> Dict[str, Tuple[float, float]]:
        json_path = os.path.join(self.directory, f"{shard}.ref.json")
        npz_path = os.path.join(self.directory, f"{shard}.ref.npz")
        try:
            if os.path.isfile(json_path):
                with open(json_path, encoding="utf-8") as f:
                    body = json.load(f)
                return {k: (float(v[0]), float(v[1])) for k, v in body.get("logps", {}).items()}
            if os.path.isfile(npz_path):
                with np.load(npz_path) as z:
                    return {str(k): (float(c), float(r)) for k, c, r in zip(z["keys"], z["chosen"], z["rejected"])}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise UserError(f"cannot read reference log-probs of shard {shard} in {self.directory}: {exc}") from None
        return {}

    def lookup(self, shard: str, key: str) -> Optional[Tuple[float, float]]:
        """``(chosen_sum, rejected_sum)`` of a sample, or None when absent."""
        table = self._cache.get(shard)
        if table is None:
            table = self._load(shard)
            self._cache[shard] = table
            while len(self._cache) > self._cache_shards:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(shard)
        return table.get(key)

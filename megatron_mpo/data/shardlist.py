"""Shard specifications -> an ordered list of shard URLs.

Accepted, alone or in a list: a shard folder written by make_shards (its
``index.json`` lists the shards), an ``index.json`` path or http(s) URL, a local tar
path, a brace pattern (``shards/shard-{000000..000009}.tar``), a ``pipe:`` command
(braces expanded too, as webdataset does) or an http(s) URL. Local paths must exist.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import List, Sequence, Union

import braceexpand

from megatron_mpo.errors import UserError

_REMOTE = ("http://", "https://", "pipe:", "file:")


def _from_index(index: dict, base: str, origin: str) -> List[str]:
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise UserError(f"{origin} is not a shard index (no 'shards' list)")
    names = [s["name"] if isinstance(s, dict) else str(s) for s in shards]
    if base.startswith(("http://", "https://")):
        return [base.rstrip("/") + "/" + n for n in names]
    return [os.path.join(base, n) for n in names]


def _read_index(location: str) -> List[str]:
    try:
        if location.startswith(("http://", "https://")):
            with urllib.request.urlopen(location, timeout=60) as response:
                index = json.loads(response.read().decode("utf-8"))
            return _from_index(index, location.rsplit("/", 1)[0], location)
        with open(location, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read shard index {location}: {exc}") from None
    return _from_index(index, os.path.dirname(location), location)


def expand_shards(spec: Union[str, Sequence[str]]) -> List[str]:
    """All shard URLs named by ``spec``, in order; UserError when none or a local one is missing."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: List[str] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if not item.startswith(_REMOTE) and os.path.isdir(item):
            index = os.path.join(item, "index.json")
            if os.path.isfile(index):
                urls += _read_index(index)
            else:
                found = sorted(os.path.join(item, n) for n in os.listdir(item) if n.endswith(".tar"))
                if not found:
                    raise UserError(f"shard folder {item} has no index.json and no .tar files")
                urls += found
            continue
        if item.endswith("index.json") and not item.startswith("pipe:"):
            urls += _read_index(item)
            continue
        urls += list(braceexpand.braceexpand(item))
    if not urls:
        raise UserError(f"no shards in {spec!r}")
    missing = [u for u in urls if not u.startswith(_REMOTE) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} does not exist{more}")
    return urls


def read_index_total(spec: Union[str, Sequence[str]]) -> "int | None":
    """Total samples named by a shard folder's / index's ``index.json``, or None when unknown."""
    if not isinstance(spec, str):
        return None
    location = spec
    if not spec.startswith(_REMOTE) and os.path.isdir(spec):
        location = os.path.join(spec, "index.json")
    if not location.endswith("index.json") or (not location.startswith(_REMOTE) and not os.path.isfile(location)):
        return None
    try:
        if location.startswith(("http://", "https://")):
            with urllib.request.urlopen(location, timeout=60) as response:
                index = json.loads(response.read().decode("utf-8"))
        else:
            with open(location, encoding="utf-8") as f:
                index = json.load(f)
    except (OSError, ValueError):
        return None
    total = index.get("total") if isinstance(index, dict) else None
    if total is None and isinstance(index, dict):
        total = sum(int(s.get("samples", 0)) for s in index.get("shards", []) if isinstance(s, dict))
    return int(total) if total is not None else None


def read_index_counts(spec: str) -> dict:
    """``{shard file name: samples}`` from a shard folder's index.json ({} when absent)."""
    location = os.path.join(spec, "index.json") if os.path.isdir(spec) else spec
    try:
        with open(location, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return {}
    return {s["name"]: int(s.get("samples", 0)) for s in index.get("shards", []) if isinstance(s, dict)}

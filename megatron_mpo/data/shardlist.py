"""Shard specifications -> an ordered list of shard URLs.

Accepted, alone or in a list: a shard folder written by make_shards (its
``index.json`` lists the shards), an ``index.json`` path or http(s) URL, a local tar
path, a brace pattern (``shards/shard-{000000..000009}.tar``), a ``pipe:`` command
(braces expanded too, as webdataset does) or an http(s) URL. Local paths must exist.
Index entries are names beside the index unless they are URLs or ``pipe:`` commands.
Each source keeps the sample count and sha256 its index promised, so the loader can count
a shard that ends early and a checkpoint can tell whether the data changed under it. An
index.json read from disk may name shards only inside its own folder (no absolute paths,
``..``, symlinks out or ``file:`` URLs) unless ``allow_outside_index``: a shard list must
not make the loader open arbitrary files of the machine. ``pipe:`` sources run a shell command: the loader refuses them
(:func:`check_pipe`) unless the user opted in (``data.allow_pipe_sources``).
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import List, NamedTuple, Optional, Sequence, Union

import braceexpand

from megatron_mpo.errors import UserError
from megatron_mpo.fileio import outside_root

_REMOTE = ("http://", "https://", "pipe:", "file:")


class ShardSource(NamedTuple):
    """One shard to read: where, how many samples its index promised, who named it."""

    url: str
    samples: Optional[int]  # None when no index.json counts it
    origin: str  # "data.shards" or the index file that lists it
    sha256: Optional[str] = None  # the index's checksum of the shard file, when it has one


def check_pipe(url: str, allowed: bool, origin: str = "the shard list") -> None:
    """Refuse a ``pipe:`` source (a shell command named by data) unless opted in."""
    if url.startswith("pipe:") and not allowed:
        raise UserError(
            f"shard source {url[:80]!r} in {origin} runs a shell command; "
            "set data.allow_pipe_sources: true if you trust it"
        )


def refuse_pipes(sources: Sequence[ShardSource], allowed: bool) -> None:
    """:func:`check_pipe` for every source, naming where the first offender came from."""
    for source in sources:
        check_pipe(source.url, allowed, source.origin)


def _promised(entry: object) -> Optional[int]:
    """The sample count of an index entry, None when it has no usable one."""
    samples = entry.get("samples") if isinstance(entry, dict) else None
    return samples if isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0 else None


def _checksum(entry: object) -> Optional[str]:
    sha = entry.get("sha256") if isinstance(entry, dict) else None
    return sha if isinstance(sha, str) and sha else None


def _beside(base: str, name: str, origin: str, allow_outside: bool) -> str:
    """An index entry's location: URLs and commands as written, names beside the index.

    A local index's entries must stay in its folder unless ``allow_outside``; a remote
    index may not name local files at all.
    """
    remote_index = base.startswith(("http://", "https://"))
    escape = None
    if name.startswith("file:"):
        escape = None if allow_outside and not remote_index else "is a file: URL"
    elif not (remote_index or allow_outside or name.startswith(_REMOTE)):
        escape = outside_root(base, name, "the index's folder")
    if escape is not None:
        raise UserError(f"shard {name!r} in {origin} {escape}; keep shards beside their index.json "
                        "or set data.allow_outside_index: true if you trust it")
    if name.startswith(_REMOTE):
        return name
    if remote_index:
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def _from_index(index: dict, base: str, origin: str, allow_outside: bool = False) -> List[ShardSource]:
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise UserError(f"{origin} is not a shard index (no 'shards' list)")
    return [
        ShardSource(_beside(base, s["name"] if isinstance(s, dict) else str(s), origin, allow_outside),
                    _promised(s), origin, _checksum(s))
        for s in shards
    ]


def _read_index(location: str, allow_outside: bool = False) -> List[ShardSource]:
    try:
        if location.startswith(("http://", "https://")):
            with urllib.request.urlopen(location, timeout=60) as response:
                index = json.loads(response.read().decode("utf-8"))
            return _from_index(index, location.rsplit("/", 1)[0], location)
        with open(location, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read shard index {location}: {exc}") from None
    return _from_index(index, os.path.dirname(location), location, allow_outside)


def expand_shards(spec: Union[str, Sequence[str]], allow_outside_index: bool = False) -> List[str]:
    """All shard URLs named by ``spec``, in order; UserError when none or a local one is missing."""
    return [source.url for source in list_shards(spec, allow_outside_index)]


def list_shards(spec: Union[str, Sequence[str]], allow_outside_index: bool = False) -> List[ShardSource]:
    """:func:`expand_shards` with each shard's promised sample count, checksum and origin."""
    items = [spec] if isinstance(spec, str) else list(spec)
    sources: List[ShardSource] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if not item.startswith(_REMOTE) and os.path.isdir(item):
            index = os.path.join(item, "index.json")
            if os.path.isfile(index):
                sources += _read_index(index, allow_outside_index)
            else:
                found = sorted(os.path.join(item, n) for n in os.listdir(item) if n.endswith(".tar"))
                if not found:
                    raise UserError(f"shard folder {item} has no index.json and no .tar files")
                sources += [ShardSource(u, None, "data.shards") for u in found]
            continue
        if item.endswith("index.json") and not item.startswith("pipe:"):
            sources += _read_index(item, allow_outside_index)
            continue
        sources += [ShardSource(u, None, "data.shards") for u in braceexpand.braceexpand(item)]
    if not sources:
        raise UserError(f"no shards in {spec!r}")
    missing = [s.url for s in sources if not s.url.startswith(_REMOTE) and not os.path.isfile(s.url)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} does not exist{more}")
    return sources


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

"""Precomputed reference log-probs stored beside the shards, one sidecar file per shard,
and the contract that the reference tool (writer) and the trainer (reader) both keep.

Layout: ``DIR/{shard}.ref.json`` where ``{shard}`` is the shard's file name without
``.tar`` (see :func:`shard_name`). Body::

    {"format": REF_FORMAT, "shard": name,
     "shard_content": {"bytes": n, "sha256": hex, "samples": n},  # what the values were computed from
     "fingerprint": {...},   # every setting the numbers depend on (:func:`fingerprint`)
     "complete": true, "pairs": n, "skipped": {...},
     "logps": {key: [chosen_sum, rejected_sum, chosen_tokens, rejected_tokens], ...},
     "checksum": sha256 of all of the above}

Sums are over response tokens (including ``<|im_end|>``), exactly the slots the trainer
sums. :func:`write_ref_logps` writes a sidecar atomically; :func:`load_sidecar` refuses a
damaged one and :func:`check_sidecar` also a stale or mismatching one, each with a
one-line UserError; :class:`RefLogps` reads values lazily with a small per-process cache.
(Older ``.ref.npz`` sidecars had no fingerprint, nothing wrote them: they are refused.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from megatron_mpo.data.config import DataConfig
from megatron_mpo.data.plan import LoaderPlan
from megatron_mpo.data.tokenizer import TOKENIZER_FILES
from megatron_mpo.errors import UserError
from megatron_mpo.fileio import write_atomic

REF_FORMAT = "megatron_mpo.ref_logps/2"
SUFFIX = ".ref.json"
FINGERPRINT_FIELDS = ("checkpoint", "tokenizer", "template", "system_message", "max_length", "dynamic_tiling",
                      "thumbnail", "min_tiles", "max_tiles", "image_size", "tokens_per_tile", "dtype", "fp8",
                      "fp8_recipe")
# Fields added after sidecars were first written: such a sidecar was computed with these values.
_FINGERPRINT_BEFORE = {"dynamic_tiling": True, "thumbnail": True, "min_tiles": 1}
FIX = "delete it and recompute with megatron-mpo reference"


class StaleSidecar(UserError):
    """A sound sidecar computed from other content of its shard (the reference tool redoes it)."""


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


def sidecar_checksum(body: Mapping) -> str:
    """sha256 of a sidecar body without its ``checksum``: catches edits of any field.

    JSON floats round-trip exactly, so a body read back gives the writer's canonical text.
    """
    rest = {k: v for k, v in body.items() if k != "checksum"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_ref_logps(
    directory: str,
    shard: str,
    logps: Mapping[str, Tuple[float, ...]],
    fingerprint: Optional[dict] = None,
    extra: Optional[dict] = None,
    content: Optional[dict] = None,
) -> str:
    """Write one shard's sidecar atomically; returns its path.

    Values are ``(chosen_sum, rejected_sum[, chosen_tokens, rejected_tokens])``. The body
    also records the settings ``fingerprint`` the numbers depend on, the shard ``content``
    they were computed from (:func:`shard_contents`), ``extra`` bookkeeping and a checksum.
    """
    bad = _first_non_finite(logps)
    if bad is not None:
        raise UserError(f"reference value of sample {bad[0]!r} in shard {shard} is {bad[1]}: the reference forward "
                        "overflowed (check model.init and the reference precision); nothing was written")
    os.makedirs(directory, exist_ok=True)
    path = sidecar_path(directory, shard)
    body = {
        "format": REF_FORMAT,
        "shard": shard,
        "shard_content": content or {},
        "fingerprint": fingerprint or {},
        **(extra or {}),
        "pairs": len(logps),
        "logps": {k: [float(x) for x in v] for k, v in logps.items()},
    }
    body["checksum"] = sidecar_checksum(body)
    write_atomic(path, json.dumps(body, sort_keys=True), tmp=path + ".tmp", durable=False)
    return path


def sidecar_path(directory: str, shard: str) -> str:
    return os.path.join(directory, f"{shard}{SUFFIX}")


def load_sidecar(path: str) -> dict:
    """A sidecar's body once it is whole, of this format, unedited and of its own shard."""
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except ValueError as exc:
        raise UserError(f"reference sidecar {path} is truncated or not JSON ({exc}); {FIX}") from None
    except OSError as exc:
        raise UserError(f"cannot read reference sidecar {path}: {exc}") from None
    found = body.get("format") if isinstance(body, dict) else None
    if found != REF_FORMAT:
        what = f"format {found!r}" if found else "no format"
        raise UserError(f"reference sidecar {path} has {what}, expected {REF_FORMAT!r} "
                        f"(an older version or another tool wrote it); {FIX}")
    if body.get("checksum") != sidecar_checksum(body):
        raise UserError(f"reference sidecar {path} fails its checksum (edited or damaged after it was written); {FIX}")
    if body.get("shard") != os.path.basename(path)[: -len(SUFFIX)]:
        raise UserError(f"reference sidecar {path} holds the values of shard {body.get('shard')!r}; {FIX}")
    bad = _first_non_finite(body.get("logps") or {})
    if bad is not None:  # a valid checksum guards against damage only, not against a diverged forward
        raise UserError(f"reference sidecar {path} holds a non-finite value ({bad[1]} for sample {bad[0]!r}); {FIX}")
    return body


def _first_non_finite(logps: Mapping) -> Optional[Tuple[str, float]]:
    """(key, value) of the first NaN / inf reference value, None when all are finite."""
    import math

    for key, values in logps.items():
        for value in values:
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return key, value
    return None


# ---- what the values depend on: settings (fingerprint) and shard content ----------------------


def _hash_files(root: Path, names: Optional[List[str]] = None, head_bytes: int = 64 << 20) -> str:
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


def fingerprint(checkpoint: str, tokenizer: str, data: DataConfig, loading: LoaderPlan, precision: Mapping) -> dict:
    """Every setting the reference numbers depend on; ``precision``: the reference forward's
    ``PrecisionPlan.fingerprint()`` (what the values are computed in). ``data``'s tiling keys
    are resolved (the run's, see :mod:`.tile_settings`)."""
    return {
        "checkpoint": _hash_files(Path(checkpoint)),
        "tokenizer": _hash_files(Path(tokenizer), list(TOKENIZER_FILES)),
        "template": data.template,
        # As configured (None: the template's own), so sidecars written before this field
        # existed still match a run that leaves it unset.
        "system_message": data.system_message,
        "max_length": data.max_length,
        "dynamic_tiling": data.dynamic_tiling,
        "thumbnail": data.thumbnail,
        "min_tiles": data.min_tiles,
        "max_tiles": data.max_tiles,
        "image_size": loading.image_size,
        "tokens_per_tile": loading.tokens_per_tile,
        **precision,
    }


def complete_fingerprint(found: Mapping) -> dict:
    """A sidecar's fingerprint with the fields it predates set to what it was computed with."""
    return {**_FINGERPRINT_BEFORE, **found}


def explain(found: Mapping, expected: Mapping) -> Optional[str]:
    """The first setting in which two fingerprints differ, in words (None when equal)."""
    found = complete_fingerprint(found)
    for key in FINGERPRINT_FIELDS:
        if found.get(key) != expected.get(key):
            if key == "checkpoint":
                return "they were computed from another initial checkpoint than model.init"
            return f"they were computed with {key}={found.get(key)!r}, this run uses {key}={expected.get(key)!r}"
    return None


def _index_entries(folder: str, cache: Dict[str, dict]) -> dict:
    """``{shard file name: entry}`` of the index.json make_shards wrote in ``folder`` ({} if none)."""
    if folder not in cache:
        try:
            with open(os.path.join(folder, "index.json"), encoding="utf-8") as f:
                shards = json.load(f).get("shards", [])
            cache[folder] = {s["name"]: s for s in shards if isinstance(s, dict) and "name" in s}
        except (OSError, ValueError, AttributeError, TypeError):
            cache[folder] = {}
    return cache[folder]


def shard_contents(urls: Iterable[str]) -> Dict[str, dict]:
    """``{url: {"bytes", "sha256", "samples"}}``: what each shard's values are bound to.

    The digest is the one make_shards computed once while writing the shard (index.json):
    comparing it and the file size costs a stat per shard, where re-hashing at every start
    would read the whole multi-GB shard set on every rank. A local shard without such an
    index is bound by its size only, a remote one (http, pipe:) by its name only.
    """
    cache: Dict[str, dict] = {}
    contents = {}
    for url in urls:
        if not os.path.isfile(url):
            contents[url] = {"bytes": None, "sha256": None, "samples": None}
            continue
        size = os.path.getsize(url)
        entry = _index_entries(os.path.dirname(url), cache).get(os.path.basename(url), {})
        if entry.get("sha256") and entry.get("bytes") != size:
            raise UserError(f"shard {url} has {size} bytes but its index.json says {entry.get('bytes')}: it changed "
                            "after make_shards wrote it; rewrite the shards with megatron-mpo shards --overwrite")
        contents[url] = {"bytes": size, "sha256": entry.get("sha256"), "samples": entry.get("samples")}
    return contents


# ---- the check both sides run -----------------------------------------------------------------


def check_sidecar(path: str, expected: Mapping, content: Optional[Mapping]) -> dict:
    """A sidecar's body once it is sound (:func:`load_sidecar`), computed with the
    ``expected`` fingerprint and, when ``content`` is given, from that shard content."""
    body = load_sidecar(path)
    why = explain(body.get("fingerprint", {}), expected)
    if why:
        raise UserError(f"reference values in {os.path.dirname(path)} do not match this run: {why} "
                        f"({os.path.basename(path)}); recompute them into a new data.ref_logps directory "
                        "with megatron-mpo reference")
    if content is not None and body.get("shard_content") != dict(content):
        raise StaleSidecar(f"reference sidecar {path} was computed from other content of shard {body['shard']} "
                           "(the shard changed since, e.g. re-sharded); rerun megatron-mpo reference, "
                           "which recomputes stale sidecars")
    return body


class Coverage(NamedTuple):
    """Which shards of a run have a sidecar: those without one (in shard-list order) and the
    sample count index.json gives every shard (None: not counted)."""

    missing: List[str]
    samples: Dict[str, Optional[int]]


def check_sidecars(directory: str, expected: Mapping, urls: List[str]) -> Coverage:
    """Check every sidecar in ``directory`` (those of ``urls``' shards also against their
    content): UserError on the first fault. Returns which of ``urls`` have none."""
    folder = Path(directory)
    found = sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    old = sorted(folder.glob("*.ref.npz")) if folder.is_dir() else []
    if old:
        raise UserError(f"reference sidecar {old[0]} is an npz file: npz sidecars carry no fingerprint or "
                        f"checksum and are no longer read; {FIX}")
    if not found:
        raise UserError(f"data.ref_logps {directory} holds no reference sidecars: run "
                        "megatron-mpo reference with this config first")
    contents = {shard_name(url): c for url, c in shard_contents(urls).items()}
    for path in found:
        check_sidecar(str(path), expected, contents.get(path.name[: -len(SUFFIX)]))
    have = {p.name[: -len(SUFFIX)] for p in found}
    return Coverage([name for name in contents if name not in have], {n: c["samples"] for n, c in contents.items()})


class RefLogps:
    """Reads reference sums for ``(shard, key)`` from a sidecar directory."""

    def __init__(self, directory: str, cache_shards: int = 4):
        if not os.path.isdir(directory):
            raise UserError(f"reference log-prob directory {directory} does not exist")
        self.directory = directory
        self._cache: "OrderedDict[str, Dict[str, Tuple[float, float]]]" = OrderedDict()
        self._cache_shards = cache_shards

    def _load(self, shard: str) -> Dict[str, Tuple[float, float]]:
        """The shard's values ({} without a sidecar); a damaged sidecar is refused here too."""
        path = sidecar_path(self.directory, shard)
        if not os.path.isfile(path):
            return {}
        return {k: (float(v[0]), float(v[1])) for k, v in load_sidecar(path)["logps"].items()}

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

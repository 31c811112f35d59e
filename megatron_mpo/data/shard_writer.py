"""Write MMPR-style preference data as deterministic WebDataset tar shards.

Order of work: read every annotation (main process), select lines by ``repeat_time``
(seeded per dataset), shuffle all selected occurrences once with the seed (so shards
mix datasets), then check records and read their images in a process pool, in that
order (``imap`` keeps it), and write shards of ``samples_per_shard`` accepted samples.

Each sample is ``KEY.json`` (question with ``<image>`` placeholders, chosen, rejected,
dataset, line, id, num_images, images, [max_dynamic_patch]) and ``KEY.img{i}.{ext}``
holding the original image bytes. Keys are ``{dataset}-L{line}-r{occurrence}`` with no
dots. Tar headers are fixed (mtime, owner, mode), so equal input and seed give equal
bytes. ``index.json`` lists each shard's samples, size and sha256 (reference sidecars are
bound to them). The whole folder is written as a temporary sibling and renamed into
place, so a failed run leaves the old folder as it was; a non-empty ``out`` is refused
unless ``overwrite``. Refused records (images outside the image root among them) are
counted by reason and listed in ``refused.jsonl``.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

from megatron_mpo.data.mmpr import SourceSpec, check_record, load_meta, read_annotation, safe_key_part, select_indices
from megatron_mpo.errors import UserError
from megatron_mpo.fileio import TMP_PREFIX, write_atomic

INDEX_NAME = "index.json"
REFUSED_NAME = "refused.jsonl"
INDEX_FORMAT = "megatron_mpo.shards/1"
TAR_MTIME = 946684800  # 2000-01-01: fixed so that shard bytes are reproducible


@dataclass
class MakeShardsConfig:
    """What make_shards reads and how it writes."""

    out: str
    meta: Optional[str] = None  # MMPR meta.json ...
    jsonl: Optional[str] = None  # ... or one annotation file
    image_root: Optional[str] = None  # images of --jsonl (default: its folder)
    name: Optional[str] = None  # dataset name of --jsonl (default: file stem)
    samples_per_shard: int = 1000
    seed: int = 0
    workers: int = 1
    progress: bool = True
    overwrite: bool = False  # replace a non-empty ``out`` (whole: never a mix of old and new shards)
    allow_outside_root: bool = False  # read images outside the image root (absolute, '..', symlinks)


def shard_filename(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _sources(config: MakeShardsConfig) -> List[SourceSpec]:
    if (config.meta is None) == (config.jsonl is None):
        raise UserError("give either --meta META.json or --jsonl FILE (with --image-root and --name)")
    if config.meta is not None:
        return load_meta(config.meta)
    if not os.path.isfile(config.jsonl):
        raise UserError(f"annotation file {config.jsonl} does not exist")
    root = config.image_root or os.path.dirname(os.path.abspath(config.jsonl))
    if not os.path.isdir(root):
        raise UserError(f"image root {root} is not a directory")
    name = config.name or os.path.splitext(os.path.basename(config.jsonl))[0]
    return [SourceSpec(name, root, config.jsonl, 1.0, None)]


def _plan(specs: List[SourceSpec], seed: int, allow_outside_root: bool = False):
    """All selected occurrences in output order, and per-source line counts."""
    used = set()
    prefixes = []
    for i, spec in enumerate(specs):
        # Unique by construction: a cleaned name that another dataset already has gets the
        # dataset's index, and that is checked again (``a3`` and ``a.`` + index 3 once collided).
        prefix = base = safe_key_part(spec.name)
        while prefix in used:
            prefix = f"{base}_{i}" if prefix == base else f"{prefix}_{i}"
        used.add(prefix)
        prefixes.append(prefix)
    tasks = []
    stats = {}
    for ds_index, spec in enumerate(specs):
        lines = read_annotation(spec)
        rng = random.Random(f"{seed}:{spec.name}")
        picked = select_indices(len(lines), spec.repeat_time, rng)
        occurrences: Counter = Counter()
        for idx in picked:
            line_no, raw = lines[idx]
            occ = occurrences[line_no]
            occurrences[line_no] += 1
            tasks.append(
                {
                    "dataset": spec.name,
                    "root": spec.root,
                    "line": line_no,
                    "raw": raw,
                    "max_dynamic_patch": spec.max_dynamic_patch,
                    "key": f"{prefixes[ds_index]}-L{line_no}-r{occ}",
                    "allow_outside_root": allow_outside_root,
                }
            )
        stats[spec.name] = {
            "annotation": spec.annotation,
            "root": spec.root,
            "repeat_time": spec.repeat_time,
            "lines": len(lines),
            "selected": len(picked),
            "written": 0,
            "refused": 0,
        }
        if spec.max_dynamic_patch is not None:
            stats[spec.name]["max_dynamic_patch"] = spec.max_dynamic_patch
    random.Random(seed).shuffle(tasks)
    return tasks, stats


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _ShardSink:
    """Accepted samples -> shard-NNNNNN.tar files, each written atomically."""

    def __init__(self, out: str, per_shard: int):
        self.out, self.per_shard = out, per_shard
        self.shards: List[Dict[str, object]] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0

    def add(self, key: str, meta: dict, images) -> None:
        if self._tar is None:
            name = shard_filename(len(self.shards))
            self._tmp = os.path.join(self.out, name + ".tmp")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
            self._count = 0
        payload = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        _tar_member(self._tar, f"{key}.json", payload)
        for i, (ext, data) in enumerate(images):
            _tar_member(self._tar, f"{key}.img{i}.{ext}", data)
        self._count += 1
        if self._count >= self.per_shard:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = shard_filename(len(self.shards))
        path = os.path.join(self.out, name)
        os.replace(self._tmp, path)
        self.shards.append({"name": name, "samples": self._count, "bytes": os.path.getsize(path), "sha256": _sha256(path)})
        self._tar = None


def _sha256(path: str, chunk: int = 8 << 20) -> str:
    """A shard's digest, hashed once right after it is written (still in the page cache),
    in chunks; readers then compare it instead of re-reading multi-GB shards."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _staging_dir(out: str, overwrite: bool) -> str:
    """A fresh sibling of ``out`` to write into; refuses a non-empty ``out`` without ``overwrite``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"--out {out} is not empty (an earlier run's shards?); give --overwrite to replace "
                        "the whole folder, or choose an empty one")
    staging = os.path.join(os.path.dirname(out), f"{TMP_PREFIX}{os.path.basename(out)}.{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed writer's (same pid)
        os.makedirs(staging)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out}: {exc}") from None
    return staging


def _swap_in(staging: str, out: str) -> None:
    """Put the finished ``staging`` folder at ``out``; an old ``out`` goes only after that."""
    old = staging + ".old"
    if os.path.isdir(out):
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _results(tasks: List[dict], workers: int) -> Iterator[dict]:
    if workers <= 1:
        for task in tasks:
            yield check_record(task)
        return
    # forkserver, not fork: the caller may hold threads (torch's pools, a process group),
    # and a child forked from such a process can crash or hang (seen: a segfault in PIL's
    # plugin import inside a forked worker, which left the pool waiting forever).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["megatron_mpo.data.mmpr"])
    with context.Pool(workers) as pool:
        yield from pool.imap(check_record, tasks, chunksize=8)


def make_shards(config: MakeShardsConfig, log: Optional[Callable[[str], None]] = None) -> dict:
    """Write the shards, ``refused.jsonl`` and ``index.json``; returns the index."""
    if config.samples_per_shard < 1:
        raise UserError("--samples-per-shard must be >= 1")
    if config.workers < 1:
        raise UserError("--workers must be >= 1")
    if log is None:
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    specs = _sources(config)
    tasks, stats = _plan(specs, config.seed, config.allow_outside_root)
    out = os.path.realpath(config.out)  # a symlinked --out keeps its link
    staging = _staging_dir(out, config.overwrite)
    try:
        index = _write(config, tasks, stats, staging, log)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"make_shards: wrote {index['total']} samples in {len(index['shards'])} shards to {config.out}")
    return index


def _write(config: MakeShardsConfig, tasks: List[dict], stats: dict, folder: str, log: Callable[[str], None]) -> dict:
    """Shards, ``refused.jsonl`` and ``index.json`` into ``folder``; returns the index."""
    sink = _ShardSink(folder, config.samples_per_shard)
    refused_counts: Counter = Counter()
    refused_seen = set()
    refused_rows = []
    refused_samples = 0
    total = len(tasks)
    start = last = time.monotonic()
    for done, (task, result) in enumerate(zip(tasks, _results(tasks, config.workers)), start=1):
        if result["ok"]:
            sink.add(task["key"], result["meta"], result["images"])
            stats[task["dataset"]]["written"] += 1
        else:
            refused_samples += 1
            stats[task["dataset"]]["refused"] += 1
            ident = (task["dataset"], task["line"])
            if ident not in refused_seen:  # a repeated bad line is reported once
                refused_seen.add(ident)
                refused_counts[result["reason"]] += 1
                row = {"dataset": task["dataset"], "line": task["line"], "reason": result["reason"], "detail": result["detail"]}
                if result.get("id") is not None:
                    row["id"] = result["id"]
                refused_rows.append(row)
        now = time.monotonic()
        if config.progress and (now - last >= 1.0 or done == total):
            last = now
            rate = done / max(now - start, 1e-9)
            log(f"make_shards: {done}/{total} samples ({rate:.1f}/s), {refused_samples} refused")
    sink.close()

    refused_path = os.path.join(folder, REFUSED_NAME)
    refused_text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in refused_rows)
    write_atomic(refused_path, refused_text, tmp=refused_path + ".tmp", durable=False)

    index = {
        "format": INDEX_FORMAT,
        "shards": sink.shards,
        "total": sum(int(s["samples"]) for s in sink.shards),
        "seed": config.seed,
        "samples_per_shard": config.samples_per_shard,
        "sources": stats,
        "refused": dict(sorted(refused_counts.items())),
        "refused_samples": refused_samples,
    }
    index_path = os.path.join(folder, INDEX_NAME)
    index_text = json.dumps(index, ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    write_atomic(index_path, index_text, tmp=index_path + ".tmp", durable=False)
    if refused_counts:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(refused_counts.items()))
        log(f"make_shards: refused {sum(refused_counts.values())} records ({reasons}); see "
            f"{os.path.join(config.out, REFUSED_NAME)}")
    return index

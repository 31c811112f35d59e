"""Stream WebDataset tar shards into raw samples, counting what cannot be read.

Opening goes through webdataset's ``gopen`` (local paths, ``file:``, ``pipe:`` commands,
http(s) via ``curl``; urllib when curl is absent). Members group into samples by key,
the basename up to its first dot (webdataset's ``base_plus_ext``). A shard that fails
to open or breaks mid-way (truncated, corrupt) counts one ``bad_tar``; the sample being
assembled when it broke is dropped and reading goes on with the next shard.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import urllib.request
from collections import Counter
from typing import Dict, Iterable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from megatron_mpo.data.refs import shard_name


class SkipCounter:
    """Counts of skipped/altered samples by reason; ``muted`` while replaying for resume."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.muted = False

    def add(self, reason: str, n: int = 1) -> None:
        if not self.muted:
            self.counts[reason] += n

    def pop(self) -> Dict[str, int]:
        """Counts since the previous pop."""
        out = dict(self.counts)
        self.counts.clear()
        return out


def open_shard(url: str):
    """A binary stream of the shard at ``url``."""
    if url.startswith(("http://", "https://")) and shutil.which("curl") is None:
        return urllib.request.urlopen(url, timeout=120)
    return gopen(url, "rb")


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:  # a pipe's exit status is reported by close; the read error was counted
        pass


def iter_shard(url: str, counter: SkipCounter, warn: bool = True) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__shard__", "__url__", suffix: bytes...}`` of one shard."""
    try:
        stream = open_shard(url)
    except Exception as exc:
        _report(counter, url, exc, warn)
        return
    name = shard_name(url)
    current = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, suffix = base_plus_ext(info.name)
                if key is None:
                    continue
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__shard__": name, "__url__": url}
                current[suffix.lower()] = data
        if current is not None:
            yield current
    except Exception as exc:  # truncated or corrupt tar, failing pipe/HTTP stream
        _report(counter, url, exc, warn)
    finally:
        _close(stream)


def _report(counter: SkipCounter, url: str, exc: BaseException, warn: bool) -> None:
    if counter.muted:
        return
    counter.add("bad_tar")
    if warn:
        print(f"warning: skipping the rest of shard {url}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def iter_shards(urls: Iterable[str], counter: SkipCounter, warn: bool = True) -> Iterator[dict]:
    """Raw samples of several shards in order."""
    for url in urls:
        yield from iter_shard(url, counter, warn)

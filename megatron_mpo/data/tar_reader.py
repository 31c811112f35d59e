"""Stream WebDataset tar shards into raw samples, counting what cannot be read.

Local paths and ``file:`` URLs are opened as files and http(s) with urllib, so no
process is started (webdataset's ``gopen`` would run ``curl``); only an allowed ``pipe:``
command goes through ``gopen`` (a shell). Members group into samples by key, the
basename up to its first dot (webdataset's ``base_plus_ext``). A shard that fails to
open or breaks mid-way (truncated, corrupt) counts one ``bad_tar``; the sample being
assembled when it broke is dropped and reading goes on with the next shard. Stream-mode
tarfile takes a header cut short for the end of the archive, so a shard that ends with
fewer samples than its index.json promised counts the shortfall as ``truncated_shard``.
"""

from __future__ import annotations

import sys
import tarfile
import urllib.request
from collections import Counter
from typing import Dict, Iterable, Iterator, Mapping, Optional
from urllib.parse import urlparse

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from megatron_mpo.data.refs import shard_name
from megatron_mpo.data.shardlist import check_pipe
from megatron_mpo.errors import UserError


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


def open_shard(url: str, allow_pipe: bool = False):
    """A binary stream of the shard at ``url``; a shell only for an allowed ``pipe:``."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=120)
    if url.startswith("pipe:"):
        check_pipe(url, allow_pipe)
        return gopen(url, "rb")
    if url.startswith("file:"):
        return open(urllib.request.url2pathname(urlparse(url).path), "rb")
    return open(url, "rb")


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:  # a pipe's exit status is reported by close; the read error was counted
        pass


class RepeatedKey(UserError):
    """A shard holding one sample key twice: two samples would share one reference value."""


def _tar_samples(stream, url: str) -> Iterator[dict]:
    """Samples of an open tar stream, each with its ordinal in the shard (``__index__``);
    raises on a broken tar (the partial sample is lost) and on a sample key that appears
    twice (:class:`RepeatedKey`)."""
    name = shard_name(url)
    current = None
    seen: set = set()
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
                if key in seen:
                    raise RepeatedKey(f"shard {url} holds sample key {key!r} twice: its samples would share one "
                                      "reference value; rebuild the shards with megatron-mpo shards")
                current = {"__key__": key, "__shard__": name, "__url__": url, "__index__": len(seen)}
                seen.add(key)
            elif suffix.lower() in current:
                raise RepeatedKey(f"shard {url} holds member {info.name!r} twice (sample key {key!r} repeated); "
                                  "rebuild the shards with megatron-mpo shards")
            current[suffix.lower()] = data
    if current is not None:
        yield current


def iter_shard(url: str, counter: SkipCounter, warn: bool = True, expected: Optional[int] = None,
               report: bool = True, allow_pipe: bool = False) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__shard__", "__url__", "__index__", suffix: bytes...}`` of one shard.

    ``expected``: the sample count index.json promised. ``report=False`` reads without
    counting or warning (another stream that reads the same shard does it).
    """
    check_pipe(url, allow_pipe)
    read = 0
    error: Optional[BaseException] = None
    try:
        stream = open_shard(url, allow_pipe)
    except Exception as exc:
        error = exc
    else:
        try:
            for sample in _tar_samples(stream, url):
                read += 1
                yield sample
        except UserError:
            raise  # a shard that must be rebuilt, not a read error to count
        except Exception as exc:  # truncated or corrupt tar, failing pipe/HTTP stream
            error = exc
        finally:
            _close(stream)
    if report:  # not reached when the reader stops early: a partly read shard is not short
        _account(counter, url, read, expected, error, warn)


def _account(counter: SkipCounter, url: str, read: int, expected: Optional[int],
             error: Optional[BaseException], warn: bool) -> None:
    """Count a broken shard and the samples its index promised but it did not deliver."""
    missing = max(0, expected - read) if expected is not None else 0
    if counter.muted or (error is None and not missing):
        return
    notes = []
    if error is not None:
        counter.add("bad_tar")
        notes.append(f"{type(error).__name__}: {error}")
    if missing:
        counter.add("truncated_shard", missing)
        notes.append(f"{read} of the {expected} samples in index.json read, {missing} counted as truncated_shard")
    if warn:
        print(f"warning: shard {url} ended early: {'; '.join(notes)}", file=sys.stderr, flush=True)


def iter_shards(urls: Iterable[str], counter: SkipCounter, warn: bool = True,
                expected: Optional[Mapping[str, int]] = None, report: bool = True,
                allow_pipe: bool = False) -> Iterator[dict]:
    """Raw samples of several shards in order; ``expected`` maps URLs to promised counts."""
    for url in urls:
        yield from iter_shard(url, counter, warn, (expected or {}).get(url), report, allow_pipe)

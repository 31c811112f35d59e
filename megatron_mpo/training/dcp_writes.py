"""megatron-core 0.16.1's checkpoint file writes, without ``fork``.

Its ``FileSystemWriterAsync.write_preloaded_data_multiproc`` forks one writer process per
write bucket on every rank at every save -- from the trainer itself when the save is
synchronous, as ours are. The trainer has threads by then (the data loader's queue
feeders, the process group's), and a child forked from a threaded process inherits locks
whose owners it does not have: now and then a writer hangs or dies inside ``fork`` and the
rank waits on its queue forever (seen here: an EP2 x PP2 run hung in its final save with
one writer a zombie and one stuck in ``os.fork``). Upstream Megatron-LM later replaced
these forks with threads for the same reason. :func:`write_without_fork` does the same:
the buckets are written by threads of the trainer (file writes release the GIL), through
megatron-core's own per-bucket writer, and the results reach the caller's queue as before.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List

__all__ = ["install", "write_without_fork"]


def write_without_fork(transform_list: List[Any], use_msc: bool, rank: int, write_buckets: List[Any],
                       global_results_queue: Any) -> None:
    """``write_preloaded_data_multiproc``'s contract (one dict of bucket -> write results, or
    the first exception, put on ``global_results_queue``) with threads instead of processes."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results: "queue.Queue" = queue.Queue()

    def write(index: int, bucket: Any) -> None:
        done: "queue.Queue" = queue.Queue()  # the per-bucket writer marks completion on it
        done.put(index)
        kwargs = {"use_msc": use_msc} if use_msc else {}
        FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, results, done, True, **kwargs)

    with ThreadPoolExecutor(max_workers=max(1, len(write_buckets))) as pool:
        for future in [pool.submit(write, i, bucket) for i, bucket in enumerate(write_buckets)]:
            future.result()
    outcome: Any = {}
    for _ in write_buckets:
        index, written = results.get_nowait()
        if isinstance(written, Exception):
            outcome = written
            break
        outcome[index] = written
    global_results_queue.put(outcome)


def install() -> None:
    """Route megatron-core's bucket writes through :func:`write_without_fork` (idempotent)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_without_fork)

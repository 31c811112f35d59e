"""Which pairs each step trained: ``logging.sample_log/dp00000.jsonl``, one line per step
and data-parallel rank (``{"step", "applied", "epoch": [...], "keys": [...]}``).

An audit trail for the questions a loss curve cannot answer -- was this pair trained,
twice, in which epoch, in the step whose loss jumped -- and the evidence that a resume at
another layout trains every pair once. On resume, lines of steps after the checkpoint
are dropped from every rank's file (those steps are trained again), including the files
of data-parallel ranks the new layout no longer has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_mpo.parallel import Layout
from megatron_mpo.training.metrics import truncate_after

PATTERN = "dp*.jsonl"


class SampleLog:
    """Appends each step's sample keys for this data-parallel rank (one writer per replica)."""

    def __init__(self, folder: Optional[str], layout: Layout, resume_step: int) -> None:
        self._file = None
        if not folder:
            return
        root = Path(folder)
        if torch.distributed.get_rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            for path in sorted(root.glob(PATTERN)):
                truncate_after(path, resume_step)
        torch.distributed.barrier()
        if layout.tensor_rank == 0 and layout.pipeline_rank == 0:
            self._file = (root / f"dp{layout.data_rank:05d}.jsonl").open("a")

    def write(self, step: int, batches: Sequence, applied: bool) -> None:
        """Record the pairs of ``step``'s micro-batches; ``applied``: the update was taken."""
        if self._file is None:
            return
        record = {"step": step, "applied": applied,
                  "epoch": [e for b in batches for e in b.pair_epochs()],
                  "keys": [k for b in batches for k in b.keys]}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

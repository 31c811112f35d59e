"""What the loader is told besides the ``data`` section: the model's and the run's decisions.

None of these is a config key. The model decides the tile geometry (its vision encoder),
the row layout and the pad multiple (its attention kernel, parallel layout and
precision); the run decides the micro-batch (``train.micro_batch``) and how often and in
which order the shards are read (training: forever, shuffled; the reference tool: once,
in order). ``training.data_setup.loader_plan`` derives one from the run config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["LoaderPlan"]


@dataclass(frozen=True)
class LoaderPlan:
    """The rows the model reads and how one run passes over the shards.

    ``image_size`` and ``tokens_per_tile`` must match the vision model (448 / 256 for
    released InternVL2). ``layout`` ``packed`` puts each micro-batch's pairs into rows of at
    most ``data.max_length`` positions (first-fit decreasing, at most ``data.pairs_per_row``
    pairs per row); rows are padded to a multiple of ``pad_multiple``. ``micro_batch``
    counts preference pairs (2 responses each). ``epochs=None`` streams forever (epoch
    after epoch); ``drop_last`` drops a stream's last, smaller micro-batch of an epoch.
    """

    image_size: int
    tokens_per_tile: int
    micro_batch: int
    pad_multiple: int = 1
    layout: str = "unpacked"  # or "packed"
    epochs: Optional[int] = None
    drop_last: bool = False
    shuffle_shards: bool = True
    warn_bad_shards: bool = True

"""The data pipeline's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

from megatron_mpo.data.samples import MAX_IMAGE_PIXELS
from megatron_mpo.data.tiling import MAX_TILES
from megatron_mpo.errors import UserError


@dataclass
class DataConfig:
    """Where the shards are and how samples become micro-batches.

    ``micro_batch`` counts preference pairs (2 responses each). ``image_size`` and
    ``tokens_per_tile`` must match the vision model (448 / 256 for released InternVL2).
    ``max_tiles`` is the per-sample tile budget (a sample's ``max_dynamic_patch``, set by
    make_shards from the meta file, can lower it, never raise it), split across the images
    of a multi-image sample. ``epochs=None`` streams forever (epoch after epoch).
    ``layout`` ``packed`` puts each micro-batch's pairs into rows of at most ``max_length``
    positions (first-fit decreasing, at most ``pairs_per_row`` pairs per row).
    ``allow_pipe_sources``: ``pipe:`` shard sources run a shell command, so they are
    refused unless the user trusts the shard list (index.json files included);
    ``allow_outside_index``: an index.json may otherwise name shards only inside its folder.
    """

    shards: Union[str, List[str]] = ""
    ref_logps: Optional[str] = None  # folder of per-shard sidecars (megatron_mpo.data.refs)
    on_missing_ref: str = "warn"  # "warn" / "skip": count a pair without a value as missing_ref; "error": stop
    max_length: int = 4096
    max_tiles: int = 6
    min_tiles: int = 1
    max_image_pixels: int = MAX_IMAGE_PIXELS  # an image over it (by its header) is bad_image, never decoded
    use_thumbnail: bool = True
    template: str = "internvl2_5"
    system_message: Optional[str] = None  # None: the template's own
    num_workers: int = 2
    prefetch_factor: int = 2
    shuffle_buffer: int = 1000  # samples; 0 or 1 keeps shard order
    shuffle_shards: bool = True
    seed: int = 1234
    micro_batch: int = 1  # pairs per micro-batch
    image_size: int = 448
    tokens_per_tile: int = 256
    pad_multiple: int = 1
    layout: str = "unpacked"  # or "packed"
    pairs_per_row: Optional[int] = 1  # packed rows: most pairs per row within max_length (None: any)
    epochs: Optional[int] = None
    drop_last: bool = False  # drop a worker's last, smaller micro-batch of an epoch
    warn_bad_shards: bool = True
    allow_pipe_sources: bool = False
    allow_outside_index: bool = False  # index.json may name shards outside its folder

    def __post_init__(self):
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(f"data config: {msg}")

        need(self.on_missing_ref in ("warn", "skip", "error"), "on_missing_ref must be 'warn', 'skip' or 'error'")
        need(self.layout in ("unpacked", "packed"), "layout must be 'unpacked' or 'packed'")
        need(self.max_length >= 2, "max_length must be >= 2")
        need(1 <= self.min_tiles <= self.max_tiles, "need 1 <= min_tiles <= max_tiles")
        need(self.max_tiles <= MAX_TILES, f"max_tiles must be <= {MAX_TILES}")
        need(self.max_image_pixels >= 1, "max_image_pixels must be >= 1")
        need(self.num_workers >= 0, "num_workers must be >= 0")
        need(self.prefetch_factor >= 1, "prefetch_factor must be >= 1")
        need(self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0")
        need(self.micro_batch >= 1, "micro_batch must be >= 1")
        need(self.image_size >= 1 and self.tokens_per_tile >= 1, "image_size and tokens_per_tile must be >= 1")
        need(self.pad_multiple >= 1, "pad_multiple must be >= 1")
        need(self.pairs_per_row is None or self.pairs_per_row >= 1, "pairs_per_row must be None or >= 1")
        need(self.epochs is None or self.epochs >= 1, "epochs must be None (forever) or >= 1")

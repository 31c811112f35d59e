"""The ``data`` section: the user's keys of the data pipeline, declared and checked once.

The run config nests :class:`DataConfig` as its ``data`` section and the loader takes it
as is; what the model and the run decide instead (tile geometry, row layout, micro-batch,
passes) travels beside it as a :class:`~megatron_mpo.data.plan.LoaderPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

from megatron_mpo.data.samples import MAX_IMAGE_PIXELS
from megatron_mpo.data.templates import REFUSED_TEMPLATES, TEMPLATES
from megatron_mpo.data.tile_settings import check_data_tiling
from megatron_mpo.errors import UserError
from megatron_mpo.settings import allowed, one_of, positive, setting


def _template_names() -> tuple:
    return tuple(sorted(TEMPLATES))


@dataclass
class DataConfig:
    """Preference pairs: shards, reference values, tokenisation and loading.

    ``max_tiles`` is the per-sample tile budget (a sample's ``max_dynamic_patch``, set by
    make_shards from the meta file, can lower it, never raise it), split across the images
    of a multi-image sample. ``template`` and the tiling keys (``dynamic_tiling``,
    ``thumbnail``, ``min_tiles``, ``max_tiles``) null are the model's own: the trainer
    resolves them (``training.data_setup.loader_data``, :mod:`.tile_settings`) before the
    loader reads them. ``shards`` may also
    be a list of shard URLs (the reference tool reads one shard at a time).
    """

    shards: Optional[Union[str, List[str]]] = setting(
        None, "shards from `megatron-mpo shards`: a dir with index.json, a brace pattern, an http(s) URL (or "
        "`pipe:`, see `allow_pipe_sources`)", required=True)
    ref_logps: Optional[str] = setting(None, "dir of reference sidecars written by `megatron-mpo reference` "
                                       "with this config", required=True)
    on_missing_ref: str = setting("warn", "shards without a reference sidecar: `warn` names them at start-up "
                                  "and refuses when they hold over 10% of the pairs, `skip` names them and "
                                  "trains without them, `error` refuses any; a pair without a value is "
                                  "skipped (counted `missing_ref`) unless `error`",
                                  choices=("warn", "skip", "error"))
    max_length: int = setting(8192, "tokens per pair (image tokens included); longer prompts are "
                              "dropped, responses cut")
    max_tiles: Optional[int] = setting(None, "most image tiles per sample (plus a thumbnail when tiled); null: "
                                       "the checkpoint's `max_dynamic_patch`, else 6")
    min_tiles: Optional[int] = setting(None, "fewest tiles an image is cut into; null: the checkpoint's "
                                       "`min_dynamic_patch`, else 1")
    thumbnail: Optional[bool] = setting(None, "add a thumbnail of the whole image after its tiles (when it has "
                                        "more than one); null: the checkpoint's `use_thumbnail`, else true")
    dynamic_tiling: Optional[bool] = setting(None, "cut images into tiles (false: each image is one tile, "
                                             "resized); null: the checkpoint's `dynamic_image_size`, else true")
    max_image_pixels: int = setting(MAX_IMAGE_PIXELS, "most pixels (width x height) of one image, read from its "
                                    "header: a larger one is skipped as `bad_image` before it is decoded "
                                    "(a small file can decode to gigabytes); 64e6 is 8000 x 8000")
    template: Optional[str] = setting(None, "chat template; null: the model's own", choices=_template_names)
    system_message: Optional[str] = setting(None, "system message of every prompt; null: the template's own; "
                                            "`thinking`: InternVL3.5's thinking-mode (R1) prompt")
    num_workers: int = setting(2, "loader worker processes per rank (0: load in the training process)")
    shuffle_buffer: int = setting(1000, "samples each worker shuffles over (0: shard order only)")
    seed: int = setting(1234, "seed of the shard and sample order")
    allow_pipe_sources: bool = setting(False, "allow `pipe:` shard sources (they run a shell command); "
                                       "http(s) shards are fetched in-process either way")
    allow_outside_index: bool = setting(False, "let an index.json name shards outside its own folder "
                                        "(absolute paths, `..`, symlinks out, `file:` URLs)")
    allow_changed_data: bool = setting(False, "resume although the shards differ from those the checkpoint "
                                       "consumed (index sha256 / sizes): the data position restarts at "
                                       "epoch 0 of the new shards; otherwise such a resume is refused")
    packing: Optional[bool] = setting(None, "packed rows: each pair's prompt shared by both responses, "
                                      "several pairs per row; null: on for the local spec, off for "
                                      "transformer_engine (FlashAttention on plain rows; not yet measured "
                                      "against FlexAttention on a GPU)")
    pairs_per_row: Optional[int] = setting(None, "packed rows: most pairs per row (first-fit within "
                                           "`max_length` over each micro-batch); null: as many as fit; "
                                           "a longer pair gets a row of its own")
    balance: bool = setting(True, "balance each step's cost over the data-parallel ranks: every rank reads "
                            "ahead from its own shards, the ranks share the pairs' costs (model FLOPs) and "
                            "each trains the pairs a common plan gives it (cheap ranks may take more); the "
                            "step keeps `train.global_batch` pairs and the micro-batch count. Off: every "
                            "rank takes the next pairs as they come. No effect at one data-parallel rank")
    balance_lookahead: int = setting(32, "`balance`: pairs each rank buffers beyond its share of a step "
                                     "(more choice, better balance; each holds its decoded image tiles)")

    def validate(self) -> None:
        """Raise :class:`UserError` on the first bad value (the run config calls this)."""
        if self.max_length is None or self.max_length < 2:
            raise UserError(f"data.max_length must be >= 2, got {self.max_length!r}")
        check_data_tiling(self)
        positive("data.max_image_pixels", self.max_image_pixels)
        if self.pairs_per_row is not None:
            positive("data.pairs_per_row", self.pairs_per_row)
        one_of("data.on_missing_ref", self.on_missing_ref, allowed(self, "on_missing_ref"))
        if self.template in REFUSED_TEMPLATES:
            raise UserError(f"data.template {self.template!r}: {REFUSED_TEMPLATES[self.template]}")
        if self.template is not None and self.template not in allowed(self, "template"):
            # Here, not at the first sample: a typo would otherwise show as a fingerprint mismatch.
            raise UserError(f"data.template: unknown template {self.template!r}; "
                            f"known: {', '.join(allowed(self, 'template'))}")
        if self.num_workers < 0:
            raise UserError("data.num_workers must be >= 0")
        if self.shuffle_buffer < 0:
            raise UserError("data.shuffle_buffer must be >= 0")
        if self.balance_lookahead < 0:
            raise UserError(f"data.balance_lookahead must be >= 0, got {self.balance_lookahead}")

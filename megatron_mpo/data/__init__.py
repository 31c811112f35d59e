"""Data: MMPR shards -> tokenized, tiled preference pairs -> PairBatch micro-batches.

Modules: ``templates`` (chat templates), ``tokenizer`` (model-directory tokenizers),
``tiling`` (InternVL dynamic tiling), ``samples`` (sample -> pair), ``collate``
(pairs -> PairBatch), ``pipeline`` (streaming, resumable loader), ``refs`` (reference
log-prob sidecars), ``mmpr`` / ``shard_writer`` (make_shards), ``tiny_tokenizer`` and
``synthetic`` (test helpers).
"""

from megatron_mpo.data.config import DataConfig
from megatron_mpo.data.pipeline import PairLoader, build_loader
from megatron_mpo.data.refs import RefLogps, shard_name, split_sample_id, write_ref_logps
from megatron_mpo.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "PairLoader",
    "RefLogps",
    "Tokenizer",
    "build_loader",
    "load_tokenizer",
    "shard_name",
    "split_sample_id",
    "write_ref_logps",
]

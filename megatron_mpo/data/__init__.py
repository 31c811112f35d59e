"""Data: MMPR shards -> tokenized, tiled preference pairs -> PairBatch micro-batches.

Modules: ``config`` (the run config's ``data`` section), ``plan`` (what the model and the
run decide: tile geometry, rows, micro-batch, passes), ``templates`` (chat templates),
``tokenizer`` (model-directory tokenizers), ``tiling`` (InternVL dynamic tiling),
``samples`` (sample -> pair), ``lengths`` (token lengths of a sample of the shards and
what max_length does to them), ``collate`` (pairs -> PairBatch), ``pipeline`` (streaming,
resumable loader), ``streams`` (what each stream reads, and its replay), ``consumed`` (what an epoch consumed and which data it was, for
resumes at another layout), ``refs`` (reference log-prob sidecars), ``mmpr`` /
``shard_writer`` (make_shards), ``tiny_tokenizer`` and ``synthetic`` (test helpers).
"""

from megatron_mpo.data.config import DataConfig
from megatron_mpo.data.pipeline import PairLoader, build_loader, bundle_states
from megatron_mpo.data.plan import LoaderPlan
from megatron_mpo.data.refs import RefLogps, shard_name, split_sample_id, write_ref_logps
from megatron_mpo.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "LoaderPlan",
    "PairLoader",
    "RefLogps",
    "Tokenizer",
    "build_loader",
    "bundle_states",
    "load_tokenizer",
    "shard_name",
    "split_sample_id",
    "write_ref_logps",
]

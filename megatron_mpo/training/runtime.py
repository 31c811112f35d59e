"""Glue between the run config and the components (model, data, schedules).

Shared by the trainer and the reference tool so both build the same model chunks, the
same tokenizer and the same data pipeline from one config.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_mpo import platform
from megatron_mpo.config import RunConfig
from megatron_mpo.conversion.megatron_dir import MODEL_CONFIG_FILE
from megatron_mpo.errors import UserError
from megatron_mpo.parallel import Layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- model -----------------------------------------------------------------------------


def model_config(cfg: RunConfig):
    """The InternVL architecture: from the init checkpoint, else from a preset."""
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.models.presets import get_preset

    if cfg.model.init:
        path = Path(cfg.model.init) / MODEL_CONFIG_FILE
        if not path.is_file():
            raise UserError(
                f"model.init {cfg.model.init} has no {MODEL_CONFIG_FILE}: point it at a directory "
                "written by tools/convert_hf_to_megatron.py or tools/init_checkpoint.py"
            )
        return InternVLConfig.from_json(path.read_text())
    return get_preset(cfg.model.preset)


def check_precision(cfg: RunConfig) -> None:
    """FP8 / Transformer Engine / bf16 choices the machine must support (one-line errors)."""
    from megatron_mpo.models.specs import check_backend

    check_backend(cfg.model.spec, cfg.precision.fp8)
    if cfg.precision.fp8 == "mxfp8" or cfg.precision.fp8_recipe == "mxfp8" and cfg.precision.fp8:
        platform.require_gpu_feature("the mxfp8 FP8 recipe", min_capability=(10, 0))


def build_model_chunks(cfg: RunConfig, model_config, layout: Layout) -> list:
    """This rank's model chunk(s) (several with the interleaved pipeline schedule)."""
    from megatron.core import parallel_state

    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.training.optim import freeze

    dtype = DTYPES[cfg.precision.dtype]
    chunks = []
    vp = cfg.parallel.virtual_pipeline or 1
    layers = cfg.parallel.pipeline_layers
    total, parts = model_config.language.num_layers, cfg.parallel.pipeline * vp
    if layers is None and vp > 1 and total % parts == 0:
        layers = [total // parts] * parts  # interleaved: an explicit even split (build_model refuses uneven ones)
    for vp_stage in range(vp):
        if cfg.parallel.virtual_pipeline:
            parallel_state.set_virtual_pipeline_model_parallel_rank(vp_stage)
        chunk = build_model(
            model_config,
            spec=cfg.model.spec,
            fp8=cfg.precision.fp8,
            params_dtype=dtype,
            pipeline_layers=layers,
            sequence_parallel=cfg.parallel.sequence,
            recompute=cfg.model.recompute,
            # Packed pair rows need an explicit mask; plain rows let TE pick a causal kernel.
            attention_mask="arbitrary" if cfg.data.packing else "causal",
            vp_stage=vp_stage if cfg.parallel.virtual_pipeline else None,
        )
        # Micro-batches differ in length: pipeline stages exchange shapes first.
        chunk.config.variable_seq_lengths = True
        if cfg.parallel.virtual_pipeline:
            # The interleaved schedule sends activations forward and gradients backward in
            # the same exchange. Batched p2p posts them as [send prev, recv prev, send next,
            # recv next] on every rank; with 2 pipeline ranks prev == next, so the two
            # messages between the same pair of ranks can be matched to the wrong receives
            # (seen on gloo: micro-batches 3+ got gradients as activations). Separate sends
            # and receives, ordered by rank parity, match them one to one for any size.
            chunk.config.overlap_p2p_comm = True
            chunk.config.batch_p2p_comm = False
        chunk.config.pipeline_dtype = dtype
        freeze(chunk, cfg.model.freeze)
        chunks.append(chunk)
    if cfg.parallel.virtual_pipeline:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


def resolve_resume(cfg: RunConfig, manager) -> Optional[Path]:
    """The checkpoint to resume from: checkpoint.load (a path or ``auto``), else none."""
    from megatron_mpo.training.checkpoint import CheckpointManager

    load = cfg.checkpoint.load
    if load is None:
        return None
    if manager is None:
        manager = CheckpointManager(Path(load).absolute().parent)
    return manager.resolve(load)


def forward_backward_func():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


def run_schedule(schedule, forward_step, chunks: list, micro_batches: list, pad_id: int, *, forward_only: bool):
    """One call of megatron-core's schedule over ``micro_batches`` (trainer and reference tool).

    With several chunks (interleaved schedule) every chunk reads the micro-batches through
    its own iterator, and all are padded to one length: that schedule sends one fixed
    activation shape between stages. Padding is causal and unlabelled, so log-probs do not
    change.
    """
    from megatron.core import parallel_state

    from megatron_mpo.batch import pad_to_length

    seq_len = max(b.input_ids.shape[1] for b in micro_batches)
    real = len(micro_batches)
    if len(chunks) > 1:
        micro_batches = [pad_to_length(b, seq_len, pad_id) for b in micro_batches]
        # That schedule runs whole groups of pipeline-size micro-batches. The trainer's
        # step size is checked up front; a forward-only tail is topped up with repeats
        # whose results are dropped below.
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if len(micro_batches) % pp:
            if not forward_only:
                raise UserError(f"{len(micro_batches)} micro-batches is not a multiple of the pipeline size {pp}")
            micro_batches += [micro_batches[-1]] * (pp - len(micro_batches) % pp)
    results = schedule(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=max(b.input_ids.shape[0] for b in micro_batches),
        forward_only=forward_only,
    )
    return results[:real] if results else results


# ---- data ------------------------------------------------------------------------------


def tokenizer(cfg: RunConfig):
    from megatron_mpo.data import load_tokenizer

    source = cfg.model.tokenizer or cfg.model.init
    if not source:
        raise UserError("set model.tokenizer (a directory with tokenizer.json or tokenizer.model)")
    return load_tokenizer(source)


# The chat template each released InternVL2 model was trained with.
PRESET_TEMPLATES = {
    "InternVL2-1B": "Hermes-2",
    "InternVL2-2B": "internlm2-chat",
    "InternVL2-8B": "internlm2-chat",
    "InternVL2-26B": "internlm2-chat",
    "InternVL2-40B": "Hermes-2",
    "InternVL2-76B": "Hermes-2",
}


def default_template(model_config) -> str:
    """The model's own chat template: by InternVL2 name, else by LLM family (InternVL2.5 style)."""
    if model_config.name in PRESET_TEMPLATES:
        return PRESET_TEMPLATES[model_config.name]
    return "internlm2-chat" if model_config.language.family == "internlm2" else "internvl2_5"


def data_config(cfg: RunConfig, model_config, *, for_reference: bool = False):
    """The data pipeline's settings; the reference tool reads shards in order, once."""
    from megatron_mpo.data import DataConfig

    d = cfg.data
    if not d.shards:
        raise UserError("set data.shards (a shard directory with index.json, a brace pattern or URL)")
    return DataConfig(
        shards=d.shards,
        ref_logps=None if for_reference else d.ref_logps,
        on_missing_ref=d.on_missing_ref,
        max_length=d.max_length,
        max_tiles=d.max_tiles,
        template=d.template or default_template(model_config),
        num_workers=0 if for_reference else d.num_workers,
        shuffle_buffer=0 if for_reference else d.shuffle_buffer,
        shuffle_shards=not for_reference,
        seed=d.seed,
        micro_batch=cfg.train.micro_batch,
        image_size=model_config.vision.image_size,
        tokens_per_tile=model_config.tokens_per_tile,
        pad_multiple=16 if cfg.precision.fp8 else 1,  # TE FP8 GEMMs need multiples of 16
        layout=packing_layout(cfg),
        epochs=1 if for_reference else None,
        # Training micro-batches all hold micro_batch pairs (equal weight per micro-batch);
        # the reference tool must see every sample.
        drop_last=not for_reference,
    )


def packing_layout(cfg: RunConfig) -> str:
    """Shared-prompt packing needs an attention backend that takes an arbitrary mask."""
    return "packed" if cfg.data.packing else "unpacked"


def build_loader(cfg: RunConfig, model_config, tok, layout: Layout):
    from megatron_mpo.data import build_loader as build

    if not cfg.data.ref_logps:
        raise UserError(
            "set data.ref_logps: MPO needs reference log-probs; compute them with "
            "tools/precompute_ref_logps.py first"
        )
    return build(data_config(cfg, model_config), tok, dp_rank=layout.data_rank, dp_size=layout.data)


def check_reference_values(cfg: RunConfig, model_config) -> None:
    """Refuse to train against reference values computed with other settings."""
    from megatron_mpo import reference

    if cfg.data.ref_logps:
        reference.check_fingerprint(cfg.data.ref_logps, reference.fingerprint(cfg, model_config))


def shard_total(cfg: RunConfig) -> Optional[int]:
    """Pairs in the shard set according to its index.json (None when unknown)."""
    from megatron_mpo.data.shardlist import read_index_total

    return read_index_total(cfg.data.shards)


def micro_batches_per_step(cfg: RunConfig, layout: Layout) -> int:
    per_step = cfg.train.micro_batch * layout.data
    if cfg.train.global_batch % per_step:
        raise UserError(
            f"train.global_batch {cfg.train.global_batch} is not a multiple of micro_batch "
            f"{cfg.train.micro_batch} x data-parallel size {layout.data}"
        )
    count = cfg.train.global_batch // per_step
    if cfg.parallel.virtual_pipeline and count % cfg.parallel.pipeline:
        raise UserError(
            f"the interleaved schedule needs micro-batches per step ({count} = global_batch / "
            f"(micro_batch x data-parallel size)) to be a multiple of parallel.pipeline "
            f"({cfg.parallel.pipeline}); change train.global_batch or drop parallel.virtual_pipeline"
        )
    return count


def total_steps(cfg: RunConfig, layout: Layout) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    total = shard_total(cfg)
    if total is None:
        raise UserError("train.epochs needs a shard index.json with sample counts; set train.steps instead")
    return max(1, int(math.floor(cfg.train.epochs * total / cfg.train.global_batch)))


# ---- bookkeeping -----------------------------------------------------------------------


class StepCounter:
    """Counts pairs and token positions drawn by the forward step during one step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pairs = 0
        self.tokens = 0
        self.scored = 0  # response tokens: the output layer runs on these only
        self.tiles = 0

    def add(self, batch) -> None:
        # The forward step reports each micro-batch once (from the first model chunk).
        self.pairs += batch.num_pairs
        self.tokens += batch.num_tokens()
        self.scored += int(batch.response_mask().sum())
        self.tiles += int(batch.pixel_values.shape[0])


def all_ranks_true(flag: bool) -> bool:
    value = torch.tensor([0.0 if flag else 1.0], device=platform.device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return float(value) == 0.0


def mpo_state(mpo, layout: Layout) -> dict:
    """The running reward mean lives on the last stage; every rank saves the same copy."""
    state = [mpo.state_dict() if layout.is_last_stage else None]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        src = torch.distributed.get_world_size() - 1  # the last global rank is a last-stage rank
        torch.distributed.broadcast_object_list(state, src=src)
    return state[0]


class FlopCounter:
    """Model FLOPs of a step, for MFU against the machine's measured matmul peak.

    The usual "model FLOPs" definition (no recomputation counted): 2 FLOPs per
    multiply-add of every weight matrix touched, plus the attention score / value
    products, times 3 for forward + backward. The LLM is counted per token position of
    the step (padding included), causal attention as half the scores, the output layer
    per scored (response) token, the only positions it runs on; the vision tower
    (patch embedding, InternViT layers with bidirectional attention over patches + class
    token) and the mlp1 projector per image tile. Frozen parts count what they still run:
    a frozen vision tower only its forward, a frozen projector / LLM forward plus the
    input gradients (2x) when something before them trains.
    """

    def __init__(self, model_config, frozen: Sequence[str] = ()) -> None:
        self.cfg = model_config
        self.frozen = set(frozen)
        self._peak: Optional[float] = None

    def _passes(self, part: str) -> int:
        """Forward + backward multiples of ``part``: 3 trained, 2 input-grads only, 1 forward only."""
        order = ("vision", "projector", "language")
        if part not in self.frozen:
            return 3
        earlier_trains = any(p not in self.frozen for p in order[: order.index(part)])
        return 2 if earlier_trains else 1

    def llm_flops_per_token(self, seq_len: int) -> float:
        lang = self.cfg.language
        head_dim = lang.kv_channels
        q_width = lang.num_heads * head_dim
        attn = lang.hidden_size * (q_width + 2 * lang.num_kv_heads * head_dim) + q_width * lang.hidden_size
        mlp = 3 * lang.hidden_size * lang.ffn_hidden_size
        per_layer = 2 * (attn + mlp) + 2 * 2 * seq_len * q_width / 2  # causal: half the scores
        return self._passes("language") * lang.num_layers * per_layer

    def logits_flops_per_token(self) -> float:
        lang = self.cfg.language  # the padded vocabulary is computed too
        return self._passes("language") * 2 * lang.hidden_size * lang.padded_vocab_size

    def vision_flops_per_tile(self) -> float:
        """InternViT + mlp1 FLOPs of one image tile (forward + backward as trained)."""
        vis = self.cfg.vision
        patches = vis.grid**2
        n = patches + 1  # + class token
        width = vis.num_heads * vis.head_dim  # real heads (zero-padded ones are not model FLOPs)
        embed = 2 * 3 * vis.patch_size**2 * vis.hidden_size * patches
        linear = 2 * n * (vis.hidden_size * 3 * width + width * vis.hidden_size
                          + 2 * vis.hidden_size * vis.ffn_hidden_size)
        scores = 2 * 2 * n * n * width  # Q K^T and A V, bidirectional
        tower = embed + vis.num_layers * (linear + scores)
        hidden = self.cfg.language.hidden_size
        projector = 2 * self.cfg.tokens_per_tile * (self.cfg.projector_input_size * hidden + hidden * hidden)
        return self._passes("vision") * tower + self._passes("projector") * projector

    def step_flops(self, tokens: float, seq_len: int, tiles: float = 0, scored: Optional[float] = None) -> float:
        """``scored`` tokens get logits (default: all ``tokens``)."""
        scored = tokens if scored is None else scored
        return (tokens * self.llm_flops_per_token(seq_len) + scored * self.logits_flops_per_token()
                + tiles * self.vision_flops_per_tile())

    def peak(self) -> float:
        """Measured matmul FLOP/s of one process on this device (cached)."""
        if self._peak is None:
            self._peak = measure_matmul_peak()
        return self._peak

    def mfu(self, tokens: float, seconds: float, world_size: int, seq_len: int = 1024, tiles: float = 0,
            scored: Optional[float] = None) -> float:
        if seconds <= 0 or tokens <= 0:
            return 0.0
        achieved = self.step_flops(tokens, seq_len, tiles, scored) / seconds
        return achieved / (self.peak() * world_size)


def measure_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square fp32/bf16 matmul on this process's device (best of ``repeats``)."""
    dev = platform.device()
    dtype = torch.bfloat16 if platform.current().is_cuda else torch.float32
    # Fixed operands: drawing random ones would move the training RNG streams.
    a = torch.full((size, size), 0.5, device=dev, dtype=dtype)
    b = torch.full((size, size), 0.25, device=dev, dtype=dtype)
    a @ b  # warm-up: thread pool start / kernel selection are not the peak
    best = float("inf")
    for _ in range(repeats):
        platform.synchronize()
        start = time.perf_counter()
        a @ b
        platform.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best

"""From the run config to the data side: tokenizer, chat template, what the loader reads
(the ``data`` section, its template resolved) and how (a LoaderPlan of the model's and the
run's decisions), the loader, and the reference values it joins.

Shared by the trainer and the reference tool, so both tokenise, tile, pad and pack alike.
"""

from __future__ import annotations

from typing import Optional

from megatron_mpo.config import RunConfig
from megatron_mpo.data.config import DataConfig
from megatron_mpo.data.plan import LoaderPlan
from megatron_mpo.errors import UserError
from megatron_mpo.parallel import Layout
from megatron_mpo.training import precision
from megatron_mpo.training.row_layout import pad_multiple, packing_layout

__all__ = [
    "tokenizer",
    "default_template",
    "model_template",
    "run_template",
    "describe_template",
    "run_tiling",
    "describe_tiling",
    "loader_data",
    "loader_plan",
    "build_loader",
    "reference_fingerprint",
    "check_reference_values",
    "shard_total",
]


def tokenizer(cfg: RunConfig):
    from megatron_mpo.data import load_tokenizer

    source = cfg.model.tokenizer or cfg.model.init
    if not source:
        raise UserError("set model.tokenizer (a directory with tokenizer.json or tokenizer.model)")
    if not cfg.model.tokenizer:
        from megatron_mpo.training.model_dir import tokenizer_source

        try:  # a training checkpoint as model.init: the tokenizer of its run's model dir
            source = str(tokenizer_source(source))
        except UserError:
            pass
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


def model_template(model_config) -> tuple[str, str]:
    """(the model's own chat template, where it came from).

    ``model_config.json``'s ``template`` (read from the checkpoint's files at conversion);
    model dirs written before it existed keep the old rule, so their reference values stay
    valid: by InternVL2 preset name, else by LLM family.
    """
    from megatron_mpo.data.templates import family_template

    if model_config.template:
        return model_config.template, "from model_config.json"
    if model_config.name in PRESET_TEMPLATES:
        return PRESET_TEMPLATES[model_config.name], f"model_config.json has none: by the name {model_config.name}"
    family = model_config.language.family
    return family_template(family), f"model_config.json has none: by the {family} LLM"


def default_template(model_config) -> str:
    """The model's own chat template (see :func:`model_template`)."""
    return model_template(model_config)[0]


def run_template(cfg: RunConfig, model_config) -> tuple[str, str]:
    """(the chat template this run uses, where it came from): ``data.template`` wins."""
    if cfg.data.template:
        return cfg.data.template, "data.template"
    return model_template(model_config)


def describe_template(cfg: RunConfig, model_config) -> str:
    """For the start-up line: ``internvl2_5 (from model_config.json)``."""
    name, source = run_template(cfg, model_config)
    return f"{name} ({source})"


def run_tiling(cfg: RunConfig, model_config):
    """(the tiling this run uses, where each value came from): ``data.*`` wins, else what the
    checkpoint states, else the defaults (:mod:`megatron_mpo.data.tile_settings`)."""
    from megatron_mpo.data.tile_settings import resolve_tiling, stated_tiling

    return resolve_tiling(cfg.data, stated_tiling(model_config))


def describe_tiling(cfg: RunConfig, model_config) -> str:
    """For the start-up banner: the run's tiling and where each value came from."""
    from megatron_mpo.data.tile_settings import describe_tiling as describe

    return describe(*run_tiling(cfg, model_config))


def loader_data(cfg: RunConfig, model_config, *, for_reference: bool = False) -> DataConfig:
    """The ``data`` section as the loader reads it: the chat template and the tiling resolved
    (``data.*`` or the model's own); the reference pass reads without reference values,
    workers or shuffle."""
    import dataclasses

    if not cfg.data.shards:
        raise UserError("set data.shards (a shard directory with index.json, a brace pattern or URL)")
    tiling = dataclasses.asdict(run_tiling(cfg, model_config)[0])
    data = dataclasses.replace(cfg.data, template=run_template(cfg, model_config)[0], **tiling)
    if for_reference:
        data = dataclasses.replace(data, ref_logps=None, num_workers=0, shuffle_buffer=0)
    return data


def loader_plan(cfg: RunConfig, model_config, *, for_reference: bool = False) -> LoaderPlan:
    """What the model and the run decide about the loader's rows and passes; the reference
    tool reads the shards in order, once."""
    plan = precision.reference_precision(cfg) if for_reference else precision.training_precision(cfg)
    return LoaderPlan(
        image_size=model_config.vision.image_size,
        tokens_per_tile=model_config.tokens_per_tile,
        micro_batch=cfg.train.micro_batch,
        pad_multiple=pad_multiple(cfg, plan),
        layout=packing_layout(cfg),
        epochs=1 if for_reference else None,
        # Training micro-batches all hold micro_batch pairs (equal weight per micro-batch);
        # the reference tool must see every sample.
        drop_last=not for_reference,
        shuffle_shards=not for_reference,
    )


def build_loader(cfg: RunConfig, model_config, tok, layout: Layout):
    """This rank's training micro-batches: balanced steps (``data.balance``, several
    data-parallel ranks), else the loader's micro-batches as they come."""
    from megatron_mpo.data import build_loader as build

    if not cfg.data.ref_logps:
        raise UserError(
            "set data.ref_logps: MPO needs reference log-probs; compute them with "
            "megatron-mpo reference first"
        )
    loader = build(loader_data(cfg, model_config), loader_plan(cfg, model_config), tok, dp_rank=layout.data_rank,
                   dp_size=layout.data)
    if not cfg.data.balance or layout.data == 1:
        return loader
    from megatron_mpo.data.balanced_loader import BalancedLoader
    from megatron_mpo.training.flops import FlopCounter

    counter = FlopCounter(model_config, frozen=cfg.model.freeze, fp8=cfg.precision.fp8 is not None)
    micro_batches = cfg.train.global_batch // (cfg.train.micro_batch * layout.data)  # schedule.micro_batches_per_step
    return BalancedLoader(loader, counter.pair_costs(packing_layout(cfg) == "packed"), cfg.train.global_batch,
                          micro_batches, cfg.data.balance_lookahead, _gather_rows(layout.data_group))


def _gather_rows(group):
    """All-gather one equal-length list of floats per rank of ``group``, in rank order."""
    import torch

    from megatron_mpo.platform import collective_device

    def gather(row: list) -> list:
        mine = torch.tensor(row, dtype=torch.float64, device=collective_device(group))
        rows = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(rows, mine, group=group)
        return [r.tolist() for r in rows]

    return gather


def reference_fingerprint(cfg: RunConfig, model_config) -> dict:
    """The settings this run's reference values depend on: what the reference tool writes
    into each sidecar and the trainer expects there (``data.refs.fingerprint``)."""
    from megatron_mpo.data.refs import fingerprint

    if not cfg.model.init:
        raise UserError("reference values need model.init: the initial policy checkpoint")
    return fingerprint(cfg.model.init, cfg.model.tokenizer or cfg.model.init,
                       loader_data(cfg, model_config, for_reference=True),
                       loader_plan(cfg, model_config, for_reference=True),
                       precision.reference_precision(cfg).fingerprint())


def check_reference_values(cfg: RunConfig, model_config) -> Optional[str]:
    """Refuse to train on reference values that are damaged, stale (their shard changed) or
    computed with other settings: every sidecar is checked before step one. Shards without
    a sidecar are named (returned: a warning line) or refused (``data.on_missing_ref``,
    :mod:`megatron_mpo.training.missing_refs`).

    Rank 0 reads them (a large shard set has thousands) and every rank raises its verdict.
    """
    import torch

    from megatron_mpo.data.refs import check_sidecars
    from megatron_mpo.data.shardlist import expand_shards
    from megatron_mpo.training import missing_refs

    if not cfg.data.ref_logps:
        return None
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    verdict = [None, None]  # (refusal, warning)
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            urls = expand_shards(cfg.data.shards, cfg.data.allow_outside_index)
            coverage = check_sidecars(cfg.data.ref_logps, reference_fingerprint(cfg, model_config), urls)
            verdict[1] = missing_refs.verdict(cfg.data.on_missing_ref, cfg.data.ref_logps, coverage)
        except UserError as exc:
            verdict[0] = str(exc)
    if distributed:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise UserError(verdict[0])
    return verdict[1]


def shard_total(cfg: RunConfig) -> Optional[int]:
    """Pairs in the shard set according to its index.json (None when unknown)."""
    from megatron_mpo.data.shardlist import read_index_total

    return read_index_total(cfg.data.shards)


def loader_checkpoint_state(loader, layout: Layout) -> dict:
    """Every data-parallel rank's loader position, gathered for ``common.json``: a resume at
    any layout needs all of them (collective over the data-parallel group)."""
    import torch

    from megatron_mpo.data import bundle_states

    mine = loader.state_dict()
    shared = {k: mine.pop(k) for k in ("identity", "base")}  # the same on every rank: not gathered
    states = [None] * layout.data
    torch.distributed.all_gather_object(states, mine, group=layout.data_group)
    return bundle_states([{**states[0], **shared}, *states[1:]])


def resume_loader(loader, common: dict, cfg: RunConfig, checkpoint) -> str:
    """Put ``loader`` where the checkpoint's data position says (exactly at the same layout,
    the rest of the epoch at another); one line saying what happened. Collective."""
    import torch

    saved = common.get("data")
    if saved is None:
        if not cfg.data.allow_changed_data:
            raise UserError(f"checkpoint {checkpoint} records no data position (written by an older megatron_mpo); "
                            "set data.allow_changed_data: true to restart the data at epoch 0")
        return "the checkpoint records no data position: the data restarts at epoch 0"
    world = torch.distributed.get_world_size()

    def gather(part: object) -> list:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, part)
        return parts

    return loader.resume(saved, share=(torch.distributed.get_rank(), world), gather=gather,
                         allow_changed_data=cfg.data.allow_changed_data)

"""From the run config to this rank's model chunks (trainer, reference tool)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_mpo.config import RunConfig
from megatron_mpo.errors import UserError
from megatron_mpo.parallel import Layout
from megatron_mpo.training.model_dir import MODEL_CONFIG_FILE
from megatron_mpo.training.perf_settings import PerfSettings, for_run
from megatron_mpo.training.precision import PrecisionPlan, training_precision
from megatron_mpo.training.row_layout import attention_kind, packing_layout

__all__ = ["model_config", "start_parallel", "build_model_chunks", "with_run_aux_loss_coef"]


def start_parallel(cfg: RunConfig) -> Layout:
    """Start torch.distributed and megatron-core's groups from ``cfg.parallel``: this
    process's place in the run's layout (the trainer and the reference tool alike)."""
    from megatron_mpo import parallel

    p = cfg.parallel
    return parallel.initialize(p.tensor, p.pipeline, p.virtual_pipeline, seed=cfg.train.seed,
                               device=cfg.train.device, expert=p.expert, timeout_minutes=p.timeout_minutes)


def model_config(cfg: RunConfig):
    """The InternVL architecture: from the init checkpoint, else from a preset."""
    from megatron_mpo.models.presets import get_preset

    if cfg.model.init:
        # A model dir, or a training checkpoint (its run's model.init names the architecture):
        # the next MPO round of the pair pipeline starts from the last round's checkpoint.
        from megatron_mpo.training.model_dir import read_model_config

        try:
            return read_model_config(cfg.model.init)
        except UserError:
            raise UserError(f"model.init {cfg.model.init} has no {MODEL_CONFIG_FILE}: point it at a directory written "
                            "by megatron-mpo convert or megatron-mpo init, or at a training "
                            "checkpoint") from None
    return get_preset(cfg.model.preset)


def with_run_aux_loss_coef(cfg: RunConfig, model_config):
    """The architecture with the run's load-balancing coefficient (``mpo.router_aux_loss_coef``;
    null keeps the model's own), so the model builder applies its one rule to it."""
    coef = cfg.mpo.router_aux_loss_coef
    if not model_config.language.is_moe or coef is None:
        return model_config
    language = dataclasses.replace(model_config.language, router_aux_loss_coef=float(coef))
    return dataclasses.replace(model_config, language=language)


def build_model_chunks(cfg: RunConfig, model_config, layout: Layout, plan: Optional[PrecisionPlan] = None,
                       speed: Optional[PerfSettings] = None) -> list:
    """This rank's model chunk(s) (several with the interleaved pipeline schedule), on the
    platform's device. ``plan``: the precision to build for (default: training's; the
    reference tool passes its own). ``speed``: the run's speed settings (default: a
    forward-only run's, as the reference tool's)."""
    from megatron.core import parallel_state

    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.training.optim import freeze

    plan = plan or training_precision(cfg)
    speed = speed or for_run(layout, model_config, training=False)
    chunks = []
    vp = cfg.parallel.virtual_pipeline or 1
    layers = cfg.parallel.pipeline_layers
    total, parts = model_config.language.num_layers, cfg.parallel.pipeline * vp
    if layers is None and vp > 1 and total % parts == 0:
        layers = [total // parts] * parts  # interleaved: an explicit even split (build_model refuses uneven ones)
    arch = with_run_aux_loss_coef(cfg, model_config)
    for vp_stage in range(vp):
        if cfg.parallel.virtual_pipeline:
            parallel_state.set_virtual_pipeline_model_parallel_rank(vp_stage)
        chunk = build_model(
            arch,
            spec=cfg.model.spec,
            fp8=plan.fp8,
            fp8_recipe=plan.fp8_recipe,
            params_dtype=plan.torch_dtype,
            pipeline_layers=layers,
            sequence_parallel=cfg.parallel.sequence,
            recompute=cfg.model.recompute,
            drop_path_rate=cfg.model.drop_path_rate,
            # Packed pair rows need an explicit mask; plain rows let TE pick a causal kernel.
            attention_mask="arbitrary" if packing_layout(cfg) == "packed" else "causal",
            attention=attention_kind(cfg),
            vp_stage=vp_stage if cfg.parallel.virtual_pipeline else None,
            aux_loss_convention=cfg.mpo.router_aux_loss_convention,
            language_overrides=speed.language_overrides(),
            model_overrides=speed.model_overrides(),
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
        chunk.config.pipeline_dtype = plan.torch_dtype
        freeze(chunk, cfg.model.freeze)
        chunks.append(chunk)
    if cfg.parallel.virtual_pipeline:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks

"""Start-up checks that need no model: run before process groups and the model exist.

A wrong shard path, missing reference values, an unknown template or a global batch that
does not split over the data-parallel ranks used to surface only after the process groups
were up and the model had loaded (a minute on the tiny model, far longer on a real one).
Everything here reads the config, ``model_config.json``, the tokenizer, the shard index
and the sidecars; the parallel layout comes from torchrun's environment (``WORLD_SIZE``).

Each failure is one :class:`~megatron_mpo.errors.UserError` line. The full sidecar check
reads every sidecar, so only global rank 0 runs it (torchrun stops the others when it
exits); every other check is cheap and runs on every rank. Rank 0 also measures the
lengths of a small sample of pairs and warns when ``data.max_length`` would cut many
responses (:mod:`megatron_mpo.training.length_check`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from megatron_mpo import platform
from megatron_mpo.config import RunConfig
from megatron_mpo.errors import UserError
from megatron_mpo.parallel import Layout
from megatron_mpo.training import data_setup, model_setup, precision, row_layout, schedule

__all__ = ["check_training", "check_reference", "launch_layout"]


def check_training(cfg: RunConfig) -> tuple:
    """Everything the trainer can check before building a model; returns the model config
    and the run's total steps (the trainer reuses both)."""
    _check_output_dirs(cfg)
    model_config, tok = _check_common(cfg)
    _check_flex_trains_here(cfg)
    layout = launch_layout(cfg)
    schedule.micro_batches_per_step(cfg, layout)
    steps = schedule.total_steps(cfg, layout)
    if not cfg.data.ref_logps:
        raise UserError("set data.ref_logps: MPO needs reference log-probs; compute them with "
                        "megatron-mpo reference first")
    if _is_rank_zero():
        warning = data_setup.check_reference_values(cfg, model_config)  # shards without a sidecar
        if warning:
            print(f"warning: {warning}", flush=True)
        from megatron_mpo.training.heldout import check_eval_values

        check_eval_values(cfg, model_config)  # held-out sidecars: every one there and sound
        _warn_lengths(cfg, model_config, tok)
    return model_config, steps


def _check_flex_trains_here(cfg: RunConfig) -> None:
    """FlexAttention has no backward on CPU (torch 2.13): refuse before building anything."""
    if not platform.current().is_cuda and row_layout.attention_kind(cfg) == "flex":
        raise UserError("model.attention=flex cannot train on a CPU (torch has no FlexAttention backward "
                        "there); use model.attention=sdpa (same result), or flex on a GPU")


def _check_output_dirs(cfg: RunConfig) -> None:
    """The checkpoint and log locations really take a file. Config validation only asks
    ``os.access`` of their nearest existing folder, which says yes to root for ``/proc``;
    the first save then failed with a false "no space" line. Every rank writes checkpoint
    shards, only rank 0 logs. The folders are created (the trainer would create them anyway)."""
    if cfg.checkpoint.save:
        _probe_writable("checkpoint.save", Path(cfg.checkpoint.save))
    if _is_rank_zero():
        if cfg.logging.metrics:
            _probe_writable("logging.metrics", Path(cfg.logging.metrics).parent)
        if cfg.logging.tensorboard:
            _probe_writable("logging.tensorboard", Path(cfg.logging.tensorboard))


def _probe_writable(name: str, folder: Path) -> None:
    """Create ``folder`` and a file in it, then remove the file; one line if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"{name}: {folder} cannot be created or written ({exc.strerror or exc}); "
                        "choose a folder this process can create files in") from None


def check_reference(cfg: RunConfig):
    """Everything the reference tool can check before building a model; returns the model config."""
    from megatron_mpo.training.heldout import eval_run_config

    model_config, tok = _check_common(cfg)
    launch_layout(cfg)
    heldout = eval_run_config(cfg)  # the held-out shards' values are computed in the same launch
    if heldout is not None:
        _check_shards(heldout)
    if _is_rank_zero():
        for run in (cfg, heldout) if heldout is not None else (cfg,):
            _check_existing_sidecars(run, model_config)
        _warn_lengths(cfg, model_config, tok)
    return model_config


def _warn_lengths(cfg: RunConfig, model_config, tok) -> None:
    """One line when data.max_length would cut many responses (a small sample, decoding no image)."""
    from megatron_mpo.training.length_check import check_lengths

    warning = check_lengths(cfg, model_config, tok)
    if warning:
        print(f"warning: {warning}", flush=True)


def launch_layout(cfg: RunConfig) -> Layout:
    """The layout rank 0 of this launch will get (process groups need not exist yet): the
    processes left over by tensor x pipeline are data parallelism (the layout's rules were
    checked with the model, see :func:`_check_common`)."""
    world = _world_size()
    data = world // (cfg.parallel.tensor * cfg.parallel.pipeline)
    return Layout(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline, data=data, tensor_rank=0,
                  pipeline_rank=0, data_rank=0, virtual_pipeline=cfg.parallel.virtual_pipeline,
                  expert=cfg.parallel.expert)


def _check_common(cfg: RunConfig) -> tuple:
    """Device and precision, model dir, tokenizer, shards and template; the model config and tokenizer."""
    platform.setup(cfg.train.device)
    _check_torch_compile(cfg)
    precision.check_precision(cfg)
    if cfg.model.init and not Path(cfg.model.init).is_dir():
        raise UserError(f"model.init {cfg.model.init} does not exist: point it at a model directory written by "
                        "megatron-mpo convert or megatron-mpo init")
    model_config = model_setup.model_config(cfg)
    cfg.parallel.check(model_config, _world_size())  # every layout rule, before any process group
    tok = data_setup.tokenizer(cfg)
    _check_shards(cfg)
    from megatron_mpo.data.templates import get_template

    get_template(data_setup.loader_data(cfg, model_config).template)
    return model_config, tok


def _check_torch_compile(cfg: RunConfig) -> None:
    """Where torch.compile cannot run on the GPU (no C compiler for Triton): FlexAttention,
    compiled there, is refused; megatron-core's jit fusions are off (the model builder asks
    the platform too), said in one line."""
    problem = platform.torch_compile_problem()
    if problem is None:
        return
    if row_layout.attention_kind(cfg) == "flex":
        other = "model.attention=sdpa" if cfg.model.spec != "transformer_engine" else \
            "model.attention=sdpa, or data.packing=false (plain rows on TE's attention)"
        raise UserError(f"model.attention=flex needs torch.compile on the GPU, which cannot run here: {problem}; "
                        f"install a C compiler (gcc) or point CC at one, or use {other}")
    if _is_rank_zero():
        print(f"warning: torch.compile cannot run here ({problem}): megatron-core's jit fusions "
              "(bias-dropout-add, bias-SwiGLU) are off (same results, somewhat slower); install gcc or point "
              "CC at a C compiler to turn them on", flush=True)


def _check_shards(cfg: RunConfig) -> None:
    """The shard set lists (index readable, local shards present) and names no refused source."""
    from megatron_mpo.data.shardlist import list_shards, refuse_pipes

    if not cfg.data.shards:
        raise UserError("set data.shards (a shard directory with index.json, a brace pattern or URL)")
    refuse_pipes(list_shards(cfg.data.shards, cfg.data.allow_outside_index), cfg.data.allow_pipe_sources)


def _check_existing_sidecars(cfg: RunConfig, model_config) -> None:
    """Sidecars already in ``data.ref_logps`` are sound and of this run's settings; stale
    ones (their shard changed) and missing ones are left for the tool to compute."""
    from megatron_mpo.data.refs import StaleSidecar, check_sidecar, shard_contents, shard_name, sidecar_path
    from megatron_mpo.data.shardlist import expand_shards

    expected = None
    for url, content in shard_contents(expand_shards(cfg.data.shards, cfg.data.allow_outside_index)).items():
        path = sidecar_path(cfg.data.ref_logps, shard_name(url))
        if not os.path.exists(path):
            continue
        expected = expected or data_setup.reference_fingerprint(cfg, model_config)
        try:
            check_sidecar(path, expected, content)
        except StaleSidecar:
            pass


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE")


def _is_rank_zero() -> bool:
    """Global rank 0, or a process group already exists (its checks agree across ranks)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    return _env_int("RANK", 0) == 0


def _env_int(name: str, default: int = 1) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not a whole number (set by torchrun)") from None

"""Training checkpoints on megatron-core ``dist_checkpointing``.

On-disk layout of ``save_dir``::

    latest                      text: name of the newest complete checkpoint ("step_000000123")
    step_000000123/             one complete checkpoint (only ever appears by an atomic rename)
        metadata.json, common.pt, __*.distcp, ...   the dist_checkpointing tree
        common.json             {"format", "step", "world_size", "tensor", "pipeline", "data",
                                 "virtual_pipeline", "expert", "has_optimizer",
                                 "common": <caller's dict>}
        rank_00000.pt ...       per-rank extras (RNG states): tensors and
                                JSON values, torch.save'd, read back weights-only
    .tmp_step_000000124/        a save in progress (or a crashed one: removed on the next save)

The dist_checkpointing tree holds the model chunks under the state-dict keys ``model``
(one chunk) or ``model0``, ``model1``, ... (virtual pipeline chunks) and the optimizer
under ``optimizer``. Tensor keys inside the tree are the model's own parameter names
(``decoder.layers.0.mlp.linear_fc1.weight``; layer numbers are global, so TP/PP/VPP can
change between save and load) and ``optimizer.*`` for optimizer state. A *model-only*
directory (:func:`save_model_weights`, used by the HF converter) is the same tree without
the optimizer and without ``common.json``, so :func:`load_model_weights` reads either.

A save writes everything into ``.tmp_<name>/``; once every rank is done, rank 0 fsyncs it,
renames it into place and then replaces ``latest``. A crash at any point leaves the previous
checkpoint complete and ``latest`` naming it.

Loads run nothing from the files: every pickle goes through the allow-lists of
:mod:`megatron_mpo.training.safe_load` (a crafted file is refused with a UserError).

The distributed optimizer is saved in the format ``checkpoint.optimizer_format`` names,
recorded in the tree's content metadata; a load follows the saved one. ``reshardable``
(megatron-core's ``fully_reshardable``, the default) gathers each buffer over its
data-parallel group at save and writes Adam state keyed and sharded like the weights, so
it resumes at any TP / PP / EP / VPP / DP layout; it costs a gather and, while saving and
loading, host memory for the whole optimizer state of the rank's model shard.
``dp_reshardable`` (Megatron-LM's default) writes the buffers as they are: no gather, but
it resumes only at the saved TP / PP / EP / VPP (any DP); another one is refused with one
line naming the changed keys. The megatron-core 0.16.1 defects this meets (torch-Adam path,
expert-parallel regrouping) are worked around in :mod:`megatron_mpo.training.optimizer_state`;
its forked file writers are replaced by threads (:mod:`megatron_mpo.training.dcp_writes`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from megatron_mpo.errors import UserError
from megatron_mpo.fileio import TMP_PREFIX, fsync_path, fsync_tree, write_atomic
from megatron_mpo.training import dcp_writes
from megatron_mpo.training.optim import sync_params
from megatron_mpo.training.optimizer_state import (
    load_optimizer_state,
    padded_buffer_state,
    prime_optimizer_state,
    restore_adam_steps,
)

__all__ = [
    "CheckpointManager",
    "load_model_weights",
    "save_model_weights",
    "unwrap_model",
    "is_model_dir",
    "is_training_checkpoint",
    "latest_checkpoint",
]

FORMAT = "megatron_mpo.checkpoint/1"
LATEST = "latest"
COMMON = "common.json"
_STEP_RE = re.compile(r"^step_(\d{9,})$")
_DIST_METADATA = "metadata.json"  # written last by dist_checkpointing.save
# State-dict suffix of ``get_extra_state`` entries (torch's; megatron-core saves them as
# ShardedObjects). A checkpoint may lack them: model dirs are written with the local spec.
EXTRA_STATE_SUFFIX = "_extra_state"

# How model and optimizer turn into sharded state dicts (Megatron-LM's defaults since
# mcore 0.14). ``dp_reshardable`` saves the distributed optimizer's buffers as they are:
# fully parallel, no gather, reshardable across data-parallel size only.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
# ``checkpoint.optimizer_format`` -> megatron-core's sharding type (Megatron-LM's
# ``--dist-ckpt-optim-fully-reshardable``). ``fully_reshardable`` gathers each buffer over
# its data-parallel group at save and writes Adam state in the model's own sharding, so it
# loads at any layout the weights load at.
OPTIMIZER_FORMATS = {"reshardable": "fully_reshardable", "dp_reshardable": "dp_reshardable"}
# The layout keys of common.json whose change a dp_reshardable optimizer cannot follow.
MODEL_PARALLEL_KEYS = ("tensor", "pipeline", "virtual_pipeline", "expert")


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        torch.distributed.barrier()


def _write_file(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def _step_of(path: Path) -> Optional[int]:
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else None


def is_model_dir(path: Path) -> bool:
    """A finished dist_checkpointing tree (training checkpoint or model-only)."""
    return path.is_dir() and not path.name.startswith(TMP_PREFIX) and (path / _DIST_METADATA).is_file()


def is_training_checkpoint(path: Path) -> bool:
    return is_model_dir(path) and (path / COMMON).is_file()


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers: their own ``sharded_state_dict`` would prefix keys."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel
    from megatron.core.transformer.module import Float16Module

    wrappers = (_BaseDataParallel, Float16Module, torch.nn.parallel.DistributedDataParallel)
    while isinstance(chunk, wrappers):
        chunk = chunk.module
    return chunk


def _unwrapped(chunks: Sequence[torch.nn.Module] | torch.nn.Module) -> list[torch.nn.Module]:
    chunks = [chunks] if isinstance(chunks, torch.nn.Module) else list(chunks)
    return [unwrap_model(c) for c in chunks]


def _model_state(chunks: Sequence[torch.nn.Module], metadata: dict) -> dict:
    """The model part of the sharded state dict, keyed like Megatron-LM (model / model0..N)."""
    chunks = _unwrapped(chunks)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=dict(metadata))}
    return {f"model{i}": c.sharded_state_dict(metadata=dict(metadata)) for i, c in enumerate(chunks)}


def _is_extra_state(key: str) -> bool:
    """A module's ``get_extra_state`` entry (e.g. Transformer Engine's fp8 metadata)."""
    return key.endswith(EXTRA_STATE_SUFFIX)


def _first_real_key(keys: Iterable[str]) -> Optional[str]:
    """The first key (sorted) that is not extra state: only extra state may be absent."""
    return min((k for k in keys if not _is_extra_state(k)), default=None)


def _chunk_keys(count: int) -> list[str]:
    """The state-dict keys of ``count`` model chunks (see :func:`_model_state`)."""
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]


def _defuse_extra_state(loaded: dict, count: int, path: Path) -> Optional[str]:
    """Rebuild the chunks' extra state in place from allow-listed readings; the refusal, if any.

    Transformer Engine's ``set_extra_state`` unpickles its extra state itself.
    """
    from megatron_mpo.training.safe_load import defuse_extra_state

    try:
        for name in _chunk_keys(count):
            loaded[name] = defuse_extra_state(loaded[name], f"extra state in {path}")
    except UserError as exc:
        return str(exc)
    return None


def _apply_model_state(chunks: Sequence[torch.nn.Module], state: dict) -> Optional[str]:
    """Copy the loaded tensors into the chunks; returns what did not fit, or None.

    Non-strict so that extra state the checkpoint lacks keeps its built value; any other
    absent or surplus key is still reported.
    """
    chunks = _unwrapped(chunks)
    for name, chunk in zip(_chunk_keys(len(chunks)), chunks):
        result = chunk.load_state_dict(state[name], strict=False)
        if (missing := _first_real_key(result.missing_keys)) is not None:
            return f"the model's {missing} was not loaded"
        if result.unexpected_keys:
            return f"the model has no {sorted(result.unexpected_keys)[0]}"
    return None


def _ensure_writer_queue() -> None:
    """Give megatron-core's torch_dist writer an in-process result queue.

    Left alone, its filesystem writer spawns a ``multiprocessing.Manager`` process per rank
    for a queue its forked bucket writers report on; that process lives as long as the
    trainer, costs each rank a spawn (an interpreter importing the trainer's modules) and,
    when the trainer is killed, lingers holding the launcher's stdout pipe. Our bucket
    writes are threads of the trainer (:mod:`megatron_mpo.training.dcp_writes`) and saves
    are synchronous, so a thread-safe ``queue.Queue`` carries the same results.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dcp_writes.install()  # the writes the queue carries: threads, no fork from the (threaded) trainer


def _save_strategy():
    """torch_dist writer whose model-replica writes are spread across data-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    _ensure_writer_queue()
    strategy = get_default_save_sharded_strategy()
    if parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def sharding_metadata(optimizer_format: str) -> dict:
    """The content metadata a save with ``checkpoint.optimizer_format`` writes."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise UserError(f"checkpoint.optimizer_format={optimizer_format!r} is not valid; "
                        f"choose one of {', '.join(OPTIMIZER_FORMATS)}")
    return {**SHARDING_METADATA, "distrib_optim_sharding_type": OPTIMIZER_FORMATS[optimizer_format]}


def _layout_info() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "world_size": _world(),
        "tensor": ps.get_tensor_model_parallel_world_size(),
        "pipeline": ps.get_pipeline_model_parallel_world_size(),
        "data": ps.get_data_parallel_world_size(),
        "virtual_pipeline": ps.get_virtual_pipeline_model_parallel_world_size(),
        "expert": ps.get_expert_model_parallel_world_size(),
    }


def _saved_layout(info: dict, keys: Iterable[str]) -> dict:
    """The layout a checkpoint was saved at (checkpoints from before EP was recorded: EP 1)."""
    return {k: info.get(k, 1 if k == "expert" else None) for k in keys}


def _model_parallel_change(saved: dict, now: dict) -> str:
    """The model-parallel layout keys that differ, as "tensor 1 -> 2, ..."; "" if none."""
    return ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in MODEL_PARALLEL_KEYS if saved[k] != now[k])


def _commit(tmp: Path, final: Path) -> None:
    """Rank 0: make ``tmp`` durable and move it to ``final`` (replacing an older same-step one)."""
    fsync_tree(tmp)
    aside = None
    if final.exists():  # the same step saved again (e.g. preemption right after a resume)
        aside = final.with_name(f"{TMP_PREFIX}replaced_{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _write_dist_checkpoint(
    tmp: Path, chunks: Sequence[torch.nn.Module], optimizer: Any, extra: Callable[[], None],
    metadata: dict = SHARDING_METADATA,
) -> None:
    """All ranks: write the dist_checkpointing tree (+ ``extra`` files) into a fresh ``tmp``."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()  # the writer expects the directory on every rank
    sync_params(chunks)  # overlap_param_gather: other ranks' shards of the last update
    state = _model_state(chunks, metadata)
    if optimizer is not None:
        # A run whose every step so far was skipped (non-finite) has no Adam state yet.
        prime_optimizer_state(optimizer)
        restore_adam_steps(optimizer)
        with padded_buffer_state(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, metadata=dict(metadata))
    dist_checkpointing.save(
        state, str(tmp), sharded_strategy=_save_strategy(), content_metadata=dict(metadata)
    )
    extra()


def _first_problem_on_any_rank(problem: Optional[str]) -> Optional[str]:
    """Rank-agreed load problem: ranks hold different keys, but all must fail together
    (one rank raising while the others go on would hang them in the next collective)."""
    if _world() == 1:
        return problem
    problems: list[Optional[str]] = [None] * _world()
    torch.distributed.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def _refuse_unreshardable(path: Path, metadata: dict, layout_change: str) -> None:
    """One line naming the changed layout keys when the saved optimizer cannot follow them."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    saved = metadata.get("distrib_optim_sharding_type", "dp_reshardable")
    if layout_change and saved not in DistributedOptimizer.checkpoint_fully_reshardable_formats:
        raise UserError(
            f"optimizer state in {path} was saved as {saved}, which resumes only at the layout it was "
            f"saved at, but {layout_change} here; resume at that layout, or start from its weights only "
            f"with model.init={path} and checkpoint.load unset, or save with checkpoint.optimizer_format=reshardable"
        )


def _load_dist_checkpoint(
    path: Path, chunks: Sequence[torch.nn.Module], optimizer: Any = None, layout_change: str = ""
) -> None:
    """Load model chunks (any layout) and, if given, the optimizer (in the format it was saved
    in; ``layout_change``: the model-parallel keys that changed since, refused for dp_reshardable)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_mpo.training import safe_load

    sharded_strategy, common_strategy = safe_load.load_strategies()
    common = common_strategy.load_common(str(path))
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    state = _model_state(chunks, metadata)
    if optimizer is not None:
        _refuse_unreshardable(path, metadata, layout_change)
        prime_optimizer_state(optimizer)
        with padded_buffer_state(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=dict(metadata))
    try:
        # RETURN_UNEXPECTED: keys the checkpoint lacks are dropped from the request and
        # returned (megatron-core calls them "unexpected"); surplus checkpoint keys are fine.
        loaded, _, absent = dist_checkpointing.load(
            state, str(path), sharded_strategy=sharded_strategy, common_strategy=common_strategy,
            strict=StrictHandling.RETURN_UNEXPECTED,
        )
    except (CheckpointingException, CheckpointException) as exc:  # the latter is a BaseException
        cause = next(iter(getattr(exc, "failures", {}).values()), (exc, None))[0]
        if isinstance(cause, UserError):  # a file refused inside DCP's reader
            raise UserError(str(cause)) from exc
        message = " ".join(str(cause).split())[:400] or type(cause).__name__  # EOFError() has no text
        raise UserError(f"cannot load {path} into this model (other architecture?): {message}") from exc
    refused = _first_problem_on_any_rank(_defuse_extra_state(loaded, len(chunks), path))
    if refused is not None:
        raise UserError(refused)
    absent_key = _first_real_key(absent)  # absent extra state keeps its built value
    if absent_key is not None:
        problem = f"the checkpoint has no {absent_key}"
    else:
        problem = _apply_model_state(chunks, loaded)
    problem = _first_problem_on_any_rank(problem)
    if problem is not None:
        raise UserError(f"cannot load {path} into this model (other architecture?): {problem}")
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])


# --------------------------------------------------------------------------------------
# model-only checkpoints (converter output, initial weights)
# --------------------------------------------------------------------------------------


def save_model_weights(
    path: str | Path, chunks: Sequence[torch.nn.Module], extra_files: Optional[dict[str, bytes | str]] = None
) -> Path:
    """Write a model-only dist_checkpointing dir atomically (``path`` appears only when complete).

    ``extra_files`` (name -> content) land next to the tree, e.g. a config or tokenizer
    file from the converter. Collective: call on every rank.
    """
    path = Path(path).absolute()
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    if is_training_checkpoint(path):
        raise UserError(f"{path} is a training checkpoint; choose another output directory")
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)

    def extra() -> None:
        if _rank() == 0:
            for name, content in (extra_files or {}).items():
                _write_file(tmp / name, content)

    _write_dist_checkpoint(tmp, chunks, None, extra)
    _barrier()
    if _rank() == 0:
        _commit(tmp, path)
    _barrier()
    return path


def load_model_weights(path: str | Path, chunks: Sequence[torch.nn.Module], optimizer: Any = None) -> None:
    """Load weights only, from a training checkpoint or a model-only dir, at any TP/PP layout.

    Pass an optimizer that already exists so its fp32 master copies follow the new weights.
    """
    path = Path(path)
    if not is_model_dir(path):
        raise UserError(f"{path} is not a complete checkpoint (no dist_checkpointing {_DIST_METADATA})")
    _load_dist_checkpoint(path, chunks)
    if optimizer is not None:
        optimizer.reload_model_params()
    _barrier()


# --------------------------------------------------------------------------------------
# training checkpoints
# --------------------------------------------------------------------------------------


def _complete_in(save_dir: Path) -> list[Path]:
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if _step_of(p) is not None and is_training_checkpoint(p)]
    return sorted(found, key=lambda p: _step_of(p))


def _latest_in(save_dir: Path) -> Optional[Path]:
    try:
        name = (save_dir / LATEST).read_text().strip()
    except OSError:
        name = ""
    if name and _STEP_RE.match(name) and is_training_checkpoint(save_dir / name):
        return save_dir / name
    found = _complete_in(save_dir)
    return found[-1] if found else None


def latest_checkpoint(save_dir: str | Path) -> Optional[Path]:
    """The checkpoint a run's ``checkpoint.save`` dir stands for (``latest``, else the newest
    complete step), without constructing a manager (which would clear a running save)."""
    return _latest_in(Path(save_dir))


def remove_checkpoint(path: Path) -> None:
    """Delete a complete checkpoint: renamed out of the way first, so it is never seen half-deleted."""
    doomed = path.with_name(f"{TMP_PREFIX}deleted_{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class CheckpointManager:
    """Saves, finds and loads the training checkpoints of one run directory.

    Construct it at startup on every rank (it removes the leftovers of a crashed save).
    """

    def __init__(self, save_dir: str | Path, keep_last: Optional[int] = None,
                 optimizer_format: str = "reshardable"):
        if keep_last is not None and keep_last < 1:
            raise UserError(f"keep_last must be at least 1 (or unset), got {keep_last}")
        self.save_dir = Path(save_dir).absolute()
        self.keep_last = keep_last
        self.metadata = sharding_metadata(optimizer_format)  # how saves shard the optimizer
        # Test hook: called on every rank with the tmp dir after the tensors are written but
        # before the checkpoint is complete (used to simulate a crash mid-save).
        self._before_commit: Optional[Callable[[Path], None]] = None
        if _rank() == 0:
            self._remove_stale()

    # ---- finding -----------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete step directories, oldest first."""
        return _complete_in(self.save_dir)

    def latest(self) -> Optional[Path]:
        """The checkpoint named by ``latest``, else the newest complete step directory."""
        return _latest_in(self.save_dir)

    def resolve(self, load: Optional[str | Path]) -> Optional[Path]:
        """Which checkpoint to resume from: ``None`` -> none; ``"auto"`` -> latest here, if any.

        An explicit path must be a complete training checkpoint (or a run directory that has one).
        """
        if load is None:
            return None
        if str(load) == "auto":
            return self.latest()
        path = Path(load).absolute()
        if not path.exists():
            raise UserError(f"checkpoint {path} does not exist")
        if is_training_checkpoint(path):
            return path
        if path.is_dir() and _step_of(path) is None and not path.name.startswith(TMP_PREFIX):
            run_latest = _latest_in(path)  # a run directory: its newest checkpoint
            if run_latest is not None:
                return run_latest
        raise UserError(
            f"checkpoint {path} is incomplete or not a training checkpoint (needs {COMMON} and "
            f"{_DIST_METADATA}; a model-only dir is for initial weights, not resuming)"
        )

    # ---- saving ------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: Sequence[torch.nn.Module],
        optimizer: Any,
        common: dict,
        per_rank: dict,
    ) -> Path:
        """Write checkpoint ``step`` atomically; collective, call on every rank.

        ``common`` must be JSON-able and equal on all ranks (rank 0 writes it);
        ``per_rank`` (tensors and JSON values only: it is read back weights-only) is
        written separately for every rank.
        """
        from megatron_mpo.training.safe_load import non_plain_part

        if (bad := non_plain_part(per_rank)) is not None:
            raise TypeError(f"per_rank must hold only tensors and JSON values, not {bad}")
        name = step_dir_name(step)
        tmp = self.save_dir / f"{TMP_PREFIX}{name}"
        final = self.save_dir / name
        info = {"format": FORMAT, "step": step, **_layout_info(), "has_optimizer": optimizer is not None}
        common_bytes = json.dumps({**info, "common": common}, indent=1, sort_keys=True).encode()
        if _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale()

        def extra() -> None:
            with open(tmp / f"rank_{_rank():05d}.pt", "wb") as f:
                torch.save(per_rank, f)
                f.flush()
                os.fsync(f.fileno())

        _write_dist_checkpoint(tmp, model, optimizer, extra, self.metadata)
        if self._before_commit is not None:
            self._before_commit(tmp)
        _barrier()  # every rank has written its shards and extras
        if _rank() == 0:
            _write_file(tmp / COMMON, common_bytes)
            _commit(tmp, final)
            write_atomic(self.save_dir / LATEST, (name + "\n").encode())
            self._prune(keep=final)
        _barrier()
        return final

    def _remove_stale(self) -> None:
        """Delete the tmp dirs of crashed saves or prunes (rank 0; no save may be running)."""
        if not self.save_dir.is_dir():
            return
        for p in self.save_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def _prune(self, keep: Path) -> None:
        """Remove the oldest complete checkpoints beyond ``keep_last`` (never ``keep``)."""
        if self.keep_last is None:
            return
        found = self.complete_checkpoints()
        excess = len(found) - self.keep_last
        for old in found:
            if excess <= 0:
                break
            if old == keep:
                continue
            remove_checkpoint(old)
            excess -= 1
        fsync_path(self.save_dir)

    # ---- loading -----------------------------------------------------------------------

    def load(
        self, path: str | Path, model: Sequence[torch.nn.Module], optimizer: Any = None
    ) -> tuple[dict, Optional[dict]]:
        """Restore model and optimizer from a training checkpoint, at any layout (the optimizer
        at another tensor / pipeline / expert / virtual-pipeline one only if saved reshardable).

        Returns the saved ``common`` dict and this rank's ``per_rank`` extras, or None for
        the extras when the layout changed (restart RNG streams from the step).
        """
        path = Path(path)
        if not is_training_checkpoint(path):
            raise UserError(f"checkpoint {path} is incomplete or not a training checkpoint")
        info = json.loads((path / COMMON).read_text())
        now = _layout_info()
        saved = _saved_layout(info, now)
        if optimizer is not None and not info.get("has_optimizer"):
            raise UserError(f"checkpoint {path} holds no optimizer state, so it cannot be resumed; start from its "
                            f"weights only with model.init={path} and checkpoint.load unset")
        _load_dist_checkpoint(path, model, optimizer, _model_parallel_change(saved, now))
        per_rank, refused = None, None
        rank_file = path / f"rank_{_rank():05d}.pt"
        if saved == now and rank_file.is_file():
            from megatron_mpo.training.safe_load import load_plain

            try:
                per_rank = load_plain(rank_file)
            except UserError as exc:  # raised on every rank, not only on the one whose file it is
                refused = str(exc)
        refused = _first_problem_on_any_rank(refused)
        if refused is not None:
            raise UserError(refused)
        _barrier()
        return info["common"], per_rank

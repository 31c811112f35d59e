"""Reading checkpoint files without running code from them.

Checkpoints and model dirs come from other machines and people, and a pickle runs whatever
its ``__reduce__`` names while it is read. Every file a load unpickles goes through an
allow-list here:

* ``.metadata`` (torch DCP's index of the tensors, a plain pickle): an unpickler that
  resolves only DCP's metadata classes, ``torch.Size`` and torch dtypes / layouts;
* ``common.pt`` (megatron-core's common state), DCP's object items inside ``*.distcp``
  (megatron-core ``ShardedObject`` s: optimizer param groups, ``_extra_state``) and the
  per-rank extras ``rank_NNNNN.pt``: ``torch.load(weights_only=True)`` (tensors and plain
  data only); the per-rank extras must further be tensors and JSON values;
* ``_extra_state`` that Transformer Engine's ``set_extra_state`` would ``pickle.loads``
  (a uint8 tensor of pickled fp8 metadata): an unpickler that resolves only tensors,
  dtypes and TE's recipe types; TE then gets bytes pickled here from that result.

megatron-core's ``torch_dist`` load strategy builds its DCP reader with a module function
and DCP's default planner unpickles object items with ``weights_only=False``, so
:func:`load_strategies` hands ``dist_checkpointing.load`` strategies that swap in a
restricted reader for the duration of each call.

Imports megatron-core at module level: import this module where a load happens.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import torch
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from megatron_mpo.errors import UserError

__all__ = [
    "defuse_extra_state",
    "load_plain",
    "load_strategies",
    "load_torch",
    "non_plain_part",
    "unpickle_dcp_metadata",
]

_DCP = "torch.distributed.checkpoint"
# Everything torch DCP's ``.metadata`` pickle names (torch 2.13, megatron-core 0.16.1 writers).
DCP_METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch pickles a torch.layout
    (f"{_DCP}.filesystem", "_StorageInfo"),
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )),
    *((f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData",
    )),
})
_PLAIN_TYPES = (str, int, float, bool, type(None))
TE_RECIPE_MODULE = "transformer_engine.common.recipe"
# Besides torch dtypes and TE recipe types: what a pickled CPU tensor names.
EXTRA_STATE_GLOBALS = frozenset({
    ("torch", "Size"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),  # a tensor's (empty) backward hooks
})


def _refused(what: str, reason: str) -> UserError:
    return UserError(f"refused to load {what}: {reason} (a damaged or crafted file; nothing in it was run)")


def _unreadable(what: str, exc: BaseException) -> UserError:
    """A truncated or foreign file, in one line rather than a traceback."""
    return UserError(f"cannot load {what}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


def _is_torch_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def _unpickle(unpickler: type[pickle.Unpickler], stream: IO[bytes], what: str) -> Any:
    """``stream`` through an allow-listing ``unpickler``; UserError when it names anything else."""
    try:
        return unpickler(stream).load()
    except pickle.UnpicklingError as exc:
        raise _refused(what, str(exc)) from None
    except UserError:
        raise
    except Exception as exc:
        raise _unreadable(what, exc) from None


# --------------------------------------------------------------------------------------
# torch.save files: common.pt, object items, per-rank extras
# --------------------------------------------------------------------------------------


def _weights_only_reason(exc: BaseException) -> str:
    """One line for torch's multi-paragraph weights-only refusal (which suggests weights_only=False)."""
    named = re.search(r"GLOBAL (\S+)", str(exc))
    if named:
        return f"it names {named.group(1)}, which is not checkpoint data"
    return "it holds objects other than tensors and plain data"


def load_torch(source: str | os.PathLike | IO[bytes], what: str, map_location: Optional[str] = None) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, else a UserError."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(what, _weights_only_reason(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot read {what}: {exc.strerror or exc}") from None
    except Exception as exc:  # truncated / not a torch file
        raise _unreadable(what, exc) from None


def non_plain_part(obj: Any, where: str = "") -> Optional[str]:
    """Where ``obj`` holds something other than tensors and JSON values, or None if nowhere.

    Exact types: a numpy scalar is a float subclass but would need numpy to unpickle.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_TYPES:
        return None
    if type(obj) is list:
        return next((bad for i, v in enumerate(obj) if (bad := non_plain_part(v, f"{where}[{i}]"))), None)
    if type(obj) is dict:
        if any(type(k) is not str for k in obj):
            return f"{where or 'the top'} (a non-string key)"
        return next((bad for k, v in obj.items() if (bad := non_plain_part(v, f"{where}.{k}"))), None)
    return f"{where or 'the top'} ({type(obj).__name__})"


def load_plain(path: Path) -> Any:
    """A file of tensors and JSON values (per-rank extras), refusing anything else."""
    obj = load_torch(path, str(path), map_location="cpu")
    bad = non_plain_part(obj)
    if bad is not None:  # before megatron_mpo stored these as plain data, they were pickled
        raise UserError(
            f"refused to load {path}: it holds more than tensors and JSON values, at {bad} (crafted, or "
            "pickled by an older megatron_mpo: remove the rank_*.pt files to resume with fresh RNG streams)"
        )
    return obj


def _torch_bytes(obj: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# --------------------------------------------------------------------------------------
# torch DCP: the .metadata pickle and the object items
# --------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only :data:`DCP_METADATA_GLOBALS` and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if _is_torch_dtype(module, name) or (module, name) in DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not checkpoint metadata")


def unpickle_dcp_metadata(stream: IO[bytes], what: str) -> Metadata:
    """DCP's ``.metadata`` through the allow-list (DCP itself uses plain ``pickle.load``)."""
    metadata = _unpickle(_MetadataUnpickler, stream, what)
    if not isinstance(metadata, Metadata):
        raise _refused(what, f"it holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class _RestrictedObjects:
    """A DCP load planner whose object items are unpickled weights-only first.

    DCP's ``load_bytes`` calls ``torch.load(weights_only=False)``; it gets the object
    re-serialised from what the weights-only load accepted, never the file's own bytes.
    """

    def __init__(self, planner: LoadPlanner, where: str):
        self._planner = planner
        self._where = where

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = load_torch(value, f"{read_item.dest_index.fqn} in {self._where}")
        self._planner.load_bytes(read_item, _torch_bytes(obj))


class RestrictedFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata and the object items read through allow-lists."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = unpickle_dcp_metadata(stream, str(path))
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        return super().read_data(plan, _RestrictedObjects(planner, str(self.path)))


class _CachedRestrictedReader(CachedMetadataFileSystemReader, RestrictedFileSystemReader):
    """megatron-core's metadata-caching reader over the restricted one."""


def _restricted_reader(checkpoint_dir: str | Path, cache_metadata: bool = False) -> FileSystemReader:
    """Stands in for megatron-core's ``_get_filesystem_reader`` (same signature)."""
    reader = _CachedRestrictedReader if cache_metadata else RestrictedFileSystemReader
    return reader(checkpoint_dir)


@contextlib.contextmanager
def _restricted_readers() -> Iterator[None]:
    """megatron-core's torch_dist strategy gets its DCP reader from a module function: swap it."""
    previous = mcore_torch_strategy._get_filesystem_reader
    mcore_torch_strategy._get_filesystem_reader = _restricted_reader
    try:
        yield
    finally:
        mcore_torch_strategy._get_filesystem_reader = previous


def _with_restricted_readers(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _restricted_readers():
            return method(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------
# Transformer Engine extra state (fp8 metadata): pickled bytes that TE itself unpickles
# --------------------------------------------------------------------------------------


def _storage_from_bytes(data: bytes) -> Any:
    """Stands in for ``torch.storage._load_from_bytes``, which loads with weights_only=False."""
    return load_torch(io.BytesIO(data), "a tensor storage in extra state")


@functools.cache
def _te_recipe_classes() -> tuple[type, ...]:
    """The classes of TE's recipe module (recipe dataclasses, their enums), if TE is installed."""
    try:
        recipe = importlib.import_module(TE_RECIPE_MODULE)
    except ImportError:
        return ()
    return tuple(c for c in vars(recipe).values() if isinstance(c, type) and c.__module__ == TE_RECIPE_MODULE)


def _te_recipe_type(module: str, name: str) -> bool:
    return module == TE_RECIPE_MODULE and any(c.__name__ == name for c in _te_recipe_classes())


class _ExtraStateUnpickler(pickle.Unpickler):
    """What TE pickles as extra state: dicts of CPU tensors, plain values and its recipe."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if _is_torch_dtype(module, name) or (module, name) in EXTRA_STATE_GLOBALS or _te_recipe_type(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not Transformer Engine state")


def _defused(value: Any, what: str) -> Any:
    """``value`` rebuilt from an allow-listed reading when TE would unpickle it, else as is.

    TE's ``set_extra_state`` runs ``pickle.loads`` on a uint8 tensor and ``torch.load`` on a
    BytesIO (its 1.x format); it gets bytes pickled here from what the allow-list accepted.
    """
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() > 0:
        obj = _unpickle(_ExtraStateUnpickler, io.BytesIO(value.detach().cpu().numpy().tobytes()), what)
        return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    if isinstance(value, io.BytesIO):
        value.seek(0)
        with torch.serialization.safe_globals(list(_te_recipe_classes())):  # TE 1.x pickled its recipe
            return _torch_bytes(load_torch(value, what))
    return value


def defuse_extra_state(state: dict, what: str) -> dict:
    """A model state dict whose ``_extra_state`` entries no longer carry the file's own pickles."""
    return {k: _defused(v, f"{what}: {k}") if k.endswith("_extra_state") else v for k, v in state.items()}


# --------------------------------------------------------------------------------------
# megatron-core load strategies
# --------------------------------------------------------------------------------------


class RestrictedTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist loader; every method that reads DCP files uses the restricted reader."""

    load = _with_restricted_readers(TorchDistLoadShardedStrategy.load)
    load_tensors_metadata = _with_restricted_readers(TorchDistLoadShardedStrategy.load_tensors_metadata)
    load_sharded_metadata = _with_restricted_readers(TorchDistLoadShardedStrategy.load_sharded_metadata)


class RestrictedCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` weights-only (megatron-core relies on torch's default, which an env var flips).

    Sharded objects never come here: the torch_dist strategy reads them itself.
    """

    def load_common(self, checkpoint_dir: str | Path) -> dict:
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        common = load_torch(path, str(path), map_location="cpu")
        if not isinstance(common, dict):
            raise _refused(str(path), f"it holds a {type(common).__name__}, not megatron-core's common state")
        return common


def load_strategies() -> tuple[RestrictedTorchDistLoadStrategy, RestrictedCommonLoadStrategy]:
    """(sharded, common) strategies for ``dist_checkpointing.load`` that run nothing from the files."""
    return RestrictedTorchDistLoadStrategy(), RestrictedCommonLoadStrategy()

"""Which tiling a run uses, and where each of its four values came from.

InternVL's trainer takes its tiling from the command line (``--dynamic_image_size``,
``--use_thumbnail``, ``--min_dynamic_patch``, ``--max_dynamic_patch``) and writes the values
into the ``config.json`` it saves, so a checkpoint states how it was last trained. The
converter stores them (``model_config.json``, same names; a training checkpoint states what
its run used, :func:`~megatron_mpo.training.model_dir.read_model_config`), and a run takes
them as the defaults of its ``data.*`` keys:

=====================  ======================  ===========================================
``data.*``             checkpoint              without either
=====================  ======================  ===========================================
``dynamic_tiling``     ``dynamic_image_size``  true (false: one tile per image, resized)
``thumbnail``          ``use_thumbnail``       true (a thumbnail after the tiles of a tiled image)
``min_tiles``          ``min_dynamic_patch``   1
``max_tiles``          ``max_dynamic_patch``   6 (per sample; a sample's ``max_dynamic_patch`` lowers it)
=====================  ======================  ===========================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from megatron_mpo.data.tiling import MAX_TILES
from megatron_mpo.errors import UserError

__all__ = ["Tiling", "DEFAULT_TILING", "CHECKPOINT_NAMES", "resolve_tiling", "stated_tiling", "model_tiling",
           "check_data_tiling", "check_stated_tiling", "describe_tiling", "checkpoint_values", "with_tiling",
           "legacy_data_tiling"]


@dataclass(frozen=True)
class Tiling:
    """The four tiling values of a run (``data.*`` names)."""

    dynamic_tiling: bool = True
    thumbnail: bool = True
    min_tiles: int = 1
    max_tiles: int = 6


DEFAULT_TILING = Tiling()  # also what every run used before these were configurable
KEYS = tuple(f.name for f in fields(Tiling))
# data.* name -> the checkpoint's (InternVL config.json / InternVLConfig) name
CHECKPOINT_NAMES = {"dynamic_tiling": "dynamic_image_size", "thumbnail": "use_thumbnail",
                    "min_tiles": "min_dynamic_patch", "max_tiles": "max_dynamic_patch"}
CHECKPOINT = "from the checkpoint"
DEFAULT = "defaults"


def _check_value(key: str, value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(getattr(DEFAULT_TILING, key), bool):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where} must be a whole number >= 1, got {value!r}")
    elif value > MAX_TILES:
        raise UserError(f"{where} must be <= {MAX_TILES}, got {value}")


def check_data_tiling(data: Any) -> None:
    """Refuse a bad ``data.*`` tiling value (the data section's validation calls this)."""
    for key in KEYS:
        _check_value(key, getattr(data, key), f"data.{key}")


def check_stated_tiling(model_config: Any, where: str = "") -> None:
    """Refuse a bad tiling value stated by a checkpoint (``where``: the file's name and a space)."""
    for key, name in CHECKPOINT_NAMES.items():
        _check_value(key, getattr(model_config, name), f"{where}{name}")


def stated_tiling(model_config: Any) -> dict:
    """``{data key: value}`` of what the checkpoint states (None values left out)."""
    out = {key: getattr(model_config, name, None) for key, name in CHECKPOINT_NAMES.items()}
    return {k: v for k, v in out.items() if v is not None}


def resolve_tiling(data: Any, stated: Mapping[str, Any]) -> tuple[Tiling, dict]:
    """(the run's tiling, ``{key: where it came from}``): ``data.<key>`` when set (``data``: the
    data section, or a saved one as a dict), else the checkpoint's value (``stated``, data keys),
    else the default."""
    values, sources = {}, {}
    for key in KEYS:
        mine = data.get(key) if isinstance(data, Mapping) else getattr(data, key, None)
        if mine is not None:
            values[key], sources[key] = mine, f"data.{key}"
        elif stated.get(key) is not None:
            values[key], sources[key] = stated[key], CHECKPOINT
        else:
            values[key], sources[key] = getattr(DEFAULT_TILING, key), DEFAULT
    tiling = Tiling(**values)
    if tiling.dynamic_tiling and tiling.min_tiles > tiling.max_tiles:
        raise UserError(f"min_tiles {tiling.min_tiles} ({_source(sources['min_tiles'])}) is above max_tiles "
                        f"{tiling.max_tiles} ({_source(sources['max_tiles'])}): set data.min_tiles / data.max_tiles")
    return tiling, sources


def model_tiling(model_config: Any) -> Tiling:
    """The tiling a checkpoint states, the defaults filling what it does not."""
    return resolve_tiling(None, stated_tiling(model_config))[0]


def checkpoint_values(tiling: Tiling) -> dict:
    """``tiling`` under the checkpoint's (InternVL ``config.json``) names."""
    return {name: getattr(tiling, key) for key, name in CHECKPOINT_NAMES.items()}


def with_tiling(model_config: Any, tiling: Tiling) -> Any:
    """``model_config`` stating ``tiling`` (in place; returned)."""
    for name, value in checkpoint_values(tiling).items():
        setattr(model_config, name, value)
    return model_config


def _source(source: str) -> str:
    return {CHECKPOINT: "the checkpoint's", DEFAULT: "the default"}.get(source, source)


def describe_tiling(tiling: Tiling, sources: Mapping[str, str]) -> str:
    """For the start-up banner: ``dynamic, 1-6 tiles per sample, thumbnail (dynamic_tiling,
    thumbnail, min_tiles, max_tiles: defaults)``."""
    if not tiling.dynamic_tiling:
        return f"one tile per image (dynamic_tiling: {sources['dynamic_tiling']})"
    thumbnail = "thumbnail" if tiling.thumbnail else "no thumbnail"
    order = [CHECKPOINT] + [f"data.{k}" for k in KEYS] + [DEFAULT]
    groups = [", ".join(k for k in KEYS if sources[k] == src) + f": {src}" for src in order
              if src in sources.values()]
    return f"dynamic, {tiling.min_tiles}-{tiling.max_tiles} tiles per sample, {thumbnail} ({'; '.join(groups)})"


def legacy_data_tiling(data: Optional[Mapping]) -> dict:
    """A saved run config's ``data`` section with the tiling keys older runs did not have
    filled in with what those runs used (the defaults)."""
    data = dict(data or {})
    for key in KEYS:
        data.setdefault(key, getattr(DEFAULT_TILING, key))
    return data

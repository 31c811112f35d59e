"""Reading and writing Hugging Face model directories (no transformers needed).

Reading (:func:`inspect_hf_dir`, :func:`load_hf_weights`):

* ``config.json`` decides the layout: ``InternVLForConditionalGeneration`` /
  ``model_type: internvl`` is the transformers-*native* layout, ``InternVLChatModel`` /
  ``model_type: internvl_chat`` the *original* remote-code layout (``internvl-chat``);
  anything else is refused with one line ("... is a LlamaForCausalLM checkpoint, not
  InternVL").
* Weights come from ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
  ``pytorch_model.bin.index.json`` or ``pytorch_model.bin``, in that order of preference.
  Shards are read one at a time with a progress line each (safetensors memory-maps).

Writing (:func:`write_hf_dir`): everything goes into a temporary sibling directory that is
renamed to the destination only when complete, so an error leaves nothing at the
destination. Weights are safetensors, split at ``max_shard_size`` (with
``model.safetensors.index.json`` when there is more than one file), plus ``config.json``,
``generation_config.json`` (when given) and any companion files (tokenizer, ...).

What the configs inside mean is :mod:`.hf_config`'s business.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from megatron_mpo.errors import UserError
from megatron_mpo.fileio import fsync_path, fsync_tree

__all__ = [
    "NATIVE",
    "ORIGINAL",
    "FORMATS",
    "HFDir",
    "detect_layout",
    "inspect_hf_dir",
    "load_hf_weights",
    "parse_size",
    "check_destination",
    "atomic_output_dir",
    "write_safetensors",
    "write_hf_dir",
    "dominant_dtype",
    "DTYPES",
]

NATIVE = "native"  # transformers InternVLForConditionalGeneration
ORIGINAL = "internvl-chat"  # remote-code InternVLChatModel
FORMATS = (NATIVE, ORIGINAL)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

NATIVE_ARCH = "InternVLForConditionalGeneration"
ORIGINAL_ARCH = "InternVLChatModel"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Log = Callable[[str], None]


# ---- reading --------------------------------------------------------------------------


@dataclass
class HFDir:
    """A Hugging Face InternVL directory, inspected but not loaded."""

    path: Path
    layout: str  # NATIVE | ORIGINAL
    config: dict  # config.json as read
    weight_files: list  # [Path], in reading order
    index: Optional[dict]  # weight_map of a sharded checkpoint (name -> file), else None

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object file; UserError naming ``what`` when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return data


def detect_layout(config: Mapping[str, Any], where: str = "checkpoint") -> str:
    """``native`` / ``internvl-chat`` from a config.json dict; UserError for anything else."""
    archs = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    model_type = config.get("model_type")
    if NATIVE_ARCH in archs or model_type == "internvl":
        return NATIVE
    if ORIGINAL_ARCH in archs or model_type == "internvl_chat":
        return ORIGINAL
    what = archs[0] if archs else (model_type or "unknown-architecture")
    raise UserError(
        f"{where} is a {what} checkpoint, not InternVL "
        f"(expected {NATIVE_ARCH} or {ORIGINAL_ARCH} in config.json)"
    )


def _weight_files(path: Path) -> tuple[list, Optional[dict]]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = path / index_name
        if index_path.is_file():
            index = read_json_object(index_path, "weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index_path} has no weight_map")
            files = list(dict.fromkeys(weight_map.values()))  # first-seen order, unique
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{path} lacks weight shard {missing[0]}{more} listed in {index_name}")
            return [path / f for f in files], dict(weight_map)
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (path / single).is_file():
            return [path / single], None
    raise UserError(
        f"{path} has no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


def inspect_hf_dir(path: str | Path) -> HFDir:
    """Config, layout and weight files of a Hugging Face directory (no tensors read)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"Hugging Face directory {path} does not exist")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{path} has no {CONFIG_FILE}: not a Hugging Face model directory")
    config = read_json_object(config_path, "model config")
    layout = detect_layout(config, str(path))
    files, index = _weight_files(path)
    return HFDir(path=path, layout=layout, config=config, weight_files=files, index=index)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n}"


def _read_one(path: Path) -> dict[str, Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            out = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
            return out
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated / foreign pickle: one line for the user
        message = " ".join(str(exc).split())[:300]
        raise UserError(f"cannot read weights {path}: {message}") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a plain state dict of tensors")
    return loaded


def iter_hf_shards(hf: HFDir, log: Log = print) -> Iterator[dict[str, Tensor]]:
    """The weight files' tensors, one file at a time (progress line per file when sharded)."""
    n = len(hf.weight_files)
    for i, path in enumerate(hf.weight_files, 1):
        if n > 1:
            log(f"reading {path.name} ({i}/{n}, {_human(path.stat().st_size)})")
        tensors = _read_one(path)
        if hf.index is not None:
            # An index may list a tensor in one file only; keep what the index says is there.
            tensors = {k: v for k, v in tensors.items() if hf.index.get(k, path.name) == path.name}
        yield tensors


def load_hf_weights(hf: HFDir, log: Log = print) -> dict[str, Tensor]:
    """Every tensor of the directory (names as stored)."""
    state: dict[str, Tensor] = {}
    for tensors in iter_hf_shards(hf, log):
        for key, value in tensors.items():
            if key in state:
                raise UserError(f"{hf.path}: tensor {key!r} is stored in more than one weight file")
            state[key] = value
    if hf.index is not None:
        missing = sorted(set(hf.index) - set(state))
        if missing:
            raise UserError(f"{hf.path}: tensor {missing[0]!r} listed in the weight index is in no shard")
    return state


def dominant_dtype(state: Mapping[str, Tensor]) -> Optional[torch.dtype]:
    """The floating dtype holding most elements (the checkpoint's dtype), or None."""
    count: dict = {}
    for t in state.values():
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else None


# ---- writing --------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / ``123`` -> bytes."""
    if isinstance(value, int):
        n = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise UserError(f"cannot read size {value!r}; write e.g. 5GB, 500MB or a number of bytes")
        unit = match.group(2).upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
        n = int(float(match.group(1)) * base**power)
    if n <= 0:
        raise UserError(f"size must be positive, not {value!r}")
    return n


def check_destination(out: str | Path) -> Path:
    """Refuse an output path that exists and is not an empty directory (one line)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"output path {out} exists and is not a directory; choose a new one")
        if any(out.iterdir()):
            raise UserError(f"output directory {out} is not empty; choose a new one")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; rename it to ``out`` on success.

    On any error the temporary directory is removed and ``out`` is left as it was.
    """
    out = check_destination(Path(out).absolute())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp_{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(
    state: Mapping[str, Tensor], directory: str | Path, max_shard_size: int | str = "5GB", log: Log = print
) -> list:
    """Write ``state`` as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` +
    ``model.safetensors.index.json`` (shards cut at ``max_shard_size``). Returns the files."""
    from safetensors.torch import save_file

    directory = Path(directory)
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for key in state:
        n = _nbytes(state[key])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    count = len(shards)
    names = [SAFE_SINGLE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    seen_storage: set = set()
    weight_map = {}
    for i, (name, keys) in enumerate(zip(names, shards), 1):
        tensors = {}
        for key in keys:
            t = state[key].detach().contiguous()
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
            if ptr in seen_storage:
                t = t.clone()  # safetensors refuses tensors that share memory
            elif ptr is not None:
                seen_storage.add(ptr)
            tensors[key] = t
            weight_map[key] = name
        if count > 1:
            log(f"writing {name} ({i}/{count})")
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
    if count > 1:
        total = sum(_nbytes(t) for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]


def write_hf_dir(
    out: str | Path,
    config: Mapping[str, Any],
    state: Mapping[str, Tensor],
    *,
    files: Optional[Mapping[str, bytes | str]] = None,
    generation_config: Optional[Mapping[str, Any]] = None,
    max_shard_size: int | str = "5GB",
    log: Log = print,
) -> Path:
    """Write a Hugging Face directory atomically: weights, config.json, generation config
    and ``files`` (name -> content: tokenizer, remote code, ...)."""
    out = Path(out)
    with atomic_output_dir(out) as tmp:
        for name, content in (files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        if generation_config is not None:
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(dict(generation_config), indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        total = sum(_nbytes(t) for t in state.values())
        log(f"writing {len(state)} tensors ({_human(total)}) to {out}")
        write_safetensors(state, tmp, max_shard_size, log)
    return out

"""Megatron model directories: dist_checkpointing weights + model_config.json + tokenizer.

A model directory is what ``model.init`` points at. The weights are a megatron-core
dist_checkpointing tree, which is independent of the parallel layout: written once by a
single process, it loads under any TP / PP (dist_checkpointing reshards on load). The
converter and the preset initialiser write it through :func:`write_model_dir`; the HF
exporter reads it back with :func:`read_model_dir`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional


from megatron_mpo.data.tokenizer import TOKENIZER_FILES
from megatron_mpo.errors import UserError

MODEL_CONFIG_FILE = "model_config.json"


def tokenizer_files(directory: str | Path) -> dict[str, bytes]:
    """The tokenizer files of a model/tokenizer directory (name -> bytes)."""
    directory = Path(directory)
    found = {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}
    if "tokenizer.json" not in found and "tokenizer.model" not in found:
        raise UserError(f"{directory} has no tokenizer.json or tokenizer.model")
    return found


def _single_process_model(config, seed: int = 0):
    """The full (TP=1, PP=1) model in this process (CPU: conversion needs no GPU)."""
    from megatron_mpo import parallel
    from megatron_mpo.models.internvl import build_model

    parallel.initialize(1, 1, seed=seed, device="cpu")
    return build_model(config, spec="local", attention_mask="arbitrary")


def write_model_dir(
    out: str | Path,
    config,
    tokenizer_dir: Optional[str | Path],
    state: Optional[dict] = None,
    extra: Optional[dict] = None,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> Path:
    """Write ``state`` (full megatron names; None = the model's random init) as a model dir.

    Everything lands in a temporary sibling first and appears at ``out`` only when complete.
    """
    from megatron_mpo.training.checkpoint import save_model_weights

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose a new one")
    files = {MODEL_CONFIG_FILE: config.to_json()}
    if tokenizer_dir is not None:
        files.update(tokenizer_files(tokenizer_dir))
    for name, content in (extra or {}).items():
        files[name] = content if isinstance(content, (str, bytes)) else json.dumps(content, indent=1)
    model = _single_process_model(config, seed)
    if state is not None:
        own = model.state_dict()
        missing = sorted(k for k in own if k not in state and not k.endswith("_extra_state"))
        unexpected = sorted(k for k in state if k not in own)
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise UserError(f"converted weights do not fit the model ({what}); is the source the architecture its config says?")
        for key, tensor in state.items():
            if tuple(own[key].shape) != tuple(tensor.shape):
                raise UserError(f"{key}: shape {tuple(tensor.shape)} does not fit the model's {tuple(own[key].shape)}")
        model.load_state_dict({k: v for k, v in state.items()}, strict=False)
    log(f"writing {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {out}")
    if out.exists():
        out.rmdir()  # empty: save_model_weights renames its temp dir into place
    save_model_weights(out, [model], extra_files=files)
    return out


def run_config(ckpt: str | Path) -> dict:
    """The run config a training checkpoint was saved with ({} for a model dir)."""
    common = Path(ckpt) / "common.json"
    if not common.is_file():
        return {}
    return json.loads(common.read_text()).get("common", {}).get("config", {})


def run_init(ckpt: str | Path) -> Optional[Path]:
    """The ``model.init`` a training checkpoint's run started from (None for a model dir)."""
    init = run_config(ckpt).get("model", {}).get("init")
    return Path(init) if init else None


def _run_chain(ckpt: str | Path) -> tuple[Path, list[Path]]:
    """(the model directory behind ``ckpt``, the training checkpoints leading to it, newest first)."""
    path, chain = Path(ckpt), []
    for _ in range(32):  # rounds chain through model.init; a cycle is a damaged checkpoint
        if (path / MODEL_CONFIG_FILE).is_file():
            return path, chain
        init = run_init(path)
        if init is None:
            break
        chain.append(path)
        path = init
    raise UserError(f"{ckpt} has no {MODEL_CONFIG_FILE}: not a megatron_mpo model or training checkpoint")


def model_dir_of(ckpt: str | Path) -> Path:
    """The model directory behind a checkpoint: itself, or the one its run (or the run of
    the checkpoint that run started from: MPO rounds chain) was initialised from."""
    return _run_chain(ckpt)[0]


def _as_trained(config, run_data: dict):
    """``config`` stating the chat template and tiling a run with this ``data`` section used."""
    from megatron_mpo.data.tile_settings import legacy_data_tiling, resolve_tiling, stated_tiling, with_tiling

    data = legacy_data_tiling(run_data)  # runs older than the tiling keys used the defaults
    with_tiling(config, resolve_tiling(data, stated_tiling(config))[0])
    if data.get("template"):
        config.template = data["template"]
    return config


def read_model_config(ckpt: str | Path):
    """The InternVLConfig of a model dir, or of a training checkpoint: its run's model.init's,
    stating the chat template and tiling that run used (what an export writes and the next
    MPO round starts from)."""
    from megatron_mpo.models.config import InternVLConfig

    home, chain = _run_chain(ckpt)
    config = InternVLConfig.from_json((home / MODEL_CONFIG_FILE).read_text())
    for step in reversed(chain):
        config = _as_trained(config, run_config(step).get("data") or {})
    return config.validate()


def follow_latest(ckpt: str | Path, log: Callable[[str], None] = print) -> Path:
    """A run's ``checkpoint.save`` dir (``latest`` + ``step_*``) stands for the checkpoint
    ``latest`` names; a model dir or step dir is itself."""
    from megatron_mpo.training.checkpoint import LATEST, is_model_dir, latest_checkpoint

    ckpt = Path(ckpt)
    if (ckpt / MODEL_CONFIG_FILE).is_file() or is_model_dir(ckpt):
        return ckpt
    newest = latest_checkpoint(ckpt)
    if newest is None:
        if (ckpt / LATEST).exists() or any(ckpt.glob("step_*")):
            raise UserError(f"{ckpt} holds no complete checkpoint (its step_* dirs are unfinished): "
                            "nothing to read")
        return ckpt
    log(f"{ckpt} is a checkpoint save dir: using its latest checkpoint, {newest.name}")
    return newest


def read_model_dir(ckpt: str | Path) -> tuple:
    """(InternVLConfig, full state dict with megatron names) of a model or training checkpoint."""
    from megatron_mpo.training.checkpoint import load_model_weights

    config = read_model_config(ckpt)
    model = _single_process_model(config)
    load_model_weights(Path(ckpt), [model])
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return config, state


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for name, content in tokenizer_files(src).items():
        Path(dst, name).write_bytes(content)


def tokenizer_source(ckpt: str | Path) -> Path:
    """Where a checkpoint's tokenizer lives (model dir itself, or its run's model.init, chained)."""
    path = Path(ckpt)
    for _ in range(32):
        if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            return path
        init = run_init(path)
        if init is None:
            break
        path = init
    raise UserError(f"cannot find the tokenizer of {ckpt}")


def init_model_dir(preset: str, tokenizer_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A randomly initialised preset as a model dir (the demo's and tests' initial policy).

    The vocabulary and the ``<IMG_CONTEXT>`` id come from the tokenizer.
    """
    import dataclasses

    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.models.presets import get_preset

    tok = load_tokenizer(str(tokenizer_dir))
    config = get_preset(preset)
    config.language = dataclasses.replace(config.language, vocab_size=max(tok.vocab_size, 8))
    config.img_context_token_id = tok.img_context_id
    config.validate()
    return write_model_dir(out, config, tokenizer_dir, extra={"init": {"preset": preset, "seed": seed}}, seed=seed)


def remove_partial(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)

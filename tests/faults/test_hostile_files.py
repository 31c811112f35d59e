"""Crafted checkpoint files must not run code when a checkpoint or model dir is loaded.

Checkpoints and model dirs travel between machines and people, and a pickle runs whatever
its ``__reduce__`` names while it is read. Each file of a training checkpoint and of a
model dir that a load unpickles (found by content, not by name) is replaced in turn by a
pickle that would create a marker file: resuming (``CheckpointManager.load``),
``load_model_weights`` and ``read_model_dir`` must refuse it with a one-line UserError,
and the marker must not appear. One crafted object inside an otherwise intact ``.distcp``
file must be refused the same way.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

from megatron_mpo.errors import UserError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip around a pickle
PICKLE_MAGIC = b"\x80"  # pickle protocol 2 and later


class _Hostile:
    """Unpickling this creates ``marker`` (a harmless stand-in for running any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def _model_and_optimizer(seed: int) -> tuple[list[torch.nn.Module], object]:
    """The tiny preset in megatron-core DDP with the distributed Adam, as training builds it."""
    from megatron_mpo import parallel
    from megatron_mpo.config import PrecisionSection, TrainSection
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.optim import build_optimizer, wrap_data_parallel

    parallel.initialize(1, 1, seed=seed, device="cpu")
    model = build_model(get_preset("tiny"), spec="local", attention_mask="arbitrary")
    chunks = wrap_data_parallel([model], PrecisionSection())
    return chunks, build_optimizer(chunks, TrainSection(steps=1), PrecisionSection())


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory) -> dict:
    """A training checkpoint and a model dir of the same tiny model, and the RNG state saved."""
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.checkpoint import CheckpointManager, save_model_weights
    from megatron_mpo.training.rng_state import capture_rng_state

    root = tmp_path_factory.mktemp("hostile")
    chunks, optimizer = _model_and_optimizer(seed=1)
    model_dir = save_model_weights(root / "model", chunks, {"model_config.json": get_preset("tiny").to_json()})
    rng = capture_rng_state()
    draws = _draws()
    loader = {"epoch": 1, "positions": [3, 4], "skip_counts": {"too_long": 2}}
    step = CheckpointManager(root / "run").save(
        1, chunks, optimizer, common={"step": 1}, per_rank={"rng": rng, "loader": loader})
    return {"training": step, "model": model_dir, "loader": loader, "draws": draws}


def _draws() -> tuple:
    """The next numbers of the python, numpy and torch generators (consumes them)."""
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def _pickled_files(directory: Path) -> list[str]:
    """Every file a load may unpickle, by content: plain pickles and torch's zip format."""
    names = [p.name for p in directory.iterdir() if p.is_file()]
    return sorted(n for n in names if (directory / n).read_bytes()[:4].startswith((ZIP_MAGIC, PICKLE_MAGIC)))


def _plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a crafted pickle in the same container format."""
    if path.read_bytes().startswith(ZIP_MAGIC):
        torch.save(_Hostile(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Hostile(marker)))


def _assert_refused(load: Callable[[], object], marker: Path, what: str) -> None:
    with pytest.raises(UserError) as err:
        load()
    assert "\n" not in str(err.value), (what, str(err.value))
    assert not marker.exists(), f"{what}: the crafted pickle ran"


def _tampered_copies(source: Path, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """(file name, checkpoint copy with that one file crafted, marker) for every pickled file."""
    names = _pickled_files(source)
    assert {".metadata", "common.pt"} <= set(names) and any(n.endswith(".distcp") for n in names), names
    for name in names:
        copy = tmp_path / f"{source.name}_{name.strip('.')}"
        shutil.copytree(source, copy)
        marker = tmp_path / f"marker_{name.strip('.')}"
        _plant(copy / name, marker)
        yield name, copy, marker


def test_pristine_checkpoint_resumes_rng_and_loader_exactly(saved):
    from megatron_mpo.training.checkpoint import CheckpointManager
    from megatron_mpo.training.rng_state import restore_rng_state

    chunks, optimizer = _model_and_optimizer(seed=2)
    common, per_rank = CheckpointManager(saved["training"].parent).load(saved["training"], chunks, optimizer)
    assert common == {"step": 1} and per_rank["loader"] == saved["loader"]
    restore_rng_state(per_rank["rng"])
    *numbers, tensor = _draws()
    *expected, expected_tensor = saved["draws"]
    assert numbers == expected and torch.equal(tensor, expected_tensor)


def test_training_checkpoint_with_a_crafted_file_is_refused(saved, tmp_path):
    from megatron_mpo.training.checkpoint import CheckpointManager

    names = _pickled_files(saved["training"])
    assert "rank_00000.pt" in names, names
    chunks, optimizer = _model_and_optimizer(seed=3)
    for name, copy, marker in _tampered_copies(saved["training"], tmp_path):
        _assert_refused(lambda: CheckpointManager(tmp_path).load(copy, chunks, optimizer), marker, name)


def test_model_dir_with_a_crafted_file_is_refused(saved, tmp_path):
    from megatron_mpo.training.model_dir import read_model_dir
    from megatron_mpo.training.checkpoint import load_model_weights

    chunks, _ = _model_and_optimizer(seed=4)
    for name, copy, marker in _tampered_copies(saved["model"], tmp_path):
        _assert_refused(lambda: load_model_weights(copy, chunks), marker, f"load_model_weights {name}")
        _assert_refused(lambda: read_model_dir(copy), marker, f"read_model_dir {name}")


def test_crafted_object_inside_an_intact_distcp_file_is_refused(saved, tmp_path):
    """Overwrite one pickled object (an optimizer one) in place, past the start of its file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_mpo.training.checkpoint import CheckpointManager

    copy = tmp_path / "ckpt"
    shutil.copytree(saved["training"], copy)
    metadata = pickle.loads((copy / ".metadata").read_bytes())  # written by this test: trusted
    objects = [(idx.fqn, info) for idx, info in metadata.storage_data.items()
               if isinstance(metadata.state_dict_metadata[idx.fqn], BytesStorageMetadata)]
    fqn, info = max(objects, key=lambda item: (item[0].startswith("optimizer"), item[1].offset))
    marker = tmp_path / "marker"
    crafted = pickle.dumps(_Hostile(marker))
    assert info.offset > 0 and len(crafted) <= info.length, (fqn, info)
    with open(copy / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(crafted.ljust(info.length, b"\0"))
    chunks, optimizer = _model_and_optimizer(seed=5)
    _assert_refused(lambda: CheckpointManager(tmp_path).load(copy, chunks, optimizer), marker, fqn)


TE_STYLE_MODULE = "vision_projection.layer_norm"


class _PicklesExtraState:
    """Mixin: extra state kept as Transformer Engine keeps fp8 metadata, pickled into uint8."""

    extra: Any = None

    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(pickle.dumps(self.extra)), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.extra = pickle.loads(state.numpy().tobytes())  # what TE's set_extra_state does


def _te_style(seed: int, extra: Any) -> torch.nn.Module:
    """The tiny preset whose TE_STYLE_MODULE carries ``extra`` the way TE does."""
    from megatron_mpo import parallel
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.presets import get_preset

    parallel.initialize(1, 1, seed=seed, device="cpu")
    model = build_model(get_preset("tiny"), spec="local", attention_mask="arbitrary")
    module = model.get_submodule(TE_STYLE_MODULE)
    module.__class__ = type(f"TEStyle{type(module).__name__}", (_PicklesExtraState, type(module)), {})
    module.extra = extra
    return model


def test_crafted_transformer_engine_extra_state_is_refused(world, tmp_path):
    """TE unpickles its extra state itself: a checkpoint's must not reach it unchecked."""
    from megatron_mpo.training.checkpoint import load_model_weights, save_model_weights

    fp8_meta = {"scale_fwd": torch.tensor([2.0, 0.5]), "amax_history_fwd": torch.rand(4, 2, dtype=torch.float64),
                "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True, "pos": (0, 2)}}
    save_model_weights(tmp_path / "benign", [_te_style(1, fp8_meta)])
    marker = tmp_path / "marker"
    save_model_weights(tmp_path / "crafted", [_te_style(1, _Hostile(marker))])

    model = _te_style(2, None)
    load_model_weights(tmp_path / "benign", [model])
    loaded = model.get_submodule(TE_STYLE_MODULE).extra
    assert loaded["extra_fp8_variables"] == fp8_meta["extra_fp8_variables"]
    assert all(torch.equal(loaded[k], fp8_meta[k]) and loaded[k].dtype == fp8_meta[k].dtype
               for k in ("scale_fwd", "amax_history_fwd"))
    _assert_refused(lambda: load_model_weights(tmp_path / "crafted", [model]), marker, "TE-style extra state")


def test_a_save_forks_no_writer_process(world, tmp_path, monkeypatch):
    """megatron-core 0.16.1 forks a writer per bucket from the trainer at every save; a fork
    from a threaded process now and then hangs or dies in the child (a rank then waits
    forever). Saves write from threads of the trainer instead: no fork, same checkpoint."""
    import os

    from megatron_mpo.training.checkpoint import CheckpointManager, load_model_weights

    chunks, optimizer = _model_and_optimizer(seed=3)

    def no_fork():
        raise AssertionError("a checkpoint save forked a process")

    monkeypatch.setattr(os, "fork", no_fork)
    step = CheckpointManager(tmp_path / "run").save(1, chunks, optimizer, common={"step": 1}, per_rank={})
    monkeypatch.undo()
    fresh, _ = _model_and_optimizer(seed=4)
    load_model_weights(step, fresh)
    for a, b in zip(chunks[0].state_dict().values(), fresh[0].state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)

"""Model dirs load into modules whose extra state the checkpoint lacks (Transformer Engine).

The HF converter writes model dirs with the local layer spec. Under the Transformer
Engine spec, modules such as ``TENorm`` add ``_extra_state`` (fp8 metadata) to their state
dict, which megatron-core saves and loads as a ``ShardedObject``. On CPU the same is
done by giving two norms of the tiny model ``get_extra_state`` / ``set_extra_state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_mpo.errors import UserError
from megatron_mpo.training.checkpoint import load_model_weights, save_model_weights

# The modules that carry extra state in these tests (TENorm and the GPT final norm on GPU).
EXTRA_STATE_MODULES = ("vision_projection.layer_norm", "language_model.decoder.final_layernorm")


class _CarriesExtraState:
    """Mixin: a module whose state dict has ``_extra_state``, as TE modules keep fp8 metadata."""

    extra: Any = None

    def get_extra_state(self) -> Any:
        return self.extra

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


def _tiny(seed: int) -> torch.nn.Module:
    """The tiny preset, local spec, initialised from ``seed``."""
    from megatron_mpo import parallel
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.presets import get_preset

    parallel.initialize(1, 1, seed=seed, device="cpu")
    return build_model(get_preset("tiny"), spec="local", attention_mask="arbitrary")


def _with_extra_state(model: torch.nn.Module, tag: str) -> dict[str, dict]:
    """Give the EXTRA_STATE_MODULES extra state (tagged, to tell it apart); returns it by module."""
    built = {}
    for name in EXTRA_STATE_MODULES:
        module = model.get_submodule(name)
        module.__class__ = type(f"ExtraState{type(module).__name__}", (_CarriesExtraState, type(module)), {})
        module.extra = built[name] = {"tag": tag, "scale": torch.tensor([2.0, 0.5])}
    return built


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _assert_same_tensors(expected: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    got = _tensors(model)
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []


def test_local_model_dir_loads_into_modules_with_extra_state(world, tmp_path: Path):
    saved = _tiny(seed=1)
    assert not [k for k in saved.state_dict() if k.startswith(EXTRA_STATE_MODULES) and "_extra" in k]
    save_model_weights(tmp_path / "local", [saved])

    model = _tiny(seed=2)
    built = _with_extra_state(model, "as built")
    assert {f"{name}._extra_state" for name in EXTRA_STATE_MODULES} <= model.state_dict().keys()
    load_model_weights(tmp_path / "local", [model])

    _assert_same_tensors(_tensors(saved), model)
    for name, state in built.items():  # the checkpoint has none: the modules keep their own
        assert model.get_submodule(name).extra is state


def test_extra_state_checkpoint_loads_into_either_model(world, tmp_path: Path):
    saved = _tiny(seed=3)
    _with_extra_state(saved, "saved")
    save_model_weights(tmp_path / "te", [saved])

    local = _tiny(seed=4)  # the checkpoint's extra state is simply not asked for
    load_model_weights(tmp_path / "te", [local])
    _assert_same_tensors(_tensors(saved), local)

    model = _tiny(seed=5)
    _with_extra_state(model, "as built")
    load_model_weights(tmp_path / "te", [model])
    _assert_same_tensors(_tensors(saved), model)
    for name in EXTRA_STATE_MODULES:
        extra = model.get_submodule(name).extra
        assert extra["tag"] == "saved" and torch.equal(extra["scale"], torch.tensor([2.0, 0.5]))


def test_checkpoint_lacking_a_real_tensor_is_refused(world, tmp_path: Path):
    save_model_weights(tmp_path / "local", [_tiny(seed=6)])

    model = _tiny(seed=7)
    _with_extra_state(model, "as built")
    norm = model.get_submodule("vision_projection.layer_norm")
    norm.register_parameter("fp8_weight", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(UserError) as err:
        load_model_weights(tmp_path / "local", [model])
    message = str(err.value)
    assert "vision_projection.layer_norm.fp8_weight" in message, message
    assert "_extra_state" not in message and "\n" not in message, message

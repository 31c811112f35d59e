"""One default and one check per config key: a component's settings are its run-config
section, never a copy with defaults and checks of its own.

The ``data`` section is the loader's :class:`DataConfig`, the ``mpo`` section the loss's
:class:`MPOLossConfig`; what the model and the run decide travels beside the data
section as a :class:`LoaderPlan`, which holds no data key. Every component is built here
from ``RunConfig`` defaults and must carry the sections' values.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from megatron_mpo.config import RunConfig, from_dict
from megatron_mpo.data import DataConfig, LoaderPlan
from megatron_mpo.loss_config import LossWeights, MPOLossConfig
from tests.test_data import _tool

HOMES = {"data": DataConfig, "mpo": MPOLossConfig, "mpo.weights": LossWeights}


def _section(cfg: RunConfig, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_each_component_config_is_its_run_config_section():
    for dotted, component in HOMES.items():
        parent, _, name = dotted.rpartition(".")
        owner = type(_section(RunConfig(), parent)) if parent else RunConfig
        assert typing.get_type_hints(owner)[name] is component, dotted


@pytest.mark.parametrize("dotted", sorted(HOMES))
def test_a_component_built_alone_has_the_run_configs_defaults(dotted):
    """Built with no arguments (as another trainer would), key by key what RunConfig says."""
    component, section = HOMES[dotted](), _section(RunConfig(), dotted)
    assert _names(type(component)) == _names(type(section))
    for name in _names(type(component)):
        assert getattr(component, name) == getattr(section, name), f"{dotted}.{name}"


def test_the_loader_plan_holds_no_config_key_with_a_default_of_its_own():
    """The loader's second argument: the model's and the run's decisions, no data key; the
    one run key it carries (train.micro_batch) has no default there."""
    assert not _names(LoaderPlan) & _names(DataConfig)
    micro_batch = next(f for f in dataclasses.fields(LoaderPlan) if f.name == "micro_batch")
    assert micro_batch.default is dataclasses.MISSING


def test_every_component_built_from_run_config_defaults_carries_the_sections_values(tmp_path):
    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.data.samples import build_pair_builder
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer
    from megatron_mpo.generation.cli import add_model_args
    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training import data_setup

    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"shards": str(tmp_path)}})
    defaults = RunConfig().data
    model_config = get_preset("tiny")
    # The trainer's loader: the data section itself (its template resolved) and the plan.
    data = data_setup.loader_data(cfg, model_config)
    tiling = {"dynamic_tiling": True, "thumbnail": True, "min_tiles": 1, "max_tiles": 6}  # null: the model's (none)
    for name in _names(DataConfig) - {"shards", "template", *tiling}:
        assert getattr(data, name) == getattr(defaults, name), name
    assert data.template == data_setup.run_template(cfg, model_config)[0]
    assert {name: getattr(data, name) for name in tiling} == tiling
    plan = data_setup.loader_plan(cfg, model_config)
    assert (plan.micro_batch, plan.image_size, plan.tokens_per_tile) == (
        cfg.train.micro_batch, model_config.vision.image_size, model_config.tokens_per_tile)
    builder = build_pair_builder(data, load_tokenizer(build_tiny_tokenizer(str(tmp_path / "tok"))),
                                 image_size=plan.image_size, tokens_per_tile=plan.tokens_per_tile)
    assert (builder.max_length, builder.max_image_pixels, builder.system_message) == (
        defaults.max_length, defaults.max_image_pixels, defaults.system_message)
    assert (builder.dynamic_tiling, builder.use_thumbnail, builder.min_tiles, builder.max_tiles) == tuple(
        tiling.values())
    # The loss takes its section as is.
    assert MPOLoss(cfg.mpo).config is cfg.mpo
    # Generation and evaluate.py (add_model_args), and the loader benchmark, cut and tile prompts
    # as the data section's defaults say.
    parser = argparse.ArgumentParser()
    add_model_args(parser, model=False)
    args = parser.parse_args([])
    assert (args.max_length, args.max_tiles) == (defaults.max_length, defaults.max_tiles)
    bench = _tool("bench_loader").parse_args([])
    assert (bench.max_length, bench.max_tiles, bench.shuffle_buffer) == (
        defaults.max_length, defaults.max_tiles, defaults.shuffle_buffer)


@pytest.mark.parametrize("section, key, value, needle", [
    ("mpo", "beta", 0.0, "mpo section: beta must be a positive number"),
    ("data", "max_length", 1, "data.max_length must be >= 2"),
    ("data", "max_tiles", 1000, "data.max_tiles must be <= 256"),
])
def test_a_key_is_checked_where_it_is_declared(section, key, value, needle):
    """The run config's validation is the section's own check (nothing checks a copy later)."""
    from megatron_mpo.errors import UserError

    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"shards": "x", "ref_logps": "y"}, "train": {"steps": 1}})
    cfg.validate()
    bad = dataclasses.replace(getattr(cfg, section), **{key: value})
    with pytest.raises(UserError, match=needle):
        bad.validate()
    with pytest.raises(UserError, match=needle):
        dataclasses.replace(cfg, **{section: bad}).validate()

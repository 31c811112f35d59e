"""One set of layout rules (megatron_mpo.parallel_layout.check_layout), whoever asks.

The run config asks without a model, start-up with the model and torchrun's world size,
the converter without the training-only rule (sequence=None). Each refusal is one line,
and the MoE-under-TP rule reads the same whether the model is known or not.
"""

from __future__ import annotations

import dataclasses

import pytest

from megatron_mpo.config import ParallelSection
from megatron_mpo.errors import UserError
from megatron_mpo.models.presets import get_preset
from megatron_mpo.parallel_layout import check_layout


def _refused(needle: str, *args, **kwargs) -> str:
    with pytest.raises(UserError) as exc:
        check_layout(*args, **kwargs)
    text = str(exc.value)
    assert needle in text and "\n" not in text, text
    return text


def test_rules_without_a_model():
    _refused("parallel.tensor must be a positive number", None, 0)
    _refused("parallel.virtual_pipeline needs parallel.pipeline >= 2", None, 1, 1, virtual_pipeline=2)
    _refused("needs tensor parallel size >= 2", None, 1, sequence=True)
    _refused("pipeline_layers has 3 entries; it needs one per pipeline stage and virtual stage (4)",
             None, 1, 2, virtual_pipeline=2, pipeline_layers=[1, 1, 1])
    _refused("launch a multiple of 4", None, 2, 2, world_size=6)
    _refused("expert-parallel groups of parallel.expert=2", None, 1, 1, 2, world_size=3)
    check_layout(None, 2, 2, 2, sequence=True, virtual_pipeline=2, pipeline_layers=[1, 1, 1, 1], world_size=8)


def test_moe_under_tensor_parallelism_is_one_rule_with_or_without_the_model():
    moe, dense = get_preset("tiny-moe"), get_preset("tiny")
    before = _refused("needs parallel.sequence: true", None, 2, 1, 2)  # expert > 1: the model must be MoE
    after = _refused("needs parallel.sequence: true", moe, 2, 1, 1)  # the model says so, even at expert 1
    assert before == after
    check_layout(moe, 2, 1, 1, sequence=None)  # the converter and forward-only models: not a training run
    check_layout(dense, 2, 1, 1)  # a dense model needs no sequence parallelism
    _refused("parallel.expert=2 but the model's LLM", dense, 1, 1, 2)
    _refused("parallel.expert=3 does not divide the model's 4 experts", moe, 1, 1, 3)
    # The config section asks the same function, with its own values.
    with pytest.raises(UserError, match="needs parallel.sequence: true"):
        ParallelSection(tensor=2, expert=2).validate()


def test_architecture_rules():
    tiny = get_preset("tiny")
    lang = tiny.language
    _refused(f"pipeline size {lang.num_layers + 1} exceeds", tiny, 1, lang.num_layers + 1)
    odd = dataclasses.replace(tiny, language=dataclasses.replace(lang, num_heads=6, num_kv_heads=3))
    text = _refused("parallel.tensor=4 does not fit the model", odd, 4)
    assert "the LLM's 6 attention heads must be a multiple of it" in text
    assert "the LLM's 3 KV heads must be a multiple of it, or it a multiple of them" in text
    # The rule as megatron-core has it (issue 28, item 12): TP 4 with 2 KV heads trains (each KV head
    # shared by two tensor ranks), TP 3 does not; the message lists the sizes that fit.
    two_kv = dataclasses.replace(tiny, language=dataclasses.replace(lang, num_heads=12, num_kv_heads=2,
                                                                     hidden_size=48, ffn_hidden_size=96))
    check_layout(two_kv, 4, sequence=None)
    text = _refused("the LLM's 2 KV heads must be a multiple of it, or it a multiple of them", two_kv, 3)
    from megatron_mpo.parallel_layout import _tensor_problems

    fits = [t for t in range(1, 17) if not _tensor_problems(two_kv, t)]
    assert 4 in fits and 3 not in fits and text.endswith(f"tensor sizes that fit: {', '.join(map(str, fits))}")


def test_a_layout_started_without_torchrun_names_the_command(monkeypatch):
    """Issue 28, item 12: one process (no torchrun) with a TP2 config says to use torchrun,
    with this process's own command line."""
    import sys

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(sys, "argv", [str(__import__("megatron_mpo.train").train.__file__), "--config", "a b.yaml"])
    text = _refused("needs 2 processes, but this one was started without torchrun", None, 2, world_size=1)
    assert text.endswith("start it as: torchrun --nproc-per-node 2 -m megatron_mpo.train --config 'a b.yaml'"), text
    monkeypatch.setenv("LOCAL_RANK", "0")  # under torchrun with one process: the world-size rule speaks
    _refused("launch a multiple of 2", None, 2, world_size=1)

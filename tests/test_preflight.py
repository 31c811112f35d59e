"""Mistakes that need no model stop before any process group or model exists, in seconds,
with one line (issue 15, item 4): the trainer's and the reference tool's entry points run
in-process with process-group start-up and model building replaced by tripwires."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from megatron_mpo.config import from_dict, load_config
from megatron_mpo.errors import UserError
from tests.conftest import base_config


class Tripwire(Exception):
    """Raised where the run would start process groups or build the model."""


@pytest.fixture
def tripwires(monkeypatch):
    """Process groups and model building raise :class:`Tripwire`; a fresh launch, in which no
    process group exists yet (whatever earlier in-process tests left behind)."""
    import torch

    from megatron_mpo import parallel
    from megatron_mpo.training import model_setup

    def trip(*args, **kwargs):
        raise Tripwire("reached process-group or model start-up")

    monkeypatch.setattr(parallel, "initialize", trip)
    monkeypatch.setattr(model_setup, "build_model_chunks", trip)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _cfg(ws: Path, **sections):
    return from_dict(base_config(ws, **sections)).validate()


def _refused(entry, cfg, *words: str) -> str:
    """``entry(cfg)`` stops with one UserError line holding ``words``, within 10 s."""
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        entry(cfg)
    elapsed = time.perf_counter() - started
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert elapsed < 10, f"{elapsed:.1f}s to refuse: {message}"
    return message


def _train(cfg):
    from megatron_mpo.train import train

    return train(cfg)


def _reference(cfg):
    from megatron_mpo.reference import precompute

    return precompute(cfg, log=lambda _: None)


def _broken_sidecars(ws: Path, tmp_path: Path) -> Path:
    refs = tmp_path / "refs"
    shutil.copytree(ws / "refs", refs)
    sidecar = refs / "shard-000001.ref.json"
    sidecar.write_text(sidecar.read_text()[:100])
    return refs


def test_a_sound_run_gets_to_process_groups(workspace, tripwires):
    with pytest.raises(Tripwire):
        _train(_cfg(workspace))
    with pytest.raises(Tripwire):
        _reference(_cfg(workspace))


@pytest.mark.parametrize("entry", [_train, _reference], ids=["train", "reference"])
def test_data_faults_stop_before_process_groups(workspace, tripwires, tmp_path, entry):
    _refused(entry, _cfg(workspace, data={"shards": str(tmp_path / "no-shards")}), "no-shards", "does not exist")
    bad_index = tmp_path / "bad-index"
    bad_index.mkdir()
    (bad_index / "index.json").write_text("{not json")
    _refused(entry, _cfg(workspace, data={"shards": str(bad_index)}), "cannot read shard index")
    _refused(entry, _cfg(workspace, data={"ref_logps": str(_broken_sidecars(workspace, tmp_path))}),
             "shard-000001.ref.json", "truncated")
    cfg = _cfg(workspace)
    cfg.data.template = "chatml-typo"  # past config validation, e.g. set by code
    _refused(entry, cfg, "unknown chat template", "chatml-typo")


def test_reference_checks_the_held_out_shards_before_process_groups(workspace, tripwires, tmp_path):
    """With eval.shards set the reference tool computes the held-out sidecars in the same launch
    (issue 28, item 9): their shards and existing sidecars are checked before the model too."""
    held = {"shards": str(tmp_path / "no-held"), "ref_logps": str(tmp_path / "held-refs")}
    _refused(_reference, _cfg(workspace, eval=held), "no-held", "does not exist")
    held = {"shards": str(workspace / "shards"), "ref_logps": str(_broken_sidecars(workspace, tmp_path))}
    _refused(_reference, _cfg(workspace, eval=held), "shard-000001.ref.json", "truncated")


@pytest.mark.parametrize("entry", [_train, _reference], ids=["train", "reference"])
def test_model_and_tokenizer_faults_stop_before_process_groups(workspace, tripwires, tmp_path, entry):
    _refused(entry, _cfg(workspace, model={"init": str(tmp_path / "no-model")}), "model.init", "does not exist")
    (tmp_path / "empty").mkdir()
    _refused(entry, _cfg(workspace, model={"init": str(tmp_path / "empty")}), "model_config.json")
    _refused(entry, _cfg(workspace, model={"tokenizer": str(tmp_path / "empty")}), "no tokenizer.json")


def test_reference_values_must_exist_before_training(workspace, tripwires, tmp_path):
    _refused(_train, _cfg(workspace, data={"ref_logps": None}), "set data.ref_logps")
    (tmp_path / "refs").mkdir()
    _refused(_train, _cfg(workspace, data={"ref_logps": str(tmp_path / "refs")}), "holds no reference sidecars")


def test_missing_sidecars_are_named_at_start_up(workspace, tripwires, tmp_path, capsys):
    """One warning line before the banner, or a refusal past 10% of the pairs (issue 25, item 7)."""
    shutil.copytree(workspace / "refs", tmp_path / "refs")
    (tmp_path / "refs" / "shard-000001.ref.json").unlink()
    _refused(_train, _cfg(workspace, data={"ref_logps": str(tmp_path / "refs")}), "(shard-000001)",
             "16 of 60 pairs (26.7%), more than 10%")
    with pytest.raises(Tripwire):
        _train(_cfg(workspace, data={"ref_logps": str(tmp_path / "refs"), "on_missing_ref": "skip"}))
    lines = [line for line in capsys.readouterr().out.splitlines() if "shard-000001" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: 1 of 4 shards have no reference sidecar"), lines


@pytest.mark.parametrize("entry", [_train, _reference], ids=["train", "reference"])
def test_a_max_length_that_cuts_responses_is_warned_at_start_up(workspace, tripwires, tmp_path, capsys, monkeypatch,
                                                               entry):
    """One line naming the shares, the p90 response length and the report tool when
    data.max_length would cut over 5% of the responses or drop over 5% of the pairs (issue
    28, item 7: a probe at max_length 512 had every response cut, shown only by a counter)."""
    from megatron_mpo.data import build_loader
    from megatron_mpo.training import data_setup, model_setup

    monkeypatch.setattr(data_setup, "check_reference_values", lambda cfg, model_config: None)  # sidecars: 512
    for max_length in (215, 512):  # 215: 8 of the 60 prompts do not fit, 40 pairs are cut (the loader's counts)
        cfg = _cfg(workspace, data={"max_length": max_length, "ref_logps": str(tmp_path / "refs")})
        with pytest.raises(Tripwire):
            entry(cfg)
        lines = [line for line in capsys.readouterr().out.splitlines() if "data.max_length" in line]
        if max_length == 512:
            assert lines == []
            continue
        model_config = model_setup.model_config(cfg)
        loader = build_loader(data_setup.loader_data(cfg, model_config, for_reference=True),
                              data_setup.loader_plan(cfg, model_config, for_reference=True),
                              data_setup.tokenizer(cfg))
        pairs = sum(b.num_pairs for b in loader)
        dropped = loader.skip_counts["prompt_too_long"]
        assert (pairs + dropped, dropped, loader.skip_counts["response_truncated"]) == (60, 8, 40)
        assert len(lines) == 1, lines
        assert lines[0].startswith("warning: at data.max_length 215, ") and "p90 response " in lines[0], lines
        assert f"{100 * dropped / 60:.0f}% of the pairs dropped" in lines[0], lines
        assert "megatron-mpo lengths --config" in lines[0], lines


def test_layout_faults_stop_before_process_groups(workspace, tripwires, monkeypatch):
    """torchrun's WORLD_SIZE is known before any process group: TP x PP must divide it and
    the global batch must split over micro-batch x data-parallel size."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    _refused(_train, _cfg(workspace, parallel={"tensor": 2}), "3 processes", "launch a multiple of 2")
    _refused(_reference, _cfg(workspace, parallel={"tensor": 2}), "launch a multiple of 2")
    monkeypatch.setenv("WORLD_SIZE", "4")  # tensor 2 -> 2 data-parallel replicas
    _refused(_train, _cfg(workspace, parallel={"tensor": 2}, train={"global_batch": 3}),
             "global_batch 3", "data-parallel size 2")


def test_expert_parallel_faults_stop_before_process_groups(workspace, tripwires, monkeypatch):
    """parallel.expert needs an MoE LLM whose experts it divides and a world of whole
    TP x PP x EP groups; an MoE LLM under TP needs sequence parallelism (megatron-core)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    _refused(_train, _cfg(workspace, parallel={"expert": 2}), "parallel.expert=2", "has no experts")
    moe = {"init": None, "preset": "tiny-moe", "tokenizer": str(workspace / "tok")}
    _refused(_train, _cfg(workspace, model=moe, parallel={"expert": 3}), "parallel.expert=3", "4 experts")
    _refused(_reference, _cfg(workspace, model=moe, parallel={"tensor": 2}), "parallel.sequence: true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _refused(_train, _cfg(workspace, model=moe, parallel={"expert": 4}), "expert=4", "launch a multiple of 4")
    with pytest.raises(UserError, match="parallel.sequence"):
        _cfg(workspace, model=moe, parallel={"expert": 2, "tensor": 2})
    with pytest.raises(UserError, match="router_aux_loss_coef"):
        _cfg(workspace, mpo={"router_aux_loss_coef": -1.0})


def test_flex_attention_training_on_a_cpu_is_refused(workspace, tripwires):
    """torch has no FlexAttention backward on a CPU: one line before any model, naming the
    setting that trains (sdpa). The reference tool (forward only) may use flex there; a
    `te` attention without the TE spec is a config error."""
    _refused(_train, _cfg(workspace, model={"attention": "flex"}, train={"device": "cpu"}),
             "model.attention=flex", "model.attention=sdpa")
    with pytest.raises(Tripwire):
        _reference(_cfg(workspace, model={"attention": "flex"}, train={"device": "cpu"}))
    with pytest.raises(UserError, match="model.spec=transformer_engine"):
        _cfg(workspace, model={"attention": "te"})
    # Under flex, rows are padded to whole FlexAttention blocks (and TP x SP's multiple).
    from megatron_mpo.training import precision, row_layout

    flex = _cfg(workspace, model={"attention": "flex"}, parallel={"tensor": 2, "sequence": True})
    plan = precision.training_precision(flex)
    assert row_layout.pad_multiple(flex, plan) == 128
    assert row_layout.pad_multiple(_cfg(workspace, parallel={"tensor": 2, "sequence": True}), plan) == 2


@pytest.mark.parametrize("entry", [_train, _reference], ids=["train", "reference"])
def test_a_gpu_without_c_compiler_refuses_flex_and_runs_without_jit_fusions(workspace, tripwires, monkeypatch,
                                                                            capsys, entry):
    """No C compiler on a GPU machine (issue 27 item 1): torch.compile cannot run, so
    FlexAttention (compiled there) is refused in one line, and every other attention starts
    with one line saying megatron-core's jit fusions are off."""
    from tests.test_platform import _fake_gpu_without_c_compiler

    _fake_gpu_without_c_compiler(monkeypatch)
    _refused(entry, _cfg(workspace, model={"attention": "flex"}, train={"device": "auto"}),
             "model.attention=flex", "no C compiler", "gcc", "model.attention=sdpa")
    capsys.readouterr()
    with pytest.raises(Tripwire):
        entry(_cfg(workspace, train={"device": "auto"}))
    lines = [line for line in capsys.readouterr().out.splitlines() if "compile" in line]
    assert len(lines) == 1 and "fusion" in lines[0] and "no C compiler" in lines[0], lines


def test_output_dirs_that_cannot_take_a_file_stop_at_start_up(workspace, tripwires, tmp_path):
    """``/proc/...``: as root ``os.access`` says writable, yet nothing can be created there;
    the first save used to fail, after the training, with a false "no space left" line."""
    for section, key, path in (("checkpoint", "save", "/proc/mpo-probe/ckpt"),
                               ("logging", "metrics", "/proc/mpo-probe/metrics.jsonl"),
                               ("logging", "tensorboard", "/proc/mpo-probe/tb")):
        cfg = from_dict(base_config(workspace, **{section: {key: path}}))  # validation would refuse it unless root
        _refused(_train, cfg, f"{section}.{key}", "/proc/mpo-probe", "cannot be created or written")
    cfg = _cfg(workspace, checkpoint={"save": str(tmp_path / "new" / "ckpt")})
    with pytest.raises(Tripwire):  # a creatable folder: created, and the probe file gone again
        _train(cfg)
    assert list((tmp_path / "new" / "ckpt").iterdir()) == []


def test_too_few_pairs_for_one_epoch_step_is_refused(workspace, tripwires):
    """Fewer pairs than one global batch used to round up to one step (of repeated pairs)."""
    total = json.loads((workspace / "shards" / "index.json").read_text())["total"]
    cfg = _cfg(workspace, train={"steps": None, "epochs": 1, "global_batch": 4 * total})
    _refused(_train, cfg, f"over {total} pairs", f"global_batch={4 * total}", f"at most {total}", "train.steps")


def test_no_config_file_says_so(capsys):
    from megatron_mpo.train import main

    with pytest.raises(UserError, match="no --config given"):
        load_config(None, [])
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no --config given"), lines

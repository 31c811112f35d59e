"""Writing a first config: the example configs, ``--print-config`` and the README key table.

Help, allowed values and required marks live once, on the fields of megatron_mpo.config;
these tests hold the printed config and the README table to those fields and to what the
parser and validation accept. The CPU example trains in tests/test_cli.py, as the README's quick start.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from megatron_mpo import train as train_module
from megatron_mpo.config import RunConfig, from_dict, load_config
from megatron_mpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
CPU_SMALL = ROOT / "examples" / "configs" / "cpu_small.yaml"
REQUIRED = ("model.init", "model.preset", "data.shards", "data.ref_logps", "train.steps", "train.epochs")


def leaf_fields(cls: type = RunConfig, prefix: str = ""):
    """(dotted name, field) of every non-section key, walked here rather than by the code under test."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from leaf_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def print_config(capsys, monkeypatch, *argv: str) -> str:
    """``python -m megatron_mpo.train --print-config ...`` in-process; training must not start."""
    monkeypatch.setattr(train_module, "train", lambda cfg: pytest.fail("--print-config started training"))
    train_module.main(["--print-config", *argv])
    return capsys.readouterr().out


# ---- example configs --------------------------------------------------------------------------


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"cpu_small.yaml", "single_gpu.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads_and_its_header_gives_the_flow(path):
    cfg = load_config(path)  # recipes: tests/test_recipes.py loads each of them
    assert cfg.model.init and cfg.data.shards and cfg.data.ref_logps and cfg.train.steps
    assert cfg.model.spec == "local"  # runs without Transformer Engine
    header = "\n".join(line for line in path.read_text().split("\n\n")[0].splitlines() if line.startswith("#"))
    rel = f"examples/configs/{path.name}"
    for step in (r"convert --hf \S+", r"shards --meta \S+", "lengths", "reference", "train", "evaluate", "export"):
        assert re.search(rf"megatron-mpo {step} --config {re.escape(rel)}(\s|$)", header, re.M), step
    assert re.search(r"megatron-mpo shards --meta \S+ --out " + re.escape(cfg.eval.shards) + r"\s", header)
    assert f"--print-config --config {rel}" in header


def test_cpu_and_gpu_examples_fit_their_machines():
    cpu = load_config(CPU_SMALL)
    assert (cpu.train.device, cpu.precision.dtype, cpu.parallel.tensor) == ("cpu", "fp32", 1)
    gpu = load_config(ROOT / "examples" / "configs" / "single_gpu.yaml")
    assert (gpu.train.device, gpu.precision.dtype, gpu.precision.fp8) == ("cuda", "bf16", None)


# ---- --print-config ---------------------------------------------------------------------------


def test_print_config_has_every_key_with_help_and_reads_back(capsys, monkeypatch):
    out = print_config(capsys, monkeypatch, "--config", str(CPU_SMALL), "train.lr=1.0e-4")
    expected = load_config(CPU_SMALL, ["train.lr=1.0e-4"])
    assert from_dict(yaml.safe_load(out)).to_dict() == expected.to_dict()

    lines = out.splitlines()
    comment_above = {}
    section: list[str] = []
    for i, line in enumerate(lines):
        match = re.match(r"^( *)(\w+):(.*)$", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        section = section[:depth] + [match.group(2)]
        above = lines[i - 1].strip()
        assert above.startswith("# ") and len(above) > 10, f"no help line above {'.'.join(section)}"
        comment_above[".".join(section)] = above
    assert set(comment_above) >= {name for name, _ in leaf_fields()}
    for name in REQUIRED:
        assert "REQUIRED" in comment_above[name], name
    assert "REQUIRED" not in comment_above["train.lr"]
    from megatron_mpo.losses import DELTA_UPDATES, PREFERENCE_LOSSES

    assert f"[{' | '.join(PREFERENCE_LOSSES)}]" in comment_above["mpo.preference"]
    assert f"[{' | '.join(DELTA_UPDATES)}]" in comment_above["mpo.delta_update"]
    assert "[auto | cuda | cpu]" in comment_above["train.device"]
    assert lines[-1].startswith("# check: ok, this config passes the start-up checks of its settings; "
                                "not checked here (they run at start): that model.init, data.shards")


def test_print_config_shows_an_unfinished_config_and_what_it_lacks(capsys, monkeypatch):
    out = print_config(capsys, monkeypatch, "train.lr=1.0e-4")  # no file, nothing required set
    assert yaml.safe_load(out)["train"]["lr"] == pytest.approx(1e-4)
    assert out.splitlines()[-1] == ("# check: not ready to train: set model.init or model.preset, "
                                    "data.shards, data.ref_logps, train.steps or train.epochs")


@pytest.mark.parametrize("override, expected", [
    ("train.learning_rate=1.0e-4", "unknown config key 'train.learning_rate'"),
    ("train.steps=many", "train.steps must be"),
])
def test_print_config_refuses_unknown_keys_and_bad_types(capsys, monkeypatch, override, expected):
    with pytest.raises(SystemExit) as exit_info:
        print_config(capsys, monkeypatch, override)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("error: ") == 1 and expected in err and "Traceback" not in err


# ---- one source: help, allowed values, README table ---------------------------------------------


def test_every_key_has_help():
    missing = [name for name, f in leaf_fields() if len(f.metadata.get("help", "")) < 10]
    assert not missing, f"give these keys a help text with setting(...) in megatron_mpo/config.py: {missing}"


def test_listed_choices_are_what_validation_accepts():
    """A value outside a key's listed choices is refused by a message listing exactly those."""
    from megatron_mpo.config import allowed
    from megatron_mpo.data.templates import get_template
    from megatron_mpo.models.presets import get_preset

    checked_later = {"model.preset": get_preset, "data.template": get_template}  # at model / data set-up
    choice_keys = [(name, f) for name, f in leaf_fields() if f.metadata.get("choices")]
    assert {"model.spec", "mpo.preference", "train.device"} <= {name for name, _ in choice_keys}
    for name, _ in choice_keys:
        section, key = name.rsplit(".", 1)
        owner = RunConfig()
        for part in section.split("."):
            owner = getattr(owner, part)
        listed = allowed(owner, key)
        with pytest.raises(UserError) as refused:
            if name in checked_later:
                checked_later[name]("bogus")
            else:
                load_config(CPU_SMALL, [f"{name}=bogus"])
        message = str(refused.value)
        assert "bogus" in message and all(str(c) in message for c in listed), (name, listed, message)


def test_readme_config_table_is_the_generated_one():
    from megatron_mpo.config_docs import REGENERATE, config_reference_markdown, readme_table

    readme = (ROOT / "README.md").read_text()
    table = readme_table(readme)
    assert table is not None, "README.md lost its <!-- config-table:start/end --> markers"
    assert table == config_reference_markdown(), f"README.md's config table is out of date: run {REGENERATE}"
    for name, f in leaf_fields():
        assert f"| `{name}` |" in table
    for mention in ("examples/configs/", "--print-config", "runs/demo/config.yaml"):
        assert mention in readme

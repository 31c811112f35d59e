"""The installed ``megatron-mpo`` command (issue 28, item 9).

The README's quick start runs end to end through the console script pip installed (its
commands are read from the README, so the two cannot drift), one step under torchrun as the
README says for several processes. Every subcommand has --help, flag-driven steps take their
defaults from the run config, ``reference`` prints the resolved config, and a wrong command
is one line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_mpo.errors import UserError
from tests.conftest import read_jsonl
from tests.distributed import REPO, worker_env

README = REPO / "README.md"
CPU_SMALL = REPO / "examples" / "configs" / "cpu_small.yaml"
START, END = "<!-- quick-start:start", "<!-- quick-start:end -->"
FLOW = ["convert", "shards", "shards", "lengths", "reference", "train", "evaluate", "export"]


def installed_script() -> Path:
    """The console script ``pip install -e .`` put next to this interpreter."""
    script = Path(sys.executable).parent / "megatron-mpo"
    if not script.is_file():
        pytest.fail(f"{script} is missing: install the project (pip install -e .) to get the megatron-mpo command")
    return script


def quick_start() -> tuple[list[str], list[str]]:
    """The README's quick-start commands, and its torchrun launch for several processes (at 2)."""
    text = README.read_text()
    assert START in text and END in text, "README.md lost its quick-start markers"
    block = text.split(START, 1)[1].split("\n", 1)[1].split(END, 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip()]
    launch = re.search(r"^    (torchrun --nproc-per-node) \d+ (--no-python) megatron-mpo reference --config "
                       r"my_run\.yaml$", text, re.M)
    assert launch, "README lost its torchrun line for several processes"
    return commands, [*launch.group(1).split(), "2", launch.group(2)]


def test_readme_quick_start_runs_with_the_installed_command(tmp_path):
    """convert -> shards -> lengths -> reference (2 ranks) -> train -> evaluate -> export, each
    as ``megatron-mpo COMMAND`` in the README's working directory; the outputs load."""
    from transformers import InternVLForConditionalGeneration

    from megatron_mpo.data.synthetic import write_synthetic_mmpr
    from tests.test_conversion import _image_prompt, _tiny_internvl

    commands, torchrun = quick_start()
    assert [shlex.split(c)[:2] for c in commands] == [["megatron-mpo", step] for step in FLOW]
    assert "..." not in "".join(commands)
    # What the README downloads and copies: a (tiny) InternVL, pairs, held-out pairs, the CPU config.
    original, tok = _tiny_internvl(tmp_path / "hf" / "InternVL2-1B", "qwen2", seed=4)
    write_synthetic_mmpr(str(tmp_path / "data" / "my-pairs"), num_records=48, seed=3)
    write_synthetic_mmpr(str(tmp_path / "data" / "my-heldout"), num_records=8, seed=5)
    run = yaml.safe_load(CPU_SMALL.read_text())
    run["train"]["steps"] = 2  # the run length, which the README says to set
    (tmp_path / "my_run.yaml").write_text(yaml.safe_dump(run))

    env = worker_env({"PATH": f"{installed_script().parent}{os.pathsep}{os.environ['PATH']}"})
    printed = {}
    for command in commands:
        argv = shlex.split(command)
        if argv[1] == "reference":
            argv = torchrun + argv
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        printed[argv[-1] if argv[1] == "shards" else argv[1]] = proc.stdout

    assert (tmp_path / run["model"]["init"] / "model_config.json").is_file()
    shards = json.loads((tmp_path / run["data"]["shards"] / "index.json").read_text())
    heldout = json.loads((tmp_path / run["eval"]["shards"] / "index.json").read_text())
    assert run["eval"]["shards"] == "data/heldout-shards" and heldout["total"] > 0
    assert f"at data.max_length {run['data']['max_length']}" in printed["lengths"]
    for kind in ("data", "eval"):  # one launch wrote the training and the held-out sidecars
        index = shards if kind == "data" else heldout
        assert len(list((tmp_path / run[kind]["ref_logps"]).glob("*.json"))) == len(index["shards"]), kind

    records = read_jsonl(tmp_path / run["logging"]["metrics"])
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["ref_logratio_step0"] < 1e-4  # the 2-rank reference values are this model's
    assert records[-1]["eval"]["pairs"] == heldout["total"]
    result = json.loads((tmp_path / "eval" / "my-model-mpo" / "eval.json").read_text())
    assert result["preference"]["pairs"] == heldout["total"]
    assert 0.0 <= result["preference"]["reward_accuracy"] <= 1.0

    model, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf" / "my-model-MPO",
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    before = dict(original.named_parameters())  # training changed the weights, and the export generates
    assert any(not torch.equal(p.detach(), before[n].detach()) for n, p in model.named_parameters())
    ids, pixels = _image_prompt(tok)
    assert model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


# ---- what every subcommand shares (in this process) ---------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from megatron_mpo.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_subcommand_has_help_under_its_own_name(capsys):
    from megatron_mpo.cli import COMMANDS

    code, out, _ = _cli(capsys, "--help")
    assert code == 0 and all(re.search(rf"^  {name} ", out, re.M) for name in COMMANDS), out
    without_config = {"demo", "pairs"}  # nothing of theirs is in a run config
    for name in COMMANDS:
        code, out, _ = _cli(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: megatron-mpo {name} "), (name, out[:200])
        assert ("--config" in out) == (name not in without_config), name


def test_unknown_command_and_bad_input_are_one_line(capsys):
    code, out, err = _cli(capsys, "trian", "--config", "x.yaml")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: unknown command 'trian'; the commands are demo, convert, init, shards, "
                                        "lengths, plan, reference, train, evaluate, plot, export, sample, pairs "
                                        "(megatron-mpo --help)"]
    code, _, err = _cli(capsys, "export", "--out", "x")
    assert code == 2 and err.strip().splitlines() == ["error: give --ckpt, or --config with checkpoint.save set"]


def test_reference_prints_the_resolved_config_as_train_does(capsys):
    code, printed, _ = _cli(capsys, "reference", "--print-config", "--config", str(CPU_SMALL), "data.max_length=512")
    assert code == 0
    assert "  max_length: 512\n" in printed and "  init: checkpoints/my-model-mcore\n" in printed
    assert "  # tokens per pair (image tokens included)" in printed  # the key's help line
    code, trained, _ = _cli(capsys, "train", "--print-config", "--config", str(CPU_SMALL), "data.max_length=512")
    assert trained == printed


def test_flag_commands_take_their_defaults_from_the_run_config(tmp_path):
    """A flag wins, then the config's key (overrides included), then the flag's own default."""
    from megatron_mpo import evaluate
    from megatron_mpo.cli import convert, shards
    from megatron_mpo.config_args import parse_with_config
    from megatron_mpo.generation.cli import SAMPLE_KEYS, sample_parser

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"init": "ckpt/mcore"}, "parallel": {"tensor": 2},
        "data": {"shards": "data/shards", "ref_logps": "data/refs", "max_length": 4096, "template": "internvl2_5"},
        "train": {"device": "cpu", "micro_batch": 2}, "checkpoint": {"save": "ckpt/run"},
        "eval": {"shards": "data/held", "ref_logps": "data/held-refs"},
    }))
    c = str(config)
    args = parse_with_config(convert.hf_parser(), ["--hf", "hf/m", "--config", c, "parallel.pipeline=2"],
                             convert.HF_KEYS)
    assert (args.out, args.tp, args.pp, args.template) == ("ckpt/mcore", 2, 2, "internvl2_5")
    args = parse_with_config(convert.hf_parser(), ["--hf", "hf/m", "--config", c, "--out", "o", "--tp", "1"],
                             convert.HF_KEYS)
    assert (args.out, args.tp, args.pp) == ("o", 1, 1)
    args = parse_with_config(convert.hf_parser(), ["--hf", "hf/m", "--out", "o"], convert.HF_KEYS)
    assert (args.tp, args.pp, args.template) == (1, 1, None)
    with pytest.raises(UserError, match=r"^give --out, or --config with model.init set$"):
        parse_with_config(convert.hf_parser(), ["--hf", "hf/m"], convert.HF_KEYS)

    args = parse_with_config(convert.export_parser(), ["--config", c, "--out", "x"], convert.EXPORT_KEYS)
    assert args.ckpt == "ckpt/run"
    assert parse_with_config(shards.build_parser(), ["--meta", "m.json", "--config", c], shards.KEYS).out == \
        "data/shards"
    args = parse_with_config(evaluate.build_parser(), ["--config", c, "--out", "e"], evaluate.KEYS)
    assert (args.ckpt, args.shards, args.ref_logps, args.max_length, args.tensor_parallel, args.micro_batch,
            args.device, args.max_tiles) == ("ckpt/run", "data/held", "data/held-refs", 4096, 2, 2, "cpu", None)
    args = parse_with_config(sample_parser(), ["--questions", "q.json", "--out", "s", "--config", c], SAMPLE_KEYS)
    assert (args.model, args.template, args.max_length, args.device) == ("ckpt/mcore", "internvl2_5", 4096, "cpu")

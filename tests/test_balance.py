"""Balanced data-parallel steps: the cost model, the plan, the busy share it buys on the
MMPR-like profile, and the balanced loader of several ranks (threads stand in for the
ranks, a barrier for the all-gather): every pair once per epoch, deterministic, exact
resume, resume at another layout.

Expected values are worked out here (FLOPs of a pair from the FlopCounter's own step count,
every key of the shards read from the tar files), not taken from the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import tarfile
import threading
from collections import Counter

import pytest
import torch

from megatron_mpo.data import bundle_states, load_tokenizer
from megatron_mpo.data.balance import PATIENCE, CostModel, buffer_capacity, plan_step, split_micro_batches
from megatron_mpo.data.balanced_loader import BalancedLoader
from megatron_mpo.data.collate import collate_pairs
from megatron_mpo.data.pipeline import PairLoader
from megatron_mpo.data.samples import TokenizedPair
from tests.conftest import loader_settings
from tests.distributed import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_balance", REPO / "benchmarks" / "bench_balance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_balance", module)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ cost model
@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_pair_cost_is_the_flop_counter_count_of_the_pair_collated_alone(layout):
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.flops import FlopCounter

    counter = FlopCounter(get_preset("tiny"))
    cost = counter.pair_costs(packed=layout == "packed")
    rng = random.Random(0)
    for _ in range(5):
        tiles = rng.randint(0, 3)
        prompt = [rng.randint(1, 50) for _ in range(rng.randint(3, 30))] + [300] * (4 * tiles)
        chosen, rejected = ([rng.randint(1, 50) for _ in range(rng.randint(1, 40))] for _ in range(2))
        pair = TokenizedPair("s/k", prompt, chosen, rejected, torch.zeros(tiles, 3, 56, 56))
        batch = collate_pairs([pair], 0, 300, 4, layout=layout)
        want = counter.step_flops(batch.num_tokens(), batch.input_ids.shape[1], tiles,
                                  scored=int(batch.response_mask().sum()), attended=batch.attended_keys())
        assert cost.pair_cost(len(prompt), len(chosen), len(rejected), tiles) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------ the plan
def test_plan_takes_the_global_batch_each_pair_once_due_pairs_first_and_is_deterministic():
    rng = random.Random(1)
    for trial in range(200):
        dp = rng.choice([1, 2, 3, 8])
        minimum = rng.choice([1, 2])
        sizes = [rng.randint(minimum, 12) for _ in range(dp)]
        total = rng.randint(minimum * dp, sum(sizes))
        costs = [[rng.choice([1.0, 5.0]) * rng.uniform(1, 10) for _ in range(n)] for n in sizes]
        forced = [rng.randint(0, 2) for _ in range(dp)]
        plan = plan_step(costs, forced, total, minimum)
        assert plan == plan_step([list(c) for c in costs], list(forced), total, minimum)  # a pure function
        assert sum(len(p) for p in plan) == total, trial
        for r, picks in enumerate(plan):
            assert len(picks) >= minimum and len(set(picks)) == len(picks)
            assert all(0 <= i < sizes[r] for i in picks)
        if sum(max(minimum, min(f, n)) for f, n in zip(forced, sizes)) <= total:
            for r, picks in enumerate(plan):  # due pairs (the oldest) are taken
                assert set(range(min(forced[r], sizes[r]))) <= set(picks), trial
    with pytest.raises(ValueError, match="no plan"):
        plan_step([[1.0, 2.0], [3.0]], [0, 0], 4, 1)


def test_micro_batches_get_a_pair_each_and_similar_costs():
    rng = random.Random(2)
    for _ in range(100):
        costs = [rng.uniform(1, 10) for _ in range(rng.randint(4, 20))]
        count = rng.randint(1, 4)
        groups = split_micro_batches(costs, count)
        assert len(groups) == count and all(groups)
        assert sorted(i for g in groups for i in g) == list(range(len(costs)))
        sums = [sum(costs[i] for i in g) for g in groups]
        assert max(sums) - min(sums) <= max(costs) + 1e-9


@pytest.mark.parametrize("dp", [32, 64])
def test_balanced_steps_keep_ranks_busy_on_the_mmpr_profile(dp):
    """The issue's goal on the benchmark's profile (InternVL2.5-8B costs, global batch 256, one
    pair per micro-batch, 60 steps: past the point where waiting pairs fall due): dealt as
    they come the ranks are busy ~0.7 / ~0.6 of a step; balanced >= 0.95. Without the
    planner (pairs as they come) this fails."""
    bench = _bench()
    row = bench.simulate(dp, 256, 1, 32, 60, bench.model_costs("InternVL2_5-8B"))
    assert row["as_they_come"] < 0.8
    assert row["balanced"] >= 0.95
    capacity = buffer_capacity(256, dp, 32)
    assert row["longest_wait_reads"] <= (PATIENCE + 1) * capacity  # no pair waits for ever


# ------------------------------------------------------------------------------ the loader
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards
    from megatron_mpo.data.synthetic import write_synthetic_mmpr
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("balance")
    build_tiny_tokenizer(str(root / "tok"))
    meta = write_synthetic_mmpr(str(root / "raw"), num_records=40, seed=5)
    make_shards(MakeShardsConfig(out=str(root / "shards"), meta=meta, samples_per_shard=7, workers=1,
                                 progress=False), log=lambda m: None)
    keys = []
    for tar in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(tar) as f:
            keys += sorted({f"{tar.stem}/{m.name.split('.', 1)[0]}" for m in f if m.isfile()})
    return {"dir": str(root / "shards"), "tok": load_tokenizer(str(root / "tok")), "keys": keys}


COST = CostModel(position=1.0, key=0.01, scored=0.5, tile=40.0)


def _settings(shards, **kw):
    base = dict(shards=shards["dir"], image_size=56, tokens_per_tile=4, max_tiles=6, max_length=2048, num_workers=0,
                micro_batch=1, shuffle_buffer=4, seed=3, template="internvl2_5", layout="packed")
    return loader_settings(**{**base, **kw})


def _run_ranks(shards, dp, steps, global_batch=6, micro_batches=1, lookahead=3, saved=None, **kw):
    """``steps`` steps of ``dp`` balanced ranks in threads: per rank, per step, the
    (epoch, key) of its pairs; and the bundled checkpoint entry after them."""
    rows, barrier = [None] * dp, threading.Barrier(dp)

    def gather_for(rank):
        def gather(row):
            rows[rank] = row
            barrier.wait()
            out = list(rows)
            barrier.wait()
            return out
        return gather

    taken, states, errors = [[] for _ in range(dp)], [None] * dp, []

    def rank(r):
        try:
            loader = BalancedLoader(PairLoader(*_settings(shards, **kw), shards["tok"], r, dp), COST, global_batch,
                                    micro_batches, lookahead, gather_for(r))
            if saved is not None:
                loader.resume(saved)
            it = iter(loader)
            for _ in range(steps):
                batches = [next(it) for _ in range(micro_batches)]
                taken[r].append([(e, k) for b in batches for e, k in zip(b.pair_epochs(), b.keys)])
            states[r] = loader.state_dict()
            it.close()
        except BaseException as exc:  # noqa: BLE001 -- surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(dp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return taken, json.loads(json.dumps(bundle_states(states)))


def test_balanced_ranks_train_every_pair_once_per_epoch_deterministically_and_resume_exactly(shards):
    steps = 22  # 132 pairs: epoch 0 (50 pairs) and 1 end on both ranks, whatever they read ahead
    full, _ = _run_ranks(shards, 2, steps)
    for s in range(steps):  # the global batch every step, split by cost: ranks hold different counts
        assert len(full[0][s]) + len(full[1][s]) == 6
    assert Counter(len(full[0][s]) for s in range(steps)).keys() != {3}
    every = shards["keys"]
    assert len(every) == len(set(every)) == 50
    pairs = [p for r in full for step in r for p in step]
    for epoch in (0, 1):
        assert sorted(k for e, k in pairs if e == epoch) == sorted(every), epoch
    assert _run_ranks(shards, 2, steps)[0] == full  # the same seed, the same steps
    # Exact resume from a checkpoint after k steps, read back from JSON: the same steps after it.
    for k in (1, 5, 12):
        first, saved = _run_ranks(shards, 2, k)
        assert saved["ranks"][0]["ahead"] or saved["ranks"][1]["ahead"] or k == 1
        rest, _ = _run_ranks(shards, 2, steps - k, saved=saved)
        assert [first[r] + rest[r] for r in range(2)] == full, k


def test_balanced_state_resumes_at_another_layout_with_every_pair_once(shards):
    every = sorted(shards["keys"])
    first, saved = _run_ranks(shards, 2, 4, micro_batches=2)  # two pairs a micro-batch on average
    assert all(len(step) >= 2 for r in first for step in r)
    before = [p for r in first for step in r for p in step]
    # One rank without balancing, the rest of epoch 0.
    single = PairLoader(*_settings(shards, epochs=1), shards["tok"], 0, 1)
    line = single.resume(saved)
    assert "data layout changed" in line and "balance" in line
    after = [(b.epoch, k) for b in single for k in b.keys]
    assert sorted([k for e, k in before if e == 0] + [k for e, k in after]) == every
    # Three balanced ranks from the same checkpoint: epoch 0 and 1 each once again.
    more, _ = _run_ranks(shards, 3, 20, saved=saved)
    again = [k for r in more for step in r for e, k in step if e == 0]
    assert sorted([k for e, k in before if e == 0] + again) == every


def test_balance_settings_are_checked_and_shown():
    from megatron_mpo.config import from_dict
    from megatron_mpo.errors import UserError
    from megatron_mpo.parallel import Layout
    from megatron_mpo.training.run_report import banner

    base = {"model": {"preset": "tiny"}, "train": {"steps": 3}}
    with pytest.raises(UserError, match=r"data.balance_lookahead must be >= 0, got -1") as exc:
        from_dict({**base, "data": {"shards": "s", "ref_logps": "r", "balance_lookahead": -1}}).validate()
    assert "\n" not in str(exc.value)
    layout = Layout(tensor=1, pipeline=1, data=2, tensor_rank=0, pipeline_rank=0, data_rank=0)
    for balance, line in ((True, "  steps: balanced over the data-parallel ranks by cost (data.balance; each rank "
                                 "reads 32 pairs ahead)"),
                          (False, "  steps: each data-parallel rank takes its next pairs as they come "
                                  "(data.balance off)")):
        cfg = from_dict({**base, "data": {"shards": "s", "ref_logps": "r", "balance": balance}})
        text = banner(cfg, layout, total_steps=3, start_step=0, pairs=None, template="t", template_source="s",
                      precision="fp32", reference_precision="fp32", rows="packed", mfu_peak="p")
        assert line in text.splitlines(), text

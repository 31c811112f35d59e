"""One epoch through two stops at other data-parallel sizes: every pair trained once.

A cluster job is requeued on fewer or more nodes. The run here is stopped by SIGTERM to
every process at DP2, resumed at DP1, stopped again, and finished at DP2; the sample log
(``logging.sample_log``) then says which pairs every step trained. Epoch 0 must hold each
sample of the shards exactly once (read from the tar files, not from the loader), and no
pair may repeat inside epoch 1. The DP2 parts balance their steps (``data.balance``, the
default): ranks read ahead and hold different numbers of pairs; a step's update must be
the one a single process makes on the same pairs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import psutil
import pytest

from tests.conftest import base_config, read_jsonl, write_config
from tests.distributed import REPO, worker_env
from tests.faults.test_run_faults import _finish, _run, _torchrun, _tree, _wait_for_steps

STEPS = 22  # 88 pairs: epoch 0 (40 pairs) ends on every rank whatever the split and look-ahead


def _shard_keys(shards: Path, pattern: str = "*.tar") -> list[str]:
    """``shard/key`` of every sample in the shard tars (the key is the member name up to its first dot)."""
    keys = []
    for tar_path in sorted(shards.glob(pattern)):
        with tarfile.open(tar_path) as tar:
            names = {m.name.split("/")[-1].split(".", 1)[0] for m in tar if m.isfile()}
        keys += [f"{tar_path.stem}/{k}" for k in names]
    return keys


def _stop_after(config: Path, nproc: int, metrics: Path, steps: int) -> str:
    proc = _run(_torchrun(config, nproc))
    _wait_for_steps(proc, metrics, steps)
    for p in _tree(proc.pid):
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    output = _finish(proc)
    assert "preempted: saved step" in output, output[-3000:]
    return output


def _skewed_data(out: Path, cfg: dict) -> None:
    """``out/shards``: 40 pairs whose costs differ by an order of magnitude (no image or up to
    two 5-tile images, answers of a few to ~150 tokens, a one-word system message), and
    ``out/refs``: sidecars with made-up finite values under this run's fingerprint -- both
    runs compared below read the same values, and they need not be the model's."""
    import random

    from megatron_mpo.config import from_dict
    from megatron_mpo.data.refs import shard_contents, write_ref_logps
    from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards
    from megatron_mpo.data.synthetic import draw_image
    from megatron_mpo.training.data_setup import reference_fingerprint
    from megatron_mpo.training.model_dir import read_model_config

    rng = random.Random(8)  # a seed whose first balanced step splits 1 + 3 (asserted below)
    raw = out / "raw"
    (raw / "images").mkdir(parents=True)
    records = []
    for i in range(40):
        images = [f"img_{i}_{k}.png" for k in range(rng.choice([0, 1, 2]))]
        for k, name in enumerate(images):
            draw_image(*rng.choice([(56, 56), (112, 56), (112, 112)]), seed=i * 10 + k)[0].save(raw / "images" / name)
        words = rng.choice([2, 8, 40, 120])
        answer = " ".join(rng.choice(["red", "square", "blue", "circle", "the", "shape"]) for _ in range(words))
        record = {"id": f"skew-{i}", "question": "<image>\n" * len(images) + "What is shown?",
                  "chosen": answer, "rejected": answer + " no"}
        if images:
            record["image"] = images if len(images) > 1 else images[0]
        records.append(record)
    (raw / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (raw / "meta.json").write_text(json.dumps({"skew": {"root": "images", "annotation": "pairs.jsonl",
                                                        "repeat_time": 1, "length": len(records)}}))
    make_shards(MakeShardsConfig(out=str(out / "shards"), meta=str(raw / "meta.json"), samples_per_shard=10,
                                 workers=1, progress=False), log=lambda m: None)
    run = from_dict(cfg)
    fingerprint = reference_fingerprint(run, read_model_config(run.model.init))
    for tar_path in sorted((out / "shards").glob("*.tar")):
        keys = _shard_keys(out / "shards", tar_path.name)
        values = {k.split("/")[1]: [-40.0 - n, -45.0 - n, 10.0, 11.0] for n, k in enumerate(keys)}
        write_ref_logps(str(out / "refs"), tar_path.stem, values, fingerprint,
                        content=shard_contents([str(tar_path)])[str(tar_path)])


@pytest.fixture(scope="module")
def elastic(workspace, tmp_path_factory):
    """The run, on pairs of very different costs: 2 pairs per micro-batch on average, so
    balanced steps (the default) give the two ranks different pair counts (one micro-batch
    each at DP2, two at DP1); a short look-ahead, so epoch 0 ends inside the run."""
    run = tmp_path_factory.mktemp("elastic")
    metrics, samples = run / "metrics.jsonl", run / "samples"
    data = {"shards": str(run / "data" / "shards"), "ref_logps": str(run / "data" / "refs"), "system_message": "Hi.",
            "balance_lookahead": 4}
    cfg = base_config(workspace, train={"steps": STEPS, "micro_batch": 2}, data=data,
                      checkpoint={"save": str(run / "ckpt"), "interval": 2, "load": "auto"},
                      logging={"metrics": str(metrics), "sample_log": str(samples)})
    _skewed_data(run / "data", cfg)
    config = write_config(run / "config.yaml", cfg)

    first = _stop_after(config, 2, metrics, 5)
    second = _stop_after(config, 1, metrics, 11)
    final = subprocess.run(_torchrun(config, 2), cwd=REPO, env=worker_env(), capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    return {"run": run, "shards": run / "data" / "shards", "metrics": metrics, "samples": samples, "config": cfg,
            "outputs": [first, second, final.stdout]}


def test_one_epoch_through_two_stops_at_other_dp_sizes_trains_every_pair_once(elastic):
    first, second, final = elastic["outputs"]
    assert "steps: balanced over the data-parallel ranks by cost" in first, first[-3000:]
    assert "data layout changed (dp_size 2 -> 1" in second, second[-3000:]
    assert "data layout changed (dp_size 1 -> 2" in final, final[-3000:]

    records = [r for path in sorted(elastic["samples"].glob("dp*.jsonl")) for r in read_jsonl(path)]
    per_step = Counter()
    for r in records:
        per_step[r["step"]] += len(r["keys"])
    assert per_step == {step: 4 for step in range(1, STEPS + 1)}  # global batch 4, each step logged once
    by_epoch = defaultdict(list)
    for r in records:
        for epoch, key in zip(r["epoch"], r["keys"]):
            by_epoch[epoch].append(key)
    every = _shard_keys(elastic["shards"])
    assert len(every) == len(set(every)) == json.loads((elastic["shards"] / "index.json").read_text())["total"] == 40
    assert sorted(by_epoch[0]) == sorted(every)
    assert all(len(keys) == len(set(keys)) for keys in by_epoch.values())  # later epochs: none twice
    assert sum(map(len, by_epoch.values())) == STEPS * 4
    counts = {(r["step"], len(r["keys"])) for r in records}
    assert any(n != 2 for _, n in counts)  # the ranks' shares of a step differ


def _subset_shard(data: Path, keys: list[str], out: Path) -> None:
    """``out/shards/subset.tar`` holding the samples ``keys`` (``shard/key``) of ``data/shards``,
    and ``out/refs`` their reference values (copied, with the original fingerprint)."""
    from megatron_mpo.data.refs import load_sidecar, shard_contents, sidecar_path, write_ref_logps

    (out / "shards").mkdir(parents=True)
    tar_path = out / "shards" / "subset.tar"
    values = {}
    with tarfile.open(tar_path, "w") as subset:
        for shard_key in keys:
            shard, key = shard_key.split("/")
            with tarfile.open(data / "shards" / f"{shard}.tar") as source:
                for member in source:
                    if member.isfile() and member.name.split(".", 1)[0] == key:
                        subset.addfile(member, source.extractfile(member))
            body = load_sidecar(sidecar_path(str(data / "refs"), shard))
            values[key] = body["logps"][key]
            fingerprint = body["fingerprint"]
    write_ref_logps(str(out / "refs"), "subset", values, fingerprint,
                    content=shard_contents([str(tar_path)])[str(tar_path)])


def test_a_balanced_step_updates_as_one_rank_on_the_same_pairs(workspace, elastic, tmp_path):
    """Step 1 at DP2 gave the ranks different numbers of pairs; one process training those
    four pairs in one step (two micro-batches of two) logs the same losses, rewards and
    gradient norm: the step means do not depend on which rank held which pair."""
    step1 = [next(r for r in read_jsonl(path) if r["step"] == 1)
             for path in sorted(elastic["samples"].glob("dp*.jsonl"))]
    assert len(step1) == 2 and len(step1[0]["keys"]) != len(step1[1]["keys"]), step1
    _subset_shard(elastic["run"] / "data", step1[0]["keys"] + step1[1]["keys"], tmp_path)
    cfg = base_config(workspace, train={"steps": 1, "micro_batch": 2},
                      data={"shards": str(tmp_path / "shards" / "subset.tar"), "ref_logps": str(tmp_path / "refs"),
                            "system_message": "Hi."},
                      logging={"metrics": str(tmp_path / "metrics.jsonl"), "sample_log": str(tmp_path / "samples")})
    proc = subprocess.run([sys.executable, "-m", "megatron_mpo.train", "--config",
                           str(write_config(tmp_path / "config.yaml", cfg))], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    alone = read_jsonl(tmp_path / "samples" / "dp00000.jsonl")[0]
    assert sorted(k.split("/")[1] for k in alone["keys"]) == sorted(k.split("/")[1] for r in step1 for k in r["keys"])
    one, two = read_jsonl(tmp_path / "metrics.jsonl")[0], read_jsonl(elastic["metrics"])[0]
    assert one["step"] == two["step"] == 1
    for key in ("loss", "loss_preference", "loss_quality", "loss_generation", "reward_chosen", "reward_rejected",
                "reward_margin", "reward_accuracy", "grad_norm"):
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-7), key

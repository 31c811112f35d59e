"""One epoch through two stops at other data-parallel sizes: every pair trained once.

A cluster job is requeued on fewer or more nodes. The run here is stopped by SIGTERM to
every process at DP2, resumed at DP1, stopped again, and finished at DP2; the sample log
(``logging.sample_log``) then says which pairs every step trained. Epoch 0 must hold each
sample of the shards exactly once (read from the tar files, not from the loader), and no
pair may repeat inside epoch 1.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import psutil

from tests.conftest import base_config, read_jsonl, write_config
from tests.distributed import REPO, worker_env
from tests.faults.test_run_faults import _finish, _run, _torchrun, _tree, _wait_for_steps

STEPS = 22  # 88 pairs: epoch 0 (60 pairs) ends on every rank whatever the split


def _shard_keys(shards: Path) -> list[str]:
    """``shard/key`` of every sample in the shard tars (the key is the member name up to its first dot)."""
    keys = []
    for tar_path in sorted(shards.glob("*.tar")):
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


def test_one_epoch_through_two_stops_at_other_dp_sizes_trains_every_pair_once(workspace, tmp_path):
    run = tmp_path / "elastic"
    run.mkdir()
    metrics, samples = run / "metrics.jsonl", run / "samples"
    cfg = base_config(workspace, train={"steps": STEPS}, checkpoint={"save": str(run / "ckpt"), "interval": 2,
                                                                    "load": "auto"},
                      logging={"metrics": str(metrics), "sample_log": str(samples)})
    config = write_config(run / "config.yaml", cfg)

    _stop_after(config, 2, metrics, 5)
    second = _stop_after(config, 1, metrics, 11)
    assert "data layout changed (dp_size 2 -> 1" in second, second[-3000:]
    final = subprocess.run(_torchrun(config, 2), cwd=REPO, env=worker_env(), capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "data layout changed (dp_size 1 -> 2" in final.stdout, final.stdout[-3000:]

    records = [r for path in sorted(samples.glob("dp*.jsonl")) for r in read_jsonl(path)]
    per_step = Counter()
    for r in records:
        per_step[r["step"]] += len(r["keys"])
    assert per_step == {step: 4 for step in range(1, STEPS + 1)}  # global batch 4, each step logged once
    by_epoch = {0: [], 1: []}
    for r in records:
        for epoch, key in zip(r["epoch"], r["keys"]):
            by_epoch[epoch].append(key)
    every = _shard_keys(workspace / "shards")
    assert len(every) == len(set(every)) == json.loads((workspace / "shards" / "index.json").read_text())["total"]
    assert sorted(by_epoch[0]) == sorted(every)
    assert len(by_epoch[1]) == len(set(by_epoch[1])) == STEPS * 4 - len(every)

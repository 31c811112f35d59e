"""Offline reference log-probs: layout independence, resumable after SIGKILL, and the
trainer refusing values computed with other settings."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import base_config, run_tool, write_config
from tests.distributed import REPO, launch, worker_env
from tests.test_training import kill_tree

TOOL = "tools/precompute_ref_logps.py"


def sidecars(directory: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.ref.json"))}


def add_empty_shard(folder: Path, name: str, position: int) -> None:
    """A shard of no samples (a tar of no members) at ``position`` of a make_shards index."""
    path = folder / f"{name}.tar"
    tarfile.open(path, "w").close()
    index = json.loads((folder / "index.json").read_text())
    entry = {"name": path.name, "samples": 0, "bytes": path.stat().st_size,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    index["shards"].insert(position, entry)
    (folder / "index.json").write_text(json.dumps(index))


def test_reference_values_do_not_depend_on_the_layout(workspace, tmp_path):
    # TP2 x PP2 with the interleaved schedule (2 virtual stages: one LLM layer per chunk);
    # 15 pairs per shard in schedule calls of 8 -> the last call is topped up to PP. Rows
    # packed several pairs to a row (micro-batches of 4 pairs; the schedule pads them to
    # one length) against the session's one-pair unpacked rows at TP1.
    cfg = base_config(workspace, data={"ref_logps": str(tmp_path / "refs_tp2pp2"), "packing": True,
                                       "pairs_per_row": None},
                      parallel={"tensor": 2, "pipeline": 2, "virtual_pipeline": 2}, train={"micro_batch": 4})
    launch(REPO / TOOL, 4, "--config", write_config(tmp_path / "c.yaml", cfg))
    single, parallel = sidecars(workspace / "refs"), sidecars(tmp_path / "refs_tp2pp2")
    assert single.keys() == parallel.keys() and len(single) == 4
    total = 0
    for name in single:
        a, b = single[name]["logps"], parallel[name]["logps"]
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key][0] - b[key][0]) <= 1e-4 and abs(a[key][1] - b[key][1]) <= 1e-4, (name, key)
            assert a[key][2:] == b[key][2:]  # token counts
            assert a[key][0] < 0 and a[key][1] < 0 and a[key][2] > 0
            total += 1
        assert single[name]["fingerprint"] == parallel[name]["fingerprint"]
    assert total == 60  # every sample of the shard set has values
    # (Equality with the trainer's step-0 policy log-probs: test_training checks that
    # ref_logratio_step0 = mean |log pi - log pi_0| of the first step is ~0 at every layout.)


def test_killed_run_resumes_without_recomputing_finished_shards(workspace, tmp_path):
    shards = tmp_path / "small_shards"
    run_tool("tools/make_shards.py", "--meta", str(workspace / "raw" / "meta.json"), "--out", str(shards),
             "--samples-per-shard", "2")
    # A shard with no sample in the middle gets an empty sidecar, and the shards after it theirs.
    add_empty_shard(shards, "empty", 15)
    n_shards = len(list(shards.glob("*.tar")))
    assert n_shards == 31
    cfg = base_config(workspace, data={"shards": str(shards), "ref_logps": str(tmp_path / "refs")})
    config = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.Popen([sys.executable, str(REPO / TOOL), "--config", str(config)], cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_with = None
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            done = list((tmp_path / "refs").glob("*.ref.json")) if (tmp_path / "refs").is_dir() else []
            if len(done) >= 3:
                kill_tree(proc.pid)
                killed_with = len(list((tmp_path / "refs").glob("*.ref.json")))
                break
            time.sleep(0.002)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert killed_with is not None and killed_with < n_shards, "the tool finished before it could be killed"
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "refs").glob("*.ref.json")}

    out = run_tool(TOOL, "--config", str(config)).stdout
    assert f"{len(finished)} of this rank's {n_shards} already complete" in out
    assert f"warning: shard {shards / 'empty.tar'} holds no usable sample (skip counts: none)" in out
    after = sidecars(tmp_path / "refs")
    assert len(after) == n_shards
    assert (after["empty.ref.json"]["pairs"], after["empty.ref.json"]["logps"]) == (0, {})
    assert "empty.ref.json" not in finished  # computed by the rerun, after the kill
    from megatron_mpo.config import from_dict
    from megatron_mpo.training.model_dir import read_model_config
    from megatron_mpo.training.data_setup import check_reference_values

    # The trainer's start-up check takes the empty sidecar: every shard has one, nothing to warn of.
    assert check_reference_values(from_dict(cfg).validate(), read_model_config(workspace / "init")) is None
    for name, mtime in finished.items():  # finished shards were not recomputed
        assert (tmp_path / "refs" / name).stat().st_mtime_ns == mtime

    cfg["data"]["ref_logps"] = str(tmp_path / "refs_straight")
    run_tool(TOOL, "--config", str(write_config(tmp_path / "c2.yaml", cfg)))
    straight = sidecars(tmp_path / "refs_straight")
    assert straight.keys() == after.keys()
    for name in straight:
        assert straight[name]["logps"] == after[name]["logps"]


def _train_once(workspace: Path, tmp_path: Path, **sections) -> subprocess.CompletedProcess:
    cfg = base_config(workspace, **sections)
    cfg["train"]["steps"] = 1
    path = write_config(tmp_path / "train.yaml", cfg)
    return subprocess.run([sys.executable, "-m", "megatron_mpo.train", "--config", str(path)], cwd=REPO,
                          env=worker_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("change", ["max_length", "checkpoint"])
def test_mismatching_fingerprint_stops_training_before_step_one(workspace, tmp_path, change):
    if change == "max_length":
        proc = _train_once(workspace, tmp_path, data={"max_length": 384})
        expected = "max_length=512"
    else:
        other = tmp_path / "other_init"
        run_tool("tools/init_checkpoint.py", "--preset", "tiny", "--tokenizer", str(workspace / "tok"),
                 "--out", str(other), "--seed", "2")
        proc = _train_once(workspace, tmp_path, model={"init": str(other)})
        expected = "another initial checkpoint"
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reference values in") and expected in last, last
    assert "Traceback" not in proc.stderr
    assert "step 1" not in proc.stdout

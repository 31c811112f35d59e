"""Faults of reference sidecars and of make_shards (issue 14, items 5 and 13): edited,
format-less, npz, truncated and stale sidecars are refused at start-up with one line;
make_shards keeps an existing folder unless told to overwrite it, never mixes old and
new shards, and refuses images outside the image root."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from megatron_mpo.config import from_dict
from megatron_mpo.training.model_dir import read_model_config
from megatron_mpo.data import shard_writer
from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards
from megatron_mpo.errors import UserError
from megatron_mpo.training.data_setup import check_reference_values
from tests.conftest import base_config, run_tool, write_config
from tests.distributed import REPO, worker_env

TOOL = "tools/precompute_ref_logps.py"


@pytest.fixture
def copied(workspace, tmp_path) -> dict:
    """Copies of the workspace shards and sidecars (shards copied byte for byte)."""
    shutil.copytree(workspace / "shards", tmp_path / "shards")
    shutil.copytree(workspace / "refs", tmp_path / "refs")
    return {"shards": tmp_path / "shards", "refs": tmp_path / "refs"}


def _check(workspace: Path, copied: dict, **data) -> Optional[str]:
    """The trainer's start-up check, in-process, over the copies; its warning line."""
    cfg = from_dict(base_config(workspace, data={"shards": str(copied["shards"]),
                                                 "ref_logps": str(copied["refs"]), **data})).validate()
    return check_reference_values(cfg, read_model_config(workspace / "init"))


def _refused(workspace: Path, copied: dict, *words: str, **data) -> str:
    with pytest.raises(UserError) as err:
        _check(workspace, copied, **data)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def _edit(path: Path, change) -> None:
    body = json.loads(path.read_text())
    change(body)
    path.write_text(json.dumps(body))


def _first_key(body: dict) -> str:
    return sorted(body["logps"])[0]


# ---- item 5: sidecars at start-up ----------------------------------------------------------


def test_intact_copies_pass(workspace, copied):
    assert _check(workspace, copied) is None  # no warning either


def test_missing_sidecar_is_named_and_refused_past_a_tenth_of_the_pairs(workspace, copied):
    """A deleted sidecar used to drop its shard in silence (issue 25, item 7): start-up names
    it and the share of pairs it holds (the last shard: 12 of 60); past 10% only
    ``on_missing_ref: skip`` trains without it, and ``error`` refuses any."""
    (copied["refs"] / "shard-000003.ref.json").unlink()
    held = "1 of 4 shards have no reference sidecar in {} (shard-000003): they hold 12 of 60 pairs (20.0%)"
    held = held.format(copied["refs"])
    _refused(workspace, copied, held, "more than 10%", "set data.on_missing_ref: skip")
    skipped = _check(workspace, copied, on_missing_ref="skip")
    assert skipped == f"{held}, skipped as missing_ref (data.on_missing_ref: skip)"
    _refused(workspace, copied, held, "megatron-mpo reference", "on_missing_ref is error", on_missing_ref="error")


def test_missing_sidecars_below_the_limit_warn_and_are_named_first_few():
    from megatron_mpo.data.refs import Coverage
    from megatron_mpo.training.missing_refs import verdict

    samples = {"a": 500, "b": 400, "c": 10, "d": 10, "e": 10, "f": 70}
    at_limit = Coverage(["c", "d", "e", "f"], samples)  # 100 of 1000 pairs: not more than 10%
    assert verdict("warn", "refs", at_limit) == (
        "4 of 6 shards have no reference sidecar in refs (c, d, e and 1 more): they hold 100 of 1000 pairs "
        "(10.0%), skipped as missing_ref (data.on_missing_ref: warn)")
    with pytest.raises(UserError, match=r"101 of 1001 pairs \(10.1%\), more than 10%"):
        verdict("warn", "refs", Coverage(at_limit.missing, dict(samples, f=71)))
    uncounted = Coverage(["b"], {"a": None, "b": None, "c": None, "d": None})  # no index.json: share of shards
    assert verdict("skip", "refs", uncounted).endswith(": 25.0% of the shards (no index.json counts their pairs), "
                                                       "skipped as missing_ref (data.on_missing_ref: skip)")
    with pytest.raises(UserError, match="25.0% of the shards"):
        verdict("warn", "refs", uncounted)
    assert verdict("error", "refs", Coverage([], samples)) is None


def test_edited_value_is_refused(workspace, copied):
    def shift(body):
        body["logps"][_first_key(body)][0] += 1.0

    _edit(copied["refs"] / "shard-000001.ref.json", shift)
    _refused(workspace, copied, "shard-000001.ref.json", "checksum", "recompute")


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_reference_value_with_a_valid_checksum_is_refused(workspace, copied, value):
    """A diverged reference forward, checksummed as written: refused at start-up and at
    writing, instead of discarding every step holding the pair."""
    from megatron_mpo.data.refs import sidecar_checksum, write_ref_logps

    def poison(body):
        body["logps"][_first_key(body)][1] = value
        body["checksum"] = sidecar_checksum(body)

    _edit(copied["refs"] / "shard-000001.ref.json", poison)
    _refused(workspace, copied, "shard-000001.ref.json", "non-finite", "recompute")
    with pytest.raises(UserError, match="overflowed"):
        write_ref_logps(str(copied["refs"]), "shard-000002", {"k": (-1.0, value, 3, 4)})
    assert json.loads((copied["refs"] / "shard-000002.ref.json").read_text())["logps"]  # the old one stays


def test_sidecar_without_format_is_refused(workspace, copied):
    _edit(copied["refs"] / "shard-000002.ref.json", lambda body: body.pop("format"))
    _refused(workspace, copied, "shard-000002.ref.json", "format", "recompute")


def test_npz_sidecar_is_refused(workspace, copied):
    """npz sidecars carried no fingerprint and nothing writes them: refused, not trained on."""
    body = json.loads((copied["refs"] / "shard-000003.ref.json").read_text())
    (copied["refs"] / "shard-000003.ref.json").unlink()
    keys = sorted(body["logps"])
    np.savez(copied["refs"] / "shard-000003.ref.npz", keys=np.array(keys, dtype=str),
             chosen=np.zeros(len(keys)), rejected=np.zeros(len(keys)))
    _refused(workspace, copied, "shard-000003.ref.npz", "npz", "recompute")


def test_truncated_sidecar_is_refused_at_start_up(workspace, copied):
    path = copied["refs"] / "shard-000000.ref.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    _refused(workspace, copied, "shard-000000.ref.json", "truncated", "recompute")


def test_resharded_folder_makes_its_sidecars_stale(workspace, copied, tmp_path):
    """Re-sharding (another seed, same folder) leaves sidecars of other shard contents: the
    trainer refuses them and the reference tool recomputes them instead of calling them complete."""
    shutil.rmtree(copied["shards"])
    make_shards(MakeShardsConfig(out=str(copied["shards"]), meta=str(workspace / "raw" / "meta.json"),
                                 samples_per_shard=16, seed=1, progress=False), log=lambda m: None)
    _refused(workspace, copied, "shard-000000.ref.json", "changed", "recompute")
    cfg = base_config(workspace, data={"shards": str(copied["shards"]), "ref_logps": str(copied["refs"])})
    out = run_tool(TOOL, "--config", str(write_config(tmp_path / "ref.yaml", cfg))).stdout
    assert "0 of this rank's 4 already complete, 4 to compute" in out, out
    _check(workspace, copied)


def test_reference_tool_refuses_an_edited_sidecar(workspace, copied, tmp_path):
    def shift(body):
        body["logps"][_first_key(body)][1] -= 3.0

    _edit(copied["refs"] / "shard-000002.ref.json", shift)
    cfg = base_config(workspace, data={"ref_logps": str(copied["refs"])})
    proc = run_tool(TOOL, "--config", str(write_config(tmp_path / "ref.yaml", cfg)), check=False)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert last.startswith("error: reference sidecar") and "shard-000002.ref.json" in last, last
    assert "checksum" in last and "Traceback" not in proc.stderr


# ---- item 5: make_shards into an existing folder -------------------------------------------


def _listing(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_make_shards_refuses_a_non_empty_out(workspace, copied):
    before = _listing(copied["shards"])
    proc = run_tool("tools/make_shards.py", "--meta", str(workspace / "raw" / "meta.json"), "--out",
                    str(copied["shards"]), "--samples-per-shard", "8", "--quiet", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(copied["shards"]) in last and "--overwrite" in last, last
    assert _listing(copied["shards"]) == before


def test_make_shards_overwrite_never_mixes_old_and_new(workspace, copied, tmp_path, monkeypatch):
    folder, meta = copied["shards"], str(workspace / "raw" / "meta.json")
    before = _listing(folder)
    config = MakeShardsConfig(out=str(folder), meta=meta, samples_per_shard=8, progress=False, overwrite=True)
    real_add, calls = shard_writer._ShardSink.add, []

    def failing_add(self, *args):
        calls.append(1)
        if len(calls) > 20:  # fails after two new shards are written
            raise RuntimeError("disk full")
        real_add(self, *args)

    monkeypatch.setattr(shard_writer._ShardSink, "add", failing_add)
    with pytest.raises(RuntimeError, match="disk full"):
        make_shards(config, log=lambda m: None)
    assert _listing(folder) == before  # the old set, whole
    monkeypatch.setattr(shard_writer._ShardSink, "add", real_add)
    index = make_shards(config, log=lambda m: None)
    names = {s["name"] for s in index["shards"]}
    assert len(names) == 8 and set(os.listdir(folder)) == names | {"index.json", "refused.jsonl"}
    assert sorted(os.listdir(tmp_path)) == ["refs", "shards"]  # no temporary folder left


# ---- item 13: images outside the image root ------------------------------------------------


def _outside_root_source(tmp_path: Path) -> Path:
    """img/ok.png, img/alias.png -> ok.png (inside), and three ways out to data/secret.png."""
    data, img = tmp_path / "data", tmp_path / "data" / "img"
    img.mkdir(parents=True)
    for path in (img / "ok.png", data / "secret.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    (img / "alias.png").symlink_to(img / "ok.png")
    (img / "link.png").symlink_to(data / "secret.png")
    images = ["ok.png", "alias.png", "../secret.png", str(data / "secret.png"), "link.png"]
    rows = [{"image": p, "question": "<image>\nColour?", "chosen": "Red.", "rejected": "Blue."} for p in images]
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_make_shards_refuses_images_outside_the_root(tmp_path):
    data = _outside_root_source(tmp_path)
    lines = []
    index = make_shards(MakeShardsConfig(out=str(tmp_path / "out"), jsonl=str(data / "pairs.jsonl"),
                                         image_root=str(data / "img"), progress=False), log=lines.append)
    assert index["total"] == 2 and index["refused"] == {"outside_root": 3}
    rows = [json.loads(x) for x in (tmp_path / "out" / "refused.jsonl").read_text().splitlines()]
    assert sorted((r["line"], r["reason"]) for r in rows) == [(3, "outside_root"), (4, "outside_root"),
                                                               (5, "outside_root")]
    assert any("outside_root=3" in line for line in lines), lines


def test_allow_outside_root_flag_reads_them(tmp_path):
    data = _outside_root_source(tmp_path)
    spec = importlib.util.spec_from_file_location("_make_shards_tool", REPO / "tools" / "make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--jsonl", str(data / "pairs.jsonl"), "--image-root", str(data / "img"), "--out",
               str(tmp_path / "out"), "--quiet", "--allow-outside-root", "--workers", "1"])
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["total"] == 5 and index["refused"] == {}


# ---- structure: one home for the sidecar contract --------------------------------------------


def test_trainer_check_does_not_import_the_reference_tool(workspace):
    """The trainer's check runs on data/refs.py; data/refs.py pulls in no training code."""
    code = (
        "import sys\n"
        "import megatron_mpo.data.refs\n"
        "assert not [m for m in sys.modules if m.startswith(('megatron_mpo.training', 'megatron_mpo.reference'))]\n"
        "from megatron_mpo.config import from_dict\n"
        "from megatron_mpo.training.model_dir import read_model_config\n"
        "from megatron_mpo.training.data_setup import check_reference_values\n"
        "from tests.conftest import base_config\n"
        f"ws = __import__('pathlib').Path({str(workspace)!r})\n"
        "check_reference_values(from_dict(base_config(ws)).validate(), read_model_config(ws / 'init'))\n"
        "assert 'megatron_mpo.reference' not in sys.modules, 'the trainer imported the reference tool'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_reference_from_elsewhere_is_named_at_step_1(workspace, copied, tmp_path):
    """Issue 27, item 8: reference values that are not the policy's own starting point (here
    every value 3 nats off, checksums valid: as from another checkpoint) pass every start-up
    check; the first step measures the gap and says so in one line (beta*gap = 0.3 > 0.1)."""
    from megatron_mpo.data.refs import sidecar_checksum

    def move(body):
        for values in body["logps"].values():
            values[0] -= 3.0
            values[1] += 3.0
        body["checksum"] = sidecar_checksum(body)

    for sidecar in copied["refs"].glob("*.ref.json"):
        _edit(sidecar, move)
    cfg = base_config(workspace, data={"shards": str(copied["shards"]), "ref_logps": str(copied["refs"])},
                      logging={"metrics": str(tmp_path / "metrics.jsonl")})
    cfg["train"]["steps"] = 1
    proc = run_tool("-m megatron_mpo.train", "--config", str(write_config(tmp_path / "config.yaml", cfg)))
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("warning: reference gap at step 1")]
    assert "beta*gap = 0.3 above 0.1" in line and "share numerics (fp32)" in line, line
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(record["ref_logratio_step0"] - 3.0) < 1e-3
    assert 0 < record["ref_logratio_step0_per_token"] < record["ref_logratio_step0"]

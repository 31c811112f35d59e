"""Faults that used to surface late -- after the training time was spent -- now stop at
start-up or before a save, with one line: unwritable checkpoint dirs, a full disk, numeric
settings that pass validation and break training, a lost rank waiting 30 minutes."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mpo.config import from_dict, load_config
from megatron_mpo.errors import UserError
from megatron_mpo.training import disk_space
from tests.distributed import REPO, worker_env

BASE = {"model": {"preset": "tiny"}, "data": {"shards": "s", "ref_logps": "r"}, "train": {"steps": 1}}


def _load(**sections):
    raw = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw).validate()


# ---- 7. checkpoint / log locations checked before any process group work --------------


def test_unusable_checkpoint_and_log_dirs_stop_at_start_up(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        _load(checkpoint={"save": str(a_file)})
    with pytest.raises(UserError, match="is a file, not a directory"):
        _load(checkpoint={"save": str(a_file / "run" / "ckpt")})
    with pytest.raises(UserError, match="logging.metrics .* is a file"):
        _load(logging={"metrics": str(a_file / "metrics.jsonl")})
    assert _load(checkpoint={"save": str(tmp_path / "new" / "ckpt")}).checkpoint.save  # creatable: fine


def test_cli_refuses_an_unwritable_checkpoint_dir_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "megatron_mpo.train", "model.preset=tiny", "data.shards=s",
                           "data.ref_logps=r", "train.steps=1", f"checkpoint.save={tmp_path}/file/ckpt"],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "checkpoint.save" in line]
    assert len(lines) == 1 and "is a file, not a directory" in lines[0], proc.stderr[-2000:]


# ---- 8. a full disk ---------------------------------------------------------------------


def _fake_checkpoints(save_dir: Path, steps: list[int]) -> None:
    for step in steps:
        d = save_dir / f"step_{step:09d}"
        d.mkdir(parents=True)
        for name in ("metadata.json", "common.json"):
            (d / name).write_text("{}")


class _Manager:
    """The part of CheckpointManager that ensure_room uses."""

    def __init__(self, save_dir: Path, keep_last):
        from megatron_mpo.training.checkpoint import CheckpointManager

        self._real = CheckpointManager(save_dir, keep_last)
        self.save_dir, self.keep_last = self._real.save_dir, keep_last

    def complete_checkpoints(self):
        return self._real.complete_checkpoints()


def test_short_disk_prunes_what_keep_last_would_prune_then_stops_with_the_sizes(tmp_path, monkeypatch):
    save_dir = tmp_path / "ckpt"
    _fake_checkpoints(save_dir, [2, 4, 6])
    need = 10 * 2**30
    free = {"bytes": 4 * 2**30}

    def fake_free(path):
        # Each removed checkpoint frees 3 GiB.
        return free["bytes"] + 3 * 2**30 * (3 - len(list(save_dir.glob("step_*"))))

    monkeypatch.setattr(disk_space, "free_bytes", fake_free)
    # keep_last 2: after this save 2 remain, so steps 2 and 4 may go now; 4 + 2 x 3 = 10 GiB < 10.5
    with pytest.raises(UserError) as err:
        disk_space.ensure_room(_Manager(save_dir, 2), need, 8, is_writer=True)
    assert [p.name for p in save_dir.glob("step_*")] == ["step_000000006"]  # the newest always stays
    message = str(err.value)
    assert "no space left on" in message and "needs ~10.0 GiB, 10.0 GiB free" in message and "\n" not in message
    # Enough room after pruning: the save may go on.
    _fake_checkpoints(save_dir, [8, 10])
    free["bytes"] = 6 * 2**30
    disk_space.ensure_room(_Manager(save_dir, 2), need, 12, is_writer=True)
    assert sorted(p.name for p in save_dir.glob("step_*")) == ["step_000000010"]
    # keep_last unset: nothing is deleted, the save is refused.
    free["bytes"] = 0
    with pytest.raises(UserError, match="no space left"):
        disk_space.ensure_room(_Manager(save_dir, None), need, 14, is_writer=True)
    assert sorted(p.name for p in save_dir.glob("step_*")) == ["step_000000010"]


def test_full_disk_errors_from_the_writer_become_one_line(tmp_path):
    torch_zip = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4624")
    for exc in (torch_zip, OSError(errno.ENOSPC, "No space left on device")):
        why = disk_space.explain_write_error(exc, tmp_path, 2**30)
        assert why.startswith(f"no space left on {tmp_path}") and "previous checkpoint is intact" in why
    assert disk_space.explain_write_error(RuntimeError("other"), tmp_path, 1) is None


def test_small_sizes_read_in_fitting_units(tmp_path, monkeypatch):
    """A tiny model's checkpoint used to read "needs ~0.0 GiB, 0.0 GiB free"."""
    sizes = {0: "0 B", 512: "512 B", 1536: "1.5 KiB", 3 * 2**20: "3.0 MiB", 2**20 - 1: "1.0 MiB",
             int(2.5 * 2**30): "2.5 GiB", 3 * 2**40: "3.0 TiB"}
    assert {n: disk_space.describe(n) for n in sizes} == sizes
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 2048)
    with pytest.raises(UserError, match=r"needs ~3\.0 MiB, 2\.0 KiB free"):
        disk_space.ensure_room(_Manager(tmp_path / "ckpt", None), 3 * 2**20, 2, is_writer=True)


def test_warmup_longer_than_the_run_is_said_not_silently_cut():
    import torch

    from megatron_mpo.config import TrainSection
    from megatron_mpo.training.optim import build_scheduler, warmup_warning

    def scheduled(train, total):  # the warm-up megatron-core's scheduler runs
        return build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), train,
                               total).lr_warmup_steps

    long = TrainSection(steps=10, warmup=50)
    assert scheduled(long, 10) == 9
    message = warmup_warning(long, 10)
    assert message and "\n" not in message
    assert "train.warmup=50 does not fit this 10-step run" in message and "cut to 9 steps" in message
    assert warmup_warning(TrainSection(steps=10, warmup=9), 10) is None and scheduled(TrainSection(warmup=9), 10) == 9
    assert warmup_warning(TrainSection(steps=10, warmup=0.5), 10) is None  # a fraction always fits


# ---- 9. numeric settings validated in one place -----------------------------------------


@pytest.mark.parametrize("key,value,expected", [
    ("train.lr", "nan", "finite"),
    ("train.lr", "inf", "finite"),
    ("train.warmup", ".nan", "finite"),
    ("train.clip_grad", "nan", "finite"),
    ("mpo.beta", "-.inf", "finite"),
    ("train.adam_beta2", "2", r"\[0, 1\)"),
    ("train.adam_beta1", "-0.1", r"\[0, 1\)"),
    ("train.max_bad_steps", "0", "positive"),
    ("train.max_bad_steps", "-3", "positive"),
    ("parallel.timeout_minutes", "0", "positive"),
])
def test_numeric_settings_that_would_break_training_are_refused(key, value, expected):
    overrides = ["model.preset=tiny", "data.shards=s", "data.ref_logps=r", "train.steps=1", f"{key}={value}"]
    with pytest.raises(UserError, match=expected):
        load_config(None, overrides)


# ---- 10. a lost rank fails the job after a configurable timeout -------------------------

PROBE = """
import torch
from megatron_mpo import parallel
from megatron_mpo.config import load_config
cfg = load_config(None, ["model.preset=tiny", "data.shards=s", "data.ref_logps=r", "train.steps=1",
                         "parallel.timeout_minutes=0.25"])
assert load_config(None, ["model.preset=tiny", "data.shards=s", "data.ref_logps=r",
                          "train.steps=1"]).parallel.timeout_minutes == 10
parallel.initialize(1, 1, device="cpu", timeout_minutes=cfg.parallel.timeout_minutes)
import torch.distributed as dist
from megatron.core import parallel_state as ps
for group in (dist.distributed_c10d._get_default_group(), ps.get_tensor_model_parallel_group(),
              ps.get_data_parallel_group()):
    print(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
"""


def test_collective_timeout_is_a_setting_that_reaches_every_group():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["15.0", "15.0", "15.0"]

"""Training checkpoints: exact resume, resume at another TP / PP / EP layout, crash safety,
pruning, errors, preemption.

Three real gloo launches (tests/workers/ckpt_worker.py) with a megatron-core GPTModel in
DDP and the distributed Adam optimizer; the rest runs in-process on fake directories.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from megatron_mpo.errors import UserError
from megatron_mpo.training.checkpoint import CheckpointManager, load_model_weights
from megatron_mpo.training.preemption import PreemptionFlag
from tests.distributed import launch

WORKER = Path(__file__).parent / "workers" / "ckpt_worker.py"


def _equal_dicts(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_exact_resume_tp_reshard_and_preemption(tmp_path):
    launch(WORKER, 2, "resume", tmp_path)
    for rank in (0, 1):
        res = torch.load(tmp_path / f"result_rank{rank}.pt", weights_only=False)
        # (1) DP=2 + distributed Adam: load step 2 into a differently seeded model, train 2
        # steps -> bit-identical parameters, Adam moments, main params and step counts.
        assert res["resolved"] == str(tmp_path / "run" / "step_000000002")
        assert res["common"] == {"step": 2, "mpo": {"delta": 0.25, "count": 7}, "config": {"lr": 1e-2}}
        assert res["loader"] == 100 + rank
        assert torch.equal(res["after_save_rand"], res["restored_rand"])
        assert _equal_dicts(res["ref_params"], res["new_params"]) == []
        assert len(res["ref_optim"]) == len(res["new_optim"]) > 0
        for ref, new in zip(res["ref_optim"], res["new_optim"]):
            assert ref.keys() == new.keys() >= {"exp_avg", "exp_avg_sq", "step", "param"}
            assert float(new["step"]) == 4.0
            for key in ref:
                assert torch.equal(ref[key], new[key]), key
        # (2) saved at TP=2, loaded at TP=1 x DP=2: same full weights and the same logits,
        # from a training checkpoint (manager.load / load_model_weights) and a model-only dir.
        ref = res["tp2_weights"]
        for key in ("tp1_weights", "tp1_weights_standalone", "tp1_weights_model_only"):
            assert _equal_dicts(ref, res[key]) == [], key
        torch.testing.assert_close(res["tp1_logits"], res["tp2_logits"], atol=1e-5, rtol=0)
        assert res["tp1_common"] == {"step": 1} and res["tp1_extras"] is None  # other layout: no RNG
        assert "info.json" in res["model_only_files"] and "common.json" not in res["model_only_files"]
        # A dp_reshardable optimizer cannot follow a model-parallel change: one line naming it.
        refusals = {"optim_layout_error": "tensor 2 -> 1", "tp2_refusal": "tensor 1 -> 2",
                    "pp2_refusal": "pipeline 1 -> 2", "ep1_refusal": "expert 2 -> 1"}
        for key, change in refusals.items():
            kind, message = res[key]
            assert kind == "UserError" and change in message and "dp_reshardable" in message, key
            assert "optimizer_format=reshardable" in message and "\n" not in message, key
            assert "weights only with model.init=" in message and "checkpoint.load unset" in message, key
        # (7) reshardable Adam state carried to another layout: TP1 -> TP2 and PP1 -> PP2 (from
        # TP1 x DP2), EP2 -> EP1 -> EP2 (MoE): the whole state equal, and the loss curve of the
        # next steps that of the straight run up to float32 reduction order.
        for case, targets in {"dense": ("tp2", "pp2"), "moe": ("ep1", "ep2")}.items():
            straight = res[f"{case}_state"]
            assert straight.pop("steps") == {2.0} and len(straight) > 20
            for target in targets:
                moved = res[f"{target}_state"]
                assert moved.pop("steps") == {2.0} and moved.keys() == straight.keys(), target
                for name, tensors in straight.items():
                    for key, value in tensors.items():
                        assert torch.equal(moved[name][key], value), (target, name, key)
                assert res[f"{target}_extras"] is None
                torch.testing.assert_close(res[f"{target}_losses"], res[f"{case}_losses"], rtol=1e-5, atol=0)
        # (6) only rank 1 got SIGUSR1; both ranks decide to stop.
        assert res["stop_before"] is False and res["stop_after"] is True
        assert res["local_flag"] is (rank == 1)
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step_000000002"]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_000000002"
    assert {"common.json", "metadata.json", "rank_00000.pt", "rank_00001.pt"} <= set(
        os.listdir(tmp_path / "run" / "step_000000002")
    )


def test_kill_during_save_keeps_previous_checkpoint_then_prunes(tmp_path):
    # (3) rank 0 SIGKILLs itself inside the save of step 4, after the shards are written.
    with pytest.raises(AssertionError, match="failed with code"):
        launch(WORKER, 2, "crash", tmp_path)
    assert (tmp_path / "dying_rank0").read_text().count("distcp") > 0  # it died mid-save
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == [".tmp_step_000000004", "latest", "step_000000002"]
    assert CheckpointManager(run).resolve("auto") == run / "step_000000002"

    # A 1-process job resumes: weights and (DP-resharded) optimizer state load; per-rank
    # extras are None because the world size changed. Then keep_last=2 prunes. The
    # checkpoint is made one from before EP was recorded: it counts as EP 1.
    common_json = run / "step_000000002" / "common.json"
    info = json.loads(common_json.read_text())
    assert info.pop("expert") == 1
    common_json.write_text(json.dumps(info))
    launch(WORKER, 1, "after_crash", tmp_path)
    res = torch.load(tmp_path / "result_after.pt", weights_only=False)
    assert ".tmp_step_000000004" not in res["entries_after_start"]  # stale tmp removed at startup
    assert res["resolved"] == str(run / "step_000000002")
    assert res["common"] == {"step": 2} and res["per_rank"] is None
    saved = [torch.load(tmp_path / f"result_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert _equal_dicts(saved[0]["params"], res["params"]) == []
    full = res["optim"]  # DP=1: each entry covers the whole parameter
    covered = {name: 0 for name in full}
    for shard in (saved[0]["optim"], saved[1]["optim"]):
        for name, (start, end, exp_avg, exp_avg_sq, step) in shard.items():
            assert full[name][0] == 0 and step == full[name][4] == 2.0
            assert torch.equal(full[name][2][start:end], exp_avg)
            assert torch.equal(full[name][3][start:end], exp_avg_sq)
            covered[name] += end - start
    assert all(covered[n] == full[n][1] for n in full)
    # (4) keep_last=2: the oldest complete checkpoints go, the new one and `latest` stay.
    assert res["entries_after_3"] == ["latest", "step_000000002", "step_000000003"]
    assert res["entries_after_4"] == ["latest", "step_000000003", "step_000000004"]
    assert res["entries_after_5"] == ["latest", "step_000000004", "step_000000005"]
    assert res["latest"] == "step_000000005"
    assert "linear_fc1.weight" in res["mismatch_error"] and "\n" not in res["mismatch_error"]


def _fake_checkpoint(path: Path, training: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if training:
        (path / "common.json").write_text("{}")
    return path


def test_resolve_errors_and_latest_fallback(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager(run)
    assert manager.resolve(None) is None
    assert manager.resolve("auto") is None  # nothing yet: fresh start
    # (5) explicit paths that are missing or incomplete: one-line UserError.
    for bad in (
        tmp_path / "nope",
        _fake_checkpoint(run / ".tmp_step_000000009"),  # a save in progress
        _fake_checkpoint(run / "step_000000007", training=False),  # dist tree, no common.json
        _fake_checkpoint(tmp_path / "converted", training=False),  # model-only: not resumable
    ):
        with pytest.raises(UserError) as err:
            manager.resolve(str(bad))
        assert "\n" not in str(err.value) and str(bad) in str(err.value)
    (run / "step_000000008").mkdir()  # no dist metadata
    with pytest.raises(UserError):
        manager.resolve(run / "step_000000008")
    with pytest.raises(UserError):
        load_model_weights(run / "step_000000008", [])
    # `latest` wins when valid; otherwise the newest complete step dir; tmp dirs never count.
    assert manager.latest() is None
    two = _fake_checkpoint(run / "step_000000002")
    ten = _fake_checkpoint(run / "step_000000010")
    assert manager.latest() == ten and manager.resolve("auto") == ten
    (run / "latest").write_text("step_000000002\n")
    assert manager.resolve("auto") == two
    assert manager.resolve(str(run)) == two  # a run directory means its latest checkpoint
    (run / "latest").write_text("step_000000099\n")  # names a checkpoint that is gone
    assert manager.resolve("auto") == ten
    assert manager.resolve(str(two)) == two
    # A new manager (startup) removes leftovers of crashed saves.
    CheckpointManager(run)
    assert not (run / ".tmp_step_000000009").exists()
    with pytest.raises(UserError):
        CheckpointManager(run, keep_last=0)


def test_preemption_flag_single_process():
    flag = PreemptionFlag()
    try:
        assert flag.should_stop() is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.should_stop() is True and flag.received == signal.SIGUSR1
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) != flag._handle

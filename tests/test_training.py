"""The MPO trainer end to end on real gloo processes: parallel layouts agree, resume is
exact, a kill during a checkpoint save loses nothing, bad steps stop (signals: tests/faults)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import base_config, read_jsonl, write_config
from tests.distributed import REPO, launch, launch_command, worker_env

TRAIN = "-m megatron_mpo.train"
STEPS = 8


def train(ws: Path, run_dir: Path, nproc: int, check: bool = True, **sections):
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = base_config(ws, **sections)
    cfg.setdefault("logging", {})["metrics"] = str(run_dir / "metrics.jsonl")
    cfg["train"]["steps"] = cfg["train"].get("steps_override", STEPS)
    cfg["train"].pop("steps_override", None)
    path = write_config(run_dir / "config.yaml", cfg)
    if nproc > 1:
        return launch(TRAIN, nproc, "--config", path, check=check)
    # One process runs without torchrun, as users do; its exit code is the trainer's own.
    proc = subprocess.run([sys.executable, "-m", "megatron_mpo.train", "--config", str(path)], cwd=REPO,
                          env=worker_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def checkpoint_tensors(step_dir: Path, tmp: Path) -> dict:
    """All model tensors of a dist_checkpointing dir, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.name}_{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, torch.Tensor):
            flat[prefix] = node

    walk("", state)
    return flat  # model weights and optimizer state (fp32 master weights, Adam moments)


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def layout_runs(workspace, straight_run, tmp_path_factory):
    """8 steps from the same checkpoint and data at TP1/PP1 (the session's straight run,
    saving at 4 and 8), TP2, PP2 and TP2xPP2; PP2 with the interleaved schedule (2 virtual
    stages) resumes the straight run's step-4 checkpoint (weights and reshardable Adam
    state) and runs steps 5-8. TP2xPP2 also packs its rows (micro-batches of 2 pairs,
    several pairs per row): the same pairs per step as the one-pair unpacked micro-batches
    of the others."""
    root = tmp_path_factory.mktemp("layouts")
    runs = {(1, 1, None): straight_run}
    for tp, pp, vp in ((2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)):
        run = root / f"tp{tp}pp{pp}vp{vp}"
        packed = {"data": {"packing": True, "pairs_per_row": None}, "train": {"micro_batch": 2}} if tp == pp == 2 else {}
        resumed = {"checkpoint": {"load": str(straight_run / "ckpt" / "step_000000004")}} if vp else {}
        heldout = {"eval": {"shards": str(workspace / "shards"), "ref_logps": str(workspace / "refs"),
                            "interval": 8}} if pp == 2 and (tp == 2 or vp) else {}
        train(workspace, run, tp * pp, parallel={"tensor": tp, "pipeline": pp, "virtual_pipeline": vp}, **packed,
              **resumed, **heldout)
        runs[(tp, pp, vp)] = run
    return runs


def test_parallel_layouts_give_the_same_losses(layout_runs):
    reference = read_jsonl(layout_runs[(1, 1, None)] / "metrics.jsonl")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    # The run trains: later losses differ from the first (policy moved away from the reference).
    assert abs(reference[-1]["loss"] - reference[0]["loss"]) > 1e-3
    # Step 1 starts exactly at the reference: logged once, and ~0.
    assert reference[0]["ref_logratio_step0"] < 1e-4
    assert "ref_logratio_step0" not in reference[1]
    for layout, run in layout_runs.items():
        records = read_jsonl(run / "metrics.jsonl")
        same = reference[records[0]["step"] - 1:]  # the resumed interleaved run starts at step 5
        assert [r["step"] for r in records] == [r["step"] for r in same], layout
        if records[0]["step"] == 1:
            assert records[0]["ref_logratio_step0"] < 1e-4, layout  # policy == TP1 reference values at step 0
        torch.testing.assert_close(torch.tensor(losses(records)), torch.tensor(losses(same)), rtol=1e-4, atol=1e-6,
                                   msg=f"layout TP{layout[0]}xPP{layout[1]}xVP{layout[2]}")
        for key in ("reward_margin", "loss_generation", "delta"):
            torch.testing.assert_close(torch.tensor([r[key] for r in records]),
                                       torch.tensor([r[key] for r in same]), rtol=1e-4, atol=1e-5)
    # The held-out evaluation at step 8 (issue 28, item 6) on two layouts: TP2 x PP2 (packed rows)
    # and PP2 with two virtual stages give the same numbers.
    a, b = (read_jsonl(layout_runs[key] / "metrics.jsonl")[-1]["eval"] for key in ((2, 2, None), (1, 2, 2)))
    assert a["pairs"] == b["pairs"] > 40
    for key in ("loss", "loss_preference", "loss_quality", "reward_margin", "reward_accuracy", "chosen_logp_per_token",
                "delta"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_data_parallel_with_and_without_tensor_parallel(workspace, tmp_path):
    dp_tp1 = tmp_path / "dp2_tp1"
    dp_tp2 = tmp_path / "dp2_tp2"
    first = train(workspace, dp_tp1, 2, train={"steps_override": 4})
    train(workspace, dp_tp2, 4, parallel={"tensor": 2}, train={"steps_override": 4})
    # Start-up says which of Megatron-LM's speed settings run: overlap, also on this only stage
    # where the vision tower trains (text-only pairs run it on a blank tile), and why the others do not.
    assert ("  speed: overlap_grad_reduce, overlap_param_gather (buckets of 40M params); off: align_param_gather "
            "(not interleaved), gradient_accumulation_fusion (no CUDA device)") in first.stdout
    a, b = read_jsonl(dp_tp1 / "metrics.jsonl"), read_jsonl(dp_tp2 / "metrics.jsonl")
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(losses(b)), torch.tensor(losses(a)), rtol=1e-4, atol=1e-6)


def test_resume_reproduces_the_uninterrupted_run(workspace, layout_runs, tmp_path):
    """Also the held-out evaluation (issue 28, item 6): on in the resumed run (every 2 steps),
    it changes nothing the run trains (the straight run had none), and its numbers are the
    policy's (the evaluate tool's own forward of the straight run's step-8 weights agrees)."""
    straight = layout_runs[(1, 1, None)]
    resumed = tmp_path / "resumed"
    # Saving every 2 steps puts a save (step 6) between the resume and steps 7 and 8.
    heldout = {"shards": str(workspace / "shards"), "ref_logps": str(workspace / "refs"), "interval": 2}
    proc = train(workspace, resumed, 1, eval=heldout,
                 checkpoint={"load": str(straight / "ckpt" / "step_000000004"), "save": str(resumed / "ckpt"),
                             "interval": 2})
    first, second = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in second] == [5, 6, 7, 8]
    for x, y in zip(first[4:], second):
        for key in ("loss", "loss_preference", "loss_quality", "loss_generation", "reward_margin", "delta", "lr", "grad_norm"):
            assert x[key] == y[key], (key, x["step"], x[key], y[key])
    _check_heldout_eval(workspace, second, proc.stdout, straight / "ckpt" / "step_000000008", tmp_path)
    final_a = checkpoint_tensors(straight / "ckpt" / "step_000000008", tmp_path)
    final_b = checkpoint_tensors(resumed / "ckpt" / "step_000000008", tmp_path)
    assert final_a.keys() == final_b.keys() and len(final_a) > 10
    # Model weights must be bit-identical. (The distributed optimizer's flat buffers also hold
    # alignment padding that is never written, so they are compared by tests/test_checkpoint.py
    # per parameter instead.)
    weights = [k for k in final_a if not k.startswith("optimizer")]
    mismatched = {k: int((final_a[k] != final_b[k]).sum()) for k in weights if not torch.equal(final_a[k], final_b[k])}
    assert len(weights) > 10 and not mismatched, mismatched
    # And training moved the weights away from the initial checkpoint.
    start = checkpoint_tensors(straight / "ckpt" / "step_000000004", tmp_path)
    assert any(not torch.equal(start[k], final_a[k]) for k in final_a if k.startswith("vision_model"))
    assert any(k.startswith("optimizer") for k in final_a)


def test_resume_at_another_layout(layout_runs):
    """The TP1/PP1 run's step-4 checkpoint (reshardable Adam state) resumed at PP2 with 2
    virtual stages: steps 5-8 retrace the straight run up to float32 reduction order."""
    straight = read_jsonl(layout_runs[(1, 1, None)] / "metrics.jsonl")[4:]
    resumed = read_jsonl(layout_runs[(1, 2, 2)] / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for key in ("loss", "loss_generation", "reward_margin", "delta", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in resumed]), torch.tensor([r[key] for r in straight]),
                                   rtol=1e-5, atol=1e-6, msg=key)


def _start_training(ws: Path, run_dir: Path, steps: int, nproc: int, **sections) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = base_config(ws, **sections)
    cfg["logging"]["metrics"] = str(run_dir / "metrics.jsonl")
    cfg["train"]["steps"] = steps
    path = write_config(run_dir / "config.yaml", cfg)
    cmd = launch_command(TRAIN, nproc, "--config", path) if nproc > 1 else [sys.executable, "-m", "megatron_mpo.train", "--config", str(path)]
    return subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts workers in sessions of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_kill_during_checkpoint_save_resumes_from_previous(workspace, tmp_path):
    run = tmp_path / "killed"
    ckpt = run / "ckpt"
    proc = _start_training(workspace, run, 40, 2, parallel={"tensor": 2},
                           checkpoint={"save": str(ckpt), "interval": 1, "load": "auto"})
    seen_tmp = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            tmps = [p for p in ckpt.glob(".tmp_step_*")] if ckpt.is_dir() else []
            done = [p for p in ckpt.glob("step_*")] if ckpt.is_dir() else []
            if tmps and done:  # a save in flight while an earlier checkpoint exists
                seen_tmp = tmps[0]
                kill_tree(proc.pid)
                break
            time.sleep(0.005)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert seen_tmp is not None, "never caught a save in flight"
    latest_before = (ckpt / "latest").read_text().strip()
    # Restart: resumes from the last complete checkpoint and finishes without error.
    again = _start_training(workspace, run, int(latest_before.split("_")[1]) + 2, 2, parallel={"tensor": 2},
                            checkpoint={"save": str(ckpt), "interval": 1, "load": "auto"})
    out, _ = again.communicate(timeout=240)
    assert again.returncode == 0, out[-3000:]
    assert f"{latest_before} at step {int(latest_before.split('_')[1])}" in out, out[-3000:]
    assert not list(ckpt.glob(".tmp_step_*"))


def test_nonfinite_steps_are_skipped_then_stop_the_run(workspace, tmp_path):
    from megatron_mpo.data.refs import sidecar_checksum

    bad_refs = tmp_path / "bad_refs"
    shutil.copytree(workspace / "refs", bad_refs)
    for path in bad_refs.glob("*.ref.json"):
        body = json.loads(path.read_text())
        # Finite in the sidecar (NaN / inf are refused at start-up), beyond float32 in the loss.
        body["logps"] = {k: [1e39, v[1], *v[2:]] for k, v in body["logps"].items()}
        body["checksum"] = sidecar_checksum(body)
        path.write_text(json.dumps(body))
    run = tmp_path / "nan"
    proc = train(workspace, run, 1, check=False, data={"ref_logps": str(bad_refs)},
                 train={"max_bad_steps": 2}, checkpoint={"save": str(run / "ckpt"), "interval": 1})
    assert proc.returncode == 2
    assert "2 steps in a row had a non-finite loss" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Skipped steps write no checkpoints (the streak must not rotate good ones out).
    assert not list((run / "ckpt").glob("step_*"))
    records = read_jsonl(run / "metrics.jsonl")
    assert records[-1]["skipped"]["nonfinite_steps"] == 2


def test_torch_adam_fallback_runs_the_fused_kernel_with_the_same_update():
    """Without TE / apex megatron-core builds torch's AdamW; build_optimizer switches it
    to torch's fused kernel, which must give the foreach update."""
    from types import SimpleNamespace
    from unittest import mock

    import torch
    import torch.optim.adam as torch_adam

    from megatron_mpo.training.optim import use_fused_torch_adam

    torch.manual_seed(0)
    ref_params = [torch.nn.Parameter(torch.randn(50, 7)), torch.nn.Parameter(torch.randn(13))]
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    reference = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.05, foreach=True)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    assert use_fused_torch_adam(SimpleNamespace(optimizer=optimizer)) == 1
    with mock.patch.object(torch_adam, "_fused_adam", wraps=torch_adam._fused_adam) as fused:
        for _ in range(3):
            for a, b in zip(ref_params, params):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
            reference.step()
            optimizer.step()
    assert fused.call_count == 3
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert use_fused_torch_adam(SimpleNamespace(optimizer=torch.optim.SGD(params, lr=0.1))) == 0


def test_interleaved_schedule_needs_whole_pipeline_groups_per_step():
    from megatron_mpo.config import from_dict
    from megatron_mpo.errors import UserError
    from megatron_mpo.parallel import Layout
    from megatron_mpo.training.schedule import micro_batches_per_step

    cfg = from_dict({"parallel": {"pipeline": 2, "virtual_pipeline": 2},
                               "train": {"global_batch": 6, "micro_batch": 1}})
    layout = Layout(tensor=1, pipeline=2, data=1, tensor_rank=0, pipeline_rank=0, data_rank=0, virtual_pipeline=2)
    assert micro_batches_per_step(cfg, layout) == 6
    odd = from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "global_batch": 3}})
    with pytest.raises(UserError, match="multiple of parallel.pipeline"):
        micro_batches_per_step(odd, layout)
    plain = from_dict({**odd.to_dict(), "parallel": {"pipeline": 2}})
    assert micro_batches_per_step(plain, layout) == 3



def _check_heldout_eval(workspace: Path, records: list[dict], stdout: str, weights: Path, tmp_path: Path) -> None:
    """Evaluations at steps 6 and 8 with every metric, the step-8 one equal to the evaluate
    tool's reading of ``weights`` (the step-8 weights)."""
    import math

    from tests.conftest import run_tool

    assert [r["step"] for r in records if "eval" in r] == [6, 8]
    ev = records[-1]["eval"]
    names = ("loss", "loss_preference", "loss_quality", "loss_generation", "reward_accuracy", "reward_margin",
             "chosen_logp_per_token", "rejected_logp_per_token", "delta", "pairs")
    assert all(math.isfinite(ev[k]) for k in names), ev
    assert ev["pairs"] > 40 and ev["chosen_logp_per_token"] < 0 and ev["rejected_logp_per_token"] < 0
    assert records[1]["eval"]["loss"] != ev["loss"]  # the policy moved between the two evaluations
    assert f"eval_loss {ev['loss']:.4f}" in stdout
    run_tool("-m megatron_mpo.evaluate", "--ckpt", str(weights), "--out", str(tmp_path / "evaluated"),
             "--shards", str(workspace / "shards"), "--ref-logps", str(workspace / "refs"),
             "--max-length", "512", "--max-tiles", "4")
    want = json.loads((tmp_path / "evaluated" / "eval.json").read_text())["preference"]
    assert want["pairs"] == ev["pairs"]
    assert want["reward_accuracy"] == pytest.approx(ev["reward_accuracy"], abs=1e-9)
    assert 0.1 * want["mean_logp_margin"] == pytest.approx(ev["reward_margin"], rel=1e-4, abs=1e-6)

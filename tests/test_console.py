"""What the trainer and tools print: no known-harmless third-party warnings, other warnings
at their real caller, one banner, step lines with ETA from rank 0 only, checkpoint saves, a
final summary, skip counts split into dropped samples and truncated responses, and an
error that every rank hits printed once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import base_config, read_jsonl, write_config
from tests.distributed import REPO, launch, worker_env

# Lines that third-party notices leave on stderr (warnings print "file:line: XWarning: ...").
THIRD_PARTY = re.compile(r"Warning: |warnings\.warn\(|Unknown MLP type|site-packages/")
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss [-\d.]+ \|.* \| elapsed \d+:\d\d \| ETA \d+:\d\d$", re.M)
SAVED_LINE = re.compile(r"^saved checkpoint step (\d+) \(\d+\.\ds\)$", re.M)


def check_run_console(stdout: str, stderr: str, steps: int, saves: list[int], checkpoint: Path) -> None:
    """The console of a finished run of ``steps`` steps saving at ``saves``."""
    assert not THIRD_PARTY.search(stdout + stderr), (stdout + stderr)[-3000:]
    assert stderr.strip() == "", stderr[-3000:]
    banners = [line for line in stdout.splitlines() if line.startswith("MPO training: ")]
    assert len(banners) == 1, stdout[-3000:]
    for part in ("  layout: ", "  template: ", "  tiling: ", "  precision: ", "  reference values: "):
        assert sum(line.startswith(part) for line in stdout.splitlines()) == 1, (part, stdout[:2000])
    # every step once (only rank 0 prints), numbered against the total
    assert STEP_LINE.findall(stdout) == [(str(s), str(steps)) for s in range(1, steps + 1)], stdout[-3000:]
    assert "warning: reference gap" not in stdout  # the sidecars are this policy's own
    assert all(" | peak_memory_gib " in line for line in stdout.splitlines() if STEP_LINE.match(line))
    assert [int(s) for s in SAVED_LINE.findall(stdout)] == saves, stdout[-3000:]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"finished at step {steps}/{steps}: {steps} steps, "), last
    assert f"checkpoint {checkpoint}" in last and "last loss " in last and "samples dropped" in last, last


def test_one_process_run_console(straight_run):
    from tests.conftest import STRAIGHT_STEPS

    check_run_console((straight_run / "stdout.txt").read_text(), (straight_run / "stderr.txt").read_text(),
                      STRAIGHT_STEPS, [4, 8], straight_run / "ckpt" / "step_000000008")


def test_two_rank_tp2_run_console(workspace, tmp_path):
    cfg = base_config(workspace, parallel={"tensor": 2},
                      checkpoint={"save": str(tmp_path / "ckpt"), "interval": 2, "keep_last": 1},
                      logging={"metrics": str(tmp_path / "metrics.jsonl")})
    cfg["train"]["steps"] = 4
    proc = launch("-m megatron_mpo.train", 2, "--config", write_config(tmp_path / "c.yaml", cfg))
    check_run_console(proc.stdout, proc.stderr, 4, [2, 4], tmp_path / "ckpt" / "step_000000004")
    assert "  layout: 2 processes = TP 2 x PP 1 x DP 1; EP 1 (of DP); VP -; SP off" in proc.stdout
    assert f"metrics {tmp_path / 'metrics.jsonl'}" in proc.stdout.strip().splitlines()[-1]


def test_user_error_on_every_rank_prints_once(workspace, tmp_path):
    """Every rank refuses the config; rank 0 says so, once, and torchrun's summary names it."""
    config = write_config(tmp_path / "c.yaml", base_config(workspace))
    proc = launch("-m megatron_mpo.train", 2, "--config", config, "mpo.beta=-1", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "beta" in errors[0], proc.stderr[-3000:]
    assert not re.search(r"^\[rank \d+\]", proc.stderr, re.M), proc.stderr[-3000:]
    assert f"traceback : {errors[0]}" in proc.stderr, proc.stderr[-3000:]  # torchrun read the error file

    from megatron_mpo.console import failure_line  # what the demo quotes of a failed stage

    assert failure_line(proc.stdout + proc.stderr) == errors[0]


# ---- failures, in-process (the rank rule with a stand-in for the process group's store) ----


class FakeStore:
    def __init__(self, values=None):
        self.values = {k: v.encode() for k, v in (values or {}).items()}

    def set(self, key, value):
        self.values[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(k in self.values for k in keys)

    def get(self, key):
        return self.values[key]


@pytest.fixture
def console(monkeypatch):
    import signal

    from megatron_mpo import console

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(console, "RANK0_GRACE_S", 0.2)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    yield console
    signal.signal(signal.SIGTERM, previous)  # report_failure resets it on ranks other than 0


def test_other_rank_stays_silent_when_rank0_failed_alike(console, monkeypatch, capsys):
    from megatron_mpo.errors import UserError

    store = FakeStore({"megatron_mpo/failure/0": "error: bad beta"})
    monkeypatch.setattr(console, "_default_store", lambda: store)
    monkeypatch.setenv("RANK", "1")
    assert console.report_failure(UserError("bad beta")) == 2
    assert capsys.readouterr().err == ""


def test_error_of_one_rank_prints_with_its_rank(console, monkeypatch, capsys, tmp_path):
    from megatron_mpo.errors import UserError

    monkeypatch.setattr(console, "_default_store", lambda: FakeStore())  # rank 0 is fine
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert console.report_failure(UserError("no sample for data-parallel rank 3")) == 2
    assert capsys.readouterr().err == "[rank 3] error: no sample for data-parallel rank 3\n"
    body = json.loads((tmp_path / "error.json").read_text())
    assert body["message"]["extraInfo"]["py_callstack"] == "[rank 3] error: no sample for data-parallel rank 3"


def test_rank0_prints_and_tells_the_others(console, monkeypatch, capsys):
    store = FakeStore()
    monkeypatch.setattr(console, "_default_store", lambda: store)
    monkeypatch.setenv("RANK", "0")
    assert console.report_failure(ValueError("a bug")) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") or err.startswith("ValueError"), err
    assert err.rstrip().endswith("ValueError: a bug") and "[rank" not in err
    assert store.values["megatron_mpo/failure/0"] == b"ValueError: a bug"


# ---- warnings ----------------------------------------------------------------------------

ATTRIBUTION_PROBE = """
import warnings
import torch
from megatron_mpo.console import setup_console
from megatron_mpo import platform

setup_console()
platform.setup("cpu")  # torch calls now run inside the CPU redirect (a TorchFunctionMode)
warnings.simplefilter("always")
x = torch.ones(2, requires_grad=True) * 2
x.grad  # LINE_CPP
torch.nn.functional.softmax(torch.ones(2, 2))  # LINE_PY
"""


def test_torch_warnings_name_their_caller_not_the_platform_redirect(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(ATTRIBUTION_PROBE)
    proc = subprocess.run([sys.executable, str(probe)], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = ATTRIBUTION_PROBE.splitlines()
    cpp, py = (next(i for i, line in enumerate(lines, 1) if mark in line) for mark in ("LINE_CPP", "LINE_PY"))
    assert f"{probe}:{cpp}: UserWarning: The .grad attribute" in proc.stderr, proc.stderr[-3000:]
    assert f"{probe}:{py}: UserWarning: Implicit dimension choice for softmax" in proc.stderr, proc.stderr[-3000:]
    assert "platform.py" not in proc.stderr
    assert "site-packages" not in proc.stderr  # megatron-core's import-time notices were dropped


def test_harmless_list_matches_message_and_origin():
    from megatron_mpo.console import is_harmless

    mcore = "/site-packages/megatron/core/optimizer/optimizer.py"
    grad = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed."
    assert is_harmless(UserWarning, grad, mcore)
    assert not is_harmless(UserWarning, grad, str(REPO / "megatron_mpo" / "losses.py"))  # ours: shown
    assert is_harmless(UserWarning, "Apex is not installed. Falling back to Torch Norm",
                       "/x/megatron/core/models/backends.py")
    assert not is_harmless(UserWarning, "something new", mcore)
    assert not is_harmless(DeprecationWarning, grad, mcore)


class _StandInGroup:
    """A two-rank process group that moves no data: enough for megatron-core's collectives
    to reach torch's deprecated entry points."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0

    def all_gather_single(self, output, input_, opts):
        return None

    def reduce_scatter_single(self, output, input_, opts):
        return None


def test_torch_collective_deprecations_from_megatron_core_are_dropped():
    """The FutureWarnings seen under EP2 / TP4, raised for real through megatron-core's
    sequence-parallel gather / reduce-scatter, go through the console's filter: dropped.
    Another torch.distributed deprecation from the same torch file is still shown."""
    import warnings

    import torch
    from megatron.core.tensor_parallel import mappings

    from megatron_mpo import console, platform

    platform.setup("cpu")  # megatron-core allocates the outputs on torch.cuda.current_device()
    shown, seen = [], []

    def show(message, category, filename, lineno, file=None, line=None):
        shown.append(str(message))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        keep = console._filtered_and_attributed(show)
        warnings.showwarning = lambda message, *rest: (seen.append(str(message)), keep(message, *rest))
        mappings._gather_along_first_dim(torch.ones(2, 3), _StandInGroup())
        mappings._reduce_scatter_along_first_dim(torch.ones(2, 3), _StandInGroup())
        try:  # the deprecation warning comes first, whether or not an earlier test left a default group
            torch.distributed.all_reduce_coalesced([torch.ones(1)])
        except ValueError:  # no default process group
            pass
    assert any(m.startswith("`torch.distributed.all_gather_into_tensor` is deprecated") for m in seen), seen
    assert any(m.startswith("`torch.distributed.reduce_scatter_tensor` is deprecated") for m in seen), seen
    assert shown and all(m.startswith("`torch.distributed.all_reduce_coalesced` will be deprecated")
                         for m in shown), shown


# ---- banner and step line: expert parallelism and the router's aux loss ------------------


def test_banner_names_expert_parallelism():
    from megatron_mpo.config import from_dict
    from megatron_mpo.parallel import Layout
    from megatron_mpo.training.run_report import banner

    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"shards": "s", "ref_logps": "r"},
                     "train": {"steps": 3}, "parallel": {"tensor": 2, "expert": 2, "sequence": True}})
    layout = Layout(tensor=2, pipeline=1, data=2, tensor_rank=0, pipeline_rank=0, data_rank=0, expert=2)
    text = banner(cfg, layout, total_steps=3, start_step=0, pairs=None, template="t", template_source="s",
                  precision="fp32", reference_precision="fp32", rows="unpacked", mfu_peak="p")
    assert "\n  layout: 4 processes = TP 2 x PP 1 x DP 2; EP 2 (of DP); VP -; SP on\n" in text, text


def test_step_line_shows_the_router_aux_loss_when_logged():
    from megatron_mpo.training.metrics import console_line

    moe = console_line(3, {"loss": 1.5, "aux_loss": 0.01234, "lr": 1e-3}, 10)
    assert moe == "step 3/10 | loss 1.5000 | aux_loss 0.01234 | lr 0.001", moe
    assert "aux_loss" not in console_line(3, {"loss": 1.5, "lr": 1e-3}, 10)  # a dense LLM logs none
    assert console_line(3, {"loss": 1.5, "peak_memory_gib": 12.345}, 10) == "step 3/10 | loss 1.5000 | peak_memory_gib 12.35"


# ---- skip counts -------------------------------------------------------------------------


def test_skip_counts_split_into_dropped_and_truncated(tmp_path, capsys):
    from megatron_mpo.training.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    first = {"loss": 1.0, "skipped": {"bad_image": 2, "response_truncated": 3, "nonfinite_steps": 0}}
    second = {"loss": 1.0, "skipped": {"bad_image": 2, "prompt_too_long": 1, "response_truncated": 7,
                                       "nonfinite_steps": 1}}
    logger = MetricsLogger(str(path), None, None, is_writer=True, total_steps=4)
    logger.log(1, first)
    logger.log(2, second)
    logger.close()
    keys = ("samples_dropped", "samples_dropped_total", "responses_truncated", "responses_truncated_total")
    records = read_jsonl(path)
    assert [tuple(r[k] for k in keys) for r in records] == [(2, 2, 3, 3), (1, 3, 4, 7)]
    assert records[1]["skipped"] == second["skipped"]  # the per-reason totals stay as they were
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("step 2/4 | loss 1.0000")
    assert "| dropped 1 (total 3: bad_image=2,prompt_too_long=1) | truncated 4 (total 7) | nonfinite_steps 1 |" in line

    # resumed after step 1: the interval counts from step 1's totals, read back from the JSONL
    resumed = MetricsLogger(str(path), None, None, is_writer=True, resume_step=1, total_steps=4)
    resumed.log(2, second)
    resumed.close()
    assert tuple(read_jsonl(path)[-1][k] for k in keys) == (1, 3, 4, 7)

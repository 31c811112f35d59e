"""Mistakes a user can make stop with one clear line (exit code 2), never a traceback."""

import subprocess
import sys

import pytest

from tests.conftest import base_config, write_config
from tests.distributed import REPO, worker_env

CASES = {
    "unknown loss name": (["mpo.preference=dpo"], "mpo section: unknown preference loss 'dpo'"),
    "negative beta": (["mpo.beta=-0.1"], "beta"),
    "weights all zero": (["mpo.weights.preference=0", "mpo.weights.quality=0", "mpo.weights.generation=0"], "weights"),
    "unknown key": (["train.learning_rate=1e-4"], "unknown config key 'train.learning_rate'"),
    "bad type": (["train.steps=many"], "train.steps must be"),
    "fp8 without transformer engine": (["precision.fp8=hybrid"], "transformer_engine"),
    "fp8 on a CPU machine": (["precision.fp8=hybrid", "model.spec=transformer_engine"], "Transformer Engine"),
    "cuda on a CPU machine": (["train.device=cuda"], "no CUDA GPU"),
    "tp does not fit the world": (["parallel.tensor=2"], "launch a multiple of 2"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_line_errors(workspace, tmp_path, name):
    overrides, expected = CASES[name]
    config = write_config(tmp_path / "c.yaml", base_config(workspace))
    proc = subprocess.run([sys.executable, "-m", "megatron_mpo.train", "--config", str(config), *overrides],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

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
    "tp without torchrun": (["parallel.tensor=2"], "needs 2 processes, but this one was started without torchrun; "
                            "start it as: torchrun --nproc-per-node 2 -m megatron_mpo.train --config "),
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


def test_make_shards_meta_given_an_annotation_file_suggests_jsonl(tmp_path):
    """Issue 28, item 12: a JSONL annotation file passed as --meta names --jsonl."""
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"image": "a.jpg", "question": "q", "chosen": "c", "rejected": "r"}\n' * 3)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "--meta", str(jsonl),
                           "--out", str(tmp_path / "shards")], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert f"use --jsonl {jsonl} (with --image-root and --name) instead of --meta" in line, line
    assert not (tmp_path / "shards").exists()

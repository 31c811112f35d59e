"""A shortened demo run learns visibly: held-out greedy-answer and preference accuracy
rise, and so do the training reward accuracy and margin (fixed seed)."""

import json
import subprocess
import sys

from tests.conftest import read_jsonl
from tests.distributed import REPO, worker_env


def test_short_demo_improves_accuracy(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mpo.demo", "--out", str(out), "--steps", "150", "--train-pairs", "512",
         "--heldout", "32", "--seed", "0"],
        cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "greedy-answer accuracy" in proc.stdout and "preference accuracy" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["greedy_accuracy_after"] >= summary["greedy_accuracy_before"] + 0.4, summary
    assert summary["preference_accuracy_after"] >= 0.75, summary
    assert (out / "training_curves.png").stat().st_size > 10_000

    records = read_jsonl(out / "metrics.jsonl")
    early, late = records[:4], records[-4:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(late, "reward_accuracy") >= mean(early, "reward_accuracy") + 0.3
    assert mean(late, "reward_margin") >= mean(early, "reward_margin") + 0.5
    assert mean(late, "loss") < mean(early, "loss")

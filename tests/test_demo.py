"""A shortened demo run learns visibly, twice: MPO on the given pairs, then one MPO round on
pairs built from the model's own sampled answers raises held-out answer accuracy (the
paper's loop: sample -> score -> pairs -> shards -> reference -> train -> evaluate, all at
TP=2 but the sampling). Fixed seeds."""

import json
import subprocess
import sys

from tests.conftest import read_jsonl
from tests.distributed import REPO, worker_env


def test_demo_learns_from_given_pairs_then_from_its_own_samples(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mpo.demo", "--out", str(out), "--steps", "60", "--train-pairs", "512",
         "--heldout", "24", "--self-steps", "60", "--self-questions", "160", "--seed", "0", "--skip-before"],
        cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "greedy-answer accuracy" in proc.stdout and "reward-margin accuracy" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    # MPO on the given pairs: the policy moves away from the reference towards the chosen side
    assert summary["after"]["preference"] >= 0.3 and "before" not in summary, summary
    # the model's own samples: some questions mixed right and wrong answers, so pairs exist
    own = summary["own_pairs"]
    assert own["pairs"] > 50 and own["all_wrong"] < own["questions"], own
    assert own["dropout_ntp_pairs"] > 0, own  # the questions without an answer (every 8th)
    # one round on them raises held-out answer accuracy (scored by the question set's scorer),
    # greedy and sampled (8 samples per question at temperature 1)
    assert summary["own_round"]["answer"] >= summary["after"]["answer"] + 0.15, summary
    assert summary["own_round"]["sampled"] >= summary["after"]["sampled"] + 0.08, summary
    assert (out / "training_curves.png").stat().st_size > 10_000

    records = read_jsonl(out / "metrics_mpo.jsonl")
    early, late = records[:3], records[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(late, "loss") < mean(early, "loss") - 1.0  # 60 steps: mostly the generation (SFT) term
    own_early, own_late = (lambda rs: (rs[:3], rs[-3:]))(read_jsonl(out / "own" / "metrics_round.jsonl"))
    assert mean(own_late, "reward_accuracy") >= mean(own_early, "reward_accuracy") + 0.3
    assert mean(own_late, "reward_margin") >= mean(own_early, "reward_margin") + 0.3

"""TP=2 x PP=2 on 4 real gloo processes gives the TP=1/PP=1 per-sequence log-probs."""

from pathlib import Path

import torch

from tests.distributed import launch

WORKER = Path(__file__).parent / "workers" / "gpt_logps.py"


def test_tp2_pp2_logps_match_tp1(tmp_path):
    out = tmp_path / "result.pt"
    launch(WORKER, 4, out, tmp_path / "ckpt")
    result = torch.load(out, weights_only=False)
    reference = result["reference"]
    assert len(reference) == 3 and len(result["parallel"]) == 2  # both TP ranks of the last stage
    for tp_result in result["parallel"]:
        for (c_ref, r_ref, l_ref), (c, r, l) in zip(reference, tp_result):
            torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(l, l_ref, atol=1e-5, rtol=0)
    # The backward pass ran on every stage and produced finite, non-zero gradients.
    for _pp, _tp, grads in result["parallel_grads"]:
        assert grads and all(torch.isfinite(torch.tensor(v)) for v in grads.values())
        assert sum(grads.values()) > 0
    # Replicated parameters (final norm on the last stage) see the same gradient as TP=1.
    final = [g["decoder.final_layernorm.weight"] for pp, _, g in result["parallel_grads"] if pp == 1]
    for g in final:
        assert abs(g - result["ref_grads"]["decoder.final_layernorm.weight"]) < 1e-4

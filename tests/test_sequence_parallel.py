"""Sequence parallelism at TP=2 on gloo: the same log-probs and gradients as TP=2 without it,
with the output layer still running on response positions only (tests/workers/sp_worker.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import base_config, write_config
from tests.distributed import launch

WORKER = Path(__file__).parent / "workers" / "sp_worker.py"


def test_tp2_sequence_parallel_matches_tp2(workspace, tmp_path):
    config = write_config(tmp_path / "c.yaml", base_config(workspace))
    launch(WORKER, 2, config, tmp_path, timeout=600)
    for layout in ("packed", "unpacked"):
        for rank in (0, 1):
            result = torch.load(tmp_path / f"{layout}_rank{rank}.pt", weights_only=False)
            plain, sp = result["plain"], result["sp"]
            assert result["pad_multiple"] == 2  # S % TP == 0 for the sequence-parallel scatter
            assert all(n % 2 == 0 for n in sp["positions"])
            for key in ("chosen", "rejected", "loss"):
                torch.testing.assert_close(sp[key], plain[key], rtol=0, atol=1e-5)
            assert set(sp["grads"]) == set(plain["grads"])
            for name, grad in plain["grads"].items():
                # Norm weights see half the sequence per rank under SP: finalize_model_grads
                # must sum them over TP for these to agree.
                torch.testing.assert_close(sp["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
            assert sum(float(g.norm()) for g in plain["grads"].values()) > 0
            # The output layer ran on scored positions only: all of them without SP; with SP
            # this rank's share, padded to the largest share (at most its part of the rows).
            assert plain["output_rows"] == plain["scored"]
            for rows, scored, positions in zip(sp["output_rows"], sp["scored"], sp["positions"]):
                assert (scored + 1) // 2 <= rows <= min(scored, positions // 2)

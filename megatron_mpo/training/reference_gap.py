"""How far the policy's first forward is from the reference values it is scored against.

Before any update the policy *is* the reference, so every implicit reward
``beta * (log pi - log pi_0)`` should be ~0 at step 1. A gap there is an offset that
enters the DPO margin and the BCO reward of every pair until training moves past it: a
reference computed in other numerics (an FP8 policy scored against a bf16 reference, the
``delayed`` recipe's only choice), or a reference from another checkpoint, template or
data.

The bound is on what reaches the loss. At step 1 the DPO margin of a pair is
``m = beta * (gap_chosen - gap_rejected)`` and its gradient weight is ``sigmoid(-m)``,
0.5 for a matched reference. A mean reward offset ``beta * |gap|`` of 0.1 per response
moves that weight to ``sigmoid(-0.1) = 0.475`` (5 %) in the worst case; the BCO term
``-log sigmoid(beta * gap - delta)`` moves by the same order. Above it the reference is
no longer the policy's own starting point, and the run says so. The gap is reported per
response token too, the number to compare across runs of other lengths (bf16 against
fp32 noise on the CPU tests is ~1e-4 per response, FP8 against bf16 on a GPU ~1e-2 per
token).
"""

from __future__ import annotations

import math
from typing import Optional

# Largest mean |beta * (log pi - log pi_0)| per response at step 1 that passes silently.
REWARD_OFFSET_BOUND = 0.1


def reference_gap_warning(abs_logratio: float, per_token: float, beta: float,
                          training: str, reference: str) -> Optional[str]:
    """One warning line when the step-1 reward offset exceeds :data:`REWARD_OFFSET_BOUND`.

    ``abs_logratio`` is the mean |log pi - log pi_0| of a response (nats) and ``per_token``
    the same divided by each response's tokens; ``training`` and ``reference`` describe the
    two precisions (:meth:`PrecisionPlan.describe`).
    """
    offset = beta * abs_logratio
    if not math.isfinite(offset) or offset <= REWARD_OFFSET_BOUND:
        return None
    weight = 1.0 / (1.0 + math.exp(offset))
    head = (f"reference gap at step 1: mean |log pi - log pi_ref| = {abs_logratio:.4g} nats per response "
            f"({per_token:.3g} per token), a reward offset beta*gap = {offset:.3g} above {REWARD_OFFSET_BOUND} "
            f"(a pair's DPO weight can move from 0.5 to {weight:.3f} before any update)")
    if training != reference:
        return (f"{head}: the policy computes in {training} but the reference values were computed in "
                f"{reference}; use a current-scaling recipe (precision.fp8_recipe: tensorwise) so both run "
                "the same FP8 numerics, and recompute the reference values")
    return (f"{head}: policy and reference share numerics ({training}), so the reference values are "
            "probably from another checkpoint, template, max_length or data; recompute them with this config")

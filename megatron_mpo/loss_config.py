"""The ``mpo`` section: the MPO loss's hyper-parameters, declared and checked once.

The run config nests :class:`MPOLossConfig` as its ``mpo`` section and the loss
(:mod:`megatron_mpo.losses`, which re-exports these names) takes it as is. Kept apart
from the loss so the run config reads its keys without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_mpo.errors import UserError
from megatron_mpo.models.moe_balance import AUX_LOSS_CONVENTIONS
from megatron_mpo.settings import one_of, setting

__all__ = ["PREFERENCE_LOSSES", "DELTA_UPDATES", "GENERATION_NORMS", "LossWeights", "MPOLossConfig"]

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
DELTA_UPDATES = ("step", "micro_batch")
GENERATION_NORMS = ("sequence", "token")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class LossWeights:
    """Weights of the three MPO terms (the paper's 0.8 / 0.2 / 1.0)."""

    preference: float = setting(0.8, "weight of the preference (DPO) term")
    quality: float = setting(0.2, "weight of the quality (BCO) term")
    generation: float = setting(1.0, "weight of the generation (SFT on the chosen response) term")


@dataclass
class MPOLossConfig:
    """The MPO loss (megatron_mpo.losses).

    Names follow TRL's DPOConfig where one exists. ``average_log_probs`` switches the
    preference and quality terms (and the reported rewards) from per-sequence log-prob
    sums to per-token averages. ``generation_norm`` picks the generation term's average:
    ``sequence`` (default, the paper's -log pi(y_c|x)/|y_c| per pair, then the mean over
    pairs; also what InternVL's released runs optimise: TRL's ``sft`` token mean over a
    micro-batch of 1 pair per GPU, averaged over micro-batches and ranks) or ``token``
    (chosen-token NLL summed over the step / its chosen tokens: TRL's ``sft`` with many pairs
    per micro-batch; long responses weigh more). ``delta_update`` picks how the BCO reward
    shift is kept (``losses.RewardShift``; README "Losses" says which layout each matches).
    Checked by :meth:`validate`, which the run config calls with every section's.
    """

    beta: float = setting(0.1, "reward scale: r = beta * (log pi - log pi_ref)")
    preference: str = setting("sigmoid", "preference loss (`sigmoid`: DPO)", choices=PREFERENCE_LOSSES)
    label_smoothing: float = setting(0.0, "assumed label noise in [0, 0.5) (`sigmoid` and `robust` only)")
    weights: LossWeights = field(default_factory=LossWeights)
    average_log_probs: bool = setting(False, "per-token average log-probs in the preference and quality "
                                      "terms instead of sequence sums")
    delta_update: str = setting("step", "BCO reward shift: mean over previous optimizer `step`s (paper) "
                                "or TRL's running mean per `micro_batch` (InternVL's released runs when "
                                "global_batch = DP x micro_batch)", choices=DELTA_UPDATES)
    router_aux_loss_coef: Optional[float] = setting(
        None, "mixture-of-experts LLMs: coefficient of the routers' load-balancing loss, read as "
        "`router_aux_loss_convention` says (added to the MPO loss through its gradient, padding left out, "
        "logged as `aux_loss`); null: the model's own (`router_aux_loss_coef` of its config), 0: off")
    router_aux_loss_convention: str = setting(
        "transformers", "what the coefficient weighs: `transformers` (the checkpoint's meaning: its "
        "`load_balancing_loss_func`, `top_k` at balance; megatron-core gets coefficient x top_k / MoE layers "
        "per layer) or `megatron` (megatron-core's own: the coefficient on each MoE layer's loss, 1 at balance)",
        choices=AUX_LOSS_CONVENTIONS)
    generation_norm: str = setting("sequence", "SFT term: mean over pairs of per-`sequence` token means (paper, "
                                   "and InternVL's released runs: 1 pair per GPU) or mean over all chosen "
                                   "`token`s of the step (TRL with several pairs per micro-batch)",
                                   choices=GENERATION_NORMS)

    def validate(self) -> None:
        """Raise :class:`UserError` (one line: what is wrong, how to fix it) on a bad value."""
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise UserError(f"mpo.router_aux_loss_coef must be >= 0 (or null), got {self.router_aux_loss_coef}")
        one_of("mpo.router_aux_loss_convention", self.router_aux_loss_convention, AUX_LOSS_CONVENTIONS)
        problem = self._loss_problem()
        if problem:
            raise UserError(f"mpo section: {problem}")

    def _loss_problem(self) -> Optional[str]:
        """The first bad value of the loss's own keys, in words (None: all good)."""
        if self.preference not in PREFERENCE_LOSSES:
            return f"unknown preference loss {self.preference!r}; choose one of {', '.join(PREFERENCE_LOSSES)}"
        if not _is_number(self.beta) or not math.isfinite(self.beta) or self.beta <= 0:
            return f"beta must be a positive number (the paper uses 0.1), got {self.beta!r}"
        if not _is_number(self.label_smoothing) or not 0.0 <= self.label_smoothing < 0.5:
            return f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}; use 0 to turn it off"
        if self.label_smoothing > 0 and self.preference not in ("sigmoid", "robust"):
            return (f"label_smoothing={self.label_smoothing} has no effect with preference {self.preference!r}; "
                    "set it to 0 or use preference sigmoid or robust")
        if not isinstance(self.weights, LossWeights):
            return f"loss weights must be LossWeights, got {type(self.weights).__name__}"
        for name in ("preference", "quality", "generation"):
            w = getattr(self.weights, name)
            if not _is_number(w) or not math.isfinite(w) or w < 0:
                return f"loss weight {name} must be a number >= 0, got {w!r}"
        if self.weights.preference == 0 and self.weights.quality == 0 and self.weights.generation == 0:
            return ("all loss weights (preference, quality, generation) are 0; set at least one above 0 "
                    "(the paper uses 0.8, 0.2, 1.0)")
        if not isinstance(self.average_log_probs, bool):
            return f"average_log_probs must be true or false, got {self.average_log_probs!r}"
        if self.delta_update not in DELTA_UPDATES:
            return f"unknown delta_update {self.delta_update!r}; choose one of {', '.join(DELTA_UPDATES)}"
        if self.generation_norm not in GENERATION_NORMS:
            return (f"unknown generation_norm {self.generation_norm!r}; choose one of {', '.join(GENERATION_NORMS)} "
                    "(sequence reproduces InternVL's released runs)")
        return None

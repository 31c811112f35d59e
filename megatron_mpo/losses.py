"""Mixed Preference Optimization loss (arXiv 2411.10442), usable by any trainer.

    L = w_p * L_p + w_q * L_q + w_g * L_g
    r_c = beta * (log pi(y_c|x) - log pi_0(y_c|x)),  r_r likewise for the rejected response
    L_p = preference loss on h = (log pi(y_c) - log pi_0(y_c)) - (log pi(y_r) - log pi_0(y_r))
    L_q = -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta))     (BCO pair)
    L_g = -log pi(y_c|x) / |y_c|                                      (SFT on the chosen response)

``generation_norm: token`` replaces the per-sequence L_g by the NLL of all chosen tokens
of the optimizer step over their number, as InternVL's MPO trainer (TRL's ``sft`` loss) does.

Everything here is pure torch; torch.distributed is used only to all-reduce the reward
shift ``delta`` over the data-parallel group, and megatron-core only for the optional
vocab-parallel token log-prob helper. The preference variants follow TRL's
``DPOTrainer.dpo_loss`` (v0.9-v0.28, huggingface/trl ``trl/trainer/dpo_trainer.py``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_mpo.errors import UserError
from megatron_mpo.loss_config import DELTA_UPDATES, GENERATION_NORMS, PREFERENCE_LOSSES, LossWeights, MPOLossConfig
from megatron_mpo.platform import collective_device

__all__ = [
    "PREFERENCE_LOSSES",
    "DELTA_UPDATES",
    "GENERATION_NORMS",
    "LossWeights",
    "MPOLossConfig",
    "RewardShift",
    "default_shift_group",
    "generation_loss",
    "mpo_loss",
    "MPOLoss",
    "preference_loss",
    "sequence_log_probs",
    "step_generation_tokens",
    "step_means",
    "token_log_probs_from_vocab_parallel_logits",
]

METRIC_NAMES = (
    "loss",
    "loss_preference",
    "loss_quality",
    "loss_generation",
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "reward_accuracy",
    "delta",
)


# --------------------------------------------------------------------------- reward shift


def _active_group_size(group: Optional[dist.ProcessGroup]) -> int:
    """World size of ``group``, or 1 when there is nothing to reduce over."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


_warned_local_shift = False


def default_shift_group(warn: bool = True) -> Optional[dist.ProcessGroup]:
    """megatron-core's data-parallel group when its parallel state is initialised, else None.

    None keeps the reward shift per rank. That is right for one process but silently
    wrong for several data-parallel replicas, so with several torch.distributed ranks and
    no parallel state it warns (once per process, when ``warn``).
    """
    global _warned_local_shift
    # Initialised parallel state means the module is imported; this never imports megatron.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group()
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if warn and several and not _warned_local_shift:
        _warned_local_shift = True
        warnings.warn(
            "MPOLoss got no process group and megatron parallel state is not initialised: the BCO "
            "reward shift (delta) stays local to each rank; pass group=<data-parallel group>",
            stacklevel=3,
        )
    return None


class RewardShift:
    """The BCO reward shift ``delta``: a running mean of past rewards.

    ``mode="step"`` (default; the paper's "moving average of previous rewards"): delta is
    the mean of every reward (chosen and rejected, each counted once) of all *previous*
    optimizer steps over the whole data-parallel group, and 0 during the first step. The
    loss calls :meth:`observe` for each micro-batch; the trainer calls :meth:`end_step`
    once per optimizer step, which all-reduces the step's (sum, count) and folds it in.
    Sums are float64 and counts exact, so delta does not depend on the micro-batch size or
    the data-parallel layout (up to float64 rounding). delta is constant within a step, so
    reading it never synchronizes with the GPU.

    ``mode="micro_batch"`` reproduces TRL's ``bco_pair`` (TRL v0.9.3-v0.28,
    ``DPOTrainer.dpo_loss`` + ``trl.trainer.utils.RunningMoments``): before computing the
    loss of every micro-batch, the scalar mean of that micro-batch's rewards
    ``cat(r_c, r_r).mean()`` is pushed into a running mean; with several processes each
    pushes its local micro-batch mean, they are summed over the group and the running
    mean gets their average with weight = number of processes (``get_global_statistics``
    over ``accelerator.reduce``). delta therefore includes the current micro-batch, is the
    equally weighted mean of micro-batch means, and needs a collective (over ``group``)
    inside every loss call. TRL keeps the running mean as a python float updated with
    float32 arithmetic and a 1e-24 initial count; here it is float64 with count 0, which
    agrees to float32 rounding. (TRL also updates during evaluation; call the loss with
    ``update_shift=False`` there if that is not wanted. TRL >= 0.29 dropped the shift.)
    """

    def __init__(self, mode: str = "step", group: Optional[dist.ProcessGroup] = None) -> None:
        if mode not in DELTA_UPDATES:
            raise UserError(f"unknown delta_update {mode!r}; choose one of {', '.join(DELTA_UPDATES)}")
        self.mode = mode
        self.group = group
        # Completed history: step mode -> sum and count of all rewards of finished steps;
        # micro_batch mode -> running mean and number of (per-process) updates.
        self._sum = 0.0
        self._count = 0.0
        self._mean = 0.0
        # Current step (step mode only): a float64 tensor on the rewards' device (so
        # observe() never syncs with the GPU) and an exact python count.
        self._step_sum: Optional[torch.Tensor] = None
        self._step_count = 0

    # -- reading
    def current(self) -> float:
        """delta to use for the micro-batch being computed now."""
        if self.mode == "step":
            return self._sum / self._count if self._count > 0 else 0.0
        return self._mean

    # -- step mode
    @torch.no_grad()
    def observe(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        """Accumulate this micro-batch's rewards into the running step (step mode)."""
        if self.mode != "step":
            raise RuntimeError("observe() is for delta_update='step'; micro_batch mode uses update()")
        total = chosen_rewards.detach().double().sum() + rejected_rewards.detach().double().sum()
        self._step_sum = total if self._step_sum is None else self._step_sum + total.to(self._step_sum.device)
        self._step_count += chosen_rewards.numel() + rejected_rewards.numel()

    @torch.no_grad()
    def end_step(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Fold the finished optimizer step into delta; call once per step on every DP rank.

        ``group`` is the data-parallel group (defaults to the one given at construction).
        It is a collective when the group has more than one rank. A no-op in micro_batch
        mode, where the shift moves inside every loss call.
        """
        if self.mode != "step":
            return
        group = group if group is not None else self.group
        hint = self._step_sum.device if self._step_sum is not None else None
        if _active_group_size(group) > 1:
            device = collective_device(group, hint)
            stats = torch.zeros(2, dtype=torch.float64, device=device)
            if self._step_sum is not None:
                stats[0] = self._step_sum.to(device)
            stats[1] = float(self._step_count)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            step_sum, step_count = stats.tolist()
        else:
            step_sum = float(self._step_sum.item()) if self._step_sum is not None else 0.0
            step_count = float(self._step_count)
        self._sum += step_sum
        self._count += step_count
        self._step_sum = None
        self._step_count = 0

    def discard_step(self) -> None:
        """Forget the current step's observations (the trainer skipped a non-finite step)."""
        self._step_sum = None
        self._step_count = 0

    # -- micro_batch mode
    @torch.no_grad()
    def update(
        self,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        """Push this micro-batch's mean reward into the running mean (micro_batch mode, TRL rule)."""
        if self.mode != "micro_batch":
            raise RuntimeError("update() is for delta_update='micro_batch'; step mode uses observe()")
        group = group if group is not None else self.group
        local_mean = torch.cat((chosen_rewards.detach().reshape(-1), rejected_rewards.detach().reshape(-1)))
        local_mean = local_mean.double().mean()
        n = _active_group_size(group)
        if n > 1:
            device = collective_device(group, local_mean.device)
            total = local_mean.to(device).reshape(1)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            batch_mean = float(total.item()) / n
        else:
            batch_mean = float(local_mean.item())
        new_count = self._count + n
        self._mean += (batch_mean - self._mean) * n / new_count
        self._count = new_count

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain python numbers, so it fits any checkpoint format.

        Holds completed history only: save after :meth:`end_step` (step mode), which is
        where trainers checkpoint anyway.
        """
        if self.mode == "step":
            return {"mode": "step", "sum": float(self._sum), "count": float(self._count)}
        return {"mode": "micro_batch", "mean": float(self._mean), "count": float(self._count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the mode must match this object's."""
        mode = state.get("mode")
        if mode != self.mode:
            raise UserError(
                f"the checkpoint's reward shift used delta_update={mode!r} but this run uses "
                f"{self.mode!r}; set delta_update to {mode!r} to resume"
            )
        if mode == "step":
            self._sum = float(state["sum"])
        else:
            self._mean = float(state["mean"])
        self._count = float(state["count"])
        self._step_sum = None
        self._step_count = 0


# --------------------------------------------------------------------------- the loss


def preference_loss(h: torch.Tensor, config: MPOLossConfig) -> torch.Tensor:
    """Per-pair preference loss on h = (pi_c - ref_c) - (pi_r - ref_r), as in TRL's dpo_loss.

    sigmoid: -(1-ls) logsig(beta h) - ls logsig(-beta h)   (ls > 0 is TRL's conservative DPO)
    robust:  (-(1-ls) logsig(beta h) + ls logsig(-beta h)) / (1 - 2 ls)
    hinge:   relu(1 - beta h)
    ipo:     (h - 1/(2 beta))^2
    TRL feeds IPO per-token *averaged* log-probs (it divides by the token count whenever
    "ipo" is selected); here IPO uses whatever form the config selects (sums by default),
    so set ``average_log_probs=True`` to match TRL's IPO.
    """
    beta, ls = config.beta, config.label_smoothing
    if config.preference == "sigmoid":
        return -F.logsigmoid(beta * h) * (1 - ls) - F.logsigmoid(-beta * h) * ls
    if config.preference == "robust":
        return (-F.logsigmoid(beta * h) * (1 - ls) + F.logsigmoid(-beta * h) * ls) / (1 - 2 * ls)
    if config.preference == "hinge":
        return torch.relu(1 - beta * h)
    if config.preference == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise UserError(f"unknown preference loss {config.preference!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")


def quality_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, delta: float) -> torch.Tensor:
    """BCO quality loss per pair: -log sig(r_c - delta) - log sig(-(r_r - delta)), delta the reward shift."""
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


def generation_loss(
    policy_chosen_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    norm: str = "sequence",
    tokens: Optional[float] = None,
) -> torch.Tensor:
    """SFT loss on the chosen responses from log-prob sums [B] and token counts [B].

    sequence: mean over pairs of -log pi(y_c|x) / |y_c| (the paper).
    token: -sum(log pi(y_c|x)) / ``tokens``; ``tokens`` None means this batch's chosen
    tokens (TRL's ``sft``: cross entropy over every chosen token of the batch). A trainer
    that averages the losses of several micro-batches and data-parallel ranks passes
    :func:`step_generation_tokens` so the average is the whole step's token mean.
    """
    if norm == "sequence":
        return (-policy_chosen_logps / chosen_lengths.clamp(min=1)).mean()
    if norm != "token":
        raise UserError(f"unknown generation_norm {norm!r}; choose one of {', '.join(GENERATION_NORMS)}")
    if tokens is None:
        return -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
    if not tokens > 0:
        raise ValueError(f"generation tokens must be > 0, got {tokens!r}")
    return -policy_chosen_logps.sum() / tokens


def step_means(
    counts: Mapping[str, float], micro_batches: int, group: Optional[dist.ProcessGroup] = None
) -> dict[str, float]:
    """Per name, the step's count per micro-batch: the divisors of step-level means.

    megatron-core's schedule divides every micro-batch loss by the number of micro-batches
    and DDP averages gradients over data-parallel ranks: the step optimises the mean of
    the micro-batch losses. A micro-batch that divides its *sum* over pairs (or tokens) by
    (the step's pairs / (micro-batches x DP ranks)) makes that mean the step's mean over
    all its pairs (tokens), however the pairs were split into micro-batches and rows --
    micro-batches may hold different numbers of them. ``counts`` and ``micro_batches``
    are this rank's; they are summed over ``group`` in one all-reduce (a collective:
    every rank of the group calls it once per step). A count of 0 becomes 1 (its sum is 0).
    """
    if micro_batches <= 0:
        raise ValueError(f"micro_batches must be > 0, got {micro_batches}")
    names = list(counts)
    stats = [float(counts[n]) for n in names] + [float(micro_batches)]
    if _active_group_size(group) > 1:
        summed = torch.tensor(stats, dtype=torch.float64, device=collective_device(group))
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        stats = summed.tolist()
    batches = stats[-1]
    return {n: max(v, 1.0) / batches for n, v in zip(names, stats)}


def step_generation_tokens(
    chosen_tokens: float, micro_batches: int, group: Optional[dist.ProcessGroup] = None
) -> float:
    """Chosen tokens per micro-batch over one optimizer step, for ``generation_norm: token``
    (see :func:`step_means`): with it each micro-batch's chosen NLL sum averages to the
    step's chosen NLL over its chosen tokens, independent of micro-batch size and layout."""
    return step_means({"tokens": chosen_tokens}, micro_batches, group)["tokens"]


def mpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    config: MPOLossConfig,
    reward_shift: RewardShift,
    *,
    update_shift: bool = True,
    generation_tokens: Optional[float] = None,
    step_pairs: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MPO loss of one (micro-)batch: w_p*mean(L_p) + w_q*mean(L_q) + w_g*L_g.

    Inputs are shape [B]: per-sequence log-prob *sums* over the response tokens (policy
    with grad, reference without) and response token counts. Returns the scalar loss and
    detached metrics (batch means). A term whose weight is 0 is not computed (reported 0).
    When the quality weight is > 0 and ``update_shift`` is true the reward shift is fed
    (step mode: observe; micro_batch mode: update, a collective over its group). Pass
    ``update_shift=False`` for evaluation. ``generation_tokens`` is the token-mean divisor
    of ``generation_norm: token`` (see :func:`generation_loss`); ignored for ``sequence``.
    """
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    # A response with no tokens would divide by 0; such a sample contributes a 0 sum anyway.
    n_c = chosen_lengths.to(device=pc.device, dtype=dtype).clamp(min=1)
    n_r = rejected_lengths.to(device=pc.device, dtype=dtype).clamp(min=1)
    if config.average_log_probs:
        pc_s, pr_s, rc_s, rr_s = pc / n_c, pr / n_r, rc / n_c, rr / n_r
    else:
        pc_s, pr_s, rc_s, rr_s = pc, pr, rc, rr
    chosen_logratio = pc_s - rc_s
    rejected_logratio = pr_s - rr_s
    chosen_rewards = config.beta * chosen_logratio
    rejected_rewards = config.beta * rejected_logratio

    w = config.weights
    zero = pc.new_zeros(())
    loss = zero
    if step_pairs is not None and not step_pairs > 0:
        raise ValueError(f"step_pairs must be > 0, got {step_pairs!r}")

    def pair_mean(values: torch.Tensor) -> torch.Tensor:
        return values.mean() if step_pairs is None else values.sum() / step_pairs

    loss_p = zero
    if w.preference > 0:
        loss_p = pair_mean(preference_loss(chosen_logratio - rejected_logratio, config))
        loss = loss + w.preference * loss_p

    loss_q = zero
    if w.quality > 0:
        if reward_shift.mode == "micro_batch":
            if update_shift:
                reward_shift.update(chosen_rewards, rejected_rewards)
            delta = reward_shift.current()
        else:
            delta = reward_shift.current()  # previous steps only
            if update_shift:
                reward_shift.observe(chosen_rewards, rejected_rewards)
        loss_q = pair_mean(quality_loss(chosen_rewards, rejected_rewards, delta))
        loss = loss + w.quality * loss_q

    loss_g = zero
    if w.generation > 0:
        lengths = chosen_lengths.to(device=pc.device, dtype=dtype)
        if config.generation_norm == "sequence" and step_pairs is not None:
            loss_g = pair_mean(-pc / lengths.clamp(min=1))
        else:
            loss_g = generation_loss(pc, lengths, config.generation_norm, generation_tokens)
        loss = loss + w.generation * loss_g

    with torch.no_grad():
        cr, rj = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {
            "loss": loss.detach().clone(),  # the schedule scales the loss in place
            "loss_preference": loss_p.detach(),
            "loss_quality": loss_q.detach(),
            "loss_generation": loss_g.detach(),
            # Shares of the step's pair means (as the losses): micro-batches may hold different counts.
            "reward_chosen": pair_mean(cr),
            "reward_rejected": pair_mean(rj),
            "reward_margin": pair_mean(cr - rj),
            "reward_accuracy": pair_mean((cr > rj).to(dtype)),
            "delta": torch.tensor(reward_shift.current(), dtype=dtype, device=pc.device),
        }
    return loss, metrics


class MPOLoss:
    """``mpo_loss`` bundled with its :class:`RewardShift`, for trainers that want one object.

    ``group`` is the data-parallel process group the shift is reduced over; without one,
    megatron-core's data-parallel group when its parallel state is initialised (a shift
    kept per rank would differ between replicas), see :func:`default_shift_group`.
    """

    def __init__(self, config: MPOLossConfig, group: Optional[dist.ProcessGroup] = None) -> None:
        self.config = config
        if group is None:
            group = default_shift_group(warn=config.weights.quality > 0)
        self.reward_shift = RewardShift(config.delta_update, group=group)

    def __call__(self, *sequences: torch.Tensor, **options: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`mpo_loss` of its six per-sequence tensors (policy and reference log-prob
        sums, chosen and rejected lengths) with this loss's config and reward shift;
        ``options`` are :func:`mpo_loss`'s keyword options."""
        return mpo_loss(*sequences, self.config, self.reward_shift, **options)

    def end_step(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Call once after every optimizer step (see :meth:`RewardShift.end_step`)."""
        self.reward_shift.end_step(group)

    def state_dict(self) -> dict[str, Any]:
        return {"reward_shift": self.reward_shift.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reward_shift.load_state_dict(state["reward_shift"])


# --------------------------------------------------------------------------- log-prob helpers


def sequence_log_probs(
    token_log_probs: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-token log-probs [B, S] over response tokens (``loss_mask`` true/1) -> (sums [B], counts [B]).

    Masked positions are replaced by 0 rather than multiplied, so garbage there (e.g. from
    label -100) cannot leak in as NaN. With context parallelism, all-reduce both outputs
    over the CP group before calling :func:`mpo_loss`.
    """
    if token_log_probs.shape != loss_mask.shape:
        raise ValueError(
            f"token_log_probs {tuple(token_log_probs.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape"
        )
    mask = loss_mask.bool()
    sums = torch.where(mask, token_log_probs, torch.zeros_like(token_log_probs)).sum(dim=-1)
    counts = mask.sum(dim=-1)
    return sums, counts


def token_log_probs_from_vocab_parallel_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position from (tensor-parallel) vocab-sharded logits, without gathering the vocab.

    ``logits`` has shape ``labels.shape + [V / tp]``: megatron-core 0.16 ``GPTModel.forward``
    with ``labels=None`` returns [B, S, V/tp] (it transposes its internal [S, B, V/tp]),
    so pass labels [B, S]; [S, B, V/tp] with labels [S, B] works too, the op is elementwise
    over the leading dims. ``labels[..., t]`` must be the token that ``logits[..., t, :]``
    predicts (already shifted). Positions with a label outside [0, V) (e.g. -100) get a
    meaningless finite value: mask them out. Needs megatron ``parallel_state`` initialized
    (TP=1 is fine). Caution: megatron's kernel works in place, so float32 ``logits`` are
    overwritten (bf16/fp16 ones are copied by ``.float()``); pass a clone if you still need
    them. Alternatively ``GPTModel(..., labels=labels)`` returns the same per-token cross
    entropy [B, S] directly (negate it).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} plus a vocab dimension"
        )
    return -vocab_parallel_cross_entropy(logits.float(), labels)

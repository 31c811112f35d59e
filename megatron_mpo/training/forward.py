"""The forward step shared by the trainer and the reference tool.

megatron-core's pipeline schedules call ``forward_step(data_iterator, model)`` once per
micro-batch on every stage. Every stage draws the same micro-batch (tensor and pipeline
ranks of one replica read identical data); the first stage feeds token ids and image
tiles, the last stage turns per-token losses into per-response log-prob sums and, when
training, into the MPO loss. With ``forward_only=True`` (the reference tool) the same
function only collects log-probs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from megatron_mpo import platform
from megatron_mpo.batch import PairBatch
from megatron_mpo.losses import MPOLoss, step_means
from megatron_mpo.training.checkpoint import unwrap_model


def slot_log_probs(
    token_nll: torch.Tensor, response_index: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-token log-probs into response slots.

    ``token_nll`` is megatron-core's per-token cross entropy ``-log p(label)`` [R, S]
    (computed vocab-parallel: the full vocabulary is never gathered). Returns the
    log-prob sum and token count of every slot; the layout of rows (unpacked or packed)
    does not matter because ``response_index`` names the slot of each token.
    """
    index = response_index.reshape(-1)
    keep = index >= 0
    values = -token_nll.reshape(-1)[keep].float()
    slots = index[keep]
    sums = torch.zeros(num_slots, dtype=torch.float32, device=values.device).index_add(0, slots, values)
    counts = torch.zeros(num_slots, dtype=torch.float32, device=values.device).index_add(
        0, slots, torch.ones_like(values)
    )
    return sums, counts


def chosen_tokens(batch: PairBatch) -> int:
    """Scored tokens of the batch's chosen responses (slots below ``num_pairs``)."""
    index = batch.response_index
    return int(((index >= 0) & (index < batch.num_pairs)).sum())


@dataclass
class StepContext:
    """What a micro-batch's loss needs to know about its whole optimizer step.

    The divisors that make each micro-batch's loss a share of the step's means over all
    its micro-batches on all data-parallel ranks (:func:`~megatron_mpo.losses.step_means`),
    so the update does not depend on how the step's pairs were split into micro-batches
    and rows: ``pairs`` (pairs per micro-batch) and ``generation_tokens`` (chosen tokens
    per micro-batch, for ``generation_norm: token``). Set by :meth:`start` before the
    schedule runs; None means each micro-batch's own mean.
    """

    pairs: Optional[float] = None
    generation_tokens: Optional[float] = None

    def start(self, mpo: MPOLoss, micro_batches: list[PairBatch], group) -> None:
        """Prepare for a step of ``micro_batches``; one collective over ``group`` (the DP
        group) on every rank."""
        counts = {"pairs": sum(b.num_pairs for b in micro_batches),
                  "tokens": sum(chosen_tokens(b) for b in micro_batches)}
        means = step_means(counts, len(micro_batches), group)
        self.pairs = means["pairs"]
        token_norm = mpo.config.generation_norm == "token" and mpo.config.weights.generation > 0
        self.generation_tokens = means["tokens"] if token_norm else None


def _takes(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(unwrap_model(model).forward).parameters


def _is_first_chunk(model: torch.nn.Module) -> bool:
    """True unless ``model`` is a later virtual-pipeline chunk (no embedding / vision)."""
    return bool(getattr(unwrap_model(model), "pre_process", True))


def model_inputs(model: torch.nn.Module, batch: PairBatch) -> dict:
    """Keyword arguments of the model call for one micro-batch."""
    kwargs = dict(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.segments,  # None (causal rows) or the packed-row layout
        labels=batch.labels,
        loss_mask=batch.response_mask(),  # the output layer runs on response tokens only
    )
    if _takes(model, "pixel_values"):
        kwargs.update(pixel_values=batch.pixel_values, image_token_index=batch.image_token_index)
    if batch.padding is not None and _takes(model, "padding_mask"):
        kwargs.update(padding_mask=batch.padding)  # out of MoE load balancing
    return kwargs


def make_forward_step(
    mpo: Optional[MPOLoss],
    on_batch: Optional[Callable[[PairBatch], None]] = None,
    step: Optional[StepContext] = None,
) -> Callable:
    """Build the schedule's forward step.

    ``mpo`` None means forward-only log-prob collection (no reference values needed).
    ``on_batch`` sees every micro-batch drawn (the trainer counts samples and tokens).
    ``step`` is read at every micro-batch; the trainer refreshes it once per step.
    """

    def forward_step(data_iterator: Iterator[PairBatch], model: torch.nn.Module):
        # Causal rows carry no mask: the model builds one only where its attention needs it
        # (the local spec); Transformer Engine's causal kernels take none.
        batch = next(data_iterator)
        if on_batch is not None and _is_first_chunk(model):  # each chunk draws every micro-batch
            on_batch(batch)  # counted on the host copy: no device sync per micro-batch
        batch = batch.to(platform.device())
        output = model(**model_inputs(model, batch))

        def loss_func(token_nll: torch.Tensor):
            sums, counts = slot_log_probs(token_nll, batch.response_index, batch.num_slots)
            p = batch.num_pairs
            chosen, rejected = sums[:p], sums[p:]
            n_chosen, n_rejected = counts[:p], counts[p:]
            collected = {
                "policy_chosen_logps": chosen.detach(),
                "policy_rejected_logps": rejected.detach(),
                "chosen_tokens": n_chosen.detach(),
                "rejected_tokens": n_rejected.detach(),
                "keys": batch.keys,
            }
            if batch.ref_chosen_logps is not None:  # the reference values the loader joined
                collected.update(ref_chosen_logps=batch.ref_chosen_logps, ref_rejected_logps=batch.ref_rejected_logps)
            if mpo is None:
                return torch.zeros((), device=sums.device), collected
            loss, metrics = mpo(
                chosen,
                rejected,
                batch.ref_chosen_logps.to(sums.device).float(),
                batch.ref_rejected_logps.to(sums.device).float(),
                n_chosen,
                n_rejected,
                generation_tokens=step.generation_tokens if step is not None else None,
                step_pairs=step.pairs if step is not None else None,
            )
            ref_c = batch.ref_chosen_logps.to(sums.device).float()
            ref_r = batch.ref_rejected_logps.to(sums.device).float()
            # Before any update policy == reference: this is ~0 when the sidecars are right.
            gaps = torch.cat([(chosen - ref_c).abs(), (rejected - ref_r).abs()])
            tokens = torch.cat([n_chosen, n_rejected]).float().clamp(min=1)
            # Response means over the step (a share of them per micro-batch, as the losses).
            responses = 2 * step.pairs if step is not None and step.pairs is not None else gaps.numel()
            metrics = {**metrics, **collected, "abs_logratio": gaps.sum().detach() / responses,
                       "abs_logratio_per_token": (gaps / tokens).sum().detach() / responses}
            return loss, metrics

        return output, loss_func

    return forward_step

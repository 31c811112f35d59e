"""Held-out evaluation during training: the MPO loss and its parts on pairs the run never
trains on, every ``eval.interval`` steps and at the last step.

Why here and not a separate job: the numbers come from the policy being trained, on the
trainer's own layout (TP / PP / DP / EP), between two optimizer steps, at the price of one
forward per held-out pair and no optimizer state. Nothing the run trains on changes: the
held-out loader is its own (the training data order is untouched), the model is switched to
eval mode (no dropout, no drop path) and back, every RNG is saved and restored around it,
and the BCO shift is read, never fed (``update_shift=False``). A resumed run therefore
trains exactly as an uninterrupted one, evaluations included.

The metrics are those of :func:`megatron_mpo.losses.mpo_loss` over the whole held-out set
at once (pair means; the ``token`` generation norm over all its chosen tokens), with the
run's current BCO shift, plus the policy's mean log-prob per response token of chosen and
rejected answers and the number of pairs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from megatron_mpo.config import RunConfig
from megatron_mpo.errors import UserError
from megatron_mpo.parallel import Layout
from megatron_mpo.training import data_setup
from megatron_mpo.training.forward import make_forward_step
from megatron_mpo.training.forward_only import ForwardOnly, groups_of, needs_lockstep

MICRO_BATCHES_PER_CALL = 8  # micro-batches per forward-only schedule call
_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
           "chosen_tokens", "rejected_tokens")


def eval_run_config(cfg: RunConfig) -> Optional[RunConfig]:
    """The run config with the held-out shards and sidecars as its data (None: no eval).

    Everything else (template, lengths, tiling, precision) is the run's, so the held-out
    sidecars are checked against the same fingerprint as the training ones.
    """
    if not cfg.eval.shards:
        return None
    data = dataclasses.replace(cfg.data, shards=cfg.eval.shards, ref_logps=cfg.eval.ref_logps, on_missing_ref="error")
    return dataclasses.replace(cfg, data=data)


def check_eval_values(cfg: RunConfig, model_config) -> None:
    """Refuse a damaged, stale or mismatching held-out sidecar before step 1 (one line)."""
    heldout = eval_run_config(cfg)
    if heldout is None:
        return
    try:
        data_setup.check_reference_values(heldout, model_config)
    except UserError as exc:
        raise UserError(f"eval.ref_logps: {exc}") from None


class HeldOutEval:
    """Scores the held-out pairs with the current policy; :meth:`run` on every rank."""

    def __init__(self, cfg: RunConfig, model_config, tok, layout: Layout, chunks: list, mpo) -> None:
        from megatron_mpo.data import build_loader

        heldout = eval_run_config(cfg)
        if heldout is None:
            raise ValueError("no eval.shards in this config")
        self.cfg, self.layout, self.chunks, self.mpo = cfg, layout, chunks, mpo
        data = dataclasses.replace(data_setup.loader_data(heldout, model_config), num_workers=0, shuffle_buffer=0)
        plan = dataclasses.replace(data_setup.loader_plan(heldout, model_config), epochs=1, drop_last=False,
                                   shuffle_shards=False)
        self._loader = lambda: build_loader(data, plan, tok, dp_rank=layout.data_rank, dp_size=layout.data)
        self._fillers: list = []
        self.passes = ForwardOnly(chunks, make_forward_step(None), tok.pad_id, per_call=MICRO_BATCHES_PER_CALL,
                                  lockstep=needs_lockstep(model_config, cfg.parallel.expert), filler=self._filler)

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.eval.interval == 0 or step == total_steps

    def _filler(self):
        """Any held-out micro-batch: what a lockstep round runs on a rank that has none left."""
        if not self._fillers:
            self._fillers.extend(next(groups_of(iter(self._loader()), 1), []))
        if not self._fillers:
            raise UserError(f"eval.shards {self.cfg.eval.shards} hold no usable pair for this rank")
        return self._fillers[0]

    def run(self) -> dict:
        """The held-out metrics, the same on every rank. A collective."""
        from megatron_mpo.training.rng_state import capture_rng_state, restore_rng_state

        started = time.perf_counter()
        rng = capture_rng_state()
        modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        rows: list[tuple] = []
        try:
            holds_results = self.layout.is_last_stage and self.layout.tensor_rank == 0
            for group, results in self.passes.rounds(groups_of(iter(self._loader()), MICRO_BATCHES_PER_CALL),
                                                     group_of=lambda group: group):
                if group is None or not holds_results:
                    continue
                for r in results:
                    if r.get("ref_chosen_logps") is None:
                        raise UserError("eval.ref_logps holds no values for the held-out pairs")
                    rows.extend(zip(*(r[name].double().cpu().tolist() for name in _FIELDS)))
        finally:
            for chunk, training in zip(self.chunks, modes):
                chunk.train(training)
            restore_rng_state(rng)
        # The BCO shift lives on the last pipeline stage (the last global rank is one): the
        # metrics are computed there and handed to every rank (global rank 0 logs them).
        world = torch.distributed.get_world_size()
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        result: list = [None]
        if torch.distributed.get_rank() == world - 1:
            every = [row for part in gathered for row in part]
            result[0] = (heldout_metrics(torch.tensor(every, dtype=torch.float64), self.cfg.mpo,
                                         self.mpo.reward_shift) if every else None)
        torch.distributed.broadcast_object_list(result, src=world - 1)
        if result[0] is None:
            raise UserError(f"eval.shards {self.cfg.eval.shards} hold no usable pair (all dropped or empty)")
        return {**result[0], "seconds": time.perf_counter() - started}


def heldout_metrics(values: torch.Tensor, config, reward_shift) -> dict:
    """The MPO metrics of every held-out pair at once. ``values``: [pairs, 6] in the order
    policy chosen / rejected log-prob sums, reference chosen / rejected, chosen / rejected
    response tokens."""
    from megatron_mpo.losses import mpo_loss

    pc, pr, rc, rr, nc, nr = values.unbind(1)
    _, metrics = mpo_loss(pc, pr, rc, rr, nc, nr, config, reward_shift, update_shift=False)
    out = {k: float(v) for k, v in metrics.items() if v.numel() == 1}
    out.update(chosen_logp_per_token=float((pc / nc.clamp(min=1)).mean()),
               rejected_logp_per_token=float((pr / nr.clamp(min=1)).mean()),
               pairs=int(values.shape[0]))
    return out

"""The micro-batch contract between the data pipeline, the model and the losses.

One micro-batch holds ``P`` preference pairs. Every image tile of a pair is stored once
in ``pixel_values``; both of the pair's responses read the same vision features through
``image_token_index``. Responses are identified by a *response slot*: slot ``i`` is the
chosen response of pair ``i`` and slot ``P + i`` its rejected response. Token rows may
hold one response each (unpacked: row ``r`` is slot ``r``) or a shared prompt followed by
both responses (packed, several pairs per row); the model and the losses only see slots,
so both layouts give the same per-sequence log-probs.

Packed rows describe who may attend to whom with ``segments`` ([R, S] int): position
``t`` holds ``3 * pair + branch`` (``pair`` counts the pairs of its row from 0;
``branch`` is ``PROMPT``, ``CHOSEN`` or ``REJECTED``). Query ``t`` sees key ``u`` iff
``u <= t``, both belong to the same pair, and ``u`` is in the prompt or in ``t``'s own
branch: each response sees its own prompt and itself, causally, and nothing of another
pair. Trailing padding is one more "pair" of prompt positions (causal among itself, so
no softmax row is empty). This [R, S] tensor is all the attention needs: the SDPA path
splits rows at pair boundaries, FlexAttention builds its block mask from it, and
:func:`segment_mask` gives the dense mask where one is wanted. Nothing of size S x S
travels with a micro-batch. ``padding`` ([R, S] bool) marks the positions past a row's
tokens in either layout: mixture-of-experts routers leave them out of their load-balancing
loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Union

import torch

from megatron_mpo.segments import BRANCHES, PROMPT, pair_spans


@dataclass
class PairBatch:
    """A collated micro-batch. ``R`` token rows of length ``S``, ``T`` image tiles."""

    input_ids: torch.Tensor  # [R, S] long; image positions hold the IMG_CONTEXT id
    position_ids: torch.Tensor  # [R, S] long
    labels: torch.Tensor  # [R, S] long; target of position t (token t+1), 0 where unused
    response_index: torch.Tensor  # [R, S] long; slot whose log-prob sum label t adds to, -1 = none
    image_token_index: torch.Tensor  # [R, S] long; row in the flat [T*tokens_per_tile] vision features, -1 = text
    pixel_values: torch.Tensor  # [T, 3, H, W] float; T may be 0 (text-only micro-batch)
    num_pairs: int  # P
    segments: Optional[torch.Tensor] = None  # [R, S] int32 packed-row layout (see module doc); None = causal
    padding: Optional[torch.Tensor] = None  # [R, S] bool, True past a row's tokens; None = no padding
    ref_chosen_logps: Optional[torch.Tensor] = None  # [P] float64/float32 reference sums
    ref_rejected_logps: Optional[torch.Tensor] = None  # [P]
    keys: list = field(default_factory=list)  # sample keys, for joins and debugging
    epoch: Optional[Union[int, list]] = None  # the loader epoch of the pairs, or one per pair (balanced steps)

    def pair_epochs(self) -> list:
        """The loader epoch of each pair."""
        return list(self.epoch) if isinstance(self.epoch, list) else [self.epoch] * self.num_pairs

    @property
    def num_slots(self) -> int:
        return 2 * self.num_pairs

    def to(self, device: torch.device) -> "PairBatch":
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return PairBatch(**moved)

    def num_tokens(self) -> int:
        """Tokens the model computes on (all positions of all rows)."""
        return int(self.input_ids.numel())

    def attended_keys(self) -> int:
        """Query-key pairs the attention computes over all rows (the score FLOPs): S(S+1)/2
        per causal row; per pair of a packed row its prompt + chosen causally, and each
        rejected position the prompt plus the rejected ones up to it."""
        rows, S = self.input_ids.shape
        if self.segments is None:
            return rows * S * (S + 1) // 2
        total = 0
        for spans in pair_spans(self.segments):
            for start, chosen, rejected, end in spans:
                head, tail = rejected - start, end - rejected
                total += head * (head + 1) // 2 + tail * (chosen - start) + tail * (tail + 1) // 2
        return total

    def response_mask(self) -> torch.Tensor:
        """[R, S] bool: the positions whose label is a response token (the ones scored)."""
        return self.response_index >= 0


def pad_to_length(batch: PairBatch, seq_len: int, pad_id: int = 0) -> PairBatch:
    """``batch`` with every row padded at the end to ``seq_len`` positions.

    Padding is invisible: it adds no log-prob (``response_index`` -1), no image features,
    no real position attends to it (causal order, or a segment of its own), and no router
    counts it (``padding``). Used where the schedule needs one shape for all micro-batches
    of a step (interleaved pipeline).
    """
    rows, length = batch.input_ids.shape
    extra = seq_len - length
    if extra <= 0:
        return batch

    def grow(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((rows, extra), value)], dim=1)

    positions = batch.position_ids[:, -1:] + torch.arange(1, extra + 1).unsqueeze(0)
    segments = None
    if batch.segments is not None:  # the padding joins (or starts) each row's trailing pad segment
        last = batch.segments[:, -1:]
        pad_segment = torch.where(last % BRANCHES == PROMPT, last, (last // BRANCHES + 1) * BRANCHES)
        segments = torch.cat([batch.segments, pad_segment.expand(rows, extra)], dim=1)
    padding = batch.padding if batch.padding is not None else torch.zeros(rows, length, dtype=torch.bool)
    return PairBatch(
        input_ids=grow(batch.input_ids, pad_id),
        position_ids=torch.cat([batch.position_ids, positions], dim=1),
        labels=grow(batch.labels, 0),
        response_index=grow(batch.response_index, -1),
        image_token_index=grow(batch.image_token_index, -1),
        pixel_values=batch.pixel_values,
        num_pairs=batch.num_pairs,
        segments=segments,
        padding=grow(padding, True),
        ref_chosen_logps=batch.ref_chosen_logps,
        ref_rejected_logps=batch.ref_rejected_logps,
        keys=batch.keys,
        epoch=batch.epoch,
    )

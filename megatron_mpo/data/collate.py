"""Collation of tokenized pairs into a :class:`~megatron_mpo.batch.PairBatch`.

Two layouts give the same per-slot log-prob sums:

- ``unpacked``: rows ``0..P-1`` are prompt+chosen, rows ``P..2P-1`` prompt+rejected,
  padded to the longest row (rounded up to ``pad_multiple``); causal attention.
- ``packed``: one row per pair, ``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``.
  The prompt's last token is repeated at the start of each branch so that each branch
  predicts its own first response token; each branch sees the shared prefix and itself
  only (explicit mask), and both branches take positions from ``len(prompt) - 1`` on, as
  in the unpacked rows. The image is encoded once per pair in both layouts.

Labels are the next token at response positions only (0 elsewhere); ``response_index``
holds the slot there (chosen ``i``, rejected ``P + i``) and -1 elsewhere.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron_mpo.batch import PairBatch
from megatron_mpo.data.samples import TokenizedPair

LAYOUTS = ("unpacked", "packed")


def _round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple if multiple > 1 else n


def _image_rows(pairs: Sequence[TokenizedPair], context_id: int, tokens_per_tile: int) -> List[torch.Tensor]:
    """Per pair: prompt positions of its IMG_CONTEXT tokens and their feature rows."""
    out = []
    offset = 0
    for pair in pairs:
        prompt = torch.tensor(pair.prompt, dtype=torch.long)
        where = (prompt == context_id).nonzero(as_tuple=True)[0]
        expected = pair.num_tiles * tokens_per_tile
        if where.numel() != expected:
            raise ValueError(f"{pair.key}: {where.numel()} image tokens for {pair.num_tiles} tiles x {tokens_per_tile}")
        out.append((where, torch.arange(offset, offset + expected, dtype=torch.long)))
        offset += expected
    return out


def _pixels(pairs: Sequence[TokenizedPair]) -> torch.Tensor:
    return torch.cat([p.pixel_values for p in pairs]) if pairs else torch.zeros(0, 3, 1, 1)


def _refs(pairs: Sequence[TokenizedPair]):
    if all(p.ref_chosen is not None for p in pairs):
        return (
            torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64),
            torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64),
        )
    return None, None


def _rows(n: int, S: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` empty rows of length ``S``: input_ids (padding), labels (0), response_index and
    image_token_index (-1)."""
    return (
        torch.full((n, S), pad_id, dtype=torch.long),
        torch.zeros((n, S), dtype=torch.long),
        torch.full((n, S), -1, dtype=torch.long),
        torch.full((n, S), -1, dtype=torch.long),
    )


def _batch(
    pairs: Sequence[TokenizedPair],
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    response_index: torch.Tensor,
    image_token_index: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor],
) -> PairBatch:
    """The filled rows + what every layout takes from the pairs alike (pixels, refs, keys)."""
    ref_c, ref_r = _refs(pairs)
    return PairBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        labels=labels,
        response_index=response_index,
        image_token_index=image_token_index,
        pixel_values=_pixels(pairs),
        num_pairs=len(pairs),
        attention_mask=attention_mask,
        ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r,
        keys=[p.key for p in pairs],
    )


def collate_unpacked(
    pairs: Sequence[TokenizedPair], pad_id: int, context_id: int, tokens_per_tile: int, pad_multiple: int = 1
) -> PairBatch:
    """Two rows per pair (chosen rows first), causal attention."""
    P = len(pairs)
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    lengths = [len(pairs[r % P].prompt) + len(responses[r]) for r in range(2 * P)]
    S = _round_up(max(lengths), pad_multiple)
    input_ids, labels, response_index, image_token_index = _rows(2 * P, S, pad_id)
    images = _image_rows(pairs, context_id, tokens_per_tile)
    for r in range(2 * P):
        pair = pairs[r % P]
        lp, resp = len(pair.prompt), responses[r]
        row = torch.tensor(pair.prompt + resp, dtype=torch.long)
        input_ids[r, : row.numel()] = row
        labels[r, lp - 1 : lp - 1 + len(resp)] = row[lp:]
        response_index[r, lp - 1 : lp - 1 + len(resp)] = r
        where, feature_rows = images[r % P]
        image_token_index[r, where] = feature_rows
    position_ids = torch.arange(S, dtype=torch.long).unsqueeze(0).expand(2 * P, S).contiguous()
    return _batch(pairs, input_ids, position_ids, labels, response_index, image_token_index, attention_mask=None)


def collate_packed(
    pairs: Sequence[TokenizedPair], pad_id: int, context_id: int, tokens_per_tile: int, pad_multiple: int = 1
) -> PairBatch:
    """One row per pair: shared prompt, then each response in its own masked branch."""
    P = len(pairs)
    lengths = [len(p.prompt) + len(p.chosen) + len(p.rejected) + 1 for p in pairs]
    S = _round_up(max(lengths), pad_multiple)
    input_ids, labels, response_index, image_token_index = _rows(P, S, pad_id)
    position_ids = torch.zeros((P, S), dtype=torch.long)
    mask = torch.ones(S, S, dtype=torch.bool).triu(diagonal=1).repeat(P, 1, 1, 1).view(P, 1, S, S).clone()
    images = _image_rows(pairs, context_id, tokens_per_tile)
    for i, pair in enumerate(pairs):
        lp, lc, lr = len(pair.prompt), len(pair.chosen), len(pair.rejected)
        last = pair.prompt[-1]
        row = torch.tensor(pair.prompt + pair.chosen + [last] + pair.rejected, dtype=torch.long)
        input_ids[i, : row.numel()] = row
        a, b = lp - 1, lp + lc  # branch starts (the repeated last prompt token)
        end = b + 1 + lr
        position_ids[i, :a] = torch.arange(a)
        position_ids[i, a:b] = torch.arange(a, a + lc + 1)
        position_ids[i, b:end] = torch.arange(a, a + lr + 1)
        labels[i, a : a + lc] = row[a + 1 : b]
        response_index[i, a : a + lc] = i
        labels[i, b : b + lr] = row[b + 1 : end]
        response_index[i, b : b + lr] = P + i
        mask[i, 0, b:end, a:b] = True  # the rejected branch does not see the chosen one
        where, feature_rows = images[i]
        image_token_index[i, where] = feature_rows
    return _batch(pairs, input_ids, position_ids, labels, response_index, image_token_index, attention_mask=mask)


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    context_id: int,
    tokens_per_tile: int,
    pad_multiple: int = 1,
    layout: str = "unpacked",
) -> PairBatch:
    """Collate ``pairs`` in ``layout`` (``"unpacked"`` or ``"packed"``)."""
    if not pairs:
        raise ValueError("no pairs to collate")
    if layout == "unpacked":
        return collate_unpacked(pairs, pad_id, context_id, tokens_per_tile, pad_multiple)
    if layout == "packed":
        return collate_packed(pairs, pad_id, context_id, tokens_per_tile, pad_multiple)
    raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")

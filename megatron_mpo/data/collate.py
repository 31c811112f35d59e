"""Collation of tokenized pairs into a :class:`~megatron_mpo.batch.PairBatch`.

Two layouts give the same per-slot log-prob sums:

- ``unpacked``: rows ``0..P-1`` are prompt+chosen, rows ``P..2P-1`` prompt+rejected,
  padded to the longest row (rounded up to ``pad_multiple``); causal attention.
- ``packed``: per pair ``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected``, and
  several pairs per row (first-fit decreasing into rows of ``row_length`` positions).
  The prompt's last token is repeated at the start of each branch so that each branch
  predicts its own first response token; each branch sees its own pair's prompt and
  itself only (``segments``, see :mod:`megatron_mpo.batch`), positions restart at 0 for
  every pair, and both branches take positions from ``len(prompt) - 1`` on, as in the
  unpacked rows. The image is encoded once per pair in both layouts.

Labels are the next token at response positions only (0 elsewhere); ``response_index``
holds the slot there (chosen ``i``, rejected ``P + i``) and -1 elsewhere.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron_mpo.batch import PairBatch
from megatron_mpo.segments import BRANCHES, CHOSEN, PROMPT, REJECTED
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
    segments: Optional[torch.Tensor],
    ends: Sequence[int],
) -> PairBatch:
    """The filled rows + what every layout takes from the pairs alike (pixels, refs, keys);
    row ``r`` holds tokens up to ``ends[r]``, padding after."""
    ref_c, ref_r = _refs(pairs)
    return PairBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        labels=labels,
        response_index=response_index,
        image_token_index=image_token_index,
        pixel_values=_pixels(pairs),
        num_pairs=len(pairs),
        segments=segments,
        padding=torch.arange(input_ids.shape[1]) >= torch.tensor(list(ends)).unsqueeze(1),
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
    return _batch(pairs, input_ids, position_ids, labels, response_index, image_token_index, segments=None,
                  ends=lengths)


def packed_length(pair: TokenizedPair) -> int:
    """Positions a pair takes in a packed row: prompt, chosen, the repeated last prompt
    token, rejected."""
    return len(pair.prompt) + len(pair.chosen) + 1 + len(pair.rejected)


def _first_fit(order: Sequence[int], lengths: Sequence[int], row_length: Optional[int],
               max_pairs: Optional[int]) -> List[List[int]]:
    rows: List[List[int]] = []
    used: List[int] = []
    for i in order:
        for r, row in enumerate(rows):
            fits = row_length is None or used[r] + lengths[i] <= row_length
            if fits and (max_pairs is None or len(row) < max_pairs):
                row.append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def _balanced(order: Sequence[int], lengths: Sequence[int], n_rows: int, row_length: Optional[int],
              max_pairs: Optional[int]) -> Optional[List[List[int]]]:
    """Longest-first into the least-filled of ``n_rows`` rows, or None if a pair does not fit."""
    rows: List[List[int]] = [[] for _ in range(n_rows)]
    used = [0] * n_rows
    for i in order:
        open_rows = [r for r in range(n_rows) if max_pairs is None or len(rows[r]) < max_pairs]
        if not open_rows:
            return None
        r = min(open_rows, key=lambda r: (used[r], r))
        if row_length is not None and used[r] + lengths[i] > row_length and rows[r]:
            return None
        rows[r].append(i)
        used[r] += lengths[i]
    return [row for row in rows if row]


def pack_rows(lengths: Sequence[int], row_length: Optional[int], max_pairs: Optional[int] = None) -> List[List[int]]:
    """Pair indices grouped into rows of at most ``row_length`` positions and ``max_pairs``
    pairs (None: no limit), in as few rows as first-fit decreasing needs, balanced so the
    longest row (which every row of the micro-batch is padded to) is as short as it can be.

    First-fit decreasing fixes the number of rows; the pairs are then dealt longest-first to
    the least-filled of that many rows, and that layout is kept when it fits and its longest
    row is shorter. Deterministic (ties keep input order); a pair longer than ``row_length``
    gets a row of its own. Rows come in order of their first pair, pairs within a row by length.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = _first_fit(order, lengths, row_length, max_pairs)
    balanced = _balanced(order, lengths, len(rows), row_length, max_pairs) if len(rows) > 1 else None

    def longest(layout: List[List[int]]) -> int:
        return max(sum(lengths[i] for i in row) for row in layout)

    if balanced is not None and len(balanced) == len(rows) and longest(balanced) < longest(rows):
        rows = balanced
    return sorted(rows, key=min)


def collate_packed(
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    context_id: int,
    tokens_per_tile: int,
    pad_multiple: int = 1,
    row_length: Optional[int] = None,
    max_pairs_per_row: Optional[int] = 1,
) -> PairBatch:
    """Pairs packed into rows (see :func:`pack_rows`); per pair: shared prompt, then each
    response in its own branch, positions restarting at 0 for every pair."""
    P = len(pairs)
    rows = pack_rows([packed_length(p) for p in pairs], row_length, max_pairs_per_row)
    S = _round_up(max(sum(packed_length(pairs[i]) for i in row) for row in rows), pad_multiple)
    R = len(rows)
    input_ids, labels, response_index, image_token_index = _rows(R, S, pad_id)
    position_ids = torch.zeros((R, S), dtype=torch.long)
    segments = torch.zeros((R, S), dtype=torch.int32)
    images = _image_rows(pairs, context_id, tokens_per_tile)
    ends = []
    for r, members in enumerate(rows):
        start = 0
        for k, i in enumerate(members):
            pair = pairs[i]
            lp, lc, lr = len(pair.prompt), len(pair.chosen), len(pair.rejected)
            row = torch.tensor(pair.prompt + pair.chosen + [pair.prompt[-1]] + pair.rejected, dtype=torch.long)
            end = start + row.numel()
            a, b = start + lp - 1, start + lp + lc  # branch starts (the repeated last prompt token)
            input_ids[r, start:end] = row
            position_ids[r, start:a] = torch.arange(lp - 1)
            position_ids[r, a:b] = torch.arange(lp - 1, lp + lc)
            position_ids[r, b:end] = torch.arange(lp - 1, lp + lr)
            labels[r, a : a + lc] = row[lp : lp + lc]
            response_index[r, a : a + lc] = i
            labels[r, b : b + lr] = row[lp + lc + 1 :]
            response_index[r, b : b + lr] = P + i
            segments[r, start:a] = BRANCHES * k + PROMPT
            segments[r, a:b] = BRANCHES * k + CHOSEN
            segments[r, b:end] = BRANCHES * k + REJECTED
            where, feature_rows = images[i]
            image_token_index[r, start + where] = feature_rows
            start = end
        # Trailing padding: a segment of its own, positions running on (causal among itself).
        segments[r, start:] = BRANCHES * len(members) + PROMPT
        position_ids[r, start:] = torch.arange(S - start)
        ends.append(start)
    return _batch(pairs, input_ids, position_ids, labels, response_index, image_token_index, segments=segments,
                  ends=ends)


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    context_id: int,
    tokens_per_tile: int,
    pad_multiple: int = 1,
    layout: str = "unpacked",
    row_length: Optional[int] = None,
    max_pairs_per_row: Optional[int] = 1,
) -> PairBatch:
    """Collate ``pairs`` in ``layout`` (``"unpacked"`` or ``"packed"``); packed rows hold up
    to ``max_pairs_per_row`` pairs (None: any number) within ``row_length`` positions."""
    if not pairs:
        raise ValueError("no pairs to collate")
    if layout == "unpacked":
        return collate_unpacked(pairs, pad_id, context_id, tokens_per_tile, pad_multiple)
    if layout == "packed":
        return collate_packed(pairs, pad_id, context_id, tokens_per_tile, pad_multiple, row_length, max_pairs_per_row)
    raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")

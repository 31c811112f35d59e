"""The packed-row layout's vocabulary: segment ids, the spans they mark, the masks they mean.

The bottom floor under both the micro-batch contract (:mod:`megatron_mpo.batch`, which
documents the layout) and the attention that reads it
(:mod:`megatron_mpo.models.packed_attention`). Position ``t`` of a packed row holds
``BRANCHES * pair + branch`` with branch ``PROMPT``, ``CHOSEN`` or ``REJECTED``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["PROMPT", "CHOSEN", "REJECTED", "BRANCHES", "Span", "causal_mask", "is_segments", "segment_mask",
           "pair_spans", "cached"]

PROMPT, CHOSEN, REJECTED = 0, 1, 2
BRANCHES = 3


def causal_mask(seq_len: int) -> torch.Tensor:
    """[1, 1, S, S] bool mask, True above the diagonal (megatron-core's convention)."""
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool).triu(diagonal=1)


def is_segments(mask: Optional[torch.Tensor]) -> bool:
    """True for a packed-row ``segments`` tensor ([b, S] integers) passed where megatron-core
    passes its attention mask (a [b, 1, S, S] bool tensor or None)."""
    return mask is not None and mask.dim() == 2 and not mask.dtype.is_floating_point and mask.dtype != torch.bool


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """The dense ``[R, 1, S, S]`` bool mask (True = masked) that ``segments`` describes."""
    S = segments.shape[-1]
    pair, branch = segments // BRANCHES, segments % BRANCHES
    q_pair, k_pair = pair.unsqueeze(-1), pair.unsqueeze(-2)
    visible = (q_pair == k_pair) & ((branch.unsqueeze(-2) == PROMPT) | (segments.unsqueeze(-1) == segments.unsqueeze(-2)))
    causal = torch.ones(S, S, dtype=torch.bool, device=segments.device).tril()
    return ~(visible & causal).unsqueeze(1)


# (start, chosen start, rejected start, end) of one pair in its row; a padding span has
# chosen start == rejected start == end (prompt positions only).
Span = Tuple[int, int, int, int]

_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 16  # micro-batches in flight on one pipeline stage, times what is cached per batch


def cached(segments: Tensor, what: str, build: Callable[[], object]):
    """``build()`` once per segments tensor. Keyed by storage: megatron-core's activation
    recompute hands layers a detached copy (same storage, new tensor object); the entry
    holds the tensor, so its storage cannot be reused by another batch while cached."""
    key = (what, segments.data_ptr(), tuple(segments.shape), str(segments.device), segments._version)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit[1]
    value = build()
    _CACHE[key] = (segments, value)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def pair_spans(segments: Tensor) -> List[List[Span]]:
    """Per row, the spans of its segments in order (pairs, then trailing padding)."""

    def build() -> List[List[Span]]:
        out = []
        for row in segments.tolist():
            spans: List[Span] = []
            start = 0
            while start < len(row):
                pair = row[start] // BRANCHES
                end = start
                bounds = {PROMPT: None, CHOSEN: None, REJECTED: None}
                while end < len(row) and row[end] // BRANCHES == pair:
                    branch = row[end] % BRANCHES
                    if bounds[branch] is None:
                        bounds[branch] = end
                    end += 1
                chosen = bounds[CHOSEN] if bounds[CHOSEN] is not None else end
                rejected = bounds[REJECTED] if bounds[REJECTED] is not None else end
                spans.append((start, chosen, rejected, end))
                start = end
            out.append(spans)
        return out

    return cached(segments, "spans", build)

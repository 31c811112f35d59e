"""Attention over packed preference rows, from their ``segments`` layout.

A packed row holds several pairs, each ``prompt | chosen | rejected`` (see
:mod:`megatron_mpo.batch`). The attention pattern is block sparse: a pair never sees
another pair, and a rejected response never sees its chosen one. Two computations of it,
both without an ``S x S`` tensor per head and without repeating K/V for GQA:

* :func:`sdpa_packed_attention` -- torch's fused SDPA per pair: prompt + chosen in the
  kernel's causal mode, the rejected branch against its own pair's keys with a small
  mask. Trains anywhere (the CPU path).
* :func:`flex_attention` with :func:`segment_block_mask` -- torch's FlexAttention with a
  ``BlockMask`` built once per micro-batch (fully masked blocks are skipped, fully
  visible ones run without a mask); used by ``layers.FlexAttention``, the core attention
  for packed rows on GPUs.

Both read the layout from the ``segments`` tensor that travels in megatron-core's
``attention_mask`` argument; what they derive from it (pair spans, the block mask) is
computed once per micro-batch and reused by every layer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from megatron_mpo import platform
from megatron_mpo.batch import BRANCHES, CHOSEN, PROMPT, REJECTED, causal_mask, is_segments, segment_mask

__all__ = ["Span", "pair_spans", "sdpa_packed_attention", "segment_block_mask", "flex_attention",
           "dense_attention_mask"]

# (start, chosen start, rejected start, end) of one pair in its row; a padding span has
# chosen start == rejected start == end (prompt positions only).
Span = Tuple[int, int, int, int]

# FlexAttention's block size: rows are padded to a multiple of it under ``flex`` (whole
# blocks, and few distinct shapes for the compiled kernel).
FLEX_BLOCK_SIZE = 128

_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CAUSAL: dict = {}  # (S, device) -> block mask of plain causal rows
_CACHE_SIZE = 16  # micro-batches in flight on one pipeline stage, times what is cached per batch


def _cached(segments: Tensor, what: str, build: Callable[[], object]):
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

    return _cached(segments, "spans", build)


def sdpa_packed_attention(q: Tensor, k: Tensor, v: Tensor, segments: Tensor, sdpa: Callable) -> Tensor:
    """``[b, heads, S, d]`` attention of packed rows through ``sdpa(q, k, v, allowed, causal)``.

    Per pair: prompt + chosen is plainly causal (the kernel skips blocks above the
    diagonal); the rejected branch attends to its pair's prompt and, causally, to itself
    (a ``[rejected, pair]`` mask). Work and memory scale with the pairs' own lengths, not
    with the row length squared.
    """
    rows = []
    for r, spans in enumerate(pair_spans(segments)):
        pieces = []
        for start, chosen, rejected, end in spans:
            qr, kr, vr = (x[r : r + 1, :, start:end] for x in (q, k, v))
            split = rejected - start
            pieces.append(sdpa(qr[:, :, :split], kr[:, :, :split], vr[:, :, :split], None, True))
            if rejected < end:
                n = end - rejected
                allowed = torch.zeros(n, end - start, dtype=torch.bool, device=q.device)
                allowed[:, : chosen - start] = True  # the prompt
                allowed[:, split:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
                pieces.append(sdpa(qr[:, :, split:], kr, vr, allowed, False))
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def segment_block_mask(segments: Optional[Tensor], seq_len: int, batch: int, device: torch.device):
    """FlexAttention's ``BlockMask`` for ``segments`` (None: plain causal rows)."""
    create_block_mask = _block_mask_builder()

    if segments is None:
        key = (seq_len, str(device))
        if key not in _CAUSAL:
            def causal(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx

            _CAUSAL[key] = create_block_mask(causal, None, None, seq_len, seq_len, device=device)
        return _CAUSAL[key]

    def build():
        seg = segments.to(device=device, dtype=torch.int32)
        pair, branch = seg // BRANCHES, seg % BRANCHES

        def packed(b, h, q_idx, kv_idx):
            same_pair = pair[b, q_idx] == pair[b, kv_idx]
            visible = (branch[b, kv_idx] == PROMPT) | (seg[b, q_idx] == seg[b, kv_idx])
            return (kv_idx <= q_idx) & same_pair & visible

        return create_block_mask(packed, seg.shape[0], None, seq_len, seq_len, device=device)

    return _cached(segments, "block_mask", build)


_FLEX: Optional[Callable] = None
_BLOCK_MASK: Optional[Callable] = None


def _block_mask_builder() -> Callable:
    """create_block_mask, compiled on CUDA so the [b, S, S] mask is never materialised
    (torch.compile of the function: its ``_compile`` flag is deprecated since torch 2.10)."""
    global _BLOCK_MASK
    if _BLOCK_MASK is None:
        from torch.nn.attention.flex_attention import create_block_mask

        _BLOCK_MASK = torch.compile(create_block_mask) if platform.current().is_cuda else create_block_mask
    return _BLOCK_MASK


def flex_attention() -> Callable:
    """flex_attention, compiled where that yields the fused kernel (the platform decides)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention as kernel

        # Compiled, the kernel is fused (eager it materialises the scores); shapes vary per
        # micro-batch, so after the first recompile torch marks them dynamic (dynamic=None).
        _FLEX = torch.compile(kernel) if platform.current().is_cuda else kernel
    return _FLEX


def dense_attention_mask(mask: Optional[Tensor], seq_len: int) -> Tensor:
    """megatron-core's dense bool mask for ``mask`` (None = causal, or segments)."""
    if mask is None:
        return causal_mask(seq_len)
    return segment_mask(mask) if is_segments(mask) else mask

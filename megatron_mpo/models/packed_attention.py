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

from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_mpo import platform
from megatron_mpo.segments import BRANCHES, PROMPT, cached, causal_mask, is_segments, pair_spans, segment_mask

__all__ = ["sdpa_packed_attention", "segment_block_mask", "flex_attention", "dense_attention_mask"]

# FlexAttention's block size: rows are padded to a multiple of it under ``flex`` (whole
# blocks, and few distinct shapes for the compiled kernel).
FLEX_BLOCK_SIZE = 128

_CAUSAL: dict = {}  # (S, device) -> block mask of plain causal rows


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

    return cached(segments, "block_mask", build)


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

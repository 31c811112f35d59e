"""Stochastic depth on InternViT's residual branches, as InternVL trains with it.

InternVL (``modeling_intern_vit.py``) gives layer ``i`` of ``L`` the rate
``linspace(0, drop_path_rate, L)[i]`` and wraps each branch, after its layer scale, in
timm's ``DropPath``: per sample (an image tile), the branch is zeroed with that rate and
otherwise scaled by ``1 / (1 - rate)``; off in eval. One difference: InternVL's DPO trainer
repeats a pair's tiles for the chosen and the rejected row (two masks per tile), while here
a pair's tiles are encoded once and both rows read the same dropped features.

The masks come from a megatron-core RNG tracker stream of their own, seeded by the
data-parallel rank only: the tensor-parallel ranks of a replica hold the same
(replicated) vision activations and must drop the same tiles, while data-parallel
replicas draw their own masks (the default generator is seeded alike on every rank).
Being a tracker stream, it is saved and restored by megatron-core's activation
recomputation, so a recomputed layer drops what its forward dropped, and it travels in
training checkpoints with the other tracker states.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["RNG_NAME", "layer_rates", "seed_rng", "drop_path"]

RNG_NAME = "mpo-drop-path-rng"
# Apart from megatron-core's own tracker seeds (seed, seed + 2718 + tp_rank,
# seed + 1024 + 100 * ep_rank + etp_rank) for any realistic rank.
_SEED_OFFSET = 7_340_033


def layer_rates(rate: float, num_layers: int) -> list[float]:
    """InternVL's per-layer rates: ``linspace(0, rate, num_layers)`` in float32, as it computes them."""
    return [x.item() for x in torch.linspace(0, rate, num_layers)]


def seed_rng(seed: int, data_rank: Optional[int] = None) -> None:
    """(Re)seed the drop-path stream for this rank: ``seed`` offset by the data-parallel rank
    (None: megatron-core's), the same on every tensor- and pipeline-parallel rank of a replica.
    Call after ``model_parallel_cuda_manual_seed``, which clears the tracker."""
    from megatron.core import parallel_state, tensor_parallel

    if data_rank is None:
        data_rank = parallel_state.get_data_parallel_rank()
    stream_seed = seed + _SEED_OFFSET + int(data_rank)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if RNG_NAME not in tracker.get_states():
        tracker.add(RNG_NAME, stream_seed)
    else:
        with tracker.fork(RNG_NAME):  # reseed in place: the fork stores the new state on exit
            torch.cuda.manual_seed(stream_seed)


def drop_path(x: Tensor, rate: float, batch_dim: int = 1) -> Tensor:
    """timm's ``drop_path`` in training: each sample along ``batch_dim`` (the tiles of a
    sequence-first ``[s, b, h]`` activation) zeroed with probability ``rate``, the others
    scaled by ``1 / (1 - rate)``; the mask is drawn in ``x``'s dtype, as timm does."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    if RNG_NAME not in tracker.get_states():
        raise RuntimeError("drop path has no RNG stream: megatron_mpo.parallel.initialize seeds it "
                           "(or call megatron_mpo.models.drop_path.seed_rng after model_parallel_cuda_manual_seed)")
    keep = 1.0 - rate
    shape = [1] * x.dim()
    shape[batch_dim] = x.shape[batch_dim]
    with tracker.fork(RNG_NAME):
        mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask.div_(keep)

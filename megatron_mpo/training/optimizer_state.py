"""Saving and loading megatron-core 0.16.1's DistributedOptimizer state: what it leaves undone.

Expert parallelism: megatron-core builds one sub-optimizer at expert-parallel size 1 and
two (dense, expert) above it, so a resume across that line finds another number of saved
param groups than it has; :func:`load_optimizer_state` regroups them.

A never-stepped optimizer has no Adam moments: torch's AdamW and TE's / apex's FusedAdam
all create them inside their first ``step()``. megatron-core 0.16.1 then cannot save it
(``fully_reshardable`` fails with ``KeyError: 'exp_avg'``; ``dp_reshardable`` writes the
master weights only, which its own load template, holding moments, then refuses) nor, with
torch's AdamW, build a load template. :func:`prime_optimizer_state` gives it the state its
first step would create.

Without apex or Transformer Engine (e.g. on CPU) megatron-core falls back to torch's
AdamW, and its checkpointing of that optimizer has two more defects worked around here:
the loaded Adam ``step`` does not reach the per-parameter state the update reads
(:func:`restore_adam_steps`), and the ``fully_reshardable`` loader fails on the
per-parameter ``step`` it does not save (:func:`load_optimizer_state`). Fused Adam keeps
its step count in the param groups, which megatron-core saves and loads itself.

Several gradient buckets (``overlap_grad_reduce``): megatron-core 0.16.1's
``fully_reshardable`` state reads each parameter at its index in the padded buffer from a
gather that dropped every bucket's end padding, so each parameter past the first bucket
was saved with another's master weights and moments (fixed upstream after 0.16.1, Megatron-LM
#5077); :func:`padded_buffer_state` puts the padding back while the state is built.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["distributed_optimizers", "load_optimizer_state", "padded_buffer_state", "prime_optimizer_state",
           "restore_adam_steps"]


def distributed_optimizers(optimizer: Any) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [s for s in subs if isinstance(s, DistributedOptimizer)]


def _subs(optimizer: Any) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _with_states(optimizer: Any, state: Any) -> list[tuple[Any, Any]]:
    """(sub-optimizer, its part of ``state``) pairs, as ``ChainedOptimizer.load_state_dict``
    splits a loaded state (a bare state for one optimizer, else one per index)."""
    subs = _subs(optimizer)
    return [(subs[0], state)] if len(subs) == 1 else [(sub, state[i]) for i, sub in enumerate(subs)]


def _regrouped(optimizer: Any, loaded: dict) -> Any:
    """``loaded`` shaped for this optimizer's sub-optimizers when it has another number of them.

    dist_checkpointing returns the tensors (``param_state``) where this optimizer's load
    template put them, but the non-tensor parts (param groups, sharding type) as they were
    saved. Across expert-parallel size 1 <-> >1 the groups differ only in
    ``is_expert_parallel``: every sub-optimizer gets all saved groups, each also with that
    flag flipped (megatron-core picks its groups by flag, weight-decay and lr multipliers).
    """
    subs = _subs(optimizer)
    saved = [loaded] if "optimizer" in loaded else [
        loaded[k] for k in sorted(k for k in loaded if isinstance(k, int)) if "optimizer" in loaded[k]
    ]
    if len(saved) == len(subs):
        return loaded
    groups = [g for part in saved for g in part["optimizer"]["param_groups"]]
    flipped = [{**g, "is_expert_parallel": not g["is_expert_parallel"]} for g in groups if "is_expert_parallel" in g]
    groups = flipped + groups  # the saved group of the same kind, listed later, wins
    common = {k: v for k, v in saved[0].items() if isinstance(k, str) and k not in ("optimizer", "param_state")}
    tensors = [loaded["param_state"]] if len(subs) == 1 else [loaded[i]["param_state"] for i in range(len(subs))]
    states = [{**common, "optimizer": {"param_groups": [dict(g) for g in groups]}, "param_state": t} for t in tensors]
    return states[0] if len(subs) == 1 else dict(enumerate(states))


def load_optimizer_state(optimizer: Any, loaded: Any) -> None:
    """``optimizer.load_state_dict`` for the state dist_checkpointing loaded, in any saved
    format and (``fully_reshardable``) at any layout.

    megatron-core 0.16.1 with torch's Adam: ``fully_reshardable`` state holds no
    per-parameter ``step`` (it is restored from the param groups), but its loader copies
    every key of the live per-parameter state and so fails with ``KeyError: 'step'``. Its
    parameter state is therefore loaded here, after the rest, with ``step`` set aside.
    """
    from megatron.core.optimizer import distrib_optimizer

    state = _regrouped(optimizer, loaded)
    deferred = []
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for sub, part in _with_states(optimizer, state):
            if isinstance(part, dict) and part.get("param_state_sharding_type") == "fully_reshardable":
                deferred.append((sub, part.pop("param_state")))
    # no_grad: megatron-core 0.16.1's dp_reshardable loader copies into fp32 main params
    # that are views of leaf parameters, which autograd refuses outside no_grad.
    with torch.no_grad():
        optimizer.load_state_dict(state)
    for sub, param_state in deferred:
        inner = sub.optimizer.state
        steps = {param: inner[param].pop("step") for param in list(inner) if "step" in inner[param]}
        try:
            sub.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in steps.items():
                inner[param]["step"] = step
    restore_adam_steps(optimizer)


def prime_optimizer_state(optimizer: Any) -> None:
    """Give a never-stepped DistributedOptimizer the Adam state its first step would create,
    before a save or a load.

    TE's / apex's FusedAdam create zero moments for every parameter at their first step
    and count steps in the param groups: megatron-core's own ``init_state_fn`` (the zero
    moments it gives its non-distributed optimizers before a load) creates exactly that
    state, so a save writes the moments a load expects, and the next step -- of this
    optimizer or of one loaded from the save -- is the first step it would have been.

    torch's Adam (no apex / Transformer Engine): building the load template calls
    ``DistributedOptimizer.state_dict()``, which asserts that the inner optimizer holds
    exactly one ``step`` value -- false while its state is still empty. Its own
    ``load_state_dict`` allocates the state at step 0; a save writes that, a load
    overwrites it.
    """
    from megatron.core.optimizer import distrib_optimizer

    for sub in distributed_optimizers(optimizer):
        if sub.optimizer is None:  # a stub: no parameters of this kind on this rank
            continue
        if distrib_optimizer.HAVE_APEX_OR_TE:
            sub.init_state_fn(sub.optimizer, sub.config)
        elif len(sub.optimizer.state) == 0:
            groups = [
                {**{k: v for k, v in g.items() if k != "params"}, "step": 0}
                for g in sub.optimizer.state_dict()["param_groups"]
            ]
            sub.load_state_dict({"optimizer": {"param_groups": groups}})


def restore_adam_steps(optimizer: Any) -> None:
    """Put the loaded Adam ``step`` back into every parameter's state, one tensor each.

    megatron-core 0.16.1 with torch's Adam keeps ``step`` in the param groups of the
    checkpoint, but its dp_reshardable loader then copies the *pre-load* per-parameter step
    over the loaded one, and in either format the loaded value is one tensor object shared
    by all parameters (AdamW would increment it once per parameter). Either breaks an exact
    resume.

    The group's ``step`` is removed once used: torch's ``load_state_dict`` leaves it in the
    live param groups, where it would go stale -- a later save (which calls this too, after
    :func:`prime_optimizer_state`) would write that old step back into every parameter.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for sub in distributed_optimizers(optimizer):
        for group in sub.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = sub.optimizer.state[param]
                if "step" in state:
                    # On the device torch put it (fused / capturable Adam keep it with the params).
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32,
                                                 device=state["step"].device)
            del group["step"]


def _with_bucket_padding(sub: Any, state: dict) -> dict:
    """``get_parameter_state_dp_zero``'s gathered state with each bucket at its buffer offset
    (zeros in the padding), the index space of ``param_index_map``."""
    for index, by_dtype in state.items():
        if not isinstance(index, int):  # "buckets_coalesced"
            continue
        buckets = sub.buffers[index].buckets
        for world in by_dtype.values():
            for key, flat in list(world.items()):
                if not isinstance(flat, torch.Tensor):  # "numel_unpadded"
                    continue
                padded = flat.new_zeros(sub.buffers[index].numel)
                start = 0
                for bucket in buckets:
                    size = bucket.numel_unpadded
                    padded[bucket.offset:bucket.offset + size] = flat[start:start + size]
                    start += size
                world[key] = padded
    return state


@contextlib.contextmanager
def padded_buffer_state(optimizer: Any) -> Iterator[None]:
    """Inside, every DistributedOptimizer's gathered parameter state keeps the padding between
    its buckets, so megatron-core 0.16.1's ``fully_reshardable`` save and load template slice
    each parameter's own state (with one bucket, as without overlap, nothing changes). Only
    that format reads the gathered state (``dp_reshardable`` never gathers)."""
    patched = []
    for sub in distributed_optimizers(optimizer):
        gather = sub.get_parameter_state_dp_zero

        def padded(*args, _sub=sub, _gather=gather, **kwargs):
            state = _gather(*args, **kwargs)
            return None if state is None else _with_bucket_padding(_sub, state)

        sub.get_parameter_state_dp_zero = padded  # this instance only
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub.get_parameter_state_dp_zero

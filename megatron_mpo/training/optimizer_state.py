"""Workarounds for megatron-core 0.16.1's DistributedOptimizer on the torch-Adam path.

Without apex or Transformer Engine (e.g. on CPU) megatron-core falls back to torch's
AdamW, and its checkpointing of that optimizer has two defects the checkpoint module
works around: a never-stepped optimizer cannot build its load template
(:func:`prime_optimizer_state`), and the loaded Adam ``step`` does not reach the
per-parameter state the update reads (:func:`restore_adam_steps`). Both are no-ops when
megatron-core uses apex's or TE's fused Adam.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["distributed_optimizers", "prime_optimizer_state", "restore_adam_steps"]


def distributed_optimizers(optimizer: Any) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [s for s in subs if isinstance(s, DistributedOptimizer)]


def prime_optimizer_state(optimizer: Any) -> None:
    """Give a never-stepped DistributedOptimizer placeholder Adam state before a load.

    megatron-core 0.16.1 with torch's Adam (no apex / Transformer Engine): building the
    load template calls ``DistributedOptimizer.state_dict()``, which asserts that the inner
    optimizer holds exactly one ``step`` value -- false while its state is still empty. Its
    own ``load_state_dict`` allocates the state; the checkpoint then overwrites it.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for sub in distributed_optimizers(optimizer):
        if len(sub.optimizer.state) == 0:
            groups = [
                {**{k: v for k, v in g.items() if k != "params"}, "step": 0}
                for g in sub.optimizer.state_dict()["param_groups"]
            ]
            sub.load_state_dict({"optimizer": {"param_groups": groups}})


def restore_adam_steps(optimizer: Any) -> None:
    """Put the loaded Adam ``step`` back into every parameter's state, one tensor each.

    megatron-core 0.16.1 with torch's Adam keeps ``step`` in the param groups of the
    checkpoint, but its dp_reshardable loader then copies the *pre-load* per-parameter step
    over the loaded one, and the loaded value is one tensor object shared by all parameters
    (AdamW would increment it once per parameter). Either breaks an exact resume.

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

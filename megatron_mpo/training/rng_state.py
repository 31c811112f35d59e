"""Every random number generator a rank draws from, captured into and restored from a checkpoint."""

from __future__ import annotations

import random

import torch

from megatron_mpo import platform

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict:
    """Every RNG this rank draws from (python, numpy, torch, CUDA, megatron-core tracker)."""
    import numpy as np
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if platform.current().is_cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (same rank, same world)."""
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and platform.current().is_cuda:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k: v.clone() for k, v in state["tracker"].items()}
    )

"""Every random number generator a rank draws from, captured into and restored from a checkpoint."""

from __future__ import annotations

import random

import torch

from megatron_mpo import platform

__all__ = ["capture_rng_state", "restore_rng_state"]


def _python_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _numpy_state() -> dict:
    import numpy as np

    algorithm, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"algorithm": algorithm, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian)}


def _set_numpy_state(state: dict) -> None:
    import numpy as np

    key = np.asarray(state["key"], dtype=np.uint32)
    np.random.set_state((state["algorithm"], key, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def capture_rng_state() -> dict:
    """Every RNG this rank draws from (python, numpy, torch, CUDA, megatron-core tracker).

    Tensors and JSON values only, so a checkpoint reads it back without unpickling objects.
    """
    from megatron.core import tensor_parallel

    state = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if platform.current().is_cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (same rank, same world)."""
    from megatron.core import tensor_parallel

    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and platform.current().is_cuda:
        torch.cuda.set_rng_state(state["cuda"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    # Streams the checkpoint lacks (added since it was written) keep their seeded state.
    tracker.set_states({**tracker.get_states(), **{k: v.clone() for k, v in state["tracker"].items()}})

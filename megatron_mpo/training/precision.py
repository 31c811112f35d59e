"""The precision plan of a run: dtype, FP8 format and recipe, what the reference tool
computes in, and the sequence-length multiple that FP8 and sequence parallelism need.

One module owns these rules so that the trainer, the reference tool, the fingerprint of
reference values and the data pipeline's padding cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mpo import platform
from megatron_mpo.config import RunConfig

__all__ = [
    "DTYPES",
    "FP8_RECIPES",
    "PrecisionPlan",
    "training_precision",
    "reference_precision",
    "check_precision",
    "sequence_multiple",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8")
# Recipes that compute their scales from the tensor being quantised: right from the first
# GEMM, also under no_grad. Delayed scaling reads an amax history that Transformer Engine
# only updates when grad is enabled, so a forward-only pass would use the initial scales.
CURRENT_SCALING_RECIPES = ("tensorwise", "mxfp8")
MXFP8_MIN_CAPABILITY = (10, 0)  # Blackwell


@dataclass(frozen=True)
class PrecisionPlan:
    """What one forward computes in: parameter dtype and, optionally, FP8 with a recipe."""

    dtype: str
    fp8: Optional[str] = None  # hybrid | e4m3 | None
    fp8_recipe: Optional[str] = None  # set exactly when fp8 is

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        return self.dtype if self.fp8 is None else f"{self.dtype} + fp8 {self.fp8} ({self.fp8_recipe} scaling)"

    def fingerprint(self) -> dict:
        """The fields of a reference fingerprint that say what the values were computed in."""
        return {"dtype": self.dtype, "fp8": self.fp8, "fp8_recipe": self.fp8_recipe}


def training_precision(cfg: RunConfig) -> PrecisionPlan:
    """The trainer's forward: ``precision.dtype`` with ``precision.fp8`` and its recipe."""
    p = cfg.precision
    return PrecisionPlan(p.dtype, p.fp8, p.fp8_recipe if p.fp8 else None)


def reference_precision(cfg: RunConfig) -> PrecisionPlan:
    """The reference tool's forward: the same numerics as the policy's whenever they can be.

    With a current-scaling FP8 recipe (``tensorwise``, ``mxfp8``; ``tensorwise`` is the
    default) every GEMM computes its scales from the tensor it quantises, with or without
    grad, so the reference pass quantises exactly as the policy's first forward does and
    ``precision.reference_fp8`` (null = auto) keeps FP8. Delayed scaling reads an amax
    history that Transformer Engine only updates when grad is enabled: under no_grad every
    GEMM would use the initial scales, and data-parallel ranks see different numbers of
    shards, so turning grad on to calibrate would hang the amax all-reduce. Its reference
    is computed in ``precision.dtype``, and the trainer measures the gap at step 1
    (:mod:`megatron_mpo.training.reference_gap`).
    """
    p = cfg.precision
    fp8_reference = p.reference_fp8 if p.reference_fp8 is not None else p.fp8_recipe in CURRENT_SCALING_RECIPES
    if p.fp8 and fp8_reference:
        return PrecisionPlan(p.dtype, p.fp8, p.fp8_recipe)
    return PrecisionPlan(p.dtype)


def check_precision(cfg: RunConfig) -> None:
    """FP8 / Transformer Engine / bf16 choices the machine must support (one-line errors)."""
    from megatron_mpo.models.specs import check_backend

    check_backend(cfg.model.spec, cfg.precision.fp8)
    if cfg.precision.fp8 is not None and cfg.precision.fp8_recipe == "mxfp8":
        platform.require_gpu_feature("the mxfp8 FP8 recipe", min_capability=MXFP8_MIN_CAPABILITY)


def sequence_multiple(tensor_parallel: int, sequence_parallel: bool, fp8_recipe: Optional[str]) -> int:
    """Every micro-batch's sequence length must be a multiple of this.

    * Sequence parallelism splits the sequence over the TP ranks
      (``scatter_to_sequence_parallel_region`` asserts ``S % TP == 0``).
    * Transformer Engine checks an FP8 GEMM's input on each rank *before* the
      sequence-parallel all-gather: ``(S / TP) * B`` must be a multiple of megatron-core's
      FP8 alignment (``get_fp8_align_size``: 16, 32 for mxfp8). Packed rows have ``B = 1``,
      so each rank's shard itself must be aligned.
    """
    shards = tensor_parallel if sequence_parallel and tensor_parallel > 1 else 1
    if fp8_recipe is None:
        return shards
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    return shards * get_fp8_align_size(Fp8Recipe(fp8_recipe))

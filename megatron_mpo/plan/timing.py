"""How long a step and an epoch take: the trainer's own FLOP count over the GPUs' peak at
an assumed model FLOP utilisation (MFU).

The FLOPs are :class:`~megatron_mpo.training.flops.FlopCounter`'s -- the count behind the
trainer's logged ``mfu`` -- and the peak its data-sheet table (bf16, or fp8 when the run
uses FP8, as the trainer counts). The assumed MFU is that of a balanced layout with
neither pipeline bubble nor recomputation; the layout's own costs are applied on top: the
1F1B bubble ``(PP - 1) / (micro-batches x VP)``, the slowest pipeline stage over the mean
(the first stage also runs the vision tower, the last the output layer), and the forward
that activation recomputation runs again. The trainer's logged ``mfu`` should then read
about ``MFU / overheads``.

Default MFU, bf16: 0.41, the lowest MFU of Megatron-LM's H100 weak-scaling benchmark (41 %
for its smallest, 2B-parameter GPT, up to 47-48 % at 462B; 4096-token sequences; Megatron-LM
README, "Performance Benchmarking", github.com/NVIDIA/Megatron-LM). With FP8 the trainer
measures against the fp8 peak (twice bf16's): 0.41 x 1.2 / 2, the low end of the 1.2-1.5x
FP8 speed-up NVIDIA states for Megatron training (Megatron Bridge Performance Tuning Guide,
"Low Precision Training", docs.nvidia.com/nemo/megatron-bridge/latest/performance-guide.html).
Preference rows of varying length, images and a small model usually do worse: set ``--mfu``
from a measured run's logged ``mfu`` (times its overheads) when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mpo.errors import UserError
from megatron_mpo.plan.activations import Rows
from megatron_mpo.plan.params import Parallelism, stage_layers

__all__ = ["GPU_KINDS", "GpuKind", "gpu_kind", "default_mfu", "MFU_SOURCE", "StepTime", "step_time"]

BF16_MFU = 0.41
FP8_SPEEDUP = 1.2
MFU_SOURCE = ("Megatron-LM README (github.com/NVIDIA/Megatron-LM), Performance Benchmarking: 41 % MFU for its "
              "smallest (2B) GPT on H100, 47-48 % at 462B; with FP8 x 1.2 / 2 (the fp8 peak is twice bf16's; "
              "NVIDIA's Megatron Bridge Performance Tuning Guide, docs.nvidia.com/nemo/megatron-bridge/latest/"
              "performance-guide.html, states 1.2-1.5x for FP8)")


@dataclass(frozen=True)
class GpuKind:
    """A GPU model: its name in the peak table and its memory as ``nvidia-smi`` reports it."""

    name: str  # exact torch.cuda.get_device_name, a key of flops.NOMINAL_PEAKS
    memory_gib: Optional[float]


# Short names -> the SXM part of that name (memory: nvidia-smi's total, MiB / 1024).
GPU_KINDS = {
    "H100": GpuKind("NVIDIA H100 80GB HBM3", 79.6),
    "H200": GpuKind("NVIDIA H200", 140.4),
    "H800": GpuKind("NVIDIA H800 80GB HBM3", 79.6),
    "B200": GpuKind("NVIDIA B200", 179.1),
    "A100": GpuKind("NVIDIA A100-SXM4-80GB", 79.3),
    "A100-40GB": GpuKind("NVIDIA A100-SXM4-40GB", 39.4),
}


def gpu_kind(name: str, memory_gib: Optional[float] = None) -> GpuKind:
    """``H100`` / ``H200`` / ``B200`` / ``A100`` / ... or an exact device name of the peak
    table (then ``memory_gib`` is needed); UserError naming the choices otherwise."""
    from megatron_mpo.training.flops import NOMINAL_PEAKS

    for key, kind in GPU_KINDS.items():
        if key.lower() == name.strip().lower():
            return GpuKind(kind.name, memory_gib or kind.memory_gib)
    for exact in NOMINAL_PEAKS:
        if exact.lower() == name.strip().lower():
            if memory_gib is None:
                raise UserError(f"--gpu {name!r}: give its memory with --gpu-memory-gib")
            return GpuKind(exact, memory_gib)
    raise UserError(f"unknown --gpu {name!r}; use one of {', '.join(GPU_KINDS)} or an exact device name: "
                    f"{', '.join(NOMINAL_PEAKS)}")


def default_mfu(fp8: bool) -> float:
    """The stated default MFU (see the module docstring for its sources)."""
    return BF16_MFU * FP8_SPEEDUP / 2 if fp8 else BF16_MFU


@dataclass(frozen=True)
class StepTime:
    """A step's FLOPs, the overheads applied and the resulting time."""

    flops: float  # model FLOPs of one step (the trainer's count)
    peak: float  # FLOP/s of one GPU
    peak_source: str
    mfu: float
    bubble: float  # pipeline bubble, as a fraction of the busy time
    imbalance: float  # slowest stage / mean stage
    recompute: float  # extra compute of recomputation, as a fraction
    gpus: int

    @property
    def seconds(self) -> float:
        ideal = self.flops / (self.gpus * self.peak * self.mfu)
        return ideal * (1 + self.recompute) * self.imbalance * (1 + self.bubble)

    @property
    def logged_mfu(self) -> float:
        """The ``mfu`` the trainer would log at this speed."""
        return self.flops / (self.seconds * self.gpus * self.peak)


def step_time(model, layout: Parallelism, rows: Rows, *, global_batch: int, micro_batch: int, gpu: GpuKind,
              mfu: Optional[float] = None, fp8: bool = False, frozen: tuple = ()) -> StepTime:
    """Time of one optimizer step of ``global_batch`` pairs, each micro-batch shaped ``rows``."""
    from megatron_mpo.training.flops import FlopCounter, nominal_peak

    counter = FlopCounter(model, frozen=frozen, fp8=fp8)
    peak = nominal_peak(gpu.name, fp8)
    if peak is None:
        raise UserError(f"no data-sheet peak for {gpu.name!r}")
    tiles = rows.tiles * rows.pairs
    llm = rows.tokens * counter.llm_linear_flops_per_token() + rows.attended * counter.llm_score_flops_per_key()
    logits = rows.scored * counter.logits_flops_per_token()
    vision = tiles * counter.vision_flops_per_tile()
    per_micro = llm + logits + vision
    micro_batches = global_batch // micro_batch
    per_rank = max(1, micro_batches // layout.data)

    extra = 0.0  # recomputation runs the forward (a third of forward + backward) again
    if layout.recompute == "full":
        extra = (llm + vision) / 3
    elif layout.recompute == "selective":
        extra = rows.attended * counter.llm_score_flops_per_key() / 3 + vision / 3

    layers = stage_layers(model.language.num_layers, layout)
    per_layer = llm / model.language.num_layers
    stages = [len(ids) * per_layer for ids in layers]
    stages[0] += vision
    stages[-1] += logits
    imbalance = max(stages) / (sum(stages) / len(stages))
    vp = layout.virtual_pipeline or 1
    bubble = (layout.pipeline - 1) / (per_rank * vp)
    return StepTime(flops=per_micro * micro_batches, peak=peak.flops, peak_source=peak.source,
                    mfu=mfu if mfu is not None else default_mfu(fp8), bubble=bubble, imbalance=imbalance,
                    recompute=extra / per_micro, gpus=layout.gpus)

"""Which of Megatron-LM's production speed settings a run turns on, and why the others are off.

Megatron-LM's recipes run the distributed optimizer with ``--overlap-grad-reduce
--overlap-param-gather`` (examples/llama/train_llama3_8b_h100_fp8.sh, examples/mixtral/
train_mixtral_8x7b_distributed.sh), keep gradient-accumulation fusion (on unless
``--no-gradient-accumulation-fusion``) and always deallocate pipeline outputs
(``core_transformer_config_from_args``); MoE recipes add ``--moe-permute-fusion``. Each has
requirements -- a CUDA device, apex's or Transformer Engine's kernels, more than one
data-parallel rank or pipeline stage, a training run, and for overlap the same graph on
every data-parallel rank (the model keeps it: a text-only micro-batch runs the vision
modules on a blank tile, ``InternVLModel._blank_features``). :func:`choose` is the one
rule (pure: machine and layout in, settings out, so a CPU test checks it for any machine);
:func:`detect` reads this machine;
:meth:`PerfSettings.describe` is the banner's line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.parallel import Layout

__all__ = ["Machine", "PerfSettings", "choose", "detect", "bucket_size", "for_run"]

# megatron-core's DDP bucket size when none is given (DistributedDataParallel.__init__, as
# Megatron-LM's ddp_bucket_size default): at least 40M parameters, 1M per data-parallel
# rank beyond that, so each rank's part of a bucket stays large enough for bandwidth-bound
# collectives at large data-parallel sizes.
MIN_BUCKET = 40_000_000
BUCKET_PER_RANK = 1_000_000


@dataclass(frozen=True)
class Machine:
    """What the rule reads about the machine."""

    cuda: bool
    apex_wgrad: bool  # apex's fused_weight_gradient_mlp_cuda (megatron-core's linears need it)
    te_permute: bool  # Transformer Engine's fused MoE permutation (TE >= 2.1)


@dataclass(frozen=True)
class PerfSettings:
    """The settings a run uses (all off: megatron-core's defaults) and why each off one is."""

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    align_param_gather: bool = False
    bucket_size: Optional[int] = None
    gradient_accumulation_fusion: bool = False
    deallocate_pipeline_outputs: bool = False
    moe_permute_fusion: bool = False
    why_off: dict = field(default_factory=dict)  # setting -> reason, for the banner

    def model_overrides(self) -> dict:
        """TransformerConfig fields of every sub-model (LLM, vision tower, projector)."""
        return {"gradient_accumulation_fusion": self.gradient_accumulation_fusion}

    def language_overrides(self) -> dict:
        """TransformerConfig fields of the LLM only (the one model the schedules and the
        MoE dispatcher read)."""
        return {"deallocate_pipeline_outputs": self.deallocate_pipeline_outputs,
                "moe_permute_fusion": self.moe_permute_fusion, **self.model_overrides()}

    def describe(self) -> str:
        """``overlap_grad_reduce, ... (buckets of 40M params); off: name (why), ...``"""
        names = ("overlap_grad_reduce", "overlap_param_gather", "align_param_gather",
                 "gradient_accumulation_fusion", "deallocate_pipeline_outputs", "moe_permute_fusion")
        on = [n for n in names if getattr(self, n)]
        text = ", ".join(on) if on else "none"
        if self.bucket_size:
            text += f" (buckets of {self.bucket_size / 1e6:g}M params)"
        off = [f"{n} ({self.why_off[n]})" for n in names if not getattr(self, n) and n in self.why_off]
        return text + (f"; off: {', '.join(off)}" if off else "")


def bucket_size(data_parallel: int) -> int:
    """megatron-core's default DDP bucket size (parameters) for ``data_parallel`` ranks."""
    return max(MIN_BUCKET, BUCKET_PER_RANK * data_parallel)


def choose(machine: Machine, *, data_parallel: int, pipeline: int, interleaved: bool, moe: bool,
           training: bool) -> PerfSettings:
    """The settings for a run on ``machine`` at this layout (``interleaved``: virtual pipeline
    stages); ``training``: False for a forward-only run (the reference tool: no gradients,
    no DDP)."""
    why: dict[str, str] = {}

    # Overlap needs the gradients' data-parallel collectives and the distributed optimizer
    # (always used by the trainer); gloo runs them too, so no device rule. Its collectives
    # are dispatched by hooks as gradients become ready and as modules run, so every
    # data-parallel rank must run the same graph, whatever its data: with a varying one the
    # ranks' reduce-scatters and all-gathers come in different orders (seen on gloo:
    # "collective mismatch"; NCCL would hang). The model keeps one graph: text-only
    # micro-batches run the vision modules on a blank tile; an MoE expert that receives no
    # tokens still runs (on zero rows) in its place. Without overlap_grad_reduce
    # megatron-core keeps one bucket, so overlapping the all-gather alone would gain
    # nothing: both go together.
    overlap = training and data_parallel > 1
    if not overlap:
        why["overlap_grad_reduce"] = why["overlap_param_gather"] = (
            "forward only" if not training else "one data-parallel rank")
    # Megatron-LM aligns the stages' all-gathers only under the interleaved schedule (the
    # one that calls param_sync_func); otherwise it turns align off.
    align = overlap and interleaved
    if overlap and not align:
        why["align_param_gather"] = "not interleaved"

    # A CUDA kernel, and megatron-core's own linears (GPTModel's output layer whatever the
    # spec) refuse it without apex's extension; it accumulates into DDP's main_grad buffers.
    fusion = training and machine.cuda and machine.apex_wgrad
    if not fusion:
        why["gradient_accumulation_fusion"] = (
            "forward only" if not training else "no CUDA device" if not machine.cuda
            else "apex's fused_weight_gradient_mlp_cuda is not installed")

    # Only pipeline stages send activations; Megatron-LM always sets it. The interleaved
    # schedule (overlapped p2p) frees an output right after starting its send: on CUDA the
    # caching allocator keeps the block for the NCCL stream, but a gloo send would read
    # freed host memory (seen: wrong updates on CPU).
    deallocate = pipeline > 1 and (machine.cuda or not interleaved)
    if not deallocate:
        why["deallocate_pipeline_outputs"] = ("one pipeline stage" if pipeline == 1
                                              else "interleaved schedule's async sends on gloo")

    permute = moe and machine.cuda and machine.te_permute
    if not permute:
        why["moe_permute_fusion"] = ("dense model" if not moe else "no CUDA device" if not machine.cuda
                                     else "needs Transformer Engine >= 2.1")

    return PerfSettings(
        overlap_grad_reduce=overlap, overlap_param_gather=overlap, align_param_gather=align,
        bucket_size=bucket_size(data_parallel) if overlap else None,
        gradient_accumulation_fusion=fusion, deallocate_pipeline_outputs=deallocate,
        moe_permute_fusion=permute, why_off=why,
    )


def detect() -> Machine:
    """This machine, as megatron-core itself decides it (its import-time flags)."""
    from megatron.core.tensor_parallel import layers

    from megatron_mpo import platform

    te_permute = False
    if importlib.util.find_spec("transformer_engine") is not None:
        try:
            from megatron.core.extensions import transformer_engine as te_ext
        except Exception:  # a broken TE install: the TE spec refuses it with its own line
            te_ext = None
        te_permute = te_ext is not None and te_ext.fused_permute is not None
    return Machine(cuda=platform.current().is_cuda,
                   # The flag ColumnParallelLinear checks before it refuses the fusion.
                   apex_wgrad=bool(getattr(layers, "_grad_accum_fusion_available", False)),
                   te_permute=te_permute)


def for_run(layout: Layout, model_config: InternVLConfig, *, training: bool) -> PerfSettings:
    """:func:`choose` for this machine, ``layout`` and model."""
    return choose(detect(), data_parallel=layout.data, pipeline=layout.pipeline,
                  interleaved=bool(layout.virtual_pipeline), moe=model_config.language.is_moe, training=training)

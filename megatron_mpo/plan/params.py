"""Parameters one rank holds, by part, for a parallel layout: counted from the architecture.

The counts follow the modules :func:`megatron_mpo.models.internvl.build_model` builds (the
same for the local and the Transformer Engine spec, which only fuse norms into linears):
the vision tower and projector sit whole on the first pipeline stage, split over tensor
parallelism like the LLM; the LLM's layers follow ``parallel.pipeline_layers`` (or an even
split), embedding on the first stage, final norm and output layer on the last; an MoE
layer's router is a dense parameter, its experts are split over expert parallelism and,
inside each expert, over tensor parallelism (megatron-core's expert tensor parallelism
defaults to the tensor size). Norm weights, layer scales and row-parallel biases are
replicated on every tensor rank. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_mpo.errors import UserError

__all__ = ["Parallelism", "StageParams", "stage_params", "stage_layers", "llm_layer_params"]


@dataclass(frozen=True)
class Parallelism:
    """A training layout: sizes, schedule and recomputation."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    expert: int = 1
    sequence: bool = False
    virtual_pipeline: Optional[int] = None
    pipeline_layers: Optional[tuple] = None
    recompute: Optional[str] = None

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def expert_data(self) -> int:
        """Data-parallel ranks an expert's optimizer state is sharded over (megatron-core:
        world / (expert TP x EP x PP) = DP / EP, expert TP being the tensor size)."""
        return max(1, self.data // self.expert)

    def describe(self) -> str:
        parts = [f"TP{self.tensor}", f"PP{self.pipeline}"]
        if self.virtual_pipeline:
            parts.append(f"VP{self.virtual_pipeline}")
        if self.expert > 1:
            parts.append(f"EP{self.expert}")
        text = " x ".join(parts) + f", DP {self.data}"
        if self.sequence:
            text += ", SP"
        if self.pipeline_layers:
            text += f", layers {list(self.pipeline_layers)}"
        return text + f", recompute {self.recompute or 'off'}"


@dataclass(frozen=True)
class StageParams:
    """Parameters of one rank on pipeline stage ``stage`` (all its virtual chunks)."""

    stage: int
    vision: int = 0
    projector: int = 0
    llm: int = 0  # dense LLM: embedding, layers' attention / dense MLP / routers / norms, output layer
    experts: int = 0  # this rank's share of the MoE experts (sharded over expert-DP, not DP)
    fp32: int = 0  # kept in fp32 whatever the dtype (torch LayerNorm of the local spec)
    llm_linear: int = 0  # LLM GEMM weights (attention, MLP, experts): what FP8 caches a copy of
    layers: tuple = field(default_factory=tuple)  # global LLM layer indices on this stage

    @property
    def dense(self) -> int:
        """Parameters sharded over the data-parallel group."""
        return self.vision + self.projector + self.llm

    @property
    def total(self) -> int:
        return self.dense + self.experts


def stage_layers(num_layers: int, layout: Parallelism) -> list[list[int]]:
    """Global LLM layer indices of each pipeline stage (its virtual chunks in order), as
    :func:`~megatron_mpo.training.model_setup.build_model_chunks` splits them."""
    pp, vp = layout.pipeline, layout.virtual_pipeline or 1
    chunks = pp * vp
    split = list(layout.pipeline_layers) if layout.pipeline_layers else None
    if split is None:
        if num_layers % chunks:
            raise UserError(f"{num_layers} LLM layers do not split evenly over {chunks} pipeline chunks; "
                            "give parallel.pipeline_layers")
        split = [num_layers // chunks] * chunks
    if len(split) != chunks or sum(split) != num_layers or min(split) < 0:
        raise UserError(f"parallel.pipeline_layers {split} must have {chunks} entries summing to {num_layers}")
    starts = [sum(split[:i]) for i in range(chunks)]
    stages: list[list[int]] = [[] for _ in range(pp)]
    for chunk in range(chunks):  # chunk order: every stage's first chunk, then every second ...
        stages[chunk % pp].extend(range(starts[chunk], starts[chunk] + split[chunk]))
    return stages


def llm_layer_params(lang, tensor: int, expert: int, moe: bool) -> tuple[int, int, int]:
    """(dense, expert, GEMM) parameters of one LLM layer on one rank."""
    h, hd = lang.hidden_size, lang.kv_channels
    q, kv = lang.num_heads * hd, lang.num_kv_heads * hd
    qkv = h * (q + 2 * kv) // tensor + ((q + 2 * kv) // tensor if lang.qkv_bias else 0)
    proj = q // tensor * h
    dense = 2 * h + qkv + proj + (2 * hd if lang.qk_norm else 0)
    linear = h * (q + 2 * kv) // tensor + proj
    if moe:
        local = lang.num_experts // expert * 3 * h * lang.moe_intermediate_size // tensor
        return dense + h * lang.num_experts, local, linear + local
    mlp = 3 * h * lang.ffn_hidden_size // tensor
    return dense + mlp, 0, linear + mlp


def _vision_params(model, tensor: int) -> tuple[int, int]:
    """(parameters, of which LayerNorm) of InternViT on one tensor rank."""
    vis = model.vision
    c, width, ffn = vis.hidden_size, vis.heads * vis.head_dim, vis.ffn_hidden_size
    norm = 2 * c if vis.norm == "LayerNorm" else c
    layer = (2 * c + 2 * norm  # ls1, ls2, the two norms
             + c * 3 * width // tensor + (3 * width // tensor if vis.qkv_bias else 0)
             + (2 * width // tensor if vis.qk_norm else 0)
             + width // tensor * c + c  # proj (+ replicated bias)
             + c * ffn // tensor + ffn // tensor + ffn // tensor * c + c)
    embed = 3 * vis.patch_size**2 * c + c + c + vis.num_positions * c
    layer_norms = vis.num_layers * 2 * norm if vis.norm == "LayerNorm" else 0
    return embed + vis.num_layers * layer, layer_norms


def _projector_params(model, tensor: int) -> int:
    d, h = model.projector_input_size, model.language.hidden_size
    return 2 * d + d * h // tensor + h // tensor + h // tensor * h + h


def stage_params(model, layout: Parallelism, stage: int, spec: str = "local", dtype: str = "bf16",
                 frozen: Sequence[str] = ()) -> StageParams:
    """Parameters one rank of pipeline ``stage`` holds. ``frozen`` parts still occupy their
    weights but no gradient or optimizer state (see :mod:`~megatron_mpo.plan.memory`)."""
    lang = model.language
    layers = stage_layers(lang.num_layers, layout)[stage]
    t, ep = layout.tensor, layout.expert
    llm = experts = linear = 0
    for i in layers:
        d, e, g = llm_layer_params(lang, t, ep, lang.is_moe_layer(i))
        llm, experts, linear = llm + d, experts + e, linear + g
    vocab = lang.padded_vocab_size * lang.hidden_size // t
    vision = projector = fp32 = 0
    if stage == 0:
        llm += vocab
        vision, vision_ln = _vision_params(model, t)
        projector = _projector_params(model, t)
        if spec == "local" and dtype != "fp32":  # torch LayerNorm keeps fp32 weights
            fp32 = vision_ln + 2 * model.projector_input_size
    if stage == layout.pipeline - 1:
        llm += lang.hidden_size  # final norm
        if not (lang.tie_embeddings and layout.pipeline == 1):
            llm += vocab
    return StageParams(stage=stage, vision=vision, projector=projector, llm=llm, experts=experts, fp32=fp32,
                       llm_linear=linear, layers=tuple(layers))

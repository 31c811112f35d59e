"""InternVL as one megatron-core model chunk: InternViT + mlp1 + GPTModel.

Pipeline layout: the vision tower and projector sit on the first pipeline stage only
(they are small next to the LLM); the LLM's layers are split over the stages, evenly or
by an explicit ``pipeline_layers`` list. Every stage passes ``[S, B, H]`` hidden states.

Vision features are computed once per micro-batch for all its tiles and scattered into
the token embeddings through ``image_token_index`` (see :mod:`megatron_mpo.batch`), so
the chosen and rejected rows of a preference pair read one vision pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_mpo import platform
from megatron_mpo.errors import UserError
from megatron_mpo.models.config import InternVLConfig
from megatron_mpo.models.moe_balance import (megatron_aux_loss_coeff, reset_load_balancing_tracker,
                                          sequence_parallel_padding)
from megatron_mpo.models.specs import (
    check_backend,
    default_attention,
    language_block_spec,
    projector_spec,
    vision_layer_spec,
)
from megatron_mpo.models.vision import InternViTModel, InternVLProjector, pixel_shuffle
from megatron_mpo.parallel_layout import check_layout
from megatron_mpo.segments import causal_mask, is_segments, segment_mask
from megatron_mpo.settings import below_one

__all__ = [
    "InternVLModel",
    "InternVLLanguageModel",
    "build_model",
    "pipeline_layout",
    "language_transformer_config",
    "vision_transformer_config",
    "projector_transformer_config",
    "scatter_image_features",
    "zero_from",
]


# --------------------------------------------------------------------------------------
# megatron-core TransformerConfigs
# --------------------------------------------------------------------------------------


def _runtime_kwargs(tp: int, params_dtype: torch.dtype) -> dict:
    """Settings every sub-config shares: parallel sizes, dtype, CPU-safe fusions."""
    on_gpu = platform.current().is_cuda
    return dict(
        tensor_model_parallel_size=tp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        masked_softmax_fusion=False,  # megatron's fused softmax kernels are not shipped
        bias_dropout_fusion=platform.jit_fusions(),  # torch.compile'd: a GPU where it runs
        apply_rope_fusion=False,  # RoPE follows position_ids (per-row freqs), see below
        persist_layer_norm=False,
        init_method_std=0.02,
    )


def _unsplit_kwargs(tp: int, params_dtype: torch.dtype) -> dict:
    """:func:`_runtime_kwargs` for the first-stage-only parts (vision tower, projector):
    never pipeline-split, no sequence parallelism."""
    return dict(pipeline_model_parallel_size=1, sequence_parallel=False, **_runtime_kwargs(tp, params_dtype))


# InternViT's MLP and mlp1: biased linears, exact GELU, no gating. No bias-GELU fusion:
# megatron's fused bias-GELU is the tanh approximation.
_EXACT_GELU_MLP = dict(
    gated_linear_unit=False, activation_func=F.gelu, add_bias_linear=True, bias_activation_fusion=False
)
_FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def moe_kwargs(config: InternVLConfig, ep: int = 1, spec: str = "local",
               aux_loss_convention: str = "transformers") -> dict:
    """The TransformerConfig fields of a mixture-of-experts LLM ({} for a dense one).

    Qwen3-MoE's router: softmax over all experts, top-k, renormalised over the k when
    ``norm_topk_prob`` -- megatron-core's top-k-then-softmax (``moe_router_pre_softmax``
    False); without renormalisation, softmax-then-top-k. The router runs in fp32 (Qwen3-MoE
    takes its softmax in fp32). Dropless (no capacity factor): a token's experts do not
    depend on what else is in the batch, so packed and unpacked rows route alike. Experts
    are dispatched with all-to-all over the ``ep`` expert-parallel ranks. The load-balancing
    coefficient is the model's read in ``aux_loss_convention``
    (:func:`~megatron_mpo.models.moe_balance.megatron_aux_loss_coeff`).
    """
    lang = config.language
    if not lang.is_moe:
        return {}
    return dict(
        num_moe_experts=lang.num_experts,
        moe_ffn_hidden_size=lang.moe_intermediate_size,
        moe_router_topk=lang.num_experts_per_tok,
        moe_router_pre_softmax=not lang.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if lang.router_aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=megatron_aux_loss_coeff(lang, aux_loss_convention),
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_layer_freq=[int(lang.is_moe_layer(i)) for i in range(lang.num_layers)],
        moe_grouped_gemm=spec == "transformer_engine",
        expert_model_parallel_size=ep,
    )


def language_transformer_config(
    config: InternVLConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    spec: str = "local",
    params_dtype: torch.dtype = torch.float32,
    fp8: Optional[str] = None,
    fp8_recipe: str = "delayed",
    sequence_parallel: bool = False,
    pipeline_layers: Optional[Sequence[int]] = None,
    recompute: Optional[str] = None,
    dropout: float = 0.0,
    overrides: Optional[dict] = None,
    aux_loss_convention: str = "transformers",
) -> TransformerConfig:
    """The LLM's TransformerConfig (Llama-style GPT: RMSNorm, SwiGLU, GQA, RoPE).

    ``fp8``/``fp8_recipe``: FP8 format and scaling recipe (``TransformerConfig.fp8_recipe``,
    which selects the Transformer Engine recipe in megatron-core's ``get_fp8_recipe``).
    ``overrides``: further TransformerConfig fields set by the trainer (e.g.
    ``variable_seq_lengths``, ``deallocate_pipeline_outputs``)."""
    lang = config.language
    kwargs = dict(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        ffn_hidden_size=lang.ffn_hidden_size,
        num_attention_heads=lang.num_heads,
        num_query_groups=lang.num_kv_heads,
        kv_channels=lang.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=lang.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=lang.qkv_bias,
        bias_activation_fusion=platform.jit_fusions(),  # SwiGLU fusion is exact; torch.compile'd
        hidden_dropout=dropout,
        attention_dropout=dropout,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        **_runtime_kwargs(tp, params_dtype),
        **moe_kwargs(config, ep, spec, aux_loss_convention),
    )
    if pipeline_layers is not None:
        kwargs["pipeline_model_parallel_layout"] = pipeline_layout(pipeline_layers, pp, lang.num_layers)
    if recompute is not None:
        if recompute not in ("full", "selective"):
            raise UserError(f"recompute must be full or selective, not {recompute!r}")
        kwargs.update(_FULL_RECOMPUTE if recompute == "full" else {"recompute_granularity": recompute})
    if fp8 is not None:
        kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe)
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


def vision_transformer_config(
    config: InternVLConfig, *, tp: int = 1, params_dtype: torch.dtype = torch.float32, recompute: Optional[str] = None
) -> TransformerConfig:
    """InternViT's TransformerConfig: never pipeline-split, no sequence parallelism, no FP8
    (its 1025-token tiles do not meet FP8 GEMM shape rules)."""
    vis = config.vision
    kwargs = _unsplit_kwargs(tp, params_dtype)
    if recompute is not None:
        kwargs.update(_FULL_RECOMPUTE)
    return TransformerConfig(
        num_layers=vis.num_layers,
        hidden_size=vis.hidden_size,
        ffn_hidden_size=vis.ffn_hidden_size,
        num_attention_heads=vis.heads,
        num_query_groups=vis.heads,
        kv_channels=vis.head_dim,
        normalization=vis.norm,
        layernorm_epsilon=vis.norm_eps,
        add_qkv_bias=vis.qkv_bias,
        qk_layernorm=vis.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **_EXACT_GELU_MLP,
        **kwargs,
    )


def projector_transformer_config(
    config: InternVLConfig, *, tp: int = 1, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """mlp1's TransformerConfig: LayerNorm, biased linears, exact GELU, H -> H."""
    lang = config.language
    return TransformerConfig(
        num_layers=1,
        hidden_size=lang.hidden_size,
        ffn_hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=config.projector_norm_eps,
        **_EXACT_GELU_MLP,
        **_unsplit_kwargs(tp, params_dtype),
    )


def pipeline_layout(layers: Sequence[int], pp: int, num_layers: int) -> list:
    """``[n0, n1, ...]`` LLM layers per stage (``pp * vp`` entries for interleaved
    schedules) -> a megatron-core ``pipeline_model_parallel_layout``."""
    layers = [int(n) for n in layers]
    if len(layers) % pp or any(n < 0 for n in layers) or sum(layers) != num_layers:
        raise UserError(
            f"pipeline_layers {layers} must have a multiple of {pp} (pipeline stages) "
            f"non-negative entries summing to {num_layers} (LLM layers)"
        )
    layout = [["decoder"] * n for n in layers]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


# --------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------


class InternVLLanguageModel(GPTModel):
    """megatron-core GPTModel with two exactness fixes for InternVL's LLMs.

    * RoPE angles come from ``position_ids`` (per row), not from ``arange(S)``: packed rows
      (prompt, chosen, rejected) restart positions, and log-probs must not depend on it.
    * The vocabulary is padded for TP; padded logits are masked out of the softmax so
      log-probs equal those over the real vocabulary.

    And one saving: given ``loss_mask`` (the positions whose loss is read), the output
    layer and the cross entropy run on those positions only and every other position's
    loss is 0. Preference rows are mostly prompt (image tokens); with a real vocabulary
    (92k-151k) the logits of the prompt positions are a large share of the LLM's FLOPs
    and its largest activation, and nothing reads them.
    """

    def __init__(self, *args, real_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if position_ids is None or self.position_embedding_type != "rope":
            return out
        out = list(out)
        out[1] = self._rope_from_positions(position_ids)
        return tuple(out)

    def _rope_from_positions(self, position_ids: Tensor) -> Tensor:
        """``[B, S]`` positions -> ``[S, B, 1, D]`` RoPE angles (megatron-core layout)."""
        rope = self.rotary_pos_emb
        inv_freq = rope.inv_freq.to(position_ids.device)
        pos = position_ids.transpose(0, 1).to(inv_freq.dtype)
        if rope.seq_len_interpolation_factor is not None:
            pos = pos / rope.seq_len_interpolation_factor
        freqs = pos.unsqueeze(-1) * inv_freq  # [S, B, D/2]
        return torch.cat([freqs, freqs], dim=-1).unsqueeze(2)

    def _mask_padded_vocab(self, logits: Tensor) -> Tensor:
        """-inf on this TP shard's padded vocabulary columns (if it has any)."""
        local = logits.shape[-1]
        start = self.pg_collection.tp.rank() * local
        if start + local <= self.real_vocab_size:
            return logits
        ids = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(ids >= self.real_vocab_size, float("-inf"))

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        return super().compute_language_model_loss(labels, self._mask_padded_vocab(logits))

    def _postprocess(self, **kwargs):
        hidden, labels, scored = kwargs["hidden_states"], kwargs["labels"], kwargs.get("loss_mask")
        if not self.post_process or labels is None or scored is None or kwargs.get("mtp_in_postprocess"):
            return super()._postprocess(**kwargs)
        rows = _ScoredRows(scored, self.pg_collection.tp if self.config.sequence_parallel else None)
        kwargs["hidden_states"] = rows.select_hidden(hidden)
        kwargs["labels"] = rows.select_labels(labels)
        kwargs["loss_mask"] = None
        picked = super()._postprocess(**kwargs)  # [1, N]
        return rows.scatter_loss(picked)  # [B, S]


class _ScoredRows:
    """Which hidden-state rows the output layer runs on: the scored (response) positions.

    Positions are numbered sequence-major (``s * B + b``), as megatron-core lays out
    ``[S, B, H]``. Without sequence parallelism every rank holds all positions and picks
    the scored ones. With it, TP rank ``r`` holds positions ``[r * L, (r + 1) * L)``
    (``L = S / TP * B``) and the output layer all-gathers its input along the first
    dimension, so each rank picks the scored positions of its own part, padded to the
    largest count over the ranks (every rank can count them: ``loss_mask`` is whole on
    each), and the all-gather puts them in rank order. Padding rows are computed and
    dropped; they receive no gradient.
    """

    def __init__(self, scored: Tensor, sp_group=None):
        self.batch, self.seq = scored.shape
        shards = sp_group.size() if sp_group is not None else 1
        rank = sp_group.rank() if sp_group is not None else 0
        flat = scored.transpose(0, 1).reshape(shards, -1)  # [TP, L], sequence-major
        self.local_len = flat.shape[1]
        counts = flat.sum(dim=1)
        width = max(int(counts.max()), 1)
        order = torch.arange(self.local_len, device=scored.device).expand(shards, -1)
        # Scored positions first, each part in its own order; then the rest (padding).
        local = torch.where(flat, order, order + self.local_len).argsort(dim=1)[:, :width]
        self.valid = (torch.arange(width, device=scored.device) < counts.unsqueeze(1)).reshape(-1)
        self.local_index = local[rank]  # [width] rows of this rank's hidden states
        offsets = torch.arange(shards, device=scored.device).unsqueeze(1) * self.local_len
        self.global_index = (local + offsets).reshape(-1)  # [TP * width], gathered order

    def select_hidden(self, hidden: Tensor) -> Tensor:
        """``[S_local, B, H]`` -> ``[width, 1, H]``."""
        flat = hidden.reshape(-1, 1, hidden.shape[-1])
        return flat.index_select(0, self.local_index.to(hidden.device))

    def select_labels(self, labels: Tensor) -> Tensor:
        """``[B, S]`` -> ``[1, TP * width]`` in the output layer's (gathered) order."""
        return labels.transpose(0, 1).reshape(1, -1).index_select(1, self.global_index.to(labels.device))

    def scatter_loss(self, picked: Tensor) -> Tensor:
        """``[1, TP * width]`` per-position losses -> ``[B, S]``, 0 where not scored."""
        valid = self.valid.to(picked.device)
        index = self.global_index.to(picked.device)[valid]
        loss = picked.new_zeros(self.seq * self.batch).index_copy(0, index, picked.reshape(-1)[valid])
        return loss.reshape(self.seq, self.batch).transpose(0, 1)


# --------------------------------------------------------------------------------------
# InternVL
# --------------------------------------------------------------------------------------


def zero_from(features: Tensor) -> Tensor:
    """A scalar 0 that depends on ``features`` (their gradient: 0): ``0 * x`` summed, not ``0 *
    sum(x)``, so no finite ``features`` can overflow the sum (fp16) and turn it into NaN."""
    return (features * 0).sum()


def scatter_image_features(embeddings: Tensor, features: Tensor, image_token_index: Tensor) -> Tensor:
    """``embeddings[s, b] = features[image_token_index[b, s]]`` where the index is >= 0.

    ``embeddings`` is ``[S, B, H]`` (sequence-first), ``features`` ``[N, H]``, the index
    ``[B, S]``. Out of place, so gradients reach every feature row once per use.
    """
    index = image_token_index.transpose(0, 1)
    mask = index >= 0
    rows = index[mask]
    if rows.numel() == 0:
        return embeddings + zero_from(features)  # keep the vision graph alive
    top = int(rows.max())
    if top >= features.shape[0]:
        raise ValueError(
            f"image_token_index refers to vision feature row {top}, but the micro-batch has "
            f"only {features.shape[0]} (tiles x tokens_per_tile)"
        )
    return embeddings.masked_scatter(mask.unsqueeze(-1), features[rows].to(embeddings.dtype))


class InternVLModel(MegatronModule):
    """One pipeline chunk of InternVL.

    ``forward(input_ids, position_ids, attention_mask, labels, pixel_values,
    image_token_index, loss_mask)`` returns, on the last stage, the per-token loss
    ``[R, S]`` (``-log p(labels)``, fp32, vocab-parallel cross entropy; with a bool
    ``loss_mask [R, S]`` computed only where it is True, 0 elsewhere) when ``labels`` is given,
    else the logits ``[R, S, V/TP]`` (``[R, S, V]`` with ``runtime_gather_output=True``;
    ignored with labels). Other stages return hidden states ``[S, R, H]``. ``padding_mask``
    ``[R, S]`` (True = padding) keeps padded positions out of a mixture-of-experts LLM's
    load-balancing loss.
    """

    def __init__(
        self,
        config: InternVLConfig,
        language_config: TransformerConfig,
        vision_config: Optional[TransformerConfig] = None,
        projector_config: Optional[TransformerConfig] = None,
        *,
        spec: str = "local",
        pre_process: bool = True,
        post_process: bool = True,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        attention: Optional[str] = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(config=language_config)
        pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.arch = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = config.language.tie_embeddings
        # The local attention applies the mask it is given; TE's causal kernel needs none,
        # nor does FlexAttention (no mask = its causal block mask).
        attention = attention or default_attention(spec)
        self._explicit_causal_mask = attention != "flex" and (spec == "local" or attn_mask_type != AttnMaskType.causal)
        # TE's own core attention takes packed rows as a dense [b, 1, S, S] mask only.
        self._dense_packed_mask = attention == "te"
        self.vision_model: Optional[InternViTModel] = None
        self.vision_projection: Optional[InternVLProjector] = None
        if pre_process:
            if vision_config is None or projector_config is None:
                raise ValueError("the first pipeline stage needs vision_config and projector_config")
            vis = config.vision
            self.vision_model = InternViTModel(
                vision_config,
                vision_layer_spec(vis, spec, tp_group=pg_collection.tp),
                image_size=vis.image_size,
                patch_size=vis.patch_size,
                num_positions=vis.num_positions,
                pg_collection=pg_collection,
                drop_path_rate=drop_path_rate,
            )
            self.vision_projection = InternVLProjector(
                projector_config, projector_spec(spec), config.projector_input_size,
                eps=config.projector_norm_eps, tp_group=pg_collection.tp,
            )
        lang = config.language
        rope_kwargs = _rope_kwargs(lang.rope_scaling)
        num_layers = get_num_layers_to_build(language_config, vp_stage, pg_collection.pp.rank())
        first = get_transformer_layer_offset(language_config, vp_stage, pg_collection.pp.rank())
        self.language_model = InternVLLanguageModel(
            config=language_config,
            transformer_layer_spec=language_block_spec(
                spec, attn_mask_type, num_layers, qk_norm=lang.qk_norm, tp_group=pg_collection.tp,
                attention=attention, moe_layers=[lang.is_moe_layer(first + i) for i in range(num_layers)],
                num_experts=lang.num_experts or None,
            ),
            vocab_size=lang.padded_vocab_size,
            max_sequence_length=lang.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=lang.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=lang.rope_theta,
            scatter_embedding_sequence_parallel=False,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            real_vocab_size=lang.vocab_size,
            **rope_kwargs,
        )

    # ---- pipeline plumbing ----------------------------------------------------------

    def set_input_tensor(self, input_tensor) -> None:
        """Hidden states from the previous stage (the schedules pass a list of one)."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        assert len(input_tensor) == 1, "InternVLModel takes one input tensor per stage"
        self.language_model.set_input_tensor(input_tensor[0])

    def shared_embedding_or_output_weight(self) -> Optional[Tensor]:
        """For megatron-core's finalize_model_grads (tied word embeddings across stages)."""
        return self.language_model.shared_embedding_or_output_weight()

    # ---- forward --------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``[T, 3, H, W]`` tiles -> ``[T * tokens_per_tile, H_llm]`` projected features."""
        frozen = not any(p.requires_grad for p in self.vision_model.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            patches = self.vision_model(pixel_values)  # [T, N, C]
        merged = pixel_shuffle(patches, self.arch.downsample_ratio)  # [T, N/4, 4C]
        projected = self.vision_projection(merged)  # [T, N/4, H]
        return projected.reshape(-1, projected.shape[-1])

    def _blank_features(self, like: Tensor) -> Optional[Tensor]:
        """The vision modules run on one blank (zero) tile when any of their parameters trains
        and gradients are on; else None (frozen, or forward only: nothing to keep in step).

        Why: megatron-core's overlapped gradient reduce (``overlap_grad_reduce``) starts a
        bucket's reduce-scatter from the gradient hooks, in the order the buckets fill, and
        expects every data-parallel rank to issue them in one order. A text-only micro-batch
        that skipped the vision modules gave their parameters gradients in another order than
        an image micro-batch (a collective mismatch when the ranks' last micro-batches
        differ). Run on a blank tile, they are the same graph as on real tiles -- the number
        of tiles is a size, not a branch -- so the hooks fire in the same order. The blank
        tile's activations are finite (a constant image, as the ImageNet mean colour), so
        ``0 * features`` is exactly 0: the micro-batch's numbers are unchanged, the vision
        gradients 0. Drop path draws its masks for the blank tile from its own stream (the
        same on every TP rank of a replica; later masks differ from a run without it).
        Cost, on text-only micro-batches only: one tile's vision forward + backward. Tiny
        preset, 2-core CPU: +6 to +12 ms (+6 % at 2 x 1024 tokens, +33 % at 2 x 64). By FLOPs
        (:class:`~megatron_mpo.training.flops.FlopCounter`), against a text-only pair of
        2 x 1024 tokens: InternViT-300M 2.2 TFLOP, 2.5 % of InternVL2.5-8B's 90 (40 % on
        InternVL2.5-1B's 0.5B LLM); InternViT-6B 36 TFLOP, 9 % of InternVL2.5-38B's 392
        (15 % on 26B, 4 % on 78B); a quarter of that at 2 x 4096 tokens.
        """
        trains = any(p.requires_grad for p in itertools.chain(
            self.vision_model.parameters(), self.vision_projection.parameters()))
        if not (trains and torch.is_grad_enabled()):
            return None
        side = self.arch.vision.image_size
        return self.encode_images(torch.zeros(1, 3, side, side, device=like.device))

    def embed(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        pixel_values: Optional[Tensor],
        image_token_index: Optional[Tensor],
    ) -> Tensor:
        """Token embeddings ``[S, R, H]`` with image positions replaced by vision features."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            if image_token_index is None:
                raise ValueError("pixel_values given without image_token_index")
            embeddings = scatter_image_features(embeddings, self.encode_images(pixel_values), image_token_index)
        else:
            # Text-only micro-batch: the vision modules' graph as with images, adding 0.
            blank = self._blank_features(embeddings)
            if blank is not None:
                embeddings = embeddings + zero_from(blank)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        pixel_values: Optional[Tensor] = None,
        image_token_index: Optional[Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        loss_mask: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, position_ids, pixel_values, image_token_index)
        if attention_mask is None and self._explicit_causal_mask:
            attention_mask = causal_mask(position_ids.shape[-1]).to(position_ids.device)
        elif self._dense_packed_mask and is_segments(attention_mask):
            attention_mask = segment_mask(attention_mask)
        # Padding stays out of the routers' load-balancing statistics (MoE LLMs only).
        padding_mask = (sequence_parallel_padding(padding_mask, self.config, self.language_model.pg_collection.tp)
                        if self.config.num_moe_experts else None)
        output = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            loss_mask=loss_mask if labels is not None else None,
            # The loss is a vocab-parallel cross entropy: it must see the TP-split logits.
            runtime_gather_output=runtime_gather_output if labels is None else False,
            padding_mask=padding_mask,
        )
        if self.post_process and labels is None and output.shape[-1] == self.arch.language.padded_vocab_size:
            output = output[..., : self.arch.language.vocab_size]
        return output


def _rope_kwargs(scaling: Optional[dict]) -> dict:
    """GPTModel RoPE arguments for a Hugging Face ``rope_scaling`` dict (or refuse it)."""
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "dynamic":
        return {}  # dynamic NTK only changes positions beyond max_position_embeddings
    if kind == "linear":
        return {"seq_len_interpolation_factor": float(scaling["factor"])}
    if kind == "llama3":
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if all(float(scaling.get(k, v)) == float(v) for k, v in expected.items()):
            return {"rope_scaling": True, "rope_scaling_factor": float(scaling.get("factor", 8.0))}
    if kind == "longrope":
        raise UserError("Phi-3 LongRoPE (rope_scaling type 'longrope', InternVL2-4B) is not supported")
    raise UserError(f"RoPE scaling {scaling} is not supported (supported: linear, dynamic, llama3 with default factors)")


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------


def build_model(
    config: InternVLConfig,
    spec: str = "local",
    *,
    fp8: Optional[str] = None,
    fp8_recipe: str = "delayed",
    params_dtype: torch.dtype = torch.float32,
    pipeline_layers: Optional[Sequence[int]] = None,
    sequence_parallel: bool = False,
    recompute: Optional[str] = None,
    attention_mask: str = "causal",
    attention: Optional[str] = None,
    dropout: float = 0.0,
    vp_stage: Optional[int] = None,
    pg_collection: Optional[ProcessGroupCollection] = None,
    language_overrides: Optional[dict] = None,
    aux_loss_convention: str = "transformers",
    model_overrides: Optional[dict] = None,
    drop_path_rate: float = 0.0,
) -> InternVLModel:
    """The InternVL model chunk for this rank (megatron-core parallel_state must be set up).

    ``spec``: ``local`` or ``transformer_engine``; ``fp8``: None, ``hybrid`` or ``e4m3``
    (LLM layers only; TE spec on a GPU of compute capability >= 8.9) with ``fp8_recipe``
    ``delayed``, ``tensorwise`` or ``mxfp8``. The chunk is returned on the platform's
    device (as Megatron-LM moves every built chunk to the GPU): megatron-core's DDP
    would only copy trainable parameters to the GPU.
    ``pipeline_layers``: LLM layers per pipeline stage, e.g. ``[10, 14]`` (uneven split:
    the first stage also runs the vision tower); default an even split. Interleaved
    schedules: initialise parallel_state with ``virtual_pipeline_model_parallel_size=vp``,
    build one chunk per ``vp_stage``, and give ``pp * vp`` entries (chunk order: all
    stages' first chunks, then all second chunks) or none (even split).
    ``attention_mask``: ``causal`` (plain rows) or ``arbitrary`` (custom masks, e.g. packed
    pair rows, honoured by Transformer Engine too). ``attention``: the LLM's core
    attention, ``sdpa``, ``flex`` or ``te`` (None: the spec's default, see
    :func:`~megatron_mpo.models.specs.language_layer_spec`).
    ``language_overrides``: extra fields of the LLM's TransformerConfig (``model.config``,
    which the pipeline schedules read), e.g. ``{"deallocate_pipeline_outputs": True}``.
    (megatron-core 0.16.1 refuses ``variable_seq_lengths`` unless
    ``moe_token_dispatcher_type="alltoall"`` is set too, even without MoE.)
    ``aux_loss_convention``: how a mixture-of-experts LLM's ``router_aux_loss_coef`` is read,
    ``transformers`` or ``megatron`` (:mod:`~megatron_mpo.models.moe_balance`).
    ``model_overrides``: fields of every sub-model's TransformerConfig (LLM, vision tower,
    projector), e.g. ``{"gradient_accumulation_fusion": True}``.
    ``drop_path_rate``: InternViT's stochastic depth in training, in [0, 1)
    (:mod:`~megatron_mpo.models.drop_path`; its RNG stream is seeded by
    :func:`megatron_mpo.parallel.initialize`).
    """
    config.validate()
    below_one("drop_path_rate", drop_path_rate)  # 1 would drop every branch (and divide by 0)
    if config.language.is_moe:
        reset_load_balancing_tracker()
    check_backend(spec, fp8)
    if attention_mask not in ("causal", "arbitrary"):
        raise UserError(f"attention_mask must be causal or arbitrary, not {attention_mask!r}")
    pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
    tp, pp, pp_rank = pg_collection.tp.size(), pg_collection.pp.size(), pg_collection.pp.rank()
    ep = pg_collection.ep.size() if config.language.is_moe else 1
    # The builder does not know whether the model trains: MoE under TP without sequence
    # parallelism is a training rule, checked by the run (a forward-only model may do it).
    check_layout(config, tp, pp, ep, sequence=True if sequence_parallel else None)
    vp = _virtual_stages(config, pp, pipeline_layers)
    if vp > 1 and vp_stage is None:
        raise UserError("an interleaved pipeline (virtual stages) needs vp_stage for each model chunk")
    pre_process = pp_rank == 0 and (vp_stage or 0) == 0
    post_process = pp_rank == pp - 1 and (vp_stage is None or vp_stage == vp - 1)
    overrides = {**(model_overrides or {}), **(language_overrides or {})}
    if vp > 1:
        overrides.setdefault("virtual_pipeline_model_parallel_size", vp)
    language_config = language_transformer_config(
        config, tp=tp, pp=pp, ep=ep, spec=spec, params_dtype=params_dtype, fp8=fp8, fp8_recipe=fp8_recipe,
        sequence_parallel=sequence_parallel, pipeline_layers=pipeline_layers,
        recompute=recompute, dropout=dropout, overrides=overrides, aux_loss_convention=aux_loss_convention,
    )
    vision_config = projector_config = None
    if pre_process:
        common = dict(tp=tp, params_dtype=params_dtype)
        vision_config = vision_transformer_config(config, recompute=recompute, **common)
        projector_config = projector_transformer_config(config, **common)
        if model_overrides:
            vision_config = dataclasses.replace(vision_config, **model_overrides)
            projector_config = dataclasses.replace(projector_config, **model_overrides)
    mask_type = AttnMaskType.causal if attention_mask == "causal" else AttnMaskType.arbitrary
    model = InternVLModel(
        config, language_config, vision_config, projector_config, spec=spec,
        pre_process=pre_process, post_process=post_process, attn_mask_type=mask_type,
        pg_collection=pg_collection, vp_stage=vp_stage, attention=attention, drop_path_rate=drop_path_rate,
    )
    return platform.to_device(model)


def _virtual_stages(config: InternVLConfig, pp: int, pipeline_layers: Optional[Sequence[int]]) -> int:
    """Model chunks per pipeline rank (1 unless the schedule is interleaved)."""
    from megatron.core import parallel_state

    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    if pipeline_layers is not None:
        if len(pipeline_layers) != pp * vp:
            raise UserError(
                f"pipeline_layers has {len(pipeline_layers)} entries; give one per pipeline stage and "
                f"virtual stage ({pp} x {vp} = {pp * vp})"
            )
    elif config.language.num_layers % (pp * vp):
        raise UserError(
            f"{config.language.num_layers} LLM layers do not split evenly over {pp * vp} pipeline chunks; "
            "give pipeline_layers (layers per stage)"
        )
    return vp

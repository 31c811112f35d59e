"""Architecture of an InternVL model, independent of how it is parallelised.

These dataclasses describe *what* the network is (sizes, norms, biases); the
megatron-core ``TransformerConfig`` objects that also carry *how* it runs (TP/PP sizes,
dtype, FP8) are derived from them in :mod:`megatron_mpo.models.internvl`. The converter
stores :meth:`InternVLConfig.to_dict` as JSON beside every checkpoint, so a checkpoint
can always be rebuilt without the original Hugging Face files; reading and writing
Hugging Face configs is :mod:`megatron_mpo.conversion.hf_config`'s job.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from megatron_mpo.errors import UserError

__all__ = ["VisionConfig", "LanguageConfig", "InternVLConfig"]

LANGUAGE_FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "llama", "internlm2", "internlm3", "phi3")
# Families with Qwen3's per-head q/k RMSNorm (and no q/k/v bias).
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")


@dataclass
class VisionConfig:
    """InternViT (300M: LayerNorm + qkv bias; 6B: RMSNorm + qk-norm, no qkv bias)."""

    image_size: int = 448
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_hidden_size: int = 4096
    norm: str = "LayerNorm"  # "LayerNorm" | "RMSNorm"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False  # RMSNorm over the full hidden width (all heads), InternViT-6B
    layer_scale_init: float = 0.1  # initial value of ls1/ls2 (a checkpoint overrides it)
    act: str = "gelu"
    # Image size the position embedding was trained for; it is interpolated (bicubic) to
    # ``image_size`` at run time when the two differ. None = ``image_size``.
    pos_embed_image_size: Optional[int] = None
    # Attention heads after zero padding, so tensor parallelism can split them
    # (InternViT-6B has 25 heads: padded to 32). Padded heads have zero weights and add
    # nothing. None = no padding. Part of the checkpoint shape, so fixed at conversion.
    num_padded_heads: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def heads(self) -> int:
        """Attention heads as built (real + zero padding)."""
        return self.num_padded_heads or self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pos_grid(self) -> int:
        return (self.pos_embed_image_size or self.image_size) // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of the stored position embedding (class token + trained patch grid)."""
        return 1 + self.pos_grid**2

    def validate(self) -> None:
        _check(self.norm in ("LayerNorm", "RMSNorm"), f"vision.norm must be LayerNorm or RMSNorm, not {self.norm!r}")
        _check(self.act == "gelu", f"vision.act must be gelu, not {self.act!r}")
        _check(self.hidden_size % self.num_heads == 0, "vision.hidden_size must be divisible by num_heads")
        for name in ("image_size", "pos_embed_image_size"):
            size = getattr(self, name)
            _check(size is None or size % self.patch_size == 0, f"vision.{name} must be a multiple of patch_size")
        _check(self.heads >= self.num_heads, "vision.num_padded_heads must be >= vision.num_heads")


@dataclass
class LanguageConfig:
    """The decoder LLM: a Llama-style GPT (RoPE, RMSNorm, SwiGLU, GQA)."""

    family: str = "qwen2"  # one of LANGUAGE_FAMILIES (naming / bias conventions)
    vocab_size: int = 151655
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    ffn_hidden_size: int = 4864
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2: True; Qwen3 / Llama / InternLM2 / InternLM3 / Phi-3: False
    # Qwen3: RMSNorm over each attention head's query and key (width head_dim, one weight
    # shared by all heads) before RoPE.
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    head_dim: Optional[int] = None  # None = hidden_size // num_heads
    # Hugging Face ``rope_scaling`` / ``rope_parameters`` beyond the plain theta; only
    # {"rope_type": "llama3", ...} changes the model here, see internvl.py.
    rope_scaling: Optional[dict] = None
    # The embedding / output rows are padded to a multiple of this (zero rows, masked out
    # of the softmax) so any power-of-two tensor-parallel size divides the vocabulary.
    vocab_size_divisible_by: int = 128
    # Mixture of experts (Qwen3-MoE; Hugging Face names). ``num_experts`` 0: a dense LLM.
    # Layer i (from 0) has experts unless i is in ``mlp_only_layers`` or (i + 1) is not a
    # multiple of ``decoder_sparse_step``; its experts are SwiGLU MLPs of width
    # ``moe_intermediate_size``, ``num_experts_per_tok`` of them per token, weighted by the
    # router's softmax over all experts (renormalised over the chosen ones when
    # ``norm_topk_prob``). ``router_aux_loss_coef``: the load-balancing loss coefficient the
    # model was trained with, in transformers' sense (the trainer's default, see
    # ``mpo.router_aux_loss_coef`` and models/moe_balance.py for megatron-core's reading).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    router_aux_loss_coef: float = 0.001

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether LLM layer ``layer`` (0-based, global) has experts (Qwen3-MoE's rule)."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        step = self.vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / step) * step)

    def validate(self) -> None:
        _check(
            self.family in LANGUAGE_FAMILIES,
            f"language.family must be one of {', '.join(LANGUAGE_FAMILIES)}, not {self.family!r}",
        )
        _check(self.num_heads % self.num_kv_heads == 0, "language.num_heads must be a multiple of num_kv_heads")
        _check(self.vocab_size_divisible_by > 0, "language.vocab_size_divisible_by must be positive")
        if self.is_moe:
            _check(self.family == "qwen3_moe", f"language.num_experts is set, but family {self.family!r} has no experts")
            _check(0 < self.num_experts_per_tok <= self.num_experts,
                   "language.num_experts_per_tok must be between 1 and num_experts")
            _check(self.moe_intermediate_size > 0, "language.moe_intermediate_size must be positive")
            _check(self.decoder_sparse_step >= 1, "language.decoder_sparse_step must be >= 1")
            _check(self.router_aux_loss_coef >= 0, "language.router_aux_loss_coef must be >= 0")


@dataclass
class InternVLConfig:
    """InternViT -> pixel shuffle -> mlp1 projector -> LLM."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    img_context_token_id: int = 151648
    projector_norm_eps: float = 1e-5
    projector_act: str = "gelu"
    name: str = ""  # preset or source name, informational
    # Chat template the checkpoint was trained with, read from its own files at conversion
    # (megatron_mpo.conversion.chat_template); None in older model dirs (see data_setup).
    template: Optional[str] = None
    # How the checkpoint tiles images, under InternVL's config.json names (read at conversion;
    # a training checkpoint: what its run used). None = not stated; the run's data.* tiling
    # keys default to these (megatron_mpo.data.tile_settings).
    dynamic_image_size: Optional[bool] = None
    use_thumbnail: Optional[bool] = None
    min_dynamic_patch: Optional[int] = None
    max_dynamic_patch: Optional[int] = None

    @property
    def shuffle_factor(self) -> int:
        """Patches merged per side by the pixel shuffle (2 for ratio 0.5)."""
        return int(round(1 / self.downsample_ratio))

    @property
    def tokens_per_tile(self) -> int:
        """<IMG_CONTEXT> tokens one image tile becomes (256 for 448px / patch 14 / 0.5)."""
        return int(self.vision.grid**2 * self.downsample_ratio**2)

    @property
    def projector_input_size(self) -> int:
        return self.vision.hidden_size * self.shuffle_factor**2

    def validate(self) -> "InternVLConfig":
        self.vision.validate()
        self.language.validate()
        _check(self.ps_version == "v2", f"only ps_version v2 is supported, not {self.ps_version!r}")
        _check(self.projector_act == "gelu", f"projector_act must be gelu, not {self.projector_act!r}")
        if self.template is not None:
            from megatron_mpo.data.templates import REFUSED_TEMPLATES, TEMPLATES

            _check(self.template not in REFUSED_TEMPLATES,
                   f"template {self.template!r}: {REFUSED_TEMPLATES.get(self.template)}")

            _check(self.template in TEMPLATES,
                   f"unknown template {self.template!r}; known: {', '.join(sorted(TEMPLATES))}")
        from megatron_mpo.data.tile_settings import check_stated_tiling

        check_stated_tiling(self)
        _check(
            abs(1 / self.shuffle_factor - self.downsample_ratio) < 1e-9
            and self.vision.grid % self.shuffle_factor == 0,
            f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the "
            f"patch grid {self.vision.grid}",
        )
        return self

    # ---- serialisation ------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InternVLConfig":
        data = dict(data)
        vision = _from_fields(VisionConfig, data.pop("vision", {}), "vision")
        language = _from_fields(LanguageConfig, data.pop("language", {}), "language")
        top = _from_fields(cls, data, "", exclude=("vision", "language"))
        top.vision, top.language = vision, language
        return top.validate()

    @classmethod
    def from_json(cls, text: str) -> "InternVLConfig":
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------------------


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def _from_fields(kind, data: Mapping[str, Any], where: str, exclude: tuple = ()):
    names = {f.name for f in dataclasses.fields(kind)} - set(exclude)
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown model config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid: {', '.join(sorted(names))}"
        )
    return kind(**{k: v for k, v in data.items() if k in names})

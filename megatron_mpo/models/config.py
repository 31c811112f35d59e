"""Architecture of an InternVL model, independent of how it is parallelised.

These dataclasses describe *what* the network is (sizes, norms, biases); the
megatron-core ``TransformerConfig`` objects that also carry *how* it runs (TP/PP sizes,
dtype, FP8) are derived from them in :mod:`megatron_mpo.models.internvl`. The converter
stores :meth:`InternVLConfig.to_dict` as JSON beside every checkpoint, so a checkpoint
can always be rebuilt without the original Hugging Face files.
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
# LLMs of InternVL releases that are recognised but refused (one line each).
_GPT_OSS = ("GPT-OSS LLMs (InternVL3.5-20B-A4B) are not supported: attention sinks, alternating "
            "sliding-window layers and MXFP4-quantised experts have no megatron-core path here; "
            "use InternVL3.5-30B-A3B (Qwen3-MoE) for a mixture-of-experts run")
# By model_type and by architecture name.
UNSUPPORTED_LLMS = {"gpt_oss": _GPT_OSS, "GptOssForCausalLM": _GPT_OSS}
# The original layout's llm_config architecture of each family.
ORIGINAL_ARCHITECTURES = {
    "InternLM2ForCausalLM": "internlm2",
    "InternLM3ForCausalLM": "internlm3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "LlamaForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
}
# The transformers-native text model type each family is stored as (InternLM2 as llama;
# InternLM3's remote code and transformers' internlm3 both use Llama tensor names).
NATIVE_TEXT_TYPE = {"internlm2": "llama", "internlm3": "internlm3", "qwen2": "qwen2", "qwen3": "qwen3",
                    "qwen3_moe": "qwen3_moe", "llama": "llama", "phi3": "phi3"}


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
    # model was trained with (the trainer's default, see ``mpo.router_aux_loss_coef``).
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

    @classmethod
    def from_hf_config(cls, hf: Any) -> "InternVLConfig":
        """From a transformers ``InternVLConfig`` (object or ``to_dict()``), or from the
        original remote-code ``InternVLChatConfig`` dict (``vision_config`` + ``llm_config``)."""
        data = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        check_not_flash(data)
        if "llm_config" in data:
            return _from_original_config(data)
        return _from_native_config(data)


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


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        _check(len(set(value)) == 1, f"{what} must be square, got {value}")
        return int(value[0])
    return int(value)


def _rope(text: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", text.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, (None if kind == "default" or not params else params)


_NORMS = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}


def _from_native_config(data: Mapping[str, Any]) -> InternVLConfig:
    vis = data.get("vision_config") or {}
    text = data.get("text_config") or {}
    _check(vis.get("use_mean_pooling", True), "vision_config.use_mean_pooling=False (final vision norm) is not supported")
    _check(data.get("vision_feature_layer", -1) == -1, "only vision_feature_layer -1 is supported")
    _check(
        data.get("vision_feature_select_strategy", "default") == "default",
        "only vision_feature_select_strategy 'default' (drop the CLS token) is supported",
    )
    vision = VisionConfig(
        image_size=_square(vis.get("image_size", 448), "vision_config.image_size"),
        patch_size=_square(vis.get("patch_size", 14), "vision_config.patch_size"),
        hidden_size=vis.get("hidden_size", 1024),
        num_layers=vis.get("num_hidden_layers", 24),
        num_heads=vis.get("num_attention_heads", 16),
        ffn_hidden_size=vis.get("intermediate_size", 4096),
        norm=_NORMS.get(vis.get("norm_type", "layer_norm"), vis.get("norm_type")),
        norm_eps=vis.get("layer_norm_eps", 1e-6),
        qkv_bias=bool(vis.get("attention_bias", False)),
        qk_norm=bool(vis.get("use_qk_norm", False)),
        layer_scale_init=vis.get("layer_scale_init_value", 0.1),
        act=vis.get("hidden_act", "gelu"),
    )
    family = text.get("model_type", "qwen2")
    check_llm_supported(family)
    _check(family in _NATIVE_FAMILIES,
           f"text model type {family!r} is not supported ({', '.join(_NATIVE_FAMILIES)})")
    _check(not text.get("mlp_bias", False), "text_config.mlp_bias=True is not supported")
    attention_bias = bool(text.get("attention_bias", False))
    _check(not (family in ("llama", "internlm3") + QK_NORM_FAMILIES and attention_bias),
           f"{family} attention_bias=True is not supported")
    _check_no_sliding_window(text, "text_config")
    theta, scaling = _rope(text)
    heads = text.get("num_attention_heads", 32)
    hidden = text.get("hidden_size", 4096)
    head_dim = text.get("head_dim")
    language = LanguageConfig(
        family=family,
        vocab_size=text.get("vocab_size", 151655),
        hidden_size=hidden,
        num_layers=text.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        ffn_hidden_size=text.get("intermediate_size", 11008),
        rope_theta=theta,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        qkv_bias=family == "qwen2",
        qk_norm=family in QK_NORM_FAMILIES,
        tie_embeddings=bool(data.get("tie_word_embeddings", True)),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        head_dim=None if head_dim in (None, hidden // heads) else head_dim,
        rope_scaling=scaling,
        **moe_fields(text),
    )
    return InternVLConfig(
        vision=vision,
        language=language,
        downsample_ratio=data.get("downsample_ratio", 0.5),
        # Not stated: <IMG_CONTEXT> of the Qwen2 / Qwen2.5 tokenizer, or Qwen3's (after <think>).
        img_context_token_id=data.get("image_token_id", 151671 if family in QK_NORM_FAMILIES else 151667),
        projector_act=data.get("projector_hidden_act", "gelu"),
        name=data.get("_name_or_path", "") or "",
    ).validate()


# transformers-native text model types (InternLM2 becomes llama in the native layout).
_NATIVE_FAMILIES = tuple(sorted(set(NATIVE_TEXT_TYPE.values()), key=LANGUAGE_FAMILIES.index))


# Hugging Face Qwen3-MoE config keys that are LanguageConfig fields of the same name, with
# transformers' Qwen3MoeConfig defaults (for a config.json that leaves one out).
MOE_FIELDS = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001}


def moe_fields(text: Mapping[str, Any]) -> dict:
    """The mixture-of-experts fields of a Qwen3-MoE text / llm config ({} for a dense one)."""
    if text.get("model_type") != "qwen3_moe" and "Qwen3MoeForCausalLM" not in (text.get("architectures") or []):
        return {}
    _check(not text.get("shared_expert_intermediate_size"),
           "Qwen3-MoE with a shared expert (shared_expert_intermediate_size) is not supported")
    text = dict(text)
    if text.get("num_experts") is None:  # transformers >= 5 writes Qwen3MoeConfig.num_experts under this name
        text["num_experts"] = text.get("num_local_experts")
    out = {k: default if text.get(k) is None else text[k] for k, default in MOE_FIELDS.items()}
    out["mlp_only_layers"] = [int(i) for i in out["mlp_only_layers"]]
    return out


def moe_layer_flags(text: Mapping[str, Any], num_layers: int) -> tuple:
    """For each layer of a text / llm config, whether it has experts (all False when dense)."""
    fields = moe_fields(text)
    if not fields:
        return (False,) * num_layers
    lang = LanguageConfig(family="qwen3_moe", num_layers=num_layers, **fields)
    return tuple(lang.is_moe_layer(i) for i in range(num_layers))


def check_llm_supported(name: str) -> None:
    """One line for an LLM InternVL ships that this project refuses (MoE, GPT-OSS)."""
    if name in UNSUPPORTED_LLMS:
        raise UserError(UNSUPPORTED_LLMS[name])


def _check_no_sliding_window(text: Mapping[str, Any], where: str) -> None:
    if text.get("use_sliding_window"):
        raise UserError(f"{where}.use_sliding_window=True (sliding-window attention) is not supported")


# Config keys / tensor name prefixes of InternVL3.5-Flash's visual resolution router (ViR).
FLASH_CONFIG_KEYS = ("vir", "use_vir", "vir_config", "flash", "use_flash_mlp", "mlp2")
FLASH_TENSOR_PREFIXES = ("mlp2.", "vir.", "router.", "vision_router.", "model.mlp2.", "model.vir.")
FLASH_REFUSAL = (
    "InternVL3.5-Flash checkpoints (ViR visual resolution router with a second compressing projector) "
    "are not supported; use the non-Flash release"
)


def check_not_flash(config: Mapping[str, Any], tensor_names: Any = ()) -> None:
    """Refuse an InternVL3.5-Flash checkpoint (by config keys or its router/projector tensors)."""
    name = str(config.get("_name_or_path") or "")
    keys = {k.lower() for k in config}
    if keys & set(FLASH_CONFIG_KEYS) or "flash" in name.lower().rsplit("/", 1)[-1].split("-"):
        raise UserError(FLASH_REFUSAL)
    for key in tensor_names:
        if key.startswith(FLASH_TENSOR_PREFIXES):
            raise UserError(f"{FLASH_REFUSAL} (tensor {key!r})")


def _explicit_head_dim(llm: Mapping[str, Any], family: str) -> Optional[int]:
    """``head_dim`` when the LLM states one that differs from hidden / heads (InternLM2's
    remote code has no such field)."""
    if family == "internlm2" or not llm.get("head_dim"):
        return None
    head_dim = int(llm["head_dim"])
    heads = int(llm.get("num_attention_heads", 32))
    return None if head_dim * heads == int(llm.get("hidden_size", 4096)) else head_dim


def _from_original_config(data: Mapping[str, Any]) -> InternVLConfig:
    vis = data.get("vision_config") or {}
    llm = data.get("llm_config") or {}
    arch = (llm.get("architectures") or ["LlamaForCausalLM"])[0]
    check_llm_supported(arch)
    _check(arch in ORIGINAL_ARCHITECTURES, f"LLM architecture {arch!r} is not supported ({', '.join(ORIGINAL_ARCHITECTURES)})")
    _check(data.get("select_layer", -1) == -1, "only select_layer -1 is supported")
    family = ORIGINAL_ARCHITECTURES[arch]
    _check(not llm.get("bias", False), "an LLM with biased linears (llm_config.bias=True) is not supported")
    _check(not llm.get("qkv_bias", False) and not (family != "qwen2" and llm.get("attention_bias", False)),
           f"{arch} with q/k/v biases (llm_config.qkv_bias / attention_bias) is not supported")
    _check_no_sliding_window(llm, "llm_config")
    image_size = data.get("force_image_size") or vis.get("image_size", 448)
    theta, scaling = _rope(llm)
    heads = llm.get("num_attention_heads", 32)
    return InternVLConfig(
        vision=VisionConfig(
            image_size=int(image_size),
            patch_size=int(vis.get("patch_size", 14)),
            hidden_size=vis.get("hidden_size", 1024),
            num_layers=vis.get("num_hidden_layers", 24),
            num_heads=vis.get("num_attention_heads", 16),
            ffn_hidden_size=vis.get("intermediate_size", 4096),
            norm=_NORMS.get(vis.get("norm_type", "rms_norm"), vis.get("norm_type")),
            norm_eps=vis.get("layer_norm_eps", 1e-6),
            qkv_bias=bool(vis.get("qkv_bias", False)),
            qk_norm=bool(vis.get("qk_normalization", False)),
            layer_scale_init=vis.get("initializer_factor", 0.1),
            act=vis.get("hidden_act", "gelu"),
            pos_embed_image_size=int(vis.get("image_size", image_size)),
        ),
        language=LanguageConfig(
            family=family,
            vocab_size=llm.get("vocab_size", 92553),
            hidden_size=llm.get("hidden_size", 4096),
            num_layers=llm.get("num_hidden_layers", 32),
            num_heads=heads,
            num_kv_heads=llm.get("num_key_value_heads") or heads,
            ffn_hidden_size=llm.get("intermediate_size", 11008),
            rope_theta=theta,
            rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
            qkv_bias=family == "qwen2",
            qk_norm=family in QK_NORM_FAMILIES,
            tie_embeddings=bool(llm.get("tie_word_embeddings", False)),
            max_position_embeddings=llm.get("max_position_embeddings", 32768),
            head_dim=_explicit_head_dim(llm, family),
            rope_scaling=scaling,
            **moe_fields(llm),
        ),
        downsample_ratio=data.get("downsample_ratio", 0.5),
        ps_version=data.get("ps_version", "v2"),
        img_context_token_id=data.get("img_context_token_id") or 0,
        name=data.get("_name_or_path", "") or "",
    ).validate()

"""The LLM families of InternVL releases as Hugging Face configs name them, and what is refused.

One row of :data:`FAMILIES` per family of :data:`~megatron_mpo.models.config.LANGUAGE_FAMILIES`:
its ``llm_config`` architecture in the original remote-code layout, its ``text_config``
model type in the transformers-native layout, and what the configs leave unsaid. Adding a
family starts with a row here; :mod:`.hf_config` reads and writes configs through it.

Refused with one line: GPT-OSS LLMs (by model type or architecture), InternVL3.5-Flash (by
config keys, name or tensors) and sliding-window attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from megatron_mpo.errors import UserError
from megatron_mpo.models.config import LanguageConfig

__all__ = [
    "Family",
    "FAMILIES",
    "ORIGINAL_ARCHITECTURES",
    "NATIVE_TEXT_TYPES",
    "MOE_FIELDS",
    "moe_fields",
    "moe_layer_flags",
    "check_llm_supported",
    "check_not_flash",
    "check_no_sliding_window",
]


@dataclass(frozen=True)
class Family:
    """One LLM family in the two Hugging Face layouts."""

    original_arch: str  # llm_config.architectures[0] of the original layout
    native_type: str  # text_config.model_type of the native layout
    # <IMG_CONTEXT> id when a config does not say (the family's tokenizer).
    image_token: int = 151667
    # The native text config class defaults head_dim and the biases to values of its own,
    # so a written config.json states them.
    explicit_fields: bool = False


# InternLM2 is stored as llama in the native layout (same maths, split q/k/v); InternLM3's
# remote code and transformers' internlm3 both use Llama tensor names. <IMG_CONTEXT>: the
# InternLM2 tokenizer's, Qwen3's (after <think> / </think>), else Qwen2 / Qwen2.5's.
FAMILIES = {
    "qwen2": Family("Qwen2ForCausalLM", "qwen2"),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", 151671, explicit_fields=True),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", "qwen3_moe", 151671, explicit_fields=True),
    "llama": Family("LlamaForCausalLM", "llama", explicit_fields=True),
    "internlm2": Family("InternLM2ForCausalLM", "llama", 92546, explicit_fields=True),
    "internlm3": Family("InternLM3ForCausalLM", "internlm3", explicit_fields=True),
    "phi3": Family("Phi3ForCausalLM", "phi3"),
}
ORIGINAL_ARCHITECTURES = {f.original_arch: name for name, f in FAMILIES.items()}
# transformers-native text model types, as families (InternLM2 becomes llama there).
NATIVE_TEXT_TYPES = tuple(dict.fromkeys(f.native_type for f in FAMILIES.values()))

# LLMs of InternVL releases that are recognised but refused (one line each).
_GPT_OSS = ("GPT-OSS LLMs (InternVL3.5-20B-A4B) are not supported: attention sinks, alternating "
            "sliding-window layers and MXFP4-quantised experts have no megatron-core path here; "
            "use InternVL3.5-30B-A3B (Qwen3-MoE) for a mixture-of-experts run")
# By model_type and by architecture name.
UNSUPPORTED_LLMS = {"gpt_oss": _GPT_OSS, "GptOssForCausalLM": _GPT_OSS}

# Config keys / tensor name prefixes of InternVL3.5-Flash's visual resolution router (ViR).
FLASH_CONFIG_KEYS = ("vir", "use_vir", "vir_config", "flash", "use_flash_mlp", "mlp2")
FLASH_TENSOR_PREFIXES = ("mlp2.", "vir.", "router.", "vision_router.", "model.mlp2.", "model.vir.")
FLASH_REFUSAL = (
    "InternVL3.5-Flash checkpoints (ViR visual resolution router with a second compressing projector) "
    "are not supported; use the non-Flash release"
)

# Hugging Face Qwen3-MoE config keys that are LanguageConfig fields of the same name, with
# transformers' Qwen3MoeConfig defaults (for a config.json that leaves one out).
MOE_FIELDS = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001}


def moe_fields(text: Mapping[str, Any]) -> dict:
    """The mixture-of-experts fields of a Qwen3-MoE text / llm config ({} for a dense one)."""
    if text.get("model_type") != "qwen3_moe" and "Qwen3MoeForCausalLM" not in (text.get("architectures") or []):
        return {}
    if text.get("shared_expert_intermediate_size"):
        raise UserError("Qwen3-MoE with a shared expert (shared_expert_intermediate_size) is not supported")
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


def check_llm_supported(name: Any) -> None:
    """One line for an LLM InternVL ships that this project refuses (GPT-OSS)."""
    if name in UNSUPPORTED_LLMS:
        raise UserError(UNSUPPORTED_LLMS[name])


def check_not_flash(config: Mapping[str, Any], tensor_names: Iterable[str] = ()) -> None:
    """Refuse an InternVL3.5-Flash checkpoint (by config keys or its router/projector tensors)."""
    name = str(config.get("_name_or_path") or "")
    keys = {k.lower() for k in config}
    if keys & set(FLASH_CONFIG_KEYS) or "flash" in name.lower().rsplit("/", 1)[-1].split("-"):
        raise UserError(FLASH_REFUSAL)
    for key in tensor_names:
        if key.startswith(FLASH_TENSOR_PREFIXES):
            raise UserError(f"{FLASH_REFUSAL} (tensor {key!r})")


def check_no_sliding_window(text: Mapping[str, Any], where: str) -> None:
    if text.get("use_sliding_window"):
        raise UserError(f"{where}.use_sliding_window=True (sliding-window attention) is not supported")

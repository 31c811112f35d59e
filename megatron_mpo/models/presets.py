"""Architecture presets: the InternVL2 family and a tiny model for CPU tests.

Hyperparameters are those of the published configs (architecture only, best effort):
a converted checkpoint carries its own config JSON, which wins over a preset. The
``<IMG_CONTEXT>`` token id belongs to the tokenizer (InternVL appends 9 special tokens
``<img> </img> <IMG_CONTEXT> ...`` to the LLM's vocabulary); the data pipeline looks it
up there.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from megatron_mpo.errors import UserError
from megatron_mpo.models.config import InternVLConfig, LanguageConfig, VisionConfig

__all__ = ["PRESETS", "get_preset", "preset_names"]


def _vit_300m() -> VisionConfig:
    """InternViT-300M-448px: LayerNorm, qkv bias, no qk-norm."""
    return VisionConfig(
        image_size=448, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
        ffn_hidden_size=4096, norm="LayerNorm", norm_eps=1e-6, qkv_bias=True, qk_norm=False,
        layer_scale_init=1.0,
    )


def _vit_6b() -> VisionConfig:
    """InternViT-6B-448px-V1-5 (45 layers used): RMSNorm, qk-norm, no qkv bias.

    25 heads are zero-padded to 32 so TP in {1, 2, 4, 8} divides them.
    """
    return VisionConfig(
        image_size=448, patch_size=14, hidden_size=3200, num_layers=45, num_heads=25,
        ffn_hidden_size=12800, norm="RMSNorm", norm_eps=1e-6, qkv_bias=False, qk_norm=True,
        layer_scale_init=0.1, num_padded_heads=32,
    )


def _llm(family: str, **sizes) -> LanguageConfig:
    return LanguageConfig(family=family, qkv_bias=family == "qwen2", **sizes)


def _internvl2_1b() -> InternVLConfig:
    # Qwen2-0.5B-Instruct
    return InternVLConfig(
        name="InternVL2-1B", vision=_vit_300m(), img_context_token_id=151648,
        language=_llm("qwen2", vocab_size=151655, hidden_size=896, num_layers=24, num_heads=14,
                      num_kv_heads=2, ffn_hidden_size=4864, rope_theta=1e6, rms_norm_eps=1e-6,
                      max_position_embeddings=32768, tie_embeddings=False),
    )


def _internvl2_2b() -> InternVLConfig:
    # internlm2-chat-1_8b
    return InternVLConfig(
        name="InternVL2-2B", vision=_vit_300m(), img_context_token_id=92546,
        language=_llm("internlm2", vocab_size=92553, hidden_size=2048, num_layers=24,
                      num_heads=16, num_kv_heads=8, ffn_hidden_size=8192, rope_theta=1e6,
                      rms_norm_eps=1e-5, max_position_embeddings=32768),
    )


def _internvl2_4b() -> InternVLConfig:
    # Phi-3-mini-128k-instruct (LongRoPE: refused at build time until supported)
    return InternVLConfig(
        name="InternVL2-4B", vision=_vit_300m(), img_context_token_id=32013,
        language=_llm("phi3", vocab_size=32020, hidden_size=3072, num_layers=32, num_heads=32,
                      num_kv_heads=32, ffn_hidden_size=8192, rope_theta=10000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 4096}),
    )


def _internvl2_8b() -> InternVLConfig:
    # internlm2_5-7b-chat
    return InternVLConfig(
        name="InternVL2-8B", vision=_vit_300m(), img_context_token_id=92546,
        language=_llm("internlm2", vocab_size=92553, hidden_size=4096, num_layers=32,
                      num_heads=32, num_kv_heads=8, ffn_hidden_size=14336, rope_theta=1e6,
                      rms_norm_eps=1e-5, max_position_embeddings=32768),
    )


def _internvl2_26b() -> InternVLConfig:
    # internlm2-chat-20b
    return InternVLConfig(
        name="InternVL2-26B", vision=_vit_6b(), img_context_token_id=92546,
        language=_llm("internlm2", vocab_size=92553, hidden_size=6144, num_layers=48,
                      num_heads=48, num_kv_heads=8, ffn_hidden_size=16384, rope_theta=1e6,
                      rms_norm_eps=1e-5, max_position_embeddings=32768),
    )


def _internvl2_40b() -> InternVLConfig:
    # Nous-Hermes-2-Yi-34B (Llama architecture)
    return InternVLConfig(
        name="InternVL2-40B", vision=_vit_6b(), img_context_token_id=64002,
        language=_llm("llama", vocab_size=64009, hidden_size=7168, num_layers=60, num_heads=56,
                      num_kv_heads=8, ffn_hidden_size=20480, rope_theta=5e6, rms_norm_eps=1e-5,
                      max_position_embeddings=4096),
    )


def _internvl2_76b() -> InternVLConfig:
    # Hermes-2-Theta-Llama-3-70B
    return InternVLConfig(
        name="InternVL2-76B", vision=_vit_6b(), img_context_token_id=128258,
        language=_llm("llama", vocab_size=128265, hidden_size=8192, num_layers=80, num_heads=64,
                      num_kv_heads=8, ffn_hidden_size=28672, rope_theta=500000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192),
    )


def _tiny() -> InternVLConfig:
    """Runs in about a second on a CPU: 56px tiles -> 4 tokens per tile."""
    return InternVLConfig(
        name="tiny",
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=32, num_layers=2,
                            num_heads=4, ffn_hidden_size=64, norm="LayerNorm", qkv_bias=True),
        language=_llm("qwen2", vocab_size=320, hidden_size=64, num_layers=4, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=128, rope_theta=10000.0,
                      rms_norm_eps=1e-6, max_position_embeddings=1024),
        img_context_token_id=300,
    )


PRESETS: dict[str, Callable[[], InternVLConfig]] = {
    "InternVL2-1B": _internvl2_1b,
    "InternVL2-2B": _internvl2_2b,
    "InternVL2-4B": _internvl2_4b,
    "InternVL2-8B": _internvl2_8b,
    "InternVL2-26B": _internvl2_26b,
    "InternVL2-40B": _internvl2_40b,
    "InternVL2-76B": _internvl2_76b,
    "tiny": _tiny,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> InternVLConfig:
    """A fresh copy of a preset (case-insensitive name); UserError listing valid names."""
    for key, make in PRESETS.items():
        if key.lower() == name.strip().lower():
            return dataclasses.replace(make()).validate()
    raise UserError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")

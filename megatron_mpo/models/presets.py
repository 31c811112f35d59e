"""Architecture presets: the InternVL2, InternVL2.5, InternVL3 and InternVL3.5 (dense and
Qwen3-MoE) families and tiny models for CPU tests.

Hyperparameters are those of the published configs (architecture only, best effort,
written from the released model cards and LLM configs, not read from a checkpoint):
a converted checkpoint carries its own config JSON, which wins over a preset. The
``<IMG_CONTEXT>`` token id belongs to the tokenizer (InternVL appends 9 special tokens
``<img> </img> <IMG_CONTEXT> ...`` to the LLM's vocabulary); the data pipeline looks it
up there, and the converter stores the tokenizer's id.

Every InternVL release unties the LLM's input and output embeddings
(``tie_word_embeddings=False`` for all sizes), even where the base LLM ties them
(Qwen2.5-0.5B/1.5B/3B, Qwen3-0.6B/1.7B/4B). InternVL2.5, InternVL3 and InternVL3.5 were
all tuned with the ``internvl2_5`` chat template. Names are the Hugging Face repository
names (``OpenGVLab/InternVL2_5-8B``, ``OpenGVLab/InternVL3-8B``, ``OpenGVLab/InternVL3_5-8B``).
The InternVL3.5 mixture-of-experts sizes on Qwen3-MoE (30B-A3B, 241B-A28B) have presets;
GPT-OSS (20B-A4B) and the -Flash variants are not supported, so they have none.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from megatron_mpo.errors import UserError
from megatron_mpo.models.config import QK_NORM_FAMILIES, InternVLConfig, LanguageConfig, VisionConfig

__all__ = ["PRESETS", "get_preset", "preset_names"]


def _vit_300m() -> VisionConfig:
    """InternViT-300M-448px (and -V2_5, same architecture): LayerNorm, qkv bias, no qk-norm."""
    return VisionConfig(
        image_size=448, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
        ffn_hidden_size=4096, norm="LayerNorm", norm_eps=1e-6, qkv_bias=True, qk_norm=False,
        layer_scale_init=1.0,
    )


def _vit_6b() -> VisionConfig:
    """InternViT-6B-448px-V1-5 / -V2_5 (45 layers used): RMSNorm, qk-norm, no qkv bias.

    25 heads are zero-padded to 32 so TP in {1, 2, 4, 8} divides them.
    """
    return VisionConfig(
        image_size=448, patch_size=14, hidden_size=3200, num_layers=45, num_heads=25,
        ffn_hidden_size=12800, norm="RMSNorm", norm_eps=1e-6, qkv_bias=False, qk_norm=True,
        layer_scale_init=0.1, num_padded_heads=32,
    )


def _llm(family: str, **sizes) -> LanguageConfig:
    return LanguageConfig(family=family, qkv_bias=family == "qwen2", qk_norm=family in QK_NORM_FAMILIES, **sizes)


def _qwen2_5(hidden: int, layers: int, heads: int, kv: int, ffn: int) -> LanguageConfig:
    """A Qwen2.5 LLM as InternVL2.5 / InternVL3 ship it (vocabulary 151665 + 9 InternVL tokens)."""
    return _llm("qwen2", vocab_size=151674, hidden_size=hidden, num_layers=layers, num_heads=heads,
                num_kv_heads=kv, ffn_hidden_size=ffn, rope_theta=1e6, rms_norm_eps=1e-6,
                max_position_embeddings=32768, tie_embeddings=False)


def _internlm2_5(hidden: int, layers: int, heads: int, kv: int, ffn: int) -> LanguageConfig:
    """An InternLM2.5 chat LLM (dynamic NTK RoPE: plain RoPE within 32768 positions)."""
    return _llm("internlm2", vocab_size=92553, hidden_size=hidden, num_layers=layers, num_heads=heads,
                num_kv_heads=kv, ffn_hidden_size=ffn, rope_theta=1e6, rms_norm_eps=1e-5,
                max_position_embeddings=32768, rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def _qwen3(hidden: int, layers: int, heads: int, kv: int, ffn: int) -> LanguageConfig:
    """A dense Qwen3 LLM (per-head q/k RMSNorm, no qkv bias, head_dim 128 whatever the width)."""
    head_dim = 128
    return _llm("qwen3", vocab_size=151936, hidden_size=hidden, num_layers=layers, num_heads=heads,
                num_kv_heads=kv, ffn_hidden_size=ffn, rope_theta=1e6, rms_norm_eps=1e-6,
                max_position_embeddings=40960, tie_embeddings=False,
                # None where it equals hidden / heads, as the converters write it.
                head_dim=None if head_dim * heads == hidden else head_dim)


def _qwen3_moe(hidden: int, layers: int, heads: int, kv: int, ffn: int, expert_ffn: int) -> LanguageConfig:
    """A Qwen3-MoE LLM: Qwen3 attention, every layer an MoE layer of 128 experts, 8 per token
    (renormalised), no shared expert; ``ffn`` is the unused dense width its config states."""
    return _llm("qwen3_moe", vocab_size=151936, hidden_size=hidden, num_layers=layers, num_heads=heads,
                num_kv_heads=kv, ffn_hidden_size=ffn, rope_theta=1e6, rms_norm_eps=1e-6,
                max_position_embeddings=40960, tie_embeddings=False, head_dim=128,
                num_experts=128, num_experts_per_tok=8, moe_intermediate_size=expert_ffn,
                norm_topk_prob=True, router_aux_loss_coef=0.001)


def _internvl(name: str, vision: VisionConfig, language: LanguageConfig, img_context: int) -> InternVLConfig:
    """An InternVL2.5 / 3 / 3.5 model: always the internvl2_5 chat template."""
    return InternVLConfig(name=name, vision=vision, language=language, img_context_token_id=img_context,
                          template="internvl2_5")


# <IMG_CONTEXT> ids: Qwen2.5 tokenizer 151665 + 2, InternLM2/2.5 92546, Qwen3 tokenizer 151669 + 2.
_QWEN2_5_IMG, _INTERNLM2_IMG, _QWEN3_IMG = 151667, 92546, 151671


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


# ---- InternVL2.5: InternViT-300M/6B-448px-V2_5 + Qwen2.5 / InternLM2.5 ------------------------------


def _internvl2_5_1b() -> InternVLConfig:  # Qwen2.5-0.5B-Instruct
    return _internvl("InternVL2_5-1B", _vit_300m(), _qwen2_5(896, 24, 14, 2, 4864), _QWEN2_5_IMG)


def _internvl2_5_2b() -> InternVLConfig:  # internlm2_5-1_8b-chat
    return _internvl("InternVL2_5-2B", _vit_300m(), _internlm2_5(2048, 24, 16, 8, 8192), _INTERNLM2_IMG)


def _internvl2_5_4b() -> InternVLConfig:  # Qwen2.5-3B-Instruct
    return _internvl("InternVL2_5-4B", _vit_300m(), _qwen2_5(2048, 36, 16, 2, 11008), _QWEN2_5_IMG)


def _internvl2_5_8b() -> InternVLConfig:  # internlm2_5-7b-chat
    return _internvl("InternVL2_5-8B", _vit_300m(), _internlm2_5(4096, 32, 32, 8, 14336), _INTERNLM2_IMG)


def _internvl2_5_26b() -> InternVLConfig:  # internlm2_5-20b-chat
    return _internvl("InternVL2_5-26B", _vit_6b(), _internlm2_5(6144, 48, 48, 8, 16384), _INTERNLM2_IMG)


def _internvl2_5_38b() -> InternVLConfig:  # Qwen2.5-32B-Instruct
    return _internvl("InternVL2_5-38B", _vit_6b(), _qwen2_5(5120, 64, 40, 8, 27648), _QWEN2_5_IMG)


def _internvl2_5_78b() -> InternVLConfig:  # Qwen2.5-72B-Instruct
    return _internvl("InternVL2_5-78B", _vit_6b(), _qwen2_5(8192, 80, 64, 8, 29568), _QWEN2_5_IMG)


# ---- InternVL3: InternViT-300M/6B-448px-V2_5 + Qwen2.5 / InternLM3 --------------------------------


def _internvl3_1b() -> InternVLConfig:  # Qwen2.5-0.5B
    return _internvl("InternVL3-1B", _vit_300m(), _qwen2_5(896, 24, 14, 2, 4864), _QWEN2_5_IMG)


def _internvl3_2b() -> InternVLConfig:  # Qwen2.5-1.5B
    return _internvl("InternVL3-2B", _vit_300m(), _qwen2_5(1536, 28, 12, 2, 8960), _QWEN2_5_IMG)


def _internvl3_8b() -> InternVLConfig:  # Qwen2.5-7B
    return _internvl("InternVL3-8B", _vit_300m(), _qwen2_5(3584, 28, 28, 4, 18944), _QWEN2_5_IMG)


def _internvl3_9b() -> InternVLConfig:
    # internlm3-8b-instruct: Llama-like, no biases, head_dim 128, dynamic NTK RoPE (plain RoPE
    # within 32768 positions). Its <IMG_CONTEXT> id is not verified here: the converter
    # takes the tokenizer's.
    language = _llm("internlm3", vocab_size=128512, hidden_size=4096, num_layers=48, num_heads=32,
                    num_kv_heads=2, ffn_hidden_size=10240, rope_theta=5e7, rms_norm_eps=1e-5,
                    max_position_embeddings=32768, head_dim=None,  # 4096 / 32 = 128
                    rope_scaling={"rope_type": "dynamic", "factor": 6.0})
    return _internvl("InternVL3-9B", _vit_300m(), language, 128261)


def _internvl3_14b() -> InternVLConfig:  # Qwen2.5-14B
    return _internvl("InternVL3-14B", _vit_300m(), _qwen2_5(5120, 48, 40, 8, 13824), _QWEN2_5_IMG)


def _internvl3_38b() -> InternVLConfig:  # Qwen2.5-32B
    return _internvl("InternVL3-38B", _vit_6b(), _qwen2_5(5120, 64, 40, 8, 27648), _QWEN2_5_IMG)


def _internvl3_78b() -> InternVLConfig:  # Qwen2.5-72B
    return _internvl("InternVL3-78B", _vit_6b(), _qwen2_5(8192, 80, 64, 8, 29568), _QWEN2_5_IMG)


# ---- InternVL3.5 (dense): InternViT-300M/6B-448px-V2_5 + Qwen3 ------------------------------------


def _internvl3_5_1b() -> InternVLConfig:  # Qwen3-0.6B
    return _internvl("InternVL3_5-1B", _vit_300m(), _qwen3(1024, 28, 16, 8, 3072), _QWEN3_IMG)


def _internvl3_5_2b() -> InternVLConfig:  # Qwen3-1.7B
    return _internvl("InternVL3_5-2B", _vit_300m(), _qwen3(2048, 28, 16, 8, 6144), _QWEN3_IMG)


def _internvl3_5_4b() -> InternVLConfig:  # Qwen3-4B
    return _internvl("InternVL3_5-4B", _vit_300m(), _qwen3(2560, 36, 32, 8, 9728), _QWEN3_IMG)


def _internvl3_5_8b() -> InternVLConfig:  # Qwen3-8B
    return _internvl("InternVL3_5-8B", _vit_300m(), _qwen3(4096, 36, 32, 8, 12288), _QWEN3_IMG)


def _internvl3_5_14b() -> InternVLConfig:  # Qwen3-14B
    return _internvl("InternVL3_5-14B", _vit_300m(), _qwen3(5120, 40, 40, 8, 17408), _QWEN3_IMG)


def _internvl3_5_38b() -> InternVLConfig:  # Qwen3-32B
    return _internvl("InternVL3_5-38B", _vit_6b(), _qwen3(5120, 64, 64, 8, 25600), _QWEN3_IMG)


# ---- InternVL3.5 mixture of experts: InternViT-300M / 6B + Qwen3-MoE ------------------------


def _internvl3_5_30b_a3b() -> InternVLConfig:  # Qwen3-30B-A3B
    return _internvl("InternVL3_5-30B-A3B", _vit_300m(), _qwen3_moe(2048, 48, 32, 4, 6144, 768), _QWEN3_IMG)


def _internvl3_5_241b_a28b() -> InternVLConfig:  # Qwen3-235B-A22B
    return _internvl("InternVL3_5-241B-A28B", _vit_6b(), _qwen3_moe(4096, 94, 64, 4, 12288, 1536), _QWEN3_IMG)


def _tiny_moe() -> InternVLConfig:
    """The tiny model with a Qwen3-MoE LLM: 4 experts, 2 per token, layer 1 dense."""
    config = _tiny()
    config.name = "tiny-moe"
    config.language = _llm("qwen3_moe", vocab_size=320, hidden_size=64, num_layers=4, num_heads=4,
                           num_kv_heads=2, ffn_hidden_size=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                           max_position_embeddings=1024, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1])
    return config


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
    "InternVL2_5-1B": _internvl2_5_1b,
    "InternVL2_5-2B": _internvl2_5_2b,
    "InternVL2_5-4B": _internvl2_5_4b,
    "InternVL2_5-8B": _internvl2_5_8b,
    "InternVL2_5-26B": _internvl2_5_26b,
    "InternVL2_5-38B": _internvl2_5_38b,
    "InternVL2_5-78B": _internvl2_5_78b,
    "InternVL3-1B": _internvl3_1b,
    "InternVL3-2B": _internvl3_2b,
    "InternVL3-8B": _internvl3_8b,
    "InternVL3-9B": _internvl3_9b,
    "InternVL3-14B": _internvl3_14b,
    "InternVL3-38B": _internvl3_38b,
    "InternVL3-78B": _internvl3_78b,
    "InternVL3_5-1B": _internvl3_5_1b,
    "InternVL3_5-2B": _internvl3_5_2b,
    "InternVL3_5-4B": _internvl3_5_4b,
    "InternVL3_5-8B": _internvl3_5_8b,
    "InternVL3_5-14B": _internvl3_5_14b,
    "InternVL3_5-38B": _internvl3_5_38b,
    "InternVL3_5-30B-A3B": _internvl3_5_30b_a3b,
    "InternVL3_5-241B-A28B": _internvl3_5_241b_a28b,
    "tiny": _tiny,
    "tiny-moe": _tiny_moe,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> InternVLConfig:
    """A fresh copy of a preset (case-insensitive name); UserError listing valid names."""
    for key, make in PRESETS.items():
        if key.lower() == name.strip().lower():
            return dataclasses.replace(make()).validate()
    raise UserError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")

"""InternVL on megatron-core.

    config.py            architecture dataclasses (VisionConfig, LanguageConfig, InternVLConfig)
    presets.py           the released InternVL2 / 2.5 / 3 / 3.5 sizes (dense and MoE) and tiny CPU models
    specs.py             layer specs (local / transformer_engine) and the TE / FP8 gate
    layers.py            layer scale, cross-head qk-norm, bias-free linears, packed-row attention
    packed_attention.py  attention over packed preference rows (SDPA per pair, FlexAttention)
    vision.py            InternViT, pixel shuffle, the mlp1 projector
    moe_balance.py       the routers' load-balancing loss as the checkpoint means it (scale, padding)
    internvl.py          InternVLModel (one pipeline chunk) and build_model

Submodules import megatron-core; import them directly (this package imports nothing).
"""

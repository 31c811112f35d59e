"""InternVL on megatron-core.

    config.py    architecture dataclasses (VisionConfig, LanguageConfig, InternVLConfig)
    presets.py   InternVL2-1B ... 76B and a tiny CPU model
    specs.py     layer specs (local / transformer_engine) and the TE / FP8 gate
    layers.py    layer scale, cross-head qk-norm, bias-free linears
    vision.py    InternViT, pixel shuffle, the mlp1 projector
    internvl.py  InternVLModel (one pipeline chunk) and build_model

Submodules import megatron-core; import them directly (this package imports nothing).
"""

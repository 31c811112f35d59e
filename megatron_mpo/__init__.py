"""megatron_mpo: Mixed Preference Optimization for InternVL on megatron-core."""

__version__ = "0.1.0"

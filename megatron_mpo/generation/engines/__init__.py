"""Generation engines behind one interface (:class:`~.base.Engine`).

``transformers``: ``generate`` with a KV cache, batched sampling, anywhere (CPU, CI, small
models). ``vllm``: clusters, tensor parallel inside a node (needs CUDA; unverified until
the GPU kit has run it). :func:`make_engine` picks one by name.
"""

from megatron_mpo.generation.engines.base import Completion, Engine, SamplingSettings, make_engine, prompt_seed

__all__ = ["Completion", "Engine", "SamplingSettings", "make_engine", "prompt_seed"]

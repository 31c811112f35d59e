"""Generation engines behind one interface (:class:`~.base.Engine`).

``transformers``: ``generate`` with a KV cache, batched sampling, anywhere (CPU, CI, small
models). ``vllm``: clusters, tensor parallel inside a node (needs CUDA; unverified until
the GPU kit has run it). :func:`make_engine` picks one by name.
"""

from megatron_mpo.errors import UserError
from megatron_mpo.generation.engines.base import Completion, Engine, SamplingSettings, prompt_seed

ENGINES = ("transformers", "vllm")

__all__ = ["Completion", "ENGINES", "Engine", "SamplingSettings", "make_engine", "prompt_seed"]


def make_engine(name: str, model_dir: str, tokenizer, **options) -> Engine:
    """The engine called ``name`` over the HF directory ``model_dir`` (imported on demand)."""
    if name == "transformers":
        from megatron_mpo.generation.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_dir, tokenizer, **options)
    if name == "vllm":
        from megatron_mpo.generation.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, tokenizer, **options)
    raise UserError(f"unknown generation engine {name!r}; known: {', '.join(ENGINES)}")

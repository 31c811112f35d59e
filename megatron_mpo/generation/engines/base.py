"""The engine interface: prompts in, ``n`` completions per prompt out.

Engines are existing inference libraries (transformers, vLLM) behind a thin adapter;
nothing here decodes tokens itself. Seeds are per prompt (:func:`prompt_seed`), so a
question's samples do not depend on which rank drew it, on the batch it shared, or on a
resumed run: the transformers engine reproduces them exactly.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from typing import List, Sequence

from megatron_mpo.errors import UserError
from megatron_mpo.generation.prompts import GenerationPrompt

@dataclass(frozen=True)
class SamplingSettings:
    """How to sample; defaults are InternVL's pair pipeline (8 samples, T 1.0, top-k 50).

    ``temperature == 0`` is greedy decoding (``n`` must then be 1).
    """

    n: int = 8
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UserError(f"samples per question must be >= 1, not {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise UserError("sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1")
        if self.temperature == 0 and self.n != 1:
            raise UserError("greedy decoding (temperature 0) gives one answer per question: set n to 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_greedy(self) -> "SamplingSettings":
        return replace(self, n=1, temperature=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text, its token count, and whether it ended by itself
    (end-of-turn) rather than at ``max_new_tokens``."""

    text: str
    tokens: int
    finished: bool


def prompt_seed(seed: int, key: str) -> int:
    """The sampling seed of one prompt: the run's seed and the prompt's key, hashed."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Engine(ABC):
    """Generates completions; one instance per process (one per data-parallel group)."""

    name: str = "engine"

    @abstractmethod
    def generate(self, prompts: Sequence[GenerationPrompt], settings: SamplingSettings) -> List[List[Completion]]:
        """``settings.n`` completions for each prompt, in prompt order."""

    def describe(self) -> dict:
        """What produced the samples (recorded in the run's provenance)."""
        return {"engine": self.name}


def stop_ids(tokenizer) -> List[int]:
    """Ids that end an answer: the chat turn end and the tokenizer's EOS."""
    return [i for i in dict.fromkeys([tokenizer.im_end_id, tokenizer.eos_id]) if i is not None]


def never_generated(tokenizer, vocab: int) -> List[int]:
    """Ids an engine must never emit: image tokens (they would desynchronise the image
    features) and the padded vocabulary rows beyond the tokenizer."""
    never = {tokenizer.img_start_id, tokenizer.img_end_id, tokenizer.img_context_id}
    never |= set(range(tokenizer.vocab_size, vocab))
    return sorted(i for i in never if i is not None and 0 <= i < vocab)

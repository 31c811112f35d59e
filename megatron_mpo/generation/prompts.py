"""Generation prompts: InternVL's reasoning instruction, and questions turned into the
token ids, pixels and text an engine consumes.

The prompt rule itself (chat template, ``<image>`` placement, dynamic tiling, image
tokens, length limit) is the training one, :meth:`PairBuilder.prompt`; this module only
adds what sampling needs around it: the instruction InternVL's preference-data pipeline
wraps questions in, and a response prefix for Dropout NTP continuations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from megatron_mpo.data.samples import PairBuilder
from megatron_mpo.data.templates import IMAGE_PLACEHOLDER, normalize_placeholders

# InternVL's MPO reasoning prompt (the paper's correctness pipeline; also in MMPR's questions).
REASONING_INSTRUCTION = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and when "
    "you're ready to answer, please use the format \"Final answer: ..\"\n\nQuestion:\n\n"
)
# Short-answer suffixes of VQA-style datasets, stripped before the reasoning instruction
# (they would ask for the bare answer the reasoning prompt replaces).
SHORT_ANSWER_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Answer with the option letter from the given choices directly.",
    "Please answer Yes or No.",
    "Answer the question with Yes or No.",
)
_LEADING_IMAGES = re.compile(r"^(?:\s*<image>\s*)+")


def strip_short_answer_suffix(question: str) -> str:
    """The question without a trailing short-answer instruction (and the space before it)."""
    text = question.rstrip()
    for suffix in SHORT_ANSWER_SUFFIXES:
        if text.endswith(suffix):
            return text[: -len(suffix)].rstrip()
    return text


def reasoning_question(question: str, num_images: int) -> Optional[str]:
    """The question wrapped in the reasoning instruction, images first.

    Leading ``<image>`` placeholders stay in front of the instruction (one per line, as
    InternVL places them); placeholders inside the text (interleaved images) stay where
    they are. None when the placeholders do not match the images (as in training).
    """
    question = normalize_placeholders(question, num_images)
    if question is None:
        return None
    lead = _LEADING_IMAGES.match(question)
    head = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(lead.group(0).count(IMAGE_PLACEHOLDER))) if lead else ""
    body = question[lead.end():] if lead else question
    return f"{head}{REASONING_INSTRUCTION}{strip_short_answer_suffix(body.strip())}"


@dataclass
class GenerationPrompt:
    """One question as every engine needs it.

    ``ids`` / ``pixel_values``: the training prompt (image tokens included) for engines
    that take ids (transformers); ``text`` / ``images``: the same prompt with ``<image>``
    placeholders and the encoded images, for engines that tile themselves (vLLM, told
    ``max_tiles``). ``prefix`` is assistant text the answer continues (Dropout NTP).
    """

    key: str
    ids: List[int]
    pixel_values: torch.Tensor
    text: str
    images: List[bytes] = field(default_factory=list)
    max_tiles: int = 6
    prefix: str = ""

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def build_prompt(builder: PairBuilder, key: str, question: str, images: Sequence[bytes],
                 max_dynamic_patch: object = None, prefix: str = "") -> GenerationPrompt:
    """The prompt of ``question`` with ``images``; ``prefix`` starts the assistant's answer.

    SampleError (``reason`` counted by the caller) on bad images, placeholder mismatches
    or a prompt that leaves no room within the builder's ``max_length``.
    """
    from megatron_mpo.data.samples import SampleError, tile_limit

    ids, pixel_values = builder.prompt(question, images, max_dynamic_patch)
    text = builder.template.render_prompt(normalize_placeholders(question, len(images)) or question,
                                          builder.system_message)
    if prefix:
        ids = ids + builder.answer_ids(prefix)
        text += prefix
        if len(ids) >= builder.max_length:
            raise SampleError("prompt_too_long", f"prompt {len(ids)} tokens, max_length {builder.max_length}")
    budget = tile_limit(max_dynamic_patch, builder.max_tiles) if builder.dynamic_tiling else 1
    return GenerationPrompt(key, ids, pixel_values, text, list(images), budget, prefix)

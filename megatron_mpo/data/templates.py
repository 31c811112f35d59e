"""Chat templates of the InternVL family and the `<image>` placeholder rule.

The strings reproduce InternVL's conversation templates (``internvl/conversation.py``,
separator style MPT) so that a model fine-tuned by InternVL sees exactly the prompt it
was trained on:

    {bos?}<|im_start|>system\\n{system}{sep}<|im_start|>user\\n{question}{sep}<|im_start|>assistant\\n

with ``sep = "<|im_end|>"`` for ``internlm2-chat`` / ``Hermes-2`` and ``"<|im_end|>\\n"``
for ``internvl2_5``. A response is ``{text}<|im_end|>``; its ``<|im_end|>`` is trained
(InternVL's ``preprocess_internvl2_5`` also leaves the trailing ``\\n`` unlabelled, so
it is not part of a response here). InternVL prepends the tokenizer's BOS for
``internlm2-chat`` and ``internvl2_5`` when the tokenizer adds one (InternLM2), never
for ``Hermes-2``.

InternVL2.5, InternVL3 and the dense InternVL3.5 releases all use ``internvl2_5``.
InternVL3.5-GPT-OSS's ``internvl3_5_gpt_oss`` (harmony format) is refused by name
(:data:`REFUSED_TEMPLATES`): GPT-OSS LLMs are not supported.

Thinking mode (InternVL3.5): nothing but a system message. The user sets the system
message to InternVL's R1 prompt (:data:`THINKING_SYSTEM_PROMPT`, or the alias
``"thinking"``, see :data:`SYSTEM_MESSAGE_ALIASES`) and the responses hold
``<think>...</think>`` text, which stays in the trained response: the Qwen3 tokenizer
declares ``<think>`` / ``</think>`` as added tokens, so each is one id. Reasoning data
that carries the R1 prompt at the start of the question (MMPR: ``R1 + "\\n" + question``)
is used as it is: as in InternVL's own MPO trainer, the prompt is never moved out of the
question into the system message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from megatron_mpo.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

# InternVL2's system message (internlm2-chat, Hermes-2, phi3-chat).
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# InternVL2.5's system message (template internvl2_5).
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

THINK_START = "<think>"
THINK_END = "</think>"
# InternVL's R1 system prompt of the thinking mode (InternVL3.5), exactly as InternVL
# defines it: ``R1_SYSTEM_PROMPT`` (``.strip()``-ed, no trailing newline) in
# internvl_chat/tools/reasoning_data_pipeline/utils/constants.py, the string the model
# cards assign to ``model.system_message``. (The MPO trainer appends "\n" to its copy only
# to match the prompt at the start of a question.)
THINKING_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n"
    "\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, "
    "and reason through the problem step-by-step. Enclose this entire thinking process within <think> and "
    "</think> tags.\n"
    "\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. "
    "Separate the answer from the think section with a newline.\n"
    "\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should "
    "be standalone and not reference the thinking section."
)
# Names a system message may be given by (DataConfig ``system_message="thinking"``: the R1 prompt).
SYSTEM_MESSAGE_ALIASES: Dict[str, str] = {"thinking": THINKING_SYSTEM_PROMPT}
# Templates InternVL releases use that this project refuses, with the reason (one line).
REFUSED_TEMPLATES: Dict[str, str] = {
    "internvl3_5_gpt_oss": "GPT-OSS LLMs (InternVL3.5-20B-A4B) are not supported (InternVL3.5-GPT-OSS's "
                           "harmony-format template)",
}


def resolve_system_message(value: Optional[str]) -> Optional[str]:
    """The system message text for a configured value: an alias's text, else the value itself."""
    return SYSTEM_MESSAGE_ALIASES.get(value, value) if isinstance(value, str) else value


@dataclass(frozen=True)
class ChatTemplate:
    """One ChatML-style template: how a question and a response become text."""

    name: str
    system_message: str
    sep: str  # closes every turn
    bos: bool  # prepend the tokenizer's BOS when the tokenizer adds one

    def render_prompt(self, question: str, system_message: Optional[str] = None) -> str:
        """The prompt text up to and including ``<|im_start|>assistant\\n``."""
        system = self.system_message if system_message is None else resolve_system_message(system_message)
        return (
            f"{IM_START}system\n{system}{self.sep}"
            f"{IM_START}user\n{question}{self.sep}"
            f"{IM_START}assistant\n"
        )

    def render_response(self, response: str) -> str:
        """The trained text of a response: the answer and the end-of-turn token."""
        return f"{response}{IM_END}"


TEMPLATES: Dict[str, ChatTemplate] = {
    "internlm2-chat": ChatTemplate("internlm2-chat", INTERNVL2_SYSTEM, IM_END, bos=True),
    "Hermes-2": ChatTemplate("Hermes-2", INTERNVL2_SYSTEM, IM_END, bos=False),
    "internvl2_5": ChatTemplate("internvl2_5", INTERNVL2_5_SYSTEM, IM_END + "\n", bos=True),
}


def get_template(name: str) -> ChatTemplate:
    """The template called ``name``; a UserError names the known ones otherwise."""
    if name in REFUSED_TEMPLATES:
        raise UserError(f"chat template {name!r}: {REFUSED_TEMPLATES[name]}")
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def family_template(family: str) -> str:
    """The template to assume when a checkpoint names none: ``internlm2-chat`` for an
    InternLM2 LLM, ``internvl2_5`` (InternVL2.5 and later) for any other."""
    return "internlm2-chat" if family == "internlm2" else "internvl2_5"


def normalize_placeholders(question: str, num_images: int) -> Optional[str]:
    """Make the question hold exactly one ``<image>`` per image, or None when it cannot.

    Rule: a question that already holds ``num_images`` placeholders is kept; one that
    holds none gets ``"<image>\\n"`` prepended once per image (InternVL's single-image
    rule, extended); any other count (including placeholders in a text-only record) is
    ambiguous and refused.
    """
    count = question.count(IMAGE_PLACEHOLDER)
    if count == num_images:
        return question
    if count == 0:
        return (IMAGE_PLACEHOLDER + "\n") * num_images + question
    return None


def expand_image_placeholders(text: str, tiles_per_image: list, tokens_per_tile: int) -> str:
    """Text with each ``<image>`` replaced by ``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>``.

    The pipeline builds the same token ids directly (without tokenizing thousands of
    context tokens); this text form is for inspection and tests.
    """
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(tiles_per_image):
        raise ValueError(f"{len(parts) - 1} placeholders for {len(tiles_per_image)} images")
    out = [parts[0]]
    for tiles, part in zip(tiles_per_image, parts[1:]):
        out.append(IMG_START + IMG_CONTEXT * (tiles * tokens_per_tile) + IMG_END + part)
    return "".join(out)

"""The chat template a Hugging Face InternVL checkpoint was trained with, read from its files.

Why: the directory name says nothing reliable (the same Qwen2 weights were given
``Hermes-2`` from a folder named ``InternVL2-1B`` and ``internvl2_5`` from one named
``hf``), and a wrong template silently changes every prompt. The converter stores the
result in ``model_config.json`` (``template``); ``data.template`` overrides it at run time.

Sources, the first one that says something wins:

1. ``config.json`` ``template`` (the original ``InternVLChatModel`` layout: InternVL's
   conversation template name; InternVL2.5, InternVL3 and the dense InternVL3.5 releases
   name ``internvl2_5``). A name this project does not know is refused, and
   ``internvl3_5_gpt_oss`` (InternVL3.5-GPT-OSS) with the reason: GPT-OSS is not supported.
2. A Jinja chat template (the transformers-native layout: transformers 5 saves tokenizer
   and processor templates as ``chat_template.jinja``; older versions wrote
   ``chat_template.json`` for the processor and ``tokenizer_config.json`` ``chat_template``
   for the tokenizer; ``processor_config.json`` is read too), mapped by content:

   * InternVL2.5's system prompt -> ``internvl2_5``; InternVL2's -> the InternVL2 template;
   * else a ChatML template (``<|im_start|>`` ... ``<|im_end|>``) whose turns end with
     ``<|im_end|>\\n`` -> ``internvl2_5`` (transformers' own InternVL template: no system
     prompt, ``\\n`` after every turn; the InternVL3.5 ``-HF`` templates, Qwen3 style, whose
     ``<think>`` block / ``enable_thinking`` switch only shapes generation prompts: in
     training the prompt ends at ``<|im_start|>assistant\\n`` and any ``<think>...</think>``
     is the response's own text), ending with a bare ``<|im_end|>`` -> InternVL2's;
   * a harmony template (``<|start|>`` ... ``<|message|>``: InternVL3.5-GPT-OSS) is refused
     because GPT-OSS is not supported; anything else (not ChatML: Phi-3, Llama-3 ...) is
     refused as unknown.

   The InternVL2 template is ``internlm2-chat`` for an InternLM2 LLM, else ``Hermes-2``
   (they differ only in the BOS token), as in the InternVL2 releases.
3. Nothing: by LLM family (``internlm2-chat`` for InternLM2, else ``internvl2_5``), and the
   converter says so.

A refusal names the known templates; ``--template`` on the converter chooses one instead.

The other way, for a native export whose source had no chat template:
:func:`jinja_template` writes a template as Jinja for transformers' ``apply_chat_template``,
rendering what training's PairBuilder renders (the template's system message unless the
conversation starts with its own, ``<IMG_CONTEXT>\n`` per image, which InternVL's processor
expands to ``<img>`` + tiles x ``<IMG_CONTEXT>`` + ``</img>``), and reads back as the same
template here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from megatron_mpo.data.templates import (IM_END, IM_START, IMAGE_PLACEHOLDER, IMG_CONTEXT, INTERNVL2_5_SYSTEM,
                                         INTERNVL2_SYSTEM, REFUSED_TEMPLATES, TEMPLATES, family_template, get_template)
from megatron_mpo.errors import UserError

__all__ = ["JINJA_SOURCES", "JINJA_FILE", "checkpoint_template", "template_from_jinja", "jinja_template",
           "has_chat_template"]

JINJA_FILE = "chat_template.jinja"
# (file, key in it or None for the raw file), in the order they are consulted.
JINJA_SOURCES = (
    (JINJA_FILE, None),
    ("chat_template.json", "chat_template"),
    ("processor_config.json", "chat_template"),
    ("tokenizer_config.json", "chat_template"),
)
_SKIPPED_AFTER_IM_END = "'\" +~\t"
# Tokens of OpenAI's harmony chat format (GPT-OSS), none of which ChatML has.
_HARMONY_TOKENS = ("<|start|>", "<|message|>")


def _known() -> str:
    return ", ".join(sorted(TEMPLATES))


def _internvl2_template(family: str) -> str:
    return "internlm2-chat" if family == "internlm2" else "Hermes-2"


def _turns_end_with_newline(text: str) -> bool:
    """Whether some ``<|im_end|>`` is followed by a newline (quotes and ``+`` skipped)."""
    text = text.replace("\\n", "\n")
    start = text.find(IM_END)
    while start >= 0:
        rest = text[start + len(IM_END):].lstrip(_SKIPPED_AFTER_IM_END)
        if rest.startswith("\n"):
            return True
        start = text.find(IM_END, start + 1)
    return False


def template_from_jinja(text: str, family: str) -> Optional[tuple[str, str]]:
    """(template name, why) for a Jinja chat template's text; None when it is not ChatML."""
    if INTERNVL2_5_SYSTEM in text:
        return "internvl2_5", "InternVL2.5 system prompt"
    if INTERNVL2_SYSTEM in text:
        return _internvl2_template(family), f"InternVL2 system prompt, {family} LLM"
    if IM_START not in text or IM_END not in text:
        return None
    if _turns_end_with_newline(text):
        return "internvl2_5", "ChatML, turns end with <|im_end|>\\n"
    return _internvl2_template(family), f"ChatML, turns end with a bare <|im_end|>, {family} LLM"


def _jinja_text(path: Path, key: Optional[str]) -> Optional[str]:
    """The default chat template stored in ``path`` (None when absent or unreadable)."""
    if not path.is_file():
        return None
    try:
        return _stored_jinja(path.read_bytes(), key)
    except OSError:
        return None


def _stored_jinja(raw: bytes, key: Optional[str]) -> Optional[str]:
    """The default chat template in a file's content (``key``: where in its JSON)."""
    try:
        text = raw.decode("utf-8")
        value = text if key is None else json.loads(text).get(key)
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def _named(name: str, where: str) -> str:
    if name in REFUSED_TEMPLATES:
        raise UserError(f"{where} names chat template {name!r}: {REFUSED_TEMPLATES[name]}")
    if name not in TEMPLATES:
        raise UserError(
            f"{where} names chat template {name!r}, which this project does not know; known: {_known()} "
            "(pass --template to convert with one of them)"
        )
    return name


def checkpoint_template(hf_dir: str | Path, config: Mapping, family: str,
                        override: Optional[str] = None) -> tuple[str, str]:
    """(template name, where it came from) for an HF InternVL directory and its config.json.

    ``override`` (the converter's ``--template``) wins; see the module docstring for the rest.
    """
    hf_dir = Path(hf_dir)
    if override is not None:
        return _named(override, "--template"), "--template"
    named = config.get("template")
    if isinstance(named, str) and named:
        return _named(named, f"{hf_dir / 'config.json'}"), "config.json 'template'"
    for name, key in JINJA_SOURCES:
        text = _jinja_text(hf_dir / name, key)
        if text is None:
            continue
        found = template_from_jinja(text, family)
        if found is None and all(t in text for t in _HARMONY_TOKENS):
            raise UserError(f"the chat template in {hf_dir / name} is in the harmony format: "
                            f"{REFUSED_TEMPLATES['internvl3_5_gpt_oss']}")
        if found is None:
            raise UserError(
                f"the chat template in {hf_dir / name} is not one this project knows (not ChatML "
                f"<|im_start|> ... <|im_end|>); known: {_known()} (pass --template to choose one)"
            )
        return found[0], f"{name}: {found[1]}"
    return family_template(family), f"the checkpoint names none: by its {family} LLM"


def has_chat_template(files: Mapping[str, bytes]) -> bool:
    """Whether a directory's files (name -> content) carry a chat template anywhere
    transformers reads one."""
    return any(name in files and _stored_jinja(files[name], key) is not None for name, key in JINJA_SOURCES)


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def jinja_template(name: str, bos: bool = False) -> str:
    """Template ``name`` as a Jinja chat template for transformers; ``bos``: the tokenizer adds
    a BOS (the template then starts with ``bos_token`` where training's prompt does). Every
    tag trims the whitespace around it, so the lines between them render as nothing."""
    template = get_template(name)
    image = _literal(IMG_CONTEXT + "\n")
    text = f"| replace({_literal(IMAGE_PLACEHOLDER)}, {_literal(IMG_CONTEXT)})"
    return "\n".join([
        f"{{%- set sep = {_literal(template.sep)} -%}}",
        f"{{%- set ns = namespace(system={_literal(template.system_message)}) -%}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}",
        "{%- else -%}{%- set ns.system = '' -%}",
        "{%- for part in messages[0]['content'] if part['type'] == 'text' -%}",
        "{%- set ns.system = ns.system + part['text'] -%}{%- endfor -%}",
        "{%- endif -%}{%- endif -%}",
        *(["{{- bos_token -}}"] if bos and template.bos else []),
        f"{{{{- {_literal(IM_START + 'system' + chr(10))} + ns.system + sep -}}}}",
        "{%- for message in messages if message['role'] != 'system' -%}",
        f"{{{{- {_literal(IM_START)} + message['role'] + {_literal(chr(10))} -}}}}",
        f"{{%- if message['content'] is string -%}}{{{{- message['content'] {text} -}}}}",
        "{%- else -%}{%- for part in message['content'] -%}",
        f"{{%- if part['type'] == 'image' -%}}{{{{- {image} -}}}}",
        f"{{%- elif part['type'] == 'video' -%}}{{{{- {_literal('<video>' + chr(10))} -}}}}",
        f"{{%- elif part['type'] == 'text' -%}}{{{{- part['text'] {text} -}}}}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{{- sep -}}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {_literal(IM_START + 'assistant' + chr(10))} -}}}}{{%- endif -%}}",
    ])

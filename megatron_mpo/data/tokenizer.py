"""Tokenizer loading from a model directory (SentencePiece or HF ``tokenizers``).

InternVL checkpoints ship either an InternLM2 ``tokenizer.model`` (SentencePiece) or a
Qwen2/Llama-3 ``tokenizer.json``; the special tokens the model relies on
(``<|im_start|>``, ``<img>``, ``<IMG_CONTEXT>``...) are declared next to it in
``tokenizer_config.json`` (``added_tokens_decoder``), ``special_tokens_map.json`` and
``tokenizer.json``'s ``added_tokens``. We split text on every declared token ourselves
and encode the pieces in between with the backend, so special tokens always become
single ids with the checkpoint's ids, whichever backend is used.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

from megatron_mpo.data.templates import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START
from megatron_mpo.errors import UserError

REQUIRED_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END)
# The files a tokenizer directory may hold: copied into model dirs, hashed into fingerprints.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _token_content(value) -> Optional[str]:
    """A token given as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Text <-> ids with declared special tokens encoded as single ids.

    Picklable (DataLoader workers get a copy): the backend is rebuilt from its file.
    """

    def __init__(self, model_dir: str):
        self.model_dir = os.path.abspath(model_dir)
        sp_path = os.path.join(model_dir, "tokenizer.model")
        hf_path = os.path.join(model_dir, "tokenizer.json")
        if os.path.isfile(hf_path):
            self.kind = "tokenizers"
        elif os.path.isfile(sp_path):
            self.kind = "sentencepiece"
        else:
            raise UserError(
                f"{model_dir}: no tokenizer.json or tokenizer.model; point the tokenizer at a model directory"
            )
        self._load_backend()
        config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(model_dir, "special_tokens_map.json"))

        # content -> id for every declared added token.
        specials: Dict[str, int] = {}
        if self.kind == "tokenizers":
            for tok in self._backend_json_added:
                specials[tok["content"]] = int(tok["id"])
        for id_str, tok in (config.get("added_tokens_decoder") or {}).items():
            content = _token_content(tok)
            if content is not None:
                specials[content] = int(id_str)
        named = {}
        for source in (special_map, config):
            for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
                content = _token_content(source.get(name))
                if content is not None and name not in named:
                    named[name] = content
            for extra in source.get("additional_special_tokens") or []:
                content = _token_content(extra)
                if content is not None and content not in specials:
                    found = self._backend_token_id(content)
                    if found is not None:
                        specials[content] = found
        for content in list(named.values()) + list(REQUIRED_TOKENS):
            if content not in specials:
                found = self._backend_token_id(content)
                if found is not None:
                    specials[content] = found
        self.special_ids: Dict[str, int] = specials
        self._special_by_id = {i: c for c, i in specials.items()}
        missing = [t for t in REQUIRED_TOKENS if t not in specials]
        if missing:
            raise UserError(
                f"{model_dir}: tokenizer lacks the special tokens {', '.join(missing)} "
                "(an InternVL checkpoint declares them in tokenizer_config.json added_tokens_decoder)"
            )
        # Longest first so that a token that prefixes another never wins.
        ordered = sorted(specials, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")")

        self.img_start_id = specials[IMG_START]
        self.img_end_id = specials[IMG_END]
        self.img_context_id = specials[IMG_CONTEXT]
        self.im_start_id = specials[IM_START]
        self.im_end_id = specials[IM_END]
        self.bos_id = self._named_id(named.get("bos_token"))
        self.eos_id = self._named_id(named.get("eos_token"))
        pad = self._named_id(named.get("pad_token"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        default_bos = self.kind == "sentencepiece"  # InternLM2/Llama SentencePiece tokenizers add BOS
        self.add_bos = bool(config.get("add_bos_token", default_bos)) and self.bos_id is not None
        self.vocab_size = max([self._backend_vocab_size()] + [i + 1 for i in specials.values()])

    # -- backend -------------------------------------------------------------------------
    def _load_backend(self) -> None:
        if self.kind == "tokenizers":
            from tokenizers import Tokenizer as HFTokenizer

            path = os.path.join(self.model_dir, "tokenizer.json")
            try:
                self._backend = HFTokenizer.from_file(path)
                with open(path, encoding="utf-8") as f:
                    self._backend_json_added = json.load(f).get("added_tokens") or []
            except Exception as exc:  # tokenizers raises plain Exceptions for bad files
                raise UserError(f"cannot load {path}: {exc}") from None
        else:
            import sentencepiece as spm

            path = os.path.join(self.model_dir, "tokenizer.model")
            try:
                self._backend = spm.SentencePieceProcessor(model_file=path)
            except Exception as exc:
                raise UserError(f"cannot load {path}: {exc}") from None
            self._backend_json_added = []

    def _backend_token_id(self, content: str) -> Optional[int]:
        if self.kind == "tokenizers":
            return self._backend.token_to_id(content)
        pid = self._backend.piece_to_id(content)
        return None if pid == self._backend.unk_id() and content != self._backend.id_to_piece(pid) else pid

    def _backend_vocab_size(self) -> int:
        if self.kind == "tokenizers":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    def _encode_plain(self, text: str) -> List[int]:
        if not text:
            return []
        if self.kind == "tokenizers":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text)

    def _named_id(self, content: Optional[str]) -> Optional[int]:
        if content is None:
            return None
        if content in self.special_ids:
            return self.special_ids[content]
        return self._backend_token_id(content)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_backend", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load_backend()

    # -- public --------------------------------------------------------------------------
    def split_special(self, text: str) -> List[str]:
        """``text`` cut into plain pieces and special tokens (empty pieces dropped)."""
        return [p for p in self._split_re.split(text) if p]

    def encode(self, text: str) -> List[int]:
        """Ids of ``text`` without BOS; declared special tokens become single ids."""
        ids: List[int] = []
        for piece in self.split_special(text):
            special = self.special_ids.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._encode_plain(piece))
        return ids

    def encode_continuation(self, prefix: str, text: str) -> List[int]:
        """Ids of ``text`` as tokenized right after the plain text ``prefix``.

        InternVL tokenizes ``assistant\\n{response}`` as one piece; for SentencePiece the
        response's first token can differ from tokenizing the response alone. When the
        joint encoding starts with the prefix's own ids we keep the remainder.
        """
        head = self.encode(prefix)
        joint = self.encode(prefix + text)
        if joint[: len(head)] == head:
            return joint[len(head):]
        return self.encode(text)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a special token or a backend piece, None when unknown."""
        return self._named_id(token)

    def decode(self, ids: List[int]) -> str:
        """Text of ``ids`` with special tokens spelled out (for inspection)."""
        out: List[str] = []
        run: List[int] = []

        def flush():
            if run:
                if self.kind == "tokenizers":
                    out.append(self._backend.decode(run, skip_special_tokens=False))
                else:
                    out.append(self._backend.decode(run))
                run.clear()

        for i in ids:
            i = int(i)
            if i in self._special_by_id:
                flush()
                out.append(self._special_by_id[i])
            else:
                run.append(i)
        flush()
        return "".join(out)


def load_tokenizer(model_dir: str) -> Tokenizer:
    """The tokenizer of the checkpoint or tokenizer directory ``model_dir``."""
    if not os.path.isdir(model_dir):
        raise UserError(f"tokenizer directory {model_dir} does not exist")
    return Tokenizer(model_dir)

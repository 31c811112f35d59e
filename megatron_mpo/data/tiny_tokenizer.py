"""Tiny trained tokenizers for tests and tiny models (no download, a few hundred ids).

``build_tiny_tokenizer(out_dir, kind)`` trains on a small built-in English corpus and
writes a model directory that :func:`megatron_mpo.data.tokenizer.load_tokenizer` (and
transformers' ``PreTrainedTokenizerFast`` for the ``tokenizers`` kind) can load:

- ``kind="tokenizers"``: byte-level BPE (Qwen2-like), ``tokenizer.json``; special tokens
  at ids 0..K-1; no BOS.
- ``kind="sentencepiece"``: SentencePiece BPE with byte fallback (InternLM2-like),
  ``tokenizer.model``; ``<unk>``=0, ``<s>``=1, ``</s>``=2, special tokens from id 3; adds BOS.

Both encode any text (byte level / byte fallback), including the Chinese system prompts.
"""

from __future__ import annotations

import io
import json
import os
from typing import List

SPECIAL_TOKENS: List[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]

_CORPUS = """\
The picture shows a red square next to a blue circle on a white background.
There is a green triangle above the yellow rectangle in the image.
How many shapes can you see in the image? I can see three shapes.
Describe the image in detail. The image contains a small black dot and a large orange ring.
What color is the circle? The circle is blue. The square is red.
Please answer the question step by step and give the final answer.
First, count the objects. Second, compare their sizes. The answer is two.
The cat sat on the mat while the dog slept near the door.
A person is riding a bicycle along the river under a cloudy sky.
The chart shows that sales increased from 2019 to 2021 and then decreased.
Which option is correct? Option A is correct because the angle is ninety degrees.
The total is 12 plus 30, which equals 42. So the final answer is 42.
You are a helpful assistant. Answer honestly and concisely.
The left image and the right image are different: the left one is brighter.
This is a photo of a kitchen with a table, two chairs and a window.
The text in the image says "Welcome" in large letters.
Let us think about it carefully before answering the question.
Image 1 shows a tree. Image 2 shows a house with a red roof.
"""


def corpus_lines() -> List[str]:
    """The built-in training sentences."""
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def _added_decoder(ids: dict) -> dict:
    return {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok, i in sorted(ids.items(), key=lambda kv: kv[1])
    }


def _build_hf(out_dir: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines() * 4, trainer=trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 8192,
            "added_tokens_decoder": _added_decoder(ids),
        },
    )
    _write_json(
        os.path.join(out_dir, "special_tokens_map.json"),
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": SPECIAL_TOKENS[1:]},
    )


def _build_sp(out_dir: str, vocab_size: int) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines() * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=SPECIAL_TOKENS,
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",  # keep newlines and full-width punctuation
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ids = {t: proc.piece_to_id(t) for t in SPECIAL_TOKENS}
    ids.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "</s>",
            "model_max_length": 8192,
            "added_tokens_decoder": _added_decoder(ids),
        },
    )
    _write_json(
        os.path.join(out_dir, "special_tokens_map.json"),
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    )


def build_tiny_tokenizer(out_dir: str, kind: str = "tokenizers", vocab_size: int = 400) -> str:
    """Train and write a tiny tokenizer directory; returns ``out_dir``.

    ``kind`` is ``"tokenizers"`` (tokenizer.json) or ``"sentencepiece"`` (tokenizer.model).
    """
    os.makedirs(out_dir, exist_ok=True)
    if kind == "tokenizers":
        _build_hf(out_dir, vocab_size)
    elif kind == "sentencepiece":
        _build_sp(out_dir, max(vocab_size, 300 + len(SPECIAL_TOKENS)))
    else:
        raise ValueError(f"kind must be 'tokenizers' or 'sentencepiece', not {kind!r}")
    return out_dir

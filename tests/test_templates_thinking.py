"""Thinking mode of InternVL3.5: the R1 system prompt and ``<think>`` tokens in responses.

The tokenizer is a tiny byte-level BPE that, like Qwen3's, declares ``<think>`` and
``</think>`` as added (non-special) tokens. Expected ids come from transformers' own
tokenizer applying InternVL's ``preprocess_internvl2_5`` rule, written out here: one
tokenizer call per turn, ``<|im_start|>assistant\\n`` unlabelled, the turn's last ``\\n``
unlabelled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from megatron_mpo.data import load_tokenizer
from megatron_mpo.data.samples import PairBuilder
from megatron_mpo.data.templates import (INTERNVL2_5_SYSTEM, THINK_END, THINK_START, THINKING_SYSTEM_PROMPT,
                                         get_template)
from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

QUESTION = "How many shapes can you see in the image?"
CHOSEN = "<think>\nFirst, count the objects.\n</think>\n\nI can see three shapes."
REJECTED = "<think>The circle is blue.</think>The answer is two."


@pytest.fixture(scope="module")
def think_tok(tmp_path_factory) -> str:
    """A tiny tokenizer dir with <think> / </think> added as Qwen3 declares them."""
    from tokenizers import AddedToken, Tokenizer

    out = Path(build_tiny_tokenizer(str(tmp_path_factory.mktemp("think_tok")), "tokenizers"))
    backend = Tokenizer.from_file(str(out / "tokenizer.json"))
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    backend.save(str(out / "tokenizer.json"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    for t in (THINK_START, THINK_END):
        config["added_tokens_decoder"][str(backend.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return str(out)


def _internvl_ids(hf, system: str, question: str, response: str):
    """(prompt ids, response ids) by InternVL's preprocess_internvl2_5 rule."""
    batches = [f"<|im_start|>system\n{system}<|im_end|>\n", f"<|im_start|>user\n{question}<|im_end|>\n",
               f"<|im_start|>assistant\n{response}<|im_end|>\n"]
    ids = hf(batches).input_ids
    ignore_len = len(hf("<|im_start|>assistant\n").input_ids)
    return ids[0] + ids[1] + ids[2][:ignore_len], ids[2][ignore_len:-1]


def test_think_tags_are_single_ids_and_pairs_match_internvl(think_tok):
    from transformers import AutoTokenizer

    tok = load_tokenizer(think_tok)
    hf = AutoTokenizer.from_pretrained(think_tok)
    think, think_end = tok.special_ids[THINK_START], tok.special_ids[THINK_END]
    assert hf.convert_tokens_to_ids([THINK_START, THINK_END]) == [think, think_end]

    builder = PairBuilder(tok, get_template("internvl2_5"), max_length=4096, max_tiles=6, image_size=56,
                          tokens_per_tile=4, system_message="thinking")
    pair = builder.build("s/k", {"question": QUESTION, "chosen": CHOSEN, "rejected": REJECTED}, [])
    prompt, chosen = _internvl_ids(hf, THINKING_SYSTEM_PROMPT, QUESTION, CHOSEN)
    assert pair.prompt == prompt
    assert pair.chosen == chosen
    assert pair.rejected == _internvl_ids(hf, THINKING_SYSTEM_PROMPT, QUESTION, REJECTED)[1]
    for ids, text in ((pair.chosen, CHOSEN), (pair.rejected, REJECTED)):
        assert ids[0] == think and ids.count(think) == 1 and ids.count(think_end) == 1
        assert ids[-1] == tok.im_end_id and tok.decode(ids) == text + "<|im_end|>"
    # the R1 prompt names both tags: one id each in the system turn too
    assert pair.prompt.count(think) == 1 and pair.prompt.count(think_end) == 1


def test_thinking_system_prompt_is_internvl_r1_prompt():
    # InternVL's R1_SYSTEM_PROMPT (reasoning_data_pipeline/utils/constants.py, .strip()-ed)
    assert hashlib.sha256(THINKING_SYSTEM_PROMPT.encode()).hexdigest() == (
        "a2cb9e8de918a3e379ee49845f6ebc851d6f449b4d88f6523d2b49edae502101")
    assert THINKING_SYSTEM_PROMPT == THINKING_SYSTEM_PROMPT.strip()
    assert THINKING_SYSTEM_PROMPT.startswith("You are an AI assistant that rigorously follows this response protocol:")
    assert "within <think> and </think> tags." in THINKING_SYSTEM_PROMPT

    template = get_template("internvl2_5")
    expected = (f"<|im_start|>system\n{THINKING_SYSTEM_PROMPT}<|im_end|>\n"
                "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert template.render_prompt("Q", "thinking") == expected
    assert template.render_prompt("Q", THINKING_SYSTEM_PROMPT) == expected
    assert template.render_prompt("Q", "Thinking").startswith("<|im_start|>system\nThinking<|im_end|>")
    assert template.render_prompt("Q").startswith(f"<|im_start|>system\n{INTERNVL2_5_SYSTEM}<|im_end|>\n")


def test_r1_prompt_in_the_question_stays_there(think_tok):
    tok = load_tokenizer(think_tok)
    builder = PairBuilder(tok, get_template("internvl2_5"), max_length=4096, max_tiles=6, image_size=56,
                          tokens_per_tile=4)
    question = THINKING_SYSTEM_PROMPT + "\n" + QUESTION  # MMPR reasoning data: R1 + "\n" + question
    pair = builder.build("s/k", {"question": question, "chosen": CHOSEN, "rejected": REJECTED}, [])
    assert tok.decode(pair.prompt) == (f"<|im_start|>system\n{INTERNVL2_5_SYSTEM}<|im_end|>\n"
                                       f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def test_thinking_system_message_from_the_run_config_reaches_prompts_and_sidecars(tmp_path):
    """``data.system_message: thinking`` in the run YAML -> the data pipeline's settings -> the
    reference fingerprint: sidecars computed with the default system message are refused."""
    from megatron_mpo.config import load_config
    from megatron_mpo.data import refs
    from megatron_mpo.errors import UserError
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.data_setup import loader_data

    base = [f"model.init={tmp_path}", f"data.shards={tmp_path}", f"data.ref_logps={tmp_path}",
            "train.steps=1", "train.device=cpu", "data.template=internvl2_5"]
    default = loader_data(load_config(None, base), get_preset("tiny"))
    thinking = loader_data(load_config(None, base + ["data.system_message=thinking"]), get_preset("tiny"))
    assert default.system_message is None and thinking.system_message == "thinking"
    assert THINKING_SYSTEM_PROMPT in get_template("internvl2_5").render_prompt("q", thinking.system_message)
    old = {key: None for key in refs.FINGERPRINT_FIELDS if key != "system_message"}  # a pre-field sidecar
    assert refs.explain(old, {**old, "system_message": None}) is None
    assert "system_message" in refs.explain(old, {**old, "system_message": "thinking"})
    with pytest.raises(UserError, match="GPT-OSS"):
        load_config(None, base + ["data.template=internvl3_5_gpt_oss"])

"""The chat template comes from the checkpoint's own files, never from its folder name.

Expected templates are the ones the InternVL releases were trained with (InternVL2:
``internlm2-chat`` for InternLM2, else ``Hermes-2``; InternVL2.5 and transformers' own
InternVL template: ``internvl2_5``), written out by hand here. The folders are named to
suggest another template (``InternVL2-1B`` is Hermes-2 by name; ``hf`` says nothing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_mpo.data.templates import INTERNVL2_5_SYSTEM, INTERNVL2_SYSTEM
from megatron_mpo.errors import UserError
from tests.test_conversion import _error_line, _safetensors_dir, _tiny_internvl, _tool_main

# transformers' InternVL chat template (convert_internvl_weights_to_hf.py): no system
# prompt, "\n" after every <|im_end|>.
HF_INTERNVL = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# InternVL2's conversation template as Jinja: its system prompt, bare <|im_end|> turn ends.
INTERNVL2_JINJA = (
    "{{'<|im_start|>system\n" + INTERNVL2_SYSTEM + "<|im_end|>'}}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
BARE_CHATML = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>'}}{% endfor %}"
PHI3 = "{% for m in messages %}{{'<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n'}}{% endfor %}"
# An InternVL3.5 -HF template, Qwen3 style: a default system message (InternVL2.5's prompt),
# earlier answers' <think> blocks dropped, an enable_thinking switch for generation.
INTERNVL3_5_HF = (
    r"{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    r"{%- set turns = messages[1:] %}{%- else %}{%- set system = '" + INTERNVL2_5_SYSTEM + r"' %}"
    r"{%- set turns = messages %}{%- endif %}{{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}"
    r"{%- for message in turns %}{%- set content = message['content'] %}"
    r"{%- if message['role'] == 'assistant' and '</think>' in content %}"
    r"{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    r"{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
    r"{%- endif %}{%- endif %}"
)
# The same without a default system message (no InternVL prompt to recognise).
QWEN3_THINKING = INTERNVL3_5_HF.replace(INTERNVL2_5_SYSTEM, "")
# InternVL3.5-GPT-OSS: OpenAI's harmony format.
HARMONY = (
    "{{'<|start|>system<|message|>You are InternVL, a large language model trained by Shanghai AI Laboratory."
    "<|end|>'}}{% for m in messages %}{{'<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|start|>assistant'}}{% endif %}"
)


def _write(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


# ---- reading the files (no weights) ---------------------------------------------------

CASES = {
    "transformers template, InternVL2-1B folder": ("InternVL2-1B", {"chat_template.jinja": HF_INTERNVL}, "qwen2",
                                                   "internvl2_5"),
    "legacy processor chat_template.json": ("InternVL2-1B", {"chat_template.json": {"chat_template": HF_INTERNVL}},
                                            "llama", "internvl2_5"),
    "tokenizer_config list, InternVL2 prompt, InternLM2": (
        "InternVL2-1B", {"tokenizer_config.json": {"chat_template": [{"name": "default", "template": INTERNVL2_JINJA}]}},
        "internlm2", "internlm2-chat"),
    "processor_config, bare <|im_end|>, Qwen2": ("hf", {"processor_config.json": {"chat_template": BARE_CHATML}},
                                                 "qwen2", "Hermes-2"),
    "InternVL3.5 -HF template with a <think> block": ("InternVL2-1B", {"chat_template.jinja": INTERNVL3_5_HF},
                                                      "qwen3", "internvl2_5"),
    "config.json template wins over the Jinja": ("InternVL2-8B", {"config.json": {"template": "Hermes-2"},
                                                                  "chat_template.jinja": HF_INTERNVL},
                                                 "internlm2", "Hermes-2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_template_read_from_the_checkpoint_files(tmp_path, case):
    from megatron_mpo.conversion.chat_template import checkpoint_template

    folder, files, family, expected = CASES[case]
    hf = _write(tmp_path / folder, files)
    config = json.loads((hf / "config.json").read_text()) if "config.json" in files else {}
    name, source = checkpoint_template(hf, config, family)
    assert name == expected, source
    assert name not in folder


def test_internvl3_5_templates_are_internvl2_5(tmp_path):
    import jinja2

    from megatron_mpo.conversion.chat_template import checkpoint_template
    from megatron_mpo.data.templates import THINKING_SYSTEM_PROMPT, get_template

    # the -HF template renders what internvl2_5 does, with its default and with the R1 prompt
    jinja = jinja2.Environment().from_string(INTERNVL3_5_HF)
    user = [{"role": "user", "content": "Q"}]
    internvl2_5 = get_template("internvl2_5")
    assert jinja.render(messages=user, add_generation_prompt=True) == internvl2_5.render_prompt("Q")
    assert jinja.render(messages=[{"role": "system", "content": THINKING_SYSTEM_PROMPT}] + user,
                        add_generation_prompt=True) == internvl2_5.render_prompt("Q", "thinking")

    hf = _write(tmp_path / "InternVL3_5-8B-HF", {"chat_template.jinja": INTERNVL3_5_HF})
    assert checkpoint_template(hf, {}, "qwen3") == ("internvl2_5", "chat_template.jinja: InternVL2.5 system prompt")
    hf = _write(tmp_path / "InternVL2-1B", {"tokenizer_config.json": {"chat_template": QWEN3_THINKING}})
    assert checkpoint_template(hf, {}, "qwen3") == (
        "internvl2_5", "tokenizer_config.json: ChatML, turns end with <|im_end|>\\n")
    # original layout: config.json names the template (Qwen3's own Jinja next to it)
    config = {"architectures": ["InternVLChatModel"], "template": "internvl2_5",
              "llm_config": {"architectures": ["Qwen3ForCausalLM"]}}
    orig = _write(tmp_path / "InternVL3_5-2B", {"config.json": config,
                                                "tokenizer_config.json": {"chat_template": BARE_CHATML}})
    assert checkpoint_template(orig, config, "qwen3") == ("internvl2_5", "config.json 'template'")


def test_gpt_oss_template_is_refused_as_gpt_oss_in_one_line(tmp_path):
    from megatron_mpo.conversion.chat_template import checkpoint_template
    from megatron_mpo.data.templates import get_template

    orig = _write(tmp_path / "InternVL3_5-GPT-OSS-20B-A4B-Preview", {"chat_template.jinja": HF_INTERNVL})
    hf = _write(tmp_path / "InternVL3_5-GPT-OSS-20B-A4B-Preview-HF", {"chat_template.jinja": HARMONY})
    calls = [lambda: checkpoint_template(orig, {"template": "internvl3_5_gpt_oss"}, "gpt_oss"),
             lambda: checkpoint_template(hf, {}, "qwen3"),
             lambda: checkpoint_template(hf, {}, "qwen3", "internvl3_5_gpt_oss"),
             lambda: get_template("internvl3_5_gpt_oss")]
    for call in calls:
        with pytest.raises(UserError) as exc:
            call()
        line = str(exc.value)
        assert "GPT-OSS LLMs (InternVL3.5-20B-A4B) are not supported" in line and "\n" not in line, line
        assert "known:" not in line


def test_nothing_in_the_files_falls_back_by_llm_family(tmp_path):
    from megatron_mpo.conversion.chat_template import checkpoint_template

    hf = _write(tmp_path / "InternVL2-1B", {"tokenizer_config.json": {"model_max_length": 8}})
    assert checkpoint_template(hf, {}, "qwen2") == ("internvl2_5", "the checkpoint names none: by its qwen2 LLM")
    assert checkpoint_template(hf, {}, "internlm2")[0] == "internlm2-chat"
    # --template chooses, over anything the files say
    assert checkpoint_template(hf, {"template": "internvl2_5"}, "qwen2", "Hermes-2") == ("Hermes-2", "--template")


def test_unknown_templates_are_refused_in_one_line(tmp_path):
    from megatron_mpo.conversion.chat_template import checkpoint_template
    from megatron_mpo.models.config import InternVLConfig

    known = "known: Hermes-2, internlm2-chat, internvl2_5"
    hf = _write(tmp_path / "a", {"chat_template.jinja": PHI3})
    for args in ((hf, {"template": "phi3-chat"}, "phi3"), (hf, {}, "phi3"), (hf, {}, "qwen2", "internvl25")):
        with pytest.raises(UserError) as exc:
            checkpoint_template(*args)
        assert known in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="unknown template 'internvl25'; " + known):
        InternVLConfig.from_dict({"template": "internvl25"})  # a hand-edited model_config.json


def test_run_config_template_typo_is_one_line_before_any_model(tmp_path, capsys):
    from megatron_mpo.train import main

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"init": str(tmp_path / "none")}, "train": {"steps": 1, "device": "cpu"},
                                  "data": {"shards": str(tmp_path), "ref_logps": str(tmp_path)}}))
    line = _error_line(capsys, main, ["--config", config, "data.template=internvl25"])
    assert line == "error: data.template: unknown template 'internvl25'; known: Hermes-2, internlm2-chat, internvl2_5"


# ---- conversion, runtime and export ----------------------------------------------------


def _original_dir(native: Path, out: Path, template: str) -> Path:
    """The tiny native model rewritten in the original InternVLChatModel layout."""
    from safetensors.torch import save_file

    from megatron_mpo.conversion.original import native_to_original

    cfg = json.loads((native / "config.json").read_text())
    state, orig_cfg = native_to_original(_safetensors_dir(native), cfg, llm_family="qwen2", template=template)
    shutil.copytree(native, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (out / "config.json").write_text(json.dumps(orig_cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    return out


def _run_config(init: Path, *overrides: str):
    from megatron_mpo.config import load_config

    return load_config(None, [f"model.init={init}", f"data.shards={init}", f"data.ref_logps={init}",
                              "train.steps=1", "train.device=cpu", *overrides])


def test_conversion_stores_the_files_template_and_runtime_uses_it(tmp_path, capsys):
    from transformers import AutoTokenizer

    from megatron_mpo.conversion.convert import hf_to_megatron_dir, megatron_dir_to_hf
    from megatron_mpo.training import data_setup, model_setup

    # native layout in a folder named "hf", with the chat template file transformers writes
    _tiny_internvl(tmp_path / "hf", "qwen2", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok.chat_template = INTERNVL2_JINJA
    tok.save_pretrained(tmp_path / "tok")
    shutil.copy(tmp_path / "tok" / "chat_template.jinja", tmp_path / "hf")
    # original layout in a folder named like the Hermes-2 release, config.json says internvl2_5
    orig = _original_dir(tmp_path / "hf", tmp_path / "src" / "InternVL2-1B", "internvl2_5")

    expected = {"native": "Hermes-2", "orig": "internvl2_5"}
    for kind, source in (("native", tmp_path / "hf"), ("orig", orig)):
        hf_to_megatron_dir(source, tmp_path / kind)
        assert f"chat template {expected[kind]} (" in capsys.readouterr().out
        assert json.loads((tmp_path / kind / "model_config.json").read_text())["template"] == expected[kind]
        cfg = _run_config(tmp_path / kind)
        model_config = model_setup.model_config(cfg)
        assert data_setup.loader_data(cfg, model_config).template == expected[kind]
        assert data_setup.describe_template(cfg, model_config) == f"{expected[kind]} (from model_config.json)"
        cfg = _run_config(tmp_path / kind, "data.template=internlm2-chat")
        assert data_setup.loader_data(cfg, model_config).template == "internlm2-chat"

    # the export to the original layout writes the template back
    megatron_dir_to_hf(tmp_path / "native", tmp_path / "chat", "internvl-chat", log=lambda _: None)
    assert json.loads((tmp_path / "chat" / "config.json").read_text())["template"] == "Hermes-2"


def test_old_model_dirs_without_a_template_keep_the_old_rule():
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training import data_setup

    config = get_preset("tiny")
    assert config.template is None
    assert data_setup.model_template(config) == ("internvl2_5", "model_config.json has none: by the qwen2 LLM")
    config.name = "InternVL2-1B"
    assert data_setup.default_template(config) == "Hermes-2"


def test_converter_refuses_an_unknown_template_in_one_line(tmp_path, capsys):
    _tiny_internvl(tmp_path / "native", "qwen2", seed=1, dtype=torch.float32)
    orig = _original_dir(tmp_path / "native", tmp_path / "InternVL2-4B", "phi3-chat")
    capsys.readouterr()  # save_pretrained's progress bar
    line = _error_line(capsys, _tool_main("convert_hf_to_megatron.py"), ["--hf", orig, "--out", tmp_path / "m"])
    assert "names chat template 'phi3-chat'" in line and "known: Hermes-2, internlm2-chat, internvl2_5" in line
    assert not (tmp_path / "m").exists()

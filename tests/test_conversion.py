"""Checkpoint converters: Hugging Face InternVL <-> megatron model directories.

The reference is a tiny random ``transformers.InternVLForConditionalGeneration`` saved
with ``save_pretrained`` (plus a tiny tokenizer). The tools run as subprocesses (their
dist_checkpointing writer spawns helper processes), and the results are checked against
the source independently of the converter:

* HF -> megatron (``--tp 2 --pp 2``) -> HF native: every tensor bit-identical to the
  source file, transformers loads the directory without missing / unexpected keys and
  produces the same logits and the same ``generate()`` tokens on an image prompt;
* -> HF ``internvl-chat``: the documented original names and packing
  (``attn.qkv`` = [Q; K; V], ``mlp1.{0,1,3}``), and converting it back to megatron gives
  the very same megatron tensors;
* a second model (RMSNorm + qk-norm vision with 3 heads zero-padded for TP 2, Llama LLM,
  tied embeddings, bfloat16) survives the round trip bit-exactly in its own dtype;
* bad input stops with one line, exit code 2, and nothing at the destination.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mpo.errors import UserError
from tests.distributed import REPO, worker_env

transformers = pytest.importorskip("transformers")

IMAGE = 56  # 4x4 patches of 14 -> 4 tokens per tile after the pixel shuffle


# ---- helpers --------------------------------------------------------------------------


def _tool(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=worker_env(), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _tool_main(script: str):
    """The tool's main() imported in this process (for the error paths: no writer spawns)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{script[:-3]}", REPO / "tools" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _error_line(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _safetensors_dir(path: Path) -> dict:
    """Every tensor of a directory's safetensors files (read with safetensors itself)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


_INT = {4: torch.int32, 2: torch.int16, 8: torch.int64}


def _assert_bits_equal(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: names differ: {sorted(set(a) ^ set(b))[:6]}"
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {key} {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        assert torch.equal(x.contiguous().view(_INT[x.element_size()]), y.contiguous().view(_INT[y.element_size()])), (
            f"{what}: {key} differs"
        )


def _no_leftovers(out: Path) -> None:
    assert not out.exists(), f"{out} must not exist after a failed conversion"
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp_")]


def _tiny_internvl(out: Path, kind: str, seed: int, dtype=torch.float32):
    """A random tiny transformers InternVL + tiny tokenizer saved into ``out``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(str(out))
    tok = load_tokenizer(str(out))
    if kind == "qwen2":  # InternViT-300M style + Qwen2, untied
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      attention_bias=True, norm_type="layer_norm", use_qk_norm=False)
        text = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, rope_theta=10000.0)
        tie = False
    elif kind == "qwen3":  # InternVL3.5: InternViT-6B style + Qwen3 (per-head qk-norm, explicit head_dim)
        vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                      attention_bias=False, norm_type="rms_norm", use_qk_norm=True)
        text = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24, intermediate_size=128, rope_theta=1000000.0)
        tie = False
    elif kind == "qwen3_moe":  # InternVL3.5-30B-A3B style: Qwen3-MoE (4 experts, top 2, layer 1 dense)
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      attention_bias=True, norm_type="layer_norm", use_qk_norm=False)
        text = dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
                    num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                    rope_theta=1000000.0)
        tie = False
    elif kind == "internlm3":  # InternVL3-9B: InternViT-300M style + InternLM3 (Llama layers, head_dim)
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      attention_bias=True, norm_type="layer_norm", use_qk_norm=False)
        text = dict(model_type="internlm3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=20, intermediate_size=128,
                    rope_parameters={"rope_type": "dynamic", "factor": 6.0, "rope_theta": 50000000.0})
        tie = False
    else:  # InternViT-6B style (RMSNorm, qk-norm, no bias, 3 heads) + Llama, tied
        vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                      attention_bias=False, norm_type="rms_norm", use_qk_norm=True)
        text = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, rope_theta=500000.0)
        tie = True
    vision.update(image_size=IMAGE, patch_size=14, layer_scale_init_value=0.5)
    text.update(vocab_size=tok.vocab_size, max_position_embeddings=256, rms_norm_eps=1e-6,
                eos_token_id=tok.im_end_id, pad_token_id=tok.pad_id)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.img_context_id,
                            image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everything, so a swapped or mis-sliced tensor shows
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(noise * (0.3 if p.dim() == 1 else 0.08) + (1.0 if is_norm else 0.0))
    model = model.to(dtype)
    model.save_pretrained(out)
    return model, tok


def _image_prompt(tok) -> tuple:
    text = tok.encode("Describe the image.")
    ids = [tok.im_start_id] + text[:3] + [tok.img_start_id] + [tok.img_context_id] * 4 + [tok.img_end_id] + text[3:]
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))
    return torch.tensor([ids]), pixels


# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    model, tok = _tiny_internvl(root / "hf", "qwen2", seed=0)
    return dict(root=root, hf=root / "hf", model=model, tok=tok, tensors=_safetensors_dir(root / "hf"))


@pytest.fixture(scope="module")
def mdir(source):
    out = source["root"] / "megatron"
    _tool("convert_hf_to_megatron.py", "--hf", source["hf"], "--out", out, "--tp", 2, "--pp", 2)
    return out


# ---- round trips ----------------------------------------------------------------------


def test_megatron_dir_contents(mdir, source):
    record = json.loads((mdir / "conversion.json").read_text())
    assert (record["tensor"], record["pipeline"], record["source_format"]) == (2, 2, "native")
    assert record["source_dtype"] == "float32"
    config = json.loads((mdir / "model_config.json").read_text())
    assert config["language"]["num_layers"] == 2 and config["vision"]["num_padded_heads"] is None
    assert config["img_context_token_id"] == source["tok"].img_context_id
    assert (mdir / "tokenizer.json").read_bytes() == (source["hf"] / "tokenizer.json").read_bytes()
    assert (mdir / "metadata.json").is_file()  # a complete dist_checkpointing tree
    assert not [p.name for p in mdir.parent.iterdir() if p.name.startswith(".tmp_")]


def test_native_export_is_bit_exact_and_loads_in_transformers(mdir, source):
    from transformers import InternVLForConditionalGeneration

    out = source["root"] / "native"
    # A small shard limit: several safetensors files + index, as for a large model.
    _tool("convert_megatron_to_hf.py", "--ckpt", mdir, "--out", out, "--format", "native", "--max-shard-size", "200KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    _assert_bits_equal(_safetensors_dir(out), source["tensors"], "native export")
    config = json.loads((out / "config.json").read_text())
    original = json.loads((source["hf"] / "config.json").read_text())
    for key in ("vision_config", "text_config", "image_token_id", "image_seq_length", "downsample_ratio",
                "tie_word_embeddings", "projector_hidden_act"):
        assert config[key] == original[key], key
    assert (out / "tokenizer.json").read_bytes() == (source["hf"] / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").is_file()

    model, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, pixels = _image_prompt(source["tok"])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        ref = source["model"](input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(logits, ref)
        kwargs = dict(pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        tokens = model.generate(ids, **kwargs)
        assert tokens.shape == (1, ids.shape[1] + 4)
        assert torch.equal(tokens, source["model"].generate(ids, **kwargs))


def _expected_original_names(layers_v: int, layers_l: int) -> set:
    names = {f"vision_model.embeddings.{n}" for n in
             ("class_embedding", "position_embedding", "patch_embedding.weight", "patch_embedding.bias")}
    for i in range(layers_v):
        p = f"vision_model.encoder.layers.{i}."
        names |= {p + "ls1", p + "ls2"}
        names |= {p + f"{m}.{w}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
                  for w in ("weight", "bias")}
    names |= {f"mlp1.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")}
    names |= {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
              "language_model.lm_head.weight"}
    for i in range(layers_l):
        p = f"language_model.model.layers.{i}."
        names |= {p + f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")}
        names |= {p + "self_attn.o_proj.weight", p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return names


def test_internvl_chat_export_and_back(mdir, source):
    from megatron_mpo.training.model_dir import read_model_dir

    out = source["root"] / "chat"
    # In this process (the subprocess runs above already cover the spawn-safe entry points).
    _tool_main("convert_megatron_to_hf.py")(["--ckpt", str(mdir), "--out", str(out), "--format", "internvl-chat"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"] and config["model_type"] == "internvl_chat"
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert config["ps_version"] == "v2" and config["downsample_ratio"] == 0.5 and config["force_image_size"] == IMAGE
    tensors = _safetensors_dir(out)
    assert set(tensors) == _expected_original_names(2, 2)
    src = source["tensors"]
    v = "vision_tower.encoder.layer.1.attention."
    qkv = torch.cat([src[v + f"{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(tensors["vision_model.encoder.layers.1.attn.qkv.weight"], qkv)
    assert torch.equal(tensors["mlp1.1.weight"], src["multi_modal_projector.linear_1.weight"])
    assert torch.equal(tensors["vision_model.encoder.layers.0.ls2"], src["vision_tower.encoder.layer.0.lambda_2"])
    assert torch.equal(tensors["language_model.lm_head.weight"], src["language_model.lm_head.weight"])

    back = source["root"] / "megatron_from_chat"
    _tool_main("convert_hf_to_megatron.py")(["--hf", str(out), "--out", str(back), "--tp", "1", "--pp", "1"])
    record = json.loads((back / "conversion.json").read_text())
    assert record["source_format"] == "internvl-chat"
    config_a, state_a = read_model_dir(mdir)
    config_b, state_b = read_model_dir(back)
    # The source stated no tiling; the export writes the one a run would use (the defaults),
    # which the original layout then states.
    tiling = {"dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 6}
    assert {k: getattr(config_a, k) for k in tiling} == dict.fromkeys(tiling)
    assert {k: getattr(config_b, k) for k in tiling} == tiling
    assert config_a.to_dict() == {**config_b.to_dict(), "name": config_a.name, **dict.fromkeys(tiling)}
    _assert_bits_equal(state_a, state_b, "megatron from original layout")


def test_padded_vision_heads_tied_llama_bfloat16(tmp_path):
    """InternViT-6B-like vision (3 heads, padded to 4 for TP 2), Llama, tied, bf16 (in process)."""
    from megatron_mpo.conversion.convert import hf_to_megatron_dir, megatron_dir_to_hf

    model, tok = _tiny_internvl(tmp_path / "hf", "llama", seed=3, dtype=torch.bfloat16)
    source = _safetensors_dir(tmp_path / "hf")
    assert "language_model.lm_head.weight" not in source  # tied: save_pretrained drops it
    hf_to_megatron_dir(tmp_path / "hf", tmp_path / "m", tp=2, pp=1, log=lambda _: None)
    config = json.loads((tmp_path / "m" / "model_config.json").read_text())
    assert config["vision"]["num_heads"] == 3 and config["vision"]["num_padded_heads"] == 4
    assert config["language"]["tie_embeddings"] is True
    megatron_dir_to_hf(tmp_path / "m", tmp_path / "out", "native", log=lambda _: None)  # dtype auto: bf16
    _assert_bits_equal(_safetensors_dir(tmp_path / "out"), source, "bf16 native export")
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["vision_config"]["num_attention_heads"] == 3 and hf_config["dtype"] == "bfloat16"
    assert hf_config["vision_config"]["use_qk_norm"] is True and hf_config["vision_config"]["norm_type"] == "rms_norm"

    megatron_dir_to_hf(tmp_path / "m", tmp_path / "chat", "internvl-chat", log=lambda _: None)
    chat = _safetensors_dir(tmp_path / "chat")
    assert "vision_model.encoder.layers.0.attn.q_norm.weight" in chat
    assert "language_model.lm_head.weight" not in chat  # tied
    q = source["vision_tower.encoder.layer.0.attention.q_proj.weight"]
    assert torch.equal(chat["vision_model.encoder.layers.0.attn.qkv.weight"][: q.shape[0]], q)
    assert chat["mlp1.1.weight"].dtype == torch.bfloat16


def test_original_internlm2_source_round_trip(tmp_path):
    """An original-layout InternLM2 checkpoint (packed wqkv) -> megatron -> both layouts."""
    from safetensors.torch import save_file

    from megatron_mpo.conversion.convert import hf_to_megatron_dir, megatron_dir_to_hf
    from megatron_mpo.conversion.original import native_to_original

    model, tok = _tiny_internvl(tmp_path / "native", "llama", seed=5)
    native_sd = _safetensors_dir(tmp_path / "native")
    native_cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    orig_sd, orig_cfg = native_to_original(native_sd, native_cfg, llm_family="internlm2", template="internlm2-chat")
    src = tmp_path / "orig"
    shutil.copytree(tmp_path / "native", src, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    orig_cfg.pop("img_context_token_id")  # as on the Hub: the id comes from the tokenizer
    (src / "config.json").write_text(json.dumps(orig_cfg))
    (src / "modeling_internvl_chat.py").write_text("# remote code stand-in\n")
    save_file({k: v.contiguous() for k, v in orig_sd.items()}, str(src / "model.safetensors"))
    assert "language_model.model.layers.0.attention.wqkv.weight" in orig_sd

    quiet = dict(log=lambda _: None)
    hf_to_megatron_dir(src, tmp_path / "m", tp=2, pp=2, **quiet)
    config = json.loads((tmp_path / "m" / "model_config.json").read_text())
    assert config["language"]["family"] == "internlm2"
    assert config["img_context_token_id"] == tok.img_context_id
    megatron_dir_to_hf(tmp_path / "m", tmp_path / "chat", "internvl-chat", **quiet)
    _assert_bits_equal(_safetensors_dir(tmp_path / "chat"), orig_sd, "internlm2 chat export")
    chat_cfg = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert chat_cfg["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert chat_cfg["template"] == "internlm2-chat"
    assert (tmp_path / "chat" / "modeling_internvl_chat.py").is_file()  # carried remote code
    megatron_dir_to_hf(tmp_path / "m", tmp_path / "native_out", "native", **quiet)
    _assert_bits_equal(_safetensors_dir(tmp_path / "native_out"), native_sd, "internlm2 native export")
    assert not (tmp_path / "native_out" / "modeling_internvl_chat.py").exists()


def test_export_training_checkpoint_of_a_preset_model(tmp_path):
    """A preset-initialised model dir (no HF source: config.json built from scratch) and a
    training checkpoint ``save/step_N`` of it (config and tokenizer found via model.init)."""
    from transformers import InternVLForConditionalGeneration

    from megatron_mpo.conversion.convert import megatron_dir_to_hf
    from megatron_mpo.training.model_dir import _single_process_model, init_model_dir, read_model_dir
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer
    from megatron_mpo.training.checkpoint import CheckpointManager

    build_tiny_tokenizer(str(tmp_path / "tok"))
    init = init_model_dir("tiny", tmp_path / "tok", tmp_path / "init", seed=1)
    config, state = read_model_dir(init)
    model = _single_process_model(config)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():  # "training" changed a weight
        model.vision_projection.encoder.linear_fc1.weight.add_(1.0)
    step = CheckpointManager(tmp_path / "save").save(
        3, [model], None, common={"config": {"model": {"init": str(init)}}}, per_rank={})

    megatron_dir_to_hf(step, tmp_path / "out", "native", log=lambda _: None)
    hf, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    trained = state["vision_projection.encoder.linear_fc1.weight"] + 1.0
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight.detach(), trained)
    assert hf.config.image_token_id == config.img_context_token_id
    assert hf.config.text_config.num_hidden_layers == config.language.num_layers
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|> of the tiny tokenizer (eos too)


def test_native_config_from_presets():
    """Configs written without a source config.json (a preset-initialised model)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_mpo.conversion.hf_config import to_native_hf_config
    from megatron_mpo.conversion.native import hf_to_megatron, megatron_to_hf
    from megatron_mpo.models.presets import get_preset

    for name in ("InternVL2-1B", "InternVL2-8B", "InternVL2-26B", "InternVL2-76B"):
        config = get_preset(name)
        hf = InternVLConfig.from_dict(to_native_hf_config(config))
        assert hf.vision_config.num_attention_heads == config.vision.num_heads  # 25, not the padded 32
        assert hf.vision_config.use_qk_norm == config.vision.qk_norm
        assert hf.text_config.model_type == ("qwen2" if name == "InternVL2-1B" else "llama")
        assert hf.text_config.num_key_value_heads == config.language.num_kv_heads
        assert hf.image_token_id == config.img_context_token_id and hf.image_seq_length == 256
    config = get_preset("tiny")
    model = InternVLForConditionalGeneration(InternVLConfig.from_dict(to_native_hf_config(config)))
    sd = model.state_dict()
    back = megatron_to_hf(hf_to_megatron(sd, config), config, layout="module")
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ---- readers --------------------------------------------------------------------------


def test_reads_sharded_and_pytorch_bin(source, tmp_path):
    from megatron_mpo.conversion import hf_io

    tensors = source["tensors"]
    for kind in ("safetensors", "bin", "bin-sharded"):
        d = tmp_path / kind
        d.mkdir()
        shutil.copy(source["hf"] / "config.json", d)
        if kind == "safetensors":
            files = hf_io.write_safetensors(tensors, d, "100KB", log=lambda _: None)
            assert len(files) > 2 and (d / "model.safetensors.index.json").is_file()
        elif kind == "bin":
            torch.save(tensors, d / "pytorch_model.bin")
        else:
            keys = sorted(tensors)
            half = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
            for name, part in half.items():
                torch.save({k: tensors[k] for k in part}, d / name)
            index = {"weight_map": {k: n for n, part in half.items() for k in part}}
            (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        hf = hf_io.inspect_hf_dir(d)
        assert hf.layout == "native"
        _assert_bits_equal(hf_io.load_hf_weights(hf, log=lambda _: None), tensors, kind)
    files[1].unlink()
    with pytest.raises(UserError, match=f"lacks weight shard {files[1].name}"):
        hf_io.inspect_hf_dir(tmp_path / "safetensors")


def test_layout_detection():
    from megatron_mpo.conversion.hf_io import detect_layout

    assert detect_layout({"architectures": ["InternVLForConditionalGeneration"]}) == "native"
    assert detect_layout({"model_type": "internvl"}) == "native"
    assert detect_layout({"architectures": ["InternVLChatModel"], "model_type": "internvl_chat"}) == "internvl-chat"
    with pytest.raises(UserError, match="is a Qwen2VLForConditionalGeneration checkpoint, not InternVL"):
        detect_layout({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"})


# ---- errors ---------------------------------------------------------------------------


def test_non_internvl_checkpoint_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    proc = _tool("convert_hf_to_megatron.py", "--hf", tmp_path / "llama", "--out", out, "--tp", 1, "--pp", 1,
                 check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a LlamaForCausalLM checkpoint, not InternVL" in lines[0], proc.stderr
    _no_leftovers(out)


def test_bad_tp_missing_weights_and_busy_destinations(source, mdir, tmp_path, capsys):
    to_megatron = _tool_main("convert_hf_to_megatron.py")
    to_hf = _tool_main("convert_megatron_to_hf.py")
    out = tmp_path / "out"

    line = _error_line(capsys, to_megatron, ["--hf", source["hf"], "--out", out, "--tp", 3, "--pp", 1])
    assert "parallel.tensor=3 does not fit the model" in line and "tensor sizes that fit: " in line
    _no_leftovers(out)
    line = _error_line(capsys, to_megatron, ["--hf", source["hf"], "--out", out, "--tp", 1, "--pp", 4])
    assert "pipeline size 4 exceeds" in line
    _no_leftovers(out)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(source["hf"], no_weights)
    (no_weights / "model.safetensors").unlink()
    line = _error_line(capsys, to_megatron, ["--hf", no_weights, "--out", out])
    assert "has no weights" in line
    _no_leftovers(out)
    line = _error_line(capsys, to_megatron, ["--hf", tmp_path / "nowhere", "--out", out])
    assert "does not exist" in line

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "is not empty" in _error_line(capsys, to_megatron, ["--hf", source["hf"], "--out", busy])
    assert "is not empty" in _error_line(capsys, to_hf, ["--ckpt", mdir, "--out", busy])
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert "not a megatron_mpo model" in _error_line(capsys, to_hf, ["--ckpt", source["hf"], "--out", out])
    _no_leftovers(out)


def test_failed_write_leaves_nothing(source, monkeypatch, tmp_path):
    from megatron_mpo.conversion import hf_io

    real = hf_io.write_safetensors

    def boom(state, directory, *args, **kwargs):
        real(state, directory, *args, **kwargs)  # files written, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(hf_io, "write_safetensors", boom)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        hf_io.write_hf_dir(out, {"model_type": "internvl"}, source["tensors"], log=lambda _: None)
    _no_leftovers(out)
    out.mkdir()  # an existing empty destination survives a failure too
    with pytest.raises(OSError):
        hf_io.write_hf_dir(out, {"model_type": "internvl"}, source["tensors"], log=lambda _: None)
    assert out.is_dir() and not list(out.iterdir())


@pytest.mark.parametrize("family", ["qwen3", "internlm3", "qwen3_moe"])
def test_new_families_convert_from_both_layouts_at_tp2_pp2(tmp_path, family):
    """Qwen3 (InternVL3.5), Qwen3-MoE (InternVL3.5-30B-A3B) and InternLM3 (InternVL3-9B): a native ``-hf`` directory and its
    original-layout twin each convert at TP2/PP2; every export is bit-exact to the source of
    that layout, and transformers reproduces the source logits from the native export."""
    from safetensors.torch import save_file
    from transformers import InternVLForConditionalGeneration

    from megatron_mpo.conversion.convert import hf_to_megatron_dir, megatron_dir_to_hf
    from megatron_mpo.training.model_dir import read_model_dir
    from megatron_mpo.conversion.original import native_to_original

    model, tok = _tiny_internvl(tmp_path / "native", family, seed=11)
    native_sd = _safetensors_dir(tmp_path / "native")
    native_cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    orig_sd, orig_cfg = native_to_original(native_sd, native_cfg, template="internvl2_5")
    src = tmp_path / "orig"
    shutil.copytree(tmp_path / "native", src, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (src / "config.json").write_text(json.dumps(orig_cfg))
    save_file({k: v.contiguous() for k, v in orig_sd.items()}, str(src / "model.safetensors"))

    quiet = dict(log=lambda _: None)
    hf_to_megatron_dir(tmp_path / "native", tmp_path / "m_native", tp=2, pp=2, **quiet)
    hf_to_megatron_dir(src, tmp_path / "m_orig", tp=2, pp=2, **quiet)
    config_a, state_a = read_model_dir(tmp_path / "m_native")
    config_b, state_b = read_model_dir(tmp_path / "m_orig")
    lang = config_a.language
    assert (lang.family, lang.qk_norm, lang.head_dim, lang.tie_embeddings) == (
        family, family != "internlm3", 20 if family == "internlm3" else 24, False)
    assert lang.num_experts == (4 if family == "qwen3_moe" else 0)
    assert config_b.language == lang
    _assert_bits_equal(state_a, state_b, f"{family}: megatron from the two layouts")

    megatron_dir_to_hf(tmp_path / "m_orig", tmp_path / "native_out", "native", **quiet)
    _assert_bits_equal(_safetensors_dir(tmp_path / "native_out"), native_sd, f"{family} native export")
    megatron_dir_to_hf(tmp_path / "m_native", tmp_path / "chat", "internvl-chat", **quiet)
    _assert_bits_equal(_safetensors_dir(tmp_path / "chat"), orig_sd, f"{family} internvl-chat export")
    chat_cfg = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert chat_cfg["llm_config"]["architectures"] == [{"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                                                        "internlm3": "InternLM3ForCausalLM"}[family]]

    exported = InternVLForConditionalGeneration.from_pretrained(tmp_path / "native_out").eval()
    ids, pixels = _image_prompt(tok)
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids, pixel_values=pixels).logits,
                           model(input_ids=ids, pixel_values=pixels).logits)

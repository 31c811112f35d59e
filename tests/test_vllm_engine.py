"""The vLLM engine without vLLM: every request it would hand vLLM (prompt text, images,
tile budgets, sampling parameters, per-prompt seeds, engine arguments, GPUs), the
conversion of vLLM's outputs, and the one-line error where vLLM is missing.

Where the expected value is what vLLM would make of a request, it is computed here
independently: vLLM's InternVL tiling rule (vllm/model_executor/models/internvl.py,
re-stated below), transformers' GotOcr2 image processor (what vLLM's InternS1 model runs
for the native layout) and the model directory's HF tokenizer (what vLLM tokenizes with);
the result must be the training prompt's ids and pixels.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mpo import platform
from megatron_mpo.errors import UserError
from megatron_mpo.generation.engines import vllm_engine as ve
from megatron_mpo.generation.engines.base import Completion, SamplingSettings

TOKENS_PER_TILE = 4
TILE = 56
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MISSING_LINE = "the vllm engine needs vLLM on a CUDA machine: pip install vllm; use --engine transformers on CPU"


# ---- fixtures -----------------------------------------------------------------------------------


def png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    """A noisy image (every pixel differs, so a wrong crop or resize shows)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if mode == "RGBA":
        data[..., 3] = 0  # fully transparent: the colour is still there, only alpha says "none"
    img = Image.fromarray(data[..., 0] if mode == "L" else data, mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(str(out))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from megatron_mpo.data import load_tokenizer

    return load_tokenizer(str(tok_dir))


@pytest.fixture(scope="module")
def builder(tok):
    from megatron_mpo.data import DataConfig
    from megatron_mpo.data.samples import build_pair_builder

    config = DataConfig(shards="x", max_length=512, max_tiles=6, template="internvl2_5")
    return build_pair_builder(config, tok, image_size=TILE, tokens_per_tile=TOKENS_PER_TILE)


@pytest.fixture(scope="module")
def prompts(builder):
    """Two images (a 2x1 grid + thumbnail, a 1x3 grid + thumbnail at 3 tiles each), one
    RGBA image, a text-only question and a Dropout-NTP continuation."""
    from megatron_mpo.generation.prompts import build_prompt

    return {
        "two": build_prompt(builder, "set/a", "Compare <image> with <image>.", [png(112, 56, seed=1),
                                                                                 png(30, 90, seed=2)]),
        "rgba": build_prompt(builder, "set/b", "What colour?", [png(70, 50, "RGBA", seed=3)]),
        "text": build_prompt(builder, "set/c", "What is 2 + 3?", []),
        "prefix": build_prompt(builder, "set/d", "Count the dots.", [png(56, 56, seed=4)],
                               prefix="Step 1: there are"),
    }


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    """The tokenizer vLLM loads from the model directory (transformers' AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


# ---- vLLM's InternVL rule, re-stated from vllm/model_executor/models/internvl.py ---------------


def vllm_internvl_tiles(image: Image.Image, min_num: int, max_num: int, size: int, thumbnail: bool):
    """dynamic_preprocess_internvl: target ratios from a set filled n -> i -> j and sorted by
    tile count; the closest aspect ratio (a tie goes to the later grid when the image covers
    more than half of it); image.resize with PIL's default filter, row-major crops, then a
    thumbnail when there is more than one tile."""
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    width, height = image.size
    aspect, best_diff, best = width / height, float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    resized = image.resize((size * best[0], size * best[1]))
    tiles = [resized.crop(((k % best[0]) * size, (k // best[0]) * size, (k % best[0] + 1) * size,
                           (k // best[0] + 1) * size)) for k in range(best[0] * best[1])]
    if thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


def normalized(tiles) -> torch.Tensor:
    """ToTensor + Normalize(ImageNet) of RGB tiles."""
    arr = np.stack([np.asarray(t, dtype=np.float32) / 255.0 for t in tiles])  # [N, H, W, 3]
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def expand(text: str, placeholder: str, tiles: list[int]) -> str:
    parts = text.split(placeholder)
    assert len(parts) == len(tiles) + 1
    return parts[0] + "".join("<img>" + "<IMG_CONTEXT>" * (n * TOKENS_PER_TILE) + "</img>" + part
                              for n, part in zip(tiles, parts[1:]))


# ---- requests -----------------------------------------------------------------------------------


def test_original_layout_request_is_the_training_prompt(prompts, hf_tokenizer):
    p = prompts["two"]
    req = ve.request(p, ve.ORIGINAL)
    assert set(req) == {"prompt", "multi_modal_data", "mm_processor_kwargs"}
    assert req["prompt"] == p.text and req["prompt"].count("<image>") == 2
    assert "Compare <image> with <image>." in req["prompt"]
    assert req["prompt"].endswith("<|im_start|>assistant\n")
    images = req["multi_modal_data"]["image"]
    assert [im.size for im in images] == [(112, 56), (30, 90)] and all(im.mode == "RGB" for im in images)
    # 6 tiles for 2 images: 3 per image, as training (InternVL: max(1, max_tiles // images)).
    assert req["mm_processor_kwargs"] == {"max_dynamic_patch": 3, "min_dynamic_patch": 1, "dynamic_image_size": True}

    kw = req["mm_processor_kwargs"]
    tiles = [vllm_internvl_tiles(im, kw["min_dynamic_patch"], kw["max_dynamic_patch"], TILE, True) for im in images]
    assert [len(t) for t in tiles] == [3, 4]  # 2x1 + thumbnail, 1x3 + thumbnail
    ids = hf_tokenizer(expand(req["prompt"], "<image>", [len(t) for t in tiles]))["input_ids"]
    assert ids == p.ids
    pixels = normalized([tile for per_image in tiles for tile in per_image])
    assert pixels.shape == p.pixel_values.shape == (7, 3, TILE, TILE)
    torch.testing.assert_close(pixels, p.pixel_values, atol=1e-5, rtol=0)


def test_images_are_handed_over_in_rgb_as_training_decodes_them(prompts):
    """vLLM turns RGBA into RGB on a white background; training drops alpha (PIL convert).
    The engine hands vLLM RGB already, so the transparent pixels keep their colour."""
    p = prompts["rgba"]
    (image,) = ve.request(p, ve.ORIGINAL)["multi_modal_data"]["image"]
    raw = np.asarray(Image.open(io.BytesIO(p.images[0])))
    assert raw.shape == (50, 70, 4) and (raw[..., 3] == 0).all()
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), raw[..., :3])
    kw = ve.request(p, ve.ORIGINAL)["mm_processor_kwargs"]
    tiles = vllm_internvl_tiles(image, 1, kw["max_dynamic_patch"], TILE, True)
    assert kw["max_dynamic_patch"] == 6 and len(tiles) == p.num_tiles == 7  # 1 image: the whole budget; 3x2 + thumb
    torch.testing.assert_close(normalized(tiles), p.pixel_values, atol=1e-5, rtol=0)


def _got_ocr2_processor():
    import transformers

    from megatron_mpo.conversion.processor import image_processor_config
    from megatron_mpo.data.tile_settings import Tiling

    cls = getattr(transformers, "GotOcr2ImageProcessorPil", None) or transformers.GotOcr2ImageProcessor
    config = {k: v for k, v in image_processor_config(TILE, Tiling(max_tiles=12)).items()
              if k not in ("image_processor_type", "processor_class")}
    return cls(**config)


def test_native_layout_request_is_the_training_prompt(prompts, hf_tokenizer):
    """transformers' InternVLProcessor (what vLLM runs for InternVLForConditionalGeneration)
    expands each <IMG_CONTEXT> into <img> + <IMG_CONTEXT> x patches x image_seq_length +
    </img>, the patches cut by GotOcr2 with the request's kwargs."""
    p = prompts["two"]
    req = ve.request(p, ve.NATIVE)
    assert req["prompt"] == p.text.replace("<image>", "<IMG_CONTEXT>")
    assert req["prompt"].count("<IMG_CONTEXT>") == 2 and "<image>" not in req["prompt"]
    assert req["mm_processor_kwargs"] == {"max_patches": 3, "min_patches": 1, "crop_to_patches": True}
    images = req["multi_modal_data"]["image"]
    out = _got_ocr2_processor()(images, return_tensors="pt", **req["mm_processor_kwargs"])
    patches = out["num_patches"].tolist()
    assert patches == [3, 4]
    ids = hf_tokenizer(expand(req["prompt"], "<IMG_CONTEXT>", patches))["input_ids"]
    assert ids == p.ids


def test_text_only_and_prefixed_requests(prompts, hf_tokenizer):
    text = prompts["text"]
    for layout in (ve.NATIVE, ve.ORIGINAL):
        assert ve.request(text, layout) == {"prompt": text.text}
    assert hf_tokenizer(text.text)["input_ids"] == text.ids
    p = prompts["prefix"]
    req = ve.request(p, ve.NATIVE, min_tiles=1)
    assert req["prompt"].endswith("<|im_start|>assistant\nStep 1: there are")
    assert req["mm_processor_kwargs"]["max_patches"] == 6
    ids = hf_tokenizer(expand(req["prompt"], "<IMG_CONTEXT>", [1]))["input_ids"]  # 56x56: one tile, no thumbnail
    assert ids == p.ids


def test_request_refuses_placeholders_that_do_not_match_the_images(prompts):
    import dataclasses

    p = prompts["two"]
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        ve.request(dataclasses.replace(p, images=p.images[:1]), ve.ORIGINAL)
    with pytest.raises(ValueError, match="literal <IMG_CONTEXT>"):
        ve.request(dataclasses.replace(p, text=p.text + "<IMG_CONTEXT>"), ve.NATIVE)
    with pytest.raises(ValueError, match="unknown layout"):
        ve.request(p, "chat")


# ---- sampling parameters ------------------------------------------------------------------------


def test_sampling_params():
    settings = SamplingSettings(n=8, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=300, seed=5)
    assert ve.sampling_params(settings, 1234, [2, 2, 7], banned_token_ids=[5, 3, 3]) == {
        "n": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_tokens": 300, "seed": 1234,
        "stop_token_ids": [2, 7], "skip_special_tokens": False, "spaces_between_special_tokens": False,
        "logit_bias": {3: -100.0, 5: -100.0},
    }
    off = ve.sampling_params(SamplingSettings(top_k=0), 9, [2])
    assert off["top_k"] == -1 and off["n"] == 8 and off["temperature"] == 1.0 and "logit_bias" not in off


def test_greedy_sampling_params():
    greedy = SamplingSettings(n=1, temperature=0.0, top_k=50, top_p=0.5, max_new_tokens=16)
    assert ve.sampling_params(greedy, 77, [2]) == {
        "n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 16, "seed": None,
        "stop_token_ids": [2], "skip_special_tokens": False, "spaces_between_special_tokens": False,
    }


# ---- engine arguments, layout, devices ----------------------------------------------------------


def test_engine_args():
    assert ve.engine_args("/m", 2, 4096, 3, 11, "bfloat16", 0.8) == {
        "model": "/m", "tokenizer": "/m", "trust_remote_code": True, "tensor_parallel_size": 2, "dtype": "bfloat16",
        "seed": 11, "gpu_memory_utilization": 0.8, "max_model_len": 4096,
        "limit_mm_per_prompt": {"image": 3, "video": 0}, "generation_config": "vllm",
    }
    chat = ve.engine_args("/m", layout=ve.ORIGINAL, enforce_eager=True)
    assert chat["limit_mm_per_prompt"] == {"image": 4} and chat["enforce_eager"] is True
    assert "max_model_len" not in chat and chat["tensor_parallel_size"] == 1 and chat["dtype"] == "auto"
    for bad, match in (({"tensor_parallel_size": 0}, "tensor parallel size"), ({"dtype": "fp8"}, "dtype"),
                       ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"), ({"max_images": -1}, "max_images")):
        with pytest.raises(UserError, match=match):
            ve.engine_args("/m", **bad)


def test_model_layout(tmp_path):
    for arch, layout in (("InternVLForConditionalGeneration", "native"), ("InternVLChatModel", "internvl-chat")):
        d = tmp_path / arch
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": [arch]}))
        assert ve.model_layout(d) == layout
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="LlamaForCausalLM checkpoint, not InternVL"):
        ve.model_layout(tmp_path / "llama")
    with pytest.raises(UserError, match="cannot read"):
        ve.model_layout(tmp_path / "missing")


@pytest.mark.parametrize("rank,tp,gpus,available,want", [
    (0, 1, 8, None, "0"),
    (5, 1, 8, None, "5"),
    (3, 2, 8, None, "6,7"),
    (1, 4, 8, None, "4,5,6,7"),
    (0, 8, 8, None, "0,1,2,3,4,5,6,7"),
    (1, 2, 4, "2,3,5,7", "5,7"),
    (0, 1, 2, " 4, 6 ", "4"),
])
def test_visible_devices(rank, tp, gpus, available, want):
    assert ve.visible_devices(rank, tp, gpus, available) == want


@pytest.mark.parametrize("rank,tp,gpus,available,message", [
    (0, 3, 8, None, "tensor parallel size 3 does not divide this node's 8 GPUs"),
    (4, 2, 8, None, "local rank 4 has no GPUs: 8 GPUs at tensor parallel size 2 hold 4 engine(s); start torchrun "
                    "with --nproc-per-node 4"),
    (0, 0, 8, None, "tensor parallel size must be >= 1"),
    (0, 1, 0, None, "needs a CUDA GPU"),
    (0, 2, 4, "0,1", "names 2 GPUs, fewer than 4"),
])
def test_visible_devices_refuses_what_does_not_fit(rank, tp, gpus, available, message):
    with pytest.raises(UserError) as err:
        ve.visible_devices(rank, tp, gpus, available)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_restrict_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    platform.restrict_gpus("2,3")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    platform.restrict_gpus("2,3")  # unchanged: fine
    with pytest.raises(UserError, match="CUDA is already in use in this process"):
        platform.restrict_gpus("0")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "2,3"


# ---- outputs ------------------------------------------------------------------------------------


def _out(*samples):
    return types.SimpleNamespace(outputs=[types.SimpleNamespace(index=i, text=t, token_ids=ids, finish_reason=r)
                                          for i, (t, ids, r) in samples])


def test_completions_from_request_outputs():
    outputs = [
        _out((1, ("cut short", [9, 9, 9, 9], "length")), (0, ("ab", [5, 6, 2], "stop"))),
        _out((0, ("", [7], "stop"))),  # the end-of-sequence token alone
        _out((0, ("x<img>", (8, 3), "length"))),  # a tuple of ids; special tokens spelled out
    ]
    assert ve.completions(outputs, [2, 7]) == [
        [Completion("ab", 2, True), Completion("cut short", 4, False)],
        [Completion("", 0, True)],
        [Completion("x<img>", 2, False)],
    ]
    assert ve.completions([], [2]) == []


# ---- the engine, over a stand-in vllm module ----------------------------------------------------


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        FakeLLM.instances.append(self)

    def generate(self, inputs, params, use_tqdm=True):
        self.calls.append((inputs, params, use_tqdm))
        return [_out(*[(i, (f"answer {k}.{i}", [10 + i, 2], "stop")) for i in range(p.kwargs["n"])])
                for k, p in enumerate(params)]


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path, tok_dir):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.__version__ = "0.0.test"
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    FakeLLM.instances.clear()
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["InternVLForConditionalGeneration"],
                                                   "text_config": {"vocab_size": 404}}))
    return model


def _seed(run_seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def test_engine_submits_every_prompt_in_one_call_with_its_own_seed(fake_vllm, tok, prompts):
    engine = ve.VLLMEngine(str(fake_vllm), tok, tensor_parallel_size=2, gpus_per_node=4, max_model_len=1024,
                           dtype="float32", enforce_eager=True)
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # local rank 1 of 2 engines
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {
        "model": str(fake_vllm), "tokenizer": str(fake_vllm), "trust_remote_code": True, "tensor_parallel_size": 2,
        "dtype": "float32", "seed": 0, "gpu_memory_utilization": 0.9, "max_model_len": 1024,
        "limit_mm_per_prompt": {"image": 4, "video": 0}, "generation_config": "vllm", "enforce_eager": True,
    }
    assert engine.describe() == {"engine": "vllm", "vllm": "0.0.test", "layout": "native", "tensor_parallel_size": 2,
                                 "dtype": "float32"}
    assert engine.devices == "2,3"
    batch = [prompts["two"], prompts["text"], prompts["rgba"]]
    settings = SamplingSettings(n=3, temperature=1.0, top_k=40, top_p=0.95, max_new_tokens=64, seed=17)
    got = engine.generate(batch, settings)
    (inputs, params, use_tqdm) = llm.calls[0]
    assert len(llm.calls) == 1 and use_tqdm is False
    assert [i["prompt"] for i in inputs] == [p.text.replace("<image>", "<IMG_CONTEXT>") for p in batch]
    assert [len(i.get("multi_modal_data", {}).get("image", [])) for i in inputs] == [2, 0, 1]
    assert [p.kwargs["seed"] for p in params] == [_seed(17, "set/a"), _seed(17, "set/c"), _seed(17, "set/b")]
    assert len({p.kwargs["seed"] for p in params}) == 3
    banned = {3, 4, 5, 400, 401, 402, 403}  # <img>, </img>, <IMG_CONTEXT> and the padded rows 400..403
    for p in params:
        assert p.kwargs["stop_token_ids"] == [2] and set(p.kwargs["logit_bias"]) == banned
        assert (p.kwargs["n"], p.kwargs["top_k"], p.kwargs["top_p"], p.kwargs["max_tokens"]) == (3, 40, 0.95, 64)
    assert got == [[Completion(f"answer {k}.{i}", 1, True) for i in range(3)] for k in range(3)]
    # A question's seed does not depend on its batch.
    engine.generate([prompts["rgba"]], settings)
    assert llm.calls[1][1][0].kwargs["seed"] == _seed(17, "set/b")


def test_engine_refuses_more_images_than_it_was_started_for(fake_vllm, tok, prompts):
    engine = ve.VLLMEngine(str(fake_vllm), tok, gpus_per_node=2, max_images=1)
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "1"
    with pytest.raises(UserError, match="question set/a has 2 images; the vllm engine takes at most 1"):
        engine.generate([prompts["two"]], SamplingSettings())
    assert engine.generate([], SamplingSettings()) == []


# ---- without vLLM -------------------------------------------------------------------------------


def test_module_imports_without_vllm(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "vllm", None)  # any `import vllm` now fails
    reloaded = importlib.reload(ve)
    assert reloaded.MISSING_VLLM == MISSING_LINE


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_one_line(tmp_path, tok):
    from megatron_mpo.generation.engines import make_engine

    with pytest.raises(UserError) as err:
        make_engine("vllm", str(tmp_path), tok, tensor_parallel_size=1, max_model_len=512)
    assert str(err.value) == MISSING_LINE

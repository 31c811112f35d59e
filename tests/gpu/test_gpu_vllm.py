"""The vllm generation engine on a GPU, against the transformers engine (the GPU kit's
``vllm`` part; skipped with one line where vLLM is not installed).

A tiny random InternVL (``tools/init_checkpoint.py --preset tiny``) is exported to a
transformers-native HF directory in float32; both engines decode greedily in float32
(TF32 off: ``NVIDIA_TF32_OVERRIDE=0``) and must agree:

* vLLM's prompt tokens equal the training prompt's ids (placeholder, tile budget, image
  tokens, tokenization), for every prompt, a thumbnail-tiled image included;
* the answers (prompt without images, one image, two images; tiles that need no resize,
  so both engines see the same pixels) agree token for token. Tolerance: a difference is
  accepted only where the two engines' tokens are a near tie in vLLM's own log-probs
  (within 1e-3): a random tiny model's logits are close together, and the two stacks'
  float32 kernels differ in the last bits;
* sampling (n=8, T 1, top-k 50) is reproducible from the per-prompt seeds, differs
  between prompts, never yields an image token, and its samples/s and tokens/s are
  printed (one line starting ``vllm:``).

Run alone with ``python -m pytest -q -s -m gpu tests/gpu/test_gpu_vllm.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.gpu.conftest import DEVICE, run_python

pytestmark = pytest.mark.gpu

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (carry its wheels to check the vllm "
                                                         "engine)")
requires_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="vLLM needs CUDA (no CPU dry run)")

TILE, TOKENS_PER_TILE = 56, 4  # the tiny preset
MAX_NEW = 24
NEAR_TIE = 1e-3  # |log p(vLLM's token) - log p(transformers' token)| where the engines differ
SAMPLING_PROMPTS = 16


def _png(width: int, height: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data, "RGB").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """tok/, init/ (the tiny preset, seed 1) and hf/ (native layout, float32)."""
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    ws = tmp_path_factory.mktemp("vllm_ws")
    build_tiny_tokenizer(str(ws / "tok"))
    run_python("tools/init_checkpoint.py", "--preset", "tiny", "--tokenizer", str(ws / "tok"), "--out",
               str(ws / "init"), "--seed", "1", log=ws / "logs" / "init_checkpoint.log", timeout=120)
    run_python("tools/convert_megatron_to_hf.py", "--ckpt", str(ws / "init"), "--out", str(ws / "hf"), "--format",
               "native", "--dtype", "float32", log=ws / "logs" / "export.log", timeout=120)
    return ws / "hf"


def _prompts(hf: Path):
    from megatron_mpo.data import DataConfig, load_tokenizer
    from megatron_mpo.data.samples import build_pair_builder
    from megatron_mpo.generation.prompts import build_prompt

    tok = load_tokenizer(str(hf))
    config = DataConfig(shards="x", max_length=1024, max_tiles=6, template="internvl2_5")
    builder = build_pair_builder(config, tok, image_size=TILE, tokens_per_tile=TOKENS_PER_TILE)
    compared = [
        build_prompt(builder, "q/text", "Name three prime numbers.", []),
        build_prompt(builder, "q/one", "What is in the picture?", [_png(56, 56, 1)]),
        build_prompt(builder, "q/two", "Compare <image> and <image>.", [_png(56, 56, 2), _png(56, 56, 3)]),
    ]
    # 2x1 tiles + a thumbnail: vLLM's transformers processor resizes with torch, training with
    # PIL, so only its prompt tokens are compared.
    thumbnail = build_prompt(builder, "q/wide", "Describe <image>.", [_png(112, 56, 4)])
    assert thumbnail.num_tiles == 3 and [p.num_tiles for p in compared] == [0, 1, 2]
    return tok, compared, thumbnail


def _upto_stop(ids, stops) -> list[int]:
    ids = [int(i) for i in ids]
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    return ids if end is None else ids[:end + 1]


@requires_vllm
@requires_cuda
@pytest.mark.gpu_timeout(280)  # vLLM's start (model load, memory profiling) dominates
def test_vllm_greedy_matches_transformers_and_sampling_is_reproducible(tiny_hf, monkeypatch, full_fp32):
    from vllm import SamplingParams

    from megatron_mpo.generation.engines import SamplingSettings
    from megatron_mpo.generation.engines.transformers_engine import TransformersEngine
    from megatron_mpo.generation.engines.vllm_engine import VLLMEngine, completions, sampling_params

    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # vLLM's processes inherit it; full_fp32 for this one
    tok, compared, thumbnail = _prompts(tiny_hf)
    everything = compared + [thumbnail]

    # vLLM first: it chooses its GPU before anything in this process uses CUDA.
    start = time.perf_counter()
    engine = VLLMEngine(str(tiny_hf), tok, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.4,
                        enforce_eager=True)
    startup_s = time.perf_counter() - start
    stops = set(engine.stop_ids)
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=MAX_NEW)
    inputs, _ = engine.requests(everything, greedy)
    params = [SamplingParams(**sampling_params(greedy, 0, engine.stop_ids, engine.banned), logprobs=5)
              for _ in everything]
    raw = engine.llm.generate(inputs, params, use_tqdm=False)
    for p, out in zip(everything, raw):
        assert list(out.prompt_token_ids) == p.ids, f"{p.key}: vLLM's prompt tokens differ from training's"
    public = engine.generate(compared, greedy)
    assert public == completions(raw[:len(compared)], engine.stop_ids)

    reference = TransformersEngine(str(tiny_hf), tok, device="cuda", dtype="float32")
    hf_completions = reference.generate(compared, greedy)
    report = {"startup_s": round(startup_s, 1), "greedy": []}
    for p, out, mine, theirs in zip(compared, raw, public, hf_completions):
        inputs_hf = reference._inputs([p], 1)
        with torch.no_grad():
            gen = reference.model.generate(**inputs_hf, do_sample=False, max_new_tokens=MAX_NEW,
                                           eos_token_id=reference.stop_ids, pad_token_id=reference.pad_id,
                                           suppress_tokens=reference.suppress or None)
        hf_ids = _upto_stop(gen[0, inputs_hf["input_ids"].shape[1]:].tolist(), stops)
        v_ids = _upto_stop(out.outputs[0].token_ids, stops)
        d = next((i for i, (a, b) in enumerate(zip(v_ids, hf_ids)) if a != b), None)
        entry = {"key": p.key, "vllm_tokens": len(v_ids), "transformers_tokens": len(hf_ids), "first_difference": d}
        if d is None:
            assert v_ids == hf_ids, entry  # one stopped earlier without a differing token: a real difference
            assert mine == theirs, (p.key, mine, theirs)
        else:
            lps = out.outputs[0].logprobs[d]
            assert hf_ids[d] in lps, f"{p.key}: at token {d} transformers' token is not in vLLM's top 5: {entry}"
            gap = abs(lps[v_ids[d]].logprob - lps[hf_ids[d]].logprob)
            entry["gap"] = gap
            assert gap < NEAR_TIE, f"{p.key}: engines differ at token {d} by {gap:.2e} in log-prob: {entry}"
        report["greedy"].append(entry)

    # Sampling: n=8 from the per-prompt seeds, run twice (the first run also warms up).
    batch = [dataclasses.replace(compared[i % len(compared)], key=f"s/{i}") for i in range(SAMPLING_PROMPTS)]
    sampling = SamplingSettings(n=8, temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=64, seed=3)
    first = engine.generate_raw(batch, sampling)
    start = time.perf_counter()
    second = engine.generate_raw(batch, sampling)
    took = time.perf_counter() - start
    ids_1 = [[list(s.token_ids) for s in o.outputs] for o in first]
    ids_2 = [[list(s.token_ids) for s in o.outputs] for o in second]
    assert ids_1 == ids_2, "sampling with the same per-prompt seeds is not reproducible"
    assert all(len(samples) == 8 and len({tuple(s) for s in samples}) > 1 for samples in ids_1)
    assert ids_1[0] != ids_1[len(compared)], "two keys with the same prompt drew the same samples"
    banned = set(engine.banned)
    assert not any(t in banned for samples in ids_1 for s in samples for t in s), "an image token was sampled"
    tokens = sum(len(s) for samples in ids_2 for s in samples)
    report["sampling"] = {"prompts": SAMPLING_PROMPTS, "n": 8, "seconds": round(took, 3),
                          "samples_per_s": round(SAMPLING_PROMPTS * 8 / took, 1),
                          "tokens_per_s": round(tokens / took, 1)}
    report["engine"] = engine.describe()
    print("vllm:", json.dumps(report), flush=True)
    del engine

"""vLLM's offline ``LLM`` API behind the engine interface (CUDA machines, tensor parallel
inside a node).

**Unverified until the GPU kit has run it**: vLLM needs CUDA, so this module has only been
checked without vLLM -- every request it would hand vLLM is built by the pure functions
below and unit-tested (tests/test_vllm_engine.py), and ``tests/gpu/test_gpu_vllm.py``
(the GPU kit's ``vllm`` part) compares its greedy answers with the transformers engine's
once a machine with vLLM runs it. vLLM is imported inside :class:`VLLMEngine` only.

What vLLM receives (read from vLLM's sources, ``vllm/model_executor/models/internvl.py``
and ``interns1.py``; the layout comes from ``config.json``'s ``architectures``):

* **original layout** (``InternVLChatModel``, vLLM's own InternVL processor): the prompt
  text keeps InternVL's ``<image>`` placeholders, which vLLM replaces by ``<img>`` +
  ``<IMG_CONTEXT>`` x (tiles x tokens per tile) + ``</img>``. Tiling is InternVL's own
  (PIL bicubic, thumbnail when ``use_thumbnail`` in config.json), told per request by
  ``mm_processor_kwargs`` ``max_dynamic_patch`` / ``min_dynamic_patch`` /
  ``dynamic_image_size``.
* **transformers-native layout** (``InternVLForConditionalGeneration``, run by vLLM's
  InternS1 model with transformers' ``InternVLProcessor``): the placeholder is the
  tokenizer's context token ``<IMG_CONTEXT>`` (one per image; vLLM expands it the same
  way), and the tiles are cut by transformers' GotOcr2 image processor, told
  ``max_patches`` / ``min_patches`` / ``crop_to_patches``. Its resize is torch's, not
  PIL's, so the pixels of resized tiles (thumbnails) differ slightly from training's.

In both layouts the tile budget per image is training's (``max_tiles // images``,
:func:`~megatron_mpo.data.tiling.tiles_per_image`), so the prompt tokens equal the
training prompt's when vLLM's tokenizer agrees with ours (the GPU test checks both).
vLLM tokenizes the prompt text itself (with the tokenizer of the model directory).

Sampling: one ``llm.generate`` call per :meth:`VLLMEngine.generate`, one
``SamplingParams`` per prompt carrying the prompt's own seed (:func:`prompt_seed`; vLLM
derives the ``n`` samples of a request from it), so a question's samples do not depend on
the batch. They are reproducible with vLLM, but not equal to the transformers engine's
(different samplers). Image tokens and padded vocabulary rows get a logit bias of -100
(vLLM's ``logit_bias``, applied to greedy decoding too): never chosen in practice, though
not a hard -inf.

Devices: one engine per data-parallel group. Under torchrun with ``--nproc-per-node`` =
GPUs per node / tensor parallel size, local rank r takes GPUs r*tp .. r*tp+tp-1
(:func:`visible_devices`, set through :func:`megatron_mpo.platform.restrict_gpus`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron_mpo.errors import UserError
from megatron_mpo.generation.engines.base import (Completion, Engine, SamplingSettings, never_generated,
                                                  prompt_seed, stop_ids)
from megatron_mpo.generation.prompts import GenerationPrompt

__all__ = [
    "NATIVE",
    "ORIGINAL",
    "PLACEHOLDERS",
    "BANNED_LOGIT_BIAS",
    "MISSING_VLLM",
    "model_layout",
    "engine_args",
    "sampling_params",
    "request",
    "visible_devices",
    "completions",
    "VLLMEngine",
]

NATIVE = "native"  # transformers InternVLForConditionalGeneration (megatron_mpo.conversion.hf_io.NATIVE)
ORIGINAL = "internvl-chat"  # remote-code InternVLChatModel (hf_io.ORIGINAL)
# The image placeholder vLLM's processor expands, per layout.
PLACEHOLDERS = {ORIGINAL: "<image>", NATIVE: "<IMG_CONTEXT>"}
IMAGE_PLACEHOLDER = "<image>"  # what GenerationPrompt.text holds (the training templates' placeholder)
BANNED_LOGIT_BIAS = -100.0  # the largest magnitude OpenAI-style logit_bias allows
DTYPES = ("auto", "float32", "bfloat16", "float16")
MISSING_VLLM = "the vllm engine needs vLLM on a CUDA machine: pip install vllm; use --engine transformers on CPU"


# ---- what vLLM would receive (pure, tested without vLLM) ---------------------------------------


def _config(model_dir: str | os.PathLike) -> dict:
    from megatron_mpo.conversion.hf_io import read_json_object

    return read_json_object(Path(model_dir) / "config.json", "model config")


def model_layout(model_dir: str | os.PathLike, config: Optional[dict] = None) -> str:
    """``native`` or ``internvl-chat``, from ``config.json``'s ``architectures``."""
    from megatron_mpo.conversion.hf_io import detect_layout

    return detect_layout(config if config is not None else _config(model_dir), where=str(model_dir))


def _text_vocab_size(config: dict) -> Optional[int]:
    """The LLM's embedding rows (padded vocabulary included), None when config.json lacks it."""
    for key in ("text_config", "llm_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("vocab_size"), int):
            return sub["vocab_size"]
    return config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None


def engine_args(model_dir: str | os.PathLike, tensor_parallel_size: int = 1, max_model_len: Optional[int] = None,
                max_images: int = 4, seed: int = 0, dtype: str = "auto", gpu_memory_utilization: float = 0.9,
                *, layout: str = NATIVE, **extra: Any) -> Dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for the HF directory ``model_dir``.

    ``max_images``: images one prompt may hold (``limit_mm_per_prompt``); the native
    layout's video input is switched off (vLLM would reserve memory for it). vLLM's own
    sampling defaults from ``generation_config.json`` are not used (``generation_config
    ="vllm"``): sampling is exactly what :func:`sampling_params` says. ``extra`` goes to
    ``LLM`` as is (``enforce_eager``, ``compilation_config``, ...).
    """
    if tensor_parallel_size < 1:
        raise UserError(f"tensor parallel size must be >= 1, not {tensor_parallel_size}")
    if max_images < 0:
        raise UserError(f"max_images must be >= 0, not {max_images}")
    if dtype not in DTYPES:
        raise UserError(f"vllm engine dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise UserError(f"gpu_memory_utilization must be in (0, 1], not {gpu_memory_utilization}")
    if max_model_len is not None and max_model_len < 1:
        raise UserError(f"max_model_len must be >= 1, not {max_model_len}")
    if layout not in PLACEHOLDERS:
        raise ValueError(f"unknown layout {layout!r}")
    limits = {"image": max_images}
    if layout == NATIVE:
        limits["video"] = 0
    args: Dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "trust_remote_code": True,
        "tensor_parallel_size": tensor_parallel_size,
        "dtype": dtype,
        "seed": seed,
        "gpu_memory_utilization": gpu_memory_utilization,
        "limit_mm_per_prompt": limits,
        "generation_config": "vllm",
    }
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    args.update(extra)
    return args


def sampling_params(settings: SamplingSettings, seed: int, stop_token_ids: Sequence[int],
                    banned_token_ids: Sequence[int] = ()) -> Dict[str, Any]:
    """Keyword arguments of one prompt's ``vllm.SamplingParams``.

    Greedy (temperature 0) has no seed, top-p 1 and top-k -1 (vLLM's "off", as for
    ``top_k`` 0). The answer is detokenized with special tokens spelled out and no spaces
    added between them (as the transformers engine's decode); ``banned_token_ids`` get
    :data:`BANNED_LOGIT_BIAS`.
    """
    greedy = settings.greedy
    params: Dict[str, Any] = {
        "n": settings.n,
        "temperature": 0.0 if greedy else float(settings.temperature),
        "top_p": 1.0 if greedy else float(settings.top_p),
        "top_k": -1 if greedy or settings.top_k == 0 else int(settings.top_k),
        "max_tokens": settings.max_new_tokens,
        "seed": None if greedy else int(seed),
        "stop_token_ids": [int(i) for i in dict.fromkeys(stop_token_ids)],
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }
    if banned_token_ids:
        params["logit_bias"] = {int(i): BANNED_LOGIT_BIAS for i in sorted(set(banned_token_ids))}
    return params


def _rgb_image(data: bytes):
    """The decoded image in RGB, as training tiles it (:func:`megatron_mpo.data.samples.open_image`)."""
    from megatron_mpo.data.samples import open_image

    image = open_image(data)
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def request(prompt: GenerationPrompt, layout: str, min_tiles: int = 1) -> Dict[str, Any]:
    """The prompt dict ``llm.generate`` takes for ``prompt`` in ``layout``.

    ``prompt``: the rendered text with the layout's placeholder; ``multi_modal_data``: the
    images decoded in RGB; ``mm_processor_kwargs``: training's tile budget per image.
    """
    if layout not in PLACEHOLDERS:
        raise ValueError(f"unknown layout {layout!r}")
    placeholder = PLACEHOLDERS[layout]
    count = prompt.text.count(IMAGE_PLACEHOLDER)
    if count != len(prompt.images) or (placeholder != IMAGE_PLACEHOLDER and placeholder in prompt.text):
        raise ValueError(f"prompt {prompt.key}: {count} {IMAGE_PLACEHOLDER} placeholders for "
                         f"{len(prompt.images)} images (or a literal {placeholder} in the text)")
    out: Dict[str, Any] = {"prompt": prompt.text.replace(IMAGE_PLACEHOLDER, placeholder)}
    if not prompt.images:
        return out
    from megatron_mpo.data.tiling import tiles_per_image

    budget = tiles_per_image(prompt.max_tiles, len(prompt.images))
    out["multi_modal_data"] = {"image": [_rgb_image(data) for data in prompt.images]}
    if layout == ORIGINAL:
        out["mm_processor_kwargs"] = {"max_dynamic_patch": budget, "min_dynamic_patch": min_tiles,
                                      "dynamic_image_size": True}
    else:
        out["mm_processor_kwargs"] = {"max_patches": budget, "min_patches": min_tiles, "crop_to_patches": True}
    return out


def visible_devices(local_rank: int, tensor_parallel_size: int, gpus_per_node: int,
                    available: Optional[str] = None) -> str:
    """``CUDA_VISIBLE_DEVICES`` of the engine of torchrun's ``local_rank``.

    One engine per data-parallel group: with ``--nproc-per-node`` = ``gpus_per_node //
    tensor_parallel_size``, local rank r gets GPUs r*tp .. r*tp+tp-1 -- indices into
    ``available`` (a CUDA_VISIBLE_DEVICES the job already had) when given.
    """
    tp = tensor_parallel_size
    if tp < 1:
        raise UserError(f"tensor parallel size must be >= 1, not {tp}")
    if gpus_per_node < 1:
        raise UserError("the vllm engine needs a CUDA GPU, but this node has none")
    if gpus_per_node % tp:
        raise UserError(f"tensor parallel size {tp} does not divide this node's {gpus_per_node} GPUs; "
                        "choose a divisor")
    engines = gpus_per_node // tp
    if not 0 <= local_rank < engines:
        raise UserError(f"local rank {local_rank} has no GPUs: {gpus_per_node} GPUs at tensor parallel size {tp} "
                        f"hold {engines} engine(s); start torchrun with --nproc-per-node {engines}")
    ids: List[str] = [str(i) for i in range(local_rank * tp, local_rank * tp + tp)]
    if available is not None and available.strip():
        names = [name.strip() for name in available.split(",") if name.strip()]
        if len(names) < gpus_per_node:
            raise UserError(f"CUDA_VISIBLE_DEVICES={available} names {len(names)} GPUs, fewer than {gpus_per_node}")
        ids = [names[int(i)] for i in ids]
    return ",".join(ids)


def completions(outputs: Sequence[Any], stop_token_ids: Sequence[int] = ()) -> List[List[Completion]]:
    """vLLM ``RequestOutput`` s -> the engine interface's completions, in request order.

    ``text``: vLLM's (the stop token's text excluded); ``tokens``: the answer's tokens
    before the first stop token (vLLM keeps the stop token in ``token_ids``);
    ``finished``: ended by a stop / end-of-sequence token (``finish_reason`` "stop"),
    not by ``max_tokens`` ("length").
    """
    stops = set(int(i) for i in stop_token_ids)
    out: List[List[Completion]] = []
    for output in outputs:
        samples = []
        for sample in sorted(output.outputs, key=lambda s: getattr(s, "index", 0)):
            ids = list(sample.token_ids)
            end = next((i for i, t in enumerate(ids) if int(t) in stops), len(ids))
            samples.append(Completion(sample.text, end, sample.finish_reason == "stop"))
        out.append(samples)
    return out


# ---- the engine ---------------------------------------------------------------------------------


def _gpus_on_node() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return len([n for n in visible.split(",") if n.strip()])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class VLLMEngine(Engine):
    """vLLM's ``LLM`` over the HF directory ``model_dir`` (either layout).

    Options: ``tensor_parallel_size`` (GPUs per engine, inside a node), ``max_model_len``
    (prompt + answer tokens; default the model's), ``max_images`` (per prompt), ``dtype``,
    ``gpu_memory_utilization``, ``seed`` (vLLM's global seed; samples use per-prompt
    seeds), ``min_tiles`` (training's ``PairBuilder.min_tiles``), ``gpus_per_node`` (default: the
    GPUs this process sees); anything else goes to ``vllm.LLM``.
    """

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, *, tensor_parallel_size: int = 1,
                 max_model_len: Optional[int] = None, max_images: int = 4, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, seed: int = 0, min_tiles: int = 1,
                 gpus_per_node: Optional[int] = None, **llm_options: Any) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise UserError(MISSING_VLLM)
        from megatron_mpo import platform

        if not platform.cuda_available():
            raise UserError("the vllm engine needs a CUDA GPU, but none is visible; use --engine transformers on CPU")
        config = _config(model_dir)
        self.layout = model_layout(model_dir, config)
        self.tok = tokenizer
        self.min_tiles = min_tiles
        self.max_images = max_images
        self.tensor_parallel_size = tensor_parallel_size
        gpus = gpus_per_node if gpus_per_node is not None else _gpus_on_node()
        self.devices = visible_devices(int(os.environ.get("LOCAL_RANK", "0")), tensor_parallel_size, gpus,
                                       os.environ.get("CUDA_VISIBLE_DEVICES"))
        platform.restrict_gpus(self.devices)  # before vLLM starts its engine and workers
        try:
            import vllm
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise UserError(f"{MISSING_VLLM} (import failed: {str(exc).splitlines()[0] if str(exc) else exc!r})") \
                from None
        self._sampling_params_cls = SamplingParams
        self.vllm_version = getattr(vllm, "__version__", "unknown")
        self.stop_ids = stop_ids(tokenizer)
        self.banned = never_generated(tokenizer, _text_vocab_size(config) or tokenizer.vocab_size)
        self.args = engine_args(model_dir, tensor_parallel_size, max_model_len, max_images, seed, dtype,
                                gpu_memory_utilization, layout=self.layout, **llm_options)
        self.llm = LLM(**self.args)

    def describe(self) -> dict:
        """The same on every rank (this rank's GPUs are ``self.devices``)."""
        return {"engine": self.name, "vllm": self.vllm_version, "layout": self.layout,
                "tensor_parallel_size": self.tensor_parallel_size, "dtype": self.args["dtype"]}

    def requests(self, prompts: Sequence[GenerationPrompt], settings: SamplingSettings) -> tuple[list, list]:
        """(prompt dicts, SamplingParams), one each per prompt."""
        for p in prompts:
            if len(p.images) > self.max_images:
                raise UserError(f"question {p.key} has {len(p.images)} images; the vllm engine takes at most "
                                f"{self.max_images} (max_images)")
        inputs = [request(p, self.layout, self.min_tiles) for p in prompts]
        params = [self._sampling_params_cls(**sampling_params(settings, prompt_seed(settings.seed, p.key),
                                                              self.stop_ids, self.banned)) for p in prompts]
        return inputs, params

    def generate_raw(self, prompts: Sequence[GenerationPrompt], settings: SamplingSettings) -> list:
        """vLLM's ``RequestOutput`` s, in prompt order (one ``llm.generate`` call)."""
        if not prompts:
            return []
        inputs, params = self.requests(prompts, settings)
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM answered {len(outputs)} of {len(prompts)} prompts")
        return list(outputs)

    def generate(self, prompts: Sequence[GenerationPrompt], settings: SamplingSettings) -> List[List[Completion]]:
        return completions(self.generate_raw(prompts, settings), self.stop_ids)

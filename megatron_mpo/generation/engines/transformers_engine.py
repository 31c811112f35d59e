"""transformers ``generate`` behind the engine interface: KV cache, batched sampling.

Loads an exported HF directory in the transformers-native layout
(``InternVLForConditionalGeneration``) and feeds it the project's own prompt ids and tiles
(:mod:`megatron_mpo.generation.prompts`), so the model sees exactly the training prompt.
A question's ``n`` samples are one batch under the question's own seed; greedy prompts
are batched together (left padding). Image tokens and ids beyond the tokenizer are never
generated (they would desynchronise the image features).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megatron_mpo import platform
from megatron_mpo.errors import UserError
from megatron_mpo.generation.engines.base import (Completion, Engine, SamplingSettings, never_generated,
                                                  prompt_seed, stop_ids)
from megatron_mpo.generation.prompts import GenerationPrompt

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, model_dir: str, tokenizer, *, device: str = "auto", dtype: str = "auto",
                 greedy_batch: int = 8) -> None:
        try:
            from transformers import InternVLForConditionalGeneration
        except ImportError:
            raise UserError("the transformers engine needs transformers >= 4.52 (pip install 'transformers>=4.52')") \
                from None
        if dtype not in DTYPES:
            raise UserError(f"engine dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.device = platform.engine_device(device)
        self.tok = tokenizer
        self.greedy_batch = max(1, greedy_batch)
        torch_dtype = DTYPES[dtype] or ("auto" if self.device.type == "cuda" else torch.float32)
        try:
            model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load {model_dir} with transformers' InternVLForConditionalGeneration "
                            f"(native layout expected): {str(exc).splitlines()[0]}") from None
        self.model = model.to(self.device).eval()
        self.stop_ids = stop_ids(tokenizer)
        self.suppress = never_generated(tokenizer, int(model.config.get_text_config().vocab_size))
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else self.stop_ids[0]

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(self.device), "dtype": str(self.model.dtype).replace("torch.", "")}

    # -- batches ---------------------------------------------------------------------------
    def _inputs(self, prompts: Sequence[GenerationPrompt], copies: int) -> dict:
        """Left-padded ids, their mask, and every prompt's tiles in row order."""
        width = max(len(p.ids) for p in prompts)
        rows, masks, pixels = [], [], []
        for p in prompts:
            pad = width - len(p.ids)
            for _ in range(copies):
                rows.append([self.pad_id] * pad + list(p.ids))
                masks.append([0] * pad + [1] * len(p.ids))
                pixels.append(p.pixel_values)
        inputs = {"input_ids": torch.tensor(rows, device=self.device),
                  "attention_mask": torch.tensor(masks, device=self.device)}
        tiles = [t for t in pixels if t.shape[0]]
        if tiles:
            inputs["pixel_values"] = torch.cat(tiles).to(self.device, self.model.dtype)
        return inputs

    def _run(self, prompts: Sequence[GenerationPrompt], copies: int, settings: SamplingSettings,
             seed: Optional[int]) -> List[List[Completion]]:
        inputs = self._inputs(prompts, copies)
        sampling = {"do_sample": False} if settings.greedy else {
            "do_sample": True, "temperature": settings.temperature, "top_k": settings.top_k or None,
            "top_p": settings.top_p}
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**inputs, **sampling, max_new_tokens=settings.max_new_tokens,
                                      eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                      suppress_tokens=self.suppress or None)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        completions = [self._completion(row) for row in new]
        return [completions[i * copies:(i + 1) * copies] for i in range(len(prompts))]

    def _completion(self, ids: List[int]) -> Completion:
        stop = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        body = ids if stop is None else ids[:stop]
        return Completion(self.tok.decode(body), len(body), stop is not None)

    # -- interface -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[GenerationPrompt], settings: SamplingSettings) -> List[List[Completion]]:
        if settings.greedy:  # deterministic: batch prompts together
            out: List[List[Completion]] = []
            for start in range(0, len(prompts), self.greedy_batch):
                out += self._run(prompts[start:start + self.greedy_batch], 1, settings, None)
            return out
        return [self._run([p], settings.n, settings, prompt_seed(settings.seed, p.key))[0] for p in prompts]

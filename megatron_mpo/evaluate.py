"""Held-out evaluation of a checkpoint: greedy answers and preference accuracy.

Runs one process at TP=1 (dist_checkpointing loads any saved layout), through the same
tokenizer, template and tiling as training. Greedy decoding recomputes the full prefix
each token (no KV cache): meant for small models and short answers (demo, tests).

    python -m megatron_mpo.evaluate --ckpt DIR --records FILE.jsonl [--image-root DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_mpo import parallel, platform
from megatron_mpo.batch import causal_mask
from megatron_mpo.console import setup_console
from megatron_mpo.errors import UserError, exit_on_user_error


class Evaluator:
    """A loaded checkpoint plus the data pieces to score and answer samples."""

    def __init__(self, ckpt: str, tokenizer_dir: Optional[str] = None, template: Optional[str] = None,
                 max_length: int = 1024, max_tiles: int = 6) -> None:
        from megatron_mpo.conversion.megatron_dir import read_model_config, tokenizer_source
        from megatron_mpo.data import DataConfig, load_tokenizer
        from megatron_mpo.data.samples import build_pair_builder
        from megatron_mpo.models.internvl import build_model
        from megatron_mpo.training.checkpoint import load_model_weights
        from megatron_mpo.training.data_setup import default_template

        parallel.initialize(1, 1, seed=0, device="auto")
        self.config = read_model_config(ckpt)
        self.model = build_model(self.config, spec="local", attention_mask="arbitrary")
        load_model_weights(ckpt, [self.model])
        self.model.eval()
        self.tok = load_tokenizer(str(tokenizer_dir or tokenizer_source(ckpt)))
        data = DataConfig(
            shards="unused", max_length=max_length, max_tiles=max_tiles,
            template=template or default_template(self.config), image_size=self.config.vision.image_size,
            tokens_per_tile=self.config.tokens_per_tile,
        )
        self.builder = build_pair_builder(data, self.tok)

    def pair(self, record: dict, image_root: Path):
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        data = [(image_root / name).read_bytes() for name in images]
        return self.builder.build(record.get("id", "sample"), record, data)

    @torch.no_grad()
    def _logits(self, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
        dev = platform.device()
        input_ids = torch.tensor([ids], device=dev)
        is_image = input_ids == self.tok.img_context_id
        index = torch.full_like(input_ids, -1)
        index[is_image] = torch.arange(int(is_image.sum()), device=dev)
        return self.model(
            input_ids=input_ids,
            position_ids=torch.arange(len(ids), device=dev).unsqueeze(0),
            attention_mask=causal_mask(len(ids)).to(dev),
            labels=None,
            pixel_values=pixel_values.to(dev),
            image_token_index=index,
        )

    def sequence_logp(self, prompt: list[int], response: list[int], pixel_values: torch.Tensor) -> float:
        logits = self._logits(prompt + response, pixel_values)[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        return float(logp.gather(1, torch.tensor(response, device=logp.device).unsqueeze(1)).sum())

    def greedy(self, prompt: list[int], pixel_values: torch.Tensor, max_new_tokens: int = 16) -> str:
        ids = list(prompt)
        for _ in range(max_new_tokens):
            logits = self._logits(ids, pixel_values)[0, -1, : self.tok.vocab_size]
            nxt = int(logits.argmax())
            if nxt in (self.tok.im_end_id, self.tok.eos_id):
                break
            ids.append(nxt)
        return self.tok.decode(ids[len(prompt):])


def greedy_is_right(text: str, answer: str, choices: Sequence[str]) -> bool:
    """The generated text names ``answer`` and no other of ``choices`` (word match)."""
    words = set(text.lower().replace(".", " ").replace(",", " ").split())
    return answer in words and not (words & (set(choices) - {answer}))


def evaluate_records(evaluator: Evaluator, records: Sequence[dict], image_root: Path,
                     max_new_tokens: int = 16) -> dict:
    """``preference_accuracy``: log pi(chosen) > log pi(rejected), over the records that
    build (the others are counted in ``skipped`` by reason, as training counts them);
    ``greedy_accuracy``: over those with an ``answer`` (and ``choices``), None when none has
    one (MMPR records carry only chosen / rejected), with a ``note`` saying so."""
    from megatron_mpo.data.samples import SampleError

    greedy_ok = prefer_ok = answered = scored = 0
    examples: list = []
    skipped: dict = {}
    for record in records:
        try:
            pair = evaluator.pair(record, image_root)
        except SampleError as exc:  # as the loader does: count it, go on
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            continue
        scored += 1
        prefer_ok += evaluator.sequence_logp(pair.prompt, pair.chosen, pair.pixel_values) > evaluator.sequence_logp(
            pair.prompt, pair.rejected, pair.pixel_values)
        if "answer" not in record:
            continue
        answered += 1
        text = evaluator.greedy(pair.prompt, pair.pixel_values, max_new_tokens)
        greedy_ok += greedy_is_right(text, str(record["answer"]), record.get("choices") or [])
        if len(examples) < 4:
            examples.append({"question": record.get("question"), "answer": record["answer"], "generated": text})
    result = {"greedy_accuracy": greedy_ok / answered if answered else None,
              "preference_accuracy": prefer_ok / scored if scored else None, "samples": scored,
              "greedy_samples": answered, "skipped": skipped, "examples": examples}
    if answered < scored:
        result["note"] = (f"{scored - answered} of {scored} records have no 'answer' (and 'choices'): "
                          "greedy accuracy counts only records that have one" if answered else
                          "the records have no 'answer' (and 'choices'): preference accuracy only")
    return result


@exit_on_user_error
def main(argv=None) -> None:
    setup_console()
    parser = argparse.ArgumentParser(description="Greedy-answer and preference accuracy of a checkpoint.")
    parser.add_argument("--ckpt", required=True, help="model dir or training checkpoint step dir")
    parser.add_argument("--records", required=True, help="JSONL with image, question, chosen, rejected (MMPR "
                        "records); answer and choices add greedy-answer accuracy")
    parser.add_argument("--image-root", help="directory the image paths are relative to (default: records' dir)")
    parser.add_argument("--template")
    parser.add_argument("--max-tiles", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", help="write the result JSON here too")
    args = parser.parse_args(argv)
    records_path = Path(args.records)
    if not records_path.is_file():
        raise UserError(f"records file {records_path} does not exist")
    records = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
    evaluator = Evaluator(args.ckpt, template=args.template, max_tiles=args.max_tiles)
    result = evaluate_records(evaluator, records, Path(args.image_root or records_path.parent), args.max_new_tokens)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    parallel.shutdown()


if __name__ == "__main__":
    main()

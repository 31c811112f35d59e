"""Sample responses for a question set: split over ranks, resumable, with progress.

Questions are cut into *parts* of ``part_size`` questions (per dataset, in file order);
part ``i`` belongs to rank ``i % world``. A part's samples are written atomically to
``samples/{part}.jsonl`` once the whole part is done, so a killed run rerun with the same
command does only the parts that have no file. ``run.json`` records everything the
samples depend on (model, engine, sampling settings and seed, prompt style, question
set); a rerun with other settings is refused instead of mixing samples.

Questions with a ground truth get ``n`` samples of the reasoning prompt (correctness
pipeline). Questions without one, when Dropout NTP is on, get one answer with the image,
cut at half its length and continued by the same model without the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from megatron_mpo.data.samples import PairBuilder, SampleError
from megatron_mpo.data.templates import IMAGE_PLACEHOLDER
from megatron_mpo.errors import UserError
from megatron_mpo.fileio import write_atomic
from megatron_mpo.generation.engines.base import Completion, Engine, SamplingSettings, prompt_seed
from megatron_mpo.generation.prompts import GenerationPrompt, build_prompt, reasoning_question
from megatron_mpo.generation.questions import Question, QuestionSet

RUN_FILE = "run.json"
SAMPLES_DIR = "samples"
RUN_FORMAT = "megatron_mpo.samples/1"
PROMPT_STYLES = ("reasoning", "plain")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Part:
    name: str
    questions: List[Question]


def make_parts(qset: QuestionSet, part_size: int) -> List[Part]:
    """Questions cut into parts of ``part_size``, per dataset, in file order."""
    if part_size < 1:
        raise UserError(f"--part-size must be >= 1, not {part_size}")
    by_dataset: Dict[str, List[Question]] = {}
    for q in qset.questions:
        by_dataset.setdefault(q.dataset, []).append(q)
    parts = []
    for d, name in enumerate(qset.datasets):
        items = by_dataset.get(name, [])
        safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40] or "ds"
        for start in range(0, len(items), part_size):
            parts.append(Part(f"{d:03d}-{safe}-{start // part_size:06d}", items[start:start + part_size]))
    return parts


def truncate_half(text: str) -> str:
    """The first half of an answer, cut at the word boundary nearest its middle
    (Dropout NTP's truncation; whole words keep the continuation's first token natural)."""
    middle = len(text) // 2
    cuts = [m.start() for m in re.finditer(r"\s", text)]
    if not cuts:
        return text[:middle]
    cut = min(cuts, key=lambda c: abs(c - middle))
    return text[:cut] if cut > 0 else text[:middle]


def _completion(c: Completion) -> dict:
    return {"text": c.text, "tokens": c.tokens, "finished": c.finished}


def _text_problem(text: str) -> Optional[str]:
    """Why a generated text cannot be a response: empty, or not valid UTF-8 (bytes the
    tokenizer decoded as U+FFFD)."""
    if not text.strip():
        return "empty_generation"
    if "\ufffd" in text:
        return "non_utf8_generation"
    return None


class Sampler:
    """Runs the engine over this rank's parts of a question set."""

    def __init__(self, engine: Engine, builder: PairBuilder, settings: SamplingSettings, out_dir: str, *,
                 prompt_style: str = "reasoning", dropout_ntp: bool = True, log: Log = print) -> None:
        if prompt_style not in PROMPT_STYLES:
            raise UserError(f"--prompt must be one of {', '.join(PROMPT_STYLES)}, not {prompt_style!r}")
        self.engine, self.builder, self.settings = engine, builder, settings
        self.out = Path(out_dir)
        self.prompt_style, self.dropout_ntp, self.log = prompt_style, dropout_ntp, log

    # -- prompts ---------------------------------------------------------------------------
    def _question_text(self, q: Question) -> Optional[str]:
        if self.prompt_style == "plain":
            return q.question
        return reasoning_question(q.question, len(q.images))

    def _prompt(self, q: Question, text: str, images: Sequence[bytes], prefix: str = "",
                key: Optional[str] = None) -> GenerationPrompt:
        return build_prompt(self.builder, key or q.key, text, images, q.max_dynamic_patch, prefix)

    # -- generation with retries -------------------------------------------------------------
    def _generate(self, prompts: List[GenerationPrompt], settings: SamplingSettings,
                  failed: Dict[str, str]) -> Dict[str, List[Completion]]:
        """Completions by prompt key; a batch that fails is retried prompt by prompt, then
        with the samples split in two; what still fails lands in ``failed``."""
        if not prompts:
            return {}
        try:
            return {p.key: c for p, c in zip(prompts, self.engine.generate(prompts, settings))}
        except (RuntimeError, MemoryError) as exc:
            if len(prompts) > 1:
                self.log(f"  generation of {len(prompts)} prompts failed ({str(exc).splitlines()[0][:120]}); "
                         "retrying one by one")
                out: Dict[str, List[Completion]] = {}
                for p in prompts:
                    out.update(self._generate([p], settings, failed))
                return out
            prompt = prompts[0]
            if settings.n > 1:
                half = settings.n // 2
                try:
                    first = self.engine.generate([prompt], replace(settings, n=half))[0]
                    second = self.engine.generate([prompt], replace(settings, n=settings.n - half,
                                                                    seed=settings.seed + 1))[0]
                    return {prompt.key: first + second}
                except (RuntimeError, MemoryError) as again:
                    exc = again
            failed[prompt.key] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return {}

    # -- one part ------------------------------------------------------------------------------
    def run_part(self, part: Part, counts: Counter) -> List[dict]:
        records: Dict[str, dict] = {}
        correct_prompts: List[GenerationPrompt] = []
        ntp_prompts: List[GenerationPrompt] = []
        images_of: Dict[str, List[bytes]] = {}
        for q in part.questions:
            record = {"key": q.key, **q.provenance(), "seed": prompt_seed(self.settings.seed, q.key)}
            records[q.key] = record
            if q.answer is None and not self.dropout_ntp:
                record["error"] = "no_answer"
                continue
            try:
                images = q.image_bytes()
            except OSError as exc:
                record["error"], record["detail"] = "missing_image", str(exc)[:200]
                continue
            record["kind"] = "correctness" if q.answer is not None else "dropout_ntp"
            text = self._question_text(q) if q.answer is not None else q.question
            if text is None:
                record["error"] = "placeholder_mismatch"
                continue
            record["prompt"] = text
            try:
                prompt = self._prompt(q, text, images)
            except SampleError as exc:
                record["error"], record["detail"] = exc.reason, str(exc)[:200]
                continue
            images_of[q.key] = images
            (correct_prompts if q.answer is not None else ntp_prompts).append(prompt)

        failed: Dict[str, str] = {}
        for key, completions in self._generate(correct_prompts, self.settings, failed).items():
            records[key]["responses"] = [self._checked(c, counts) for c in completions]
        if ntp_prompts:
            self._dropout_ntp(part, ntp_prompts, records, failed, counts)
        for key, why in failed.items():
            records[key]["error"], records[key]["detail"] = "generation_failed", why
        out = [records[q.key] for q in part.questions]
        for r in out:
            if "error" in r:
                counts[r["error"]] += 1
        return out

    def _checked(self, c: Completion, counts: Counter) -> dict:
        d = _completion(c)
        problem = _text_problem(c.text)
        if problem:
            d["problem"] = problem
            counts[problem] += 1
        return d

    def _dropout_ntp(self, part: Part, prompts: List[GenerationPrompt], records: Dict[str, dict],
                     failed: Dict[str, str], counts: Counter) -> None:
        """Chosen: the answer with the image; rejected: its first half continued without it."""
        one = replace(self.settings, n=1)
        chosen = self._generate(prompts, one, failed)
        by_key = {q.key: q for q in part.questions}
        blind: List[GenerationPrompt] = []
        for key, (c,) in chosen.items():
            record = records[key]
            record["chosen"] = self._checked(c, counts)
            if "problem" in record["chosen"]:
                continue
            prefix = truncate_half(c.text)
            record["prefix"] = prefix
            q = by_key[key]
            text = q.question.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
            try:
                blind.append(self._prompt(q, text, [], prefix=prefix, key=key))
            except SampleError as exc:
                record["error"], record["detail"] = exc.reason, str(exc)[:200]
        for key, (c,) in self._generate(blind, one, failed).items():
            records[key]["continuation"] = self._checked(c, counts)

    # -- the whole run -------------------------------------------------------------------------
    def run(self, parts: Sequence[Part], rank: int = 0, world: int = 1) -> Counter:
        samples = self.out / SAMPLES_DIR
        samples.mkdir(parents=True, exist_ok=True)
        mine = [p for i, p in enumerate(parts) if i % world == rank]
        todo = [p for p in mine if not (samples / f"{p.name}.jsonl").is_file()]
        total_q = sum(len(p.questions) for p in todo)
        self.log(f"[rank {rank}/{world}] {len(mine)} parts, {len(mine) - len(todo)} already done, {len(todo)} to "
                 f"sample ({total_q} questions, {self.settings.n} samples each)")
        counts: Counter = Counter()
        started, done_q, done_samples = time.perf_counter(), 0, 0
        for i, part in enumerate(todo, 1):
            records = self.run_part(part, counts)
            write_atomic(samples / f"{part.name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                   for r in records))
            done_q += len(part.questions)
            done_samples += sum(len(r.get("responses", [])) + ("chosen" in r) + ("continuation" in r) for r in records)
            elapsed = time.perf_counter() - started
            eta = elapsed / done_q * (total_q - done_q) if done_q else 0.0
            self.log(f"[rank {rank}] part {i}/{len(todo)} {part.name}: {done_q}/{total_q} questions, "
                     f"{done_samples / max(elapsed, 1e-9):.2f} samples/s, ETA {eta:.0f}s")
        return counts


def run_record(*, model: str, engine: dict, settings: SamplingSettings, prompt_style: str, dropout_ntp: bool,
               meta: str, parts: Sequence[Part], builder: PairBuilder) -> dict:
    """What the samples depend on; a rerun must match it."""
    with open(meta, "rb") as f:
        meta_digest = hashlib.sha256(f.read()).hexdigest()
    return {
        "format": RUN_FORMAT, "model": os.path.abspath(model), "engine": engine.get("engine"),
        "sampling": settings.to_dict(), "prompt": prompt_style, "dropout_ntp": dropout_ntp,
        "meta": os.path.abspath(meta), "meta_sha256": meta_digest,
        "template": builder.template.name, "max_length": builder.max_length, "max_tiles": builder.max_tiles,
        "parts": [p.name for p in parts], "questions": sum(len(p.questions) for p in parts),
    }


def check_run_record(out_dir: str, record: dict, *, overwrite: bool = False) -> None:
    """Write ``run.json``, or check that the existing one matches (a resumed run)."""
    path = Path(out_dir) / RUN_FILE
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is damaged; delete {out_dir} or pass --overwrite") from None
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            raise UserError(f"{out_dir} holds samples made with other settings ({', '.join(diff)} differ); "
                            "use another --out, or --overwrite to start over")
        return
    if overwrite and (Path(out_dir) / SAMPLES_DIR).is_dir():
        import shutil

        shutil.rmtree(Path(out_dir) / SAMPLES_DIR)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1))

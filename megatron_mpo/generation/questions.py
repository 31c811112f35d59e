"""Question sets: an MMPR-style ``meta.json`` whose records carry a ground truth.

Each dataset is ``{root, annotation, [repeat_time], [max_dynamic_patch], [scoring]}``
(``scoring``: the answer-checking mode, :data:`~megatron_mpo.generation.scoring.SCORING_MODES`,
default ``default``); each annotation line is ``{image?, question, answer?, choices?, id?}``.
A record without ``answer`` has no ground truth: it goes to Dropout NTP, or is refused
(``no_answer``) when that is off. Records that cannot be used are counted by reason and
listed, never fatal: a bad line must not stop a run of a million questions.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from megatron_mpo.data.mmpr import as_image_list, load_meta, read_annotation, select_indices
from megatron_mpo.fileio import outside_root
from megatron_mpo.generation.scoring import DEFAULT_MODE, check_mode

Answer = Union[str, List[str]]


@dataclass
class Question:
    """One question of a set; ``key`` (``dataset-index/line``) is unique in the set."""

    key: str
    dataset: str
    line: int
    question: str
    root: str
    images: List[str] = field(default_factory=list)  # paths under ``root``
    answer: Optional[Answer] = None
    choices: Optional[List[str]] = None
    mode: str = DEFAULT_MODE
    max_dynamic_patch: Optional[int] = None
    id: Optional[str] = None

    def image_bytes(self) -> List[bytes]:
        """The images' bytes (OSError when one went missing since the set was read)."""
        out = []
        for path in self.images:
            with open(os.path.join(self.root, path), "rb") as f:
                out.append(f.read())
        return out

    def provenance(self) -> dict:
        return {"dataset": self.dataset, "line": self.line, "id": self.id, "image": self.images or None,
                "question": self.question, "answer": self.answer, "choices": self.choices, "mode": self.mode,
                "root": os.path.abspath(self.root), "max_dynamic_patch": self.max_dynamic_patch}


@dataclass
class QuestionSet:
    questions: List[Question]
    refused: Counter
    refusals: List[dict]  # {dataset, line, reason, detail}
    datasets: List[str]


def _answer(value) -> Tuple[bool, Optional[Answer]]:
    """(usable, answer) of a record's ``answer`` field: strings, numbers, lists of them."""
    if value is None:
        return True, None
    if isinstance(value, bool):
        return True, "yes" if value else "no"
    if isinstance(value, (int, float, str)):
        text = str(value).strip()
        return bool(text), text or None
    if isinstance(value, list) and value and all(isinstance(v, (int, float, str)) for v in value):
        return True, [str(v).strip() for v in value]
    return False, None


Refusal = Tuple[str, str]  # (reason, detail)


def _check(record_line: Tuple[int, str], index: int, spec, allow_outside_root: bool
           ) -> Tuple[Optional[Question], Optional[Refusal]]:
    line, raw = record_line
    try:
        rec = json.loads(raw)
    except ValueError as exc:
        return None, ("bad_json", str(exc)[:200])
    if not isinstance(rec, dict):
        return None, ("bad_json", "line is not a JSON object")
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        return None, ("missing_question", "no question")
    images = as_image_list(rec.get("image"))
    if images is None:
        return None, ("bad_image_field", f"image must be a string or a list of strings, got {rec.get('image')!r}"[:200])
    for path in images:
        escape = None if allow_outside_root else outside_root(spec.root, path)
        if escape:
            return None, ("outside_root", f"{path} {escape} ({spec.root}); --allow-outside-root reads it")
        if not os.path.isfile(os.path.join(spec.root, path)):
            return None, ("missing_image", f"{os.path.join(spec.root, path)} (images are read under the meta "
                                           f"file's 'root')")
    ok, answer = _answer(rec.get("answer"))
    if not ok:
        return None, ("bad_answer",
                      f"answer must be a string, a number or a list of them, got {rec.get('answer')!r}"[:200])
    choices = rec.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        return None, ("bad_choices", "choices must be a list of strings")
    rec_id = rec.get("id")
    return Question(
        key=f"{spec.name}-{index}/{line}", dataset=spec.name, line=line, question=question, root=spec.root,
        images=images, answer=answer, choices=choices, mode=spec.scoring or DEFAULT_MODE,
        max_dynamic_patch=spec.max_dynamic_patch, id=None if rec_id is None else str(rec_id),
    ), None


def load_questions(meta_path: str, *, seed: int = 0, allow_outside_root: bool = False) -> QuestionSet:
    """Every usable question of a meta file, in file order (``repeat_time`` applied, seeded)."""
    specs = load_meta(meta_path)
    for spec in specs:
        if spec.scoring is not None:
            check_mode(spec.scoring)
    rng = random.Random(seed)
    questions, refused, refusals = [], Counter(), []
    for index, spec in enumerate(specs):
        lines = read_annotation(spec)
        for i in select_indices(len(lines), spec.repeat_time, rng):
            question, refusal = _check(lines[i], index, spec, allow_outside_root)
            if refusal:
                refused[refusal[0]] += 1
                refusals.append({"dataset": spec.name, "line": lines[i][0], "reason": refusal[0], "detail": refusal[1]})
                continue
            questions.append(question)
    # repeat_time > 1 repeats lines: keys stay unique by a copy number
    seen: Counter = Counter()
    for q in questions:
        seen[q.key] += 1
        if seen[q.key] > 1:
            q.key = f"{q.key}#{seen[q.key] - 1}"
    return QuestionSet(questions, refused, refusals, [s.name for s in specs])

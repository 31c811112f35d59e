"""Score sampled reasoning responses against ground-truth answers.

MPO preference data is built by sampling several reasoning responses per question and
splitting them into chosen (correct final answer) and rejected (wrong or missing final
answer) ones, as InternVL's ``mm_reasoning_pipeline`` does. Responses are prompted to end
with ``Final answer: ...``; :func:`extract_final_answer` reads that line and
:func:`score_answer` compares it with the gold answer under one of :data:`SCORING_MODES`.
Math answers go through the maintained ``math-verify`` verifier rather than hand-written
regexes, so ``1/2``, ``0.5`` and ``\\frac{1}{2}`` agree and units such as ``12 cm`` match
``12``. Nothing here raises on odd model output: a verifier failure means "not correct".
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from megatron_mpo.errors import UserError

SCORING_MODES = ("default", "math", "vqa", "multiple_choice", "relaxed", "anls")
DEFAULT_MODE = "default"
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05

Gold = Union[str, Sequence[str]]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    """A scored answer: ``value`` is 1.0/0.0, or the ANLS similarity in ``anls`` mode."""

    answer: Optional[str]
    correct: bool
    value: float


# ---------------------------------------------------------------- final-answer extraction

_FINAL_RE = re.compile(r"final\s+answer(?:\*\*)?\s*:", re.IGNORECASE)
_ANSWER_RE = re.compile(r"\banswer(?:\*\*)?\s*:", re.IGNORECASE)


def _clean(text: str) -> str:
    """Strip whitespace, surrounding markdown bold and a trailing period."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip()
        if text.startswith("**"):
            text = text[2:]
        if text.endswith("**"):
            text = text[:-2]
        text = text.strip().removesuffix(".")
    return text


def extract_final_answer(text: str) -> Optional[str]:
    """The answer after the last ``Final answer:`` (else ``Answer:``); None if absent/empty.

    A response without a stated answer cannot be checked, so callers treat None as wrong.
    """
    matches = list(_FINAL_RE.finditer(text)) or list(_ANSWER_RE.finditer(text))
    if not matches:
        return None
    lines = text[matches[-1].end():].split("\n")
    rest = [_clean(lines[0])] + [_clean(line) for line in lines[1:] if line.strip()][:1]
    answer = rest[0] or (rest[1] if len(rest) > 1 else "")
    return answer or None


# ---------------------------------------------------------------- text normalisation

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize_text(text: str) -> str:
    """VQA-eval normalisation: lowercase, no punctuation or articles, digits for words."""
    text = text.lower().replace("'", "")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # thousands separators
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep decimal points only
    text = re.sub(r"[^\w\s.]|_", " ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _vqa_match(answer: str, gold: str) -> bool:
    pred, ref = normalize_text(answer), normalize_text(gold)
    if ref in ("yes", "no"):
        return pred.split(" ", 1)[0] == ref
    return bool(ref) and pred == ref


# ---------------------------------------------------------------- math (math-verify)

_PROSE_RE = re.compile(r"[A-Za-z]{2,}")
_DELIMITED_RE = re.compile(r"\$|\\\(|\\\[|\\boxed")


def _math_input(text: str) -> str:
    """Prepare a string for ``math_verify.parse``.

    Bare LaTeX (``\\sqrt{2}``) and symbolic text (``(2, 3)``, ``x = 5``) are wrapped in
    ``$...$`` so they parse as a whole; prose (``12 cm``, ``3.5 million``) is left as is so
    math-verify picks the number out instead of reading the words as products of symbols.
    """
    text = text.strip().replace("\\$", "")
    if _DELIMITED_RE.search(text) or (_PROSE_RE.search(text) and "\\" not in text):
        return text
    return f"${text}$"


def _math_match(answer: str, gold: str) -> bool:
    """math-verify equivalence; any error or timeout inside it counts as not correct."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException  # a BaseException, not an Exception

    # math-verify times out via SIGALRM, which only works in the main thread.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        gold_parsed = parse(_math_input(gold), config, parsing_timeout=limit)
        pred_parsed = parse(_math_input(answer), config, parsing_timeout=limit)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit))
    except (Exception, TimeoutException) as exc:
        logger.debug("math-verify failed on %r vs %r: %s", answer, gold, exc)
        return False


# ---------------------------------------------------------------- multiple choice

_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Z])\)?[.:)]?$"),  # B  (B)  B.  B)
    re.compile(r"^\(?([A-Z])[.:)]\s"),  # B) Paris  B. Paris  (B) Paris
    re.compile(r"(?i:\b(?:option|choice|answer\s+is|answer))\s*:?\s*\(?([A-Z])(?![\w])"),
)


def _letter(text: str) -> Optional[str]:
    text = _clean(text).replace("**", "").strip()
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def _choice_letter(text: str, choices: Optional[Sequence[str]]) -> Optional[str]:
    """The letter of the choice whose (normalised) text equals ``text``."""
    wanted = normalize_text(text)
    for index, choice in enumerate(choices or ()):
        if wanted and normalize_text(choice) == wanted:
            return chr(ord("A") + index)
    return None


def _mc_gold_letter(gold: str, choices: Optional[Sequence[str]]) -> Optional[str]:
    gold = gold.strip()
    if re.fullmatch(r"\(?[A-Z]\)?\.?", gold):
        return gold.strip("().")
    return _choice_letter(gold, choices)


def _mc_match(answer: str, gold: str, choices: Optional[Sequence[str]]) -> bool:
    want = _mc_gold_letter(gold, choices)
    got = _letter(answer) or _choice_letter(answer, choices)
    return want is not None and got == want


# ---------------------------------------------------------------- relaxed and ANLS

def _to_number(text: str) -> Optional[float]:
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", _clean(text)).rstrip("%").strip()
    try:
        return float(text)
    except ValueError:
        return None


def _relaxed_match(answer: str, gold: str) -> bool:
    """ChartQA relaxed accuracy: numbers within 5% of the gold, otherwise exact match."""
    pred, ref = _to_number(answer), _to_number(gold)
    if pred is None or ref is None:
        return _vqa_match(answer, gold)
    if ref == 0:
        return pred == 0
    return abs(pred - ref) <= RELAXED_TOLERANCE * abs(ref)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(answer: str, gold: str) -> float:
    """DocVQA's normalised Levenshtein similarity, zeroed below the 0.5 threshold."""
    a, b = answer.strip().lower(), gold.strip().lower()
    if not a and not b:
        return 1.0
    similarity = 1.0 - edit_distance(a, b) / max(len(a), len(b))
    return similarity if similarity >= ANLS_THRESHOLD else 0.0


# ---------------------------------------------------------------- public scoring API

def check_mode(mode: str) -> str:
    """Return ``mode`` if known, else raise a one-line :class:`UserError`."""
    if mode not in SCORING_MODES:
        raise UserError(f"unknown scoring mode {mode!r}; known modes: {', '.join(SCORING_MODES)}")
    return mode


def _default_match(answer: str, gold: str, choices: Optional[Sequence[str]]) -> bool:
    """InternVL's default: VQA match, or option-letter match, or math equivalence."""
    if _vqa_match(answer, gold):
        return True
    if _mc_gold_letter(gold, choices) is not None and _mc_match(answer, gold, choices):
        return True
    return _math_match(answer, gold)


def _single_value(answer: str, gold: str, mode: str, choices: Optional[Sequence[str]]) -> float:
    if mode == "anls":
        return anls(answer, gold)
    if mode in ("default", "multiple_choice"):
        match = (_default_match if mode == "default" else _mc_match)(answer, gold, choices)
    else:
        match = {"math": _math_match, "vqa": _vqa_match, "relaxed": _relaxed_match}[mode](answer, gold)
    return 1.0 if match else 0.0


def score_answer(answer: str, gold: Gold, mode: str = DEFAULT_MODE,
                 choices: Optional[Sequence[str]] = None) -> Score:
    """Score an already-extracted answer (e.g. a short greedy answer in evaluation).

    A list of golds means any of them is acceptable: the best value counts.
    """
    check_mode(mode)
    golds = [gold] if isinstance(gold, str) else list(gold)
    value = max((_single_value(answer, g, mode, choices) for g in golds), default=0.0)
    correct = value >= ANLS_THRESHOLD if mode == "anls" else value == 1.0
    return Score(answer=answer, correct=correct, value=value)


def score_response(response: str, gold: Gold, mode: str = DEFAULT_MODE,
                   choices: Optional[Sequence[str]] = None) -> Score:
    """Score a full reasoning response by its ``Final answer:``; no answer is wrong."""
    check_mode(mode)
    answer = extract_final_answer(response)
    if answer is None:
        return Score(answer=None, correct=False, value=0.0)
    return score_answer(answer, gold, mode, choices)


def answer_in(rejected_answer: Optional[str], chosen_answer: str) -> bool:
    """Whether a rejected response's answer contains the chosen one.

    InternVL skips such pairs: e.g. rejected "12 or 13" vs chosen "12" is not contrastive.
    """
    if rejected_answer is None:
        return False

    def squash(text: str) -> str:
        return " ".join(_clean(text).lower().split())

    chosen = squash(chosen_answer)
    return bool(chosen) and chosen in squash(rejected_answer)

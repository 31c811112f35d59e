"""Scoring sampled responses against gold answers (megatron_mpo.generation.scoring)."""

from __future__ import annotations

import threading

import math_verify
import pytest
from math_verify.errors import TimeoutException

from megatron_mpo.errors import UserError
from megatron_mpo.generation.scoring import (
    DEFAULT_MODE,
    SCORING_MODES,
    Score,
    answer_in,
    check_mode,
    extract_final_answer,
    score_answer,
    score_response,
)


def correct(answer: str, gold, mode: str = DEFAULT_MODE, choices=None) -> bool:
    return score_response(f"Let me think.\nFinal answer: {answer}", gold, mode, choices).correct


# ---------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("Steps...\nFinal answer: 12 cm", "12 cm"),
    ("final ANSWER: B.", "B"),
    ("**Final answer:** **7**", "7"),
    ("**Final answer**: 7", "7"),
    ("Final answer:\n\n  **42**\nThanks", "42"),
    ("Final answer: 3\nWait, I made an error.\nFinal answer: 4.", "4"),
    ("The answer: 3", "3"),
    ("Answer: 5\nextra text", "5"),
    ("Final answer: 9\nAnswer: 8", "9"),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("text", ["The result is 12.", "Reanswer: 3", "Final answer:   ", "Final answer: **.**", ""])
def test_no_final_answer(text):
    assert extract_final_answer(text) is None


def test_no_final_answer_is_a_negative_sample():
    assert score_response("The result is clearly 12.", "12", "math") == Score(None, False, 0.0)
    assert score_response("So x = 12", "12") == Score(None, False, 0.0)


def test_last_final_answer_wins():
    response = "Final answer: 12\nHmm, recheck: 3*5 = 15.\nFinal answer: 15"
    assert score_response(response, "15", "math").correct
    assert not score_response(response, "12", "math").correct


# ---------------------------------------------------------------- math

@pytest.mark.parametrize("answer, gold", [
    ("12 cm", "12"), ("12", "12 cm"), ("45°", "45"), ("$45^\\circ$", "45"),
    ("1/2", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "0.5"), ("$\\frac{1}{2}$", "1/2"),
    ("$\\sqrt{2}$", "\\sqrt{2}"), ("\\sqrt{2}", "$\\sqrt{2}$"), ("\\boxed{3}", "3"), ("$\\boxed{3}$", "3"),
    ("x = 5", "5"), ("1,200", "1200"), ("3.5 million", "3.5"), ("\\$12", "12"), ("2\\pi", "6.283185307"),
    ("(2, 3)", "(2,3)"),
])
def test_math_equivalent(answer, gold):
    assert correct(answer, gold, "math")


@pytest.mark.parametrize("answer, gold", [
    ("13 cm", "12"), ("46°", "45"), ("1/3", "\\frac{1}{2}"), ("0.25", "1/2"), ("$\\sqrt{3}$", "\\sqrt{2}"),
    ("\\boxed{4}", "3"), ("(2, 3)", "3"), ("2\\pi", "2"), ("x = 6", "5"),
])
def test_math_different(answer, gold):
    assert not correct(answer, gold, "math")


@pytest.mark.parametrize("answer, gold, expected", [
    ("0.5", "1/2", True), ("$\\frac{1}{2}$", "0.5", True), ("12 cm", "12", True), ("0.4", "1/2", False),
])
def test_default_mode_uses_math(answer, gold, expected):
    assert correct(answer, gold) is expected


def test_math_words_are_not_symbol_products():
    # Wrapped in $...$, math-verify would read "Paris" as p*a*r*i*s and accept "Pairs".
    assert not correct("Pairs", "Paris", "math")
    assert not correct("Paris", "Paris", "math")  # no math in it: math mode cannot say
    assert correct("Paris", "Paris")  # the default mode falls back to the VQA match


@pytest.mark.parametrize("answer", ["\\frac{{{", "$$$", "\\sqrt{", "}{", "\\left(", "1/0", "\\boxed{"])
def test_math_garbage_is_just_wrong(answer):
    assert not correct(answer, "3", "math")
    assert not correct(answer, "3")


@pytest.mark.parametrize("error", [RuntimeError("sympy blew up"), TimeoutException("Operation timed out!")])
def test_math_verify_exceptions_do_not_propagate(monkeypatch, error):
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(math_verify, "verify", boom)
    assert not correct("1/2", "0.5", "math")
    monkeypatch.setattr(math_verify, "parse", boom)
    assert not correct("1/2", "0.5", "math")


def test_math_in_a_worker_thread():
    results: list = []

    def work():
        try:
            results.append(score_response("Final answer: $\\frac{1}{2}$", "0.5", "math"))
            results.append(score_response("Final answer: 0.25", "1/2", "math"))
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert [getattr(r, "correct", r) for r in results] == [True, False]


# ---------------------------------------------------------------- vqa

@pytest.mark.parametrize("answer, gold, expected", [
    ("Yes.", "yes", True), ("yes, it is", "yes", True), ("No", "yes", False), ("No, it is not", "no", True),
    ("Yesterday", "yes", False), ("The cat", "cat", True), ("two", "2", True), ("3.5", "3.5", True),
    ("red car", "car", False), ("Red-car", "red car", True),
])
def test_vqa(answer, gold, expected):
    assert correct(answer, gold, "vqa") is expected


# ---------------------------------------------------------------- multiple choice

@pytest.mark.parametrize("answer", ["B", "(B)", "B.", "B) Paris", "B. Paris", "Option B", "The answer is B",
                                    "**B**", "answer: (B)"])
def test_option_letter_forms(answer):
    assert correct(answer, "B", "multiple_choice")
    assert not correct(answer, "C", "multiple_choice")
    assert correct(answer, "B")


@pytest.mark.parametrize("answer", ["A", "(C)", "D) Rome", "Option A", "none of them", "a"])
def test_wrong_option_letters(answer):
    assert not correct(answer, "B", "multiple_choice")


def test_option_text_and_letter_via_choices():
    choices = ["London", "Paris", "Rome"]
    assert correct("Paris", "B", "multiple_choice", choices)
    assert correct("paris.", "Paris", "multiple_choice", choices)  # gold given as option text
    assert correct("B", "Paris", "multiple_choice", choices)
    assert not correct("Rome", "B", "multiple_choice", choices)
    assert not correct("Paris", "B", "multiple_choice")  # no choices: no letter for the text
    assert not correct("London", "Paris", choices=choices)


# ---------------------------------------------------------------- relaxed and ANLS

@pytest.mark.parametrize("answer, gold, expected", [
    ("4.9", "5", True), ("5.25", "5", True), ("5.3", "5", False), ("4.7", "5", False), ("12%", "12", True),
    ("12.4%", "12", True), ("13%", "12", False), ("1,200", "1180", True), ("1,200", "1300", False), ("0", "0", True), ("0.01", "0", False),
    ("Apple", "apple", True), ("Pear", "apple", False),
])
def test_relaxed(answer, gold, expected):
    assert correct(answer, gold, "relaxed") is expected


def test_anls():
    typo = score_response("Final answer: Jonh Smith", "John Smith", "anls")
    assert typo.correct and typo.value == pytest.approx(0.8)
    unrelated = score_response("Final answer: invoice total", "John Smith", "anls")
    assert not unrelated.correct and unrelated.value == 0.0
    best = score_answer("2019-01-05", ["5 Jan 2019", "2019-01-05"], "anls")
    assert best.correct and best.value == 1.0
    assert score_answer("JOHN SMITH ", "john smith", "anls").value == 1.0


def test_gold_list_means_any():
    assert correct("12", ["twelve", "12"], "vqa")
    assert correct("Paris", ["paris", "Paris, France"])
    assert not correct("Rome", ["paris", "Paris, France"])


# ---------------------------------------------------------------- API

def test_score_answer_keeps_the_answer():
    assert score_answer("0.5", "1/2", "math") == Score("0.5", True, 1.0)
    assert score_answer("0.4", "1/2") == Score("0.4", False, 0.0)


def test_unknown_mode():
    assert all(check_mode(mode) == mode for mode in SCORING_MODES)
    with pytest.raises(UserError, match="known modes: default, math") as info:
        score_response("Final answer: 3", "3", "exact")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        score_answer("3", "3", "Math")
    with pytest.raises(UserError):
        check_mode("")


def test_answer_in():
    assert answer_in("12 or 13", "12")
    assert answer_in("**Paris**.", "paris")
    assert answer_in("The answer is B", "b")
    assert not answer_in("13", "12")
    assert not answer_in(None, "12")
    assert not answer_in("12", "")

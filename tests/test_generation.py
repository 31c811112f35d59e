"""The pair pipeline without a real model: prompts, question sets, sampling runs (a
scripted engine), pairs and the summary, preference accuracy from sidecars."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import List, Sequence

import pytest
from PIL import Image

from megatron_mpo.data import DataConfig, load_tokenizer
from megatron_mpo.data.samples import build_pair_builder
from megatron_mpo.errors import UserError
from megatron_mpo.generation.engines.base import Completion, Engine, SamplingSettings, prompt_seed
from megatron_mpo.generation.pairs import build_pairs, correctness_pairs, read_samples
from megatron_mpo.generation.prompts import REASONING_INSTRUCTION, build_prompt, reasoning_question
from megatron_mpo.generation.questions import load_questions
from megatron_mpo.generation.sampler import Sampler, check_run_record, make_parts, run_record, truncate_half


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(str(path))
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def builder(tok):
    return build_pair_builder(DataConfig(shards="x", max_length=400, max_tiles=4, template="internvl2_5"), tok,
                              image_size=56, tokens_per_tile=4)


def png(color=(200, 10, 10), size=(56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_questions(root: Path, records: List[dict], scoring: str = "vqa", name: str = "colors") -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for r in records:
        for path in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image") or []):
            if not path.startswith("..") and not path.startswith("missing") and not (root / "images" / path).exists():
                (root / "images" / path).write_bytes(png())
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = root / "meta.json"
    meta.write_text(json.dumps({name: {"root": "images", "annotation": f"{name}.jsonl", "scoring": scoring}}))
    return meta


# ---- prompts ------------------------------------------------------------------------------


def test_reasoning_prompt_strips_short_answer_suffix_and_keeps_images_first():
    q = reasoning_question("<image>\nWhat is shown? Answer the question using a single word or phrase.", 1)
    assert q == "<image>\n" + REASONING_INSTRUCTION + "What is shown?"
    assert reasoning_question("Which is larger? Please answer Yes or No.", 0).endswith("Which is larger?")
    two = reasoning_question("Compare them.", 2)
    assert two.startswith("<image>\n<image>\n" + "Your task")
    assert reasoning_question("<image> <image> too many", 1) is None


def test_generation_prompt_is_the_training_prompt(builder):
    """One prompt rule: the ids an engine gets are the trained pair's prompt ids."""
    images = [png(size=(112, 56))]
    pair = builder.build("k", {"question": "What color?", "chosen": "red", "rejected": "blue"}, images)
    prompt = build_prompt(builder, "k", "What color?", images)
    assert prompt.ids == pair.prompt
    assert prompt.pixel_values.shape == pair.pixel_values.shape and prompt.num_tiles == 3  # 2 tiles + thumbnail
    assert "<image>" in prompt.text and prompt.text.endswith("<|im_start|>assistant\n")
    with_prefix = build_prompt(builder, "k", "What color?", [], prefix="The shape is")
    assert with_prefix.ids[len(builder.prompt("What color?", [])[0]):] == builder.answer_ids("The shape is")


def test_prompt_over_max_length_is_counted_not_cut(tok):
    short = build_pair_builder(DataConfig(shards="x", max_length=40, max_tiles=4, template="internvl2_5"), tok,
                               image_size=56, tokens_per_tile=4)
    from megatron_mpo.data.samples import SampleError

    with pytest.raises(SampleError) as info:
        build_prompt(short, "k", "What color?", [png(size=(224, 56))])
    assert info.value.reason == "prompt_too_long"


def test_truncate_half_cuts_at_a_word_boundary_near_the_middle():
    text = "The circle in the picture is clearly red today"
    cut = truncate_half(text)
    assert text.startswith(cut) and not cut.endswith(" ") and abs(len(cut) - len(text) / 2) <= 6
    assert text[len(cut)] == " "
    assert truncate_half("abcdef") == "abc"


def test_sampling_settings_refuse_nonsense():
    with pytest.raises(UserError):
        SamplingSettings(n=0)
    with pytest.raises(UserError):
        SamplingSettings(n=4, temperature=0.0)
    assert prompt_seed(0, "a") != prompt_seed(0, "b") and prompt_seed(0, "a") == prompt_seed(0, "a")


# ---- question sets --------------------------------------------------------------------------


def test_question_set_counts_bad_records_and_keeps_good_ones(tmp_path):
    (tmp_path / "outside.png").write_bytes(png())
    meta = write_questions(tmp_path, [
        {"image": "a.png", "question": "Q1", "answer": "red"},
        {"image": "missing.png", "question": "Q2", "answer": "red"},
        {"image": "../outside.png", "question": "Q3", "answer": "red"},
        {"image": "a.png", "question": "", "answer": "red"},
        {"image": "a.png", "question": "Q5", "answer": {"x": 1}},
        {"question": "text only, no ground truth"},
        {"image": "a.png", "question": "Q7", "answer": 42},
    ])
    with open(tmp_path / "colors.jsonl", "a") as f:
        f.write("{not json\n")
    qset = load_questions(str(meta))
    assert [q.question for q in qset.questions] == ["Q1", "text only, no ground truth", "Q7"]
    assert qset.questions[2].answer == "42" and qset.questions[1].answer is None
    assert qset.refused == Counter(missing_image=1, outside_root=1, missing_question=1, bad_answer=1, bad_json=1)
    assert all(q.mode == "vqa" for q in qset.questions)
    assert len({q.key for q in qset.questions}) == 3


def test_unknown_scoring_mode_is_one_line(tmp_path):
    meta = write_questions(tmp_path, [{"image": "a.png", "question": "Q", "answer": "1"}], scoring="fuzzy")
    with pytest.raises(UserError, match="unknown scoring mode 'fuzzy'"):
        load_questions(str(meta))


# ---- a scripted engine -------------------------------------------------------------------------


class ScriptedEngine(Engine):
    """Answers from a table by question text; may fail on demand."""

    name = "scripted"

    def __init__(self, answers: dict, fail_batches_over: int = 0, fail_keys: Sequence[str] = ()):
        self.answers, self.fail_batches_over, self.fail_keys = answers, fail_batches_over, set(fail_keys)
        self.calls: List[List[str]] = []

    def generate(self, prompts, settings):
        self.calls.append([p.key for p in prompts])
        if self.fail_batches_over and len(prompts) > self.fail_batches_over:
            raise RuntimeError("CUDA out of memory (scripted)")
        if any(p.key in self.fail_keys for p in prompts):
            raise RuntimeError("engine crashed (scripted)")
        out = []
        for p in prompts:
            if p.prefix:  # Dropout NTP continuation: the blind model goes elsewhere
                out.append([Completion(" but it is dark.", 5, True)])
                continue
            texts = next(v for k, v in self.answers.items() if k in p.text)
            out.append([Completion(texts[i % len(texts)], 4, True) for i in range(settings.n)])
        return out


def sample_run(tmp_path: Path, builder, engine: Engine, records: List[dict], n: int = 4, part_size: int = 2,
               rank: int = 0, world: int = 1, **kw):
    meta = write_questions(tmp_path / "q", records)
    qset = load_questions(str(meta))
    parts = make_parts(qset, part_size)
    settings = SamplingSettings(n=n, max_new_tokens=8, seed=3)
    out = tmp_path / "samples"
    check_run_record(str(out), run_record(model="m", engine=engine.describe(), settings=settings,
                                          prompt_style="reasoning", dropout_ntp=kw.get("dropout_ntp", True),
                                          meta=str(meta), parts=parts, builder=builder))
    counts = Sampler(engine, builder, settings, str(out), log=lambda _m: None, **kw).run(parts, rank, world)
    return out, parts, counts


RECORDS = [
    {"image": "a.png", "question": "Q-mixed", "answer": "red"},
    {"image": "b.png", "question": "Q-allright", "answer": "blue"},
    {"image": "c.png", "question": "Q-allwrong", "answer": "green"},
    {"image": "d.png", "question": "Q-noanswer"},
    {"image": "e.png", "question": "Q-entail", "answer": "red"},
]
ANSWERS = {
    "Q-mixed": ["It is red. Final answer: red", "Final answer: blue", "I am not sure.", "Final answer: red"],
    "Q-allright": ["Final answer: blue"],
    "Q-allwrong": ["Final answer: red", "Final answer: yellow"],
    "Q-noanswer": ["The picture shows a large red circle on white."],
    "Q-entail": ["Final answer: red", "Final answer: dark red"],
}


def test_sampling_then_pairs_counts_everything(tmp_path, builder):
    out, parts, counts = sample_run(tmp_path, builder, ScriptedEngine(ANSWERS), RECORDS)
    assert [p.name for p in parts] == ["000-colors-000000", "000-colors-000001", "000-colors-000002"]
    run, records = read_samples(str(out))
    assert run["sampling"]["seed"] == 3 and len(records) == 5
    ntp = next(r for r in records if r["kind"] == "dropout_ntp")
    assert ntp["prefix"] == truncate_half(ANSWERS["Q-noanswer"][0])
    summary = build_pairs(str(out), str(tmp_path / "pairs"), max_pairs_per_question=3, log=lambda _m: None)
    # Q-mixed: 2 right x 2 wrong (one without a final answer) = 4, capped at 3
    assert summary["questions"] == 5 and summary["pairs"] == 3 and summary["capped_pairs"] == 1
    assert summary["all_correct"] == 1 and summary["all_wrong"] == 1
    assert summary["no_final_answer"] == 1 and summary["entailment_skips"] == 4  # 2 x 2: "dark red" contains "red"
    assert summary["dropout_ntp_pairs"] == 1 and summary["samples"] == 4 * 4 + 2
    meta = json.loads((tmp_path / "pairs" / "meta.json").read_text())
    assert set(meta) == {"colors_correctness", "colors_dropout_ntp"}
    rows = [json.loads(x) for x in (tmp_path / "pairs" / "colors_correctness.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["source"]["kind"] == "correctness" for r in rows)
    assert all("Final answer: red" in r["chosen"] and "red" not in r["rejected"].split(":")[-1] for r in rows)
    assert rows[0]["question"].startswith("<image>\n" + REASONING_INSTRUCTION)
    ntp_row = json.loads((tmp_path / "pairs" / "colors_dropout_ntp.jsonl").read_text())
    assert ntp_row["rejected"] == ntp["prefix"] + " but it is dark." and ntp_row["question"] == "Q-noanswer"
    assert Path(meta["colors_correctness"]["root"]).is_absolute()


def test_pairs_go_through_make_shards_unchanged(tmp_path, builder):
    out, _, _ = sample_run(tmp_path, builder, ScriptedEngine(ANSWERS), RECORDS)
    build_pairs(str(out), str(tmp_path / "pairs"), log=lambda _m: None)
    from tests.conftest import run_tool

    run_tool("tools/make_shards.py", "--meta", str(tmp_path / "pairs" / "meta.json"), "--out", str(tmp_path / "shards"))
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 4 + 1  # Q-mixed 4 pairs (no cap) + 1 Dropout NTP


def test_rerun_does_only_missing_parts_and_reproduces(tmp_path, builder):
    engine = ScriptedEngine(ANSWERS)
    out, parts, _ = sample_run(tmp_path, builder, engine, RECORDS)
    first = {p.name: (out / "samples" / f"{p.name}.jsonl").read_text() for p in parts}
    (out / "samples" / f"{parts[1].name}.jsonl").unlink()  # a killed run: this part never finished
    engine.calls.clear()
    sample_run(tmp_path, builder, engine, RECORDS)
    asked = {k for call in engine.calls for k in call}
    assert asked == {q.key for q in parts[1].questions}
    assert {p.name: (out / "samples" / f"{p.name}.jsonl").read_text() for p in parts} == first


def test_rerun_with_other_settings_is_refused(tmp_path, builder):
    sample_run(tmp_path, builder, ScriptedEngine(ANSWERS), RECORDS)
    with pytest.raises(UserError, match="other settings"):
        sample_run(tmp_path, builder, ScriptedEngine(ANSWERS), RECORDS, n=2)


def test_pairs_refuse_while_parts_are_missing(tmp_path, builder):
    out, parts, _ = sample_run(tmp_path, builder, ScriptedEngine(ANSWERS), RECORDS, rank=0, world=2)
    with pytest.raises(UserError, match="1 of 3 sample parts are missing"):
        build_pairs(str(out), str(tmp_path / "pairs"), log=lambda _m: None)
    sample_run(tmp_path, builder, ScriptedEngine(ANSWERS), RECORDS, rank=1, world=2)
    assert build_pairs(str(out), str(tmp_path / "pairs"), log=lambda _m: None)["questions"] == 5


def test_failed_batches_are_retried_smaller_then_counted(tmp_path, builder):
    engine = ScriptedEngine(ANSWERS, fail_batches_over=1, fail_keys=["colors-0/3"])
    out, _, counts = sample_run(tmp_path, builder, engine, RECORDS[:3], part_size=3)
    assert counts["generation_failed"] == 1  # Q-allwrong fails alone too (split in halves as well)
    _, records = read_samples(str(out))
    by_q = {r["question"]: r for r in records}
    assert by_q["Q-allwrong"]["error"] == "generation_failed" and "crashed" in by_q["Q-allwrong"]["detail"]
    assert len(by_q["Q-mixed"]["responses"]) == 4 and len(by_q["Q-allright"]["responses"]) == 4
    assert [len(c) for c in engine.calls][:4] == [3, 1, 1, 1]


def test_empty_and_non_utf8_generations_are_counted_and_unused(tmp_path, builder):
    answers = {"Q-mixed": ["Final answer: red", "   ", "Final answer: bl\ufffd", "Final answer: blue"]}
    out, _, counts = sample_run(tmp_path, builder, ScriptedEngine(answers), RECORDS[:1])
    assert counts["empty_generation"] == 1 and counts["non_utf8_generation"] == 1
    summary = build_pairs(str(out), str(tmp_path / "pairs"), log=lambda _m: None)
    assert summary["samples"] == 2 and summary["pairs"] == 1


def test_without_dropout_ntp_unanswered_questions_are_refused(tmp_path, builder):
    out, _, counts = sample_run(tmp_path, builder, ScriptedEngine(ANSWERS), RECORDS, dropout_ntp=False)
    assert counts["no_answer"] == 1
    summary = build_pairs(str(out), str(tmp_path / "pairs"), log=lambda _m: None)
    assert summary["refused_no_answer"] == 1 and summary["dropout_ntp_pairs"] == 0


def test_image_removed_after_reading_is_counted(tmp_path, builder):
    meta = write_questions(tmp_path / "q", RECORDS[:2])
    qset = load_questions(str(meta))
    (tmp_path / "q" / "images" / "a.png").unlink()
    counts = Sampler(ScriptedEngine(ANSWERS), builder, SamplingSettings(n=2), str(tmp_path / "s"),
                     log=lambda _m: None).run(make_parts(qset, 8))
    assert counts["missing_image"] == 1


def test_correctness_pairs_are_seeded_and_capped():
    import random

    record = {"answer": "4", "mode": "math", "responses": [{"text": f"Final answer: {t}"} for t in
                                                          ("4", "2+2", "\\frac{8}{2}", "5", "3", "7")]}
    a = correctness_pairs(record, Counter(), 4, random.Random("s"))
    b = correctness_pairs(record, Counter(), 4, random.Random("s"))
    assert a == b and len(a) == 4
    counts = Counter()
    assert len(correctness_pairs(record, counts, None, random.Random(0))) == 9 and counts["pairs"] == 9


# ---- preference accuracy ---------------------------------------------------------------------


def test_preference_accuracy_uses_margins_not_raw_sums(tmp_path):
    from megatron_mpo.data.refs import write_ref_logps
    from megatron_mpo.generation.evaluation import preference_accuracy

    fp = {"checkpoint": "init", "template": "internvl2_5", "max_length": 64}
    # reference: chosen responses are long (low sums); the policy raised chosen and lowered rejected
    ref = {"a": (-40.0, -10.0, 20, 5), "b": (-30.0, -12.0, 15, 6), "c": (-8.0, -9.0, 4, 4)}
    pol = {"a": (-38.0, -11.0, 20, 5), "b": (-29.0, -13.0, 15, 6), "c": (-9.0, -8.0, 4, 4)}
    write_ref_logps(str(tmp_path / "ref"), "s0", ref, fingerprint=fp)
    write_ref_logps(str(tmp_path / "pol"), "s0", pol, fingerprint={**fp, "checkpoint": "step_10"})
    result = preference_accuracy(str(tmp_path / "pol"), str(tmp_path / "ref"))
    assert result["pairs"] == 3 and result["reward_accuracy"] == pytest.approx(2 / 3)
    # raw sums would say 1/3 (only c has the larger chosen sum); per token: a -1.9 > -2.2, b -1.93 > -2.17
    assert result["per_token_logp_accuracy"] == pytest.approx(2 / 3)
    assert result["mean_logp_margin"] == pytest.approx((3 + 2 - 2) / 3)
    write_ref_logps(str(tmp_path / "pol2"), "s0", pol, fingerprint={**fp, "max_length": 32})
    with pytest.raises(UserError, match="max_length"):
        preference_accuracy(str(tmp_path / "pol2"), str(tmp_path / "ref"))


def test_no_pair_at_all_is_an_error_with_the_counts_kept(tmp_path, builder):
    out, _, _ = sample_run(tmp_path, builder, ScriptedEngine(ANSWERS), RECORDS[1:3], dropout_ntp=False)
    with pytest.raises(UserError, match="1 questions all right, 1 all wrong"):
        build_pairs(str(out), str(tmp_path / "pairs"), log=lambda _m: None)
    assert json.loads((tmp_path / "pairs" / "summary.json").read_text())["all_wrong"] == 1
    assert not (tmp_path / "pairs" / "meta.json").exists()  # nothing for make_shards to pick up

"""The transformers engine on a real tiny InternVL (exported from a Megatron model dir by
the project's converter): seeded, reproducible sampling whatever the rank layout, greedy
batching, no image tokens generated; the sampling tool under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_tool
from tests.distributed import launch
from tests.test_generation import png, write_questions


@pytest.fixture(scope="module")
def engine_setup(workspace, tmp_path_factory):
    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.generation.engines import make_engine
    from megatron_mpo.generation.model_source import prompt_builder, resolve_model

    work = tmp_path_factory.mktemp("engine")
    model = resolve_model(str(workspace / "init"), "transformers", str(work), log=lambda _m: None)
    tok = load_tokenizer(model.tokenizer_dir)
    builder = prompt_builder(model, tok, max_length=512, max_tiles=4)
    return model, tok, builder, make_engine("transformers", model.hf_dir, tok, device="cpu")


def test_export_is_native_and_reused(engine_setup, workspace, tmp_path):
    model, *_ = engine_setup
    assert json.loads((Path(model.hf_dir) / "config.json").read_text())["architectures"] == [
        "InternVLForConditionalGeneration"]
    from megatron_mpo.generation.model_source import resolve_model

    logs = []
    again = resolve_model(str(workspace / "init"), "transformers", str(Path(model.hf_dir).parent), log=logs.append)
    assert again.hf_dir == model.hf_dir and any("reusing" in m for m in logs)


def test_sampling_is_seeded_per_question(engine_setup):
    from megatron_mpo.generation.engines import SamplingSettings
    from megatron_mpo.generation.prompts import build_prompt

    _, tok, builder, engine = engine_setup
    a = build_prompt(builder, "q/a", "What color is it?", [png()])
    b = build_prompt(builder, "q/b", "Which shape is this?", [png((10, 10, 200), (112, 56))])
    settings = SamplingSettings(n=4, max_new_tokens=12, seed=7)
    alone = engine.generate([a], settings)[0]
    together = engine.generate([b, a], settings)
    assert [c.text for c in together[1]] == [c.text for c in alone]  # not the batch, not the order
    assert len({c.text for c in alone}) > 1  # temperature 1: the 4 samples differ
    other_seed = engine.generate([a], SamplingSettings(n=4, max_new_tokens=12, seed=8))[0]
    assert [c.text for c in other_seed] != [c.text for c in alone]
    image_tokens = ("<img>", "</img>", "<IMG_CONTEXT>")
    assert all(c.tokens <= 12 and not any(t in c.text for t in image_tokens) for c in alone + together[0])


def test_greedy_batches_equal_single_prompts(engine_setup):
    from megatron_mpo.generation.engines import SamplingSettings
    from megatron_mpo.generation.prompts import build_prompt

    _, _, builder, engine = engine_setup
    prompts = [build_prompt(builder, f"k{i}", q, [png()] * n) for i, (q, n) in
               enumerate([("Short?", 1), ("A much longer question about the picture here?", 1), ("Text only", 0)])]
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=10)
    batched = engine.generate(prompts, greedy)  # left-padded together
    single = [engine.generate([p], greedy)[0] for p in prompts]
    assert [c[0].text for c in batched] == [c[0].text for c in single]


def test_sampling_tool_under_torchrun_matches_one_process(workspace, tmp_path):
    """2 ranks split the questions; every question's samples equal the 1-process run's."""
    records = [{"image": f"{i}.png", "question": f"Question {i}?", "answer": "red"} for i in range(5)]
    records.append({"image": "5.png", "question": "Describe it."})  # Dropout NTP
    meta = write_questions(tmp_path / "q", records)
    common = ["--questions", str(meta), "--model", str(workspace / "init"), "-n", "3", "--max-new-tokens", "8",
              "--part-size", "2", "--max-tiles", "2", "--device", "cpu", "--seed", "11"]
    run_tool("tools/sample_responses.py", *common, "--out", str(tmp_path / "one"), timeout=300)
    proc = launch("tools/sample_responses.py", 2, *common, "--out", str(tmp_path / "two"), timeout=300)
    assert "[rank 1] part" in proc.stdout + proc.stderr

    def samples(out):
        from megatron_mpo.generation.pairs import read_samples

        return {r["key"]: (r.get("responses"), r.get("chosen"), r.get("continuation"))
                for r in read_samples(str(out))[1]}

    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert one == two and len(one) == 6 and all(v[0] and len(v[0]) == 3 for k, v in one.items() if "/6" not in k)
    printed = run_tool("tools/build_pairs.py", "--samples", str(tmp_path / "one"), "--out", str(tmp_path / "pairs"))
    assert "questions 6" in printed.stdout
    written = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert written["questions"] == 6 and written["samples"] <= 5 * 3 + 2


def test_evaluate_refuses_when_every_prompt_is_too_long(workspace, tmp_path):
    """The old evaluator's trap: a fixed max_length made every sample prompt_too_long, exit 0."""
    meta = write_questions(tmp_path / "q", [{"image": "a.png", "question": "What color?", "answer": "red"}])
    proc = run_tool("-m megatron_mpo.evaluate", "--ckpt", str(workspace / "init"), "--out", str(tmp_path / "e"),
                    "--questions", str(meta), "--max-length", "12", "--device", "cpu", check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "no held-out question could be asked" in line and "raise --max-length (now 12)" in line, line

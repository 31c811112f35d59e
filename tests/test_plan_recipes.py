"""The planner on the recipes and as a command: every recipe fits the hardware its header
declares, and the memory figures its header states agree with the planner; the command's
report, its refusals, the time arithmetic and the trainer's two memory lines."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

from megatron_mpo.plan.memory import GIB

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"
NODE = 8  # every header: "on 8x H100-80GB nodes"
GB = 1e9  # the headers' unit


def _header(name: str) -> str:
    """A recipe's leading comment block as one line of text."""
    lines = []
    for line in (RECIPES / f"{name}.yaml").read_text().splitlines():
        if line and not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(" ".join(lines).split())


@lru_cache(maxsize=None)
def _plan(name: str, gpus: int, overrides: tuple = (), fill: float = 0.5, tiles=None):
    from megatron_mpo.config import load_config
    from megatron_mpo.plan.run import Assumptions, Hardware, layout_of, make_plan, model_of
    from megatron_mpo.plan.timing import gpu_kind

    path = str(RECIPES / f"{name}.yaml")
    cfg = load_config(path, list(overrides))
    model = model_of(cfg, path)
    return make_plan(cfg, model, layout_of(cfg, model, gpus), Hardware(gpus=gpus, gpu=gpu_kind("H100")),
                     Assumptions(fill=fill, tiles=tiles, pairs=0))


# The hardware each header declares: the fewest nodes it names (quoted) and whether a
# worst-case pair (both rows at data.max_length, the most tiles) fits there. The three that
# do not, say so in their headers.
DECLARED = {
    "internvl2_1b": (1, "fit on one GPU", True),
    "internvl2_2b": (1, "fit on one H100", True),
    "internvl2_8b": (1, "1 node works", True),
    "internvl2_26b": (2, "use >= 2 nodes", True),
    "internvl2_76b": (8, "use >= 8 nodes", True),
    "internvl3_8b": (1, "1 node works", True),
    "internvl3_78b": (4, "use >= 4 nodes", True),
    "internvl3_5_8b": (1, "1 node works", True),
    "internvl3_5_38b": (4, "use >= 4 nodes", True),
    "internvl3_5_30b_a3b": (2, "use >= 2 nodes", False),
    "internvl3_5_241b_a28b": (16, "use 16", False),
}


def test_every_recipe_is_declared():
    assert set(DECLARED) == {p.stem for p in RECIPES.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_recipe_fits_its_declared_gpus(name):
    nodes, quote, worst_fits = DECLARED[name]
    header = _header(name)
    assert "on 8x H100-80GB nodes" in header and quote in header
    plan = _plan(name, nodes * NODE)
    usable = plan.hardware.usable
    print(f"{name} on {nodes} node(s): worst {plan.worst().total / GIB:.1f} GiB, typical "
          f"{plan.typical().total / GIB:.1f} GiB, usable {usable / GIB:.1f} GiB")
    assert plan.fits("typical")
    assert plan.fits("worst") == worst_fits
    if name in ("internvl2_1b", "internvl2_2b"):  # "fit on one GPU": the worst case at DP 1
        assert _plan(name, 1).fits("worst")


def _stage(s: int, what):
    return lambda plan: what(plan.stage(s))


def _typical(s: int):
    return lambda plan: plan.memory["typical"][s].total


WORST = lambda plan: plan.worst()  # noqa: E731
STATE = lambda m: m.model_state  # noqa: E731
ACTIVATIONS = lambda m: m.activations  # noqa: E731
OPTIMIZER = lambda m: m.master + m.adam  # noqa: E731
CHECKPOINTS = lambda m: m.in_flight * m.micro_batch.stored  # noqa: E731
TOTAL = lambda m: m.total  # noqa: E731

# (recipe, the header's words, GPUs, overrides, (fill, tiles), planner quantity, the header's GB)
CLAIMS = [
    ("internvl3_8b", "~39 GB of activations per GPU", 8, (), None, lambda p: p.worst().activations, 39),
    ("internvl3_8b", "~24 GB of weights, gradients and sharded Adam state at DP 2", 8, (), None,
     lambda p: p.worst().model_state, 24),
    ("internvl3_5_8b", "~55 GB of activations per GPU at TP4", 8, ("parallel.tensor=4",), None,
     lambda p: p.worst().activations, 55),
    ("internvl3_5_8b", "~26 GB of weights, gradients and Adam state (DP 2)", 8, ("parallel.tensor=4",), None,
     lambda p: p.worst().model_state, 26),
    ("internvl3_5_8b", "~29 GB at TP8", 8, (), None, lambda p: p.worst().activations, 29),
    ("internvl3_5_8b", "(~40 GB in all)", 8, ("parallel.tensor=4", "model.recompute=full"), None,
     lambda p: p.worst().total, 40),
    ("internvl3_5_38b", "would need ~64 GB of them", 32, ("model.recompute=null",), None, _stage(1, ACTIVATIONS), 64),
    ("internvl3_5_38b", "on top of ~22 GB of weights, gradients and Adam state (DP 1)", 32, (), None,
     _stage(1, STATE), 22),
    ("internvl3_5_38b", "keeps only each layer's input (~2.5 GB)", 32, (), None, _stage(1, CHECKPOINTS), 2.5),
    ("internvl3_78b", "would need ~45 GB of them", 64, ("model.recompute=null",), None, _stage(1, ACTIVATIONS), 45),
    ("internvl3_78b", "on top of ~32 GB of weights, gradients and Adam state (DP 2)", 64, (), None,
     _stage(1, STATE), 32),
    ("internvl3_78b", "keeps only each layer's input (~2.5 GB)", 64, (), None, _stage(1, CHECKPOINTS), 2.5),
    ("internvl2_26b", "at DP 1 the fp32 Adam state alone is ~38 GB per GPU", 8, (), None,
     lambda p: p.worst().master + p.worst().adam, 38),
    ("internvl2_76b", "at DP 1 the fp32 Adam state is ~32 GB per GPU", 32, (), None, _stage(3, OPTIMIZER), 32),
    ("internvl2_76b", "pairs fit (~74 GB on stage 0 at 8 nodes)", 64, ("model.recompute=null",), None,
     _typical(0), 74),
    ("internvl2_76b", "would need ~113 GB there", 64, ("model.recompute=null",), None, _stage(0, TOTAL), 113),
    ("internvl2_76b", "InternVL3-78B recipe does: ~40 GB per GPU", 64, (), None, lambda p: p.worst().total, 40),
    ("internvl3_5_30b_a3b", "weights 11.0", 16, (), None, _stage(0, lambda m: m.weights), 11.0),
    ("internvl3_5_30b_a3b", "grads 21.9", 16, (), None, _stage(0, lambda m: m.grads), 21.9),
    ("internvl3_5_30b_a3b", "dense master/Adam 1.86 x 12 / 16 = 1.4", 16, (), None,
     _stage(0, lambda m: m.params.dense * 12 / 16), 1.4),
    ("internvl3_5_30b_a3b", "expert master/Adam 3.62 x 12 / 2 = 21.7", 16, (), None,
     _stage(0, lambda m: m.params.experts * 12 / 2), 21.7),
    ("internvl3_5_30b_a3b", "-> 56 GB before activations", 16, (), None, _stage(0, STATE), 56),
    ("internvl3_5_30b_a3b", "the expert master/Adam alone is 43.5 GB -> 79 GB", 8, (), None, _stage(0, STATE), 79),
    ("internvl3_5_30b_a3b", "4 nodes (DP 32, expert-DP 4): 44 GB", 32, (), None, _stage(0, STATE), 44),
    ("internvl3_5_30b_a3b", "A typical MMPR pair needs ~66 GB in all at 2 nodes", 16, (), (0.25, None),
     _typical(0), 66),
    ("internvl3_5_30b_a3b", "pairs of ~16k tokens reach ~76 GB", 16, (), (0.5, None), _typical(0), 76),
    ("internvl3_5_30b_a3b", "~95 GB: it would run out of memory", 16, (), None, _stage(0, TOTAL), 95),
    ("internvl3_5_241b_a28b", "stage 1 (13 layers) 53 GB", 128, (), None, _stage(1, STATE), 53),
    ("internvl3_5_241b_a28b", "stages 5-6 (14) 58 GB", 128, (), None, _stage(5, STATE), 58),
    ("internvl3_5_241b_a28b", "last (12 + output layer) 54 GB", 128, (), None, _stage(7, STATE), 54),
    ("internvl3_5_241b_a28b", "+ 2 layers 8.2 -> 54 GB", 128, (), None, _stage(0, STATE), 54),
    ("internvl3_5_241b_a28b", "6.0 GB per layer -> 78 GB on stage 1", 64, (), None, _stage(1, STATE), 78),
    ("internvl3_5_241b_a28b", "3.2 GB per layer -> 41 GB on stage 1", 256, (), None, _stage(1, STATE), 41),
    ("internvl3_5_241b_a28b", "(-> ~61 GB)", 128, (), (0.25, 5), _typical(1), 61),
    ("internvl3_5_241b_a28b", "(~0.9 GB per 1k tokens; -> ~63 GB)", 128, (), (0.25, 5), _typical(7), 63),
    ("internvl3_5_241b_a28b", "and a rebuilt MoE layer (-> ~70 GB)", 128, (), (0.25, 5), _typical(0), 70),
    ("internvl3_5_241b_a28b", "pairs of ~16k tokens bring stage 1 and the last stage to ~70-73 GB", 128, (),
     (0.5, 5), lambda p: (p.memory["typical"][1].total + p.memory["typical"][7].total) / 2, 71.5),
    ("internvl3_5_241b_a28b", "would not fit (85-95 GB)", 128, (), None,
     lambda p: (p.stage(1).total + p.stage(7).total) / 2, 90),
    ("internvl3_5_241b_a28b", "next to worst-case rows -> ~100 GB", 128, (), None, _stage(0, TOTAL), 100),
]


@pytest.mark.parametrize("name,quote,gpus,overrides,typical,quantity,stated", CLAIMS,
                         ids=[f"{c[0]}:{c[1][:40]}" for c in CLAIMS])
def test_recipe_header_figures_agree_with_the_planner(name, quote, gpus, overrides, typical, quantity, stated):
    """The headers' "~" figures are rounded: within 10 %."""
    assert quote in _header(name), f"{name}'s header no longer says {quote!r}"
    fill, tiles = typical or (0.5, None)
    value = quantity(_plan(name, gpus, overrides, fill, tiles)) / GB
    print(f"{name}: {quote!r}: header {stated:g} GB, planner {value:.1f} GB")
    assert value == pytest.approx(stated, rel=0.10)


# ---- the command -------------------------------------------------------------------------------


def _run(capsys, *argv):
    from megatron_mpo.plan.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_command_reports_fit_time_and_layouts(capsys):
    recipe = str(RECIPES / "internvl3_8b.yaml")
    code, out, err = _run(capsys, "--config", recipe, "--gpus", "8", "--pairs", "100000", "--suggest", "3")
    assert code == 0, err
    assert "InternVL3-8B on 8 x NVIDIA H100 80GB HBM3 (79.6 GiB)" in out
    assert "layout: TP4 x PP1, DP 2, SP, recompute off; 128 micro-batches of 1 pair per rank per step" in out
    assert re.search(r"^fits: the fullest rank \(stage 0\) needs [\d.]+ GiB in the worst case", out, re.M)
    assert "this layout fits a typical pair from 4 GPUs, the worst case from 4" in out
    assert "390 steps per epoch (100,000 pairs, --pairs)" in out  # floor(100000 / 256)
    assert "at MFU 0.25" in out  # FP8 recipe: the stated default against the fp8 peak
    lines = out.split("layouts that fit 8 x NVIDIA H100 80GB HBM3, fastest first:\n")[1].splitlines()
    assert len(lines) == 3 and lines[0].endswith(" typical: TP4 x PP1, DP 2, SP, recompute off")

    code, out, _ = _run(capsys, "--config", recipe, "--gpus", "8", "--pairs", "100000", "--suggest", "0",
                        "train.epochs=2.5")
    assert code == 0 and "  the run: 976 steps (train.epochs 2.5) -> " in out  # floor(2.5 x 100000 / 256)

    code, out, err = _run(capsys, "--config", recipe, "--suggest", "0")  # no --gpus: the fewest that fit
    assert code == 0 and "InternVL3-8B on 4 x NVIDIA H100" in out and "layouts that fit" not in out


@pytest.mark.parametrize("argv,message", [
    (["--gpu", "Z100"], "error: unknown --gpu 'Z100'; use one of H100, H200"),
    (["--gpus", "6"], "error: 6 GPUs do not hold whole tensor x pipeline x expert = 4 groups"),
    (["--gpus", "8", "parallel.tensr=2"], "error: unknown config key 'parallel.tensr'"),
    (["--gpus", "8", "--fill", "1.5"], "error: --fill must be in (0, 1]"),
    (["--gpus", "8", "--gpu", "NVIDIA L40S"], "error: --gpu 'NVIDIA L40S': give its memory with --gpu-memory-gib"),
])
def test_command_refuses_bad_input_in_one_line(capsys, argv, message):
    code, out, err = _run(capsys, "--config", str(RECIPES / "internvl3_8b.yaml"), "--suggest", "0", *argv)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


def test_command_needs_the_architecture_of_an_unconverted_model(capsys, tmp_path):
    text = (RECIPES / "internvl3_8b.yaml").read_text().replace("# preset: InternVL3-8B\n", "")
    config = tmp_path / "run.yaml"
    config.write_text(text)
    code, _, err = _run(capsys, "--config", str(config), "--gpus", "8", "--suggest", "0")
    assert code == 2 and "name the architecture with --preset NAME" in err
    code, out, _ = _run(capsys, "--config", str(config), "--gpus", "8", "--suggest", "0", "--preset", "InternVL3-8B")
    assert code == 0 and "InternVL3-8B on 8 x" in out


def test_default_mfu_is_stated_with_its_source(capsys):
    from megatron_mpo.plan.cli import build_parser
    from megatron_mpo.plan.timing import GPU_KINDS, default_mfu
    from megatron_mpo.training.flops import NOMINAL_PEAKS

    assert all(kind.name in NOMINAL_PEAKS for kind in GPU_KINDS.values())  # one peak table

    assert default_mfu(False) == 0.41 and default_mfu(True) == pytest.approx(0.41 * 1.2 / 2)
    text = " ".join(build_parser().format_help().split())
    assert "Megatron-LM README" in text and "41 %" in text and "1.2-1.5x" in text


# ---- rows, FLOPs and time ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_rows_and_step_flops_match_a_collated_micro_batch(layout):
    """The planner's rows count what the loader's collation builds, and a step's FLOPs are
    the trainer's FlopCounter on that micro-batch times the micro-batches."""
    import torch

    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.data.samples import TokenizedPair
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.plan.activations import Rows
    from megatron_mpo.plan.params import Parallelism
    from megatron_mpo.plan.timing import gpu_kind, step_time
    from megatron_mpo.training.flops import FlopCounter

    model = get_preset("tiny")
    tpt, image = model.tokens_per_tile, model.img_context_token_id
    prompt = [3] * 20 + [image] * (3 * tpt) + [4] * 9
    pairs = [TokenizedPair(f"s/{i}", prompt, [5] * 17, [6] * 17, torch.zeros(3, 3, 56, 56)) for i in range(2)]
    batch = collate_pairs(pairs, 0, image, tpt, pad_multiple=8, layout=layout, row_length=None, max_pairs_per_row=1)
    rows = Rows(pairs=2, prompt=len(prompt), response=17, tiles=3, packed=layout == "packed", pad_multiple=8,
                tokens_per_tile=tpt)
    assert rows.row_length == batch.input_ids.shape[1] and rows.tokens == batch.num_tokens()
    assert rows.scored == int(batch.response_mask().sum()) and rows.attended == batch.attended_keys()
    assert rows.image_tokens == int((batch.image_token_index >= 0).sum())
    timing = step_time(model, Parallelism(data=2), rows, global_batch=64, micro_batch=2, gpu=gpu_kind("H100"))
    per_micro = FlopCounter(model).step_flops(batch.num_tokens(), batch.input_ids.shape[1], tiles=6,
                                              scored=rows.scored, attended=batch.attended_keys())
    assert timing.flops == pytest.approx(32 * per_micro)
    assert timing.peak == 989.4e12 and timing.bubble == 0 and timing.recompute == 0
    assert timing.seconds == pytest.approx(timing.flops / (2 * 989.4e12 * 0.41) * timing.imbalance)
    piped = step_time(model, Parallelism(pipeline=2, data=2, recompute="full"), rows, global_batch=64,
                      micro_batch=2, gpu=gpu_kind("H100"))
    assert piped.bubble == pytest.approx(1 / 16)  # (PP - 1) / 16 micro-batches per rank
    assert 0.25 < piped.recompute < 1 / 3  # the forward again, but not the output layer's


def test_balanced_split_evens_out_stage_compute():
    from megatron_mpo.plan.layouts import balanced_split

    assert balanced_split(48, 1) is None and balanced_split(3, 4) == ()
    assert balanced_split(32, 4) == (8, 8, 8, 8)
    split = balanced_split(80, 4, first=20, last=2)  # 102 layers' worth over 4 stages: 25.5 each
    costs = (split[0] + 20, split[1], split[2], split[3] + 2)
    assert sum(split) == 80 and [round(c) for c in costs] == [26, 26, 25, 25]
    assert balanced_split(94, 8, first=30, last=3)[0] == 1  # the vision tower alone outweighs a stage


def test_suggestions_fit_and_come_fastest_first():
    from megatron_mpo.config import load_config
    from megatron_mpo.plan.layouts import suggest
    from megatron_mpo.plan.run import Assumptions, Hardware, model_of
    from megatron_mpo.plan.timing import gpu_kind

    path = str(RECIPES / "internvl3_8b.yaml")
    cfg = load_config(path)
    model = model_of(cfg, path)
    plans = suggest(cfg, model, Hardware(gpus=8, gpu=gpu_kind("H100")), Assumptions(), limit=50)
    assert plans and all(p.fits("typical") and p.layout.gpus == 8 for p in plans)
    keys = [(not p.fits("worst"), p.time.seconds) for p in plans]
    assert keys == sorted(keys)
    assert any((p.layout.tensor, p.layout.pipeline, p.layout.recompute) == (4, 1, None) for p in plans)
    big = load_config(str(RECIPES / "internvl3_5_241b_a28b.yaml"))
    assert suggest(big, model_of(big, str(RECIPES / "internvl3_5_241b_a28b.yaml")),
                   Hardware(gpus=8, gpu=gpu_kind("H100")), Assumptions()) == []


def test_trainer_prints_the_plan_and_the_real_peak_after_step_1(straight_run):
    out = (straight_run / "stdout.txt").read_text()
    size = r"[\d.]+ [KMG]?i?B"
    assert re.search(rf"^memory plan \(megatron-mpo plan\): ~{size} per rank for a worst-case pair "
                     rf"\(stage 0\), ~{size} for a typical one$", out, re.M), out
    assert re.search(rf"^memory after step 1: peak {size} on the fullest rank \(on CPU: .*\); planned ~{size} "
                     rf"typical, ~{size} worst case$", out, re.M), out
    assert out.count("memory after step") == 1


def test_readme_shows_the_planner_s_real_output():
    """The README's "Planning a run" example is this planner's output, as pasted."""
    from megatron_mpo.plan.cli import build_parser, run

    command = "megatron-mpo plan --config examples/recipes/internvl3_8b.yaml --gpus 16 --pairs 100000"
    section = (ROOT / "README.md").read_text().split("## Planning a run", 1)[1]
    pasted = section.split(f"    {command}\n\n", 1)[1].split("\n\nWhat it counts", 1)[0]
    shown = "\n".join(line[4:] for line in pasted.splitlines())
    assert shown == run(build_parser().parse_args(command.split()[2:]))


def test_trainer_memory_line_never_stops_a_run():
    """The start-up estimate is a diagnostic: a plan that fails is one line, not an error."""
    from megatron_mpo.config import load_config
    from megatron_mpo.plan.startup import estimate

    broken = estimate(load_config(str(RECIPES / "internvl3_8b.yaml")), None, 2)  # no architecture
    assert broken.line().startswith("memory plan: not available (AttributeError: ")
    assert broken.after_step(1.0, 1) == ("memory after step 1: peak 1.0 GiB on the fullest rank (on CPU: the "
                                         "process's resident set, Python and torch included)")

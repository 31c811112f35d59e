"""The planner's memory model (megatron_mpo.plan) against what the trainer's models hold.

Model state: the bytes of megatron-core's DDP buffers and of the optimizer's master weights
and Adam moments after a step, at TP1 / TP2 / PP2 / DP2 / EP2, tiny and tiny-moe presets and
an InternViT-6B-like tower (RMSNorm, qk-norm, zero-padded heads). Activations: the peak of
the bytes autograd keeps saved over a real training step (``saved_tensors_hooks``, see
tests/workers/plan_worker.py) -- what activation memory is -- for unpacked and packed rows,
no / selective / full recomputation, sequence parallelism, 3 micro-batches through PP2.
The LLM part is compared with Megatron-LM's theoretical memory formula, written out here.

Tolerances. State: megatron-core pads each parameter to 64 elements and every bucket to a
multiple of the data-parallel size, so its buffers exceed the parameters by < 1 % on these
tiny models (a negligible share at real sizes); the planner counts parameters. The
optimizer's state is exact on one data-parallel rank; sharded, a rank's share follows the
padded buffer's boundaries (within 0.3 %). Activations:
the planner counts the saved tensors term by term; what it leaves out is a few bytes per
micro-batch of routing bookkeeping, and at EP2 each rank computes the tokens the routers
sent its experts, which differ from the balanced share the planner assumes by about 2 %.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.distributed import REPO, launch
from tests.workers import plan_worker as worker

STATE_TOLERANCE = 0.012
ACTIVATION_TOLERANCE = 0.03


def _vit6b_like():
    """tiny with an InternViT-6B-style tower: RMSNorm, cross-head qk-norm, no qkv bias, 3 heads
    zero-padded to 4."""
    from megatron_mpo.models.presets import get_preset

    tiny = get_preset("tiny")
    vision = dataclasses.replace(tiny.vision, norm="RMSNorm", qkv_bias=False, qk_norm=True, num_heads=3,
                                 hidden_size=24, ffn_hidden_size=64, num_padded_heads=4)
    return dataclasses.replace(tiny, vision=vision, name="tiny-vit6b").validate()


def _planned(model, *, tensor=1, pipeline=1, expert=1, data=1, sequence=False, recompute=None, packed=False,
             dtype="bf16", stage=0, count=1, prompt, response, tiles) -> dict:
    """The planner's bytes for one rank, on the same rows the worker collates."""
    from megatron_mpo.plan.activations import Rows
    from megatron_mpo.plan.memory import Precision, stage_memory
    from megatron_mpo.plan.params import Parallelism

    layout = Parallelism(tensor=tensor, pipeline=pipeline, data=data, expert=expert, sequence=sequence,
                         recompute=recompute)
    rows = Rows(pairs=1, prompt=prompt, response=response, tiles=tiles, packed=packed,
                pad_multiple=tensor if sequence else 1, tokens_per_tile=model.tokens_per_tile)
    memory = stage_memory(model, layout, stage, rows, count, Precision(dtype=dtype))
    return {"weights": memory.weights, "grads": memory.grads, "master": memory.master, "adam": memory.adam,
            "params": memory.params.total, "saved_peak": memory.activations}


def _compare(planned: dict, measured: dict, where: str) -> list:
    """Relative differences outside the tolerances, in words (and every figure for the report).
    Unsharded (one data-parallel rank) the optimizer's master weights and moments are exact."""
    problems = []
    if measured.get("data", 1) == 1:
        for key in ("master", "adam"):
            if planned[key] != measured[key]:
                problems.append(f"{where} {key}: planned {planned[key]:.0f}, built {measured[key]} (unsharded: exact)")
    assert planned["params"] == measured["params"], f"{where}: {planned['params']} planned parameters, " \
                                                    f"{measured['params']} built"
    for key in ("weights", "grads", "master", "adam", "saved_peak"):
        tolerance = ACTIVATION_TOLERANCE if key == "saved_peak" else STATE_TOLERANCE
        if measured[key] == 0:
            if planned[key] != 0:
                problems.append(f"{where} {key}: planned {planned[key]:.0f}, built 0")
            continue
        error = planned[key] / measured[key] - 1
        print(f"{where:28s} {key:10s} planned {planned[key]:>12.0f} measured {measured[key]:>12.0f} {error:+.2%}")
        if abs(error) > tolerance:
            problems.append(f"{where} {key}: planned {planned[key]:.0f} vs measured {measured[key]:.0f} ({error:+.1%})")
    return problems


# preset (None: the InternViT-6B-like tower), dtype, packed, recompute, (prompt, response, tiles)
IN_PROCESS = [
    ("tiny", "fp32", False, None, (40, 50, 3)),
    ("tiny", "bf16", False, "full", (40, 50, 3)),
    ("tiny", "bf16", True, "selective", (40, 50, 3)),
    ("tiny", "bf16", True, None, (60, 200, 1)),
    ("tiny-moe", "bf16", False, None, (40, 50, 3)),
    ("tiny-moe", "fp32", True, "full", (24, 120, 2)),
    (None, "bf16", False, None, (40, 50, 4)),
]


@pytest.mark.parametrize("preset,dtype,packed,recompute,shape", IN_PROCESS,
                         ids=lambda v: str(v) if not isinstance(v, tuple) else "x".join(map(str, v)))
def test_one_rank_state_and_activations_match_the_built_model(world, preset, dtype, packed, recompute, shape):
    model = _vit6b_like() if preset is None else None
    cfg = worker.run_config(preset or "tiny", recompute=recompute, packed=packed, dtype=dtype)
    pair = dict(zip(("prompt", "response", "tiles"), shape))
    measured = worker.measure(cfg, architecture=model, count=1, **pair)
    if model is None:
        from megatron_mpo.models.presets import get_preset

        model = get_preset(preset)
    planned = _planned(model, recompute=recompute, packed=packed, dtype=dtype, **pair)
    where = f"{model.name} {dtype} {'packed' if packed else 'unpacked'} {recompute or 'no'}-recompute"
    assert not _compare(planned, measured, where)


@pytest.fixture(scope="module")
def multi_rank(tmp_path_factory) -> dict:
    """Both ranks' measurements of every case of tests/workers/plan_worker.py (one launch)."""
    out = tmp_path_factory.mktemp("plan_worker")
    launch(REPO / "tests" / "workers" / "plan_worker.py", 2, str(out), timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    failures = [f for r in ranks for f in r["failures"]]
    assert not failures, "\n".join(failures)
    return {r: data["results"] for r, data in enumerate(ranks)}


def test_two_rank_layouts_match_the_built_model(multi_rank):
    """TP2 with and without SP (and with full recompute), PP2 with 3 micro-batches (stage 0
    holds 2 in flight) unpacked and packed, DP2 (optimizer state sharded), tiny-moe at EP2
    (experts sharded, expert-DP 1) and at TP2 + SP: per rank, per stage."""
    from megatron_mpo.models.presets import get_preset

    problems = []
    for rank, results in multi_rank.items():
        for name, preset, (tp, pp, ep), sequence, count, recompute, packed in worker.CASES:
            measured = results[name]
            planned = _planned(get_preset(preset), tensor=tp, pipeline=pp, expert=ep, data=measured["data"],
                               sequence=sequence, recompute=recompute, packed=packed, stage=measured["stage"],
                               count=count, **worker.PAIR)
            problems += _compare(planned, measured, f"{name} rank {rank}")
    assert not problems, "\n".join(problems)


# ---- Megatron-LM's theoretical memory formula (megatron/training/theoretical_memory_usage.py) ----


def _megatron_weight_and_optimizer_bytes(h, layers, heads, groups, kv_channels, ffn, vocab, tp, pp, dp,
                                         experts=None, expert_ffn=0, ep=1) -> float:
    """compute_weight_and_optimizer_memory for a GPT with RMSNorm, SwiGLU, GQA, untied
    embeddings, the distributed optimizer and expert tensor parallelism = TP: the most
    loaded shard (the first stage: embedding + its layers; at PP1 also the output layer)
    times 6 + 12 / DP bytes (expert parameters: 6 + 12 / expert-DP)."""
    query = kv_channels * heads
    attention = 2 * h * h * ((1 + groups / heads) * query / h)
    dense_mlp = 2 * h * ffn * 3 / 2
    norms = 2 * h
    moe_layers = layers if experts else 0
    dense_layers = layers - moe_layers
    routed = 2 * h * expert_ffn * (experts or 0) * 3 / 2
    router = h * (experts or 0)
    embedding = h * vocab
    tp_sharded = (attention + dense_mlp) * dense_layers + attention * moe_layers
    replicated = norms * dense_layers + (norms + router) * moe_layers + h  # + final norm
    expert_sharded = routed * moe_layers
    on_shard = (tp_sharded / pp + embedding) / tp + replicated / pp
    expert_on_shard = expert_sharded / pp / (tp * ep)
    if pp == 1:
        on_shard += embedding / tp
    expert_dp = dp * tp * pp // (tp * ep * pp)
    return on_shard * (6 + 12 / dp) + expert_on_shard * (6 + 12 / expert_dp)


def _megatron_activation_bytes(seq, micro, h, ffn, layers, vocab, tp, pp, vp, microbatches) -> float:
    """compute_activation_memory (Korthikanti et al., Table 2; sequence parallelism and
    flash attention): the first stage with its micro-batches in flight."""
    memory = seq * micro * h * (18 + 4 * ffn / h) * layers
    memory += 8 * seq * micro * pp + seq * micro * h * pp
    if vp is not None:
        memory *= 1 + (pp - 1) / (pp * vp)
    elif pp > 1:
        memory *= min(1, microbatches / pp)
    if pp == 1:
        memory += seq * micro * h * 4 * (1 + vocab / h)
    return memory / tp


def _gpt(moe: bool = False):
    """InternVL2-76B with a Llama-3-8B-sized LLM (no qkv bias, no qk-norm: Megatron-LM's GPT);
    ``moe``: InternVL3.5-30B-A3B's Qwen3-MoE LLM."""
    from megatron_mpo.models.presets import get_preset

    if moe:
        return get_preset("InternVL3_5-30B-A3B")
    base = get_preset("InternVL2-76B")
    lang = dataclasses.replace(base.language, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                               ffn_hidden_size=14336, vocab_size=128256)
    return dataclasses.replace(base, language=lang)


@pytest.mark.parametrize("moe,tp,pp,dp,ep", [(False, 1, 1, 1, 1), (False, 8, 1, 2, 1), (False, 4, 4, 8, 1),
                                             (False, 2, 8, 4, 1), (True, 1, 1, 16, 8), (True, 2, 2, 8, 4)])
def test_llm_state_equals_megatron_lm_formula(moe, tp, pp, dp, ep):
    from megatron_mpo.plan.memory import Precision, model_state
    from megatron_mpo.plan.params import Parallelism, stage_params

    model = _gpt(moe)
    lang = model.language
    layout = Parallelism(tensor=tp, pipeline=pp, data=dp, expert=ep, sequence=tp > 1)
    params = dataclasses.replace(stage_params(model, layout, 0, "transformer_engine"), vision=0, projector=0)
    ours = sum(model_state(params, layout, Precision("bf16", spec="transformer_engine")))
    theirs = _megatron_weight_and_optimizer_bytes(
        lang.hidden_size, lang.num_layers, lang.num_heads, lang.num_kv_heads, lang.kv_channels, lang.ffn_hidden_size,
        lang.padded_vocab_size, tp, pp, dp, experts=lang.num_experts or None, expert_ffn=lang.moe_intermediate_size,
        ep=ep)
    final_norm = lang.hidden_size * (6 + 12 / dp)  # the formula spreads it over the stages; it sits on the last
    if pp > 1:
        theirs -= final_norm / pp
    if lang.qk_norm:  # the formula leaves out Qwen3's per-head q / k norm weights (2 x head dim per layer)
        theirs += 2 * lang.kv_channels * lang.num_layers / pp * (6 + 12 / dp)
    assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("tp,pp,vp,microbatches,seq", [(1, 1, None, 8, 4096), (8, 1, None, 8, 8192),
                                                       (4, 4, None, 8, 8192), (8, 4, None, 2, 8192),
                                                       (2, 8, None, 16, 4096), (4, 4, 2, 8, 8192)])
def test_llm_activations_agree_with_megatron_lm_formula(tp, pp, vp, microbatches, seq):
    """Text-only rows (Megatron-LM's formula has no vision tower), the first stage. The planner
    counts the tensors this project's layers save, so it is above Korthikanti's formula by
    a stated margin: SwiGLU keeps 3 x FFN (the formula's GELU MLP keeps 2), the value view
    keeps the whole qkv output, RoPE keeps cos / sin, norms and attention keep fp32
    statistics, the first layer's input keeps the whole embedding under SP; the formula's
    dropout masks are absent (dropout 0). What must agree: how both scale with TP, PP,
    virtual stages, micro-batches in flight and sequence length."""
    from megatron_mpo.plan.activations import Rows, in_flight, stage_activations
    from megatron_mpo.plan.params import Parallelism, stage_layers

    model = _gpt()
    lang = model.language
    layout = Parallelism(tensor=tp, pipeline=pp, sequence=tp > 1, virtual_pipeline=vp)
    rows = Rows(pairs=1, prompt=1, response=seq - 1, tiles=0)
    phases = stage_activations(model, layout, 0, tuple(stage_layers(lang.num_layers, layout)[0]), rows,
                               dtype_bytes=2, attention="te", spec="transformer_engine")
    ours = (in_flight(layout, 0, microbatches) - 1) * phases.stored + phases.peak
    theirs = _megatron_activation_bytes(seq, 2, lang.hidden_size, lang.ffn_hidden_size, lang.num_layers,
                                        lang.padded_vocab_size, tp, pp, vp, microbatches)
    print(f"TP{tp} PP{pp} VP{vp} M{microbatches} S{seq}: planner {ours / 2**30:.2f} GiB, "
          f"Megatron-LM {theirs / 2**30:.2f} GiB, ratio {ours / theirs:.3f}")
    assert 1.05 <= ours / theirs <= 1.3

"""What only a GPU can show: the model and its frozen parts live on the device, the trainer
and the reference tool run end to end on CUDA and agree with the CPU, FlexAttention's compiled
kernel trains packed rows of several pairs as the SDPA path and unpacked rows do, and
Transformer Engine / FP8 (and TE's linears around FlexAttention) build, load and run.

Run with ``python -m pytest -q -m gpu tests/gpu`` (tools/gpu_kit/run_kit.sh does); see
conftest.py for the markers, the CPU dry run and the per-test time limit.
"""

from __future__ import annotations

import json
import math
from itertools import chain
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from tests.gpu.conftest import DEVICE, HAVE_CUDA, Background, run_python

pytestmark = pytest.mark.gpu

STEPS = 20


def _te_available() -> bool:
    from megatron_mpo.models.specs import te_available

    return te_available()


requires_te = pytest.mark.skipif(not _te_available(), reason="Transformer Engine is not installed")
requires_fp8_gpu = pytest.mark.skipif(
    not (HAVE_CUDA and torch.cuda.get_device_capability() >= (8, 9)),
    reason="FP8 needs a GPU of compute capability >= 8.9",
)


# ---- helpers ------------------------------------------------------------------------------------


def tiny_pairs(model_config, count: int, seed: int, odd_length: bool = False) -> list:
    """Synthetic TokenizedPairs for ``model_config``: 1-2 tiles, short prompts and responses,
    reference values set. ``odd_length``: the longest unpacked row has 16k+5 positions, so a
    pad multiple of 16 really pads."""
    from megatron_mpo.data.samples import TokenizedPair

    gen = torch.Generator().manual_seed(seed)
    context = model_config.img_context_token_id
    high = min(context, model_config.language.vocab_size) - 1
    side = model_config.vision.image_size
    pairs = []
    for i in range(count):
        tiles = 1 + i % 2
        prompt = (torch.randint(1, high, (5,), generator=gen).tolist()
                  + [context] * (tiles * model_config.tokens_per_tile)
                  + torch.randint(1, high, (4 + i,), generator=gen).tolist())
        chosen = torch.randint(1, high, (6 + 2 * i,), generator=gen).tolist()
        rejected = torch.randint(1, high, (5 + i,), generator=gen).tolist()
        pairs.append(TokenizedPair(key=f"t/{i}", prompt=prompt, chosen=chosen, rejected=rejected,
                                   pixel_values=torch.randn(tiles, 3, side, side, generator=gen),
                                   ref_chosen=-1.5 * len(chosen), ref_rejected=-1.5 * len(rejected)))
    if odd_length:
        longest = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
        extra = (5 - longest) % 16
        pairs[0].chosen = pairs[0].chosen + [1] * (longest + extra - len(pairs[0].prompt) - len(pairs[0].chosen))
    return pairs


def long_pairs(model_config, count: int, seed: int) -> list:
    """Synthetic TokenizedPairs of 130-250 packed positions (1-2 tiles, 30-100 prompt text
    tokens, responses of 30-90): a row of several of them spans several of FlexAttention's
    128-position blocks, so its block mask has skipped, full and partial blocks."""
    from megatron_mpo.data.samples import TokenizedPair

    gen = torch.Generator().manual_seed(seed)
    context = model_config.img_context_token_id
    high = min(context, model_config.language.vocab_size) - 1
    side = model_config.vision.image_size

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def text(n: int) -> list[int]:
        return torch.randint(1, high, (n,), generator=gen).tolist()

    pairs = []
    for i in range(count):
        tiles = 1 + i % 2
        prompt = text(draw(20, 60)) + [context] * (tiles * model_config.tokens_per_tile) + text(draw(10, 40))
        chosen, rejected = text(draw(30, 90)), text(draw(30, 90))
        pairs.append(TokenizedPair(key=f"long/{i}", prompt=prompt, chosen=chosen, rejected=rejected,
                                   pixel_values=torch.randn(tiles, 3, side, side, generator=gen),
                                   ref_chosen=-1.5 * len(chosen), ref_rejected=-1.5 * len(rejected)))
    return pairs


def collate(model_config, pairs: list, layout: str = "unpacked", pad_multiple: int = 1,
            row_length: Optional[int] = None, max_pairs_per_row: Optional[int] = 1):
    from megatron_mpo.data.collate import collate_pairs

    return collate_pairs(pairs, 0, model_config.img_context_token_id, model_config.tokens_per_tile,
                         pad_multiple=pad_multiple, layout=layout, row_length=row_length,
                         max_pairs_per_row=max_pairs_per_row)


def pairs_per_row(batch) -> list[int]:
    """Pairs whose responses each row scores (read off ``response_index``, not ``segments``)."""
    P = batch.num_pairs
    return [len({int(s) % P for s in row[row >= 0].tolist()}) for row in batch.response_index]


def forward_logps(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot log-prob sums and token counts, as the trainer's forward step computes them
    (causal rows carry no mask: the model builds one where its attention needs it)."""
    from megatron_mpo.training.forward import model_inputs, slot_log_probs

    batch = batch.to(torch.device(DEVICE))
    token_nll = model(**model_inputs(model, batch))
    return slot_log_probs(token_nll, batch.response_index, batch.num_slots)


def off_device(model: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers that are not on the test device."""
    return [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.device.type != DEVICE]


def init_model_config(ws: Path):
    from megatron_mpo.config import from_dict
    from megatron_mpo.training.model_setup import model_config

    return model_config(from_dict({"model": {"init": str(ws / "init")}, "train": {"steps": 1}}).validate())


def write_json(out: Optional[Path], name: str, data: dict) -> None:
    if out is not None:
        (out / name).write_text(json.dumps(data, indent=2))


# model.freeze names -> InternVLModel's submodules (read off the model, not the code under test).
MODEL_PARTS = {"vision": "vision_model", "projector": "vision_projection", "language": "language_model"}


# ---- the local spec on the device ---------------------------------------------------------------


def test_local_spec_builds_on_the_device_in_bf16_and_trains(world):
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.presets import get_preset

    config = get_preset("tiny")
    model = build_model(config, spec="local", params_dtype=torch.bfloat16)
    assert off_device(model) == []
    # Weight matrices, embeddings and the patch conv in bf16 (norm weights may stay fp32).
    not_bf16 = [n for n, p in model.named_parameters() if p.dim() >= 2 and p.dtype != torch.bfloat16]
    assert not_bf16 == []
    sums, counts = forward_logps(model, collate(config, tiny_pairs(config, 2, seed=0)))
    assert torch.isfinite(sums).all() and (sums < 0).all() and (counts > 0).all()
    (-sums.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(float(p.grad.float().norm()) for p in model.parameters()) > 0


def _qwen3_tiny():
    """The tiny preset with a Qwen3-style LLM: per-head q/k norm, head_dim 24 != 64 / 4."""
    from megatron_mpo.models.presets import get_preset

    config = get_preset("tiny")
    lang = config.language
    lang.family, lang.qk_norm, lang.qkv_bias, lang.head_dim = "qwen3", True, False, 24
    return config.validate()


def test_qwen3_qk_norm_runs_on_the_device_in_bf16_close_to_fp32(world):
    """InternVL3.5's LLM: the per-head q/k RMSNorm (HeadRMSNorm) on the device, bf16 log-probs
    within bf16 rounding of fp32 ones from the same weights, finite gradients that reach the
    norms; with Transformer Engine installed, the TE spec builds the same norms and agrees."""
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.layers import HeadRMSNorm

    config = _qwen3_tiny()
    torch.manual_seed(0)
    fp32 = build_model(config, spec="local", params_dtype=torch.float32)
    assert off_device(fp32) == []
    attention = fp32.language_model.decoder.layers[0].self_attention
    assert isinstance(attention.q_layernorm, HeadRMSNorm) and attention.q_layernorm.weight.numel() == 24
    with torch.no_grad():  # random norm weights, so a dropped or misplaced norm shows
        for name, p in fp32.named_parameters():
            if "layernorm" in name:
                p.add_(0.3 * torch.randn_like(p))
    batch = collate(config, tiny_pairs(config, 2, seed=4))
    sums32, counts = forward_logps(fp32, batch)
    bf16 = build_model(config, spec="local", params_dtype=torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict(), strict=False)
    with torch.no_grad():
        sums16, _ = forward_logps(bf16, batch)
    per_token32, per_token16 = (sums32 / counts).float(), (sums16 / counts).float()
    assert float((per_token16 - per_token32.detach()).abs().max()) < 0.1, (per_token16, per_token32)
    (-sums32.sum()).backward()
    for norm in (attention.q_layernorm, attention.k_layernorm):
        assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()
        assert float(norm.weight.grad.abs().sum()) > 0
    if _te_available():
        te = build_model(config, spec="transformer_engine", params_dtype=torch.bfloat16)
        assert isinstance(te.language_model.decoder.layers[0].self_attention.q_layernorm, HeadRMSNorm)


# ---- packed rows of several pairs: FlexAttention against SDPA and unpacked rows -----------------


class FlexSpy:
    """Counts FlexAttention kernel calls and the distinct block masks they got (wraps
    ``packed_attention.flex_attention``, which ``layers.FlexAttention`` looks up at each
    call). The masks are kept, so no two are ever the same object by a reused id."""

    def __init__(self, monkeypatch) -> None:
        from megatron_mpo.models import packed_attention

        self.calls = 0
        self.block_masks: list = []
        real_kernel = packed_attention.flex_attention

        def kernel():
            inner = real_kernel()

            def call(*args, **kwargs):
                self.calls += 1
                mask = kwargs.get("block_mask")
                if not any(mask is seen for seen in self.block_masks):
                    self.block_masks.append(mask)
                return inner(*args, **kwargs)

            return call

        monkeypatch.setattr(packed_attention, "flex_attention", kernel)

    @property
    def masks(self) -> int:
        return len(self.block_masks)


# Rows of ``long_pairs(tiny, 8, seed=7)`` packed into 560 positions (padded to 64): 3 rows of
# 2-3 pairs, 576 positions (4.5 blocks of 128), trailing padding in the rows not full.
FLEX_ROW_LENGTH, FLEX_PAD_MULTIPLE = 560, 64
# The LLM's weight matrices times this: at the tiny preset's init (std 0.02) attention
# barely depends on what it sees (letting a pair see the previous one moves a token's
# log-prob by ~5e-3); x5 makes that ~0.2 nats, 50x the bf16 rounding (CPU measurement).
FLEX_SHARPEN = 5.0
# fp32: FlexAttention's Triton kernel against torch SDPA (and the unpacked rows) differ in
# the order of fp32 sums only: ~5e-7 nats per token and 6e-7 relative gradient norm
# between two SDPA layouts on a CPU; 300x (400x) margin for other kernels.
FLEX_FP32_TOKEN_TOL, FLEX_FP32_GRAD_RTOL = 2e-4, 2e-4
# bf16: within BF16_SCALE x what bf16 itself costs (SDPA bf16 against SDPA fp32, measured
# in the test), as the TE test does; that bound must sit well below what a wrong mask
# (the packed row read as one causal sequence) changes, or the check would mean nothing.
FLEX_BF16_SCALE, FLEX_MEANINGFUL = 4.0, 5.0


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """The LLM's weight matrices (local or TE modules alike) times FLEX_SHARPEN."""
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.dim() >= 2:
                p.mul_(FLEX_SHARPEN)
    return model


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().reshape(-1) for p in model.parameters()])


def _logps_and_grads(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob means per slot and the gradient of their sum (all parameters)."""
    model.zero_grad(set_to_none=True)
    sums, counts = forward_logps(model, batch)
    per_token = sums / counts
    (-per_token.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], missing[:5]
    return per_token.detach().float(), _grads(model)


@pytest.mark.gpu_timeout(210)  # first FlexAttention compiles (forward + backward, fp32 and bf16)
def test_flex_attention_packed_rows_of_several_pairs_match_sdpa_and_unpacked_rows(world, monkeypatch, full_fp32):
    """Packed rows holding 2-3 pairs each: the local spec with FlexAttention (block mask
    from ``segments``, torch.compile'd kernel on CUDA) against the same weights with the
    per-pair SDPA path and against unpacked causal rows, forward log-probs and gradients
    of every parameter, in fp32 (tight) and bf16 (within 4x bf16's own error). On CUDA the
    FlexAttention kernel must really run in the training forwards (counted: once per layer
    per forward, one block mask per micro-batch). On a CPU (dry run) FlexAttention has no
    backward, so those forwards take the SDPA path; a no-grad forward then checks the
    FlexAttention forward itself."""
    import dataclasses

    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.layers import FlexAttention, SDPAttention
    from megatron_mpo.models.presets import get_preset

    # Plain fp32 on both sides (full_fp32: cuDNN would take TF32 for the vision patch convolution).
    config = get_preset("tiny")
    layers = config.language.num_layers
    pairs = long_pairs(config, 8, seed=7)
    packed = collate(config, pairs, layout="packed", pad_multiple=FLEX_PAD_MULTIPLE, row_length=FLEX_ROW_LENGTH,
                     max_pairs_per_row=None)
    unpacked = collate(config, pairs)
    per_row = pairs_per_row(packed)
    assert min(per_row) >= 2 and max(per_row) >= 3 and sum(per_row) == len(pairs), per_row
    # Several 128-position blocks, every row ending in padding (its own segment; token ids are >= 1).
    assert packed.input_ids.shape[1] > 3 * 128 and (packed.input_ids[:, -1] == 0).all(), packed.input_ids
    as_one_sequence = dataclasses.replace(packed, segments=None)  # every pair sees the earlier ones

    torch.manual_seed(0)
    base = sharpen(build_model(config, spec="local", attention="sdpa", attention_mask="arbitrary"))
    state = base.state_dict()
    del base

    def built(attention: str, dtype: torch.dtype) -> torch.nn.Module:
        model = build_model(config, spec="local", attention=attention, attention_mask="arbitrary", params_dtype=dtype)
        model.load_state_dict(state)
        core = type(model.language_model.decoder.layers[0].self_attention.core_attention)
        assert core is (FlexAttention if attention == "flex" else SDPAttention), core
        return model.train()

    spy = FlexSpy(monkeypatch)
    flex_forwards = 0
    results = {}
    no_grad_logps = None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sdpa = built("sdpa", dtype)
        results[f"sdpa_{name}"] = _logps_and_grads(sdpa, packed)
        results[f"unpacked_{name}"] = _logps_and_grads(sdpa, unpacked)
        if name == "fp32":
            results["one_sequence_fp32"] = _logps_and_grads(sdpa, as_one_sequence)
        del sdpa
        flex = built("flex", dtype)
        results[f"flex_{name}"] = _logps_and_grads(flex, packed)
        flex_forwards += 1 if DEVICE == "cuda" else 0  # on a CPU backward needs the SDPA path
        assert (spy.calls, spy.masks) == (layers * flex_forwards, flex_forwards), (spy.calls, spy.masks)
        if name == "fp32" and DEVICE != "cuda":  # the dry run: FlexAttention's forward on the CPU
            with torch.no_grad():
                sums, counts = forward_logps(flex, packed)
            flex_forwards += 1
            assert (spy.calls, spy.masks) == (layers * flex_forwards, flex_forwards), (spy.calls, spy.masks)
            no_grad_logps = (sums / counts).float()
        del flex

    def token_diff(a: str, b: str) -> float:
        return float((results[a][0] - results[b][0]).abs().max())

    def grad_diff(a: str, b: str) -> float:
        return float((results[a][1] - results[b][1]).norm() / results[b][1].norm())

    bf16_token = FLEX_BF16_SCALE * token_diff("sdpa_bf16", "sdpa_fp32") + 1e-3
    bf16_grad = FLEX_BF16_SCALE * grad_diff("sdpa_bf16", "sdpa_fp32") + 1e-4
    report = {
        "device": DEVICE, "pairs_per_row": per_row, "row_positions": packed.input_ids.shape[1],
        "flex_kernel_calls": spy.calls, "distinct_block_masks": spy.masks,
        "token": {"flex_vs_sdpa_fp32": token_diff("flex_fp32", "sdpa_fp32"),
                  "flex_vs_unpacked_fp32": token_diff("flex_fp32", "unpacked_fp32"),
                  "flex_vs_sdpa_bf16": token_diff("flex_bf16", "sdpa_bf16"),
                  "flex_bf16_vs_unpacked_fp32": token_diff("flex_bf16", "unpacked_fp32"),
                  "bf16_bound": bf16_token, "one_sequence_vs_packed": token_diff("one_sequence_fp32", "sdpa_fp32")},
        "grad_rel": {"flex_vs_sdpa_fp32": grad_diff("flex_fp32", "sdpa_fp32"),
                     "flex_vs_unpacked_fp32": grad_diff("flex_fp32", "unpacked_fp32"),
                     "flex_vs_sdpa_bf16": grad_diff("flex_bf16", "sdpa_bf16"),
                     "bf16_bound": bf16_grad, "one_sequence_vs_packed": grad_diff("one_sequence_fp32", "sdpa_fp32")},
    }
    if no_grad_logps is not None:
        report["token"]["flex_no_grad_vs_sdpa_fp32"] = float((no_grad_logps - results["sdpa_fp32"][0]).abs().max())
    print("flex_attention:", json.dumps(report))  # in junit.xml (run_kit.sh: junit_logging=system-out)

    for key, (logps, grads) in results.items():
        assert torch.isfinite(logps).all() and torch.isfinite(grads).all(), key
    token, grad = report["token"], report["grad_rel"]
    # The bounds mean something: reading the row as one sequence moves far more than they allow.
    assert token["one_sequence_vs_packed"] > FLEX_MEANINGFUL * bf16_token, report
    assert grad["one_sequence_vs_packed"] > FLEX_MEANINGFUL * bf16_grad, report
    # The two packed-row paths and the unpacked rows are the same model.
    assert token["flex_vs_sdpa_fp32"] < FLEX_FP32_TOKEN_TOL, report
    assert token["flex_vs_unpacked_fp32"] < FLEX_FP32_TOKEN_TOL, report
    assert token.get("flex_no_grad_vs_sdpa_fp32", 0.0) < FLEX_FP32_TOKEN_TOL, report
    assert grad["flex_vs_sdpa_fp32"] < FLEX_FP32_GRAD_RTOL, report
    assert grad["flex_vs_unpacked_fp32"] < FLEX_FP32_GRAD_RTOL, report
    assert token["flex_vs_sdpa_bf16"] <= bf16_token, report
    assert token["flex_bf16_vs_unpacked_fp32"] <= bf16_token, report
    assert grad["flex_vs_sdpa_bf16"] <= bf16_grad, report


@pytest.mark.parametrize("freeze", [[], ["vision"], ["vision", "projector"], ["language"]], ids=str)
def test_frozen_parts_stay_on_the_device_through_a_training_step(world, freeze):
    """megatron-core's DDP copies only trainable parameters into its device buffer: frozen
    parts must be on the device anyway, and one trainer step must move exactly the rest."""
    from megatron_mpo.config import from_dict
    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.training.forward import make_forward_step
    from megatron_mpo.training.model_setup import build_model_chunks, model_config
    from megatron_mpo.training.optim import build_optimizer, wrap_data_parallel
    from megatron_mpo.training.schedule import forward_backward_func, run_schedule

    cfg = from_dict({
        "model": {"preset": "tiny", "freeze": freeze},
        "precision": {"dtype": "bf16"},
        "data": {"packing": True},
        "train": {"steps": 1, "micro_batch": 2, "global_batch": 2, "lr": 1e-2, "warmup": 0, "device": DEVICE},
    }).validate()
    config = model_config(cfg)
    chunks = build_model_chunks(cfg, config, world)
    assert all(off_device(c) == [] for c in chunks)
    before = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}
    model = wrap_data_parallel(chunks, cfg.precision)
    optimizer = build_optimizer(model, cfg.train, cfg.precision)
    assert all(off_device(c) == [] for c in chunks)

    mpo = MPOLoss(cfg.mpo, group=world.data_group)
    batch = collate(config, tiny_pairs(config, 2, seed=1), layout="packed")
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    results = run_schedule(forward_backward_func(), make_forward_step(mpo), model, [batch], 0, forward_only=False)
    assert math.isfinite(float(results[0]["loss"]))
    update_ok, grad_norm, _ = optimizer.step()
    assert update_ok and math.isfinite(float(grad_norm)) and float(grad_norm) > 0

    after = {n: p.detach() for c in chunks for n, p in c.named_parameters()}
    assert all(off_device(c) == [] for c in chunks)
    for part, prefix in MODEL_PARTS.items():
        names = [n for n in before if n.startswith(prefix + ".")]
        assert names, f"no parameters under {prefix}"
        changed = [n for n in names if not torch.equal(before[n], after[n])]
        if part in freeze:
            assert changed == [], f"frozen {part} changed"
        else:
            assert changed, f"trainable {part} did not change"


# ---- Megatron-LM's CUDA-only speed settings ------------------------------------------------------


def _step_gradients(cfg, config, world, speed, batches) -> torch.Tensor:
    """The reduced gradient buffer of one trainer step (two micro-batches) from fixed weights."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.training.forward import make_forward_step
    from megatron_mpo.training.model_setup import build_model_chunks
    from megatron_mpo.training.optim import wrap_data_parallel
    from megatron_mpo.training.schedule import forward_backward_func, run_schedule

    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    model = wrap_data_parallel(build_model_chunks(cfg, config, world, speed=speed), cfg.precision, speed)
    for chunk in model:
        chunk.zero_grad_buffer()
    run_schedule(forward_backward_func(), make_forward_step(MPOLoss(cfg.mpo, group=world.data_group)), model,
                 batches, 0, forward_only=False)
    return torch.cat([b.grad_data.float().clone() for chunk in model for b in chunk.buffers
                      + chunk.expert_parallel_buffers])


@pytest.mark.parametrize("setting,spec,preset", [
    ("gradient_accumulation_fusion", "local", "tiny"),
    ("gradient_accumulation_fusion", "transformer_engine", "tiny"),
    ("moe_permute_fusion", "local", "tiny-moe"),
])
def test_cuda_only_speed_settings_give_the_same_gradients(world, setting, spec, preset):
    """gradient_accumulation_fusion (weight gradients accumulated into DDP's fp32 buffer by
    apex's / TE's GEMM, in the vision tower, projector and LLM) and moe_permute_fusion (TE's
    token permutation): the step's gradients as without them, up to bf16 rounding (the fused
    path adds bf16 products in fp32 instead of rounding each micro-batch's gradient first)."""
    from dataclasses import replace

    from megatron_mpo.config import from_dict
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.perf_settings import PerfSettings, detect

    machine = detect()
    if spec == "transformer_engine" and not _te_available():
        pytest.skip("Transformer Engine is not installed")
    if setting == "gradient_accumulation_fusion" and not machine.apex_wgrad:
        pytest.skip("apex's fused_weight_gradient_mlp_cuda is not installed")
    if setting == "moe_permute_fusion" and not machine.te_permute:
        pytest.skip("Transformer Engine's fused MoE permutation (TE >= 2.1) is not installed")
    cfg = from_dict({"model": {"preset": preset, "spec": spec}, "precision": {"dtype": "bf16"},
                     "train": {"steps": 1, "micro_batch": 1, "global_batch": 2, "device": DEVICE}}).validate()
    config = get_preset(preset)
    batches = [collate(config, [pair]) for pair in tiny_pairs(config, 2, seed=4)]
    plain = _step_gradients(cfg, config, world, PerfSettings(), batches)
    fused = _step_gradients(cfg, config, world, replace(PerfSettings(), **{setting: True}), batches)
    assert plain.abs().sum() > 0
    assert float((fused - plain).norm() / plain.norm()) < 2e-2


# ---- Transformer Engine and FP8 -----------------------------------------------------------------


def _load(model: torch.nn.Module, ws: Path) -> torch.nn.Module:
    from megatron_mpo.training.checkpoint import load_model_weights

    load_model_weights(ws / "init", [model])
    return model.eval()


@requires_te
def test_transformer_engine_loads_a_local_checkpoint_and_agrees_with_local(world, gpu_workspace):
    """A local-spec model dir (no ``_extra_state``) loads into TE modules (which add it);
    TE's bf16 log-probs then sit as close to the fp32 local ones as the local bf16 model's
    do -- packed (explicit mask, TE's unfused path) and unpacked (causal) alike. A wrong
    weight mapping or mask convention is off by O(1) nats per token."""
    from megatron_mpo.models.internvl import build_model

    config = init_model_config(gpu_workspace)
    pairs = tiny_pairs(config, 3, seed=2)
    unpacked, packed = collate(config, pairs), collate(config, pairs, layout="packed")

    def per_token(model, batch) -> torch.Tensor:
        with torch.no_grad():
            sums, counts = forward_logps(model, batch)
        return (sums / counts).float()

    def built(spec: str, dtype: torch.dtype, mask: str = "causal") -> torch.nn.Module:
        return _load(build_model(config, spec=spec, params_dtype=dtype, attention_mask=mask), gpu_workspace)

    fp32 = per_token(built("local", torch.float32), unpacked)
    local_bf16 = per_token(built("local", torch.bfloat16), unpacked)
    te_causal = built("transformer_engine", torch.bfloat16)
    assert any(k.endswith("_extra_state") for k in te_causal.state_dict())  # the case being tested
    te_arbitrary = built("transformer_engine", torch.bfloat16, "arbitrary")
    te_unpacked, te_packed = per_token(te_causal, unpacked), per_token(te_arbitrary, packed)

    scale = float((local_bf16 - fp32).abs().max())
    bound = 4 * scale + 1e-3
    assert float((te_unpacked - fp32).abs().max()) <= bound, (te_unpacked, fp32, scale)
    assert float((te_packed - fp32).abs().max()) <= bound, (te_packed, fp32, scale)


@requires_te
@pytest.mark.gpu_timeout(180)  # FlexAttention compiles (bf16 forward + backward)
def test_transformer_engine_spec_with_flex_attention_trains_packed_rows(world, gpu_workspace, monkeypatch):
    """``spec=transformer_engine, attention=flex``: TE's linears (fused norm + linear, FP8
    capable) around FlexAttention as the LLM's core attention. Rows of 2-3 pairs run forward
    and backward through the FlexAttention kernel, and the bf16 log-probs sit as close to
    the fp32 local model's as the local bf16 model's do (same checkpoint, sharpened alike)."""
    import dataclasses

    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.layers import FlexAttention

    config = init_model_config(gpu_workspace)
    pairs = long_pairs(config, 8, seed=7)
    packed = collate(config, pairs, layout="packed", pad_multiple=FLEX_PAD_MULTIPLE, row_length=FLEX_ROW_LENGTH,
                     max_pairs_per_row=None)
    assert min(pairs_per_row(packed)) >= 2, pairs_per_row(packed)

    def per_token(model, batch=packed) -> torch.Tensor:
        with torch.no_grad():
            sums, counts = forward_logps(model, batch)
        return (sums / counts).float()

    def loaded(spec: str, dtype: torch.dtype, attention: Optional[str] = None) -> torch.nn.Module:
        model = build_model(config, spec=spec, attention=attention, attention_mask="arbitrary", params_dtype=dtype)
        return sharpen(_load(model, gpu_workspace))

    local32 = loaded("local", torch.float32)
    fp32 = per_token(local32)
    one_sequence = per_token(local32, dataclasses.replace(packed, segments=None))
    local_bf16 = per_token(loaded("local", torch.bfloat16))
    model = loaded("transformer_engine", torch.bfloat16, "flex").train()
    for layer in model.language_model.decoder.layers:
        attention = layer.self_attention
        assert type(attention.core_attention) is FlexAttention, type(attention.core_attention)
        for linear in (attention.linear_qkv, attention.linear_proj, layer.mlp.linear_fc1, layer.mlp.linear_fc2):
            te_bases = [c for c in type(linear).__mro__ if c.__module__.startswith("transformer_engine")]
            assert te_bases, f"{type(linear)} is not a Transformer Engine module"

    spy = FlexSpy(monkeypatch)
    sums, counts = forward_logps(model, packed)
    (-(sums / counts).sum()).backward()
    runs = 1 if DEVICE == "cuda" else 0  # the kernel ran (once per layer), one mask per batch
    assert (spy.calls, spy.masks) == (config.language.num_layers * runs, runs), (spy.calls, spy.masks)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.float().norm()) for g in grads) > 0
    te_flex = (sums / counts).detach().float()
    bound = FLEX_BF16_SCALE * float((local_bf16 - fp32).abs().max()) + 1e-3
    assert float((one_sequence - fp32).abs().max()) > FLEX_MEANINGFUL * bound  # a wrong mask would show
    assert float((te_flex - fp32).abs().max()) <= bound, (te_flex, fp32, bound)


@requires_fp8_gpu
@requires_te  # listed last: reported first when both apply
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_hybrid_runs_forward_and_backward(world, gpu_workspace, recipe):
    from megatron_mpo.config import from_dict
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.training import data_setup
    from megatron_mpo.training.precision import sequence_multiple

    config = init_model_config(gpu_workspace)
    cfg = from_dict({
        "model": {"init": str(gpu_workspace / "init"), "spec": "transformer_engine"},
        "precision": {"dtype": "bf16", "fp8": "hybrid", "fp8_recipe": recipe},
        "data": {"shards": str(gpu_workspace / "shards"), "ref_logps": "unused", "packing": False},
        "train": {"steps": 1},
    }).validate()
    multiple = sequence_multiple(1, False, recipe)
    # Transformer Engine's FP8 GEMMs need 16-aligned token counts (megatron-core's
    # get_fp8_align_size); the data pipeline must pad to it.
    assert multiple % 16 == 0
    assert data_setup.loader_plan(cfg, config).pad_multiple == multiple

    model = build_model(config, spec="transformer_engine", fp8="hybrid", fp8_recipe=recipe,
                        params_dtype=torch.bfloat16)
    _load(model, gpu_workspace).train()
    assert model.config.fp8 == "hybrid" and model.config.fp8_recipe == recipe
    assert getattr(model.vision_model.config, "fp8", None) is None  # the vision tower stays bf16

    raw = collate(config, tiny_pairs(config, 2, seed=3, odd_length=True))
    batch = collate(config, tiny_pairs(config, 2, seed=3, odd_length=True), pad_multiple=multiple)
    assert raw.input_ids.shape[1] % multiple != 0 and batch.input_ids.shape[1] % multiple == 0

    bf16 = build_model(config, spec="transformer_engine", params_dtype=torch.bfloat16)
    with torch.no_grad():
        plain, _ = forward_logps(_load(bf16, gpu_workspace), batch)
    for _ in range(2):  # delayed scaling calibrates its amax history on the first pass
        model.zero_grad(set_to_none=True)
        sums, counts = forward_logps(model, batch)
        (-sums.sum()).backward()
    assert torch.isfinite(sums).all() and (counts > 0).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.float().norm()) for g in grads) > 0
    # FP8 really ran (the numbers differ from bf16), and stayed near it (e4m3 keeps 3
    # mantissa bits: ~6 % per GEMM input, far below the O(1) per token of a broken run).
    per_token_fp8, per_token_bf16 = (sums / counts).detach().float(), (plain / counts).float()
    assert not torch.equal(per_token_fp8, per_token_bf16)
    assert float((per_token_fp8 - per_token_bf16).abs().max()) < 0.5


# ---- the trainer end to end: CUDA against CPU (last: the slowest) -----------------------------


def _run_config(ws: Path, run: Path, *, device: str, dtype: str, refs: Path) -> Path:
    """The CPU test suite's small run (tests/conftest.py base_config), STEPS steps, one device."""
    cfg = {
        "model": {"init": str(ws / "init")},
        "precision": {"dtype": dtype},
        "data": {"shards": str(ws / "shards"), "ref_logps": str(refs), "max_length": 512, "max_tiles": 4,
                 "num_workers": 1, "shuffle_buffer": 16, "packing": False},
        "train": {"global_batch": 4, "micro_batch": 1, "steps": STEPS, "lr": 2.0e-3, "warmup": 1,
                  "device": device, "seed": 5},
        "checkpoint": {"interval": 1000},
        "logging": {"interval": 1, "metrics": str(run / "metrics.jsonl")},
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), f"{path}: not {STEPS} steps"
    assert all(math.isfinite(r["loss"]) for r in records), f"{path}: non-finite loss"
    return records


def _refs(directory: Path) -> dict[str, tuple[float, float]]:
    values = {}
    for path in sorted(directory.glob("*.ref.json")):
        for key, v in json.loads(path.read_text())["logps"].items():
            values[f"{path.name}/{key}"] = (v[0], v[1])
    return values


LOSS_KEYS = ("loss", "loss_preference", "loss_quality", "loss_generation")
# GPU fp32 against CPU fp32. NVIDIA_TF32_OVERRIDE=0 keeps cuBLAS and cuDNN in full fp32
# (torch's defaults already leave matmuls in fp32, torch.backends.cuda.matmul.allow_tf32 is
# False, but let cuDNN convolutions, the vision patch embedding, use TF32). What remains is
# the order of floating-point sums (tiled GEMMs, split reductions): relative differences of
# a few fp32 ulps (6e-8) per op, ~1e-6 after the network. Step 1 is that directly; every
# later step adds the previous updates' differences, which Adam divides by sqrt(v) and so
# can amplify for near-zero gradients. The CPU suite holds its own cross-layout runs (other
# sum orders) to rtol 1e-4 over 8 steps; 20 steps on another device get 10x that.
FP32_FIRST_RTOL, FP32_RTOL, FP32_ATOL = 1e-5, 1e-3, 1e-5
# GPU bf16 against CPU fp32. bf16 keeps 8 mantissa bits: every rounding is up to 2^-9
# (2e-3) relative; through 4 LLM + 2 vision layers the per-token log-probs carry ~1e-2
# relative error, which averages over a response in the generation loss. At step 1 the
# preference and quality terms are exactly log-sigmoid(0) on both sides (each side's
# reference values come from its own forward), so the step-1 loss differs by the
# generation loss's error only. Updates are computed in fp32 (master weights) from bf16
# gradients, so the curves drift apart slowly; 20 steps are held to 5x the step-1 bound.
# Measured with bf16 on a CPU against fp32 on a CPU (the MPO_GPU_TESTS_ON_CPU dry run of
# this test, same data and steps): 1.5e-5 relative at step 1, at most 1.6e-2 (generation
# loss) and 1.3e-2 (total loss) over the 20 steps -- the bounds leave 3-4x for other kernels.
BF16_FIRST_RTOL, BF16_RTOL, BF16_ATOL = 1e-2, 5e-2, 1e-3
# |log pi - log pi_0| of step 1 when the reference values come from the same device and
# dtype as the policy. The reference tool and the trainer collate the same micro-batches
# (same config file, same shapes), so the same kernels should give ~0 (the CPU suite asserts
# < 1e-4 in fp32; the bf16 CPU dry run gives 0.0). In bf16 a kernel choice that differs
# between no_grad/eval and training could move each token's log-prob by ~1e-2, i.e. sums of
# 8-18 tokens by up to ~0.1. Reference values of another model or data are off by O(1-10).
REF_MATCH_FP32, REF_MATCH_BF16 = 1e-4, 0.1
# fp32 reference values (sums of 8-18 token log-probs, -50..-110) on the device vs the CPU, relative
# to max(|value|, 1): sum-order differences of ~1e-6; 100x margin.
REF_VALUES_RTOL = 1e-4


def _max_rel(a: list[float], b: list[float], atol: float) -> float:
    """Largest |a - b| / max(|b|, atol) over the steps."""
    return max(abs(x - y) / max(abs(y), atol) for x, y in zip(a, b))


@pytest.mark.gpu_timeout(200)
def test_training_on_the_device_matches_the_cpu(gpu_workspace, tmp_path, background, kit_out):
    """Reference values and 20 training steps on the device (fp32, then bf16) against the
    same run on the CPU in fp32, each side with reference values of its own forward."""
    ws = gpu_workspace
    runs = {name: tmp_path / name for name in ("cpu_fp32", "dev_fp32", "dev_bf16")}
    refs = {name: tmp_path / f"refs_{name}" for name in runs}
    configs = {
        "cpu_fp32": _run_config(ws, runs["cpu_fp32"], device="cpu", dtype="fp32", refs=refs["cpu_fp32"]),
        "dev_fp32": _run_config(ws, runs["dev_fp32"], device=DEVICE, dtype="fp32", refs=refs["dev_fp32"]),
        "dev_bf16": _run_config(ws, runs["dev_bf16"], device=DEVICE, dtype="bf16", refs=refs["dev_bf16"]),
    }
    full_fp32 = {"NVIDIA_TF32_OVERRIDE": "0"}

    # The CPU side runs alongside the device runs (the GPU machine has cores to spare).
    cpu_refs = Background("tools/precompute_ref_logps.py", "--config", str(configs["cpu_fp32"]),
                          log=tmp_path / "logs" / "refs_cpu_fp32.log")
    background.append(cpu_refs)
    run_python("tools/precompute_ref_logps.py", "--config", str(configs["dev_fp32"]),
               log=tmp_path / "logs" / "refs_dev_fp32.log", env=full_fp32)
    run_python("-m megatron_mpo.train", "--config", str(configs["dev_fp32"]),
               log=tmp_path / "logs" / "train_dev_fp32.log", env=full_fp32)
    cpu_refs.wait(timeout=150)
    cpu_train = Background("-m megatron_mpo.train", "--config", str(configs["cpu_fp32"]),
                           log=tmp_path / "logs" / "train_cpu_fp32.log")
    background.append(cpu_train)
    run_python("tools/precompute_ref_logps.py", "--config", str(configs["dev_bf16"]),
               log=tmp_path / "logs" / "refs_dev_bf16.log")
    run_python("-m megatron_mpo.train", "--config", str(configs["dev_bf16"]),
               log=tmp_path / "logs" / "train_dev_bf16.log")
    cpu_train.wait(timeout=200)

    records = {name: _records(run) for name, run in runs.items()}
    curves = {name: {k: [r[k] for r in recs] for k in LOSS_KEYS} for name, recs in records.items()}
    cpu_refs_values, dev_refs_values = _refs(refs["cpu_fp32"]), _refs(refs["dev_fp32"])
    ref_diff = max(abs(a - b) / max(abs(b), 1.0) for k in cpu_refs_values
                   for a, b in zip(dev_refs_values.get(k, (math.nan,) * 2), cpu_refs_values[k]))
    summary = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (MPO_GPU_TESTS_ON_CPU dry run)",
        "steps": STEPS,
        "curves": curves,
        "ref_logratio_step0": {name: recs[0]["ref_logratio_step0"] for name, recs in records.items()},
        "ref_values_max_rel_diff_dev_fp32_vs_cpu": ref_diff,
        "max_rel_diff_vs_cpu": {
            name: {k: _max_rel(curves[name][k], curves["cpu_fp32"][k], 1e-3) for k in LOSS_KEYS}
            for name in ("dev_fp32", "dev_bf16")
        },
        "tolerances": {"fp32": [FP32_FIRST_RTOL, FP32_RTOL, FP32_ATOL],
                       "bf16": [BF16_FIRST_RTOL, BF16_RTOL, BF16_ATOL]},
    }
    write_json(kit_out, "e2e_losses.json", summary)

    cpu = curves["cpu_fp32"]["loss"]
    # The comparison means something only if training moves the loss.
    assert abs(cpu[-1] - cpu[0]) > 0.05 * abs(cpu[0]), cpu
    # The reference tool on the device matches the trainer's step-0 forward on the device.
    assert records["cpu_fp32"][0]["ref_logratio_step0"] < REF_MATCH_FP32
    assert records["dev_fp32"][0]["ref_logratio_step0"] < REF_MATCH_FP32
    assert records["dev_bf16"][0]["ref_logratio_step0"] < REF_MATCH_BF16
    # Reference values themselves: same samples, fp32 device vs CPU.
    assert dev_refs_values.keys() == cpu_refs_values.keys() and len(cpu_refs_values) > 0
    assert ref_diff < REF_VALUES_RTOL, ref_diff

    for name, first, rtol, atol in (("dev_fp32", FP32_FIRST_RTOL, FP32_RTOL, FP32_ATOL),
                                    ("dev_bf16", BF16_FIRST_RTOL, BF16_RTOL, BF16_ATOL)):
        for key in LOSS_KEYS:
            got, want = curves[name][key], curves["cpu_fp32"][key]
            assert got[0] == pytest.approx(want[0], rel=first, abs=atol), (name, key, "step 1")
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=rtol, atol=atol,
                                       msg=lambda m, n=name, k=key: f"{n} {k} vs cpu_fp32: {m}")

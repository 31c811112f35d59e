"""The GPU-only rules of the trainer, checked on CPU: device placement of every built chunk,
the sequence-length multiple for sequence parallelism and FP8, FP8 recipe plumbing, the
reference tool's precision and fingerprint, the MFU peak, and the packing default under
Transformer Engine."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_mpo import platform
from megatron_mpo.config import from_dict
from megatron_mpo.errors import UserError
from megatron_mpo.models.presets import get_preset
from tests.conftest import base_config


def _cfg(**sections) -> "object":
    """A run config over the tiny preset (no files needed); ``sections`` update it."""
    raw = {"model": {"preset": "tiny"}, "data": {"shards": "unused", "ref_logps": "unused"},
           "train": {"steps": 1, "global_batch": 1}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw).validate()


# ---- 1. every chunk on the platform's device -------------------------------------------


FREEZES = ([], ["vision"], ["vision", "projector"], ["language"], ["projector", "language"])


@pytest.mark.parametrize("freeze", FREEZES, ids=lambda f: "+".join(f) or "none")
def test_built_chunks_leave_nothing_on_the_cpu(world, monkeypatch, freeze):
    """Point the platform's device at ``meta``: no parameter or buffer may stay behind,
    frozen ones included (megatron-core's DDP would move trainable parameters only)."""
    from megatron_mpo import parallel
    from megatron_mpo.training import model_setup
    from megatron_mpo.training.precision import reference_precision

    monkeypatch.setattr(platform, "device", lambda: torch.device("meta"))
    cfg = _cfg(model={"freeze": freeze})
    layout = parallel.current_layout()
    for plan in (None, reference_precision(cfg)):  # trainer, reference tool
        chunks = model_setup.build_model_chunks(cfg, model_setup.model_config(cfg), layout, plan)
        left = [name for chunk in chunks
                for name, t in itertools.chain(chunk.named_parameters(), chunk.named_buffers())
                if t.device.type != "meta"]
        assert not left, left[:5]
        # Exactly the named parts are frozen (the projector module is ``vision_projection``).
        modules = {"vision": "vision_model.", "projector": "vision_projection.", "language": "language_model."}
        for part, prefix in modules.items():
            flags = {p.requires_grad for n, p in chunks[0].named_parameters() if n.startswith(prefix)}
            assert flags == {part not in freeze}, (part, flags)


# ---- 3. one sequence-length rule for sequence parallelism and FP8 ----------------------

# The constraints, as the libraries state them (not as the code under test computes them):
# scatter_to_sequence_parallel_region asserts S % TP == 0; Transformer Engine's FP8 GEMM
# needs prod(shape[:-1]) % 8 == 0 on each rank before the SP all-gather, and megatron-core
# aligns FP8 sequences to 16 (32 for mxfp8).
ALIGN = {"delayed": 16, "tensorwise": 16, "mxfp8": 32}


def _shapes_ok(S: int, B: int, tp: int, sp: bool, recipe) -> bool:
    shard = S // tp if sp else S
    if sp and S % tp:
        return False
    return recipe is None or (shard * B % 8 == 0 and shard % ALIGN[recipe] == 0)


LAYOUTS = [(1, False), (2, False), (2, True), (4, False), (4, True), (8, False), (8, True)]  # SP needs TP >= 2


@pytest.mark.parametrize("tp,sp", LAYOUTS)
@pytest.mark.parametrize("recipe", [None, "delayed", "tensorwise", "mxfp8"])
def test_sequence_multiple_meets_sp_and_fp8_shape_rules(tp, sp, recipe):
    from megatron_mpo.training.precision import sequence_multiple

    m = sequence_multiple(tp, sp, recipe)
    for k, B in itertools.product(range(1, 5), (1, 2, 3)):
        assert _shapes_ok(m * k, B, tp, sp, recipe), (m, k, B)
    # Nothing smaller satisfies them for packed rows (B = 1): no padding is wasted.
    assert not any(_shapes_ok(s, 1, tp, sp, recipe) for s in range(1, m))


@pytest.mark.parametrize("tp,sp,fp8,recipe,expected", [
    (2, True, None, "delayed", 2),
    (4, True, "hybrid", "delayed", 64),
    (8, True, "hybrid", "mxfp8", 256),
    (4, False, "hybrid", "tensorwise", 16),
])
def test_data_pipeline_pads_to_the_rule(tp, sp, fp8, recipe, expected):
    """The trainer's micro-batches follow the rule; the reference tool's follow it too with a
    current-scaling recipe (the reference shares the policy's FP8 numerics), and otherwise
    only need the sequence-parallel split."""
    from megatron_mpo.training.data_setup import loader_plan

    cfg = _cfg(model={"spec": "transformer_engine"}, parallel={"tensor": tp, "sequence": sp},
               precision={"dtype": "bf16", "fp8": fp8, "fp8_recipe": recipe})
    assert loader_plan(cfg, get_preset("tiny")).pad_multiple == expected
    same_fp8 = fp8 is not None and recipe != "delayed"
    assert loader_plan(cfg, get_preset("tiny"), for_reference=True).pad_multiple == (
        expected if same_fp8 else (tp if sp else 1))


# ---- 4. the FP8 recipe reaches TransformerConfig, the machine check, the fingerprint ----


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8"])
def test_fp8_recipe_reaches_the_transformer_config(world, monkeypatch, recipe):
    from megatron_mpo import parallel
    from megatron_mpo.models import internvl
    from megatron_mpo.training import model_setup

    seen = _capture_builds(monkeypatch)
    cfg = _cfg(model={"spec": "transformer_engine"},
               precision={"dtype": "bf16", "fp8": "hybrid", "fp8_recipe": recipe})
    model_setup.build_model_chunks(cfg, model_setup.model_config(cfg), parallel.current_layout())
    (kwargs,) = seen
    built = internvl.language_transformer_config(
        get_preset("tiny"), fp8=kwargs["fp8"], fp8_recipe=kwargs["fp8_recipe"], params_dtype=kwargs["params_dtype"])
    assert (built.fp8, built.fp8_recipe, built.params_dtype) == ("hybrid", recipe, torch.bfloat16)
    # The reference tool builds its own chunks: in the same FP8 numerics with a current-scaling
    # recipe, without FP8 (no recipe at all) with delayed scaling.
    seen.clear()
    from megatron_mpo.training.precision import reference_precision

    model_setup.build_model_chunks(cfg, model_setup.model_config(cfg), parallel.current_layout(),
                                   reference_precision(cfg))
    want = (None, None) if recipe == "delayed" else ("hybrid", recipe)
    assert (seen[0]["fp8"], seen[0]["fp8_recipe"]) == want and seen[0]["params_dtype"] == torch.bfloat16


class _Chunk(torch.nn.Module):
    """Stands in for a built chunk where only build_model's arguments matter."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {})()


def _capture_builds(monkeypatch) -> list:
    from megatron_mpo.models import internvl

    seen: list = []
    monkeypatch.setattr(internvl, "build_model", lambda config, **kw: seen.append(kw) or _Chunk())
    return seen


def _fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """Make the precision check believe it runs on a GPU of ``capability`` with TE installed."""
    from megatron_mpo.models import specs

    monkeypatch.setattr(platform, "current", lambda: platform.Platform("cuda", "nccl"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(specs, "te_available", lambda: True)


def test_mxfp8_is_refused_below_blackwell(monkeypatch):
    from megatron_mpo.training.precision import check_precision

    fp8 = {"model": {"spec": "transformer_engine"}, "precision": {"dtype": "bf16", "fp8": "hybrid"}}
    _fake_gpu(monkeypatch, (9, 0))
    check_precision(_cfg(**fp8))  # delayed on Hopper: fine
    with pytest.raises(UserError, match="mxfp8.*compute capability >= 10.0"):
        check_precision(_cfg(model=fp8["model"], precision={**fp8["precision"], "fp8_recipe": "mxfp8"}))
    _fake_gpu(monkeypatch, (10, 0))
    check_precision(_cfg(model=fp8["model"], precision={**fp8["precision"], "fp8_recipe": "mxfp8"}))


def test_reference_fp8_needs_a_current_scaling_recipe():
    with pytest.raises(UserError, match="reference_fp8 with fp8_recipe=delayed"):
        _cfg(model={"spec": "transformer_engine"},
             precision={"fp8": "hybrid", "fp8_recipe": "delayed", "reference_fp8": True})
    with pytest.raises(UserError, match="reference_fp8 must be true or false"):
        _cfg(precision={"reference_fp8": "yes"})
    with pytest.raises(UserError, match="reference_fp8 needs precision.fp8"):
        _cfg(precision={"reference_fp8": True})


def test_fingerprint_records_the_reference_precision(workspace):
    """By default the reference values are bf16 whatever the training recipe; with
    reference_fp8 they are FP8 and the recipe is part of the fingerprint."""
    from megatron_mpo.training.model_dir import read_model_config
    from megatron_mpo.data.refs import explain
    from megatron_mpo.training.data_setup import reference_fingerprint

    model_config = read_model_config(workspace / "init")

    def fp(**precision):
        cfg = from_dict(base_config(workspace, model={"spec": "transformer_engine"},
                                    precision={"dtype": "bf16", "fp8": "hybrid", **precision})).validate()
        return reference_fingerprint(cfg, model_config)

    delayed = fp(fp8_recipe="delayed")
    assert (delayed["dtype"], delayed["fp8"], delayed["fp8_recipe"]) == ("bf16", None, None)
    assert fp(fp8_recipe="tensorwise", reference_fp8=False) == delayed
    tensorwise, mx = fp(fp8_recipe="tensorwise", reference_fp8=True), fp(fp8_recipe="mxfp8", reference_fp8=True)
    assert (tensorwise["fp8"], tensorwise["fp8_recipe"]) == ("hybrid", "tensorwise")
    assert tensorwise != mx and tensorwise != delayed
    # The default (issue 27, item 8): a current-scaling recipe, and the reference in the same FP8
    # numerics as the policy (it used to be delayed scaling with a bf16 reference, always).
    assert fp() == tensorwise and fp(fp8_recipe="mxfp8") == mx
    assert "fp8_recipe='tensorwise'" in explain(tensorwise, mx)


def test_reference_tool_builds_with_the_reference_precision(world, monkeypatch, workspace, tmp_path):
    from megatron_mpo import reference
    from megatron_mpo.training import model_setup, precision

    class Built(Exception):
        pass

    def capture(cfg, model_config, layout, plan=None):
        raise Built(plan)

    monkeypatch.setattr(precision, "check_precision", lambda cfg: None)  # no TE / GPU here
    monkeypatch.setattr(model_setup, "build_model_chunks", capture)
    monkeypatch.setattr("megatron_mpo.parallel.shutdown", lambda: None)
    cfg = from_dict(base_config(workspace, model={"spec": "transformer_engine"},
                                data={"ref_logps": str(tmp_path / "refs")},
                                precision={"dtype": "bf16", "fp8": "hybrid", "fp8_recipe": "delayed"})).validate()
    with pytest.raises(Built) as built:
        reference.precompute(cfg, log=lambda *_: None)
    plan = built.value.args[0]
    assert (plan.dtype, plan.fp8, plan.fp8_recipe) == ("bf16", None, None)


# ---- 7. the MFU peak -------------------------------------------------------------------


@pytest.mark.parametrize("name,fp8,tflops", [
    ("NVIDIA H200", False, 989.4),
    ("NVIDIA H100 80GB HBM3", True, 1978.9),
    ("NVIDIA H100 PCIe", False, 756.0),
    ("NVIDIA GH200 480GB", False, 989.4),
    ("NVIDIA A100-SXM4-80GB", True, 312.0),  # no FP8 units: its bf16 peak
    ("NVIDIA B200", False, 2250.0),
    # Exact names (issue 27): "L4" is also a part of "NVIDIA L40", "H800" of "NVIDIA H800 PCIe".
    ("NVIDIA L40", False, 181.05),
    ("NVIDIA L40", True, 362.0),
    ("NVIDIA L40S", False, 362.05),
    ("NVIDIA L4", False, 121.0),
    ("NVIDIA H800 PCIe", False, 756.0),
    ("NVIDIA H800 80GB HBM3", False, 989.4),
])
def test_nominal_peak_by_device_name(name, fp8, tflops):
    from megatron_mpo.training.flops import nominal_peak

    peak = nominal_peak(name, fp8)
    assert peak.flops == pytest.approx(tflops * 1e12) and "nominal" in peak.source and name in peak.source


def test_known_gpu_uses_the_nominal_peak_unknown_one_is_measured(monkeypatch):
    from megatron_mpo.training import flops

    monkeypatch.setattr(platform, "current", lambda: platform.Platform("cuda", "nccl"))
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda **kw: 1.0e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert flops.device_peak().flops == pytest.approx(989.4e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    peak = flops.device_peak()
    assert peak.flops == 1.0e12 and "measured" in peak.source
    assert "TFLOP/s" in peak.describe()


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA L20", "NVIDIA GeForce RTX 4090"])
def test_a_name_not_in_the_table_is_measured_not_matched_by_a_part(name):
    from megatron_mpo.training.flops import nominal_peak

    assert nominal_peak(name) is None and nominal_peak(name, fp8=True) is None


def test_a_measured_peak_is_never_zero(monkeypatch):
    """A loaded CPU printed "mfu against 0.0 TFLOP/s" (issue 27): a measurement of 0 (a
    timer that did not move) is taken again, never used; small peaks print in GFLOP/s."""
    from megatron_mpo.training import flops

    calls = []
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda **kw: calls.append(kw) or 0.0)
    peak = flops.device_peak()
    assert len(calls) > 1 and peak.flops > 0 and math.isfinite(peak.flops), (calls, peak)
    counter = flops.FlopCounter(get_preset("tiny"))
    counter._peak = peak
    assert counter.mfu(tokens=100, seconds=1.0, world_size=1) > 0
    assert flops.Peak(4.2e10, "measured").describe() == "42.0 GFLOP/s (measured)"
    assert flops.Peak(9.894e14, "nominal").describe() == "989.4 TFLOP/s (nominal)"


def test_a_timer_that_does_not_move_gives_no_zero_or_infinite_peak(monkeypatch):
    from megatron_mpo.training import flops

    monkeypatch.setattr(flops.time, "perf_counter", lambda: 12.5)
    peak = flops.device_peak()
    assert 0 < peak.flops < float("inf"), peak


class _CountMatmuls(TorchFunctionMode):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.mm, torch.Tensor.__matmul__, torch.Tensor.matmul):
            self.log.append("mm")
        return func(*args, **(kwargs or {}))


def test_measured_peak_times_many_matmuls_per_sync(monkeypatch):
    """Launch latency must not dominate: each timed window holds many matmuls."""
    from megatron_mpo.training import flops

    log: list = []
    monkeypatch.setattr(platform, "synchronize", lambda: log.append("sync"))
    with _CountMatmuls(log):
        value = flops.measure_matmul_peak(size=64)
    assert value > 0
    windows = "".join("|" if x == "sync" else "m" for x in log).split("|")[1:-1:2]
    assert windows and all(len(w) >= 10 for w in windows), windows


# ---- 8. packing default under Transformer Engine ---------------------------------------


def test_transformer_engine_defaults_to_causal_rows_and_packs_on_flex_attention(world, monkeypatch):
    from megatron_mpo import parallel
    from megatron_mpo.training import model_setup, row_layout

    te, local = _cfg(model={"spec": "transformer_engine"}), _cfg()
    assert row_layout.packing_layout(te) == "unpacked" and row_layout.packing_layout(local) == "packed"
    assert row_layout.packing_warning(te, get_preset("tiny")) is None
    seen = _capture_builds(monkeypatch)
    model_setup.build_model_chunks(te, get_preset("tiny"), parallel.current_layout())
    assert seen[0]["attention_mask"] == "causal"  # TE can pick FlashAttention
    assert seen[0]["attention"] == "te"
    # Packing forced under TE: packed rows go to FlexAttention (block sparse), no warning.
    packed = dict(data={"packing": True, "max_length": 12288}, parallel={"tensor": 4}, precision={"dtype": "bf16"})
    forced = _cfg(model={"spec": "transformer_engine"}, **packed)
    big = get_preset("InternVL2-8B")
    assert row_layout.packing_layout(forced) == "packed" and row_layout.attention_kind(forced) == "flex"
    assert row_layout.packing_warning(forced, big) is None
    seen.clear()
    model_setup.build_model_chunks(forced, get_preset("tiny"), parallel.current_layout())
    assert (seen[0]["attention_mask"], seen[0]["attention"]) == ("arbitrary", "flex")
    # ... unless TE's own attention is asked for: its unfused path keeps the probabilities.
    unfused = _cfg(model={"spec": "transformer_engine", "attention": "te"}, **packed)
    warning = row_layout.packing_warning(unfused, big)
    # 8B at TP4, S = 12288: 8 heads x S^2 x 2 bytes x 32 layers = 72 GiB of probabilities.
    assert "72.0 GiB" in warning and "data.packing=false" in warning and "model.attention=flex" in warning


def test_step1_reference_gap_warns_above_the_reward_offset_bound():
    """Issue 27, item 8: a reference in other numerics (or from another checkpoint) is an
    offset in every pair's reward before any update; above beta * gap = 0.1 the run says so,
    naming the two precisions when they differ."""
    import math

    from megatron_mpo.training.reference_gap import REWARD_OFFSET_BOUND, reference_gap_warning

    assert REWARD_OFFSET_BOUND == 0.1
    assert reference_gap_warning(0.9, 0.003, 0.1, "bf16", "bf16") is None  # beta * gap = 0.09
    fp8 = reference_gap_warning(2.0, 0.02, 0.1, "bf16 + fp8 hybrid (delayed scaling)", "bf16")
    assert fp8 is not None and "\n" not in fp8
    assert "beta*gap = 0.2 above 0.1" in fp8 and "0.02 per token" in fp8
    assert "computes in bf16 + fp8 hybrid (delayed scaling)" in fp8 and "fp8_recipe: tensorwise" in fp8
    assert f"to {1 / (1 + math.exp(0.2)):.3f}" in fp8  # sigmoid(-0.2) = 0.450
    same = reference_gap_warning(30.0, 0.3, 0.1, "fp32", "fp32")
    assert "another checkpoint" in same and "tensorwise" not in same
    assert reference_gap_warning(float("nan"), float("nan"), 0.1, "fp32", "fp32") is None

"""Megatron-LM's production speed settings: which a run turns on (the rule, for machines this
CPU box is not), that they reach megatron-core, that the start-up banner lists them, and
(one 2-process gloo launch, tests/workers/overlap_worker.py) that the ones gloo can run give
the update the trainer gives without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_mpo.training.perf_settings import Machine, PerfSettings, bucket_size, choose, detect

GPU = Machine(cuda=True, apex_wgrad=True, te_permute=True)
CPU = Machine(cuda=False, apex_wgrad=False, te_permute=False)
WORKER = Path(__file__).parent / "workers" / "overlap_worker.py"
ON = ("overlap_grad_reduce", "overlap_param_gather", "align_param_gather", "gradient_accumulation_fusion",
      "deallocate_pipeline_outputs", "moe_permute_fusion")


def _on(settings: PerfSettings) -> set:
    return {name for name in ON if getattr(settings, name)}


def test_a_gpu_with_apex_and_te_turns_on_what_megatron_lm_recipes_do():
    # examples/mixtral/train_mixtral_8x7b_distributed.sh: PP4 x EP8, distributed optimizer,
    # --overlap-grad-reduce --overlap-param-gather; interleaved: aligned all-gathers.
    interleaved = choose(GPU, data_parallel=8, pipeline=4, interleaved=True, moe=True, training=True)
    assert _on(interleaved) == set(ON) and interleaved.why_off == {}
    assert interleaved.bucket_size == 40_000_000
    plain = choose(GPU, data_parallel=64, pipeline=1, interleaved=False, moe=False, training=True)
    assert _on(plain) == {"overlap_grad_reduce", "overlap_param_gather", "gradient_accumulation_fusion"}
    assert plain.bucket_size == 64_000_000  # 1M parameters per data-parallel rank beyond 40M
    assert plain.why_off == {"align_param_gather": "not interleaved", "deallocate_pipeline_outputs": "one pipeline stage",
                             "moe_permute_fusion": "dense model"}
    assert [bucket_size(n) for n in (1, 40, 41, 512)] == [40_000_000, 40_000_000, 41_000_000, 512_000_000]


def test_each_setting_stays_off_where_its_requirement_fails():
    cpu = choose(CPU, data_parallel=2, pipeline=2, interleaved=False, moe=True, training=True)
    assert _on(cpu) == {"overlap_grad_reduce", "overlap_param_gather", "deallocate_pipeline_outputs"}
    assert cpu.why_off["gradient_accumulation_fusion"] == cpu.why_off["moe_permute_fusion"] == "no CUDA device"
    # gloo: the interleaved schedule would free outputs its async sends still read.
    cpu_interleaved = choose(CPU, data_parallel=1, pipeline=2, interleaved=True, moe=False, training=True)
    assert _on(cpu_interleaved) == set()
    assert cpu_interleaved.why_off["deallocate_pipeline_outputs"] == "interleaved schedule's async sends on gloo"
    no_apex = choose(Machine(cuda=True, apex_wgrad=False, te_permute=True), data_parallel=4, pipeline=1,
                     interleaved=False, moe=True, training=True)
    assert not no_apex.gradient_accumulation_fusion and no_apex.moe_permute_fusion
    assert "fused_weight_gradient_mlp_cuda" in no_apex.why_off["gradient_accumulation_fusion"]
    old_te = choose(Machine(cuda=True, apex_wgrad=True, te_permute=False), data_parallel=1, pipeline=1,
                    interleaved=False, moe=True, training=True)
    assert _on(old_te) == {"gradient_accumulation_fusion"}
    assert old_te.why_off["moe_permute_fusion"] == "needs Transformer Engine >= 2.1"
    assert old_te.why_off["overlap_grad_reduce"] == "one data-parallel rank" and old_te.bucket_size is None
    # The reference tool: no gradients, so nothing to reduce, gather or accumulate.
    reference = choose(GPU, data_parallel=8, pipeline=2, interleaved=True, moe=True, training=False)
    assert _on(reference) == {"deallocate_pipeline_outputs", "moe_permute_fusion"}
    assert reference.why_off["gradient_accumulation_fusion"] == reference.why_off["overlap_grad_reduce"] == "forward only"


def test_the_banner_lists_the_settings_and_why_the_others_are_off():
    from megatron_mpo.config import from_dict
    from megatron_mpo.parallel import Layout
    from megatron_mpo.training.run_report import banner

    speed = choose(CPU, data_parallel=2, pipeline=1, interleaved=False, moe=False, training=True)
    assert speed.describe() == (
        "overlap_grad_reduce, overlap_param_gather (buckets of 40M params); off: align_param_gather (not "
        "interleaved), gradient_accumulation_fusion (no CUDA device), deallocate_pipeline_outputs (one pipeline "
        "stage), moe_permute_fusion (dense model)")
    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"shards": "s", "ref_logps": "r"}, "train": {"steps": 3}})
    layout = Layout(tensor=1, pipeline=1, data=2, tensor_rank=0, pipeline_rank=0, data_rank=0)
    text = banner(cfg, layout, total_steps=3, start_step=0, pairs=None, template="t", template_source="s",
                  precision="fp32", reference_precision="fp32", rows="unpacked", mfu_peak="x",
                  speed=speed.describe())
    assert f"\n  speed: {speed.describe()}" in text


def test_this_machine_is_read_as_megatron_core_reads_it(world):
    # No GPU, no apex, no Transformer Engine here: megatron-core's own flags say so too.
    from megatron.core.tensor_parallel import layers

    assert detect() == CPU
    assert layers._grad_accum_fusion_available is False


def test_the_settings_reach_every_sub_model(world, monkeypatch):
    """gradient_accumulation_fusion reaches the vision tower's and projector's linears too
    (they allocate and add a weight gradient per micro-batch otherwise); the LLM's config
    carries the pipeline and MoE ones. megatron-core's linears refuse the fusion without
    apex's CUDA extension, so its flag is set for the build: nothing runs backward here."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_mpo.config import from_dict
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.parallel import current_layout
    from megatron_mpo.training.model_setup import build_model_chunks

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)
    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"shards": "s", "ref_logps": "r"}, "train": {"steps": 1}})
    speed = PerfSettings(gradient_accumulation_fusion=True, deallocate_pipeline_outputs=True)
    (chunk,) = build_model_chunks(cfg, get_preset("tiny"), current_layout(), speed=speed)
    linears = [m for m in chunk.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    parts = {name.split(".")[0] for name, m in chunk.named_modules() if m in linears}
    assert parts == {"vision_model", "vision_projection", "language_model"}
    assert all(m.gradient_accumulation_fusion for m in linears)
    assert chunk.config.deallocate_pipeline_outputs and chunk.config.gradient_accumulation_fusion
    # Without settings (the reference tool): a forward-only run's, here all off.
    (plain,) = build_model_chunks(cfg, get_preset("tiny"), current_layout())
    assert not plain.config.deallocate_pipeline_outputs and not plain.config.gradient_accumulation_fusion


def test_overlap_and_deallocation_give_the_same_training(tmp_path):
    from tests.distributed import launch

    launch(WORKER, 2, tmp_path, timeout=300)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result_rank{rank}.json").read_text())
        assert result["failures"] == [], "\n".join(result["failures"])
        facts = result["facts"]
        # The worker's "on" runs are what the rule picks for those layouts on a GPU.
        assert facts["dp2_chosen"] == [True, True, 40_000_000] and facts["pp2_chosen"] is True
        # The DP2 runs train the whole model (vision tower, projector, LLM) with overlap: text-only
        # micro-batches run the vision modules on a blank tile, so both ranks' hooks fire alike.
        moved, vision = facts["dp2_vision_moved"]
        assert moved == vision > 30  # every vision tower and projector weight trained
        # Overlap really ran: several buckets, each reduced on its own, and forward pre-hooks
        # that wait for the all-gather (none without overlap).
        assert facts["dp2_bucket_groups"][0] == 1 and facts["dp2_bucket_groups"][1] > 2
        assert facts["dp2_pre_hooks"][0] == 0 and facts["dp2_pre_hooks"][1] > 10
        # An evaluation after step 2 (rank 0 only) saw that step's weights, gathered once on
        # entry, and ran without pre-hooks; training went on unchanged (the comparison above).
        assert facts["dp2_eval"]["stale_before"] > 0 and facts["dp2_eval"]["differ_from_off"] == 0
        assert facts["dp2_eval"]["hooks_inside"] == 0
        # Step 3 (rank 1's loss not finite) was skipped on both ranks, with and without overlap.
        assert facts["dp2_applied"] == [True, True, False, True]
        # With the all-gather overlapped, this rank held stale shards until the save synced them.
        assert facts["dp2_stale_before_sync"] > 0 and facts["dp2_off_stale_before_sync"] == 0
        # PP2: the "on" run freed every output it kept for the backward (one element left);
        # on the first stage those are the activations it sent. "off" freed none.
        assert facts["pp2_freed_off"] == 0 and len(facts["pp2_freed_on"]) >= 2
        assert all(after == 1 for _, after in facts["pp2_freed_on"])
        if rank == 0:
            assert all(before > 1000 for before, _ in facts["pp2_freed_on"])


@pytest.mark.parametrize("optimizer_format", ["reshardable", "dp_reshardable"])
def test_a_checkpoint_of_an_overlapped_run_resumes_exactly(world, tmp_path, optimizer_format):
    """Overlap splits the gradient buffer into buckets, each padded at its end. A save after
    step 1 and a load into other weights must take step 2 as the run that never saved
    (megatron-core 0.16.1's reshardable save dropped the padding yet sliced each parameter
    at its padded index: every parameter past the first bucket was saved with another's
    Adam state and master weights)."""
    from megatron_mpo.training.checkpoint import CheckpointManager
    from tests.test_fused_adam_state import _build, _step

    speed = PerfSettings(overlap_grad_reduce=True, overlap_param_gather=True, bucket_size=20_000)
    straight, straight_opt = _build(seed=3, speed=speed)
    assert len(straight[0].buffers[0].buckets) > 2
    for seed in (11, 12):
        _step(straight, straight_opt, seed)
    chunks, optimizer = _build(seed=3, speed=speed)
    _step(chunks, optimizer, 11)
    manager = CheckpointManager(tmp_path, optimizer_format=optimizer_format)
    saved = manager.save(1, chunks, optimizer, {"step": 1}, {})
    resumed, resumed_opt = _build(seed=4, speed=speed)  # other weights: the load must replace them
    manager.load(saved, resumed, resumed_opt)
    _step(resumed, resumed_opt, 12)
    for chunk in (straight, resumed):
        chunk[0].start_param_sync(force_sync=True)  # overlap_param_gather: the last update's shards
    want = dict(straight[0].module.named_parameters())
    differ = [n for n, p in resumed[0].module.named_parameters() if not torch.equal(p, want[n])]
    assert differ == [], f"{len(differ)} of {len(want)} parameters differ after the resume, e.g. {differ[:3]}"

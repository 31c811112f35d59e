"""What only a GPU can show: the model and its frozen parts live on the device, the trainer
and the reference tool run end to end on CUDA and agree with the CPU, and Transformer Engine
/ FP8 build, load and run.

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


def collate(model_config, pairs: list, layout: str = "unpacked", pad_multiple: int = 1):
    from megatron_mpo.data.collate import collate_pairs

    return collate_pairs(pairs, 0, model_config.img_context_token_id, model_config.tokens_per_tile,
                         pad_multiple=pad_multiple, layout=layout)


def forward_logps(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot log-prob sums and token counts, as the trainer's forward step computes them."""
    from megatron_mpo.batch import causal_mask
    from megatron_mpo.training.forward import model_inputs, slot_log_probs

    batch = batch.to(torch.device(DEVICE))
    if batch.attention_mask is None:
        batch.attention_mask = causal_mask(batch.input_ids.shape[1]).to(DEVICE)
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

    mpo = MPOLoss(cfg.mpo.loss_config(), group=world.data_group)
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
    assert data_setup.data_config(cfg, config).pad_multiple == multiple

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

"""Mixture-of-experts InternVL (InternVL3.5-30B-A3B / 241B-A28B: Qwen3-MoE LLM) against a
tiny random transformers InternVL with a Qwen3-MoE text model (4 experts, 2 per token,
renormalised; layer 1 dense through ``mlp_only_layers``).

In this process: configs, refusals, conversion both ways (bit-exact, both Hugging Face
namings, the original InternVL layout), logits / losses / every gradient at TP1/EP1, the
active-parameter FLOP count. In one 4-process gloo launch (tests/workers/moe_worker.py):
the converted model directory loaded at TP2 and at EP2 x PP2, logits (and, at EP2 x PP2,
every gradient) against transformers, a distributed checkpoint saved at EP2 x PP2 read back at EP1,
and the trainer's finiteness guard catching a NaN in DDP's expert-parallel gradient buffer.
The reference tool at EP2 over ranks of unequal work (an empty shard included) in the
fixture of the trainer tests.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_mpo.errors import UserError
from tests import _model_worker as worker
from tests.distributed import REPO, launch
from tests.test_model import IMG_ID, _cases, _packed_reference_grads, _reference_grads

MOE_TEXT = dict(model_type="qwen3_moe", vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                router_aux_loss_coef=0.01, rope_theta=1000000.0, attention_bias=False,
                max_position_embeddings=256, rms_norm_eps=1e-6)


def _hf_moe_model(seed: int = 5):
    from transformers import InternVLConfig as HFInternVLConfig
    from transformers import InternVLForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  attention_bias=True, norm_type="layer_norm", use_qk_norm=False, image_size=56, patch_size=14,
                  layer_scale_init_value=0.5)
    config = HFInternVLConfig(vision_config=vision, text_config=dict(MOE_TEXT), image_token_id=IMG_ID,
                              image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everything (router included), so a swapped tensor shows
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(noise * (0.3 if p.dim() == 1 else 0.08) + (1.0 if is_norm else 0.0))
    return model, config


@pytest.fixture(scope="module")
def moe_ref(tmp_path_factory):
    from megatron_mpo.training.model_dir import write_model_dir
    from megatron_mpo.conversion.native import hf_to_megatron
    from megatron_mpo.conversion.hf_config import internvl_config_from_hf

    root = tmp_path_factory.mktemp("moe_ref")
    hf, hf_config = _hf_moe_model()
    config = internvl_config_from_hf(hf_config)
    # transformers adds no load-balancing loss unless output_router_logits: compare without.
    config.language.router_aux_loss_coef = 0.0
    cases = _cases(hf, config.language.vocab_size, 3)
    grads = _reference_grads(hf, next(c for c in cases if c["name"] == "pair"), config)
    packed_grads = _packed_reference_grads(hf, next(c for c in cases if c["name"] == "packed_pairs"), config)
    full = hf_to_megatron(hf.state_dict(), config)
    (root / "config.json").write_text(config.to_json())
    torch.save(full, root / "mcore.pt")
    torch.save(cases, root / "cases.pt")
    torch.save(grads, root / "grads.pt")
    torch.save(packed_grads, root / "packed_grads.pt")
    return dict(root=root, hf=hf, hf_config=hf_config, config=config, cases=cases, grads=grads,
                packed_grads=packed_grads, full=full, write_model_dir=write_model_dir)


# ---- configuration ------------------------------------------------------------------------


def test_qwen3_moe_config_is_read_from_both_layouts_and_gpt_oss_is_refused():
    from megatron_mpo.conversion.families import check_llm_supported
    from megatron_mpo.conversion.hf_config import internvl_config_from_hf
    from megatron_mpo.models.presets import get_preset

    hf, hf_config = _hf_moe_model()
    lang = internvl_config_from_hf(hf_config).language
    assert (lang.family, lang.num_experts, lang.num_experts_per_tok, lang.moe_intermediate_size) == ("qwen3_moe", 4, 2, 32)
    assert lang.norm_topk_prob and lang.mlp_only_layers == [1] and lang.qk_norm and not lang.qkv_bias
    assert [lang.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert lang.router_aux_loss_coef == 0.01
    # A config.json without the MoE keys gets transformers' Qwen3MoeConfig defaults.
    bare = {k: v for k, v in hf_config.to_dict()["text_config"].items()
            if k not in ("norm_topk_prob", "num_experts_per_tok", "decoder_sparse_step", "num_local_experts")}
    data = dict(hf_config.to_dict(), text_config=bare)
    lang = internvl_config_from_hf(data).language
    assert (lang.norm_topk_prob, lang.num_experts_per_tok, lang.decoder_sparse_step, lang.num_experts) == (False, 8, 1, 128)
    # The Hub's config.json name (num_experts) and transformers 5's (num_local_experts) both work.
    hub = dict(hf_config.to_dict(), text_config=dict(bare, num_experts=4, num_experts_per_tok=2))
    assert internvl_config_from_hf(hub).language.num_experts == 4
    # decoder_sparse_step 2: layers 1, 3, ... have experts.
    data = dict(hf_config.to_dict(), text_config=dict(hf_config.to_dict()["text_config"], decoder_sparse_step=2,
                                                      mlp_only_layers=[], num_experts_per_tok=2))
    lang = internvl_config_from_hf(data).language
    assert [lang.is_moe_layer(i) for i in range(3)] == [False, True, False]
    with pytest.raises(UserError, match="shared expert"):
        internvl_config_from_hf(dict(data, text_config=dict(data["text_config"], shared_expert_intermediate_size=64)))
    for name in ("gpt_oss", "GptOssForCausalLM"):
        with pytest.raises(UserError, match="GPT-OSS") as exc:
            check_llm_supported(name)
        assert "\n" not in str(exc.value)
    big = get_preset("InternVL3_5-30B-A3B").language
    assert (big.num_experts, big.num_experts_per_tok, big.moe_intermediate_size, big.norm_topk_prob) == (128, 8, 768, True)
    assert get_preset("InternVL3_5-241B-A28B").vision.hidden_size == 3200  # InternViT-6B


def test_moe_hf_megatron_hf_is_bit_exact_in_both_namings_and_te_names_keep_moe_norms(tmp_path):
    from megatron_mpo.conversion.native import from_te_names, hf_to_megatron, megatron_to_hf, to_te_names
    from megatron_mpo.conversion.hf_config import internvl_config_from_hf
    from tests.test_conversion import _assert_bits_equal, _safetensors_dir

    hf, hf_config = _hf_moe_model()
    config = internvl_config_from_hf(hf_config)
    module_sd = hf.state_dict()
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in module_sd  # transformers 5: 3-D experts
    mcore = hf_to_megatron(module_sd, config)
    assert mcore["language_model.decoder.layers.0.mlp.router.weight"].shape == (4, 64)
    assert mcore["language_model.decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"].shape == (64, 64)
    assert "language_model.decoder.layers.1.mlp.linear_fc1.weight" in mcore  # the dense layer
    back = megatron_to_hf(mcore, config, layout="module")
    _assert_bits_equal({k: v for k, v in back.items()}, {k: v for k, v in module_sd.items()}, "module names")
    # What save_pretrained writes: one tensor per expert.
    hf.save_pretrained(tmp_path)
    on_disk = _safetensors_dir(tmp_path)
    assert "language_model.model.layers.0.mlp.experts.1.up_proj.weight" in on_disk
    from_disk = hf_to_megatron(on_disk, config)
    _assert_bits_equal(from_disk, mcore, "megatron from the checkpoint names")
    _assert_bits_equal(megatron_to_hf(mcore, config, layout="checkpoint"), on_disk, "checkpoint names")
    te = to_te_names(mcore)
    assert "language_model.decoder.layers.0.pre_mlp_layernorm.weight" in te  # MoE layer: its own norm
    assert "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te  # dense: fused
    assert sorted(from_te_names(te)) == sorted(mcore)


def test_moe_original_layout_round_trip(tmp_path):
    from megatron_mpo.conversion.native import hf_to_megatron, megatron_to_hf
    from megatron_mpo.conversion.original import native_to_original, original_to_native
    from megatron_mpo.conversion.hf_config import internvl_config_from_hf
    from tests.test_conversion import _assert_bits_equal

    hf, hf_config = _hf_moe_model()
    config = internvl_config_from_hf(hf_config)
    native_cfg = hf_config.to_dict()
    orig_sd, orig_cfg = native_to_original(hf.state_dict(), native_cfg, template="internvl2_5")
    assert orig_cfg["llm_config"]["architectures"] == ["Qwen3MoeForCausalLM"]
    assert "language_model.model.layers.2.mlp.experts.3.down_proj.weight" in orig_sd
    native_sd, cfg_back = original_to_native(orig_sd, orig_cfg)
    assert internvl_config_from_hf(cfg_back).language == config.language
    mcore = hf_to_megatron(native_sd, config)
    _assert_bits_equal(mcore, hf_to_megatron(hf.state_dict(), config), "megatron via the original layout")
    orig_again, _ = native_to_original(megatron_to_hf(mcore, config, layout="module"), native_cfg)
    _assert_bits_equal(orig_again, orig_sd, "original export")


# ---- the model at TP1 / EP1 ---------------------------------------------------------------


def test_moe_tp1_logits_losses_and_grads_match_transformers(moe_ref, megatron_tp1):
    from megatron_mpo.models.internvl import build_model

    model = build_model(moe_ref["config"])
    assert sum(1 for n, _ in model.named_parameters() if "router" in n) == 2  # layers 0 and 2
    worker.load_full(model, moe_ref["full"])
    model.eval()
    failures = []
    for case in moe_ref["cases"]:
        failures += worker.check_case(model, case, "TP1EP1")
    model.train()
    pair = next(c for c in moe_ref["cases"] if c["name"] == "pair")
    failures += worker.check_grads(model, pair, moe_ref["grads"], "TP1EP1", None, 1)
    packed = next(c for c in moe_ref["cases"] if c["name"] == "packed_pairs")
    failures += worker.check_grads(model, packed, moe_ref["packed_grads"], "TP1EP1 packed", None, 1)
    assert not failures, "\n".join(failures[:10])


def test_moe_flops_count_active_parameters(moe_ref, megatron_tp1):
    """The LLM's matmul FLOPs of a forward pass, counted by torch, equal FlopCounter's
    linear term: router + the top-k experts per token in MoE layers, not every expert."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.training.flops import FlopCounter

    config = moe_ref["config"]
    model = build_model(config)
    worker.load_full(model, moe_ref["full"])
    layers = model.language_model.decoder.layers
    hidden = torch.randn(12, 1, config.language.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        for layer in layers:
            layer.mlp(layer.pre_mlp_layernorm(hidden))
    ours = FlopCounter(config, frozen=("vision", "projector", "language")).llm_linear_flops_per_token()
    lang = config.language
    head = lang.kv_channels
    attn = lang.hidden_size * (lang.num_heads + 2 * lang.num_kv_heads) * head + lang.num_heads * head * lang.hidden_size
    mlp_only = ours - 2 * lang.num_layers * attn
    assert counted.get_total_flops() == pytest.approx(12 * mlp_only, rel=1e-9)
    dense_experts = 3 * lang.hidden_size * lang.moe_intermediate_size * lang.num_experts
    assert mlp_only < 2 * 12 * dense_experts  # all experts would be far more


# ---- expert parallelism: one 4-process launch ----------------------------------------------


def test_ep2_tp2_and_ep2_pp2_load_the_converted_dir_and_match_transformers(moe_ref):
    root = moe_ref["root"]
    moe_ref["write_model_dir"](root / "megatron", moe_ref["config"], None, state=moe_ref["full"], log=lambda _: None)
    launch(REPO / "tests" / "workers" / "moe_worker.py", 4, root, timeout=900)
    result = json.loads((root / "failures.json").read_text())
    assert not result["failures"], "\n".join(result["failures"][:10])
    assert result["checked"] == sorted(["TP2PP1EP1 forward", "TP1PP2EP2", "EP2PP2->EP1 checkpoint",
                                        "EP2 expert-gradient guard"])


# ---- the trainer at EP2: same steps as EP1, exact resume --------------------------------------


# The moe workspace's shards in index order: ranks i % 2 of the reference tool at EP2 get
# unequal work (rank 0: 12 + 24 pairs, rank 1: 24 pairs and a shard of none).
MOE_SHARDS = {"shard-000002": 12, "shard-000000": 24, "shard-000001": 24, "empty": 0}


@pytest.fixture(scope="module")
def moe_workspace(workspace, tmp_path_factory):
    """The session workspace's tokenizer and samples with the tiny-moe preset, in shards of
    their own (:data:`MOE_SHARDS`), and their reference values computed at EP2 over 2
    processes (a hang fails in 2 minutes instead of the default 10)."""
    from megatron_mpo.training.model_dir import init_model_dir
    from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards
    from tests.conftest import base_config, write_config
    from tests.test_reference import add_empty_shard

    ws = tmp_path_factory.mktemp("moe_ws")
    init_model_dir("tiny-moe", workspace / "tok", ws / "init", seed=1)  # what tools/init_checkpoint.py does
    make_shards(MakeShardsConfig(out=str(ws / "shards"), meta=str(workspace / "raw" / "meta.json"),
                                 samples_per_shard=24, workers=1, progress=False), log=lambda _: None)
    index = json.loads((ws / "shards" / "index.json").read_text())
    index["shards"].sort(key=lambda s: s["samples"])  # the short shard first
    (ws / "shards" / "index.json").write_text(json.dumps(index))
    add_empty_shard(ws / "shards", "empty", len(index["shards"]))
    cfg = base_config(workspace, model={"init": str(ws / "init")},
                      data={"shards": str(ws / "shards"), "ref_logps": str(ws / "refs")},
                      parallel={"expert": 2, "timeout_minutes": 2})
    launch("tools/precompute_ref_logps.py", 2, "--config", str(write_config(ws / "ref.yaml", cfg)))
    return ws


def test_ep2_reference_tool_finishes_unequal_work_and_an_empty_shard(moe_workspace):
    """Every collective of the EP2 reference run is matched on both ranks: rank 0 finishes a
    short shard while rank 1 is mid-shard, rank 1 reaches an empty shard and runs out of
    shards while rank 0 still computes (the launch in the fixture hung there)."""
    from tests.test_reference import sidecars

    index = json.loads((moe_workspace / "shards" / "index.json").read_text())
    assert {s["name"][:-4]: s["samples"] for s in index["shards"]} == MOE_SHARDS  # in this order
    assert list(MOE_SHARDS) == [s["name"][:-4] for s in index["shards"]]
    found = sidecars(moe_workspace / "refs")
    assert {name[: -len(".ref.json")]: len(body["logps"]) for name, body in found.items()} == MOE_SHARDS
    assert all(body["complete"] and body["pairs"] == len(body["logps"]) for body in found.values())


def _moe_train(workspace, moe_ws, run, nproc: int, expert: int, pipeline: int = 1, **sections):
    from tests.test_training import train

    model = {"init": str(moe_ws / "init")}
    data = dict({"shards": str(moe_ws / "shards"), "ref_logps": str(moe_ws / "refs")}, **sections.pop("data", {}))
    return train(workspace, run, nproc, model=model, data=data, parallel={"expert": expert, "pipeline": pipeline},
                 train={"steps_override": 4}, **sections)


def test_ep2_trains_like_ep1_and_resumes_exactly(workspace, moe_workspace, tmp_path):
    """4 steps at EP1 (2 processes) and at EP2 x PP2 (4 processes), data-parallel 2 in both
    (so the same pairs per rank): the same losses, load-balancing term and gradient norms;
    then EP2 x PP2 resumed from its step-2 checkpoint repeats steps 3 and 4 exactly."""
    from tests.conftest import read_jsonl

    ep1, ep2, resumed = tmp_path / "ep1", tmp_path / "ep2pp2", tmp_path / "resumed"
    _moe_train(workspace, moe_workspace, ep1, 2, 1)
    _moe_train(workspace, moe_workspace, ep2, 4, 2, pipeline=2, checkpoint={"save": str(ep2 / "ckpt"), "interval": 2})
    a, b = read_jsonl(ep1 / "metrics.jsonl"), read_jsonl(ep2 / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert b[0]["ref_logratio_step0"] < 1e-4  # EP2 reference values == EP2 x PP2 policy at step 0
    assert abs(b[-1]["loss"] - b[0]["loss"]) > 1e-4  # it trains
    for key in ("loss", "loss_preference", "loss_generation", "reward_margin", "aux_loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in b]), torch.tensor([r[key] for r in a]),
                                   rtol=1e-4, atol=1e-6, msg=key)
    assert all(r["aux_loss"] > 0 for r in b)
    _moe_train(workspace, moe_workspace, resumed, 4, 2, pipeline=2,
               checkpoint={"load": str(ep2 / "ckpt" / "step_000000002"), "save": str(resumed / "ckpt"),
                           "interval": 2})
    c = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in c] == [3, 4]
    for x, y in zip(b[2:], c):
        for key in ("loss", "aux_loss", "reward_margin", "grad_norm", "lr"):
            assert x[key] == y[key], (key, x["step"], x[key], y[key])

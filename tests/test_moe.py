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


def _hf_moe_model(seed: int = 5, **text):
    """The tiny transformers model (``text``: MOE_TEXT keys to change)."""
    from transformers import InternVLConfig as HFInternVLConfig
    from transformers import InternVLForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  attention_bias=True, norm_type="layer_norm", use_qk_norm=False, image_size=56, patch_size=14,
                  layer_scale_init_value=0.5)
    config = HFInternVLConfig(vision_config=vision, text_config=dict(MOE_TEXT, **text), image_token_id=IMG_ID,
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
                                        "EP2 expert-gradient guard", "TP2 sequence-parallel load balancing"])


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


# ---- load balancing as the model was trained (issue 27, items 9 and 10) -------------------
# Three MoE layers and top-2, so megatron-core's per-layer convention (coefficient x the sum
# over layers of terms that are 1 at balance) and transformers' (coefficient x one term that
# is top_k at balance) differ by num_moe_layers / top_k = 1.5.


@pytest.fixture(scope="module")
def balance_model(megatron_tp1):
    """The tiny MoE (all three layers with experts, coefficient 0.01 from its config.json) in
    megatron-core, training mode, with transformers' weights."""
    from megatron_mpo.conversion.hf_config import internvl_config_from_hf
    from megatron_mpo.conversion.native import hf_to_megatron
    from megatron_mpo.models.internvl import build_model

    hf, hf_config = _hf_moe_model(mlp_only_layers=[])
    config = internvl_config_from_hf(hf_config)
    assert config.language.router_aux_loss_coef == 0.01
    model = build_model(config, attention_mask="arbitrary")
    worker.load_full(model, hf_to_megatron(hf.state_dict(), config))
    return model.train(), config


def _batches(layout: str) -> list:
    """Three pairs of unequal lengths (natural padding), then the same with 7 more padded positions."""
    from megatron_mpo.batch import pad_to_length
    from megatron_mpo.data.collate import collate_pairs
    from tests.test_model import _packed_pairs

    pairs = _packed_pairs(torch.Generator().manual_seed(11))
    batch = collate_pairs(pairs, 0, IMG_ID, 4, layout=layout, row_length=40, max_pairs_per_row=2)
    return [batch, pad_to_length(batch, batch.input_ids.shape[1] + 7)]


def _real_positions(batch) -> torch.Tensor:
    """[R, S] True where a row holds a pair's token (from the collate contract, not the code
    under test): unpacked rows end one position after their last scored label; packed rows
    end with their last pair's rejected branch (the trailing segment has no response)."""
    index = batch.response_index
    last = torch.where(index >= 0, torch.arange(index.shape[1]), -1).max(dim=1).values
    return torch.arange(index.shape[1]) <= (last + 1).unsqueeze(1)


def _forward_with_router_inputs(model, batch):
    """(real-token logits' source output [R, S, V], [(router, its input [S, R, H])...]) of one
    training-mode forward through the trainer's model inputs, graph kept."""
    from megatron_mpo.training.forward import model_inputs

    seen = []
    hooks = [layer.mlp.router.register_forward_pre_hook(lambda m, args: seen.append((m, args[0])))
             for layer in model.language_model.decoder.layers if hasattr(layer.mlp, "router")]
    try:
        kwargs = dict(model_inputs(model, batch), labels=None, loss_mask=None)
        output = model(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return output, seen


def _transformers_term(seen, lang, valid: torch.Tensor) -> torch.Tensor:
    """coef x transformers' load_balancing_loss_func, one call per MoE layer (padding out
    through its attention_mask), averaged over the layers."""
    import torch.nn.functional as F
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    mask = valid.transpose(0, 1).reshape(-1)  # megatron-core's rows are sequence-major
    terms = [load_balancing_loss_func((F.linear(x.float(), router.weight.float()).reshape(-1, lang.num_experts),),
                                      lang.num_experts, lang.num_experts_per_tok, mask) for router, x in seen]
    return lang.router_aux_loss_coef * torch.stack(terms).mean()


def _added_term(model) -> float:
    from megatron_mpo.training.metrics import router_aux_loss

    return router_aux_loss([model], micro_batches=1, pipeline_rank=0)


def test_aux_loss_is_transformers_load_balancing_times_coef(balance_model):
    """Value and gradient of the load-balancing term the trainer adds = coef x transformers'
    formula (per MoE layer, averaged over layers) on the same router logits, real tokens only."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

    model, config = balance_model
    clear_aux_losses_tracker()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    batch = _batches("unpacked")[0]
    output, seen = _forward_with_router_inputs(model, batch)
    assert len(seen) == 3
    expected = _transformers_term(seen, config.language, _real_positions(batch))
    got = _added_term(model)
    assert got == pytest.approx(float(expected), rel=1e-5), (got, float(expected))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    (output.float().sum() * 0.0).backward(retain_graph=True)  # only the load-balancing term's gradient
    # megatron-core's scaler nodes on the routers' outputs add their layer's loss gradient
    # whenever a backward passes them: off while the transformers term's gradient is taken.
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.0))
    theirs = torch.autograd.grad(expected, [p for _, p in named], allow_unused=True)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    for (name, p), b in zip(named, theirs):
        a = p.grad if p.grad is not None else torch.zeros_like(p)
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10, msg=lambda m: f"{name}: {m}")
    routers = [p for n, p in named if "router" in n]
    assert len(routers) == 3 and all(float(p.grad.abs().sum()) > 0 for p in routers)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_padding_neither_counts_in_the_aux_loss_nor_changes_real_logits(balance_model, layout):
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    model, config = balance_model
    clear_aux_losses_tracker()
    terms, logits = [], []
    for batch in _batches(layout):
        output, seen = _forward_with_router_inputs(model, batch)  # with grad: the router adds its loss
        real = _real_positions(batch)
        assert not real.all() and torch.equal(batch.padding, ~real)  # padding, marked by the collation
        terms.append((_added_term(model), float(_transformers_term(seen, config.language, real))))
        logits.append(output.detach()[real])
    (plain, plain_expected), (padded, padded_expected) = terms
    assert plain_expected == pytest.approx(padded_expected, rel=1e-6)  # the same real tokens
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
    assert padded == pytest.approx(plain, rel=1e-6), "7 more padded positions changed the load-balancing term"
    assert plain == pytest.approx(plain_expected, rel=1e-5)  # real tokens only, as transformers' attention_mask


def test_30b_a3b_term_at_perfect_balance_is_transformers_coef_times_top_k(megatron_tp1):
    """A router of InternVL3.5-30B-A3B's shape (128 experts, top-8; 48 MoE layers) at
    perfect balance: transformers' term x coef is 0.001 x 8; megatron-core's per-layer loss
    with the default convention sums to that over the 48 layers, and to 6x that with
    ``megatron``."""
    from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker, get_default_pg_collection,
                                                         get_moe_layer_wise_logging_tracker)
    from megatron.core.transformer.moe.router import TopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from megatron_mpo.models.internvl import language_transformer_config
    from megatron_mpo.models.moe_balance import num_moe_layers
    from megatron_mpo.models.presets import get_preset

    config = get_preset("InternVL3_5-30B-A3B")
    lang = config.language
    E, k, layers = lang.num_experts, lang.num_experts_per_tok, num_moe_layers(lang)
    assert (E, k, layers, lang.router_aux_loss_coef) == (128, 8, 48, 0.001)
    tokens = 64  # token t prefers experts 8t .. 8t+7 (mod 128): every expert gets 4 of the 512 routes
    logits = torch.zeros(tokens, E)
    for t in range(tokens):
        logits[t, [(k * t + j) % E for j in range(k)]] = 0.5
    theirs = lang.router_aux_loss_coef * float(load_balancing_loss_func((logits,) * layers, E, k))
    assert theirs == pytest.approx(0.001 * 8, rel=1e-6)
    added = {}
    for convention in ("transformers", "megatron"):
        tc = language_transformer_config(config, aux_loss_convention=convention)
        router = TopKRouter(tc, pg_collection=get_default_pg_collection()).train()
        router.set_layer_number(1)
        with torch.no_grad():
            router.weight.zero_()
            router.weight[:, :E] = torch.eye(E)  # logits = the first E hidden features
        hidden = torch.zeros(tokens, 1, lang.hidden_size)
        hidden[:, 0, :E] = logits
        clear_aux_losses_tracker()
        router(hidden)
        per_layer = float(get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].sum())
        clear_aux_losses_tracker()
        added[convention] = tc.moe_aux_loss_coeff * per_layer * layers
        print(f"30B-A3B at balance, {convention}: per-layer loss {per_layer:.6f}, coefficient "
              f"{tc.moe_aux_loss_coeff:.6g}, term over {layers} layers {added[convention]:.6g}")
        assert per_layer == pytest.approx(1.0, rel=1e-6)
    assert added["transformers"] == pytest.approx(theirs, rel=1e-6)
    assert added["megatron"] == pytest.approx(6 * theirs, rel=1e-6)


def test_run_config_picks_the_convention_and_refuses_an_unknown_one(megatron_tp1):
    """tiny-moe (3 MoE layers, top-2, coef 0.001): what the trainer's chunks give megatron-core."""
    from megatron_mpo import parallel
    from megatron_mpo.config import from_dict
    from megatron_mpo.training import model_setup

    def run_config(**mpo):
        return from_dict({"model": {"preset": "tiny-moe"}, "data": {"shards": "unused", "ref_logps": "unused"},
                          "train": {"steps": 1, "global_batch": 1}, "mpo": mpo}).validate()

    def coefficient(**mpo):
        cfg = run_config(**mpo)
        (chunk,) = model_setup.build_model_chunks(cfg, model_setup.model_config(cfg), parallel.current_layout())
        return chunk.config.moe_aux_loss_coeff

    assert coefficient() == pytest.approx(0.001 * 2 / 3, rel=1e-12)
    assert coefficient(router_aux_loss_convention="megatron") == pytest.approx(0.001, rel=1e-12)
    assert coefficient(router_aux_loss_coef=0.03) == pytest.approx(0.02, rel=1e-12)
    with pytest.raises(UserError, match="mpo.router_aux_loss_convention") as exc:
        run_config(router_aux_loss_convention="hf")
    assert "\n" not in str(exc.value) and "transformers" in str(exc.value)

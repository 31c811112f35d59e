"""Original remote-code InternVL layout (InternVLChatModel) <-> transformers-native layout.

Expectations are built here, independently of megatron_mpo.conversion.original:

* synthetic original state dicts are written from the documented tensor names, with every
  tensor random (so any swapped, transposed or mis-sliced tensor shows), and InternLM2's
  ``wqkv`` packed by hand from separately generated q/k/v with the documented rule
  (view ``[KV, G + 2, D, hidden]``: per KV group its G query heads, then key, then value);
* the native side is checked against transformers itself: the converted tensors must load
  with ``strict=True`` into an ``InternVLForConditionalGeneration`` built from the
  converted config, and a real tiny transformers model must survive native -> original ->
  native unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_mpo.conversion import original as orig
from megatron_mpo.conversion.hf_config import (
    detect_llm_family,
    internvl_config_from_hf,
    native_config_from_original,
    original_config_from_native,
)
from megatron_mpo.errors import UserError

V_HIDDEN, V_HEADS, V_FFN, V_LAYERS, PATCH, IMAGE = 16, 4, 24, 2, 14, 56  # grid 4 -> 17 positions
HIDDEN, HEADS, KV, FFN, LAYERS, VOCAB = 32, 4, 2, 40, 2, 50
D = HIDDEN // HEADS
G = HEADS // KV

ARCH = {"internlm2": "InternLM2ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
        "phi3": "Phi3ForCausalLM", "qwen3": "Qwen3ForCausalLM", "internlm3": "InternLM3ForCausalLM"}
# Qwen3 (InternVL3.5) and InternLM3 (InternVL3-9B) state head_dim; here it differs from HIDDEN // HEADS.
EXPLICIT_HEAD_DIM = {"qwen3": 12, "internlm3": 16}


def head_dim(family: str) -> int:
    return EXPLICIT_HEAD_DIM.get(family, D)


# ---- synthetic original checkpoints ----------------------------------------------------


def original_config(family: str, vit6b: bool = False, tie: bool = False) -> dict:
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": V_HIDDEN, "num_attention_heads": V_HEADS, "num_hidden_layers": V_LAYERS,
        "intermediate_size": V_FFN, "image_size": IMAGE, "patch_size": PATCH, "num_channels": 3,
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "initializer_factor": 0.1,
        "norm_type": "rms_norm" if vit6b else "layer_norm",
        "qkv_bias": not vit6b, "qk_normalization": vit6b,
    }
    llm = {
        "architectures": [ARCH[family]], "model_type": family, "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "num_hidden_layers": LAYERS, "intermediate_size": FFN, "hidden_act": "silu",
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "tie_word_embeddings": tie, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }
    if family == "internlm2":
        llm.update(bias=False, rope_scaling={"type": "dynamic", "factor": 2.0}, attn_implementation="eager",
                   auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config"})
    if family in EXPLICIT_HEAD_DIM:
        llm["head_dim"] = EXPLICIT_HEAD_DIM[family]
    if family == "internlm3":
        llm.update(qkv_bias=False, bias=False, rope_scaling={"rope_type": "dynamic", "factor": 6.0})
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "vision_config": vision, "llm_config": llm, "downsample_ratio": 0.5, "ps_version": "v2",
        "select_layer": -1, "force_image_size": IMAGE, "template": "internlm2-chat",
        "img_context_token_id": 45,
    }


def original_state_dict(family: str, vit6b: bool = False, tie: bool = False, dtype=torch.float32, seed=0):
    """(state dict, parts): ``parts`` holds the separately generated q/k/v the packed
    tensors were built from."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    sd, parts = {}, {}
    C = V_HIDDEN
    sd["vision_model.embeddings.class_embedding"] = r(1, 1, C)
    sd["vision_model.embeddings.position_embedding"] = r(1, 1 + (IMAGE // PATCH) ** 2, C)
    sd["vision_model.embeddings.patch_embedding.weight"] = r(C, 3, PATCH, PATCH)
    sd["vision_model.embeddings.patch_embedding.bias"] = r(C)
    for i in range(V_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        q, k, v = r(C, C), r(C, C), r(C, C)
        parts[("vision", i, "weight")] = (q, k, v)
        sd[p + "attn.qkv.weight"] = torch.cat([q, k, v])  # documented: rows Q, then K, then V
        if not vit6b:
            qb, kb, vb = r(C), r(C), r(C)
            parts[("vision", i, "bias")] = (qb, kb, vb)
            sd[p + "attn.qkv.bias"] = torch.cat([qb, kb, vb])
        else:
            sd[p + "attn.q_norm.weight"] = r(C)
            sd[p + "attn.k_norm.weight"] = r(C)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(C, C), r(C)
        sd[p + "ls1"], sd[p + "ls2"] = r(C), r(C)
        for n in ("norm1", "norm2"):
            sd[p + f"{n}.weight"] = r(C)
            if not vit6b:
                sd[p + f"{n}.bias"] = r(C)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(V_FFN, C), r(V_FFN)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(C, V_FFN), r(C)
    sd["mlp1.0.weight"], sd["mlp1.0.bias"] = r(4 * C), r(4 * C)
    sd["mlp1.1.weight"], sd["mlp1.1.bias"] = r(HIDDEN, 4 * C), r(HIDDEN)
    sd["mlp1.3.weight"], sd["mlp1.3.bias"] = r(HIDDEN, HIDDEN), r(HIDDEN)

    L = "language_model.model."
    if family == "internlm2":
        sd[L + "tok_embeddings.weight"] = r(VOCAB, HIDDEN)
        for i in range(LAYERS):
            p = f"{L}layers.{i}."
            q, k, v = r(HEADS * D, HIDDEN), r(KV * D, HIDDEN), r(KV * D, HIDDEN)
            parts[("llm", i)] = (q, k, v)
            rows = []
            for g in range(KV):  # per KV group: its G query heads, then its key, then its value
                for j in range(G):
                    head = g * G + j
                    rows.append(q[head * D:(head + 1) * D])
                rows.append(k[g * D:(g + 1) * D])
                rows.append(v[g * D:(g + 1) * D])
            sd[p + "attention.wqkv.weight"] = torch.cat(rows)
            sd[p + "attention.wo.weight"] = r(HIDDEN, HIDDEN)
            sd[p + "feed_forward.w1.weight"] = r(FFN, HIDDEN)
            sd[p + "feed_forward.w3.weight"] = r(FFN, HIDDEN)
            sd[p + "feed_forward.w2.weight"] = r(HIDDEN, FFN)
            sd[p + "attention_norm.weight"] = r(HIDDEN)
            sd[p + "ffn_norm.weight"] = r(HIDDEN)
        sd[L + "norm.weight"] = r(HIDDEN)
        if not tie:
            sd["language_model.output.weight"] = r(VOCAB, HIDDEN)
    else:
        sd[L + "embed_tokens.weight"] = r(VOCAB, HIDDEN)
        hd = head_dim(family)
        for i in range(LAYERS):
            p = f"{L}layers.{i}."
            if family == "qwen3":  # per-head q/k RMSNorm
                sd[p + "self_attn.q_norm.weight"], sd[p + "self_attn.k_norm.weight"] = r(hd), r(hd)
            if family == "phi3":
                sd[p + "self_attn.qkv_proj.weight"] = r((HEADS + 2 * KV) * hd, HIDDEN)
                sd[p + "mlp.gate_up_proj.weight"] = r(2 * FFN, HIDDEN)
            else:
                for x, rows in (("q", HEADS * hd), ("k", KV * hd), ("v", KV * hd)):
                    sd[p + f"self_attn.{x}_proj.weight"] = r(rows, HIDDEN)
                    if family == "qwen2":
                        sd[p + f"self_attn.{x}_proj.bias"] = r(rows)
                sd[p + "mlp.gate_proj.weight"] = r(FFN, HIDDEN)
                sd[p + "mlp.up_proj.weight"] = r(FFN, HIDDEN)
            sd[p + "self_attn.o_proj.weight"] = r(HIDDEN, HEADS * hd)
            sd[p + "mlp.down_proj.weight"] = r(HIDDEN, FFN)
            sd[p + "input_layernorm.weight"] = r(HIDDEN)
            sd[p + "post_attention_layernorm.weight"] = r(HIDDEN)
        sd[L + "norm.weight"] = r(HIDDEN)
        if not tie:
            sd["language_model.lm_head.weight"] = r(VOCAB, HIDDEN)
    return sd, parts


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def hf_model(native_config: dict):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    return InternVLForConditionalGeneration(InternVLConfig(**copy.deepcopy(native_config)))


CASES = [
    ("internlm2", False, False),
    ("internlm2", True, False),
    ("qwen2", False, False),
    ("qwen2", False, True),
    ("llama", True, True),
    ("phi3", False, False),
    ("qwen3", True, False),  # InternVL3.5-38B style: InternViT-6B + Qwen3
    ("internlm3", False, False),  # InternVL3-9B
]


# ---- original -> native -> original ----------------------------------------------------


@pytest.mark.parametrize("family,vit6b,tie", CASES)
def test_round_trip_is_bit_exact(family, vit6b, tie):
    sd, _ = original_state_dict(family, vit6b, tie, dtype=torch.bfloat16 if family == "qwen2" else torch.float32)
    cfg = original_config(family, vit6b, tie)
    native_sd, native_cfg = orig.original_to_native(sd, cfg)
    back, back_cfg = orig.native_to_original(native_sd, native_cfg, family)
    assert_same(back, sd)
    assert detect_llm_family(back_cfg) == family
    # checkpoint names (what save_pretrained writes; tied lm_head left out) work too
    ckpt = {}
    for key, value in native_sd.items():
        if key == "lm_head.weight":
            if not tie:
                ckpt["language_model.lm_head.weight"] = value
        elif key.startswith("model.language_model."):
            ckpt["language_model.model." + key[len("model.language_model."):]] = value
        else:
            ckpt[key[len("model."):]] = value
    back2, _ = orig.native_to_original(ckpt, native_cfg, family)
    assert_same(back2, sd)


@pytest.mark.parametrize("family,vit6b,tie", CASES)
def test_native_tensors_load_into_transformers(family, vit6b, tie):
    """The converted names/shapes are exactly what transformers builds from the converted config."""
    sd, _ = original_state_dict(family, vit6b, tie)
    native_sd, native_cfg = orig.original_to_native(sd, original_config(family, vit6b, tie))
    model = hf_model(native_cfg)
    expected = model.state_dict()
    assert sorted(native_sd) == sorted(expected)
    for key, value in expected.items():
        assert native_sd[key].shape == value.shape, key
    model.load_state_dict(native_sd, strict=True)
    assert model.config.text_config.model_type == {"internlm2": "llama"}.get(family, family)
    if tie:
        assert torch.equal(model.lm_head.weight, native_sd["model.language_model.embed_tokens.weight"])


@pytest.mark.parametrize("vit6b", [False, True])
def test_native_tensors_are_the_generated_ones(vit6b):
    sd, parts = original_state_dict("internlm2", vit6b)
    native_sd, _ = orig.original_to_native(sd, original_config("internlm2", vit6b))
    for i in range(LAYERS):
        n = f"model.language_model.layers.{i}.self_attn."
        q, k, v = parts[("llm", i)]
        assert torch.equal(native_sd[n + "q_proj.weight"], q)
        assert torch.equal(native_sd[n + "k_proj.weight"], k)
        assert torch.equal(native_sd[n + "v_proj.weight"], v)
        o = f"language_model.model.layers.{i}."
        m = f"model.language_model.layers.{i}."
        for a, b in (("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
                     ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj"),
                     ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            assert torch.equal(native_sd[m + b + ".weight"], sd[o + a + ".weight"]), a
    assert torch.equal(native_sd["lm_head.weight"], sd["language_model.output.weight"])
    assert torch.equal(native_sd["model.language_model.embed_tokens.weight"],
                       sd["language_model.model.tok_embeddings.weight"])
    for i in range(V_LAYERS):
        n = f"model.vision_tower.encoder.layer.{i}."
        o = f"vision_model.encoder.layers.{i}."
        for p in ("weight",) if vit6b else ("weight", "bias"):
            for x, t in zip("qkv", parts[("vision", i, p)]):
                assert torch.equal(native_sd[n + f"attention.{x}_proj.{p}"], t)
        assert torch.equal(native_sd[n + "lambda_1"], sd[o + "ls1"])
        assert torch.equal(native_sd[n + "lambda_2"], sd[o + "ls2"])
        assert torch.equal(native_sd[n + "layernorm_before.weight"], sd[o + "norm1.weight"])
        assert torch.equal(native_sd[n + "layernorm_after.weight"], sd[o + "norm2.weight"])
        assert torch.equal(native_sd[n + "attention.projection_layer.weight"], sd[o + "attn.proj.weight"])
        if vit6b:
            assert torch.equal(native_sd[n + "attention.q_norm.weight"], sd[o + "attn.q_norm.weight"])
            assert torch.equal(native_sd[n + "attention.k_norm.weight"], sd[o + "attn.k_norm.weight"])
    v = "model.vision_tower.embeddings."
    assert torch.equal(native_sd[v + "cls_token"], sd["vision_model.embeddings.class_embedding"])
    assert torch.equal(native_sd[v + "position_embeddings"], sd["vision_model.embeddings.position_embedding"])
    assert torch.equal(native_sd[v + "patch_embeddings.projection.weight"],
                       sd["vision_model.embeddings.patch_embedding.weight"])
    for a, b in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        assert torch.equal(native_sd[f"model.multi_modal_projector.{b}.weight"], sd[f"mlp1.{a}.weight"])
        assert torch.equal(native_sd[f"model.multi_modal_projector.{b}.bias"], sd[f"mlp1.{a}.bias"])


def test_internlm2_attention_matches_packed_reference():
    """Reference InternLM2 split of the fused projection (its modeling code's rearrange
    ``b q (h gs d) -> b q h gs d``) against the native q/k/v projections."""
    sd, _ = original_state_dict("internlm2")
    native_sd, _ = orig.original_to_native(sd, original_config("internlm2"))
    x = torch.randn(3, HIDDEN)
    fused = x @ sd["language_model.model.layers.1.attention.wqkv.weight"].T  # [3, (H + 2KV) D]
    fused = fused.reshape(3, KV, G + 2, D)
    q_ref = fused[:, :, :G].reshape(3, HEADS, D)  # query head h*G + j uses kv head h
    n = "model.language_model.layers.1.self_attn."
    q = (x @ native_sd[n + "q_proj.weight"].T).reshape(3, HEADS, D)
    k = (x @ native_sd[n + "k_proj.weight"].T).reshape(3, KV, D)
    v = (x @ native_sd[n + "v_proj.weight"].T).reshape(3, KV, D)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, fused[:, :, -2])
    torch.testing.assert_close(v, fused[:, :, -1])


# ---- through megatron -----------------------------------------------------------------


@pytest.mark.parametrize("family,vit6b,tie", CASES)
@pytest.mark.parametrize("config_from", ["native", "original"])
def test_original_native_megatron_round_trip(family, vit6b, tie, config_from):
    """original -> native -> megatron -> native -> original, with the megatron config read
    from either config.json."""
    native = pytest.importorskip("megatron_mpo.conversion.native")
    if not hasattr(native, "hf_to_megatron"):
        pytest.skip("native.hf_to_megatron not available")

    sd, _ = original_state_dict(family, vit6b, tie)
    cfg = original_config(family, vit6b, tie)
    native_sd, native_cfg = orig.original_to_native(sd, cfg)
    config = internvl_config_from_hf(native_cfg if config_from == "native" else cfg)
    mcore = native.hf_to_megatron(native_sd, config)
    hf = native.megatron_to_hf(mcore, config, layout="module")
    back, _ = orig.native_to_original(hf, native_cfg, family)
    assert_same(back, sd)


# ---- a real transformers model ----------------------------------------------------------


@pytest.mark.parametrize("text_type,family,vit6b,tie", [
    ("qwen2", "qwen2", False, True),
    ("qwen2", "qwen2", True, False),
    ("llama", "internlm2", True, False),
    ("llama", "llama", False, True),
    ("qwen3", "qwen3", True, False),
    ("internlm3", "internlm3", False, False),
])
def test_real_native_model_round_trip(text_type, family, vit6b, tie):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = dict(hidden_size=V_HIDDEN, num_hidden_layers=V_LAYERS, num_attention_heads=V_HEADS,
                  intermediate_size=V_FFN, image_size=IMAGE, patch_size=PATCH,
                  norm_type="rms_norm" if vit6b else "layer_norm", use_qk_norm=vit6b, attention_bias=not vit6b)
    text = dict(model_type=text_type, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, intermediate_size=FFN,
                max_position_embeddings=128, head_dim=head_dim(family))
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=7, image_seq_length=4,
                            tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    native_sd = model.state_dict()
    o_sd, o_cfg = orig.native_to_original(native_sd, config.to_dict(), family)
    assert detect_llm_family(o_cfg) == family
    assert o_cfg["force_image_size"] == IMAGE and o_cfg["vision_config"]["image_size"] == IMAGE
    head = "language_model.output.weight" if family == "internlm2" else "language_model.lm_head.weight"
    assert (head in o_sd) == (not tie)
    again, again_cfg = orig.original_to_native(o_sd, o_cfg)
    assert_same(again, native_sd)
    rebuilt = hf_model(again_cfg)
    rebuilt.load_state_dict(again, strict=True)
    assert again_cfg["image_token_id"] == 7 and again_cfg["image_seq_length"] == 4
    assert again_cfg["tie_word_embeddings"] == tie


# ---- configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("family,vit6b,tie", CASES)
def test_config_round_trip(family, vit6b, tie):
    cfg = original_config(family, vit6b, tie)
    native_cfg = native_config_from_original(cfg)
    back = original_config_from_native(native_cfg, family)
    assert back["architectures"] == ["InternVLChatModel"]
    assert back["llm_config"]["architectures"] == [ARCH[family]]
    for key in ("downsample_ratio", "ps_version", "select_layer", "force_image_size", "img_context_token_id"):
        assert back[key] == cfg[key], key
    for key, value in cfg["vision_config"].items():
        assert back["vision_config"][key] == value, key
    def rope(scaling):  # "type" and "rope_type" name the same thing
        scaling = dict(scaling or {})
        kind = scaling.pop("rope_type", scaling.pop("type", None))
        return {**scaling, "type": kind}

    for key, value in cfg["llm_config"].items():
        if key == "rope_scaling":
            assert rope(back["llm_config"][key]) == rope(value)
        elif key not in ("auto_map",):
            assert back["llm_config"][key] == value, key
    assert native_cfg["image_seq_length"] == (IMAGE // PATCH) ** 2 // 4


def test_config_agrees_with_model_config():
    """The project's own config reader sees the same architecture through both layouts."""

    for family, vit6b, tie in CASES[:5]:
        cfg = original_config(family, vit6b, tie)
        a = internvl_config_from_hf(cfg)
        b = internvl_config_from_hf(native_config_from_original(cfg))
        assert a.vision == b.vision or {**vars(a.vision), "pos_embed_image_size": None} == vars(b.vision)
        la, lb = vars(a.language), vars(b.language)
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                    "rope_theta", "rms_norm_eps", "qkv_bias", "tie_embeddings", "max_position_embeddings",
                    "kv_channels"):
            assert getattr(a.language, key) == getattr(b.language, key), (family, key, la, lb)
        assert a.downsample_ratio == b.downsample_ratio


# ---- errors -----------------------------------------------------------------------------


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_unexpected_and_misshaped_tensors():
    cfg = original_config("internlm2")
    sd, _ = original_state_dict("internlm2")
    missing = dict(sd)
    del missing["language_model.model.layers.1.feed_forward.w3.weight"]
    assert "language_model.model.layers.1.feed_forward.w3.weight" in _error(orig.original_to_native, missing, cfg)
    extra = {**sd, "language_model.model.layers.0.attention.extra.weight": torch.zeros(1)}
    assert "attention.extra.weight" in _error(orig.original_to_native, extra, cfg)
    bad = {**sd, "vision_model.encoder.layers.0.attn.qkv.weight": torch.zeros(3 * V_HIDDEN + 1, V_HIDDEN)}
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in _error(orig.original_to_native, bad, cfg)
    # a Qwen2 checkpoint read with an InternLM2 config
    qwen, _ = original_state_dict("qwen2")
    assert "tok_embeddings" in _error(orig.original_to_native, qwen, cfg)
    # derived rotary buffers of old checkpoints are dropped, not errors
    with_buffer = {**sd, "language_model.model.layers.0.attention.rotary_emb.inv_freq": torch.ones(D // 2)}
    native_sd, _ = orig.original_to_native(with_buffer, cfg)
    assert not any("inv_freq" in k for k in native_sd)

    native_sd, native_cfg = orig.original_to_native(sd, cfg)
    lacking = dict(native_sd)
    del lacking["model.vision_tower.encoder.layer.1.attention.k_proj.bias"]
    assert "attention.k_proj.bias" in _error(orig.native_to_original, lacking, native_cfg, "internlm2")
    surplus = {**native_sd, "model.vision_tower.encoder.layer.0.attention.q_norm.weight": torch.ones(V_HIDDEN)}
    assert "q_norm" in _error(orig.native_to_original, surplus, native_cfg, "internlm2")


def test_tied_head_must_equal_embedding():
    cfg = original_config("qwen2", tie=True)
    sd, _ = original_state_dict("qwen2", tie=True)
    same = {**sd, "language_model.lm_head.weight": sd["language_model.model.embed_tokens.weight"].clone()}
    native_sd, _ = orig.original_to_native(same, cfg)
    assert torch.equal(native_sd["lm_head.weight"], sd["language_model.model.embed_tokens.weight"])
    other = {**sd, "language_model.lm_head.weight": torch.zeros(VOCAB, HIDDEN)}
    assert "lm_head" in _error(orig.original_to_native, other, cfg)
    untied = original_config("qwen2", tie=False)
    assert "lm_head" in _error(orig.original_to_native, sd, untied)


def test_bad_configs():
    cfg = original_config("qwen2")
    unknown = copy.deepcopy(cfg)
    unknown["llm_config"].update(architectures=["MixtralForCausalLM"], model_type="mixtral")
    assert "MixtralForCausalLM" in _error(detect_llm_family, unknown)
    v1 = {**cfg, "ps_version": "v1"}
    assert "ps_version" in _error(native_config_from_original, v1)
    native_cfg = native_config_from_original(cfg)
    assert "internlm2" in _error(original_config_from_native, native_cfg, "internlm2")  # qwen2 text
    assert "mistral" in _error(original_config_from_native, native_cfg, "mistral")
    biased = copy.deepcopy(original_config("internlm2"))
    biased["llm_config"]["bias"] = True
    assert "bias" in _error(native_config_from_original, biased)


@pytest.mark.parametrize("family", ["qwen3", "internlm3"])
def test_original_layout_llm_runs_in_its_own_transformers_class(family):
    """InternVL3.5's remote code builds its LLM with transformers' own ``Qwen3ForCausalLM``
    from ``llm_config`` (InternVL3-9B's ``InternLM3ForCausalLM`` has Llama names; transformers
    runs ``internlm3`` configs as Llama). The exported ``language_model.*`` tensors must load
    strictly into that class, built from the exported ``llm_config``, and give the native
    model's text logits."""
    from transformers import AutoConfig, AutoModelForCausalLM, InternVLConfig, InternVLForConditionalGeneration

    text = dict(model_type=family, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, intermediate_size=FFN,
                max_position_embeddings=128, head_dim=head_dim(family))
    vision = dict(hidden_size=V_HIDDEN, num_hidden_layers=V_LAYERS, num_attention_heads=V_HEADS,
                  intermediate_size=V_FFN, image_size=IMAGE, patch_size=PATCH)
    model = InternVLForConditionalGeneration(InternVLConfig(vision_config=vision, text_config=text,
                                                            image_token_id=7, tie_word_embeddings=False)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else 0.1) + ("norm" in name))
    o_sd, o_cfg = orig.native_to_original(model.state_dict(), model.config.to_dict(), family)
    llm_config = dict(o_cfg["llm_config"])
    assert llm_config["architectures"] == [ARCH[family]] and llm_config["head_dim"] == head_dim(family)
    kind = llm_config.pop("model_type")
    for key in ("architectures", "auto_map", "torch_dtype"):
        llm_config.pop(key, None)
    if kind == "internlm3":  # the remote-code names, as InternLM3Config's attribute map reads them
        assert llm_config.pop("qkv_bias") is False and llm_config.pop("bias") is False
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **llm_config)).eval()
    prefix = "language_model."
    llm.load_state_dict({k[len(prefix):]: v for k, v in o_sd.items() if k.startswith(prefix)}, strict=True)
    ids = torch.randint(8, VOCAB, (2, 9), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(llm(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_unsupported_releases_are_refused_with_one_line():
    """GPT-OSS LLMs (InternVL3.5-20B-A4B), InternVL3.5-Flash (ViR) and Phi-3 LongRoPE: one
    line naming what is refused, from either layout's config or tensors. (Qwen3-MoE, the
    other InternVL3.5 MoE LLM, is supported: tests/test_moe.py.)"""
    from megatron_mpo.conversion.native import hf_to_megatron

    def refused(fn, *args) -> str:
        with pytest.raises(UserError) as exc:
            fn(*args)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    for arch, model_type, says in (("GptOssForCausalLM", "gpt_oss", "GPT-OSS"),):
        cfg = original_config("qwen3")
        cfg["llm_config"].update(architectures=[arch], model_type=model_type)
        assert says in refused(detect_llm_family, cfg)
        assert says in refused(internvl_config_from_hf, cfg)
        native_cfg = native_config_from_original(original_config("qwen3"))
        native_cfg["text_config"]["model_type"] = model_type
        assert says in refused(internvl_config_from_hf, native_cfg)

    flash_named = {**original_config("qwen3"), "_name_or_path": "OpenGVLab/InternVL3_5-8B-Flash"}
    assert "Flash" in refused(internvl_config_from_hf, flash_named)
    sd, _ = original_state_dict("qwen3", vit6b=True)
    with_router = {**sd, "mlp2.0.weight": torch.zeros(4)}
    assert "Flash" in refused(orig.original_to_native, with_router, original_config("qwen3", vit6b=True))
    native_sd, native_cfg = orig.original_to_native(sd, original_config("qwen3", vit6b=True))
    config = internvl_config_from_hf(native_cfg)
    assert "Flash" in refused(hf_to_megatron, {**native_sd, "model.mlp2.0.weight": torch.zeros(4)}, config)

    sliding = original_config("qwen3")
    sliding["llm_config"]["use_sliding_window"] = True
    assert "sliding" in refused(internvl_config_from_hf, sliding)

"""InternVL in megatron-core against a tiny random transformers InternVL.

Two reference models, both built from scratch on CPU (no download):

* ``qwen2`` -- InternViT-300M style vision (LayerNorm, qkv bias), Qwen2 LLM (qkv bias),
  untied embeddings, 4 LLM layers;
* ``llama`` -- InternViT-6B style vision (RMSNorm, cross-head qk-norm, no qkv bias, 3 heads
  zero-padded to 4 so TP=2 splits them), Llama LLM (no bias), tied embeddings, 3 LLM
  layers (so PP=2 uses an uneven split).

The megatron model is loaded from ``hf_to_megatron`` and must reproduce the logits, the
per-token losses and (for an image pair) every gradient, at TP=1/PP=1 in this process and
at TP=2/PP=1, TP=1/PP=2, TP=2/PP=2 and TP=1/PP=2 interleaved (2 virtual stages, qwen2)
in one 4-process gloo launch (tests/_model_worker.py), which also checks drop path at TP=2.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from megatron_mpo.errors import UserError
from tests import _model_worker as worker
from tests.distributed import REPO, launch

IMG_ID = 290
TEXT_TOKENS = 280  # random text ids stay below the image token id


# ---- reference models -----------------------------------------------------------------


# InternViT-6B style: RMSNorm, cross-head qk-norm, no qkv bias, 3 heads (zero-padded to 4 for TP 2).
VIT_6B = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
              attention_bias=False, norm_type="rms_norm", use_qk_norm=True)
KINDS = ("qwen2", "llama", "qwen3", "internlm3")
PADDED_VISION = ("llama", "qwen3")


def _hf_model(kind: str, image_size: int = 56):
    from transformers import InternVLConfig as HFInternVLConfig
    from transformers import InternVLForConditionalGeneration

    if kind == "qwen2":
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      attention_bias=True, norm_type="layer_norm", use_qk_norm=False)
        text = dict(model_type="qwen2", vocab_size=320, hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, rope_theta=10000.0)
        tie = False
    elif kind == "llama":
        vision = dict(VIT_6B)
        text = dict(model_type="llama", vocab_size=300, hidden_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, rope_theta=500000.0)
        tie = True
    elif kind == "qwen3":  # InternVL3.5-38B style: InternViT-6B (cross-head qk-norm) + Qwen3 (per-head qk-norm)
        vision = dict(VIT_6B)
        text = dict(model_type="qwen3", vocab_size=300, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=96,
                    rope_theta=1000000.0, attention_bias=False)
        tie = False
    else:  # internlm3 (InternVL3-9B): Llama layers, explicit head_dim, dynamic NTK RoPE
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                      attention_bias=True, norm_type="layer_norm", use_qk_norm=False)
        text = dict(model_type="internlm3", vocab_size=300, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=20, intermediate_size=96,
                    rope_parameters={"rope_type": "dynamic", "factor": 6.0, "rope_theta": 50000000.0})
        tie = False
    vision.update(image_size=image_size, patch_size=14, layer_scale_init_value=0.5)
    text.update(max_position_embeddings=256, rms_norm_eps=1e-6)
    config = HFInternVLConfig(vision_config=vision, text_config=text, image_token_id=IMG_ID,
                              image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(1 + KINDS.index(kind))
    with torch.no_grad():  # random everything: norms, layer scales, biases, position embeddings
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(noise * (0.3 if p.dim() == 1 else 0.08) + (1.0 if is_norm else 0.0))
    return model, config


def _our_config(hf_config, kind: str):
    from megatron_mpo.conversion.hf_config import internvl_config_from_hf

    config = internvl_config_from_hf(hf_config)
    if kind in PADDED_VISION:
        config.vision.num_padded_heads = 4
    return config.validate()


# ---- micro-batch cases ----------------------------------------------------------------


class _Builder:
    """Rows of text and image segments -> one micro-batch in the batch.py contract."""

    def __init__(self, tiles: int, tpt: int, vocab: int, gen: torch.Generator, image_size: int = 56):
        self.tpt, self.vocab, self.gen = tpt, vocab, gen
        self.pixel_values = torch.randn(tiles, 3, image_size, image_size, generator=gen)

    def row(self, segments):
        ids, feat, tiles = [], [], []
        for seg in segments:
            if isinstance(seg, int):
                ids += torch.randint(0, TEXT_TOKENS, (seg,), generator=self.gen).tolist()
                feat += [-1] * seg
            else:
                for t in seg:
                    ids += [IMG_ID] * self.tpt
                    feat += list(range(t * self.tpt, (t + 1) * self.tpt))
                    tiles.append(t)
        return ids, feat, tiles

    def case(self, name, rows, hf, position_ids=None, attention_mask=None, ref_logits=None):
        ids = torch.tensor([r[0] for r in rows])
        R, S = ids.shape
        if ref_logits is None:
            with torch.no_grad():
                ref_logits = torch.stack([
                    hf(input_ids=ids[i:i + 1], pixel_values=self.pixel_values[r[2]] if r[2] else None).logits[0]
                    for i, r in enumerate(rows)
                ])
        return dict(
            name=name,
            input_ids=ids,
            position_ids=torch.arange(S).expand(R, S).clone() if position_ids is None else position_ids,
            attention_mask=attention_mask,
            labels=torch.randint(0, self.vocab, (R, S), generator=self.gen),
            pixel_values=self.pixel_values,
            image_token_index=torch.tensor([r[1] for r in rows]),
            ref_logits=ref_logits,
        )


def _cases(hf, vocab: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    b = _Builder(1, 4, vocab, gen)
    cases.append(b.case("one_tile", [b.row([3, [0], 5])], hf))
    b = _Builder(3, 4, vocab, gen)
    cases.append(b.case("several_tiles", [b.row([2, [0, 1, 2], 4])], hf))
    b = _Builder(3, 4, vocab, gen)
    cases.append(b.case("two_images", [b.row([2, [0, 1], 3, [2], 3])], hf))
    b = _Builder(0, 4, vocab, gen)
    cases.append(b.case("text_only", [b.row([10]), b.row([10])], hf))
    # A preference pair: both rows read the same two tiles (stored once).
    b = _Builder(2, 4, vocab, gen)
    prompt = b.row([2, [0, 1], 2])
    rows = [tuple(x + y for x, y in zip(prompt, b.row([5]))) for _ in range(2)]
    cases.append(b.case("pair", rows, hf))
    # Packed: prompt + chosen + rejected in one row; rejected restarts its positions after
    # the prompt and cannot see chosen. Must equal the two unpacked sequences.
    b = _Builder(1, 4, vocab, gen)
    prompt, chosen, rejected = b.row([2, [0], 2]), b.row([4]), b.row([3])
    p, c, r = len(prompt[0]), len(chosen[0]), len(rejected[0])
    row = tuple(x + y + z for x, y, z in zip(prompt, chosen, rejected))
    with torch.no_grad():
        a = hf(input_ids=torch.tensor([prompt[0] + chosen[0]]), pixel_values=b.pixel_values).logits[0]
        z = hf(input_ids=torch.tensor([prompt[0] + rejected[0]]), pixel_values=b.pixel_values).logits[0]
    S = p + c + r
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)
    mask[p + c:, p:p + c] = True
    positions = torch.tensor(list(range(p + c)) + list(range(p, p + r)))
    cases.append(b.case("packed", [row], hf, position_ids=positions[None], attention_mask=mask[None, None],
                        ref_logits=torch.cat([a, z[p:]])[None]))
    cases.append(_packed_pairs_case(hf, vocab, gen))
    return cases


def _packed_pairs(gen: torch.Generator, tpt: int = 4) -> list:
    """Three pairs (two with images) of different lengths for packed rows."""
    from megatron_mpo.data.samples import TokenizedPair

    def text(n):
        return torch.randint(0, TEXT_TOKENS, (n,), generator=gen).tolist()

    def image(tiles):
        return torch.randn(tiles, 3, 56, 56, generator=gen)

    return [
        TokenizedPair("s/a", text(3) + [IMG_ID] * (2 * tpt) + text(4), text(6), text(4), image(2)),
        TokenizedPair("s/b", text(5), text(3), text(7), torch.zeros(0, 3, 56, 56)),
        TokenizedPair("s/c", text(2) + [IMG_ID] * tpt + text(2), text(5), text(2), image(1)),
    ]


def _packed_pairs_case(hf, vocab: int, gen: torch.Generator) -> dict:
    """All three pairs in ONE row, as the data pipeline collates them (segments layout,
    positions restarting per pair). Each position's reference logits are those of the
    same position of its own unpacked sequence (prompt + chosen, or prompt + rejected, run
    alone through transformers); ``ref_rows`` says which, for the reference gradients."""
    from megatron_mpo.segments import BRANCHES, REJECTED
    from megatron_mpo.data.collate import collate_pairs

    pairs = _packed_pairs(gen)
    batch = collate_pairs(pairs, 0, IMG_ID, 4, layout="packed", row_length=10_000, max_pairs_per_row=None)
    assert batch.input_ids.shape[0] == 1, "the case must put every pair in one row"
    segments, positions = batch.segments[0], batch.position_ids[0]
    sequences = {}
    for i, pair in enumerate(pairs):
        for branch, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            sequences[(i, branch)] = (pair.prompt + response, pair.pixel_values if pair.num_tiles else None)
    pair_of_segment = {}
    for t in range(segments.numel()):  # pair index of each row segment, from the chosen slots
        slot = int(batch.response_index[0, t])
        if 0 <= slot < len(pairs):
            pair_of_segment[int(segments[t]) // BRANCHES] = slot
    ref_rows = [(pair_of_segment[int(seg) // BRANCHES],
                 "rejected" if int(seg) % BRANCHES == REJECTED else "chosen", int(pos))
                for seg, pos in zip(segments, positions)]
    with torch.no_grad():
        outputs = {k: hf(input_ids=torch.tensor([ids]), pixel_values=px).logits[0] for k, (ids, px) in sequences.items()}
    ref_logits = torch.stack([outputs[(i, branch)][pos] for i, branch, pos in ref_rows])[None]
    S = batch.input_ids.shape[1]
    return dict(
        name="packed_pairs", input_ids=batch.input_ids, position_ids=batch.position_ids,
        attention_mask=batch.segments, labels=torch.randint(0, vocab, (1, S), generator=gen),
        pixel_values=batch.pixel_values, image_token_index=batch.image_token_index, ref_logits=ref_logits,
        ref_rows=ref_rows, sequences=sequences,
    )


def _packed_reference_grads(hf, case: dict, config) -> dict:
    """d sum(per-token loss) / d params of the packed case, from transformers run on each
    pair's unpacked sequences (every row position scored once, at its own sequence's
    position), mapped to megatron names."""
    from megatron_mpo.conversion.native import hf_to_megatron

    hf.zero_grad(set_to_none=True)
    total = 0.0
    for key, (ids, pixels) in case["sequences"].items():
        where = [(t, pos) for t, (i, branch, pos) in enumerate(case["ref_rows"]) if (i, branch) == key]
        logits = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        picked = logits[torch.tensor([pos for _, pos in where])]
        labels = case["labels"][0, torch.tensor([t for t, _ in where])]
        total = total + torch.nn.functional.cross_entropy(picked, labels, reduction="sum")
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad(set_to_none=True)
    return hf_to_megatron(grads, config)


def _reference_grads(hf, case: dict, config) -> dict:
    """d sum(per-token loss) / d params of the HF model, mapped to megatron names."""
    from megatron_mpo.conversion.native import hf_to_megatron

    hf.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(case["input_ids"].shape[0]):
        tiles = sorted({int(x) // 4 for x in case["image_token_index"][i] if x >= 0})
        pixels = case["pixel_values"][tiles] if tiles else None
        logits = hf(input_ids=case["input_ids"][i:i + 1], pixel_values=pixels).logits[0]
        total = total + torch.nn.functional.cross_entropy(logits, case["labels"][i], reduction="sum")
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    return hf_to_megatron(grads, config)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Both reference models, their converted state dicts, cases and reference gradients,
    also written to disk for the multi-rank worker."""
    from megatron_mpo.conversion.native import hf_to_megatron

    root = tmp_path_factory.mktemp("internvl_ref")
    out = {}
    for seed, kind in enumerate(KINDS):
        hf, hf_config = _hf_model(kind)
        config = _our_config(hf_config, kind)
        cases = _cases(hf, config.language.vocab_size, seed)
        grads = _reference_grads(hf, next(c for c in cases if c["name"] == "pair"), config)
        packed_grads = _packed_reference_grads(hf, next(c for c in cases if c["name"] == "packed_pairs"), config)
        full = hf_to_megatron(hf.state_dict(), config)
        out[kind] = dict(hf=hf, hf_config=hf_config, config=config, cases=cases, grads=grads, full=full,
                         packed_grads=packed_grads)
        d = root / kind
        d.mkdir()
        (d / "config.json").write_text(config.to_json())
        torch.save(full, d / "mcore.pt")
        torch.save(cases, d / "cases.pt")
        torch.save(grads, d / "grads.pt")
        torch.save(packed_grads, d / "packed_grads.pt")
    (root / "kinds.json").write_text(json.dumps(list(out)))
    out["root"] = root
    return out


def _tp1_model(ref: dict):
    from megatron_mpo.models.internvl import build_model

    model = build_model(ref["config"])
    worker.load_full(model, ref["full"])
    return model


# ---- configuration and presets --------------------------------------------------------


def test_presets_and_config_serialisation():
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.models.presets import get_preset, preset_names

    assert {"InternVL2-1B", "InternVL2-8B", "InternVL2-76B", "tiny"} <= set(preset_names())
    for name in preset_names():
        config = get_preset(name)
        assert InternVLConfig.from_json(config.to_json()) == config
    big = get_preset("internvl2-26b")  # case-insensitive
    assert big.tokens_per_tile == 256 and big.projector_input_size == 4 * 3200
    assert big.vision.heads == 32 and big.vision.qk_norm and not big.vision.qkv_bias
    assert get_preset("InternVL2-1B").language.padded_vocab_size % 128 == 0
    tiny = get_preset("tiny")
    assert tiny.tokens_per_tile == 4 and tiny.language.vocab_size > 300
    with pytest.raises(UserError, match="valid presets: InternVL2-1B"):
        get_preset("InternVL9-1B")
    with pytest.raises(UserError, match="unknown model config key"):
        InternVLConfig.from_dict({**tiny.to_dict(), "vision": {"hidden": 3}})


def test_from_hf_config_native_and_original():
    from megatron_mpo.conversion.hf_config import internvl_config_from_hf

    _, hf_config = _hf_model("llama")
    config = internvl_config_from_hf(hf_config)
    assert (config.vision.norm, config.vision.qk_norm, config.vision.qkv_bias) == ("RMSNorm", True, False)
    lang = config.language
    assert (lang.family, lang.qkv_bias, lang.tie_embeddings) == ("llama", False, True)
    assert config.language.rope_theta == 500000.0 and config.img_context_token_id == IMG_ID
    assert internvl_config_from_hf(hf_config.to_dict()) == config
    original = {  # the remote-code InternVLChatConfig of InternVL2-8B, trimmed
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": 448,
        "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "intermediate_size": 4096, "image_size": 448, "patch_size": 14, "qkv_bias": True,
                          "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6},
        "llm_config": {"architectures": ["InternLM2ForCausalLM"], "vocab_size": 92553, "hidden_size": 4096,
                       "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                       "intermediate_size": 14336, "rope_theta": 1000000, "rms_norm_eps": 1e-5,
                       "bias": False, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    }
    config = internvl_config_from_hf(original)
    assert config.language.family == "internlm2" and config.tokens_per_tile == 256
    assert config.language.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}  # read through the native form
    with pytest.raises(UserError, match="not supported"):
        internvl_config_from_hf({**original, "llm_config": {"architectures": ["GPT2LMHeadModel"]}})


# ---- conversion -----------------------------------------------------------------------


def test_hf_megatron_hf_round_trip_is_bit_exact(reference):
    from megatron_mpo.conversion.native import (
        from_te_names, hf_to_megatron, megatron_to_hf, normalize_hf_names, to_te_names,
    )

    for kind in KINDS:
        ref = reference[kind]
        hf_sd, config = ref["hf"].state_dict(), ref["config"]
        mcore = hf_to_megatron(hf_sd, config)
        back = megatron_to_hf(mcore, config, layout="module")
        assert back.keys() == hf_sd.keys()
        for key, value in hf_sd.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
        # Checkpoint names (what save_pretrained writes) convert the same way.
        ckpt = megatron_to_hf(mcore, config)
        assert not any(k.startswith("model.") for k in ckpt)
        assert "language_model.lm_head.weight" in ckpt or config.language.tie_embeddings
        again = hf_to_megatron(ckpt, config)
        assert again.keys() == mcore.keys() and all(torch.equal(again[k], mcore[k]) for k in mcore)
        tied_head = {"lm_head.weight"} if config.language.tie_embeddings else set()
        assert set(normalize_hf_names(ckpt)) | tied_head == set(hf_sd)
        # Transformer Engine names are a pure rename of the fused norms.
        te = to_te_names(mcore)
        assert any(k.endswith("linear_qkv.layer_norm_weight") for k in te)
        assert from_te_names(te) == mcore
        assert megatron_to_hf(te, config, layout="module").keys() == hf_sd.keys()
    llama = reference["llama"]
    mcore = hf_to_megatron(llama["hf"].state_dict(), llama["config"])
    qkv = mcore["vision_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == (3 * 4 * 16, 48) and not qkv[3 * 3 * 16:].any()  # padded head is zero
    with pytest.raises(UserError, match="unmapped"):
        hf_to_megatron({**llama["hf"].state_dict(), "model.extra.weight": torch.zeros(1)}, llama["config"])


# ---- layer spec / FP8 selection -------------------------------------------------------


def test_spec_and_fp8_selection_errors(monkeypatch):
    from megatron_mpo import platform
    from megatron_mpo.models import specs

    platform.setup("cpu")
    specs.check_backend("local")
    with pytest.raises(UserError, match="unknown layer spec 'te'"):
        specs.check_backend("te")
    with pytest.raises(UserError, match="unknown fp8 format"):
        specs.check_backend("transformer_engine", fp8="e5m2x")
    with pytest.raises(UserError, match="fp8 needs the 'transformer_engine' layer spec"):
        specs.check_backend("local", fp8="hybrid")
    monkeypatch.setattr(specs, "te_available", lambda: False)
    with pytest.raises(UserError, match="needs NVIDIA Transformer Engine, which is not installed"):
        specs.check_backend("transformer_engine")
    from megatron_mpo.models.presets import get_preset

    for build in (lambda s: specs.vision_layer_spec(get_preset("tiny").vision, s), specs.language_layer_spec,
                  specs.projector_spec):
        assert build("local") is not None  # local specs need no Transformer Engine
        with pytest.raises(UserError, match="Transformer Engine"):
            build("transformer_engine")
    with pytest.raises(UserError, match="^fp8 needs NVIDIA Transformer Engine"):
        specs.check_backend("transformer_engine", fp8="hybrid")
    # With TE present: a CPU machine, then a pre-Hopper GPU, are refused for FP8.
    monkeypatch.setattr(specs, "te_available", lambda: True)
    with pytest.raises(UserError, match="needs an NVIDIA GPU, but this machine runs on CPU"):
        specs.check_backend("transformer_engine", fp8="hybrid")
    monkeypatch.setattr(platform, "current", lambda: platform.Platform("cuda", "nccl"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(UserError, match=r"fp8 needs a GPU of compute capability >= 8\.9.*this GPU is 8\.0"):
        specs.check_backend("transformer_engine", fp8="e4m3")
    specs.check_backend("transformer_engine")  # TE without FP8 is fine on an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    specs.check_backend("transformer_engine", fp8="hybrid")
    # Every message is one line.
    try:
        specs.check_backend("local", fp8="hybrid")
    except UserError as exc:
        assert "\n" not in str(exc)


def test_build_refuses_bad_parallel_layouts(reference, megatron_tp1):
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.models.internvl import build_model, pipeline_layout

    config = reference["llama"]["config"]
    with pytest.raises(UserError, match="pipeline_layers"):
        pipeline_layout([1, 1], 2, 3)
    assert pipeline_layout([1, 2], 2, 3) == [["embedding", "decoder"], ["decoder", "decoder", "loss"]]
    with pytest.raises(UserError, match="transformer_engine"):
        build_model(config, "transformer_engine")
    bad = InternVLConfig.from_dict({**config.to_dict(), "language": {**config.to_dict()["language"],
                                    "rope_scaling": {"rope_type": "longrope"}}})
    with pytest.raises(UserError, match="Phi-3 LongRoPE .* is not supported"):
        build_model(bad)
    with pytest.raises(UserError, match="sequence_parallel .* needs tensor parallel size >= 2"):
        build_model(config, sequence_parallel=True)
    model = build_model(config, pipeline_layers=[3], language_overrides={"deallocate_pipeline_outputs": True})
    assert model.config.deallocate_pipeline_outputs and model.pre_process and model.post_process


# ---- TP=1 / PP=1 in this process ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tp1_logits_losses_and_grads_match_transformers(reference, megatron_tp1, kind):
    ref = reference[kind]
    model = _tp1_model(ref).eval()
    failures = []
    for case in ref["cases"]:
        failures += worker.check_case(model, case, f"TP1PP1 {kind}")
    model.train()
    pair = next(c for c in ref["cases"] if c["name"] == "pair")
    failures += worker.check_grads(model, pair, ref["grads"], f"TP1PP1 {kind}", None, 1)
    packed = next(c for c in ref["cases"] if c["name"] == "packed_pairs")
    failures += worker.check_grads(model, packed, ref["packed_grads"], f"TP1PP1 {kind} packed_pairs", None, 1)
    assert not failures, "\n".join(failures)


def _slot_log_probs_and_grads(model, batch):
    """Per-response log-prob sums of one collated micro-batch and the gradient of their total."""
    from megatron_mpo.training.forward import model_inputs, slot_log_probs

    model.zero_grad(set_to_none=True)
    token_nll = model(**model_inputs(model, batch))
    sums, _ = slot_log_probs(token_nll, batch.response_index, batch.num_slots)
    sums.sum().backward()
    return sums.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_pairs_match_unpacked_log_probs_and_grads(reference, megatron_tp1):
    """Shared-prompt packing is exact: per-response log-prob sums and every parameter
    gradient equal those of the unpacked rows, with one pair per row and with several
    pairs per row (first-fit into a row length). One batch has a long prompt (its causal
    part runs through the kernel's causal mode), one adds a short text-only pair, one
    packs three pairs into two rows (restarted positions, no cross-pair attention)."""
    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.data.samples import TokenizedPair

    ref = reference["qwen2"]
    model = _tp1_model(ref)
    tpt = ref["config"].tokens_per_tile
    gen = torch.Generator().manual_seed(11)

    def text(n):
        return torch.randint(0, TEXT_TOKENS, (n,), generator=gen).tolist()

    image_pair = TokenizedPair("s/a", text(40) + [IMG_ID] * (2 * tpt) + text(30), text(9), text(6),
                               torch.randn(2, 3, 56, 56, generator=gen))
    text_pair = TokenizedPair("s/b", text(5), text(3), text(8), torch.zeros(0, 3, 56, 56))
    three = _packed_pairs(gen, tpt)
    args = dict(pad_id=0, context_id=IMG_ID, tokens_per_tile=tpt)
    layouts = [([image_pair], {}), ([image_pair, text_pair], {}),
               (three, dict(row_length=60, max_pairs_per_row=None)),
               ([image_pair, text_pair] + three, dict(row_length=200, max_pairs_per_row=None, pad_multiple=8))]
    for pairs, packing in layouts:
        packed_batch = collate_pairs(pairs, layout="packed", **args, **packing)
        unpacked_batch = collate_pairs(pairs, layout="unpacked", **args)
        assert packed_batch.input_ids.numel() < unpacked_batch.input_ids.numel()
        if packing:
            assert packed_batch.input_ids.shape[0] < len(pairs)  # several pairs share a row
        packed, packed_grads = _slot_log_probs_and_grads(model, packed_batch)
        unpacked, unpacked_grads = _slot_log_probs_and_grads(model, unpacked_batch)
        torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-4)
        assert packed_grads.keys() == unpacked_grads.keys() and len(packed_grads) > 20
        for name, grad in packed_grads.items():
            torch.testing.assert_close(grad, unpacked_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_packed_many_and_one_pair_per_row_give_the_same_step(reference, megatron_tp1):
    """One optimizer step's gradient (MPO loss with all three terms, through the trainer's
    forward step and megatron-core's schedule) does not depend on how the step's pairs
    are laid out: 5 micro-batches of one pair in unpacked rows, or 2 micro-batches of 2
    and 3 pairs packed several to a row. Needs the step-level loss normalisation (a
    per-micro-batch mean would weigh the pairs of the smaller micro-batch more), for both
    generation norms."""
    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.data.samples import TokenizedPair
    from megatron_mpo.losses import MPOLoss, MPOLossConfig
    from megatron_mpo.training import schedule
    from megatron_mpo.training.forward import StepContext, make_forward_step

    ref = reference["qwen2"]
    model = _tp1_model(ref)
    gen = torch.Generator().manual_seed(5)
    pairs = _packed_pairs(gen) + [
        TokenizedPair(f"s/x{i}", torch.randint(0, TEXT_TOKENS, (4 + i,), generator=gen).tolist(),
                      torch.randint(0, TEXT_TOKENS, (3 + 4 * i,), generator=gen).tolist(),
                      torch.randint(0, TEXT_TOKENS, (5,), generator=gen).tolist(), torch.zeros(0, 3, 56, 56))
        for i in range(2)
    ]
    for i, pair in enumerate(pairs):  # references a little off the policy: every term has a gradient
        pair.ref_chosen, pair.ref_rejected = -30.0 - 3 * i, -25.0 + 2 * i
    args = dict(pad_id=0, context_id=IMG_ID, tokens_per_tile=4)
    one_per_row = [collate_pairs([p], layout="unpacked", **args) for p in pairs]
    packed = [collate_pairs(pairs[:2], layout="packed", row_length=1000, max_pairs_per_row=None, **args),
              collate_pairs(pairs[2:], layout="packed", row_length=30, max_pairs_per_row=None, **args)]
    assert [b.input_ids.shape[0] for b in packed] == [1, 2]

    def step_grads(micro_batches, norm):
        mpo = MPOLoss(MPOLossConfig(generation_norm=norm))
        context = StepContext()
        context.start(mpo, micro_batches, group=None)
        model.zero_grad(set_to_none=True)
        schedule.run_schedule(schedule.forward_backward_func(), make_forward_step(mpo, step=context), [model],
                              micro_batches, 0, forward_only=False)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    for norm in ("sequence", "token"):
        torch.testing.assert_close(step_grads(packed, norm), step_grads(one_per_row, norm), rtol=1e-4, atol=1e-6)


def test_loss_mask_runs_the_output_layer_on_scored_positions_only(reference, megatron_tp1):
    """With ``loss_mask`` the output layer sees only the marked positions; their losses
    and every gradient equal the full computation's, other positions read 0."""
    ref = reference["qwen2"]
    model = _tp1_model(ref)
    case = next(c for c in ref["cases"] if c["name"] == "pair")
    rows, length = case["labels"].shape
    scored = torch.zeros(rows, length, dtype=torch.bool)
    scored[0, -7:-2] = True
    scored[1, 3:5] = True
    scored[1, -1] = True
    seen = []
    model.language_model.output_layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    args = dict(labels=case["labels"], pixel_values=case["pixel_values"], image_token_index=case["image_token_index"])
    results = []
    for mask in (None, scored):
        model.zero_grad(set_to_none=True)
        loss = model(case["input_ids"], case["position_ids"], loss_mask=mask, **args)
        (loss * scored).sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert seen[0][0] == length and seen[1][:2] == (int(scored.sum()), 1)
    (full, full_grads), (picked, picked_grads) = results
    assert picked.shape == full.shape == (rows, length)
    torch.testing.assert_close(picked[scored], full[scored], rtol=1e-6, atol=1e-6)
    assert (full[~scored] != 0).all() and not picked[~scored].any()
    assert picked_grads.keys() == full_grads.keys() and len(full_grads) > 20
    for name, grad in full_grads.items():
        torch.testing.assert_close(picked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_flop_counter_matches_torch_matmul_count(reference, megatron_tp1):
    """The trainer's model-FLOP count (``mfu``) equals torch's own count of the matmuls
    and convolutions of a forward + backward with the output layer on scored positions.
    torch does not count CPU flash attention, so the attention products (counted by
    formula: causal half for the LLM, full for the vision tower) are left out of both; the
    patch embedding's input gradient (pixels need none) is not computed."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_mpo.training.flops import FlopCounter

    ref = reference["qwen2"]
    cfg = ref["config"]
    model = _tp1_model(ref)
    case = next(c for c in ref["cases"] if c["name"] == "pair")
    rows, length = case["labels"].shape
    tiles = case["pixel_values"].shape[0]
    scored = torch.zeros(rows, length, dtype=torch.bool)
    scored[:, -6:] = True
    with FlopCounterMode(display=False) as counted:
        loss = model(case["input_ids"], case["position_ids"], labels=case["labels"], loss_mask=scored,
                     pixel_values=case["pixel_values"], image_token_index=case["image_token_index"])
        (loss * scored).sum().backward()
    lang, vis = cfg.language, cfg.vision
    llm_scores = 3 * lang.num_layers * rows * 2 * 2 * length * (lang.num_heads * lang.kv_channels) * length / 2
    tokens = vis.grid**2 + 1
    vision_scores = 3 * tiles * vis.num_layers * 2 * 2 * tokens * tokens * vis.num_heads * vis.head_dim
    patch_input_grad = tiles * 2 * 3 * vis.patch_size**2 * vis.hidden_size * vis.grid**2
    ours = FlopCounter(cfg).step_flops(rows * length, length, tiles, scored=int(scored.sum()))
    assert counted.get_total_flops() > 0
    assert ours - llm_scores - vision_scores - patch_input_grad == pytest.approx(counted.get_total_flops(), rel=1e-9)


def _grad_hook_order(model, case: dict) -> list:
    """Parameter names in the order their gradient-accumulator hooks fire in one backward:
    the hooks megatron-core's DDP dispatches overlapped reduce-scatters from."""
    fired, accumulators = [], []  # held, as DDP holds them: a dropped one is made anew
    for name, p in model.named_parameters():
        accumulators.append(p.expand_as(p).grad_fn.next_functions[0][0])
        accumulators[-1].register_hook(lambda *_, n=name: fired.append(n))
    loss = model(case["input_ids"], case["position_ids"], attention_mask=case["attention_mask"],
                 labels=case["labels"], pixel_values=case["pixel_values"], image_token_index=case["image_token_index"])
    loss.sum().backward()
    return fired


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_text_only_batch_runs_the_vision_modules_on_a_blank_tile(reference, megatron_tp1, kind):
    """Every parameter's gradient hook fires in the same order for a text-only micro-batch as
    for any image one (overlapped gradient reduce relies on it across data-parallel ranks),
    whatever its tiles and rows; the text-only numbers are those without the vision pass, bit
    for bit, and its vision gradients exactly 0."""
    ref = reference[kind]
    model = _tp1_model(ref)
    cases = {c["name"]: c for c in ref["cases"]}
    text = cases["text_only"]
    assert text["pixel_values"].shape[0] == 0
    orders = {name: _grad_hook_order(model, cases[name])
              for name in ("text_only", "one_tile", "several_tiles", "two_images", "pair", "packed_pairs")}
    assert len(orders["one_tile"]) == len(list(model.parameters()))
    for name, order in orders.items():
        assert order == orders["one_tile"], name
    model.zero_grad()
    seen = []
    model.vision_model.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    inputs = dict(labels=text["labels"], pixel_values=text["pixel_values"], image_token_index=text["image_token_index"])
    loss = model(text["input_ids"], text["position_ids"], **inputs)
    (tile, features), = seen  # one vision pass, on one blank tile at the model's size, finite
    assert tile.shape == (1, 3, 56, 56) and not tile.any() and features.isfinite().all()
    loss.sum().backward()
    with torch.no_grad():  # forward only: no vision pass, the numbers as without it
        alone = model(text["input_ids"], text["position_ids"], **inputs)
    assert len(seen) == 1 and torch.equal(loss, alone)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name.startswith("vision"):
            assert not p.grad.any(), name
    assert model.language_model.decoder.final_layernorm.weight.grad.any()


def test_each_image_is_encoded_once_per_pair(reference, megatron_tp1):
    ref = reference["llama"]
    model = _tp1_model(ref).eval()
    pair = next(c for c in ref["cases"] if c["name"] == "pair")
    assert pair["input_ids"].shape[0] == 2 and pair["pixel_values"].shape[0] == 2
    seen = []
    model.vision_model.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        logits = model(pair["input_ids"], pair["position_ids"], pixel_values=pair["pixel_values"],
                       image_token_index=pair["image_token_index"], runtime_gather_output=True)
    assert seen == [2]  # one vision call for the pair's 2 tiles, not one per row
    # ... and it equals transformers run with the tiles duplicated per row (the reference).
    assert (logits - pair["ref_logits"]).abs().max() <= worker.LOGIT_ATOL
    # Feeding duplicated tiles to our model gives the same logits too.
    index = pair["image_token_index"].clone()
    index[1][index[1] >= 0] += 8
    with torch.no_grad():
        dup = model(pair["input_ids"], pair["position_ids"], pixel_values=pair["pixel_values"].repeat(2, 1, 1, 1),
                    image_token_index=index, runtime_gather_output=True)
    assert seen == [2, 4]
    assert (dup - logits).abs().max() <= 1e-5


def test_position_embedding_interpolation_matches_transformers(megatron_tp1):
    from megatron_mpo.conversion.native import hf_to_megatron
    from megatron_mpo.models.internvl import build_model

    hf, hf_config = _hf_model("qwen2")  # position embedding trained for 56px (4x4 patches)
    config = _our_config(hf_config, "qwen2")
    config.vision.pos_embed_image_size, config.vision.image_size = 56, 84  # run on 84px tiles
    assert config.tokens_per_tile == 9
    model = build_model(config).eval()
    worker.load_full(model, hf_to_megatron(hf.state_dict(), config))
    b = _Builder(1, 9, config.language.vocab_size, torch.Generator().manual_seed(5), image_size=84)
    case = b.case("interpolated", [b.row([2, [0], 3])], hf)
    with torch.no_grad():
        logits = model(case["input_ids"], case["position_ids"], pixel_values=case["pixel_values"],
                       image_token_index=case["image_token_index"], runtime_gather_output=True)
    assert (logits - case["ref_logits"]).abs().max() <= worker.LOGIT_ATOL


def test_image_index_out_of_range_is_reported(reference, megatron_tp1):
    ref = reference["qwen2"]
    model = _tp1_model(ref)
    case = copy.deepcopy(next(c for c in ref["cases"] if c["name"] == "one_tile"))
    case["image_token_index"][case["image_token_index"] >= 0] += 4
    with pytest.raises(ValueError, match="vision feature row 7.*only 4"):
        model(case["input_ids"], case["position_ids"], pixel_values=case["pixel_values"],
              image_token_index=case["image_token_index"])


# ---- TP=2 / PP=2 on real processes ----------------------------------------------------


def test_tp2_pp1_tp1_pp2_tp2_pp2_and_interleaved_match_transformers(reference, megatron_tp1):
    """... and, with drop path on the vision tower, each TP=2 data-parallel replica trains as
    the TP=1 model seeded for its data-parallel rank, while the two ranks' masks differ."""
    from megatron_mpo.models.internvl import build_model

    root = reference["root"]
    ref = reference["qwen2"]
    drop_path_tp1 = []
    for data_rank in (0, 1):
        model = build_model(ref["config"], drop_path_rate=worker.DROP_PATH_RATE)
        worker.load_full(model, ref["full"])
        drop_path_tp1.append(worker.drop_path_run(model, ref["cases"], None, 1, data_rank=data_rank))
    first, second = (run["losses"][0] for run in drop_path_tp1)
    assert not torch.equal(first, second)  # other masks on another data-parallel rank
    torch.save(drop_path_tp1, root / "drop_path.pt")
    launch(REPO / "tests" / "_model_worker.py", 4, root, timeout=600)
    result = json.loads((root / "failures.json").read_text())
    assert not result["failures"], "\n".join(result["failures"][:20])
    expected = [f"TP{g} {kind}" for g in ("2PP1VP1", "1PP2VP1", "2PP2VP1") for kind in KINDS]
    expected += ["TP1PP2VP2 qwen2", "TP2PP1VP1 qwen2 drop path"]
    assert result["checked"] == sorted(expected)  # every grouping ran


def test_flex_attention_forward_matches_sdpa_on_packed_rows(reference, megatron_tp1, monkeypatch):
    """The FlexAttention core attention (block mask from the segments) gives the SDPA
    path's per-response log-probs on rows packed with several pairs, and on plain causal
    rows, in eval (CPU: forward only). With gradients on a CPU it hands over to the SDPA
    path (torch has no FlexAttention backward there); the GPU kit checks its backward."""
    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.models import packed_attention
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.layers import FlexAttention
    from megatron_mpo.training.forward import model_inputs, slot_log_probs

    ref = reference["llama"]  # GQA, tied embeddings, padded InternViT-6B heads
    sdpa_model = _tp1_model(ref).eval()
    flex_model = build_model(ref["config"], attention_mask="arbitrary", attention="flex")
    worker.load_full(flex_model, ref["full"])
    flex_model.eval()
    cores = [layer.self_attention.core_attention for layer in flex_model.language_model.decoder.layers]
    assert cores and all(type(c) is FlexAttention for c in cores)
    calls = []
    kernel = packed_attention.flex_attention()
    monkeypatch.setattr(packed_attention, "flex_attention", lambda: lambda *a, **k: calls.append(1) or kernel(*a, **k))
    gen = torch.Generator().manual_seed(3)
    pairs = _packed_pairs(gen)
    args = dict(pad_id=0, context_id=IMG_ID, tokens_per_tile=4)
    batches = [collate_pairs(pairs, layout="packed", row_length=45, max_pairs_per_row=None, pad_multiple=16, **args),
               collate_pairs(pairs, layout="unpacked", **args)]
    assert batches[0].input_ids.shape[0] == 2 and batches[0].input_ids.shape[1] % 16 == 0

    def logps(model, batch):
        nll = model(**model_inputs(model, batch))
        return slot_log_probs(nll, batch.response_index, batch.num_slots)[0]

    with torch.no_grad():
        for batch in batches:
            calls.clear()
            torch.testing.assert_close(logps(flex_model, batch), logps(sdpa_model, batch), rtol=1e-5, atol=1e-4)
            assert len(calls) == len(cores)  # every LLM layer ran FlexAttention
    flex_model.train()
    calls.clear()
    logps(flex_model, batches[0]).sum().backward()  # trains on a CPU through the SDPA path
    assert not calls
    assert all(p.grad is not None for p in flex_model.language_model.decoder.parameters())

"""Data pipeline: shard maker, templates, tokenizer, tiling, pairs, collation, streaming loader.

Expected values are written by hand from the data each test builds (sizes, counts,
keys, template strings), not taken from the code under test.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading

import pytest
import torch
from PIL import Image

from megatron_mpo.data import build_loader, bundle_states, load_tokenizer, write_ref_logps
from megatron_mpo.batch import pad_to_length
from megatron_mpo.segments import segment_mask
from megatron_mpo.data.collate import collate_pairs, pack_rows, packed_length
from megatron_mpo.data.samples import PairBuilder, SampleError
from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards
from megatron_mpo.data.templates import expand_image_placeholders, get_template, normalize_placeholders
from megatron_mpo.data.tiling import choose_grid, count_tiles, dynamic_preprocess, image_to_tiles, tiles_per_image
from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer
from megatron_mpo.errors import UserError
from tests.conftest import loader_settings, resumed_loader

SYS_25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYS_2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
LONG_ANSWER = "blue " * 200


# ----------------------------------------------------------------------------- fixtures
def _solid(width, height, color):
    return Image.new("RGB", (width, height), color)


def _save(img, path, fmt):
    img.save(path, fmt)
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def data_tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), "tokenizers")


@pytest.fixture(scope="module")
def data_sp_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("sptok")), "sentencepiece")


@pytest.fixture(scope="module")
def data_tok(data_tok_dir):
    return load_tokenizer(data_tok_dir)


@pytest.fixture(scope="module")
def data_src(tmp_path_factory):
    """meta.json with alpha (8 lines, repeat 0.5), beta (3 lines, repeat 2), gamma (7 lines, 6 bad)."""
    root = tmp_path_factory.mktemp("src")
    img = root / "img"
    img.mkdir()
    originals = {}
    alpha = []
    for i in range(8):
        name = f"a{i}.jpg"
        originals[name] = _save(_solid(112, 56, (200, 20 * i, 10)), img / name, "JPEG")
        alpha.append({"id": f"alpha-{i}", "image": name, "question": f"What color is picture {i}?",
                      "chosen": "It is red.", "rejected": "It is green."})
    originals["b0.png"] = _save(_solid(56, 56, (0, 0, 255)), img / "b0.png", "PNG")
    originals["b1.jpg"] = _save(_solid(56, 112, (0, 255, 0)), img / "b1.jpg", "JPEG")
    beta = [
        {"image": ["b0.png", "b1.jpg"], "question": "Compare the two pictures.", "chosen": "Both are squares.",
         "rejected": "They differ."},
        {"question": "Say blue many times.", "chosen": LONG_ANSWER, "rejected": "No."},
        {"image": "b0.png", "question": "Look: <image> What is it?", "chosen": "A blue square.", "rejected": "A cat."},
    ]
    (img / "broken.jpg").write_bytes(b"this is not a jpeg")
    gamma_lines = [
        "{not json",
        json.dumps({"image": "a0.jpg", "chosen": "x", "rejected": "y"}),
        json.dumps({"image": "a0.jpg", "question": "q?", "chosen": "", "rejected": "y"}),
        json.dumps({"image": "nothere.jpg", "question": "q?", "chosen": "x", "rejected": "y"}),
        json.dumps({"image": "broken.jpg", "question": "q?", "chosen": "x", "rejected": "y"}),
        json.dumps({"image": "a1.jpg", "question": "<image> and <image>?", "chosen": "x", "rejected": "y"}),
        json.dumps({"id": 77, "image": "a2.jpg", "question": "Fine?", "chosen": "Yes.", "rejected": "No."}),
    ]
    (root / "alpha.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpha))
    (root / "beta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in beta))
    (root / "gamma.jsonl").write_text("\n".join(gamma_lines) + "\n")
    meta = {
        "alpha": {"root": "img", "annotation": "alpha.jsonl", "repeat_time": 0.5, "length": 8},
        "beta": {"root": "img", "annotation": "beta.jsonl", "repeat_time": 2, "length": 3},
        "gamma": {"root": "img", "annotation": "gamma.jsonl", "repeat_time": 1, "length": 7, "max_dynamic_patch": 2},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return {"root": root, "meta": str(root / "meta.json"), "originals": originals}


BETA_KEYS = {"beta-L1-r0", "beta-L1-r1", "beta-L2-r0", "beta-L2-r1", "beta-L3-r0", "beta-L3-r1"}


@pytest.fixture(scope="module")
def data_shards(data_src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    index = make_shards(MakeShardsConfig(out=out, meta=data_src["meta"], samples_per_shard=3, seed=5, workers=2,
                                         progress=False), log=lambda m: None)
    return {"dir": out, "index": index}


def _read_tar(path):
    members = {}
    with tarfile.open(path) as tar:
        for info in tar:
            members[info.name] = (info, tar.extractfile(info).read())
    return members


def _all_members(shard_dir, index):
    out = {}
    for s in index["shards"]:
        out.update(_read_tar(os.path.join(shard_dir, s["name"])))
    return out


def _cfg(shards, **kw):
    base = dict(shards=shards, image_size=56, tokens_per_tile=4, max_tiles=6, max_length=2048, num_workers=0,
                micro_batch=1, shuffle_buffer=4, seed=3, epochs=1, template="internvl2_5")
    base.update(kw)
    return loader_settings(**base)


def _tool(name):
    """A tools/ script as a module (tools/ is not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(loader):
    return [k for batch in loader for k in batch.keys]


# ----------------------------------------------------------------------------- make_shards
def test_make_shards_counts_contents_and_refusals(data_src, data_shards):
    index, out = data_shards["index"], data_shards["dir"]
    # alpha: int(8 * 0.5) = 4, beta: 3 * 2 = 6, gamma: 1 of 7 good -> 11 in shards of 3.
    assert index["total"] == 11
    assert [s["samples"] for s in index["shards"]] == [3, 3, 3, 2]
    assert [s["name"] for s in index["shards"]] == [f"shard-00000{i}.tar" for i in range(4)]
    assert index["sources"]["alpha"]["selected"] == 4 and index["sources"]["beta"]["selected"] == 6
    assert index["refused"] == {"bad_json": 1, "missing_question": 1, "missing_response": 1, "missing_image": 1,
                                "bad_image": 1, "placeholder_mismatch": 1}
    rows = [json.loads(line) for line in open(os.path.join(out, "refused.jsonl"))]
    assert sorted((r["line"], r["reason"]) for r in rows) == [
        (1, "bad_json"), (2, "missing_question"), (3, "missing_response"), (4, "missing_image"), (5, "bad_image"),
        (6, "placeholder_mismatch")]

    members = _all_members(out, index)
    jsons = {name[: -len(".json")]: json.loads(data) for name, (_, data) in members.items() if name.endswith(".json")}
    assert len(jsons) == 11
    assert {k for k in jsons if k.startswith("beta")} == BETA_KEYS
    assert {k for k in jsons if k.startswith("gamma")} == {"gamma-L7-r0"}
    alpha_keys = [k for k in jsons if k.startswith("alpha")]
    assert len(alpha_keys) == 4 and all(k.endswith("-r0") for k in alpha_keys)
    for name, (info, _) in members.items():
        assert "." not in name.split(".")[0] and info.mtime == 946684800 and info.uid == 0
    multi = jsons["beta-L1-r1"]
    assert multi["question"] == "<image>\n<image>\nCompare the two pictures."
    assert multi["num_images"] == 2 and multi["images"] == ["img0.png", "img1.jpg"]
    assert members["beta-L1-r1.img0.png"][1] == data_src["originals"]["b0.png"]  # original bytes, no re-encode
    assert members["beta-L1-r1.img1.jpg"][1] == data_src["originals"]["b1.jpg"]
    assert jsons["beta-L3-r0"]["question"] == "Look: <image> What is it?"  # placeholder kept in place
    text_only = jsons["beta-L2-r0"]
    assert text_only["num_images"] == 0 and text_only["question"] == "Say blue many times."
    assert not any(n.startswith("beta-L2-r0.img") for n in members)
    gamma = jsons["gamma-L7-r0"]
    assert gamma["question"] == "<image>\nFine?" and gamma["id"] == 77 and gamma["max_dynamic_patch"] == 2
    assert gamma["dataset"] == "gamma" and gamma["line"] == 7


def test_make_shards_is_deterministic_and_atomic(data_src, data_shards, tmp_path):
    other = tmp_path / "again"
    make_shards(MakeShardsConfig(out=str(other), meta=data_src["meta"], samples_per_shard=3, seed=5, workers=1,
                                 progress=False), log=lambda m: None)
    for s in data_shards["index"]["shards"]:
        a = open(os.path.join(data_shards["dir"], s["name"]), "rb").read()
        b = open(other / s["name"], "rb").read()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    assert not [n for n in os.listdir(other) if n.endswith(".tmp")]
    # Another seed changes the order (and the alpha subsample) but not the counts.
    third = tmp_path / "seed6"
    index = make_shards(MakeShardsConfig(out=str(third), meta=data_src["meta"], samples_per_shard=3, seed=6,
                                         progress=False), log=lambda m: None)
    assert index["total"] == 11
    assert open(third / "shard-000000.tar", "rb").read() != open(other / "shard-000000.tar", "rb").read()


def test_make_shards_user_errors_and_jsonl_mode(data_src, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_shards(MakeShardsConfig(out=str(tmp_path / "o"), meta=str(tmp_path / "missing.json")))
    bad = tmp_path / "meta.json"
    bad.write_text(json.dumps({"x": {"root": ".", "annotation": "nope.jsonl"}}))
    with pytest.raises(UserError, match="nope.jsonl"):
        make_shards(MakeShardsConfig(out=str(tmp_path / "o"), meta=str(bad)))
    with pytest.raises(SystemExit) as exc:
        _tool("make_shards").main(["--meta", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    root = data_src["root"]
    index = make_shards(MakeShardsConfig(out=str(tmp_path / "j"), jsonl=str(root / "beta.jsonl"),
                                         image_root=str(root / "img"), name="my.set", progress=False),
                        log=lambda m: None)
    assert index["total"] == 3
    names = set(_read_tar(os.path.join(tmp_path / "j", "shard-000000.tar")))
    assert "my_set-L1-r0.json" in names and "my_set-L1-r0.img0.png" in names


# ----------------------------------------------------------------------------- templates / tokenizer
def test_templates_render_exact_strings():
    q = "<image>\nWhat is this?"
    assert get_template("internvl2_5").render_prompt(q) == (
        "<|im_start|>system\n" + SYS_25 + "<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert get_template("internlm2-chat").render_prompt(q) == (
        "<|im_start|>system\n" + SYS_2 + "<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
        "<|im_start|>assistant\n")
    assert get_template("Hermes-2").render_prompt("Hi", system_message="S") == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n")
    assert get_template("internvl2_5").render_response("A cat.") == "A cat.<|im_end|>"
    assert expand_image_placeholders("a<image>b<image>", [2, 1], 3) == (
        "a<img>" + "<IMG_CONTEXT>" * 6 + "</img>b<img>" + "<IMG_CONTEXT>" * 3 + "</img>")
    assert normalize_placeholders("Q", 1) == "<image>\nQ"
    assert normalize_placeholders("Q", 2) == "<image>\n<image>\nQ"
    assert normalize_placeholders("A <image> B <image>", 2) == "A <image> B <image>"
    assert normalize_placeholders("<image> Q", 2) is None and normalize_placeholders("<image> Q", 0) is None
    with pytest.raises(UserError, match="internvl2_5"):
        get_template("chatml")


def test_tokenizer_special_tokens_and_errors(data_tok, data_sp_dir, tmp_path):
    # Tiny tokenizers: special tokens are ids 0..11 in tiny_tokenizer.SPECIAL_TOKENS order.
    ids = data_tok.encode("<|im_start|>user<img><IMG_CONTEXT><IMG_CONTEXT></img><|im_end|>")
    assert ids[0] == 1 and ids[-5:] == [3, 5, 5, 4, 2]
    assert data_tok.decode(ids) == "<|im_start|>user<img><IMG_CONTEXT><IMG_CONTEXT></img><|im_end|>"
    sp = load_tokenizer(data_sp_dir)
    # SentencePiece: <unk> <s> </s> then the special tokens from id 3.
    assert (sp.bos_id, sp.im_start_id, sp.im_end_id, sp.img_start_id, sp.img_end_id, sp.img_context_id) == (1, 4, 5, 6, 7, 8)
    assert sp.add_bos and not data_tok.add_bos
    text = "<|im_start|>system\nHello\n<|im_end|>"
    assert sp.decode(sp.encode(text)) == text and sp.encode(text).count(4) == 1
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    bare = HFTokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    bare.save(str(lacking / "tokenizer.json"))
    with pytest.raises(UserError, match="<IMG_CONTEXT>"):
        load_tokenizer(str(lacking))


# ----------------------------------------------------------------------------- tiling
@pytest.mark.parametrize(
    "size, image_size, max_num, grid, tiles",
    [
        ((800, 600), 448, 6, (3, 2), 7),  # aspect 1.33: 3/2 (diff 0.17) beats 1/1 (0.33)
        ((448, 448), 448, 6, (1, 1), 1),  # 2x2 ties but area 448^2 <= 0.5*448^2*4
        ((1000, 1000), 448, 6, (2, 2), 5),  # tie, area 1e6 > 401408 -> larger grid
        ((1000, 200), 448, 6, (5, 1), 6),
        ((1000, 200), 448, 4, (4, 1), 5),
        ((300, 400), 448, 2, (1, 1), 1),  # 0.75: 1/1 and 1/2 tie; 120000 <= 200704
        ((300, 400), 56, 2, (1, 2), 3),  # same tie; 120000 > 0.5*56^2*2 -> 1x2
        ((112, 56), 56, 6, (2, 1), 3),
    ],
)
def test_tiling_grid_choice(size, image_size, max_num, grid, tiles):
    assert choose_grid(size[0], size[1], image_size, 1, max_num) == grid
    assert count_tiles(size[0], size[1], image_size, max_num) == tiles


def test_tiling_crops_row_major_with_thumbnail_and_normalizes():
    img = Image.new("RGB", (112, 112), (255, 0, 0))
    img.paste((0, 0, 255), (56, 0, 112, 56))  # top-right blue
    img.paste((0, 255, 0), (0, 56, 56, 112))  # bottom-left green
    tiles = dynamic_preprocess(img, image_size=56, max_num=4)  # 2x2 + thumbnail
    assert len(tiles) == 5 and all(t.size == (56, 56) for t in tiles)
    assert [t.getpixel((28, 28)) for t in tiles[:4]] == [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 0)]
    x = image_to_tiles(img, image_size=56, max_num=4)
    assert x.shape == (5, 3, 56, 56) and x.dtype == torch.float32
    # red pixel: ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225)
    assert torch.allclose(x[0, :, 10, 10], torch.tensor([2.2489, -2.0357, -1.8044]), atol=1e-3)
    assert tiles_per_image(6, 1) == 6 and tiles_per_image(6, 2) == 3 and tiles_per_image(6, 4) == 1
    assert tiles_per_image(6, 7) == 1


# ----------------------------------------------------------------------------- pairs and collation
def _builder(tok, **kw):
    base = dict(tokenizer=tok, template=get_template("internvl2_5"), max_length=4096, max_tiles=6, image_size=56,
                tokens_per_tile=4, system_message="Be brief.")
    base.update(kw)
    return PairBuilder(**base)


def _png(w, h, color=(255, 0, 0)):
    buf = io.BytesIO()
    _solid(w, h, color).save(buf, "PNG")
    return buf.getvalue()


def test_pair_prompt_tokens_and_labels(data_tok):
    b = _builder(data_tok)
    meta = {"question": "What is it?", "chosen": "A red box.", "rejected": "A cat."}
    pair = b.build("s/k", meta, [_png(112, 56)])  # 2x1 grid + thumbnail = 3 tiles -> 12 context tokens
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 12
                + "</img>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
    assert data_tok.decode(pair.prompt) == expected
    assert data_tok.decode(pair.chosen) == "A red box.<|im_end|>"
    assert data_tok.decode(pair.rejected) == "A cat.<|im_end|>"
    assert pair.pixel_values.shape == (3, 3, 56, 56)

    text = b.build("s/t", {"question": "Hi?", "chosen": "Hello.", "rejected": "Go."}, [])
    for bad in ({"question": "Hi <IMG_CONTEXT>?", "chosen": "A.", "rejected": "B."},
                {"question": "Hi?", "chosen": "<img>A.", "rejected": "B."}):
        with pytest.raises(SampleError) as exc:
            b.build("s/x", bad, [])
        assert exc.value.reason == "image_token_in_text"
    batch = collate_pairs([pair, text], data_tok.pad_id, data_tok.img_context_id, 4)
    lp, lc = len(pair.prompt), len(pair.chosen)
    assert batch.input_ids.shape[0] == 4 and batch.num_pairs == 2 and batch.pixel_values.shape == (3, 3, 56, 56)
    assert batch.keys == ["s/k", "s/t"]
    for row, resp, slot in ((0, pair.chosen, 0), (2, pair.rejected, 2)):
        where = (batch.response_index[row] == slot).nonzero().flatten().tolist()
        assert where == list(range(lp - 1, lp - 1 + len(resp)))  # label t = token t + 1
        assert batch.labels[row, where].tolist() == resp
        assert (batch.labels[row][batch.response_index[row] < 0] == 0).all()  # labels only on responses
        assert set(batch.response_index[row].tolist()) == {-1, slot}
        img_pos = (batch.image_token_index[row] >= 0).nonzero().flatten()
        assert batch.image_token_index[row, img_pos].tolist() == list(range(12))
        assert (batch.input_ids[row, img_pos] == data_tok.img_context_id).all()
    assert (batch.image_token_index[1] == -1).all() and (batch.image_token_index[3] == -1).all()
    assert batch.input_ids.shape[1] == max(lp + lc, lp + len(pair.rejected), len(text.prompt) + len(text.chosen))
    padded = collate_pairs([pair, text], data_tok.pad_id, data_tok.img_context_id, 4, pad_multiple=64)
    assert padded.input_ids.shape[1] % 64 == 0 and padded.input_ids.shape[1] < batch.input_ids.shape[1] + 64
    assert batch.position_ids[0].tolist() == list(range(batch.input_ids.shape[1]))
    # Two image pairs: the second pair's features start after the first pair's 12.
    two = collate_pairs([pair, pair], data_tok.pad_id, data_tok.img_context_id, 4)
    assert two.pixel_values.shape[0] == 6
    assert two.image_token_index[1][two.image_token_index[1] >= 0].tolist() == list(range(12, 24))
    assert two.image_token_index[3][two.image_token_index[3] >= 0].tolist() == list(range(12, 24))


def test_length_control_never_cuts_images(data_tok):
    b = _builder(data_tok, tokens_per_tile=100, max_length=300)  # 3 tiles -> 300 context tokens alone
    meta = {"question": "Q?", "chosen": "A.", "rejected": "B."}
    with pytest.raises(SampleError) as exc:
        b.build("s/k", meta, [_png(112, 56)])
    assert exc.value.reason == "prompt_too_long"
    prompt_len = len(b.prompt_ids("<image>\nQ?", [3]))
    b2 = _builder(data_tok, tokens_per_tile=100, max_length=prompt_len + 2)
    pair = b2.build("s/k", {"question": "Q?", "chosen": "one two three four", "rejected": "B"}, [_png(112, 56)])
    assert pair.prompt.count(data_tok.img_context_id) == 300  # image intact
    assert len(pair.chosen) == 2 and pair.flags == ["response_truncated"]
    assert len(pair.prompt) + len(pair.chosen) == prompt_len + 2


def _toy_slot_logps(batch, vocab, seed=0):
    """Per-slot sums of log p(label) from a one-layer attention LM honoring mask and positions."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(vocab, 16, generator=g, dtype=torch.float64)
    pos = torch.randn(4096, 16, generator=g, dtype=torch.float64)
    wq, wk, wv = (torch.randn(16, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = torch.randn(16, vocab, generator=g, dtype=torch.float64)
    x = emb[batch.input_ids] + pos[batch.position_ids]
    scores = (x @ wq) @ (x @ wk).transpose(1, 2) / 4.0
    S = batch.input_ids.shape[1]
    mask = segment_mask(batch.segments)[:, 0] if batch.segments is not None else torch.ones(S, S, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    h = torch.softmax(scores, -1) @ (x @ wv) + x
    logp = torch.log_softmax(h @ out, -1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(batch.num_slots, dtype=torch.float64)
    valid = batch.response_index >= 0
    sums.index_add_(0, batch.response_index[valid], logp[valid])
    return sums


def test_packed_layout_matches_unpacked_per_slot(data_tok):
    """Packed rows, one pair per row and several (first-fit into max_length), give every
    response the log-prob it has in its own unpacked row under a toy attention LM that
    honours the segment layout and the restarted positions."""
    b = _builder(data_tok)
    pairs = [
        b.build("s/a", {"question": "What is it?", "chosen": "A red box here.", "rejected": "A cat."}, [_png(112, 56)]),
        b.build("s/b", {"question": "Hi?", "chosen": "Hello.", "rejected": "Go away now please."}, []),
        b.build("s/c", {"question": "Why?", "chosen": "Because it is.", "rejected": "No."}, []),
        b.build("s/d", {"question": "Count to three.", "chosen": "One two three.", "rejected": "Four."}, []),
    ]
    args = (data_tok.pad_id, data_tok.img_context_id, 4)
    unpacked = collate_pairs(pairs, *args, layout="unpacked")
    single = collate_pairs(pairs, *args, layout="packed", pad_multiple=8)
    assert single.input_ids.shape[0] == 4 and single.segments.shape == single.input_ids.shape
    lp = len(pairs[0].prompt)
    # the rejected branch restarts at the prompt's last position
    b_start = lp + len(pairs[0].chosen)
    assert single.position_ids[0, b_start].item() == lp - 1 and single.position_ids[0, b_start + 1].item() == lp
    lengths = [packed_length(p) for p in pairs]
    row_length = max(lengths) + min(lengths) + 1
    many = collate_pairs(pairs, *args, layout="packed", row_length=row_length, max_pairs_per_row=None)
    assert many.input_ids.shape[0] < len(pairs) and many.input_ids.shape[1] <= row_length
    assert torch.equal(many.pixel_values, unpacked.pixel_values)
    two_in_a_row = [r for r in range(many.input_ids.shape[0]) if int(many.segments[r].max()) >= 3]
    assert two_in_a_row, "no row holds two pairs"
    r = two_in_a_row[0]
    second = int((many.segments[r] == 3).nonzero()[0])  # pair 1's prompt starts here, at position 0
    assert many.position_ids[r, second].item() == 0
    reference = _toy_slot_logps(unpacked, data_tok.vocab_size)
    for packed in (single, many):
        assert torch.allclose(_toy_slot_logps(packed, data_tok.vocab_size), reference, atol=1e-9, rtol=0)
        for slot in range(8):  # same labels, in order, per slot
            assert (unpacked.labels[unpacked.response_index == slot].tolist()
                    == packed.labels[packed.response_index == slot].tolist())


def test_first_fit_packing_is_deterministic_and_bounded():
    rows = pack_rows([5, 9, 3, 7, 2, 12], row_length=12)
    assert sorted(i for row in rows for i in row) == list(range(6))
    lengths = [5, 9, 3, 7, 2, 12]
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert rows == [[3, 0], [1, 2], [4], [5]]  # 38 > 3 x 12: four rows, by first pair; longest first in a row
    assert rows == pack_rows([5, 9, 3, 7, 2, 12], row_length=12)
    assert pack_rows([20, 3], row_length=12) == [[0], [1]]  # too long: a row of its own
    assert pack_rows([3, 3, 3], row_length=100, max_pairs=2) == [[0, 1], [2]]
    assert pack_rows([3, 3, 3], row_length=100, max_pairs=1) == [[0], [1], [2]]


def test_packed_rows_are_balanced_so_the_longest_row_is_short():
    # First-fit decreasing alone fills a row to 14 and leaves 12 in the other; every row of
    # the micro-batch is padded to the longest, so dealing the pairs evenly saves padding.
    lengths = [7, 6, 7, 6]
    rows = pack_rows(lengths, row_length=14)
    assert len(rows) == 2  # no more rows than first fit needs
    assert max(sum(lengths[i] for i in row) for row in rows) == 13
    assert rows == [[0, 1], [2, 3]]
    assert pack_rows([7, 7, 7], row_length=14, max_pairs=2) == [[0, 1], [2]]  # limit still holds


# ----------------------------------------------------------------------------- streaming loader
def test_epoch_covers_all_samples_and_orders_are_seeded(data_shards, data_tok):
    shards = data_shards["dir"]
    all_keys = _keys(build_loader(*_cfg(shards), data_tok))
    assert len(all_keys) == 11 and len(set(all_keys)) == 11
    assert {k.split("/")[1] for k in all_keys if "/beta" in k} == BETA_KEYS
    again = _keys(build_loader(*_cfg(shards), data_tok))
    assert again == all_keys
    two = _keys(build_loader(*_cfg(shards, epochs=2), data_tok))
    assert two[:11] == all_keys and sorted(two[11:]) == sorted(all_keys) and two[11:] != all_keys
    other_seed = _keys(build_loader(*_cfg(shards, seed=4), data_tok))
    assert sorted(other_seed) == sorted(all_keys) and other_seed != all_keys


@pytest.mark.parametrize("dp_size, workers", [(2, 2), (3, 2)])  # 4 shards: shard split, then sample split
def test_dp_and_worker_split_is_a_partition(data_shards, data_tok, dp_size, workers):
    per_rank = [_keys(build_loader(*_cfg(data_shards["dir"], num_workers=workers), data_tok, r, dp_size))
                for r in range(dp_size)]
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == 11 and len(set(flat)) == 11
    if dp_size == 2:  # shard-level split: each rank reads whole shards
        for keys in per_rank:
            assert len({k.split("/")[0] for k in keys}) == 2


def test_workers_are_read_round_robin(data_shards, data_tok):
    # 4 shards, 2 workers: each worker owns 2 shards; consecutive micro-batches alternate workers.
    keys = _keys(build_loader(*_cfg(data_shards["dir"], num_workers=2), data_tok))
    shard = [k.split("/")[0] for k in keys]
    assert not {shard[0], shard[2]} & {shard[1], shard[3]}


def test_resume_reproduces_remaining_micro_batches(data_shards, data_tok):
    cfg = _cfg(data_shards["dir"], num_workers=2, micro_batch=2, epochs=2, shuffle_buffer=3)
    full = [(b.keys, b.input_ids.clone(), b.pixel_values.clone()) for b in build_loader(*cfg, data_tok)]
    assert sum(len(k) for k, _, _ in full) == 22
    for k in (1, 3, len(full) // 2 + 1):  # mid first epoch, and inside the second
        resumed = resumed_loader(cfg, data_tok, k)
        rest = [(b.keys, b.input_ids, b.pixel_values) for b in resumed]
        assert [r[0] for r in rest] == [f[0] for f in full[k:]]
        for (_, ids, px), (_, fids, fpx) in zip(rest, full[k:]):
            assert torch.equal(ids, fids) and torch.equal(px, fpx)
    with pytest.raises(UserError, match="dp_size"):
        build_loader(*cfg, data_tok, 0, 2).load_state_dict(resumed.state_dict())


def _epoch_keys(loader, limit=None):
    """(epoch, sample key) of every pair the loader hands out, up to ``limit`` micro-batches;
    the iterator stays suspended so ``state_dict()`` is the position after the last one."""
    out, it = [], iter(loader)
    for n, batch in enumerate(it, start=1):
        out += [(loader.epoch, k) for k in batch.keys]
        if n == limit:
            break
    return out


def _json(obj):
    return json.loads(json.dumps(obj))


@pytest.mark.parametrize("old, new, taken", [
    ((2, 2), (1, 0), (2, 8)),  # rank 1 already in epoch 1 when the job stops
    ((1, 2), (2, 1), (4,)),
    ((2, 0), (3, 2), (3, 1)),  # 4 shards over 6 streams: sample-level split after the change
])
def test_resume_at_another_dp_size_trains_every_pair_once_per_epoch(data_shards, data_tok, old, new, taken):
    (old_dp, old_workers), (new_dp, new_workers) = old, new
    cfg = _cfg(data_shards["dir"], epochs=2, shuffle_buffer=3, num_workers=old_workers)
    every = sorted(_keys(build_loader(*_cfg(data_shards["dir"]), data_tok)))
    assert len(every) == 11
    before, states = [], []
    for rank in range(old_dp):
        loader = build_loader(*cfg, data_tok, rank, old_dp)
        before += _epoch_keys(loader, taken[rank])
        states.append(loader.state_dict())
    saved = _json(bundle_states(states))
    after, lines = [], []
    new_cfg = _cfg(data_shards["dir"], epochs=2, shuffle_buffer=2, num_workers=new_workers)
    for rank in range(new_dp):
        loader = build_loader(*new_cfg, data_tok, rank, new_dp)
        lines.append(loader.resume(saved))
        after += _epoch_keys(loader)
    assert all("data layout changed" in line and "dp_size" in line for line in lines), lines
    for epoch in (0, 1):  # each epoch: every pair once, none twice, before and after the stop together
        assert sorted(k for e, k in before + after if e == epoch) == every, epoch


def test_resume_replays_split_over_processes_and_chains(data_shards, data_tok):
    cfg = _cfg(data_shards["dir"], epochs=1, shuffle_buffer=3, num_workers=2)
    every = sorted(_keys(build_loader(*_cfg(data_shards["dir"]), data_tok)))
    states, before = [], []
    for rank in range(2):
        loader = build_loader(*cfg, data_tok, rank, 2)
        before += [k for _, k in _epoch_keys(loader, 2)]
        states.append(loader.state_dict())
    saved = _json(bundle_states(states))
    # Two processes split the replays and all-gather them: the same position as one process alone.
    alone = build_loader(*cfg, data_tok, 0, 1)
    alone.resume(saved)
    parts = []
    for index in range(2):
        split = build_loader(*cfg, data_tok, 0, 1)
        split.resume(saved, share=(index, 2), gather=lambda part: parts.append(part) or [part])
    joined = build_loader(*cfg, data_tok, 0, 1)
    joined.resume(saved, share=(0, 2), gather=lambda part: [part, parts[1]])
    assert joined.state_dict() == alone.state_dict() != split.state_dict()
    # A second stop after the change, resumed at yet another size: still every pair once.
    middle = [k for _, k in _epoch_keys(alone, 3)]
    again = _json(bundle_states([alone.state_dict()]))
    after = []
    for rank in range(2):
        loader = build_loader(*_cfg(data_shards["dir"], epochs=1, num_workers=1), data_tok, rank, 2)
        loader.resume(again)
        after += _keys(loader)
    assert sorted(before + middle + after) == every
    # Same layout: the exact position, as load_state_dict gives.
    same = build_loader(*cfg, data_tok, 1, 2)
    assert same.resume(saved) == "data position restored exactly"
    assert same.state_dict()["positions"] == states[1]["positions"]


def test_resume_on_rebuilt_shards_is_refused_or_restarts(data_src, data_shards, data_tok, tmp_path):
    cfg = _cfg(data_shards["dir"], num_workers=0)
    loader = build_loader(*cfg, data_tok)
    _epoch_keys(loader, 3)
    saved = _json(bundle_states([loader.state_dict()]))
    # Same source re-sharded with another seed: same shard names and count, other contents.
    out = str(tmp_path / "resharded")
    make_shards(MakeShardsConfig(out=out, meta=data_src["meta"], samples_per_shard=3, seed=6, workers=1,
                                 progress=False), log=lambda m: None)
    assert sorted(os.listdir(out)) == sorted(os.listdir(data_shards["dir"]))
    moved = build_loader(*_cfg(out, num_workers=0), data_tok)
    with pytest.raises(UserError, match=r"changed: shard-\d+ and \d+ more.*allow_changed_data") as exc:
        moved.resume(saved)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="allow_changed_data"):
        moved.load_state_dict(saved["ranks"][0] | {"version": 2, "identity": saved["identity"], "base": {}})
    line = moved.resume(saved, allow_changed_data=True)
    assert "restarts at epoch 0" in line
    assert moved.epoch == 0 and len(_keys(moved)) == 11


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sample_json(**kw):
    base = {"question": "<image>\nWhat?", "chosen": "Red.", "rejected": "Blue.", "images": ["img0.png"]}
    base.update(kw)
    return json.dumps(base).encode()


@pytest.fixture(scope="module")
def data_bad_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = _png(56, 56)
    jpeg = io.BytesIO()
    _solid(56, 56, (9, 9, 9)).save(jpeg, "JPEG")
    jpeg = jpeg.getvalue()
    broken_png = bytearray(_png(60, 40))
    idat = broken_png.find(b"IDAT")
    for i in range(idat + 4, idat + 20):
        broken_png[i] ^= 0xFF
    first = [
        ("ok1.json", _sample_json()), ("ok1.img0.png", good),
        ("badjpg.json", _sample_json(images=["img0.jpg"])), ("badjpg.img0.jpg", b"not a jpeg at all"),
        ("cutjpg.json", _sample_json(images=["img0.jpg"])), ("cutjpg.img0.jpg", jpeg[: len(jpeg) // 2]),
        ("badpng.json", _sample_json()), ("badpng.img0.png", bytes(broken_png)),
        ("badjson.json", b"{not json"), ("badjson.img0.png", good),
        ("nofield.json", json.dumps({"question": "<image>\nQ", "rejected": "x", "images": ["img0.png"]}).encode()),
        ("nofield.img0.png", good),
        ("noimg.json", _sample_json()),
        ("ok2.json", _sample_json()), ("ok2.img0.png", good),
    ]
    (d / "shard-000000.tar").write_bytes(_tar_bytes(first))
    second = _tar_bytes([("ok3.json", _sample_json()), ("ok3.img0.png", good),
                         ("lost.json", _sample_json()), ("lost.img0.png", _png(300, 300, (1, 2, 3)))])
    cut = second.index(b"lost.img0.png") + 512 + 100  # inside lost's image data
    (d / "shard-000001.tar").write_bytes(second[:cut])
    (d / "only-bad.tar").write_bytes(_tar_bytes([("x.json", b"[1, 2")]))
    return d


def test_corrupt_data_is_skipped_and_counted(data_bad_shards, data_tok):
    d = data_bad_shards
    cfg = _cfg([str(d / "shard-000000.tar"), str(d / "shard-000001.tar")], shuffle_buffer=0, shuffle_shards=False,
               warn_bad_shards=False)
    loader = build_loader(*cfg, data_tok)
    keys = []
    seen = {}
    for batch in loader:
        keys += batch.keys
        for reason, n in loader.last_skip_counts.items():
            seen[reason] = seen.get(reason, 0) + n
    assert keys == ["shard-000000/ok1", "shard-000000/ok2", "shard-000001/ok3"]
    expected = {"bad_image": 3, "bad_json": 1, "missing_field": 1, "missing_image": 1, "bad_tar": 1}
    assert loader.skip_counts == expected
    # counts arrive with batches; the truncation is seen after ok3, at the end marker of its stream
    assert {k: v for k, v in seen.items()} == {"bad_image": 3, "bad_json": 1, "missing_field": 1, "missing_image": 1}
    with pytest.raises(UserError, match="no usable sample"):  # training's endless stream would spin
        list(build_loader(*_cfg(str(d / "only-bad.tar"), warn_bad_shards=False, epochs=None), data_tok))
    once = build_loader(*_cfg(str(d / "only-bad.tar"), warn_bad_shards=False), data_tok)  # the reference tool's pass
    assert list(once) == [] and once.skip_counts == {"bad_json": 1}


def test_long_prompts_dropped_and_long_responses_truncated_in_the_stream(data_shards, data_tok):
    # Every image sample needs >= 200 context tokens > 150: dropped. Both text-only occurrences
    # (beta line 2) are kept with the 200-word chosen response cut to fit.
    cfg = _cfg(data_shards["dir"], tokens_per_tile=200, max_length=150, system_message="Be brief.")
    loader = build_loader(*cfg, data_tok)
    batches = list(loader)
    assert sorted(k.split("/")[1] for b in batches for k in b.keys) == ["beta-L2-r0", "beta-L2-r1"]
    assert loader.skip_counts == {"prompt_too_long": 9, "response_truncated": 2}
    for b in batches:
        assert b.input_ids.shape[1] == 150 and b.pixel_values.shape[0] == 0


@pytest.fixture(scope="module")
def data_http(data_shards):
    handler = functools.partial(_QuietHandler, directory=data_shards["dir"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_streaming_over_http_and_pipe_matches_local(data_shards, data_tok, data_http):
    local = _keys(build_loader(*_cfg(data_shards["dir"]), data_tok))
    over_http = _keys(build_loader(*_cfg(data_http + "/shard-{000000..000003}.tar", num_workers=2), data_tok))
    from_index = _keys(build_loader(*_cfg(data_http + "/index.json"), data_tok))
    piped = _keys(build_loader(*_cfg(f"pipe:cat {data_shards['dir']}/shard-{{000000..000003}}.tar",
                                    allow_pipe_sources=True), data_tok))
    assert from_index == local and piped == local
    assert sorted(over_http) == sorted(local)


def test_reference_logps_join_and_missing_policy(data_shards, data_tok, tmp_path):
    refs = tmp_path / "refs"
    missing = None
    for s in data_shards["index"]["shards"]:
        shard = s["name"][: -len(".tar")]
        keys = sorted(n[: -len(".json")] for n in _read_tar(os.path.join(data_shards["dir"], s["name"])) if n.endswith(".json"))
        table = {k: (-1.0 - i, -2.0 - i) for i, k in enumerate(keys)}
        if shard == "shard-000001":
            missing = f"{shard}/{keys[0]}"
            del table[keys[0]]
        write_ref_logps(str(refs), shard, table)
    loader = build_loader(*_cfg(data_shards["dir"], ref_logps=str(refs)), data_tok)
    got = {}
    for b in loader:
        got[b.keys[0]] = (b.ref_chosen_logps.item(), b.ref_rejected_logps.item())
        assert b.ref_chosen_logps.dtype == torch.float64
    assert len(got) == 10 and missing not in got and loader.skip_counts == {"missing_ref": 1}
    for key, (c, r) in got.items():
        assert r == c - 1.0 and c <= -1.0
    with pytest.raises(UserError, match="reference log-probs"):
        list(build_loader(*_cfg(data_shards["dir"], ref_logps=str(refs), on_missing_ref="error"), data_tok))


def test_bench_loader_smoke(data_shards, data_tok_dir, capsys):
    _tool("bench_loader").main(["--shards", data_shards["dir"], "--tokenizer", data_tok_dir, "--workers", "0", "--samples", "5",
          "--image-size", "56", "--tokens-per-tile", "4"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] == 5 and result["pairs_per_s"] > 0


def test_attended_keys_count_the_visible_query_key_pairs(data_tok):
    """MFU counts attention per query-key pair computed: for packed rows the visible pairs
    of the segment layout (counted here from the dense mask), for causal rows S(S+1)/2."""
    b = _builder(data_tok)
    pairs = [
        b.build("s/a", {"question": "What is it?", "chosen": "A red box here.", "rejected": "A cat."}, [_png(112, 56)]),
        b.build("s/b", {"question": "Hi?", "chosen": "Hello.", "rejected": "Go away now please."}, []),
        b.build("s/c", {"question": "Why?", "chosen": "Because it is.", "rejected": "No."}, []),
    ]
    args = (data_tok.pad_id, data_tok.img_context_id, 4)
    packed = collate_pairs(pairs, *args, layout="packed", row_length=10_000, max_pairs_per_row=None)
    padded = pad_to_length(packed, packed.input_ids.shape[1] + 5)  # a trailing pad segment
    assert packed.input_ids.shape[0] == 1 and int(padded.segments[0, -1]) == 9
    for batch in (packed, padded):
        assert batch.attended_keys() == int((~segment_mask(batch.segments)).sum())
    unpacked = collate_pairs(pairs, *args, layout="unpacked")
    R, S = unpacked.input_ids.shape
    assert unpacked.attended_keys() == int(torch.ones(R, S, S).tril().sum())
    assert packed.attended_keys() < unpacked.attended_keys()


def test_resume_keeps_what_an_earlier_layout_consumed_for_ranks_still_in_that_epoch(data_shards, data_tok):
    """DP1 consumes part of epoch 0, DP2 goes on; rank 0 reaches epoch 1 while rank 1 is still
    in epoch 0 when the job stops. The checkpoint keeps one copy of what the DP1 layout consumed
    (every rank's entry shares it): rank 1, resumed exactly, must still skip those samples."""
    cfg = _cfg(data_shards["dir"], epochs=2, shuffle_buffer=3)
    every = sorted(_keys(build_loader(*_cfg(data_shards["dir"]), data_tok)))
    first = build_loader(*cfg, data_tok, 0, 1)
    before = _epoch_keys(first, 4)
    saved = _json(bundle_states([first.state_dict()]))
    ranks = [build_loader(*cfg, data_tok, r, 2) for r in range(2)]
    for loader in ranks:
        loader.resume(saved)
    middle, it = [], iter(ranks[0])
    while ranks[0].epoch == 0:  # rank 0 into epoch 1
        batch = next(it)
        middle += [(batch.epoch, k) for k in batch.keys]
    middle += _epoch_keys(ranks[1], 1)  # rank 1 one micro-batch into the rest of epoch 0
    assert ranks[1].epoch == 0
    stopped = _json(bundle_states([r.state_dict() for r in ranks]))
    again = build_loader(*cfg, data_tok, 1, 2)
    assert again.resume(stopped) == "data position restored exactly"
    after = _epoch_keys(again)
    assert sorted(k for e, k in before + middle + after if e == 0) == every

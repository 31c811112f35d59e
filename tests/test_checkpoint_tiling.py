"""A checkpoint's tiling settings (issue 28, item 4).

InternVL records how a model tiles images in its ``config.json`` (``dynamic_image_size``,
``use_thumbnail``, ``min_dynamic_patch``, ``max_dynamic_patch``; the native layout in its
image processor config: ``crop_to_patches``, ``min_patches``, ``max_patches``). The
converter stores them, a run takes them as the defaults of its ``data.*`` tiling keys
(``data.*`` overrides; the banner says where each value came from), the reference
fingerprint holds them, and both export formats write what the run used.

Expected tile counts are worked out by hand from InternVL's ``dynamic_preprocess`` rule
(grids with min <= cols*rows <= max, closest aspect ratio; a thumbnail when tiled).
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mpo.errors import UserError

transformers = pytest.importorskip("transformers")

QUIET = dict(log=lambda _m: None)
TILING_KEYS = ("dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch")


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _original_source(tmp_path, **tiling):
    """A tiny original-layout (InternVLChatModel) checkpoint whose config.json states ``tiling``."""
    from safetensors.torch import save_file

    from megatron_mpo.conversion.original import native_to_original
    from tests.test_conversion import _safetensors_dir, _tiny_internvl

    _tiny_internvl(tmp_path / "native", "qwen2", seed=11)
    native_cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    orig_sd, orig_cfg = native_to_original(_safetensors_dir(tmp_path / "native"), native_cfg, llm_family="qwen2",
                                           template="internvl2_5")
    orig_cfg.update(tiling)
    src = tmp_path / "orig"
    shutil.copytree(tmp_path / "native", src, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (src / "config.json").write_text(json.dumps(orig_cfg))
    save_file({k: v.contiguous() for k, v in orig_sd.items()}, str(src / "model.safetensors"))
    return src


def _training_checkpoint(mdir, save, run_data: dict):
    """A checkpoint of ``mdir``'s weights as a run with the ``data`` section ``run_data`` saves it."""
    from megatron_mpo.training.checkpoint import CheckpointManager
    from megatron_mpo.training.model_dir import _single_process_model, read_model_dir

    config, state = read_model_dir(mdir)
    model = _single_process_model(config)
    model.load_state_dict(state, strict=False)
    return CheckpointManager(save).save(
        1, [model], None, common={"config": {"model": {"init": str(mdir)}, "data": run_data}}, per_rank={})


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """An original-layout source stating a non-default tiling, converted; a training checkpoint
    of it whose run overrides part of that tiling (and the template)."""
    from megatron_mpo.conversion.convert import hf_to_megatron_dir

    root = tmp_path_factory.mktemp("tiling")
    src = _original_source(root, dynamic_image_size=True, use_thumbnail=False, min_dynamic_patch=2,
                           max_dynamic_patch=4)
    mdir = hf_to_megatron_dir(src, root / "m", **QUIET)
    run_data = {"max_tiles": 3, "thumbnail": True, "min_tiles": None, "dynamic_tiling": None, "template": "Hermes-2"}
    return dict(root=root, src=src, mdir=mdir, step=_training_checkpoint(mdir, root / "save", run_data))


# ---- conversion stores them -------------------------------------------------------------


def test_conversion_stores_the_checkpoint_tiling(converted, tmp_path):
    stored = json.loads((converted["mdir"] / "model_config.json").read_text())
    assert {k: stored.get(k) for k in TILING_KEYS} == {
        "dynamic_image_size": True, "use_thumbnail": False, "min_dynamic_patch": 2, "max_dynamic_patch": 4}

    # The native layout states them in its image processor config.
    from megatron_mpo.conversion.convert import hf_to_megatron_dir
    from tests.test_conversion import _tiny_internvl

    _tiny_internvl(tmp_path / "hf", "qwen2", seed=12)
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": False, "min_patches": 1,
         "max_patches": 5}))
    hf_to_megatron_dir(tmp_path / "hf", tmp_path / "m", **QUIET)
    stored = json.loads((tmp_path / "m" / "model_config.json").read_text())
    assert {k: stored.get(k) for k in TILING_KEYS} == {
        # transformers' GotOcr2 processor always adds a thumbnail to a tiled image
        "dynamic_image_size": False, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 5}


def test_a_bad_tiling_in_the_checkpoint_is_one_line(tmp_path):
    from megatron_mpo.conversion.convert import hf_to_megatron_dir

    src = _original_source(tmp_path, min_dynamic_patch=0)
    with pytest.raises(UserError, match="min_dynamic_patch") as err:
        hf_to_megatron_dir(src, tmp_path / "m", **QUIET)
    assert "\n" not in str(err.value) and not (tmp_path / "m").exists()


# ---- a run takes them as defaults; data.* overrides; the banner says which -----------------


def _run(**data):
    from megatron_mpo.config import from_dict

    return from_dict({"model": {"preset": "tiny"}, "data": {"shards": "s", "ref_logps": "r", **data}})


def _stated(**tiling):
    from megatron_mpo.models.presets import get_preset

    config = get_preset("tiny")  # 56-pixel tiles
    for key, value in tiling.items():
        setattr(config, key, value)
    return config.validate()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    return load_tokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _tiles(tok, cfg, model_config, image: bytes) -> int:
    """Tiles of ``image`` as the trainer's loader cuts it for this run and model."""
    from megatron_mpo.data.samples import build_pair_builder
    from megatron_mpo.training import data_setup

    builder = build_pair_builder(data_setup.loader_data(cfg, model_config), tok, image_size=56,
                                 tokens_per_tile=model_config.tokens_per_tile)
    return int(builder.prompt("What is shown?", [image])[1].shape[0])


def test_the_checkpoint_tiling_is_the_default_and_data_overrides_it(tok):
    from megatron_mpo.training import data_setup

    square, wide = _png(112, 112), _png(400, 60)
    plain = _stated()  # a model dir converted before the tiling was stored: today's behaviour
    assert _tiles(tok, _run(), plain, square) == 5  # 2x2 of at most 6 + thumbnail
    assert _tiles(tok, _run(), plain, wide) == 7  # 6x1 + thumbnail

    model = _stated(dynamic_image_size=True, use_thumbnail=False, min_dynamic_patch=2, max_dynamic_patch=3)
    assert _tiles(tok, _run(), model, square) == 2  # grids of 2..3 tiles, closest to 1:1 is 1x2 / 2x1; no thumbnail
    assert _tiles(tok, _run(), model, wide) == 3  # 3x1, no thumbnail
    assert _tiles(tok, _run(thumbnail=True, max_tiles=4), model, square) == 5  # 2x2 + thumbnail
    line = data_setup.describe_tiling(_run(thumbnail=True), model)
    assert line == ("dynamic, 2-3 tiles per sample, thumbnail (dynamic_tiling, min_tiles, max_tiles: from the "
                    "checkpoint; thumbnail: data.thumbnail)"), line

    single = _stated(dynamic_image_size=False, use_thumbnail=True, max_dynamic_patch=12)
    assert _tiles(tok, _run(), single, wide) == 1  # one tile: the image resized, no thumbnail
    assert _tiles(tok, _run(dynamic_tiling=True), single, wide) == 8  # 7x1 of at most 12 + thumbnail
    line = data_setup.describe_tiling(_run(), single)
    assert line.startswith("one tile per image (dynamic_tiling: from the checkpoint"), line
    assert data_setup.describe_tiling(_run(), plain) == (
        "dynamic, 1-6 tiles per sample, thumbnail (dynamic_tiling, thumbnail, min_tiles, max_tiles: defaults)")

    with pytest.raises(UserError, match="min_tiles 4 .* max_tiles 3") as err:
        data_setup.loader_data(_run(min_tiles=4), model)
    assert "\n" not in str(err.value)


def test_one_tile_without_dynamic_tiling_is_the_image_resized_as_internvl_does(tok):
    """InternVL without ``dynamic_image_size``: ``[image]`` through its transform
    (bicubic resize to the tile size, ToTensor, ImageNet Normalize)."""
    from megatron_mpo.data.samples import PairBuilder
    from megatron_mpo.data.templates import get_template

    data = _png(400, 60, seed=3)
    builder = PairBuilder(tok, get_template("internvl2_5"), max_length=4096, max_tiles=6,
                          image_size=56, tokens_per_tile=4, dynamic_tiling=False)
    _, pixels = builder.prompt("What is shown?", [data])
    resized = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((56, 56), Image.Resampling.BICUBIC))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((resized / 255.0 - mean) / std).transpose(2, 0, 1)).float()
    assert pixels.shape == (1, 3, 56, 56)
    torch.testing.assert_close(pixels[0], expected, atol=1e-5, rtol=0)


def test_the_banner_states_the_tiling():
    from megatron_mpo.parallel import Layout
    from megatron_mpo.training import data_setup
    from megatron_mpo.training.run_report import banner

    model = _stated(use_thumbnail=False)
    cfg = _run()
    layout = Layout(tensor=1, pipeline=1, data=1, tensor_rank=0, pipeline_rank=0, data_rank=0)
    text = banner(cfg, layout, total_steps=3, start_step=0, pairs=None, template="t", template_source="s",
                  tiling=data_setup.describe_tiling(cfg, model), precision="fp32", reference_precision="fp32",
                  rows="unpacked", mfu_peak="p")
    assert ("\n  tiling: dynamic, 1-6 tiles per sample, no thumbnail (thumbnail: from the checkpoint; "
            "dynamic_tiling, min_tiles, max_tiles: defaults)\n") in text, text


# ---- the reference values are bound to the tiling ------------------------------------------


def test_the_reference_fingerprint_holds_the_tiling(tmp_path):
    from megatron_mpo.data.refs import explain
    from megatron_mpo.training import data_setup

    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "model_config.json").write_text("{}")
    plain = _stated()
    stated = _stated(use_thumbnail=False)

    def fingerprint(model_config, **data):
        cfg = _run(**data)
        cfg.model.init = cfg.model.tokenizer = str(tmp_path / "init")
        return data_setup.reference_fingerprint(cfg, model_config)

    base = fingerprint(plain)
    no_thumbnail = fingerprint(stated)
    assert no_thumbnail != base
    assert explain(base, no_thumbnail) == "they were computed with thumbnail=True, this run uses thumbnail=False"
    assert explain(no_thumbnail, fingerprint(stated, thumbnail=False)) is None  # same tiling, either way
    assert "min_tiles=1, this run uses min_tiles=2" in explain(base, fingerprint(plain, min_tiles=2))
    assert "dynamic_tiling" in explain(base, fingerprint(plain, dynamic_tiling=False))
    # Sidecars written before the tiling was fingerprinted were computed with today's defaults.
    legacy = {k: v for k, v in base.items() if k not in ("dynamic_tiling", "thumbnail", "min_tiles")}
    assert explain(legacy, base) is None
    assert explain(legacy, no_thumbnail) is not None


# ---- a training checkpoint's tiling is its run's; both exports write it ---------------------


def test_a_training_checkpoint_carries_its_runs_tiling(converted, tmp_path):
    from megatron_mpo.training.model_dir import read_model_config

    def tiling(config) -> tuple:
        return config.dynamic_image_size, config.use_thumbnail, config.min_dynamic_patch, config.max_dynamic_patch

    config = read_model_config(converted["step"])  # the next MPO round starts from this
    assert tiling(config) == (True, True, 2, 3)
    assert config.template == "Hermes-2"
    # A run saved before the tiling keys existed tiled with the defaults, whatever the model said.
    old = _training_checkpoint(converted["mdir"], tmp_path / "save", {"max_tiles": 6})
    assert tiling(read_model_config(old)) == (True, True, 1, 6)


def test_both_export_formats_write_the_tiling_the_run_used(converted):
    from megatron_mpo.conversion.convert import megatron_dir_to_hf

    root = converted["root"]
    megatron_dir_to_hf(converted["step"], root / "step_chat", "internvl-chat", **QUIET)
    chat = json.loads((root / "step_chat" / "config.json").read_text())
    assert {k: chat[k] for k in TILING_KEYS} == {
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 2, "max_dynamic_patch": 3}
    assert chat["template"] == "Hermes-2"

    megatron_dir_to_hf(converted["step"], root / "step_native", "native", **QUIET)
    processor = json.loads((root / "step_native" / "preprocessor_config.json").read_text())
    assert {k: processor[k] for k in ("crop_to_patches", "min_patches", "max_patches")} == {
        "crop_to_patches": True, "min_patches": 2, "max_patches": 3}

    # The model dir itself exports what it was converted with; in the native layout a thumbnail
    # cannot be switched off (transformers' GotOcr2 processor always adds one): said, and recorded.
    lines: list = []
    megatron_dir_to_hf(converted["mdir"], root / "native_m", "native", log=lines.append)
    processor = json.loads((root / "native_m" / "preprocessor_config.json").read_text())
    assert {k: processor[k] for k in ("crop_to_patches", "min_patches", "max_patches", "use_thumbnail")} == {
        "crop_to_patches": True, "min_patches": 2, "max_patches": 4, "use_thumbnail": False}
    assert any(line.startswith("warning:") and "thumbnail" in line for line in lines), lines
    megatron_dir_to_hf(converted["mdir"], root / "chat_m", "internvl-chat", **QUIET)
    chat = json.loads((root / "chat_m" / "config.json").read_text())
    assert {k: chat[k] for k in TILING_KEYS} == {
        "dynamic_image_size": True, "use_thumbnail": False, "min_dynamic_patch": 2, "max_dynamic_patch": 4}


def test_a_native_source_keeps_its_processor_config_with_the_runs_tiling(tmp_path):
    from megatron_mpo.conversion.convert import hf_to_megatron_dir, megatron_dir_to_hf
    from tests.test_conversion import _tiny_internvl

    _tiny_internvl(tmp_path / "hf", "qwen2", seed=13)
    source = {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": True, "min_patches": 1,
              "max_patches": 12, "size": {"height": 56, "width": 56}, "custom_key": "kept"}
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(source))
    mdir = hf_to_megatron_dir(tmp_path / "hf", tmp_path / "m", **QUIET)
    # A run saved before the other tiling keys existed: it used the defaults for them.
    step = _training_checkpoint(mdir, tmp_path / "save", {"max_tiles": 3})
    megatron_dir_to_hf(step, tmp_path / "out", "native", **QUIET)
    written = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert written == {**source, "max_patches": 3}

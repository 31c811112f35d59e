"""Exports (issue 15, item 5): ``--ckpt`` given a run's save dir exports the checkpoint its
``latest`` names, and a native export carries the processor files ``AutoProcessor`` reads,
checked against transformers' own loaders and against the trainer's tiling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mpo.errors import UserError

transformers = pytest.importorskip("transformers")

RUN_MAX_TILES = 3  # the training run's data.max_tiles, kept in its checkpoints


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A tiny model trained "twice" (steps 3 and 5 in one save dir), exported from the save dir."""
    from megatron_mpo.conversion.convert import megatron_dir_to_hf
    from megatron_mpo.training.model_dir import _single_process_model, init_model_dir, read_model_dir
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer
    from megatron_mpo.training.checkpoint import CheckpointManager

    root = tmp_path_factory.mktemp("export")
    build_tiny_tokenizer(str(root / "tok"))
    init = init_model_dir("tiny", root / "tok", root / "init", seed=1)
    config, state = read_model_dir(init)
    model = _single_process_model(config)
    model.load_state_dict(state, strict=False)
    weight = model.vision_projection.encoder.linear_fc1.weight
    common = {"config": {"model": {"init": str(init)}, "data": {"max_tiles": RUN_MAX_TILES}}}
    manager = CheckpointManager(root / "save")
    for step, shift in ((3, 1.0), (5, 2.0)):
        with torch.no_grad():
            weight.copy_(state["vision_projection.encoder.linear_fc1.weight"] + shift)
        manager.save(step, [model], None, common=common, per_rank={})
    lines: list[str] = []
    megatron_dir_to_hf(root / "save", root / "out", "native", log=lines.append)
    return dict(root=root, out=root / "out", config=config, state=state, log=lines)


def test_a_save_dir_exports_the_checkpoint_latest_names(exported):
    from transformers import InternVLForConditionalGeneration

    hf = InternVLForConditionalGeneration.from_pretrained(exported["out"])
    expected = exported["state"]["vision_projection.encoder.linear_fc1.weight"] + 2.0  # step 5's weight
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight.detach(), expected)
    assert any("step_000000005" in line for line in exported["log"]), exported["log"]


def test_a_save_dir_without_a_finished_checkpoint_is_refused(exported, tmp_path):
    from megatron_mpo.conversion.convert import megatron_dir_to_hf

    (tmp_path / "save" / "step_000000007").mkdir(parents=True)  # a save that never finished
    with pytest.raises(UserError, match="holds no complete checkpoint") as err:
        megatron_dir_to_hf(tmp_path / "save", tmp_path / "out", "native", log=lambda _: None)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def _wide_image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(60, 400, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_native_export_has_an_image_processor_of_the_training_tiling(exported):
    """The exported image processor cuts an image exactly as the trainer does: same tile
    size, tile budget of the run, thumbnail, bicubic, ImageNet mean/std."""
    from transformers import AutoImageProcessor

    from megatron_mpo.data.tiling import image_to_tiles

    kwargs = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    processor = AutoImageProcessor.from_pretrained(exported["out"], **kwargs)
    image = _wide_image()
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    size = exported["config"].vision.image_size
    expected = image_to_tiles(image, size, RUN_MAX_TILES)
    assert tuple(pixels.shape) == (RUN_MAX_TILES + 1, 3, size, size) == tuple(expected.shape)
    torch.testing.assert_close(pixels.float(), expected, atol=1e-5, rtol=0)
    seq = json.loads((exported["out"] / "processor_config.json").read_text())["image_seq_length"]
    assert seq == exported["config"].tokens_per_tile


def test_native_export_tokenizer_names_the_image_tokens(exported):
    from transformers import AutoTokenizer

    from megatron_mpo.data import load_tokenizer

    ours = load_tokenizer(str(exported["root"] / "tok"))
    theirs = AutoTokenizer.from_pretrained(exported["out"])
    assert (theirs.start_image_token_id, theirs.end_image_token_id, theirs.context_image_token_id) == (
        ours.img_start_id, ours.img_end_id, ours.img_context_id)
    assert theirs.convert_tokens_to_ids("<|im_end|>") == ours.im_end_id  # the rest unchanged


def test_auto_processor_loads_the_native_export(exported):
    """transformers builds an InternVL video processor too, which needs torchvision."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported["out"])
    batch = processor(text=["<IMG_CONTEXT>\nWhat is shown?"], images=[_wide_image()], return_tensors="pt")
    size = exported["config"].vision.image_size
    assert tuple(batch["pixel_values"].shape) == (RUN_MAX_TILES + 1, 3, size, size)
    context = processor.tokenizer.context_image_token_id
    assert int((batch["input_ids"] == context).sum()) == (RUN_MAX_TILES + 1) * exported["config"].tokens_per_tile

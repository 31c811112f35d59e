"""Exports (issue 15, item 5): ``--ckpt`` given a run's save dir exports the checkpoint its
``latest`` names, and a native export carries the processor files ``AutoProcessor`` reads,
checked against transformers' own loaders and against the trainer's tiling. Issue 28,
item 10: a native export of a model whose source had no chat template carries one made
from the run's template, so ``apply_chat_template`` gives the very prompt training builds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_mpo.errors import UserError

transformers = pytest.importorskip("transformers")

RUN_MAX_TILES = 3  # the training run's data.max_tiles, kept in its checkpoints
RUN_TEMPLATE = "Hermes-2"  # the run's data.template (the tiny preset's own is internvl2_5)


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
    common = {"config": {"model": {"init": str(init)}, "data": {"max_tiles": RUN_MAX_TILES,
                                                                   "template": RUN_TEMPLATE}}}
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


# ---- issue 28, item 10: a chat template made from the run's --------------------------------

QUESTION = "What is shown?"


def _messages(system, *, image=None, answer=None) -> list:
    head = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
    picture = {"type": "image", "image": image} if image is not None else {"type": "image"}
    turns = head + [{"role": "user", "content": [picture, {"type": "text", "text": QUESTION}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def _internvl_processor(out, monkeypatch):
    """transformers' InternVLProcessor of the export; AutoProcessor also builds a video
    processor, which needs torchvision: without it the processor is assembled from the
    export's own parts (its image processor, tokenizer, image_seq_length and chat template)."""
    from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(out)
    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if arg is None else check(self, name, arg))
    tokenizer = AutoTokenizer.from_pretrained(out)
    kwargs = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    seq = json.loads((out / "processor_config.json").read_text())["image_seq_length"]
    return InternVLProcessor(image_processor=AutoImageProcessor.from_pretrained(out, **kwargs), tokenizer=tokenizer,
                             video_processor=None, image_seq_length=seq, chat_template=tokenizer.chat_template)


def test_native_export_chat_template_gives_the_training_prompt(exported, monkeypatch):
    """The source (a preset) had no chat template: the export has one, made from the run's
    template, and transformers' ``apply_chat_template`` -- image placeholder expanded by
    InternVL's processor -- gives the ids the trainer's PairBuilder builds, with the
    template's system message or the conversation's own."""
    import io

    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.data.samples import PairBuilder
    from megatron_mpo.data.templates import get_template

    out = exported["out"]
    assert (out / "chat_template.jinja").is_file()
    processor = _internvl_processor(out, monkeypatch)
    image = _wide_image()
    buf = io.BytesIO()
    image.save(buf, "PNG")
    config = exported["config"]
    for system in (None, "Answer in one word."):
        builder = PairBuilder(load_tokenizer(str(exported["root"] / "tok")), get_template(RUN_TEMPLATE),
                              max_length=4096, max_tiles=RUN_MAX_TILES, image_size=config.vision.image_size,
                              tokens_per_tile=config.tokens_per_tile, system_message=system)
        expected, pixels = builder.prompt(QUESTION, [buf.getvalue()])
        batch = processor.apply_chat_template(_messages(system, image=image), add_generation_prompt=True,
                                              tokenize=True, return_dict=True, return_tensors="pt")
        assert batch["input_ids"][0].tolist() == expected, system
        assert tuple(batch["pixel_values"].shape) == tuple(pixels.shape)
        # A whole conversation: the answer follows the prompt as training's response does.
        text = processor.apply_chat_template(_messages(system, answer="Blue."), tokenize=False)
        prompt = get_template(RUN_TEMPLATE).render_prompt(f"<IMG_CONTEXT>\n{QUESTION}", system)
        assert text == prompt + "Blue.<|im_end|>", text


@pytest.mark.parametrize("name", ["internvl2_5", "internlm2-chat", "Hermes-2"])
@pytest.mark.parametrize("bos", [False, True])
def test_generated_chat_templates_render_each_training_prompt(exported, name, bos):
    """Each template's Jinja form, rendered by transformers, is the training prompt text
    (BOS included when the tokenizer adds one and the template wants it), and the
    converter reads it back as that template."""
    from transformers import AutoTokenizer

    from megatron_mpo.conversion.chat_template import jinja_template, template_from_jinja
    from megatron_mpo.data.templates import get_template

    template = get_template(name)
    jinja = jinja_template(name, bos=bos)
    tokenizer = AutoTokenizer.from_pretrained(exported["out"])
    head = "<s>" if bos and template.bos else ""
    for system in (None, "Think first."):
        text = tokenizer.apply_chat_template(_messages(system), chat_template=jinja, add_generation_prompt=True,
                                             tokenize=False, bos_token="<s>")
        assert text == head + template.render_prompt(f"<IMG_CONTEXT>\n{QUESTION}", system), text
    assert template_from_jinja(jinja, "internlm2" if name == "internlm2-chat" else "qwen2")[0] == name

"""Processor files of a native export, so ``transformers.AutoProcessor`` loads it.

transformers' ``InternVLProcessor`` is built from three parts, each from its own file:

* the image processor, ``preprocessor_config.json``: a ``GotOcr2ImageProcessor`` that cuts
  an image into square tiles of the model's size plus a thumbnail (InternVL's dynamic
  tiling, :mod:`megatron_mpo.data.tiling`), normalised with ImageNet mean/std;
* the processor itself, ``processor_config.json``: ``image_seq_length``, the image tokens
  per tile (transformers assumes 256, right only for 448-pixel tiles);
* the tokenizer, which must name its image tokens (``start_image_token`` ``<img>``,
  ``end_image_token`` ``</img>``, ``context_image_token`` ``<IMG_CONTEXT>``,
  ``video_token``) under ``extra_special_tokens`` in ``tokenizer_config.json``.

A source that shipped these files keeps its own (the exporter carries them); this module
writes what is missing. transformers also builds an InternVL video processor, which needs
torchvision: without it ``AutoProcessor`` stops there, while the image processor alone
loads (``AutoImageProcessor``, ``backend="pil"`` in transformers 5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from megatron_mpo.data.templates import IMG_CONTEXT, IMG_END, IMG_START
from megatron_mpo.data.tiling import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGE_PROCESSOR_FILE", "PROCESSOR_FILE", "TOKENIZER_CONFIG_FILE", "DEFAULT_MAX_TILES", "export_max_tiles",
           "processor_files"]

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PROCESSOR_CLASS = "InternVLProcessor"
DEFAULT_MAX_TILES = 12  # InternVL's max_dynamic_patch when nothing says otherwise
IMAGE_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": "<video>",  # the processor replaces it by per-frame image tokens
}
_BICUBIC = 3  # PIL's code, as transformers stores ``resample``


def image_processor_config(image_size: int, max_tiles: int) -> dict:
    """InternVL's dynamic tiling as a GotOcr2 image processor: tiles of ``image_size``
    pixels, at most ``max_tiles`` plus a thumbnail, bicubic, ImageNet mean/std."""
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": max_tiles,
        **_pixel_settings(image_size),
    }


def video_processor_config(image_size: int) -> dict:
    """Video frames as single tiles of the model's size (transformers' default is 384)."""
    return {"video_processor_type": "InternVLVideoProcessor", **_pixel_settings(image_size)}


def _pixel_settings(image_size: int) -> dict:
    """What image and video processors share: tile size, bicubic resize, ImageNet normalisation."""
    return {
        "processor_class": PROCESSOR_CLASS,
        "size": {"height": image_size, "width": image_size},
        "resample": _BICUBIC,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


def tokenizer_config_with_image_tokens(raw: bytes) -> Optional[bytes]:
    """``tokenizer_config.json`` with the image tokens the processor reads added under
    ``extra_special_tokens``; None when it already names them all (or is unreadable)."""
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    extra = config.get("extra_special_tokens") if isinstance(config, dict) else None
    if not isinstance(config, dict) or (extra is not None and not isinstance(extra, dict)):
        return None  # a list (older transformers) or something else: leave it as the source had it
    missing = {k: v for k, v in IMAGE_TOKENS.items() if k not in (extra or {})}
    if not missing:
        return None
    config["extra_special_tokens"] = {**(extra or {}), **missing}
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def export_max_tiles(ckpt: Path, record: Mapping) -> int:
    """The tile budget to export: the training run's ``data.max_tiles`` (a training
    checkpoint keeps its run config), else the source's ``max_dynamic_patch``, else 12."""
    common = Path(ckpt) / "common.json"
    if common.is_file():
        try:
            run = json.loads(common.read_text()).get("common", {}).get("config", {})
            tiles = run.get("data", {}).get("max_tiles")
        except (ValueError, AttributeError):
            tiles = None
        if isinstance(tiles, int) and tiles >= 1:
            return tiles
    tiles = (record.get("original_config") or {}).get("max_dynamic_patch")
    return tiles if isinstance(tiles, int) and tiles >= 1 else DEFAULT_MAX_TILES


def processor_files(files: Mapping[str, bytes], model_config, max_tiles: int) -> dict[str, bytes]:
    """The processor files an export with ``files`` (name -> content) lacks: image, video and
    processor configs, and the tokenizer config with its image tokens named."""
    image_size = model_config.vision.image_size
    out: dict[str, bytes] = {}
    wanted = {
        IMAGE_PROCESSOR_FILE: image_processor_config(image_size, max_tiles),
        VIDEO_PROCESSOR_FILE: video_processor_config(image_size),
        PROCESSOR_FILE: {"processor_class": PROCESSOR_CLASS, "image_seq_length": model_config.tokens_per_tile},
    }
    for name, content in wanted.items():
        if name not in files:
            out[name] = (json.dumps(content, indent=2) + "\n").encode("utf-8")
    if TOKENIZER_CONFIG_FILE in files:
        updated = tokenizer_config_with_image_tokens(files[TOKENIZER_CONFIG_FILE])
        if updated is not None:
            out[TOKENIZER_CONFIG_FILE] = updated
    return out

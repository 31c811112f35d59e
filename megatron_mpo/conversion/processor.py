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

A source that shipped these files keeps its own (the exporter carries them) with the tiling
keys set to the run's; this module writes what is missing. transformers also builds an
InternVL video processor, which needs torchvision: without it ``AutoProcessor`` stops
there, while the image processor alone loads (``AutoImageProcessor``, ``backend="pil"`` in
transformers 5).

Tiling (:mod:`megatron_mpo.data.tile_settings`) in GotOcr2's terms: ``crop_to_patches``,
``min_patches``, ``max_patches``. Two of InternVL's settings have no switch there: the
thumbnail (GotOcr2 always adds one to a tiled image; ``use_thumbnail: false`` is written
for this converter and people to read, transformers ignores it, and the exporter warns),
and ``crop_to_patches: false`` (``InternVLProcessor`` passes ``crop_to_patches=True``
whatever the file says), so no dynamic tiling is also written as ``max_patches`` 1, which
both honour. The image processor config is read from ``processor_config.json``'s
``image_processor`` when there (transformers 5 nests it), else ``preprocessor_config.json``,
as transformers reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from megatron_mpo.data.templates import IMG_CONTEXT, IMG_END, IMG_START
from megatron_mpo.data.tile_settings import Tiling
from megatron_mpo.data.tiling import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGE_PROCESSOR_FILE", "PROCESSOR_FILE", "TOKENIZER_CONFIG_FILE", "processor_files",
           "image_processor_tiling", "stated_image_processor_tiling", "tiling_warnings"]

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PROCESSOR_CLASS = "InternVLProcessor"
IMAGE_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": "<video>",  # the processor replaces it by per-frame image tokens
}
_BICUBIC = 3  # PIL's code, as transformers stores ``resample``


def image_processor_tiling(tiling: Tiling) -> dict:
    """The GotOcr2 image processor keys of a tiling (see the module docstring)."""
    out: dict = {"crop_to_patches": tiling.dynamic_tiling,
                 "min_patches": tiling.min_tiles if tiling.dynamic_tiling else 1,
                 "max_patches": tiling.max_tiles if tiling.dynamic_tiling else 1}
    if not tiling.thumbnail:
        out["use_thumbnail"] = False
    return out


def tiling_warnings(tiling: Tiling) -> list[str]:
    """What transformers' processor will do differently from the run's tiling."""
    if tiling.dynamic_tiling and not tiling.thumbnail:
        return ["the run tiled without a thumbnail, which transformers' GotOcr2 image processor cannot do (it "
                "always adds one to a tiled image): AutoProcessor inputs will have one more tile per tiled image "
                "than training's (the internvl-chat export records use_thumbnail false)"]
    return []


def image_processor_config(image_size: int, tiling: Tiling) -> dict:
    """InternVL's tiling as a GotOcr2 image processor: tiles of ``image_size`` pixels as
    ``tiling`` says, bicubic, ImageNet mean/std."""
    return {"image_processor_type": "GotOcr2ImageProcessor", **image_processor_tiling(tiling),
            **_pixel_settings(image_size)}


def _with_tiling(config: dict, tiling: Tiling) -> dict:
    """A carried image processor config with the tiling keys set to ``tiling``."""
    config = {k: v for k, v in config.items() if k != "use_thumbnail"}
    return {**config, **image_processor_tiling(tiling)}


def _image_processor_dict(files: Mapping[str, bytes]) -> tuple[Optional[str], Optional[dict]]:
    """(file, its image processor dict) as transformers reads it: ``processor_config.json``'s
    nested ``image_processor``, else ``preprocessor_config.json``; (None, None) without one."""
    for name, nested in ((PROCESSOR_FILE, True), (IMAGE_PROCESSOR_FILE, False)):
        try:
            config = json.loads(files[name]) if name in files else None
        except ValueError:
            config = None
        if isinstance(config, dict) and nested:
            config = config.get("image_processor")
        if isinstance(config, dict):
            return name, config
    return None, None


def stated_image_processor_tiling(directory: Path) -> tuple[dict, Optional[str]]:
    """(the tiling a native checkpoint's GotOcr2 image processor config states, InternVL's
    names; the file it is in): ``crop_to_patches`` -> ``dynamic_image_size``, ``min/max_patches``
    -> ``min/max_dynamic_patch``, and a thumbnail unless it records ``use_thumbnail`` false."""
    files = {n: (directory / n).read_bytes() for n in (PROCESSOR_FILE, IMAGE_PROCESSOR_FILE)
             if (directory / n).is_file()}
    name, config = _image_processor_dict(files)
    if config is None or not str(config.get("image_processor_type", "")).startswith("GotOcr2"):
        return {}, None
    keys = {"crop_to_patches": "dynamic_image_size", "min_patches": "min_dynamic_patch",
            "max_patches": "max_dynamic_patch", "use_thumbnail": "use_thumbnail"}
    stated = {ours: config[theirs] for theirs, ours in keys.items() if theirs in config}
    stated.setdefault("use_thumbnail", True)
    return stated, name


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
    return _json_bytes(config)


def _json_bytes(content: object) -> bytes:
    return (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def processor_files(files: Mapping[str, bytes], model_config, tiling: Tiling) -> dict[str, bytes]:
    """The processor files an export with ``files`` (name -> content) lacks or must change:
    image, video and processor configs (a carried image processor config gets ``tiling``),
    and the tokenizer config with its image tokens named."""
    image_size = model_config.vision.image_size
    out: dict[str, bytes] = {}
    wanted = {
        IMAGE_PROCESSOR_FILE: image_processor_config(image_size, tiling),
        VIDEO_PROCESSOR_FILE: video_processor_config(image_size),
        PROCESSOR_FILE: {"processor_class": PROCESSOR_CLASS, "image_seq_length": model_config.tokens_per_tile},
    }
    for name, content in wanted.items():
        if name not in files:
            out[name] = _json_bytes(content)
    for name in (PROCESSOR_FILE, IMAGE_PROCESSOR_FILE):  # each one transformers may read, carried
        found, config = _image_processor_dict({name: files[name]} if name in files else {})
        if found is None:
            continue
        if name == PROCESSOR_FILE:
            out[name] = _json_bytes({**json.loads(files[name]), "image_processor": _with_tiling(config, tiling)})
        else:
            out[name] = _json_bytes(_with_tiling(config, tiling))
    if TOKENIZER_CONFIG_FILE in files:
        updated = tokenizer_config_with_image_tokens(files[TOKENIZER_CONFIG_FILE])
        if updated is not None:
            out[TOKENIZER_CONFIG_FILE] = updated
    return out

"""Hugging Face InternVL directory <-> megatron model directory.

``hf_to_megatron_dir(hf_dir, out_dir, tp, pp)`` reads either Hugging Face layout (the
transformers-native ``InternVLForConditionalGeneration`` or the original remote-code
``InternVLChatModel``), maps it to the native names (:mod:`.original`), then to the full
megatron state dict (:mod:`.native`) and writes a model directory
(:func:`~megatron_mpo.training.model_dir.write_model_dir`): dist_checkpointing
weights, ``model_config.json``, the tokenizer, and ``conversion.json``.

**The weights do not depend on the parallel layout.** megatron-core dist_checkpointing
stores every tensor whole (with its global layer number) and reshards on load, so a
single process writes the directory once and training then loads it under any TP / PP.
``--tp`` / ``--pp`` only *check* that the architecture splits that way (heads, KV groups,
FFN and vocabulary sizes, layers) before anything is written, and are recorded in
``conversion.json`` as the intended layout. The one layout-dependent choice made here is
the zero padding of the vision attention heads when ``tp`` does not divide them
(InternViT-6B: 25 heads -> 32, so TP 1/2/4/8 all divide); the padding is dropped again on
export.

``megatron_dir_to_hf(ckpt, out, fmt)`` reads a model directory or a training checkpoint
(``save/step_N``) and writes a Hugging Face directory in the native layout (loads with
``InternVLForConditionalGeneration.from_pretrained``) or the original ``internvl-chat``
layout. Both directions are bit-exact for the tensors (in the checkpoint's dtype).

Companion files: the source directory's non-weight files (generation / processor
configs, chat templates, remote code, README) are kept in the model directory under
``hf_files/`` and written back on export -- all of them when exporting to the layout the
model came from, only the tokenizer-related ones otherwise. A native export gets the
processor files the source did not ship (:mod:`.processor`), so ``AutoProcessor`` loads it.

Chat template: read from the checkpoint's own files (never its folder name, see
:mod:`.chat_template`), stored as ``template`` in ``model_config.json`` and written back as
``template`` in an ``internvl-chat`` export's ``config.json``; a native export of a source
without a chat template gets one made from it (``chat_template.jinja``).

Tiling (:mod:`megatron_mpo.data.tile_settings`): what the checkpoint states
(``config.json``'s ``dynamic_image_size`` / ``use_thumbnail`` / ``min/max_dynamic_patch``,
a native source's image processor config) is stored in ``model_config.json``; an export
writes the tiling of what it exports -- a training checkpoint's run's, else the model
dir's, the defaults filling in -- as those keys (``internvl-chat``) or the image processor's
(native, :mod:`.processor`).

Every user mistake (another architecture, a TP size that does not divide the heads, a
missing file, an existing non-empty destination) raises :class:`UserError` with one line,
before anything appears at the destination.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_mpo.conversion import hf_io
from megatron_mpo.conversion.hf_config import (
    internvl_config_from_native,
    internvl_config_from_original,
    to_native_hf_config,
)
from megatron_mpo.conversion.hf_io import NATIVE, ORIGINAL, FORMATS
from megatron_mpo.conversion.processor import processor_files, stated_image_processor_tiling, tiling_warnings
from megatron_mpo.errors import UserError

__all__ = [
    "RECORD_FILE",
    "HF_FILES_DIR",
    "hf_to_megatron_dir",
    "megatron_dir_to_hf",
    "read_hf_model",
    "hf_model_config",
    "vision_padding",
    "model_home",
]

RECORD_FILE = "conversion.json"
RECORD_FORMAT = "megatron_mpo.conversion/1"
HF_FILES_DIR = "hf_files"
_MAX_COMPANION_BYTES = 64 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".index.json")
# Kept with any export format: what the tokenizer needs besides the TOKENIZER_FILES.
_TOKENIZER_COMPANIONS = ("tokenization_", "chat_template")

Log = Callable[[str], None]


# ---- HF side --------------------------------------------------------------------------


def _tokenizer_image_id(directory: Path, log: Log) -> Optional[int]:
    """``<IMG_CONTEXT>``'s id in the directory's tokenizer, or None when it cannot tell."""
    from megatron_mpo.data import load_tokenizer

    try:
        return int(load_tokenizer(str(directory)).img_context_id)
    except UserError as exc:
        log(f"note: cannot read <IMG_CONTEXT> from the tokenizer in {directory} ({exc})")
        return None


def hf_model_config(hf: hf_io.HFDir, log: Log = print) -> tuple:
    """(our InternVLConfig, the native config dict) of an inspected HF directory (no weights)."""
    token_id = _tokenizer_image_id(hf.path, log)
    if hf.layout == ORIGINAL:
        image_id = hf.config.get("img_context_token_id") or token_id
        config, native_cfg = internvl_config_from_original(hf.config, image_token_id=image_id)
    else:
        native_cfg = dict(hf.config)
        config = internvl_config_from_native(native_cfg)
        if token_id is not None and token_id != config.img_context_token_id:
            log(
                f"warning: config.json says image_token_id {config.img_context_token_id} but the tokenizer's "
                f"<IMG_CONTEXT> is {token_id}; keeping the config's"
            )
        _state_tiling(config, *stated_image_processor_tiling(hf.path))
    if not config.name:
        config.name = hf.path.name
    return config, native_cfg


def _state_tiling(config, stated: dict, where: Optional[str]) -> None:
    """Let ``config`` state the tiling a native checkpoint's image processor config states."""
    from megatron_mpo.data.tile_settings import check_stated_tiling

    for name, value in stated.items():
        setattr(config, name, value)
    check_stated_tiling(config, f"{where} " if where else "")


def read_hf_model(hf: hf_io.HFDir, log: Log = print) -> dict:
    """The directory's tensors with transformers-native module names."""
    from megatron_mpo.conversion import original

    state = hf_io.load_hf_weights(hf, log)
    if hf.layout == ORIGINAL:
        state, _ = original.original_to_native(state, hf.config)
    return state


def vision_padding(num_heads: int, tp: int) -> Optional[int]:
    """Zero-padded vision head count for TP ``tp`` (None = no padding needed).

    A multiple of lcm(tp, 8) for models with more than 8 heads (InternViT-6B: 25 -> 32,
    so TP 1/2/4/8 all divide it, as in the presets), else the next multiple of ``tp``.
    """
    if num_heads % tp == 0:
        return None
    step = math.lcm(tp, 8) if num_heads > 8 else tp
    return -(-num_heads // step) * step


def _companions(hf_dir: Path) -> dict:
    """Small non-weight files of an HF directory, to carry through the model directory."""
    from megatron_mpo.data.tokenizer import TOKENIZER_FILES

    out = {}
    for path in sorted(hf_dir.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name == hf_io.CONFIG_FILE or name in TOKENIZER_FILES:
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or path.stat().st_size > _MAX_COMPANION_BYTES:
            continue
        out[f"{HF_FILES_DIR}/{name}"] = path.read_bytes()
    return out


def _check_layout(config, tp: int, pp: int, vision_padded_heads: Optional[int], log: Log) -> None:
    """Pad the vision heads for ``tp`` (when asked or needed), then refuse a layout the
    architecture cannot be split into (training's sequence-parallel rule is the run's)."""
    from megatron_mpo.parallel_layout import check_layout

    vis = config.vision
    if vision_padded_heads is not None:
        if vision_padded_heads < vis.num_heads:
            raise UserError(f"--vision-padded-heads {vision_padded_heads} is below the {vis.num_heads} vision heads")
        vis.num_padded_heads = vision_padded_heads if vision_padded_heads != vis.num_heads else None
    elif vis.num_padded_heads is None:
        vis.num_padded_heads = vision_padding(vis.num_heads, tp)
        if vis.num_padded_heads:
            log(f"vision attention heads {vis.num_heads} zero-padded to {vis.num_padded_heads} for tensor parallelism")
    config.validate()
    check_layout(config, tp, pp, sequence=None)


def hf_to_megatron_dir(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    *,
    vision_padded_heads: Optional[int] = None,
    template: Optional[str] = None,
    log: Log = print,
) -> Path:
    """Convert a Hugging Face InternVL directory (either layout) into a megatron model dir.

    The chat template is read from the checkpoint's files (``template`` forces one), see
    :mod:`megatron_mpo.conversion.chat_template`, and stored in ``model_config.json``.

    Written by this one process; the dist_checkpointing result loads under any TP / PP
    (``tp`` / ``pp`` are validated against the architecture and recorded, see the module
    docstring). Nothing appears at ``out_dir`` unless the whole conversion succeeds.
    """
    from megatron_mpo.conversion import native
    from megatron_mpo.conversion.chat_template import checkpoint_template
    from megatron_mpo.data.tile_settings import describe_tiling, resolve_tiling, stated_tiling
    from megatron_mpo.training.model_dir import remove_partial, tokenizer_files, write_model_dir

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_io.check_destination(out_dir)
    hf = hf_io.inspect_hf_dir(hf_dir)
    tokenizer_files(hf_dir)  # fail now, not after reading the weights
    config, native_cfg = hf_model_config(hf, log)
    config.template, template_source = checkpoint_template(hf_dir, hf.config, config.language.family, template)
    _check_layout(config, tp, pp, vision_padded_heads, log)
    log(f"{hf_dir}: {hf.layout} InternVL ({config.language.family} LLM), {len(hf.weight_files)} weight file(s), "
        f"{hf_io._human(hf.total_bytes)}")
    log(f"chat template {config.template} ({template_source}); data.template overrides it")
    log(f"tiling {describe_tiling(*resolve_tiling(None, stated_tiling(config)))}; data.dynamic_tiling, "
        "data.thumbnail, data.min_tiles and data.max_tiles override it")
    hf_state = read_hf_model(hf, log)
    dtype = hf_io.dominant_dtype(hf_state)
    state = native.hf_to_megatron(hf_state, config)
    del hf_state
    record = {
        "format": RECORD_FORMAT,
        "source": str(hf_dir.absolute()),
        "source_format": hf.layout,
        "source_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "tensor": tp,
        "pipeline": pp,
        "layout_note": "dist_checkpointing weights load under any TP/PP; tensor/pipeline were requested "
        "at conversion and checked against the architecture",
        "native_config": native_cfg,
        "original_config": hf.config if hf.layout == ORIGINAL else None,
    }
    extra = {RECORD_FILE: json.dumps(record, indent=1), **_companions(hf_dir)}
    tmp = out_dir.absolute().with_name(f".tmp_{out_dir.name}")
    try:
        write_model_dir(out_dir, config, tokenizer_dir=hf_dir, state=state, extra=extra, log=log)
    except BaseException:
        remove_partial(tmp)  # save_model_weights' temporary directory
        raise
    log(f"wrote {out_dir} (checked for tp={tp} pp={pp}; loads under any layout)")
    return out_dir


# ---- megatron side --------------------------------------------------------------------


def model_home(ckpt: str | Path) -> Path:
    """The model directory behind ``ckpt``: itself, or a training checkpoint's ``model.init``
    (followed through chained MPO rounds)."""
    from megatron_mpo.training.model_dir import model_dir_of

    try:
        return model_dir_of(ckpt)
    except UserError:
        return Path(ckpt)


def _read_record(home: Path) -> dict:
    path = home / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return record if isinstance(record, dict) else {}


def _export_files(home: Path, tokenizer_dir: Path, fmt: str, record: dict, log: Log) -> tuple[dict, Optional[dict]]:
    """(files to write, generation config) for an export to ``fmt``."""
    from megatron_mpo.training.model_dir import tokenizer_files

    files: dict = dict(tokenizer_files(tokenizer_dir))
    same_layout = record.get("source_format") == fmt
    generation = None
    carried = home / HF_FILES_DIR
    if carried.is_dir():
        for path in sorted(carried.iterdir()):
            if not path.is_file():
                continue
            if path.name == hf_io.GENERATION_CONFIG_FILE:
                try:
                    generation = json.loads(path.read_text())
                except ValueError:
                    generation = None
                continue
            if same_layout or path.name.startswith(_TOKENIZER_COMPANIONS):
                files[path.name] = path.read_bytes()
    if generation is None:
        generation = _default_generation_config(tokenizer_dir)
    if fmt == ORIGINAL and not any(n.startswith("modeling_") for n in files):
        log(
            "note: no InternVLChatModel remote code (modeling_internvl_chat.py, ...) to include; copy it from "
            "an InternVL release to load this directory with trust_remote_code"
        )
    return files, generation


def _with_chat_template(files: dict, template: str, tokenizer_dir: Path, log: Log) -> None:
    """Add a chat template made from ``template`` when ``files`` carry none."""
    from megatron_mpo.conversion.chat_template import JINJA_FILE, has_chat_template, jinja_template
    from megatron_mpo.data import load_tokenizer

    if has_chat_template(files):
        return
    files[JINJA_FILE] = jinja_template(template, bos=load_tokenizer(str(tokenizer_dir)).add_bos).encode("utf-8")
    log(f"the source has no chat template: {JINJA_FILE} renders {template}, as training does")


def _default_generation_config(tokenizer_dir: Path) -> Optional[dict]:
    """Stop on the chat turn end (and the tokenizer's EOS); None when the tokenizer cannot say."""
    from megatron_mpo.data import load_tokenizer

    try:
        tok = load_tokenizer(str(tokenizer_dir))
    except UserError:
        return None
    eos = [i for i in dict.fromkeys([tok.im_end_id, tok.eos_id]) if i is not None]
    if not eos:
        return None
    out: dict[str, Any] = {"eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": tok.pad_id}
    if tok.bos_id is not None:
        out["bos_token_id"] = tok.bos_id
    return out


def megatron_dir_to_hf(
    ckpt: str | Path,
    out: str | Path,
    fmt: str = NATIVE,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    log: Log = print,
) -> Path:
    """Export a megatron model directory or training checkpoint to a Hugging Face directory.

    ``fmt``: ``native`` (transformers ``InternVLForConditionalGeneration``) or
    ``internvl-chat`` (original ``InternVLChatModel`` layout). ``dtype``: ``auto`` (the
    dtype of the HF checkpoint it was converted from, else float32), ``float32``,
    ``bfloat16`` or ``float16``. Nothing appears at ``out`` unless the export succeeds.
    """
    from megatron_mpo.conversion import native, original
    from megatron_mpo.data.tile_settings import checkpoint_values, model_tiling
    from megatron_mpo.training.data_setup import default_template
    from megatron_mpo.training.model_dir import MODEL_CONFIG_FILE, follow_latest, read_model_dir, tokenizer_source

    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if dtype != "auto" and dtype not in hf_io.DTYPES:
        raise UserError(f"dtype must be auto or one of {', '.join(hf_io.DTYPES)}, not {dtype!r}")
    ckpt, out = Path(ckpt), Path(out)
    hf_io.check_destination(out)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint {ckpt} does not exist")
    ckpt = follow_latest(ckpt, log)
    home = model_home(ckpt)
    if not (home / MODEL_CONFIG_FILE).is_file():
        raise UserError(f"{ckpt} has no {MODEL_CONFIG_FILE}: not a megatron_mpo model directory or training checkpoint")
    record = _read_record(home)
    tokenizer_dir = tokenizer_source(ckpt)
    if dtype == "auto":
        dtype = record.get("source_dtype") or "float32"
        if dtype not in hf_io.DTYPES:
            dtype = "float32"
    # A training checkpoint's config states the template and tiling its run used.
    config, state = read_model_dir(ckpt)
    source = record.get("original_config") or {}
    # Model dirs older than the stored template: the source's, else the old rule.
    template = config.template or source.get("template") or default_template(config)
    tiling = model_tiling(config)
    files, generation = _export_files(home, tokenizer_dir, fmt, record, log)
    if fmt == NATIVE:  # what AutoProcessor needs, where the source did not ship it; the run's tiling
        files.update(processor_files(files, config, tiling))
        _with_chat_template(files, template, tokenizer_dir, log)
        for warning in tiling_warnings(tiling):
            log(f"warning: {warning}")
    torch_dtype = hf_io.DTYPES[dtype]
    state = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    native_cfg = to_native_hf_config(config, base=record.get("native_config"), dtype=dtype)
    if fmt == NATIVE:
        hf_state = native.megatron_to_hf(state, config, layout="checkpoint")
        hf_config = native_cfg
    else:
        module_state = native.megatron_to_hf(state, config, layout="module")
        hf_state, hf_config = original.native_to_original(
            module_state, native_cfg, llm_family=config.language.family, template=template,
            **checkpoint_values(tiling))
        if source.get("auto_map"):
            hf_config["auto_map"] = source["auto_map"]
    del state
    hf_io.write_hf_dir(out, hf_config, hf_state, files=files, generation_config=generation,
                       max_shard_size=max_shard_size, log=log)
    log(f"wrote {out} ({fmt}, {dtype})")
    return out


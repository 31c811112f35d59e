"""MMPR-style sources: ``meta.json`` datasets, ``repeat_time`` selection, record checks.

A meta file maps dataset names to ``{root, annotation, repeat_time, length,
[max_dynamic_patch]}``; each annotation is JSONL with ``image`` (string, list or absent),
``question``, ``chosen`` and ``rejected``. Checking a record reads its images, so it runs
in worker processes (:func:`check_record` is a plain top-level function for that).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from PIL import Image

from megatron_mpo.data.templates import normalize_placeholders
from megatron_mpo.errors import UserError
from megatron_mpo.fileio import outside_root

# Reasons a record is refused (make_shards) — also the keys of the refusal counts.
REFUSAL_REASONS = (
    "bad_json",
    "missing_question",
    "missing_response",
    "bad_image_field",
    "missing_image",
    "bad_image",
    "placeholder_mismatch",
    "outside_root",
)


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a meta file."""

    name: str
    root: str
    annotation: str
    repeat_time: float = 1.0
    max_dynamic_patch: Optional[int] = None
    scoring: Optional[str] = None  # answer-scoring mode of question sets (megatron_mpo.generation.scoring)


def _resolve(base: str, path: str) -> str:
    """A meta path: relative to the meta file's folder, else (InternVL's habit) to the CWD."""
    if os.path.isabs(path):
        return path
    beside = os.path.join(base, path)
    if not os.path.exists(beside) and path and os.path.exists(path):
        return os.path.abspath(path)
    return beside


def _looks_like_jsonl(path: str) -> bool:
    """True when the first two non-empty lines each hold a JSON object (a JSONL file)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in (f.readline() for _ in range(50)) if line.strip()][:2]
        return len(lines) == 2 and all(isinstance(json.loads(line), dict) for line in lines)
    except (OSError, ValueError):
        return False


def load_meta(path: str) -> List[SourceSpec]:
    """Datasets of an MMPR ``meta.json``, in file order; UserError on a bad file.

    Relative ``root``/``annotation`` paths are taken beside the meta file, or from the
    current directory when only that exists (InternVL resolves them from its CWD).
    """
    if not os.path.isfile(path):
        raise UserError(f"meta file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        if _looks_like_jsonl(path):
            raise UserError(f"{path} is one JSON record per line (an annotation file), not a meta file: "
                            f"use --jsonl {path} (with --image-root and --name) instead of --meta") from None
        raise UserError(f"cannot read meta file {path}: {exc}") from None
    if not isinstance(meta, dict) or not meta:
        raise UserError(f"meta file {path} must be a JSON object {{name: {{root, annotation, repeat_time}}}}")
    base = os.path.dirname(os.path.abspath(path))
    specs = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise UserError(f"meta file {path}: dataset {name!r} needs at least 'annotation' (and 'root')")
        try:
            repeat = float(entry.get("repeat_time", 1.0))
        except (TypeError, ValueError):
            raise UserError(f"meta file {path}: dataset {name!r} has a non-numeric repeat_time") from None
        if not math.isfinite(repeat) or repeat < 0:
            raise UserError(f"meta file {path}: dataset {name!r} has repeat_time {repeat}; use a number >= 0")
        patch = entry.get("max_dynamic_patch")
        if patch is not None and (not isinstance(patch, int) or patch < 1):
            raise UserError(f"meta file {path}: dataset {name!r} has max_dynamic_patch {patch!r}; use an integer >= 1")
        scoring = entry.get("scoring")
        if scoring is not None and not isinstance(scoring, str):
            raise UserError(f"meta file {path}: dataset {name!r} has scoring {scoring!r}; use a mode name")
        annotation = _resolve(base, str(entry["annotation"]))
        root = _resolve(base, str(entry.get("root", "")))
        specs.append(SourceSpec(str(name), root, annotation, repeat, patch, scoring))
    return specs


def read_annotation(spec: SourceSpec) -> List[Tuple[int, str]]:
    """``(line_number, raw_line)`` of every non-blank line (1-based numbers)."""
    if not os.path.isfile(spec.annotation):
        raise UserError(f"dataset {spec.name!r}: annotation file {spec.annotation} does not exist")
    try:
        with open(spec.annotation, encoding="utf-8", errors="replace") as f:
            return [(i, line.rstrip("\n")) for i, line in enumerate(f, start=1) if line.strip()]
    except OSError as exc:
        raise UserError(f"dataset {spec.name!r}: cannot read {spec.annotation}: {exc}") from None


def select_indices(count: int, repeat_time: float, rng: random.Random) -> List[int]:
    """Indices into ``count`` lines after ``repeat_time``: whole copies plus a seeded sample.

    ``repeat_time = 2.5`` keeps every line twice and a random half once more;
    ``0.3`` keeps a random ``int(0.3 * count)`` (InternVL's subsampling rule).
    """
    whole = int(math.floor(repeat_time))
    frac = repeat_time - whole
    picked = list(range(count)) * whole
    extra = int(count * frac)
    if extra:
        picked += sorted(rng.sample(range(count), extra))
    return picked


def safe_key_part(text: str, limit: int = 48) -> str:
    """A key fragment without dots or separators (webdataset keys end at the first dot)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "ds"
    return cleaned[:limit]


def as_image_list(value) -> Optional[List[str]]:
    """A record's ``image`` field as a list of paths (absent: []); None when it is malformed."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    return None


def _image_extension(path: str, fmt: Optional[str]) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext and ext.isalnum():
        return ext
    fmt = (fmt or "bin").lower()
    return "jpg" if fmt == "jpeg" else fmt


def check_record(task: dict) -> dict:
    """Parse and validate one annotation line and read its images.

    ``task``: ``{dataset, root, line, raw, max_dynamic_patch[, allow_outside_root]}``. Returns
    ``{"ok": True, "meta": {...}, "images": [(ext, bytes), ...]}`` or
    ``{"ok": False, "reason": ..., "detail": ..., "id": ...}``.
    """

    def refuse(reason: str, detail: str, rec_id=None) -> dict:
        return {"ok": False, "reason": reason, "detail": detail, "id": rec_id}

    try:
        rec = json.loads(task["raw"])
    except ValueError as exc:
        return refuse("bad_json", str(exc)[:200])
    if not isinstance(rec, dict):
        return refuse("bad_json", "line is not a JSON object")
    rec_id = rec.get("id")
    if rec_id is not None and not isinstance(rec_id, (str, int)):
        rec_id = str(rec_id)
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        return refuse("missing_question", "no question", rec_id)
    for field in ("chosen", "rejected"):
        value = rec.get(field)
        if not isinstance(value, str) or not value.strip():
            return refuse("missing_response", f"empty or missing {field!r}", rec_id)
    paths = as_image_list(rec.get("image"))
    if paths is None:
        return refuse("bad_image_field", f"image must be a string or a list of strings, got {rec.get('image')!r}"[:200], rec_id)
    images = []
    for path in paths:
        full = os.path.join(task["root"], path)
        escape = None if task.get("allow_outside_root") else outside_root(task["root"], path)
        if escape:
            return refuse("outside_root", f"{path} {escape} ({task['root']}); --allow-outside-root reads it", rec_id)
        if not os.path.isfile(full):
            return refuse("missing_image", full, rec_id)
        try:
            with open(full, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                img.load()
                if img.width < 1 or img.height < 1:
                    raise ValueError("empty image")
        except Exception as exc:  # PIL raises many types for broken files
            return refuse("bad_image", f"{full}: {exc}"[:300], rec_id)
        images.append((_image_extension(path, fmt), data))
    normalized = normalize_placeholders(question, len(images))
    if normalized is None:
        return refuse(
            "placeholder_mismatch", f"{question.count('<image>')} <image> placeholders for {len(images)} images", rec_id
        )
    meta: Dict[str, object] = {
        "question": normalized,
        "chosen": rec["chosen"],
        "rejected": rec["rejected"],
        "dataset": task["dataset"],
        "line": task["line"],
        "num_images": len(images),
        "images": [f"img{i}.{ext}" for i, (ext, _) in enumerate(images)],
    }
    if rec_id is not None:
        meta["id"] = rec_id
    if task.get("max_dynamic_patch") is not None:
        meta["max_dynamic_patch"] = task["max_dynamic_patch"]
    return {"ok": True, "meta": meta, "images": images}

"""The model an engine samples from: an HF directory, exported first when needed.

Engines load Hugging Face directories. A Megatron model directory or training checkpoint
(or a run's save dir) is exported by the project's own converter into
``{workdir}/model_hf`` first (once: a rerun reuses it); the transformers engine needs the
transformers-native layout, so an original-layout (``InternVLChatModel``) directory goes
through the converter too, while vLLM takes either layout as it is. The chat template,
tile size and image tokens come from the model, as in training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_mpo.errors import UserError

EXPORT_DIR = "model_hf"
EXPORT_RECORD = "exported_from.json"
Log = Callable[[str], None]


@dataclass
class ModelSource:
    hf_dir: str  # what the engine loads
    layout: str  # "native" or "internvl-chat"
    config: object  # megatron_mpo.models.config.InternVLConfig
    template: str
    tokenizer_dir: str
    source: str  # what the user named


def _is_megatron(path: Path) -> bool:
    from megatron_mpo.training.model_dir import MODEL_CONFIG_FILE

    return (path / MODEL_CONFIG_FILE).is_file() or (path / "common.json").is_file() or (path / "latest").exists() \
        or any(path.glob("step_*"))


def wait_for_file(path: Path, what: str, timeout_s: float = 3600.0) -> None:
    """Ranks other than 0 wait for a file rank 0 writes atomically (no process group here)."""
    started = time.monotonic()
    while not path.is_file():
        if time.monotonic() - started > timeout_s:
            raise UserError(f"waited {timeout_s:.0f}s for rank 0 to write {path} ({what}); check rank 0's log")
        time.sleep(2.0)


def _export(ckpt: Path, workdir: Path, rank: int, log: Log, via_megatron_from_hf: bool = False) -> Path:
    """``ckpt`` exported to a native HF dir under ``workdir`` (rank 0 writes, others wait)."""
    from megatron_mpo.fileio import write_atomic

    out = workdir / EXPORT_DIR
    record = {"source": str(ckpt.absolute()), "mtime": os.path.getmtime(ckpt)}
    if (out / EXPORT_RECORD).is_file():
        old = json.loads((out / EXPORT_RECORD).read_text())
        if old == record:
            log(f"model: reusing the export {out} of {ckpt}")
            return out
        if rank == 0:
            raise UserError(f"{out} holds an export of {old.get('source')}, not {ckpt}; use another --out")
    if rank != 0:
        wait_for_file(out / EXPORT_RECORD, f"the export of {ckpt}")
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"model: exporting {ckpt} to {out} (transformers-native layout) for the engine")
    # In a process of its own: the converter starts a one-rank process group, which must not
    # meet this job's torchrun environment (or the engine's process).
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    cmd = [sys.executable, "-m", "megatron_mpo.generation.model_source", str(ckpt), str(out)]
    proc = subprocess.run(cmd + (["--from-hf"] if via_megatron_from_hf else []), env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        from megatron_mpo.console import failure_line

        raise UserError(f"exporting {ckpt} for the engine failed: {failure_line(proc.stdout + proc.stderr)}")
    write_atomic(out / EXPORT_RECORD, json.dumps(record))
    return out


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def export_native(source: str, out: str, from_hf: bool = False) -> None:
    """``source`` (Megatron dir / checkpoint, or with ``from_hf`` an original-layout HF dir)
    written to ``out`` in the transformers-native layout, through the project's converter."""
    import shutil
    import tempfile

    from megatron_mpo.conversion.convert import hf_to_megatron_dir, megatron_dir_to_hf

    quiet = lambda _m: None  # noqa: E731
    if not from_hf:
        megatron_dir_to_hf(source, out, "native", log=quiet)
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_mcore_", dir=Path(out).parent))
    try:
        megatron_dir_to_hf(hf_to_megatron_dir(source, tmp / "mcore", log=quiet), out, "native", log=quiet)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(path: str, engine: str, workdir: str, *, rank: int = 0, template: Optional[str] = None,
                  log: Log = print) -> ModelSource:
    """The directory ``engine`` loads for the model at ``path``, with its settings."""
    from megatron_mpo.conversion import hf_io

    src = Path(path)
    if not src.is_dir():
        raise UserError(f"model {path} does not exist")
    if _is_megatron(src):
        from megatron_mpo.training.model_dir import follow_latest, read_model_config, tokenizer_source
        from megatron_mpo.training.data_setup import default_template

        ckpt = follow_latest(src, log)
        config = read_model_config(ckpt)
        hf_dir = _export(ckpt, Path(workdir), rank, log)
        return ModelSource(str(hf_dir), hf_io.NATIVE, config, template or default_template(config),
                           str(tokenizer_source(ckpt)), path)
    from megatron_mpo.conversion.chat_template import checkpoint_template
    from megatron_mpo.conversion.convert import hf_model_config

    hf = hf_io.inspect_hf_dir(src)
    config, _ = hf_model_config(hf, log=lambda _m: None)
    chosen = template or checkpoint_template(src, hf.config, config.language.family)[0]
    if engine == "transformers" and hf.layout != hf_io.NATIVE:
        hf_dir = _export(src, Path(workdir), rank, log, via_megatron_from_hf=True)
        return ModelSource(str(hf_dir), hf_io.NATIVE, config, chosen, str(src), path)
    return ModelSource(str(src), hf.layout, config, chosen, str(src), path)


def prompt_builder(model: ModelSource, tokenizer, *, max_length: int, max_tiles: Optional[int] = None,
                   system_message: Optional[str] = None):
    """The training prompt rule (template, tiling, image tokens) for this model; the tiling is
    the model's own (``max_tiles`` overrides its tile budget)."""
    import dataclasses

    from megatron_mpo.data import DataConfig
    from megatron_mpo.data.samples import build_pair_builder
    from megatron_mpo.data.tile_settings import resolve_tiling, stated_tiling

    data = DataConfig(max_length=max_length, max_tiles=max_tiles, template=model.template,
                      system_message=system_message)
    data = dataclasses.replace(data, **dataclasses.asdict(resolve_tiling(data, stated_tiling(model.config))[0]))
    return build_pair_builder(data, tokenizer, image_size=model.config.vision.image_size,
                              tokens_per_tile=model.config.tokens_per_tile)


if __name__ == "__main__":  # the export process of _export (spawn-safe entry point)
    from megatron_mpo.console import exit_on_user_error, setup_console

    setup_console()
    exit_on_user_error(lambda: export_native(sys.argv[1], sys.argv[2], "--from-hf" in sys.argv[3:]))()

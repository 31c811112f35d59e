"""Room for the next checkpoint: estimated at start-up, checked before each save.

A full disk used to surface as torch's "unexpected pos" from inside the writer, after all
the step's work, and again on every resume. Here the size of a checkpoint is known up
front (the newest one on disk, else the parameter count times the bytes each parameter
keeps), a save that cannot fit first makes room by pruning what ``keep_last`` would prune
after it anyway, and otherwise stops with one line saying how much is needed and free.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_mpo import platform
from megatron_mpo.errors import UserError

__all__ = ["estimate_checkpoint_bytes", "ensure_room", "explain_write_error", "free_bytes", "directory_bytes", "describe"]

HEADROOM = 1.05  # metadata, per-rank extras, filesystem slack
# torch's message when a zip writer hits a full disk mid-file.
_FULL_DISK_MESSAGES = ("No space left on device", "unexpected pos")


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def describe(nbytes: float) -> str:
    """``512 B``, ``3.2 MiB``, ``40.0 GiB``: the largest binary unit that keeps the number
    at least 1, so a small checkpoint does not read as ``0.0 GiB``."""
    if abs(nbytes) < 1024:
        return f"{int(nbytes)} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1023.95:  # 1023.96 KiB would print as 1024.0 KiB
            break
    return f"{value:.1f} {unit}"


def directory_bytes(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def estimate_checkpoint_bytes(chunks: Sequence[torch.nn.Module], dtype: str, data_rank: int,
                              newest: Optional[Path] = None) -> int:
    """Bytes one checkpoint takes: the newest on disk if any, else from the parameter count.

    Every parameter is written once (weights in ``dtype``) plus the distributed optimizer's
    fp32 state (master copy when training in bf16, two Adam moments). Collective: the
    first data-parallel replica's parameter counts are summed over all ranks.
    """
    if newest is not None and newest.is_dir():
        return directory_bytes(newest)
    local = sum(p.numel() for chunk in chunks for p in chunk.parameters()) if data_rank == 0 else 0
    count = torch.tensor([float(local)], dtype=torch.float64, device=platform.device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    per_param = (2 if dtype == "bf16" else 4) + (4 if dtype == "bf16" else 0) + 8
    return int(float(count) * per_param)


def ensure_room(manager, need: int, step: int, is_writer: bool) -> None:
    """Before saving ``step``: make room by pruning early, or stop with one line.

    Only checkpoints that ``keep_last`` would delete right after this save are pruned
    early, and never the newest one: if the save then fails, a complete checkpoint remains.
    Collective: rank 0 decides, every rank follows.
    """
    problem = ""
    if is_writer:
        free = free_bytes(manager.save_dir)
        if free < need * HEADROOM and manager.keep_last is not None:
            from megatron_mpo.training.checkpoint import remove_checkpoint

            found = manager.complete_checkpoints()
            doomed = found[: max(len(found) - max(manager.keep_last - 1, 1), 0)]
            for old in doomed:
                print(f"low on disk space: removing {old.name} now (keep_last would remove it after "
                      f"this save)", flush=True)
                remove_checkpoint(old)
            free = free_bytes(manager.save_dir)
        if free < need * HEADROOM:
            problem = (f"no space left on {manager.save_dir} for checkpoint step {step} (needs ~{describe(need)}, "
                       f"{describe(free)} free); free some space or lower checkpoint.keep_last, then resume")
    problem = _broadcast(problem)
    if problem:
        raise UserError(problem)


def explain_write_error(exc: BaseException, save_dir: Path, need: int) -> Optional[str]:
    """One line for a save that failed because the disk filled up, else None."""
    text = " ".join(str(exc).split())
    full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    if full or any(m in text for m in _FULL_DISK_MESSAGES):
        return (f"no space left on {save_dir} while saving a checkpoint (needs ~{describe(need)}, "
                f"{describe(free_bytes(save_dir))} free); the previous checkpoint is intact: free some space "
                "or lower checkpoint.keep_last, then resume")
    return None


def _broadcast(text: str) -> str:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return text
    box = [text]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

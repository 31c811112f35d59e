"""Atomic and durable file writes, and the rule that keeps named files inside a folder
(standard library only).

:func:`write_atomic` writes a file through a temporary sibling that is then renamed over
it, so readers see the old or the new content, never a torn one; with ``durable`` (the
default) the data and the rename are also fsynced, so a crash or power loss cannot lose
or tear them either. :func:`fsync_path` and :func:`fsync_tree` make files, directories
and whole trees durable before a directory is renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["TMP_PREFIX", "fsync_path", "fsync_tree", "outside_root", "write_atomic"]

# Name prefix of temporary files and directories (a crashed writer's are safe to delete).
TMP_PREFIX = ".tmp_"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory (directories make renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (``root`` included)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_atomic(
    path: str | os.PathLike, data: bytes | str, *, tmp: Optional[str | os.PathLike] = None, durable: bool = True
) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``path`` so readers see the old or the new
    content, never a torn one.

    The data goes to ``tmp`` (default: ``.tmp_<name>.<pid>`` beside ``path``), which then
    replaces ``path``. ``durable``: fsync the data before the rename and the directory
    after it.
    """
    path = Path(path)
    if tmp is None:
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def outside_root(root: str, path: str, what: str = "the image root") -> Optional[str]:
    """How ``path`` (relative to ``root``) leaves ``root``: absolute, ``..`` or a symlink; None inside.

    A data file must not make a tool read arbitrary files of the machine (make_shards
    copying images, the loader opening shards an index.json names).
    """
    if os.path.isabs(path):
        return "is an absolute path"
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(os.path.join(root, path))]) == real_root:
        return None
    inside = os.path.commonpath([real_root, os.path.abspath(os.path.join(real_root, path))]) == real_root
    return f"follows a symlink out of {what}" if inside else f"leads out of {what} with '..'"

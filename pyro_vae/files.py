"""Atomic file writes: a file is either its old self or completely the new one, never half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["replace_atomic", "write_atomic", "write_text_atomic"]


def replace_atomic(path: Path, write_to: Callable[[Path], None]) -> None:
    """Have ``write_to`` write a temporary file in ``path``'s folder, fsync it, then rename it into place.

    For writers that want a path rather than an open file (netCDF); see :func:`write_atomic`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_to(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(handle)`` on a temporary file in the same folder, then rename it into place."""

    def write_to(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    replace_atomic(path, write_to)


def _sync_folder(path: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text.encode()))

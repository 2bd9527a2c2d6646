"""Atomic file writes: a file is either its old self or completely the new one, never half-written."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["replace_atomic", "write_atomic", "write_text_atomic"]


def replace_atomic(path: Path, write_to: Callable[[Path], None]) -> None:
    """Have ``write_to`` write a temporary file in ``path``'s folder, fsync it, then rename it into place.

    For writers that want a path rather than an open file (netCDF); see :func:`write_atomic`.
    An ``OSError`` on the way (a full disk, a read-only folder, a folder where
    the file should be) names ``path``, not the temporary file.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file (give a file name)", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _naming(error, path) from None
    os.close(fd)
    try:
        write_to(Path(tmp))
        # mkstemp makes the file 0600; a result is the user's, with the permissions their umask gives.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(error, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path)


def _umask() -> int:
    # The process's umask can only be read by setting it: set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` (its errno kept) as it concerns ``path``, not the temporary file; a parent that is a file said so."""
    culprit = None if error.filename is None else Path(error.filename)
    if culprit is not None and culprit != path and culprit in path.parents:
        if error.errno == errno.EEXIST:  # mkdir met a file where a folder should be
            return NotADirectoryError(errno.ENOTDIR, f"{culprit} is a file, not a folder", str(path))
        return type(error)(error.errno, f"{error.strerror} (at {culprit})", str(path))
    return type(error)(error.errno, error.strerror or str(error), str(path))


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

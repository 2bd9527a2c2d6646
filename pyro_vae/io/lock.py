"""One writer per run folder: an ``flock`` on ``RUN_DIR/.lock``, held for the whole command.

A trainer takes the lock exclusively; a command that only reads a run (or
writes a file beside its results) may take it shared, so it never reads a
folder a trainer is rewriting. The lock is the kernel's ``flock(2)`` on an
open file, so it belongs to the process: it is released when the process
ends, however it ends (SIGKILL included), and a lock file left behind by a
killed process is never a stale lock, only a file.

The exclusive holder removes the lock file when it lets go, so a command
that was refused leaves the folder as it found it. That is safe because a
process trusts a lock only after checking that the path still names the
file it locked (the usual pattern for lock files that get removed): one that
locked a file just removed finds another file (or none) at the path, and
tries again.

Holding the lock exclusively also proves that no other pyro-vae process is
writing into the folder, so the temporary files of atomic writes found there
(``.NAME.XXXX.tmp``, see :mod:`pyro_vae.files`) are leftovers of a killed
process: :func:`remove_stale_temporaries` deletes them.

References:
    flock(2), Linux man-pages: locks belong to the open file description and
    are released when its last descriptor closes, also at process exit.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from ..errors import PyroVAEError

__all__ = ["LOCK_FILE", "RunLock", "remove_stale_temporaries"]

LOCK_FILE = ".lock"

# Tries at taking the lock while other processes keep removing and recreating the file: each retry means
# another process took and released the lock in between, so a handful is already an unlikely race.
_ATTEMPTS = 50

_WRITABLE = "pass a folder this user can write to"


class RunLock:
    """An ``flock`` on ``folder/.lock``: :meth:`acquire` it, :meth:`release` it (or use it with ``with``).

    ``shared=False`` (a trainer) creates the folder when it is missing,
    writes its process id into the lock file (for the message another
    process gets) and, on release, removes the lock file and the folders it
    created if they are empty again. ``shared=True`` (a reader) creates
    nothing but the lock file, and locks nothing where it cannot write one
    (a read-only run, which no one can be writing into either).
    """

    def __init__(self, folder: Path, fd: int | None, *, shared: bool, created: list[Path]) -> None:
        self.folder = folder
        self.shared = shared
        self._fd = fd
        self._created = created  # the folders acquire made, outermost first

    @classmethod
    def acquire(cls, folder: str | os.PathLike[str], *, shared: bool = False, advice: str) -> RunLock:
        """Lock ``folder`` without waiting; a folder in use is one PyroVAEError ending in ``advice``."""
        folder = Path(folder)
        created = [] if shared else _make_folders(folder)
        try:
            fd = _lock(folder / LOCK_FILE, shared=shared, advice=advice)
        except BaseException:
            _remove_empty(created)
            raise
        lock = cls(folder, fd, shared=shared, created=created)
        if fd is not None and not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (idempotent); the exclusive holder also tidies what it created."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if not self.shared and _names(fd, self.folder / LOCK_FILE):
                # Removed while still held, so no one can be between locking it and checking its name.
                (self.folder / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(fd)
        _remove_empty(self._created)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.NAME.XXXX.tmp`` files of interrupted atomic writes in ``folder``; returns them.

    Call it only while holding ``folder``'s lock exclusively: then no other
    pyro-vae process is writing there, and every such file is a leftover.
    """
    removed = []
    for path in Path(folder).iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders created, outermost first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PyroVAEError(
            f"cannot make the run folder {folder}: {_reason(error, folder)}; {_WRITABLE}"
        ) from None
    return missing[::-1]


def _lock(path: Path, *, shared: bool, advice: str) -> int | None:
    """An open descriptor of ``path`` holding its flock (None: a reader where no lock file can exist)."""
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if shared and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                try:  # a read-only folder: lock its existing lock file if there is one, else nothing
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return None
            else:
                raise PyroVAEError(
                    f"cannot use {path.parent} as a run folder: {_reason(error, path.parent)}; {_WRITABLE}"
                ) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            by = f" (pid {holder})" if holder is not None else ""
            raise PyroVAEError(f"{path.parent} is in use by another pyro-vae process{by}; {advice}") from None
        except BaseException:
            os.close(fd)
            raise
        if _names(fd, path):
            return fd
        os.close(fd)  # the file was removed (and maybe made anew) after we opened it: lock the current one
    raise PyroVAEError(
        f"{path.parent} is being locked and released by other processes faster than this one can take it; "
        f"{advice}"
    )


def _names(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> int | None:
    """The process id the exclusive holder wrote into the lock file, if it has yet."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote into it, or another process did): it stays
            return


def _reason(error: OSError, path: Path) -> str:
    if isinstance(error, FileExistsError) or (isinstance(error, NotADirectoryError) and path.is_file()):
        return "it is a file, not a folder"
    if isinstance(error, NotADirectoryError):
        return "a part of the path is a file, not a folder"
    return error.strerror or type(error).__name__

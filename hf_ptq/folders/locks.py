"""Advisory locks on folders (`flock`), released by the kernel when their process ends, even by `kill -9`.

Two uses: a writer holds the lock of its own staging folder for as long as it lives, so a leftover whose lock can
be taken belongs to a dead process and may be cleaned; and every commit into a parent folder (the final renames,
the clean-up of leftovers) holds the parent's lock, so two writers never interleave their renames. Where `fcntl`
is missing (Windows) locks are no-ops and concurrent writers are not serialized.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


class FolderLock:
    """An exclusive lock on a folder, held until `release()` (or the process ends)."""

    def __init__(self, folder: Path, blocking: bool = True) -> None:
        """Take the lock; with `blocking=False`, BlockingIOError when another process holds it."""
        self.fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(folder, _DIR_FLAGS)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the lock of `folder` within (waiting for it)."""
    lock = FolderLock(folder)
    try:
        yield
    finally:
        lock.release()


def is_abandoned(folder: Path) -> bool:
    """True when no live process holds the lock of `folder` (checked by taking it for a moment)."""
    if fcntl is None:
        return False  # without locks a live writer cannot be told from a dead one: leave it
    try:
        FolderLock(folder, blocking=False).release()
    except BlockingIOError:
        return False
    except OSError:  # vanished meanwhile, or unreadable: not ours to clean
        return False
    return True

"""Atomic directory renames: exchange two paths, or move one into a place that must still be free.

Linux's `renameat2` does both in one system call (`RENAME_EXCHANGE`, `RENAME_NOREPLACE`), so a folder swap leaves
no moment at which the target is missing. Python does not expose it; it is called through the C library. Where it
is missing (other systems, filesystems that refuse the flags), the functions say so and callers fall back to two
plain renames, which `staging.recover_folder` can repair after a crash between them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    """libc's `renameat2`, or None where there is none (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _call(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when this system or filesystem cannot do it; other
    failures raise OSError naming the paths."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths `a` and `b` in one atomic step; False when this system cannot."""
    return _call(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, which must not exist; FileExistsError when it does (also when it was created by
    someone else a moment ago: the check and the rename are one step where renameat2 exists)."""
    try:
        done = _call(src, dst, _RENAME_NOREPLACE)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists already", os.fspath(dst)) from None
    if done:
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists already", os.fspath(dst))
    try:
        os.rename(src, dst)  # onto an empty folder created in between it would succeed: nothing is lost
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists already", os.fspath(dst)) from None
        raise


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder's fsync makes renames inside it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders cannot be opened on some systems: nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root` and every folder (deepest first, `root` last)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(Path(folder, name))
        fsync_path(Path(folder))

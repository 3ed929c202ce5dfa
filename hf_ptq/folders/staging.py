"""Writing a folder so that a crash at any moment leaves the old version or the new one at its path, never neither
and never a mix.

Everything is written into a staging folder beside the target (`.<name>.partial-XXXXXXXX`), flushed to disk, then
swapped with the target in one `renameat2(RENAME_EXCHANGE)` (or moved into a free target with `RENAME_NOREPLACE`),
and the old version is deleted. Where `renameat2` is missing the swap is two renames (old aside as
`.<name>.old-XXXXXXXX`, new in); a crash between them leaves the old version beside the target, and
`recover_folder` (run by every later write to the same target and by `hf_ptq.verify`) puts it back. Leftover
staging folders of crashed writers are deleted; those of live writers (they hold a lock on their staging folder,
see `locks.py`) are left alone. The final check of the target and the swap hold the parent folder's
lock, so of two writers with `overwrite=False` exactly one succeeds and the other gets FileExistsError.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .locks import FolderLock, is_abandoned, locked
from .rename import exchange, fsync_path, fsync_tree, rename_noreplace
from .targets import check_output_folder, check_replaceable, check_swappable

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-[a-z0-9_]{8}$")


def _leftovers(target: Path) -> Iterator[tuple[str, Path]]:
    """(kind, path) of the staging ("partial") and set-aside ("old") folders of writes to `target`."""
    for entry in os.scandir(target.parent):
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == target.name and entry.is_dir(follow_symlinks=False):
            yield match["kind"], Path(entry.path)


def _recover_locked(target: Path) -> list[str]:
    actions = []
    for kind, path in sorted(_leftovers(target)):
        if kind == "old" and not os.path.lexists(target):
            os.rename(path, target)
            actions.append(f"restored {target} from {path.name}, left by a write that was interrupted")
        elif kind == "old" or is_abandoned(path):
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed {path.name}, left by a write that was interrupted")
    return actions


def recover_folder(target: str | os.PathLike) -> list[str]:
    """Repair what interrupted writes left beside `target`: put a set-aside old version back when `target` is
    missing, delete the rest (but the staging folders of live writers). Returns what was done, one line each."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    if not target.parent.is_dir() or not any(True for _ in _leftovers(target)):
        return []
    with locked(target.parent):
        return _recover_locked(target)


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link `src` as `dst` (no data copied), or copy it where links are not possible."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


def _carry_over(old: Path, new: Path, superseded: Callable[[str], bool]) -> None:
    """Bring into `new` every entry of `old` that `new` does not have and that is not `superseded` by it."""
    written = set(os.listdir(new))
    for entry in os.scandir(old):
        if entry.name in written or superseded(entry.name):
            continue
        dst = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(dst))


def _swap_in(staging: Path, target: Path) -> None:
    """Put `staging` at the existing folder `target` and delete the old version."""
    if exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # the old version is now at the staging path
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _commit(staging: Path, target: Path, overwrite: bool, field: str, superseded: Callable[[str], bool] | None) -> None:
    """Move the complete `staging` into place; holds the parent's lock."""
    check_swappable(target, field)
    if superseded is None:
        check_replaceable(target, overwrite, field)  # again: another writer may have finished meanwhile
    elif os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(f"{field}={str(target)!r} is a file, not a folder: choose another {field}.")
    if not os.path.lexists(target):
        rename_noreplace(staging, target)
        return
    if superseded is not None:
        _carry_over(target, staging, superseded)
        fsync_tree(staging)
    _swap_in(staging, target)


@contextmanager
def staged_folder(
    target: str | os.PathLike,
    overwrite: bool = False,
    field: str = "out",
    *,
    superseded: Callable[[str], bool] | None = None,
) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; when the block ends without an exception, its content
    becomes `target` (see the module docstring); on any exception, KeyboardInterrupt included, it is deleted and
    `target` is left as it was.

    `overwrite` allows replacing an existing folder that holds a model (see `targets.check_output_folder`). With
    `superseded` (a predicate on file names) the target is updated as `save_pretrained` updates a folder: entries of
    the old version that the new one does not write and that are not `superseded` are kept (hard-linked, not
    copied), whatever they are.
    """
    given = Path(target).expanduser()  # errors name the path as given
    target = check_output_folder(given, overwrite, field) if superseded is None else check_swappable(given, field)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    with locked(target.parent):  # created and locked in one step, so a concurrent clean-up never takes it
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        own = FolderLock(staging)
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        fsync_tree(staging)
        with locked(target.parent):
            _commit(staging, target, overwrite, field, superseded)
        fsync_path(target.parent)
    finally:
        own.release()
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)

"""Writing output folders safely: everything goes to a staging folder beside the target, renamed into place only
when complete, so an error or Ctrl-C never leaves a partial or corrupted output folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_folder(target: str | os.PathLike, overwrite: bool = False, field: str = "out") -> Path:
    """`target` as a Path; raises FileExistsError naming `field` when it holds files and `overwrite` is False."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{field}={str(target)!r} is a file, not a folder: choose another {field}.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{field}={str(target)!r} exists and is not empty: pass overwrite (--overwrite) or choose another {field}."
        )
    return target


@contextmanager
def staged_folder(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it becomes `target` by rename (an existing
    `target` is replaced only then, with `overwrite`); on any exception, KeyboardInterrupt included, it is deleted
    and `target` is left as it was."""
    target = check_output_folder(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-partial-", dir=target.parent))
    try:
        yield staging
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

"""Warnings said once: the first of identical warnings is logged, repeats are only counted, and
`report_repeated_warnings()` (or leaving `repeated_warnings_reported()`) at the end of a run logs each repeated one
once more with "(said N times)". Pure Python; thread-safe."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_said: dict[tuple[str, str], int] = {}  # (logger name, formatted message) -> times said since the last report
_lock = threading.Lock()


def warn_once(logger: logging.Logger, msg: str, *args: object) -> None:
    """`logger.warning(msg, *args)` the first time this exact message is said since the last report; then count it."""
    text = msg % args if args else msg
    with _lock:
        count = _said[logger.name, text] = _said.get((logger.name, text), 0) + 1
    if count == 1:
        logger.warning(text)


def report_repeated_warnings() -> dict[str, int]:
    """Log every warning said more than once since the last report, with its count; forget them all. Returns
    {message: count} of the repeated ones."""
    with _lock:
        said = dict(_said)
        _said.clear()
    repeated: dict[str, int] = {}
    for (name, text), count in said.items():
        if count > 1:
            logging.getLogger(name).warning("%s (said %d times)", text, count)
            repeated[text] = count
    return repeated


def forget_warnings() -> None:
    """Forget what was said, without reporting (a new run, or a test, starts clean)."""
    with _lock:
        _said.clear()


@contextmanager
def repeated_warnings_reported() -> Iterator[None]:
    """A run: its repeated warnings are counted and reported when it ends (also when it raises)."""
    try:
        yield
    finally:
        report_repeated_warnings()

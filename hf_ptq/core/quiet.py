"""Silence specific, known-misleading log records of a library (transformers by default) for a block of code."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager


class MessageFilter(logging.Filter):
    """Drops the records whose message matches `pattern`, counting them in `dropped`."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern, self.dropped, self._last = re.compile(pattern), 0, None

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(record.getMessage()):
            return True
        if record is not self._last:  # a record meets the filter on its logger and on each handler
            self.dropped, self._last = self.dropped + 1, record
        return False


@contextmanager
def quiet_transformers_warnings(pattern: str, logger: str = "transformers") -> Iterator[MessageFilter]:
    """Inside the block, drop the records of `logger` and its children whose message matches the regex `pattern`;
    everything else passes. Yields the filter (`.dropped` counts what it dropped)."""
    drop = MessageFilter(pattern)
    # A logger's filter sees only records made by that logger, so filter the existing child loggers and the
    # handlers that records of later-created children reach (the library's own handler and the root's).
    loggers = [logging.getLogger(logger)] + [
        item
        for name, item in list(logging.root.manager.loggerDict.items())
        if name.startswith(f"{logger}.") and isinstance(item, logging.Logger)
    ]
    handlers = {*loggers[0].handlers, *logging.getLogger().handlers}
    targets = [*loggers, *handlers]
    for target in targets:
        target.addFilter(drop)
    try:
        yield drop
    finally:
        for target in targets:
            target.removeFilter(drop)

"""Declaring options once: a frozen dataclass per method (or pipeline stage), each field with its check and help.

A field made with `option(default, check, allowed, help)` carries what a config needs to validate it and what the
CLI and docs need to describe it; `Options.__post_init__` runs the checks, so an options object that exists is
valid. A failed check raises `InvalidOption`, whose `detail` reads `"<field>=<value> is invalid: ..."`; the config
that built the options puts its own name in front (`PtqConfig.grid=0 is invalid: ...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


class InvalidOption(ValueError):
    """A field's value failed its check; `detail` is the message without the owner's name in front."""

    def __init__(self, field: str, value: Any, allowed: str | None = None, detail: str | None = None) -> None:
        self.field, self.value = field, value
        self.detail = detail or f"{field}={value!r} is invalid: {field} must be {allowed}."
        super().__init__(self.detail)

    def owned_by(self, owner: str) -> ValueError:
        """The ValueError a config raises: `"<owner>.<detail>"`."""
        return ValueError(f"{owner}.{self.detail}")


def option(default: Any, check: Callable[[Any], bool], allowed: str, help: str) -> Any:
    """A dataclass field: `check(value)` is True for accepted values; `allowed` completes "<field> must be ..."."""
    return dataclasses.field(default=default, metadata={"check": check, "allowed": allowed, "help": help})


def switch(default: bool, help: str) -> Any:
    """An `option` that is True or False (the CLI gives it `--name / --no-name`)."""
    return option(default, is_bool, "True or False", help)


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of the options dataclasses: every field declared with `option` is checked at construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata["check"](value):
                raise InvalidOption(f.name, value, f.metadata["allowed"])


def option_names(cls: type[Options] | None) -> tuple[str, ...]:
    """The field names of an options dataclass (none for None)."""
    return () if cls is None else tuple(f.name for f in dataclasses.fields(cls))


def option_field(cls: type[Options], name: str) -> dataclasses.Field:
    """The declaration of field `name` of `cls` (default, and `check` / `allowed` / `help` in its metadata)."""
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""Tests that need an optional extra say so: `@pytest.mark.extra("hqq")` (or `require_extra("hqq")` inside a test)
skips with the install command when the extra is missing, the end of the run counts those skips per extra, and
HF_PTQ_REQUIRE_EXTRAS=1 (CI) turns them into failures, so a run cannot lose tests silently.

A pytest plugin without torch or hf_ptq imports: tests/conftest.py imports its hooks."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections import Counter
from types import ModuleType

import pytest

# extra of pyproject.toml -> the modules it provides (what the tests import)
EXTRAS: dict[str, tuple[str, ...]] = {
    "bnb": ("bitsandbytes",),
    "hqq": ("hqq",),
    "finetune": ("peft", "bitsandbytes"),
    "plot": ("matplotlib",),
    "gguf": ("gguf",),
    "datasets": ("datasets",),
    "compressed-tensors": ("compressed_tensors",),
}
REQUIRE_ENV = "HF_PTQ_REQUIRE_EXTRAS"
_MISSING = re.compile(r"extra '([\w-]+)' not installed")


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be found (an unknown extra is a bug in the test, not a skip)."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}: one of {sorted(EXTRAS)}")
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def install_hint(extra: str) -> str:
    return f"extra '{extra}' not installed (pip install -e '.[{extra}]')"


def require_extra(extra: str, module: str | None = None) -> ModuleType | None:
    """Skip the calling test (fail under HF_PTQ_REQUIRE_EXTRAS=1) unless `extra` is installed; return `module`."""
    missing = missing_modules(extra)
    if missing:
        hint = f"{install_hint(extra)}: no {', '.join(missing)}"
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{hint}, and {REQUIRE_ENV}=1 forbids skipping", pytrace=False)
        pytest.skip(hint)
    return importlib.import_module(module) if module else None


def import_optional(module: str) -> ModuleType | None:
    """`module`, or None where it is missing: for a module-level import in a file marked with its extra."""
    return importlib.import_module(module) if importlib.util.find_spec(module) is not None else None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "extra(name, ...): needs the optional extra(s) `name` of pyproject.toml")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("extra"):
        for extra in mark.args:
            require_extra(extra)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line per missing extra: how many tests it skipped (or failed) and the command that installs it."""
    counts: Counter[tuple[str, str]] = Counter()
    for outcome in ("skipped", "failed", "error"):  # a failure in setup (the marker) is an error
        for report in terminalreporter.stats.get(outcome, []):
            text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
            if found := _MISSING.match(text.removeprefix("Skipped: ")):  # our message, not one that quotes it
                counts["skipped" if outcome == "skipped" else "failed", found.group(1)] += 1
    for (outcome, extra), n in sorted(counts.items()):
        terminalreporter.write_line(f"{n} test{'s' * (n != 1)} {outcome}: {install_hint(extra)}", yellow=True)
    if counts and os.environ.get(REQUIRE_ENV, "") in ("", "0"):
        terminalreporter.write_line(f"({REQUIRE_ENV}=1 makes these fail instead of skipping)")

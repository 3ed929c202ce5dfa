"""Registry of quantization algorithms: a dict of `MethodSpec` and a decorator that fills it.

A method is a function of a weight (and, for calibrated methods, collected statistics) that returns a
`QuantizedWeight`. Methods do no module surgery and no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_METHODS: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    """What the config and the quantizer need to know about one method."""

    name: str
    quantize_weight: Callable[..., Any]
    summary: str
    needs_calibration: bool = False
    forced_fields: dict[str, Any] = field(default_factory=dict)


def register_method(name: str, summary: str, needs_calibration: bool = False, **forced_fields: Any):
    """Decorator: register `fn(weight [out, in], config) -> QuantizedWeight` under `name`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _METHODS[name] = MethodSpec(name, fn, summary, needs_calibration, dict(forced_fields))
        return fn

    return wrap


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def method_spec(name: str) -> MethodSpec:
    _load_builtin()
    return _METHODS[name]


def _load_builtin() -> None:
    from . import rtn  # noqa: F401  (registers rtn and int8)

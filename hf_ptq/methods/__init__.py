"""Registry of quantization algorithms: a dict of `MethodSpec` and a decorator that fills it.

A method is a function of a weight (and, for calibrated methods, collected statistics) that returns a
`QuantizedWeight` (weight-only methods, configured by `PtqConfig`) or a `W8A8Weight` (methods that quantize
activations too, configured by their own config, e.g. `SmoothQuantConfig`). Methods do no module surgery and no
I/O. A calibrated method names the statistics it needs: a class built as `statistics(in_features)` whose
`add_batch(x [..., in])` the pipeline calls with the inputs of the Linears it will quantize; the method is then
called as `fn(weight [out, in], config, stats)`.

A method that rescales input channels (AWQ, SmoothQuant) also gives `smooth(weight [out, in], config, stats) -> s [in]
| None`. The pipeline calls it for each group of Linears sharing an input whose producer can take the scale (see
`pipeline/families.py`), folds `1/s` into that producer, calls `stats.rescale(s)` (the statistics then describe the
inputs `x / s`) and quantizes `weight * s`.

A method wrapped from another library says so: `requires=(import name, hf-ptq extra)` names the package it needs to
quantize, and `backend` names the library whose own modules hold the weights (bitsandbytes: its `Linear4bit` /
`Linear8bitLt`, which also need the package to run); `backend=None` means hf_ptq's packed `QuantLinear`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_METHODS: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    """What the config and the quantizer need to know about one method."""

    name: str
    quantize_weight: Callable[..., Any] | None  # None for methods run by a backend's own quantizer (bitsandbytes)
    summary: str
    needs_calibration: bool = False
    forced_fields: dict[str, Any] = field(default_factory=dict)
    statistics: Callable[[int], Any] | None = None  # calibrated methods: per-input statistics accumulator
    fields: tuple[str, ...] = ()  # method-specific PtqConfig fields this method reads (e.g. GPTQ's desc_act)
    smooth: Callable[..., Any] | None = None  # per-input-channel scale search (AWQ, SmoothQuant), see above
    activations: bool = False  # quantizes activations too (W8A8): not a `PtqConfig` method
    uncalibrated: Callable[..., Any] | None = None  # `fn(weight, config)` for layers no calibration input reached
    defaults: dict[str, Any] = field(default_factory=dict)  # shared fields whose default differs for this method
    check: Callable[[Any], None] | None = None  # extra validation of a PtqConfig (raises ValueError naming the field)
    requires: tuple[str, str] | None = None  # (import name, hf-ptq extra) of the package needed to quantize
    backend: str | None = None  # library whose modules hold the weights; None: hf_ptq's QuantLinear
    float_zero_point: bool = False  # zero points are floats (HQQ), stored unpacked in the model's dtype


def register_method(
    name: str,
    summary: str,
    needs_calibration: bool = False,
    statistics: Callable[[int], Any] | None = None,
    fields: tuple[str, ...] = (),
    *,
    smooth: Callable[..., Any] | None = None,
    activations: bool = False,
    uncalibrated: Callable[..., Any] | None = None,
    defaults: dict[str, Any] | None = None,
    check: Callable[[Any], None] | None = None,
    requires: tuple[str, str] | None = None,
    backend: str | None = None,
    float_zero_point: bool = False,
    **forced_fields: Any,
):
    """Decorator: register `fn(weight [out, in], config[, stats]) -> QuantizedWeight | W8A8Weight` under `name`."""

    def wrap(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        _METHODS[name] = MethodSpec(
            name,
            fn,
            summary,
            needs_calibration,
            dict(forced_fields),
            statistics,
            tuple(fields),
            smooth,
            activations,
            uncalibrated,
            dict(defaults or {}),
            check,
            requires,
            backend,
            float_zero_point,
        )
        return fn

    return wrap


def method_names() -> list[str]:
    """The weight-only methods (`PtqConfig.method`)."""
    _load_builtin()
    return sorted(n for n, spec in _METHODS.items() if not spec.activations)


def method_spec(name: str) -> MethodSpec:
    _load_builtin()
    return _METHODS[name]


def require_package(spec: MethodSpec) -> None:
    """Raise ImportError naming the extra to install when the package `spec` needs is missing."""
    if spec.requires is None:
        return
    package, extra = spec.requires
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"PtqConfig(method={spec.name!r}) needs the `{package}` package, which is not installed. "
            f'Install it with: pip install "hf-ptq[{extra}]"'
        )


def _load_builtin() -> None:
    from . import awq, bnb, gptq, hqq, rtn, smoothquant  # noqa: F401  (registers awq, nf4/fp4/llm_int8, gptq, hqq, rtn,
    # int8 and smoothquant)

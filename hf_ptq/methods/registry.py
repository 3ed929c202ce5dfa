"""The registry of quantization methods: `MethodSpec`, the `register_method` decorator that each method module
uses to fill `METHODS`, and the check that a wrapped method's package is installed (see `hf_ptq.methods`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.install import extra_install
from ..core.options import Options, option_names

METHODS: dict[str, MethodSpec] = {}  # filled by `register_method` as each method module is imported


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """What the config and the quantizer need to know about one method."""

    name: str
    summary: str
    # `fn(weight, scheme, options)`, for calibrated methods `fn(weight, scheme, options, stats)` with `stats=None`
    # for layers no calibration input reached (the method's own fallback, RTN for the ones here); None for methods
    # run by a backend's own quantizer (bitsandbytes)
    quantize_weight: Callable[..., Any] | None
    options: type[Options] | None = None  # the method's own options (e.g. `GPTQOptions`); None: it has none
    statistics: Callable[[int], Any] | None = None  # calibrated methods: per-input statistics accumulator
    smooth: Callable[..., Any] | None = None  # `fn(weight, scheme, options, stats)`, per-input-channel scale search
    forced_fields: dict[str, Any] = field(default_factory=dict)  # `WeightScheme` fields this method fixes
    defaults: dict[str, Any] = field(default_factory=dict)  # `WeightScheme` defaults that differ for this method
    full_range: bool = False  # accepts `WeightScheme.full_range=True`
    check: Callable[[Any], None] | None = None  # extra validation of a PtqConfig (ValueError naming the field)
    activations: bool = False  # quantizes activations too (W8A8): not a `PtqConfig` method
    requires: tuple[str, str] | None = None  # (import name, hf-ptq extra) of the package needed to quantize
    backend: str | None = None  # library whose modules hold the weights; None: hf_ptq's QuantLinear
    float_zero_point: bool = False  # zero points are floats (HQQ), stored unpacked in the model's dtype
    mixed_precision: bool = False  # takes per-layer schemes (`target_bits`, `layer_schemes`: core.bit_budget)
    bit_widths: tuple[int, ...] | None = None  # the bits it quantizes to; None: every `WeightScheme` width

    @property
    def needs_calibration(self) -> bool:
        return self.statistics is not None

    def quantize_without_statistics(self, weight: Any, scheme: Any, options: Any) -> Any:
        """The method's rounding with no calibration statistics: a calibrated method's own fallback (`stats=None`),
        or an uncalibrated method itself."""
        if self.needs_calibration:
            return self.quantize_weight(weight, scheme, options, None)
        return self.quantize_weight(weight, scheme, options)

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the method's own options."""
        return option_names(self.options)


def register_method(name: str, **spec: Any) -> Callable[[Callable[..., Any] | None], Callable[..., Any] | None]:
    """Decorator: register `fn` (see `MethodSpec.quantize_weight`) under `name`, with the other `MethodSpec` fields
    given by keyword."""

    def wrap(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        METHODS[name] = MethodSpec(name=name, quantize_weight=fn, **spec)
        return fn

    return wrap


def require_package(spec: MethodSpec) -> None:
    """Raise ImportError naming the extra to install when the package `spec` needs is missing."""
    if spec.requires is None:
        return
    package, extra = spec.requires
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"PtqConfig(method={spec.name!r}) needs the `{package}` package, which is not installed. "
            f"Install it with: {extra_install(extra)}"
        )

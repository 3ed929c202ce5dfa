"""Round-to-nearest (RTN): min/max ranges per group, no calibration; and `int8`, EETQ-style weight-only int8."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.quant import QuantizedWeight, quantize
from .registry import register_method

if TYPE_CHECKING:
    from ..core.scheme import WeightScheme


@register_method(
    "rtn", summary="round-to-nearest with min/max ranges, no calibration data", full_range=True, mixed_precision=True
)
def rtn(weight: torch.Tensor, scheme: WeightScheme, options: None = None) -> QuantizedWeight:
    """Quantize weight [out, in] on the grid of `scheme` with min/max ranges."""
    return quantize(weight, scheme.bits, scheme.group_size, scheme.sym, full_range=scheme.full_range)


@register_method(
    "int8",
    summary="8-bit symmetric per-channel weights, as EETQ; runs on the int8 weight-only kernel",
    forced_fields={"bits": 8, "group_size": -1, "sym": True},
)
def int8(weight: torch.Tensor, scheme: WeightScheme, options: None = None) -> QuantizedWeight:
    """Per-output-channel symmetric int8: scale = max|w_row| / 127."""
    return quantize(weight, 8, -1, True)

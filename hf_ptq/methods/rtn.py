"""Round-to-nearest (RTN): min/max ranges per group, no calibration; and `int8`, EETQ-style weight-only int8."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.quant import QuantizedWeight, quantize
from . import register_method

if TYPE_CHECKING:
    from ..config import PtqConfig


@register_method("rtn", "round-to-nearest with min/max ranges, no calibration data", fields=("full_range",))
def rtn(weight: torch.Tensor, config: PtqConfig) -> QuantizedWeight:
    """Quantize weight [out, in] to `config.bits` with `config.group_size`, `config.sym` and `config.full_range`."""
    return quantize(weight, config.bits, config.group_size, config.sym, full_range=config.full_range)


@register_method(
    "int8",
    "8-bit symmetric per-channel weights, as EETQ; runs on the int8 weight-only kernel",
    bits=8,
    group_size=-1,
    sym=True,
)
def int8(weight: torch.Tensor, config: PtqConfig) -> QuantizedWeight:
    """Per-output-channel symmetric int8: scale = max|w_row| / 127."""
    return quantize(weight, 8, -1, True)

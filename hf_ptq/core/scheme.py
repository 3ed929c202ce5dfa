"""`WeightScheme`: the integer grid of a quantized weight, the plain data every method and module reads.

`bits` per value (5 and 6 are the grids of GGUF's Q5_0 / Q5_1 / Q5_K and Q6_K, so that a layer can be quantized
onto the type it is exported as); `group_size` input channels share one scale (and zero point): > 0 per group, -1 one
per output channel, 0 one per tensor; `sym`: no zero point; `full_range` (symmetric only): the grid of all 2^b
levels, with scale = signed extreme / -2^(b-1), as llama.cpp's Q4_0 (`hf_ptq.core.quant.compute_qparams`).
"""

from __future__ import annotations

import dataclasses

from .options import InvalidOption, Options, is_int, option, switch

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)


def _is_group_size(value: object) -> bool:
    return is_int(value) and value >= -1


@dataclasses.dataclass(frozen=True)
class WeightScheme(Options):
    bits: int = option(4, lambda v: is_int(v) and v in ALLOWED_BITS, "one of 2, 3, 4, 5, 6, 8", "weight bit width")
    group_size: int = option(
        128,
        _is_group_size,
        "a positive divisor of the layers' in_features (e.g. 32, 64, 128), -1 (per-channel) or 0 (per-tensor)",
        "input channels sharing one scale: > 0 per group, -1 per output channel, 0 per tensor",
    )
    sym: bool = switch(False, "symmetric (no zero point) when True")
    full_range: bool = switch(False, "symmetric grid of all 2^b levels, as llama.cpp's Q4_0 (needs sym=True)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.full_range and not self.sym:
            raise InvalidOption(
                "full_range",
                True,
                detail=f"full_range=True needs sym=True (got sym={self.sym!r}): the full-range grid is symmetric, "
                "with no zero point. Set sym=True or drop full_range.",
            )

    def describe(self) -> str:
        """e.g. `w4 g128 asym`, `w8 per-channel sym full-range`."""
        gran = {-1: "per-channel", 0: "per-tensor"}.get(self.group_size, f"g{self.group_size}")
        text = f"w{self.bits} {gran} {'sym' if self.sym else 'asym'}"
        return text + (" full-range" if self.full_range else "")

"""HQQ (Half-Quadratic Quantization, Badri & Shaji 2023), through the `hqq` package's own optimizer.

HQQ needs no calibration data: per group of input channels it starts from min/max ranges and refines the zero
point with a few proximal steps that minimise an l_p (p < 1) norm of the weight error, which favours outliers.
The result is plain asymmetric integers with float zero points, `w = (q_u - z) * s` (q_u unsigned), which hf_ptq
stores in its packed format and runs on its own kernels (4-bit: torch's int4 CPU kernel), so a saved HQQ model
needs neither the `hqq` package nor its modules to reload and run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..core.quant import QuantizedWeight
from .registry import register_method

if TYPE_CHECKING:
    from ..core.scheme import WeightScheme


def check_hqq(config: Any) -> None:
    if config.group_size == 0:
        raise ValueError(
            "PtqConfig.group_size=0 (per-tensor) is invalid for method='hqq': HQQ optimizes one zero point per group "
            "or per channel; use a group size such as 64, or -1 (per-channel)."
        )


@register_method(
    "hqq",
    summary="HQQ: zero points optimized against an l_p weight error, no calibration data",
    defaults={"group_size": 64},
    check=check_hqq,
    requires=("hqq", "hqq"),
    float_zero_point=True,
    forced_fields={"sym": False},
    mixed_precision=True,
    bit_widths=(2, 3, 4, 8),  # the widths hf_ptq packs HQQ's float zero points with (tested)
)
def hqq(weight: torch.Tensor, scheme: WeightScheme, options: None = None) -> QuantizedWeight:
    """Quantize weight [out, in] with HQQ's optimizer (`hqq.core.quantize.Quantizer`, its default settings).

    Returns signed q int8 [out, in], scale and float zero point [out, groups] in hf_ptq's convention
    `w = (q - zero_point) * scale`: `q = q_u - 2^(b-1)`, `zero_point = z - 2^(b-1)`.
    """
    from hqq.core.quantize import Quantizer

    out_f, in_f = weight.shape
    group = in_f if scheme.group_size == -1 else scheme.group_size
    q_u, meta = Quantizer.quantize(
        weight,
        nbits=scheme.bits,
        channel_wise=True,
        group_size=group,
        optimize=True,
        round_zero=scheme.bits == 4,  # hqq's own default (`hqq_base_quant_config`)
        axis=1,
        bitpack=False,
        device=weight.device,
    )
    offset = 1 << (scheme.bits - 1)
    groups = in_f // group
    q = (q_u.reshape(out_f, in_f).float() - offset).to(torch.int8)
    scale = meta["scale"].reshape(out_f, groups).to(weight.dtype)
    zero_point = (meta["zero"].float() - offset).reshape(out_f, groups).to(weight.dtype)
    return QuantizedWeight(q, scale, zero_point, scheme.bits, scheme.group_size)

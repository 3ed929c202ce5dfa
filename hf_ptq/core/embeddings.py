"""Quantized embeddings: the formats `embeddings=` names, their grid, and rows quantized and packed in chunks.

`"int8"`: 8-bit symmetric, one scale per row (vocabulary entry / output channel), integers in [-127, 127].
`"int4"`: 4-bit, one scale (and zero point unless symmetric) per group of input channels along the hidden
dimension. The group is the config's `group_size` when it is positive and divides the hidden size, else the largest
of 128, 64, 32 that divides it (every one of them runs on the packed int4 CPU kernel), else one per row. Symmetric
when the config is (`sym=True`, SmoothQuant), else asymmetric as the config's other layers are.

Rows are independent (no per-tensor granularity), so a [vocab, hidden] matrix is quantized `CHUNK_ELEMENTS` at a
time: the fp32 working copies of a 128256 x 4096 embedding are never held whole (measurement: docs/kernels.md,
"Measurements behind the code").
"""

from __future__ import annotations

import torch

from .packing import pack_int32, packed_width
from .quant import quantize
from .scheme import WeightScheme

EMBEDDING_FORMATS = ("int8", "int4")
_INT4_GROUPS = (128, 64, 32)
CHUNK_ELEMENTS = 1 << 20  # values quantized at a time (4 MB in fp32)


def embedding_scheme(fmt: str, hidden: int, group_size: int, sym: bool) -> WeightScheme:
    """The grid `fmt` ("int8" / "int4") gives rows of `hidden` values, with the config's `group_size` and `sym`."""
    if fmt == "int8":
        return WeightScheme(8, -1, True)
    if fmt != "int4":
        raise ValueError(f"embeddings={fmt!r} is not one of {', '.join(map(repr, EMBEDDING_FORMATS))}")
    if group_size > 0 and hidden % group_size == 0:
        return WeightScheme(4, group_size, sym)
    return WeightScheme(4, next((g for g in _INT4_GROUPS if hidden % g == 0), -1), sym)


def pack_rows(weight: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """RTN-quantize `weight` [rows, hidden] with `scheme` and pack it as `QuantLinear` packs a Linear of
    (out, in) = (rows, hidden): `weight_packed`, `weight_scale` (in `scale_dtype`), `weight_zero_point` (asymmetric:
    packed along the rows) and `weight_shape`. The weight is rounded to `scale_dtype` first, so a weight streamed
    from a checkpoint in another dtype gives the same tensors as the model's own. Quantized `CHUNK_ELEMENTS` values
    at a time into the preallocated outputs: the working set stays a few MB above the packed result."""
    rows, hidden = weight.shape
    bits, group_size, sym = scheme.bits, scheme.group_size, scheme.sym
    groups = 1 if group_size == -1 else hidden // group_size
    kw = {"device": weight.device}
    packed = torch.empty(rows, packed_width(hidden, bits), dtype=torch.int32, **kw)
    scales = torch.empty(rows, groups, dtype=scale_dtype, **kw)
    zeros = None if sym else torch.empty(rows, groups, dtype=torch.int8, **kw)
    step = max(1, CHUNK_ELEMENTS // max(hidden, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        qw = quantize(weight[start:stop].to(scale_dtype), bits, group_size, sym, scale_dtype=scale_dtype)
        packed[start:stop] = pack_int32(qw.q, bits, dim=1)
        scales[start:stop] = qw.scale.to(scale_dtype)
        if zeros is not None:
            zeros[start:stop] = qw.zero_point
        del qw
    out = {
        "weight_packed": packed,
        "weight_scale": scales,
        "weight_shape": torch.tensor([rows, hidden], dtype=torch.int64, **kw),
    }
    if zeros is not None:
        out["weight_zero_point"] = pack_int32(zeros, bits, dim=0)
    return out

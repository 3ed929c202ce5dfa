"""Uniform integer quantization: scales, zero points, quantize and dequantize at three granularities.

Conventions (those of compressed-tensors): integers are signed, `q in [-2^(b-1), 2^(b-1)-1]`;
`w ≈ (q - zero_point) * scale`. Symmetric quantization has no zero point (it is 0); its grid is
`[-(2^(b-1)-1), 2^(b-1)-1]` (scale > 0, the level -2^(b-1) unused) or, `full_range`, all 2^b levels as llama.cpp's
Q4_0 uses them: the group's value of largest magnitude lands on -2^(b-1), so the scale is negative where that value
is positive. Granularity is set by `group_size`: `> 0` one scale per `group_size` input channels of each row, `-1`
one per row (output channel), `0` one for the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """A quantized 2-D weight before packing.

    Attributes:
        q: int8 [out, in], signed integers.
        scale: float [out, groups] (per-group/per-channel) or [1] (per-tensor).
        zero_point: int8 of the same shape as `scale`, or None when symmetric; float for methods that optimize
            zero points off the integer grid (HQQ).
        bits, group_size: as in `PtqConfig`.
        g_idx: int32 [in] group of each input channel when channels were reordered (act-order), else None.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero_point, self.group_size, self.g_idx, dtype)

    def rows(self, rows: slice) -> QuantizedWeight:
        """The output channels `rows`, each tensor with its own storage (they are saved separately)."""
        per_row = self.group_size != 0  # per-tensor qparams ([1]) are shared by all rows
        return QuantizedWeight(
            self.q[rows].clone(),
            (self.scale[rows] if per_row else self.scale).clone(),
            _clone(self.zero_point if not per_row or self.zero_point is None else self.zero_point[rows]),
            self.bits,
            self.group_size,
            _clone(self.g_idx),
        )

    def to(self, device: torch.device) -> QuantizedWeight:
        return QuantizedWeight(
            self.q.to(device),
            self.scale.to(device),
            _to(self.zero_point, device),
            self.bits,
            self.group_size,
            _to(self.g_idx, device),
        )


@dataclass
class W8A8Weight:
    """A Linear quantized for int8 x int8 matmuls (W8A8): its weight and how its input is quantized.

    Attributes:
        weight: int8 per-output-channel symmetric weight (bits 8, group_size -1, scale [out, 1]).
        input_scale: [1] static per-tensor scale of the input (`x ≈ q_x * input_scale`), or None for dynamic
            per-token scales computed on every call.
    """

    weight: QuantizedWeight
    input_scale: torch.Tensor | None = None

    def rows(self, rows: slice) -> W8A8Weight:
        """The output channels `rows`; the input scale is shared (the rows read the same input)."""
        return W8A8Weight(self.weight.rows(rows), _clone(self.input_scale))

    def to(self, device: torch.device) -> W8A8Weight:
        return W8A8Weight(self.weight.to(device), _to(self.input_scale, device))


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def qrange(bits: int) -> tuple[int, int]:
    """Smallest and largest signed integer of `bits` bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View w [out, in] as [out or 1, groups, members] for the given granularity."""
    out_f, in_f = w.shape
    if group_size == 0:
        return w.reshape(1, 1, -1)
    if group_size == -1:
        return w.reshape(out_f, 1, in_f)
    if in_f % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_f}")
    return w.reshape(out_f, in_f // group_size, group_size)


def compute_qparams(
    w_min: torch.Tensor,
    w_max: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype | None = None,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point covering [w_min, w_max] (fp32 tensors of any shape, elementwise).

    Symmetric: `scale = max|w| / (2^(b-1)-1)`; with `full_range`, `scale = m / -2^(b-1)` for the signed extreme m
    (w_max when |w_max| > |w_min|, else w_min), so m rounds to -2^(b-1) exactly and the step is max|w| / 2^(b-1)
    (negative when m > 0; a zero range gives the smallest positive scale). Asymmetric: the range is widened to
    include 0 so that zero is exactly representable, `scale = (max - min) / (2^b - 1)`,
    `zero_point = qmin - round(min / scale)`. With `scale_dtype`, the scale is first rounded to that dtype
    (`round_scale`) and the zero point computed from the rounded scale, so that both match what is stored.
    """
    qmin, qmax = qrange(bits)
    tiny = torch.finfo(torch.float32).tiny
    if full_range and not sym:
        raise ValueError("full_range applies to symmetric grids only (sym=True)")
    if sym:
        if full_range:
            extreme = torch.where(w_max.abs() > w_min.abs(), w_max, w_min)
            scale = extreme / qmin
            scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)
        else:
            scale = (torch.maximum(w_min.abs(), w_max.abs()) / qmax).clamp(min=tiny)
        return (scale if scale_dtype is None else round_scale(scale, scale_dtype)), None
    w_min = torch.minimum(w_min, torch.zeros_like(w_min))
    w_max = torch.maximum(w_max, torch.zeros_like(w_max))
    scale = ((w_max - w_min) / (qmax - qmin)).clamp(min=tiny)
    if scale_dtype is not None:
        scale = round_scale(scale, scale_dtype)
    zero_point = torch.clamp(qmin - torch.round(w_min / scale), qmin, qmax)
    return scale, zero_point.to(torch.int8)


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Round w [out, in] onto the grid given by scale / zero_point (shapes as in `QuantizedWeight`)."""
    qmin, qmax = qrange(bits)
    grouped = _grouped(w.float(), group_size)
    s = scale.float().reshape(grouped.shape[0], grouped.shape[1], 1)
    q = torch.round(grouped / s)
    if zero_point is not None:
        q = q + zero_point.float().reshape(s.shape)
    return torch.clamp(q, qmin, qmax).to(torch.int8).reshape(w.shape)


def round_onto(w: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """w [out, in] rounded onto the grid of `qw` (its scales, zero points, groups and act-order `g_idx`, integer or
    float zero points), as int8 [out, in]: how a changed weight (a merged LoRA delta) is stored in a layer that keeps
    its quantization parameters."""
    qmin, qmax = qrange(qw.bits)
    out_f, in_f = w.shape
    scale = qw.scale.float().reshape(1 if qw.group_size == 0 else out_f, -1)
    zero = None if qw.zero_point is None else qw.zero_point.float().reshape(scale.shape)
    if qw.g_idx is not None:
        columns = qw.g_idx.long()
    else:
        members = in_f if qw.group_size in (0, -1) else qw.group_size
        columns = torch.arange(in_f, device=w.device) // members
    q = w.float() / scale[:, columns]
    q = q.round_() if zero is None else q.add_(zero[:, columns]).round_()
    return q.clamp_(qmin, qmax).to(torch.int8)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The values `quantize_with` + `dequantize` give, in fp32, without the integer tensors: w (fp32) rounded onto
    the grid of `scale` / `zero_point` (each broadcastable to w). For range and scale searches over candidates."""
    qmin, qmax = qrange(bits)
    q = torch.round(w / scale)
    if zero_point is not None:
        z = zero_point.float()
        q = q.add_(z).clamp_(qmin, qmax).sub_(z)
    else:
        q = q.clamp_(qmin, qmax)
    return q.mul_(scale)


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 value of `scale` once stored in `dtype`, so rounding uses the scale that is saved: its magnitude kept
    at least `dtype`'s smallest normal, its sign kept (full-range grids have negative scales)."""
    magnitude = scale.to(dtype).abs().clamp(min=torch.finfo(dtype).tiny)
    return torch.where(scale < 0, -magnitude, magnitude).float()


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype | None = None,
    full_range: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest quantization of w [out, in] with min/max ranges (the RTN baseline).

    `scale_dtype` (default: w's dtype when floating) is the dtype the scales will be stored in; `full_range`: the
    symmetric grid of all 2^b levels (`compute_qparams`).
    """
    grouped = _grouped(w.float(), group_size)
    scale_dtype = scale_dtype or (w.dtype if w.is_floating_point() else torch.float32)
    scale, zero_point = compute_qparams(grouped.amin(-1), grouped.amax(-1), bits, sym, scale_dtype, full_range)
    if group_size == 0:
        scale = scale.reshape(1)
        zero_point = None if zero_point is None else zero_point.reshape(1)
    q = quantize_with(w, scale, zero_point, bits, group_size)
    return QuantizedWeight(q, scale, zero_point, bits, group_size)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(q - zero_point) * scale as a [out, in] tensor of `dtype`; `g_idx` maps input channels to groups."""
    out_f, in_f = q.shape
    s = scale.to(torch.float32)
    z = None if zero_point is None else zero_point.to(torch.float32)
    if group_size == 0:
        s = s.reshape(1, 1).expand(out_f, 1)
        z = None if z is None else z.reshape(1, 1).expand(out_f, 1)
    if g_idx is not None:
        idx = g_idx.long()
        s_full = s[:, idx]
        qf = q.float() if z is None else q.float() - z[:, idx]
        return (qf * s_full).to(dtype)
    members = in_f if group_size in (0, -1) else group_size
    qf = q.float().reshape(out_f, -1, members)
    if z is not None:
        qf = qf - z.unsqueeze(-1)
    return (qf * s.unsqueeze(-1)).reshape(out_f, in_f).to(dtype)

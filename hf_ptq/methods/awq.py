"""AWQ (Lin et al., 2023): activation-aware per-channel scales, then clipped round-to-nearest.

A few input channels carry much larger activations than the rest; their weights matter more. AWQ multiplies those
weight columns by s > 1 before rounding (relatively less rounding error where it counts) and divides the input by s
(folded into the producing norm or Linear by the pipeline, so the float model is unchanged). s is searched on a
grid: `s = mean|x|^α / mean|ŵ|^(1-α)` ("duo scaling", ŵ = |W| normalised per group) or `s = mean|x|^α`, for
`grid` values of α in [0, 1), keeping the s with the smallest output error of the group's Linears over every
calibration token, `Σ_t ||W x_t - Q(W s) (x_t / s)||² = tr(D XXᵀ Dᵀ)` with `D = W - Q(W s) / s`. With the inputs'
Gram matrix `XXᵀ` (accumulated like GPTQ's Hessian) each candidate costs one [out, in] x [in, in] product, whatever
the number of tokens. s = 1 (no scaling) is always a candidate, so the search never does worse than it on this
objective. Then (`clip`) each group's range is shrunk to the factor in {1, 0.95, ..., 0.55} with the smallest
output error over the same inputs (the group's block of the Gram matrix), and the weight is rounded. `full_range`
(symmetric only) uses the grid of all 2^b levels throughout: in the scale search, the clipping and the rounding.
"""

from __future__ import annotations

import torch

from ..core.clip_search import clipped_qparams
from ..core.quant import QuantizedWeight, compute_qparams, fake_quantize, quantize, quantize_with
from ..core.scheme import WeightScheme
from .gptq import GPTQ
from .options import AWQOptions
from .registry import register_method

_MIN_SCALE = 1e-4
_CLIP_MIN_SHRINK = 0.55  # AWQ's clipping candidates: 1, 0.95, ..., 0.55
_CLIP_STEPS = 9


class AWQStats(GPTQ):
    """The inputs' Gram matrix (as GPTQ's Hessian, `2/N Σ x xᵀ`, fp32 [in, in]) and mean magnitude per channel."""

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features)
        self._abs_sum: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None  # set by `rescale`

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features)
        super().add_batch(x)
        if self._abs_sum is None:
            self._abs_sum = torch.zeros(self.in_features, dtype=torch.float32, device=self._sum.device)
        self._abs_sum += x.to(self._abs_sum.device).abs().sum(0, dtype=torch.float32)

    @property
    def mean_abs(self) -> torch.Tensor | None:
        """mean |x| per input channel [in] (fp32), of the inputs as they are after `rescale`."""
        if self._abs_sum is None:
            return None
        mean = self._abs_sum / max(self.rows, 1)
        return mean if self._scale is None else mean / self._scale

    @property
    def hessian(self) -> torch.Tensor | None:
        h = super().hessian
        if h is None or self._scale is None:
            return h
        return h / (self._scale[:, None] * self._scale[None, :])

    def rescale(self, s: torch.Tensor) -> None:
        """From now on describe the inputs `x / s` (s [in] > 0, after the last `add_batch`)."""
        s = s.to(self._abs_sum.device, torch.float32)
        self._scale = s if self._scale is None else self._scale * s


def _output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(D H Dᵀ) for D = weight - approx ([out, in] fp32) and H [in, in]: the summed squared output error."""
    d = weight - approx
    return ((d @ hessian) * d).sum().item()


def _rounded(weight: torch.Tensor, s: torch.Tensor, scheme: WeightScheme, dtype: torch.dtype) -> torch.Tensor:
    """Q(W s) / s [out, in] fp32: W s stored in `dtype` (as the model will hold it), rounded with min/max ranges
    (the values `quantize` + `dequantize` give, without building the integer tensors)."""
    out_f, in_f = weight.shape
    members = {0: out_f * in_f, -1: in_f}.get(scheme.group_size, scheme.group_size)
    grouped = (weight * s).to(dtype).float().reshape(-1, members)
    scale, zero = compute_qparams(grouped.amin(1), grouped.amax(1), scheme.bits, scheme.sym, dtype, scheme.full_range)
    approx = fake_quantize(grouped, scale[:, None], None if zero is None else zero[:, None], scheme.bits)
    return approx.reshape(out_f, in_f).div_(s)


def _weight_profile(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """mean over rows of |W| normalised by each row's group maximum, per input channel [in] (duo scaling)."""
    out_f, in_f = weight.shape
    members = in_f if group_size <= 0 else group_size
    grouped = weight.abs().reshape(out_f, -1, members)
    normalised = grouped / grouped.amax(-1, keepdim=True).clamp(min=1e-12)
    return normalised.reshape(out_f, in_f).mean(0)


@torch.no_grad()
def search_scale(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mean_abs: torch.Tensor,
    scheme: WeightScheme,
    options: AWQOptions,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """The AWQ scale s [in] (fp32) for weight [out, in] (the stacked Linears of one input), and every candidate's
    output error (s = 1 first, then α = 0, 1/grid, ...).

    `hessian` [in, in] and `mean_abs` [in] describe the inputs; `dtype` is the dtype the scaled weight is stored in
    (default: weight's)."""
    dtype = dtype or weight.dtype
    w = weight.float()
    h = hessian.to(w.device, torch.float32)
    x_mean = mean_abs.to(w.device, torch.float32)
    w_mean = _weight_profile(w, scheme.group_size) if options.duo_scaling else None
    ones = torch.ones(w.shape[1], device=w.device)
    best, errors = ones, [_output_error(w, _rounded(w, ones, scheme, dtype), h)]
    for i in range(options.grid):
        alpha = i / options.grid
        s = x_mean.pow(alpha)
        if w_mean is not None:
            s = s / w_mean.pow(1 - alpha).clamp(min=_MIN_SCALE)
        s = s.clamp(min=_MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        errors.append(_output_error(w, _rounded(w, s, scheme, dtype), h))
        if errors[-1] < min(errors[:-1]):
            best = s
    return best, errors


def awq_smooth(weight: torch.Tensor, scheme: WeightScheme, options: AWQOptions, stats: AWQStats) -> torch.Tensor | None:
    """`MethodSpec.smooth` for AWQ: the searched scale s [in], or None when no scaling is best."""
    s, errors = search_scale(weight, stats.hessian, stats.mean_abs, scheme, options)
    return None if errors[0] <= min(errors[1:]) else s


def clipped_rtn(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Round weight [out, in] with each group's range shrunk to minimise its output error over inputs whose Gram
    matrix is `hessian` [in, in] (per-channel: the whole row; per-tensor scales are not searched)."""
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    gs = scheme.group_size
    if gs == 0:
        return quantize(weight, scheme.bits, gs, scheme.sym, dtype, scheme.full_range)
    w = weight.float()
    h = hessian.to(w.device, torch.float32)
    members = w.shape[1] if gs == -1 else gs
    scales, zeros = [], []
    for g in range(0, w.shape[1], members):
        cols = slice(g, g + members)
        scale, zero = clipped_qparams(
            w[:, cols],
            scheme.bits,
            scheme.sym,
            dtype,
            h[cols, cols],
            min_shrink=_CLIP_MIN_SHRINK,
            steps=_CLIP_STEPS,
            full_range=scheme.full_range,
        )
        scales.append(scale)
        zeros.append(zero)
    scale = torch.stack(scales, 1)
    zero = None if scheme.sym else torch.stack(zeros, 1)
    return QuantizedWeight(quantize_with(w, scale, zero, scheme.bits, gs), scale, zero, scheme.bits, gs)


@register_method(
    "awq",
    summary="AWQ: activation-aware per-channel scales folded into the producing op, then clipped rounding "
    "(Lin et al., 2023)",
    options=AWQOptions,
    statistics=AWQStats,
    smooth=awq_smooth,
    full_range=True,
    mixed_precision=True,
)
def awq(weight: torch.Tensor, scheme: WeightScheme, options: AWQOptions, stats: AWQStats | None) -> QuantizedWeight:
    """Quantize weight [out, in] (already multiplied by the AWQ scale) with clipped or min/max ranges (min/max when
    no calibration input reached the layer: `stats` None)."""
    if options.clip and stats is not None and stats.hessian is not None:
        return clipped_rtn(weight, stats.hessian, scheme)
    return quantize(weight, scheme.bits, scheme.group_size, scheme.sym, full_range=scheme.full_range)

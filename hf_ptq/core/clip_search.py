"""Clipping-range search: shrink a group's min/max range to where rounding hurts least.

Min/max ranges waste grid points on a few outlying weights. Scaling the range of each row of a group by a factor
p in [min_shrink, 1] clips those outliers but rounds every other weight on a finer grid; the best p per row is
the one with the smallest rounding error `Σ_j d_j (w_j - ŵ_j)²`, where d_j is the importance of input channel j
(for GPTQ, the Hessian diagonal: the mean square of that input, so the sum approximates the output error), or,
given the inputs' Gram matrix G of the group (`Σ_t x_t x_tᵀ` over its columns), the exact output error of the group
over those inputs, `(w - ŵ) G (w - ŵ)ᵀ` (AWQ's clipping objective). On a full-range symmetric grid (`full_range`)
the shrunk range is that of the signed extreme, which lands on -2^(b-1) at every factor.
"""

from __future__ import annotations

import torch

from .quant import compute_qparams, fake_quantize, qrange, round_scale


def clipped_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    importance: torch.Tensor | None = None,
    *,
    min_shrink: float = 0.75,
    steps: int = 25,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point [rows] for w [rows, n] (fp32) over the shrink factors `1, ..., min_shrink`
    (`steps + 1` of them, evenly spaced); `importance` [n] weights the squared error per column (None: uniform).
    Factor 1 (plain min/max) is always a candidate and wins ties, so the result is never worse than min/max on
    this objective. All candidates are evaluated at once ([steps + 1, rows, n] temporaries). `full_range`: the
    candidates are full-range symmetric grids (`compute_qparams`), scale = p * extreme / -2^(b-1).
    """
    factors = 1.0 - (1.0 - min_shrink) * torch.arange(steps + 1, device=w.device, dtype=torch.float32) / steps
    lo, hi = w.amin(1) * factors[:, None], w.amax(1) * factors[:, None]  # [candidates, rows]
    scale, zero = compute_qparams(lo, hi, bits, sym, scale_dtype, full_range)
    if full_range:
        scale = torch.cat([scale, _extreme_on_top(scale, bits, scale_dtype)])
    err = _error(w, scale, zero, bits, importance)
    best = torch.argmin(err, 0)  # first minimum: factor 1 on ties
    rows = torch.arange(w.shape[0], device=w.device)
    scale, zero = scale[best, rows], None if zero is None else zero[best, rows]
    if full_range:  # the least-squares scale of the chosen integers, where it is better still
        refit = round_scale(_least_squares_scale(w, scale, bits, importance), scale_dtype)
        pair = torch.stack([scale, refit])
        scale = pair[torch.argmin(_error(w, pair, None, bits, importance), 0), rows]
    return scale, zero


def _error(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, importance: torch.Tensor | None
) -> torch.Tensor:
    """Rounding error [candidates, rows] of w [rows, n] on each candidate grid (scale / zero [candidates, rows])."""
    diff = w - fake_quantize(w, scale[:, :, None], None if zero is None else zero[:, :, None], bits)  # [cand, rows, n]
    if importance is not None and importance.ndim == 2:
        return ((diff @ importance) * diff).sum(2)
    err = diff.square_()
    return err.sum(2) if importance is None else err @ importance


def _extreme_on_top(scale: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """The full-range candidates turned around: the signed extreme on 2^(b-1) - 1 instead of -2^(b-1) (the other
    side then reaches past the opposite extreme), for groups whose far side holds more weight."""
    qmin, qmax = qrange(bits)
    return round_scale(scale * (qmin / qmax), scale_dtype)


def _least_squares_scale(
    w: torch.Tensor, scale: torch.Tensor, bits: int, importance: torch.Tensor | None
) -> torch.Tensor:
    """Per row, the scale s minimising the weighted error of s * q for w's integers q on the grid `scale` [rows]."""
    qmin, qmax = qrange(bits)
    q = torch.round(w / scale[:, None]).clamp_(qmin, qmax)
    if importance is not None and importance.ndim == 2:
        num, den = ((w @ importance) * q).sum(1), ((q @ importance) * q).sum(1)
    else:
        weight = torch.ones_like(w) if importance is None else importance.expand_as(w)
        num, den = (weight * w * q).sum(1), (weight * q * q).sum(1)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), scale)

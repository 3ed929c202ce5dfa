"""SmoothQuant (Xiao et al., 2023): W8A8 with the activations' outlier channels moved into the weights.

LLM activations have a few input channels with values 10-100x larger than the rest; a per-token int8 scale set by
them rounds every other channel to a handful of levels. SmoothQuant divides each input channel j by a factor s_j
and multiplies the weight's input channel j by the same s_j, which leaves `x Wᵀ` unchanged:

    s_j = max|X_j|^α / max|W_j|^(1-α)        (max over calibration tokens / over the output channels)

α = 0.5 splits the range evenly; larger α moves more of it into the weights. The division by s is folded into
the operation producing x (a norm's weight or a preceding Linear's output rows; see `hf_ptq.pipeline`), so it
costs nothing at inference. Then the weight (times s) is quantized to int8 per output channel, by round-to-nearest
or by GPTQ, and the activations to int8: per token on every call (dynamic), or with one scale per tensor fixed
here from the calibration maximum, clipped where that lowers the rounding error (static).

With `alpha="auto"` α is chosen per group of Linears sharing an input, from `ALPHA_GRID`, as the one whose W8A8
output error `||X Wᵀ - Q(X / s) Q(W s)ᵀ||²` over a sample of the calibration rows is smallest (RTN weights, the
configured activation scheme).

The statistics (`SmoothQuantStats`) are the per-channel maxima |x| of each Linear input, a sample of its rows (for
the α search), and for GPTQ weights its Hessian; once the pipeline has folded s, `rescale(s)` makes them describe
the smoothed input x / s.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import torch

from ..core.quant import W8A8Weight, dequantize, qrange, quantize, quantize_with, round_scale
from .gptq import GPTQ, gptq
from .options import SmoothQuantOptions
from .registry import register_method

if TYPE_CHECKING:
    from ..core.scheme import WeightScheme

logger = logging.getLogger("hf_ptq")

_MIN_MAGNITUDE = 1e-5  # floor for channel maxima in the smoothing factors (a dead channel gets s = 1)
SAMPLE_ROWS = 512  # most calibration rows kept per input (α search, static scale clipping)
ALPHA_GRID = tuple(i / 10 for i in range(11))  # α candidates of `alpha="auto"`
CLIP_GRID = tuple(1 - i / 20 for i in range(11))  # static input range candidates, fractions of the calibration max


class SmoothQuantStats:
    """Per-input-channel max |x| (fp32 [in]) of the rows seen by `add_batch`, an evenly strided sample of at most
    `SAMPLE_ROWS` of those rows, and with `hessian=True` GPTQ's Hessian of them; `rescale(s)` switches all three to
    the smoothed input x / s."""

    def __init__(self, in_features: int, hessian: bool = False) -> None:
        self.in_features = in_features
        self.amax: torch.Tensor | None = None
        self._gptq = GPTQ(in_features) if hessian else None
        self._inv_s: torch.Tensor | None = None  # 1 / s of the smoothing applied so far
        self._sample: list[torch.Tensor] = []  # rows whose index (over all rows seen) is a multiple of _stride
        self._stride, self._seen, self._kept = 1, 0, 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold in the inputs x [..., in] (every row one token) of the unsmoothed layer."""
        if self._inv_s is not None:
            raise RuntimeError("SmoothQuantStats: add_batch after rescale; statistics must be complete first")
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        amax = x.abs().amax(0).float()
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self._keep_rows(x)
        if self._gptq is not None:
            self._gptq.add_batch(x)

    def _keep_rows(self, x: torch.Tensor) -> None:
        """Keep the rows of x whose overall index is a multiple of the stride; when more than `SAMPLE_ROWS` are kept,
        every other one is dropped and the stride doubles (the sample stays evenly spread over all rows)."""
        picked = x[(-self._seen) % self._stride :: self._stride].float()
        self._seen += x.shape[0]
        self._sample.append(picked)
        self._kept += picked.shape[0]
        while self._kept > SAMPLE_ROWS:
            rows = torch.cat(self._sample)[::2]
            self._sample, self._kept, self._stride = [rows], rows.shape[0], self._stride * 2

    def rescale(self, s: torch.Tensor) -> None:
        """From now on describe x / s (s fp32 [in] > 0): maxima amax / s, Hessian diag(1/s) H diag(1/s)."""
        inv = 1.0 / s.float().to(self.amax.device)
        self.amax = self.amax * inv
        self._inv_s = inv if self._inv_s is None else self._inv_s * inv

    @property
    def sample(self) -> torch.Tensor:
        """The kept calibration rows [r, in] fp32, of the (smoothed) input."""
        rows = torch.cat(self._sample) if self._sample else torch.zeros(0, self.in_features)
        return rows if self._inv_s is None else rows * self._inv_s

    @property
    def hessian(self) -> torch.Tensor | None:
        """GPTQ's Hessian [in, in] of the (smoothed) inputs, None without `hessian=True` or before any batch."""
        h = None if self._gptq is None else self._gptq.hessian
        if h is None or self._inv_s is None:
            return h
        return h * self._inv_s[:, None] * self._inv_s[None, :]


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] fp32 = act_amax^α / weight_amax^(1-α) for per-input-channel maxima of |x| and |W| (fp32 [in]).

    Channels where either maximum is zero (never active, or no weight) get s = 1: nothing to balance there.
    """
    act, w = act_amax.float(), weight_amax.float().to(act_amax.device)
    s = act.clamp(min=_MIN_MAGNITUDE).pow(alpha) / w.clamp(min=_MIN_MAGNITUDE).pow(1.0 - alpha)
    return torch.where((act > 0) & (w > 0), s, torch.ones_like(s))


def static_input_scale(act_amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1] per-tensor activation scale, `max|x| / 127` over calibration (fp32 value of its `dtype` rounding)."""
    return round_scale(act_amax.max().reshape(1) / qrange(8)[1], dtype)


@torch.no_grad()
def clipped_input_scale(weight: torch.Tensor, stats: SmoothQuantStats, dtype: torch.dtype) -> torch.Tensor:
    """[1] static activation scale: `static_input_scale` shrunk to the fraction of `CLIP_GRID` with the smallest
    rounding error on the sampled calibration rows X, each input channel weighted by the squared norm of the
    weight column it multiplies, `Σ_j ||W_j||² Σ_t (x_tj - Q(x)_tj)²` (a few extreme tokens otherwise set a range
    that leaves every other token a handful of levels; values beyond the range saturate)."""
    x = stats.sample.to(weight.device)
    importance = weight.float().square().sum(0)
    full = static_input_scale(stats.amax, torch.float32)
    best: tuple[float, torch.Tensor] | None = None
    for fraction in CLIP_GRID:
        scale = round_scale(full * fraction, dtype)
        x_q = dequantize(quantize_with(x, scale, None, 8, 0), scale, None, 0)
        error = ((x - x_q).square() @ importance).sum().item()
        if best is None or error < best[0]:
            best = (error, scale)
    return best[1]


def smooth(
    weight: torch.Tensor, scheme: WeightScheme, options: SmoothQuantOptions, stats: SmoothQuantStats
) -> torch.Tensor | None:
    """Smoothing factors s [in] for the stacked weights [out, in] of the Linears sharing one input."""
    if stats.amax is None:
        return None
    if options.alpha == "auto":
        return search_alpha(weight, stats, options.static)
    return smoothing_factors(stats.amax, weight.abs().amax(0).float(), options.alpha)


@torch.no_grad()
def search_alpha(weight: torch.Tensor, stats: SmoothQuantStats, static: bool) -> torch.Tensor:
    """s [in] for the α of `ALPHA_GRID` with the smallest W8A8 output error on the sampled calibration rows X:
    `||X Wᵀ - Q_a(X / s) Q_w(W s)ᵀ||²`, Q_w per-channel int8 RTN, Q_a per-token int8 (`static`: one scale for the
    tensor, from the calibration maximum)."""
    x, w = stats.sample.to(weight.device), weight.float()
    reference = x @ w.t()
    weight_amax = w.abs().amax(0)
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in ALPHA_GRID:
        s = smoothing_factors(stats.amax, weight_amax, alpha)
        w_q = quantize(w * s, 8, -1, True, torch.float32).dequantize()
        xs = x / s
        if static:
            scale = static_input_scale(stats.amax / s, torch.float32)
            x_q = dequantize(quantize_with(xs, scale, None, 8, 0), scale, None, 0)
        else:
            x_q = quantize(xs, 8, -1, True, torch.float32).dequantize()
        error = (x_q @ w_q.t() - reference).square().sum().item()
        if best is None or error < best[0]:
            best = (error, alpha, s)
    logger.debug("hf_ptq smoothquant: alpha=auto chose %.1f", best[1])
    return best[2]


def smoothquant(
    weight: torch.Tensor, scheme: WeightScheme, options: SmoothQuantOptions, stats: SmoothQuantStats | None
) -> W8A8Weight:
    """int8 weight (RTN or GPTQ, per output channel: `scheme`) and activation scheme for weight [out, in], already
    multiplied by the smoothing factors; `stats` describe the smoothed input (None: no calibration input reached
    the layer, `uncalibrated`)."""
    if stats is None or stats.amax is None:
        return uncalibrated(weight, scheme, options)
    qw = gptq(weight, scheme, options.gptq, stats) if options.gptq is not None else quantize(weight, 8, -1, True)
    if not options.static:
        return W8A8Weight(qw)
    return W8A8Weight(qw, clipped_input_scale(weight, stats, weight.dtype))


def uncalibrated(weight: torch.Tensor, scheme: WeightScheme, options: SmoothQuantOptions) -> W8A8Weight:
    """A layer no calibration input reached: RTN int8 weight, no smoothing; a static input scale of 1.0 (inputs
    up to 127 in magnitude), as nothing tells its range."""
    qw = quantize(weight, 8, -1, True)
    if not options.static:
        return W8A8Weight(qw)
    logger.warning("hf_ptq smoothquant: no calibration input reached a layer; its static input scale is set to 1.0")
    return W8A8Weight(qw, torch.ones(1, device=weight.device))


_SUMMARY = "SmoothQuant W8A8: int8 weights and activations, activation outliers folded into the weights"
_SHARED = {"options": SmoothQuantOptions, "activations": True, "smooth": smooth}
register_method("smoothquant", summary=_SUMMARY, statistics=SmoothQuantStats, **_SHARED)(smoothquant)
register_method(
    "smoothquant_gptq",
    summary=_SUMMARY + " (GPTQ weights)",
    statistics=partial(SmoothQuantStats, hessian=True),
    **_SHARED,
)(smoothquant)

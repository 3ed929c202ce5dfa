"""SmoothQuant (Xiao et al., 2023): W8A8 with the activations' outlier channels moved into the weights.

LLM activations have a few input channels with values 10-100x larger than the rest; a per-token int8 scale set by
them rounds every other channel to a handful of levels. SmoothQuant divides each input channel j by a factor s_j
and multiplies the weight's input channel j by the same s_j, which leaves `x Wᵀ` unchanged:

    s_j = max|X_j|^α / max|W_j|^(1-α)        (max over calibration tokens / over the output channels)

α = 0.5 splits the range evenly; larger α moves more of it into the weights. The division by s is folded into
the operation producing x (a norm's weight or a preceding Linear's output rows; see `hf_ptq.pipeline`), so it
costs nothing at inference. Then the weight (times s) is quantized to int8 per output channel, by round-to-nearest
or by GPTQ, and the activations to int8: per token on every call (dynamic), or with one scale per tensor fixed
here from the calibration maximum (static).

The statistics (`SmoothQuantStats`) are the per-channel maxima |x| of each Linear input, and for GPTQ weights its
Hessian; once the pipeline has folded s, `rescale(s)` makes them describe the smoothed input x / s.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import torch

from ..core.quant import W8A8Weight, qrange, quantize, round_scale
from . import register_method
from .gptq import GPTQ, gptq

if TYPE_CHECKING:
    from ..smoothquant_config import SmoothQuantConfig

logger = logging.getLogger("hf_ptq")

_MIN_MAGNITUDE = 1e-5  # floor for channel maxima in the smoothing factors (a dead channel gets s = 1)


class SmoothQuantStats:
    """Per-input-channel max |x| (fp32 [in]) of the rows seen by `add_batch`, and with `hessian=True` GPTQ's
    Hessian of the same rows; `rescale(s)` switches both to the smoothed input x / s."""

    def __init__(self, in_features: int, hessian: bool = False) -> None:
        self.in_features = in_features
        self.amax: torch.Tensor | None = None
        self._gptq = GPTQ(in_features) if hessian else None
        self._inv_s: torch.Tensor | None = None  # 1 / s of the smoothing applied so far

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
        if self._gptq is not None:
            self._gptq.add_batch(x)

    def rescale(self, s: torch.Tensor) -> None:
        """From now on describe x / s (s fp32 [in] > 0): maxima amax / s, Hessian diag(1/s) H diag(1/s)."""
        inv = 1.0 / s.float().to(self.amax.device)
        self.amax = self.amax * inv
        self._inv_s = inv if self._inv_s is None else self._inv_s * inv

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


def smooth(weight: torch.Tensor, config: SmoothQuantConfig, stats: SmoothQuantStats) -> torch.Tensor | None:
    """Smoothing factors s [in] for the stacked weights [out, in] of the Linears sharing one input."""
    if stats.amax is None:
        return None
    return smoothing_factors(stats.amax, weight.abs().amax(0).float(), config.alpha)


def smoothquant(weight: torch.Tensor, config: SmoothQuantConfig, stats: SmoothQuantStats) -> W8A8Weight:
    """int8 weight (RTN or GPTQ, per output channel) and activation scheme for weight [out, in], already multiplied
    by the smoothing factors; `stats` describe the smoothed input."""
    if stats.amax is None:
        return uncalibrated(weight, config)
    qw = gptq(weight, config, stats) if config.weight_method == "gptq" else quantize(weight, 8, -1, True)
    if config.activations == "dynamic":
        return W8A8Weight(qw)
    return W8A8Weight(qw, static_input_scale(stats.amax, weight.dtype))


def uncalibrated(weight: torch.Tensor, config: SmoothQuantConfig) -> W8A8Weight:
    """A layer no calibration input reached: RTN int8 weight, no smoothing; a static input scale of 1.0 (inputs
    up to 127 in magnitude), as nothing tells its range."""
    qw = quantize(weight, 8, -1, True)
    if config.activations == "dynamic":
        return W8A8Weight(qw)
    logger.warning("hf_ptq smoothquant: no calibration input reached a layer; its static input scale is set to 1.0")
    return W8A8Weight(qw, torch.ones(1, device=weight.device))


_SUMMARY = "SmoothQuant W8A8: int8 weights and activations, activation outliers folded into the weights"
register_method(
    "smoothquant",
    _SUMMARY,
    needs_calibration=True,
    statistics=SmoothQuantStats,
    activations=True,
    smooth=smooth,
    uncalibrated=uncalibrated,
)(smoothquant)
register_method(
    "smoothquant_gptq",
    _SUMMARY + " (GPTQ weights)",
    needs_calibration=True,
    statistics=partial(SmoothQuantStats, hessian=True),
    activations=True,
    smooth=smooth,
    uncalibrated=uncalibrated,
)(smoothquant)

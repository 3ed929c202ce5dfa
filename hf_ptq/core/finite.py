"""Refusing non-finite tensors before they are quantized.

One NaN or inf in a weight turns its group's scale (min/max, or a searched range) into NaN, and every value of the
group dequantizes to NaN: the model then emits garbage with no error. Every method's input weight is checked
(the calibration pipeline and `hf_ptq.quantize`: `require_finite_weight`; quantize-on-load: `NonFiniteWeights`,
raised once loading is done), so such a weight is refused with the layer's name and the count of bad values
instead. The calibration pipeline also checks the activations it hands from block to block
(`require_finite_activations`), which catches NaN/inf produced by other parameters (norms, embeddings) or by an
fp16 overflow.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class NonFiniteError(ValueError):
    """A weight or calibration activation holds NaN or inf values."""


_CHECK_ELEMENTS = 1 << 22  # values checked at a time: `isfinite` of a bf16 tensor holds about 7 bytes per value


def non_finite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±inf count) of a floating-point tensor; (0, 0) for other dtypes and meta tensors. Checked in
    slices of rows, so a large tensor (a 128256 x 4096 embedding) costs a few MB of temporaries, not several times
    its own size."""
    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return 0, 0
    if tensor.dim() == 0 or tensor.numel() <= _CHECK_ELEMENTS:
        parts = [tensor]
    else:
        parts = tensor.split(max(1, _CHECK_ELEMENTS // max(1, tensor[0].numel())))
    if all(bool(torch.isfinite(part).all()) for part in parts):
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def _counts_text(nans: int, infs: int, total: int) -> str:
    return f"{nans} NaN and {infs} inf value(s) (of {total})"


def require_finite_weight(weight: torch.Tensor, layer: str) -> None:
    """Raise NonFiniteError naming `layer` and the NaN / inf counts when `weight` is not finite."""
    nans, infs = non_finite_counts(weight)
    if nans or infs:
        raise NonFiniteError(
            f"hf_ptq: the weight of {layer} holds {_counts_text(nans, infs, weight.numel())}; quantizing it would make "
            f"its groups NaN. Repair the checkpoint, or keep the layer in full precision with "
            f"modules_to_not_convert=[{layer!r}]."
        )


def non_finite_names(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the (name, tensor) pairs whose tensor holds NaN or inf."""
    return [name for name, t in tensors if any(non_finite_counts(t))]


def require_finite_activations(
    hidden: list[torch.Tensor], where: str, suspects: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Raise NonFiniteError when the calibration hidden states `hidden` (one tensor per batch) coming out of
    `where` are not finite; the message names those of the (name, tensor) `suspects` that are not finite either
    (only scanned then), else blames an overflow."""
    counts = [non_finite_counts(h) for h in hidden]
    nans, infs = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if not (nans or infs):
        return
    bad = non_finite_names(suspects)
    cause = (
        f"these parameters are not finite: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}"
        if bad
        else "no parameter there is NaN/inf, so the values overflowed: load the model in bfloat16 or float32 "
        "(dtype=torch.bfloat16) rather than float16"
    )
    total = sum(h.numel() for h in hidden)
    raise NonFiniteError(
        f"hf_ptq: the calibration activations after {where} hold {_counts_text(nans, infs, total)}, so no "
        f"calibrated method can use them: {cause}."
    )


class NonFiniteWeights:
    """The non-finite weights met while quantizing on load, raised together once loading is done.

    An exception inside a transformers conversion op (quantize-on-load) does not reach the caller: transformers logs
    it, skips the tensor and, after the whole load, raises a generic RuntimeError. So the op calls `check` (which
    records the layer instead of raising) and the quantizer calls `raise_if_any` after loading: one NonFiniteError
    (a ValueError) naming every such layer and its counts.
    """

    def __init__(self) -> None:
        self.found: list[tuple[str, int, int, int]] = []  # (layer, NaN count, inf count, numel)

    def check(self, weight: torch.Tensor, layer: str) -> bool:
        """True when `weight` is finite; else records `layer` and returns False."""
        nans, infs = non_finite_counts(weight)
        if nans or infs:
            self.found.append((layer, nans, infs, weight.numel()))
        return not (nans or infs)

    def raise_if_any(self) -> None:
        """Raise NonFiniteError listing the recorded layers (then forget them), or do nothing."""
        if not self.found:
            return
        found, self.found = self.found, []
        layers = "; ".join(f"{layer}: {_counts_text(n, i, total)}" for layer, n, i, total in found)
        names = [layer for layer, *_ in found]
        raise NonFiniteError(
            f"hf_ptq: {len(found)} weight(s) hold NaN or inf values, which would make their quantized groups NaN "
            f"({layers}). Repair the checkpoint, or keep these layers in full precision with "
            f"modules_to_not_convert={names!r}."
        )

"""Every method's options, each a frozen dataclass of fields declared once with `core.options.option` (default,
check, allowed values, help), next to one another in a module without torch: the methods read them (`gptq(weight,
scheme, options, stats)`), `PtqConfig` / `SmoothQuantConfig` build them from their flat fields, and the CLI makes
its flags from them (`--desc-act / --no-desc-act`, ...) without importing torch. Which method takes which options
is said where the method is registered (`register_method(..., options=GPTQOptions)`)."""

from __future__ import annotations

import dataclasses

from ..core.options import InvalidOption, Options, is_number, is_positive_int, option, switch

# The scale search scores grid + 1 candidates per group of Linears, each one [out, in] x [in, in] product: 100 (α in
# steps of 0.01, 5x the default 20) is already finer than the output error can tell apart; larger grids only add time
# (10**6 would run for days).
MAX_AWQ_GRID = 100

ACTIVATIONS = ("dynamic", "static")
WEIGHT_METHODS = ("rtn", "gptq")
# The GPTQ options that apply to SmoothQuant's int8 per-channel weights (no groups, so no static_groups), and the
# defaults that differ from GPTQ's: clip is off (int8 ranges gain little from a range search).
GPTQ_WEIGHT_OPTIONS = ("damp_percent", "desc_act", "block_size", "clip")
GPTQ_WEIGHT_DEFAULTS = {"clip": False}


@dataclasses.dataclass(frozen=True)
class GPTQOptions(Options):
    """GPTQ's options, read by `hf_ptq.methods.gptq` (docs/gptq.md)."""

    desc_act: bool = switch(True, "act-order: visit columns by decreasing Hessian diagonal")
    static_groups: bool = switch(False, "fix every group's scale from the natural groups up front (no g_idx)")
    damp_percent: float = option(
        0.01,
        lambda v: is_number(v) and 0 < v <= 1,
        "a number in (0, 1], e.g. 0.01",
        "Hessian damping, as a fraction of the mean of its diagonal",
    )
    block_size: int = option(
        128,
        is_positive_int,
        "a positive integer (columns per lazy GPTQ update, e.g. 128)",
        "columns per lazy update (speed only)",
    )
    clip: bool = switch(True, "search each group's range (Hessian-diagonal weighted)")


@dataclasses.dataclass(frozen=True)
class AWQOptions(Options):
    """AWQ's options, read by `hf_ptq.methods.awq` (docs/awq.md)."""

    duo_scaling: bool = switch(True, "scale candidates mean|x|^α / mean|ŵ|^(1-α) (True) or mean|x|^α (False)")
    grid: int = option(
        20,
        lambda v: is_positive_int(v) and v <= MAX_AWQ_GRID,
        f"an integer from 1 to {MAX_AWQ_GRID} (AWQ scale candidates, default 20; each costs one product per group)",
        f"α candidates of the scale search, 1 to {MAX_AWQ_GRID}",
    )
    clip: bool = switch(True, "search each group's clipping range on the output error")


@dataclasses.dataclass(frozen=True)
class Bnb4bitOptions(Options):
    """nf4 / fp4 options, read by `hf_ptq.quantizer.bnb` (bitsandbytes' `bnb_4bit_use_double_quant`)."""

    double_quant: bool = switch(False, "quantize the block scales too (QLoRA's double quantization)")


@dataclasses.dataclass(frozen=True)
class LlmInt8Options(Options):
    """llm_int8 options, read by `hf_ptq.quantizer.bnb` (bitsandbytes' `llm_int8_threshold`)."""

    outlier_threshold: float = option(
        6.0,
        lambda v: is_number(v) and v > 0,
        "a positive number (input features with a larger magnitude are multiplied in 16-bit; default 6.0)",
        "LLM.int8()'s outlier threshold: input features above it are multiplied in 16-bit",
    )


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions(Options):
    """SmoothQuant's options, read by `hf_ptq.methods.smoothquant` (docs/smoothquant.md); `gptq` holds the GPTQ
    options of `weight_method="gptq"`."""

    alpha: float | str = option(
        0.5,
        lambda v: v == "auto" if isinstance(v, str) else is_number(v) and 0 <= v <= 1,
        "a number in [0, 1], e.g. 0.5 (SmoothQuant's default), or 'auto'",
        "migration strength α of s = max|X|^α / max|W|^(1-α), or 'auto' (searched per group of Linears)",
    )
    activations: str = option(
        "dynamic",
        lambda v: v in ACTIVATIONS,
        " or ".join(map(repr, ACTIVATIONS)),
        "int8 activation scales: one per token, computed on every call (dynamic), or one per layer input (static)",
    )
    weight_method: str = option(
        "rtn",
        lambda v: v in WEIGHT_METHODS,
        " or ".join(map(repr, WEIGHT_METHODS)),
        "how the int8 per-channel weights are rounded",
    )
    gptq: GPTQOptions | None = option(
        None, lambda v: v is None or isinstance(v, GPTQOptions), "GPTQOptions or None", "GPTQ's options"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.gptq is not None) != (self.weight_method == "gptq"):
            raise InvalidOption("gptq", self.gptq, "GPTQOptions exactly when weight_method='gptq'")

    @property
    def static(self) -> bool:
        """True for static per-tensor activation scales."""
        return self.activations == "static"


@dataclasses.dataclass(frozen=True)
class SequentialOptions(Options):
    """Options of the calibration walk itself (`hf_ptq.pipeline.sequential`), taken by every calibrated method."""

    true_sequential: bool = switch(
        True,
        "collect each stage's statistics after the stages before it in the block are quantized",
    )

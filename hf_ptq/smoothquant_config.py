"""`SmoothQuantConfig`: W8A8 (int8 weights and int8 activations) with SmoothQuant, for `from_pretrained`.

Validated once, here, at construction: a bad value raises `ValueError` naming the field and the allowed values
before any weight is read. Round-trips through `to_dict()` / `SmoothQuantConfig(**d)` and `config.json`;
calibration data is described there (source, size, hash), never embedded.
"""

from __future__ import annotations

from typing import Any

from .config_base import HfPtqConfig, check_embeddings, name_keyword_options
from .core.options import InvalidOption, option_names
from .core.scheme import WeightScheme
from .methods.options import (
    GPTQ_WEIGHT_DEFAULTS,
    GPTQ_WEIGHT_OPTIONS,
    GPTQOptions,
    SequentialOptions,
    SmoothQuantOptions,
)

QUANT_METHOD = "hf_ptq_smoothquant"
OWNER = "SmoothQuantConfig"
SCHEME = WeightScheme(bits=8, group_size=-1, sym=True)  # int8 per-channel symmetric weights
_KEYWORD_OPTIONS = (*option_names(SequentialOptions), *GPTQ_WEIGHT_OPTIONS)


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return InvalidOption(field, value, allowed).owned_by(OWNER)


class SmoothQuantConfig(HfPtqConfig):
    """W8A8 config for `AutoModel*.from_pretrained(..., quantization_config=SmoothQuantConfig(...))`.

    Args:
        alpha: migration strength α in [0, 1] of the smoothing factors `s = max|X|^α / max|W|^(1-α)` (default
            0.5; larger moves more of the activations' range into the weights), or `"auto"`: chosen per group of
            Linears sharing an input, from 0, 0.1, ..., 1, by the W8A8 output error on calibration rows.
        activations: `"dynamic"` (default): one int8 scale per token, computed on every call; `"static"`: one
            scale per layer input, fixed from the calibration maximum (no per-call reduction; less accurate).
        weight_method: how the int8 per-channel weights are rounded: `"rtn"` (default, round-to-nearest) or
            `"gptq"` (error compensation against the calibration Hessian, slower to quantize).
        modules_to_not_convert: module names (or suffixes / regexes, as transformers matches them) kept in full
            precision; the output embedding is always kept.
        embeddings: None (default: the input embedding and lm_head stay in the model's dtype), `"int8"` or
            `"int4"`, as in `PtqConfig` (int4 symmetric here, groups of 128 / 64 / 32): weight-only, RTN, quantized
            after calibration; a tied head shares the embedding's packed tensor. See docs/embeddings.md.
        dataset, num_samples, seq_len, batch_size, tokenizer: calibration data, as in `PtqConfig` (see
            docs/calibration.md, with the same bounds); `dataset=None` calibrates on text sampled from the model
            itself. numpy scalars are accepted in every numeric field, as Python numbers.
        **options: `true_sequential`: collect each layer input's statistics after the layers before it in the block
            are quantized, instead of all in one pass per block; default: True with `weight_method="gptq"` (its
            Hessians gain from it), False with `"rtn"` (only the activation maxima would change; 40% faster).
            `damp_percent`, `desc_act`, `block_size`, `clip`: GPTQ options (see docs/gptq.md; `clip` defaults to
            False here); only with `weight_method="gptq"`.
    """

    def __init__(
        self,
        alpha: float | str = 0.5,
        activations: str = "dynamic",
        weight_method: str = "rtn",
        modules_to_not_convert: list[str] | None = None,
        dataset: Any = None,
        num_samples: int = 128,
        seq_len: int = 512,
        batch_size: int = 1,
        tokenizer: Any = None,
        embeddings: str | None = None,
        quant_method: str = QUANT_METHOD,
        **options: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise _fail("quant_method", quant_method, f"{QUANT_METHOD!r} (set by hf_ptq, not by users)")
        self.quant_method = QUANT_METHOD
        self.alpha = alpha
        self.activations = activations
        self.weight_method = weight_method
        self.modules_to_not_convert = modules_to_not_convert
        self.dataset = dataset
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        for name in _KEYWORD_OPTIONS:
            setattr(self, name, options.pop(name, None))
        self._take_saved_keys(options)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field."""
        self._plain_numbers()
        gptq = self.weight_method == "gptq"
        if not gptq:
            for field in GPTQ_WEIGHT_OPTIONS:
                value = getattr(self, field)
                if value is not None and self.weight_method == "rtn":
                    raise ValueError(
                        f"SmoothQuantConfig.{field}={value!r} is a GPTQ option and applies only with "
                        f"weight_method='gptq' (got weight_method={self.weight_method!r}): drop {field} or set "
                        "weight_method='gptq'."
                    )
        try:
            if gptq:
                given = {f: getattr(self, f) for f in GPTQ_WEIGHT_OPTIONS if getattr(self, f) is not None}
                weights = GPTQOptions(**{**GPTQ_WEIGHT_DEFAULTS, **given})
            else:
                weights = None
            self._options = SmoothQuantOptions(
                alpha=self.alpha, activations=self.activations, weight_method=self.weight_method, gptq=weights
            )
        except InvalidOption as err:
            raise err.owned_by(OWNER) from None
        self._check_shared_fields(_fail, needs_calibration=True)
        check_embeddings(_fail, self.embeddings)
        if self.true_sequential is None:
            self.true_sequential = gptq
        try:
            SequentialOptions(true_sequential=self.true_sequential)
        except InvalidOption as err:
            raise err.owned_by(OWNER) from None
        for field in GPTQ_WEIGHT_OPTIONS if gptq else ():
            setattr(self, field, getattr(weights, field))

    @property
    def method(self) -> str:
        """The registered method (`hf_ptq.methods`) the calibration pipeline runs for this config."""
        return "smoothquant_gptq" if self.weight_method == "gptq" else "smoothquant"

    @property
    def scheme(self) -> WeightScheme:
        """The weights' grid: int8 per output channel, symmetric."""
        return SCHEME

    @property
    def options(self) -> SmoothQuantOptions:
        """The method's options (alpha, activations, weight method and its GPTQ options), validated."""
        return self._options

    @property
    def static(self) -> bool:
        """True for static per-tensor activation scales."""
        return self._options.static

    def describe(self) -> str:
        """One line for logs and model cards, e.g. `smoothquant w8a8 alpha=0.5 dynamic per-token, rtn weights`."""
        acts = "static per-tensor" if self.static else "dynamic per-token"
        alpha = self.alpha if self.alpha == "auto" else f"{self.alpha:g}"
        text = f"smoothquant w8a8 alpha={alpha} {acts}, {self.weight_method} weights"
        return text + (f", embeddings={self.embeddings}" if self.embeddings else "")


name_keyword_options(SmoothQuantConfig, _KEYWORD_OPTIONS)

"""`SmoothQuantConfig`: W8A8 (int8 weights and int8 activations) with SmoothQuant, for `from_pretrained`.

Validated once, here, at construction: a bad value raises `ValueError` naming the field and the allowed values
before any weight is read. Round-trips through `to_dict()` / `SmoothQuantConfig(**d)` and `config.json`;
calibration data is described there (source, size, hash), never embedded.
"""

from __future__ import annotations

from typing import Any

from .config import _METHOD_FIELDS as _PTQ_METHOD_FIELDS
from .config_base import HfPtqConfig, check_embeddings
from .methods.gptq import GPTQ_FIELDS

QUANT_METHOD = "hf_ptq_smoothquant"

_ACTIVATIONS = ("dynamic", "static")
_WEIGHT_METHODS = ("rtn", "gptq")
# GPTQ options accepted with weight_method="gptq" (checks and defaults shared with PtqConfig); per-channel weights
# have no groups, so static_groups does not apply, and clip is off by default (int8 ranges gain little from it).
_GPTQ_OPTIONS = {f: _PTQ_METHOD_FIELDS[f] for f in GPTQ_FIELDS if f not in ("static_groups", "true_sequential")}
_GPTQ_OPTIONS["clip"] = (False, *_PTQ_METHOD_FIELDS["clip"][1:])


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"SmoothQuantConfig.{field}={value!r} is invalid: {field} must be {allowed}.")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
        true_sequential: collect each layer input's statistics after the layers before it in the block are
            quantized, instead of all in one pass per block; default: True with `weight_method="gptq"` (its
            Hessians gain from it), False with `"rtn"` (only the activation maxima would change; 40% faster).
        damp_percent, desc_act, block_size, clip: GPTQ options (see docs/gptq.md); only with `weight_method="gptq"`.
    """

    bits = 8  # read by the shared pipeline and model card: int8 per-channel symmetric weights
    group_size = -1
    sym = True
    static_groups = False
    compute_dtype = "auto"

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
        true_sequential: bool | None = None,
        damp_percent: float | None = None,
        desc_act: bool | None = None,
        block_size: int | None = None,
        clip: bool | None = None,
        embeddings: str | None = None,
        quant_method: str = QUANT_METHOD,
        **saved: Any,
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
        self.true_sequential = true_sequential
        self.damp_percent = damp_percent
        self.desc_act = desc_act
        self.block_size = block_size
        self.clip = clip
        self.embeddings = embeddings
        known = "alpha, activations, weight_method, modules_to_not_convert, dataset, num_samples, seq_len, batch_size"
        self._take_saved_keys(saved, [known, "tokenizer, true_sequential, embeddings", *_GPTQ_OPTIONS])
        self.post_init()

    def post_init(self) -> None:
        """Validate every field."""
        self._plain_numbers()
        if self.alpha != "auto" and (not _is_number(self.alpha) or not 0 <= self.alpha <= 1):
            raise _fail("alpha", self.alpha, "a number in [0, 1], e.g. 0.5 (SmoothQuant's default), or 'auto'")
        if self.activations not in _ACTIVATIONS:
            raise _fail("activations", self.activations, " or ".join(map(repr, _ACTIVATIONS)))
        if self.weight_method not in _WEIGHT_METHODS:
            raise _fail("weight_method", self.weight_method, " or ".join(map(repr, _WEIGHT_METHODS)))
        self._check_shared_fields(_fail, needs_calibration=True)
        check_embeddings(_fail, self.embeddings)
        if self.true_sequential is None:
            self.true_sequential = self.weight_method == "gptq"
        if not isinstance(self.true_sequential, bool):
            raise _fail("true_sequential", self.true_sequential, "True or False")
        for field, (default, check, allowed) in _GPTQ_OPTIONS.items():
            value = getattr(self, field)
            if self.weight_method != "gptq":
                if value is not None:
                    raise ValueError(
                        f"SmoothQuantConfig.{field}={value!r} is a GPTQ option and applies only with "
                        f"weight_method='gptq' (got weight_method={self.weight_method!r}): drop {field} or set "
                        "weight_method='gptq'."
                    )
            elif value is None:
                setattr(self, field, default)
            elif not check(value):
                raise _fail(field, value, allowed)

    @property
    def method(self) -> str:
        """The registered method (`hf_ptq.methods`) the calibration pipeline runs for this config."""
        return "smoothquant_gptq" if self.weight_method == "gptq" else "smoothquant"

    @property
    def static(self) -> bool:
        """True for static per-tensor activation scales."""
        return self.activations == "static"

    def describe(self) -> str:
        """One line for logs and model cards, e.g. `smoothquant w8a8 alpha=0.5 dynamic per-token, rtn weights`."""
        acts = "static per-tensor" if self.static else "dynamic per-token"
        alpha = self.alpha if self.alpha == "auto" else f"{self.alpha:g}"
        text = f"smoothquant w8a8 alpha={alpha} {acts}, {self.weight_method} weights"
        return text + (f", embeddings={self.embeddings}" if self.embeddings else "")

"""Registry of quantization algorithms: a dict of `MethodSpec` and a decorator that fills it.

A method is a function of plain data: a weight [out, in], its `WeightScheme` (bits, group size, symmetry), the
method's own options (a frozen dataclass declared beside it, e.g. `GPTQOptions`; None for methods without any) and,
for calibrated methods, collected statistics. It returns a `QuantizedWeight` (weight-only methods, configured by
`PtqConfig`) or a `W8A8Weight` (methods that quantize activations too, configured by their own config, e.g.
`SmoothQuantConfig`). Methods do no module surgery and no I/O. A calibrated method names the statistics it needs: a
class built as `statistics(in_features)` whose `add_batch(x [..., in])` the pipeline calls with the inputs of the
Linears it will quantize; the method is then called as `fn(weight, scheme, options, stats)`.

A method that rescales input channels (AWQ, SmoothQuant) also gives `smooth(weight, scheme, options, stats) -> s [in]
| None`. The pipeline calls it for each group of Linears sharing an input whose producer can take the scale (see
`pipeline/families.py`), folds `1/s` into that producer, calls `stats.rescale(s)` (the statistics then describe the
inputs `x / s`) and quantizes `weight * s`.

A method wrapped from another library says so: `requires=(import name, hf-ptq extra)` names the package it needs to
quantize, and `backend` names the library whose own modules hold the weights (bitsandbytes: its `Linear4bit` /
`Linear8bitLt`, which also need the package to run); `backend=None` means hf_ptq's packed `QuantLinear`.
"""

from __future__ import annotations

from .registry import METHODS, MethodSpec, register_method, require_package

__all__ = ["MethodSpec", "method_names", "method_spec", "register_method", "require_package"]


def method_names() -> list[str]:
    """The weight-only methods (`PtqConfig.method`)."""
    _register_all()
    return sorted(n for n, spec in METHODS.items() if not spec.activations)


def method_spec(name: str) -> MethodSpec:
    _register_all()
    return METHODS[name]


def _register_all() -> None:
    """Import every method module (each registers its methods); on first use, so that the options and the
    registry import without torch (the CLI's parser reads `methods.options`)."""
    from . import awq, bnb, gptq, hqq, rtn, smoothquant  # noqa: F401

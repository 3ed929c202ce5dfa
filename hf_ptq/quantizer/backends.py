"""Which runtime loads checkpoints that other tools made: hf_ptq's kernels, or the loader transformers ships.

`import hf_ptq` takes over transformers' `quant_method`s "gptq", "awq" and "compressed-tensors" for *loading
pre-quantized checkpoints*: they run on hf_ptq's packed modules with no gptqmodel, optimum, autoawq or
compressed-tensors installed (see docs/loading.md). Quantizing with transformers' own `GPTQConfig` / `AwqConfig`
still goes to transformers' quantizers, and nothing changes without `import hf_ptq`.

Choose transformers' own loader (for example gptqmodel's Marlin kernels on CUDA) per format, in code or in the
environment; the choice is read when `from_pretrained` builds the quantizer:

    hf_ptq.use_backend("gptq", "transformers")     # or "awq", "compressed-tensors"; "hf_ptq" to switch back
    HF_PTQ_BACKENDS="gptq=transformers,awq=transformers"   # or HF_PTQ_BACKENDS=transformers for all three
"""

from __future__ import annotations

import os

from ..formats.third_party import TAKEN_OVER

HF_PTQ, TRANSFORMERS = "hf_ptq", "transformers"
BACKENDS = (HF_PTQ, TRANSFORMERS)
ENV = "HF_PTQ_BACKENDS"
_chosen: dict[str, str] = {}


def _check(quant_method: str, backend: str, where: str) -> None:
    if quant_method not in TAKEN_OVER:
        raise ValueError(f"{where}: quant_method {quant_method!r} is not one of {', '.join(map(repr, TAKEN_OVER))}.")
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend {backend!r} is not one of {', '.join(map(repr, BACKENDS))}.")


def use_backend(quant_method: str, backend: str) -> None:
    """Load checkpoints of `quant_method` ("gptq", "awq", "compressed-tensors") with `backend`: "hf_ptq" (its
    kernels, the default) or "transformers" (the loader transformers ships, which needs that tool's package)."""
    _check(quant_method, backend, "hf_ptq.use_backend")
    _chosen[quant_method] = backend


def _from_environment() -> dict[str, str]:
    """HF_PTQ_BACKENDS: a backend for all formats, or comma-separated `format=backend` pairs."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return {}
    if "=" not in text:
        _check(TAKEN_OVER[0], text, ENV)
        return dict.fromkeys(TAKEN_OVER, text)
    chosen = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        quant_method, _, backend = item.partition("=")
        _check(quant_method.strip(), backend.strip(), f"{ENV}={text!r}")
        chosen[quant_method.strip()] = backend.strip()
    return chosen


def backend_for(quant_method: str) -> str:
    """The backend that loads `quant_method` now: `use_backend`'s choice, else HF_PTQ_BACKENDS', else hf_ptq."""
    return _chosen.get(quant_method) or _from_environment().get(quant_method, HF_PTQ)

"""Register hf_ptq's configs and quantizers with transformers' auto classes, idempotently.

transformers' `register_quantization_config` / `register_quantizer` raise on a second registration; a second
`import hf_ptq` or an `importlib.reload` must not, so an existing entry is replaced instead (a reload then maps the
name to the reloaded classes).
"""

from __future__ import annotations

from transformers.quantizers import auto


def register(quant_method: str, config_cls: type, quantizer_cls: type) -> None:
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(quant_method, None)
    auto.AUTO_QUANTIZER_MAPPING.pop(quant_method, None)
    auto.register_quantization_config(quant_method)(config_cls)
    auto.register_quantizer(quant_method)(quantizer_cls)

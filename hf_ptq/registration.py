"""Register hf_ptq's configs and quantizers with transformers' auto classes, idempotently.

transformers' `register_quantization_config` / `register_quantizer` raise on a second registration; a second
`import hf_ptq` or an `importlib.reload` must not, so an existing entry is replaced instead (a reload then maps the
name to the reloaded classes).

`AutoHfQuantizer.supports_quant_method`, which `from_pretrained` asks before building a quantizer, is wrapped to
refuse saved `quant_method`s spelled like hf_ptq's that no import registered (`hf_ptq.own_methods`); every other name
behaves as before, and wrapping again (re-import, reload) wraps transformers' original, never a wrapper.

`take_over` maps transformers' "gptq", "awq" and "compressed-tensors" to hf_ptq's loaders of those checkpoints
(`hf_ptq.quantizer.third_party`), keeping transformers' classes as the fallback they hand other loads to; for
"compressed-tensors" the config class too, since transformers' needs the compressed-tensors package to be built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.quantizers import auto

from .own_methods import refuse_unknown_own_method

_ORIGINAL = "_hf_ptq_original"  # attribute of the wrapper holding transformers' own function


def register(quant_method: str, config_cls: type, quantizer_cls: type) -> None:
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(quant_method, None)
    auto.AUTO_QUANTIZER_MAPPING.pop(quant_method, None)
    auto.register_quantization_config(quant_method)(config_cls)
    auto.register_quantizer(quant_method)(quantizer_cls)
    guard_unknown_own_methods()


def _original(mapping: dict[str, Any], name: str) -> Any:
    """transformers' own entry for `name`, also after an earlier `take_over` replaced it."""
    current = mapping.get(name)
    return getattr(current, "original", None) if getattr(current, "hf_ptq_takeover", False) else current


def take_over() -> None:
    """Map "gptq", "awq" and "compressed-tensors" to hf_ptq's loaders (idempotent; see the module docstring)."""
    from .formats.third_party.compressed_tensors import CompressedTensorsCheckpointConfig
    from .quantizer.backends import HF_PTQ, backend_for
    from .quantizer.third_party import QUANTIZERS

    for quantizer in QUANTIZERS:
        name = quantizer.quant_method_name
        original = _original(auto.AUTO_QUANTIZER_MAPPING, name)
        auto.AUTO_QUANTIZER_MAPPING[name] = type(
            quantizer.__name__, (quantizer,), {"original": original, "hf_ptq_takeover": True}
        )
    original_config = _original(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "compressed-tensors")

    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs: Any):
        if backend_for("compressed-tensors") != HF_PTQ and original_config is not None:
            return original_config.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)
        return CompressedTensorsCheckpointConfig.from_dict.__func__(cls, config_dict, return_unused_kwargs, **kwargs)

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] = type(
        "CompressedTensorsCheckpointConfig",
        (CompressedTensorsCheckpointConfig,),
        {"from_dict": classmethod(from_dict), "original": original_config, "hf_ptq_takeover": True},
    )


def _guarded(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def supports_quant_method(quantization_config_dict: Any) -> bool:
        refuse_unknown_own_method(quantization_config_dict)
        return original(quantization_config_dict)

    setattr(supports_quant_method, _ORIGINAL, original)
    supports_quant_method.__doc__ = original.__doc__
    return supports_quant_method


def guard_unknown_own_methods() -> None:
    """Wrap `AutoHfQuantizer.supports_quant_method` with `refuse_unknown_own_method` (idempotent)."""
    current = auto.AutoHfQuantizer.__dict__["supports_quant_method"]
    function = current.__func__ if isinstance(current, staticmethod) else current
    original = getattr(function, _ORIGINAL, function)
    auto.AutoHfQuantizer.supports_quant_method = staticmethod(_guarded(original))

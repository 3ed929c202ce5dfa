"""`QuantLoraLinear`: peft's LoRA `Linear` around a frozen hf_ptq layer (`QuantLinear` 2-8 bit, any grid, act-order,
HQQ float zero points; `W8A8Linear`).

The base layer runs its own kernels forward and gives input gradients by dequantizing in backward
(`hf_ptq.nn.frozen_grad`); the adapter is peft's (LoRA, rank-stabilised LoRA, DoRA on `QuantLinear`, whose `.weight`
is the dequantized weight DoRA's norm needs). What differs from peft's float `Linear` is merging: the merged weight
is rounded onto the base layer's own grid (its scales, zero points and groups are kept, only the integers change),
so a merged model is still a quantized hf_ptq model that saves and reloads as one. An adapter change smaller than
half a grid step is lost in that rounding; for an exact merge, dequantize the base model first
(`model.dequantize()`, which makes these layers float `nn.Linear`s that peft merges exactly).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora.layer import Linear
from peft.tuners.tuners_utils import check_adapters_to_merge
from transformers.utils import logging

from ..nn import QuantLinear, W8A8Linear

logger = logging.get_logger("hf_ptq")
_merge_warned: list[bool] = []  # the rounding warning is given once per process, with the first layer's figure

QUANTIZED_BASES = (QuantLinear, W8A8Linear)
# peft initialisations that subtract what they put in the adapter from the base layer's float weight
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def register_lora_layers(lora_config: Any) -> Any:
    """Register `QuantLoraLinear` for hf_ptq's layers on a peft `LoraConfig` (peft's custom-module mapping)."""
    lora_config._register_custom_module({layer: QuantLoraLinear for layer in QUANTIZED_BASES})
    return lora_config


class QuantLoraLinear(Linear):
    """LoRA adapters (peft's) on a frozen `QuantLinear` / `W8A8Linear`; merges onto the base layer's grid."""

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        kwargs.pop("fan_in_fan_out", None)  # hf_ptq layers hold [out, in] whatever the float layer was
        with warnings.catch_warnings():  # peft's "Unsupported layer type" for a layer type it does not know
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False
        self._refuse_variants_without_float_weight()

    def update_layer(self, adapter_name: str, *args: Any, config: Any = None, **kwargs: Any) -> None:
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            raise ValueError(
                f"LoraConfig.init_lora_weights={init!r} moves part of the base weight into the adapter by rewriting "
                "the base layer's float weight, which an hf_ptq layer does not hold (its weight is packed): use "
                "init_lora_weights=True (the default), 'gaussian' or 'orthogonal' on hf_ptq models, or dequantize "
                "the model first (model.dequantize())."
            )
        super().update_layer(adapter_name, *args, config=config, **kwargs)
        self._refuse_variants_without_float_weight()

    @staticmethod
    def _get_base_layer_device_and_dtype(base_layer: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
        """Where the adapters go: the device and float dtype of the base layer's scales (peft would read `.weight`,
        which for a `QuantLinear` dequantizes the layer, and `compute_dtype`, which here is a setting string)."""
        return base_layer.weight_scale.device, base_layer.weight_scale.dtype

    def _refuse_variants_without_float_weight(self) -> None:
        """peft's variants (DoRA, ...) read the base layer's `.weight` as a float weight: a `W8A8Linear`'s is int8."""
        if isinstance(self.get_base_layer(), W8A8Linear) and getattr(self, "lora_variant", None):
            names = sorted(type(v).__name__ for v in self.lora_variant.values())
            raise ValueError(
                f"LoRA variants {names} (use_dora=True, ...) are not supported on hf_ptq's W8A8Linear layers (their "
                "`.weight` is the int8 tensor); use plain LoRA there, or target the W8A8 layers with a config without "
                "the variant."
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' change to the base weight and round it onto the base layer's grid."""
        base = self.get_base_layer()
        if not isinstance(base, QUANTIZED_BASES):  # dequantized since the adapter was added: peft's exact merge
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            merged = self._changed_weight(base, adapter, sign=1.0)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            self._store(base, merged, adapter, sign=1.0)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Take the merged adapters' change back out of the base weight (rounded onto the grid again: lossy)."""
        base = self.get_base_layer()
        if not isinstance(base, QUANTIZED_BASES):
            return super().unmerge()
        if not self.merged:
            logger.warning("hf_ptq: already unmerged, nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            self._store(base, self._changed_weight(base, adapter, sign=-1.0), adapter, sign=-1.0)

    def _changed_weight(self, base: torch.nn.Module, adapter: str, sign: float) -> torch.Tensor:
        """The base weight [out, in] (fp32) with `adapter`'s change added (`sign` 1) or taken out (-1): peft's variant
        merge / unmerge (DoRA) where the adapter has one, else the LoRA delta."""
        weight = base.dequantized_weight(torch.float32)
        variant = self.lora_variant.get(adapter)
        if variant is not None:
            change = variant.merge_safe if sign > 0 else variant.unmerge
            return change(self, adapter, weight).float()
        return weight + sign * self.get_delta_weight(adapter).float()

    def _store(self, base: torch.nn.Module, weight: torch.Tensor, adapter: str, sign: float) -> None:
        if _merge_warned:
            base.requantize_(weight)
        else:  # the first merge says how much of the adapter's change its rounding kept
            _merge_warned.append(True)
            before = base.dequantized_weight(torch.float32)
            base.requantize_(weight)
            wanted, got = weight - before, base.dequantized_weight(torch.float32) - before
            kept = float((got * wanted).sum() / wanted.square().sum().clamp(min=1e-30))
            logger.warning(
                "hf_ptq: merging a LoRA adapter into a quantized layer rounds the merged weight onto the layer's own "
                f"grid (scales, zero points and groups kept): in the first layer merged, {kept:.0%} of the "
                "adapter's change survived the rounding (changes smaller than half a grid step are lost). For an exact "
                "merge into float layers, call model.dequantize() before merge_and_unload() (docs/finetuning.md)."
            )
        if self.lora_bias[adapter]:
            if base.bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            change = self.lora_B[adapter].bias.detach() * self.scaling[adapter]
            base.bias.data += sign * change.to(base.bias.dtype)
            if isinstance(base, W8A8Linear):
                base.invalidate_caches()  # it caches the bias in its kernels' dtype

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Linear", "lora.QuantLoraLinear", 1)

"""bitsandbytes methods (`nf4`, `fp4`, `llm_int8`) behind `PtqConfig`, by delegation to transformers' own quantizers.

Why delegate rather than call bitsandbytes directly: transformers' `Bnb4BitHfQuantizer` / `Bnb8BitHfQuantizer`
already quantize each weight while it streams from the checkpoint, and write and read bitsandbytes' serialized
quantization state (`weight.absmax`, `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4`, `SCB`, ...) in the
layout every bitsandbytes reader expects. The layers are bitsandbytes' own `Linear4bit` / `Linear8bitLt`, which is
what peft's LoRA recognises for QLoRA, and what `Trainer` accepts through `is_trainable`. Calling bitsandbytes
directly would mean re-implementing that (de)serialization for no gain. What hf_ptq adds: its one config (the
`BitsAndBytesConfig` is derived from it, and `PtqConfig` is what config.json records), its block size choice
(`group_size`, which transformers does not expose), its skip list, tags and Hub upload with model card.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import BitsAndBytesConfig
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from ..methods import method_spec, require_package
from ..nn import quantizable_linears
from .hf_quantizer import PtqHfQuantizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..config import PtqConfig


def bnb_config(cfg: PtqConfig, skip: list[str] | None, dtype: torch.dtype | None) -> BitsAndBytesConfig:
    """The `BitsAndBytesConfig` that `cfg` (method nf4 / fp4 / llm_int8) stands for; `dtype`: the model's dtype,
    bitsandbytes' 4-bit compute dtype when `cfg.compute_dtype` is "auto"."""
    if cfg.method == "llm_int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=float(cfg.outlier_threshold), llm_int8_skip_modules=skip
        )
    compute = (dtype or torch.float32) if cfg.compute_dtype == "auto" else getattr(torch, cfg.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.method,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=cfg.double_quant,
        llm_int8_skip_modules=skip,
    )


def restore_4bit_layout(model: torch.nn.Module) -> int:
    """Turn `Linear4bit` weights that bitsandbytes repacked for its CPU kernel back into the standard layout, so that
    a save writes what a reload reads; returns how many layers were restored.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight at its first forward. Its own inverse,
    run by `Linear4bit._save_to_state_dict`, restores the weight but leaves non-nested absmax in the kernel's
    transposed [blocks_per_row, out] layout: a model saved after inference reloads with wrong block scales. Here the
    inverse runs first and the absmax is put back in block order [out * blocks_per_row] (the values the repacked
    model computes with). The next forward repacks again.
    """
    import bitsandbytes as bnb
    from bitsandbytes import functional

    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    restored = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if not isinstance(module, bnb.nn.Linear4bit) or not getattr(state, "packing_format_for_cpu", False):
            continue
        nested = state.original_nested
        data, state = inverse(module.weight.data, state)
        if not nested:
            state.absmax = state.absmax.T.reshape(-1).float().contiguous()
        module.weight.data, module.weight.quant_state = data, state
        restored += 1
    return restored


class BnbHfQuantizer(PtqHfQuantizer):
    """`PtqHfQuantizer` for the bitsandbytes methods: transformers' bnb quantizer does the work (see module doc)."""

    def __init__(self, quantization_config: PtqConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._delegate = self._make_delegate(None, None)

    def _make_delegate(self, skip: list[str] | None, dtype: torch.dtype | None):
        cls = Bnb8BitHfQuantizer if self.quantization_config.method == "llm_int8" else Bnb4BitHfQuantizer
        delegate = cls(bnb_config(self.quantization_config, skip, dtype), pre_quantized=self.pre_quantized)
        self.serialized_names = delegate.serialized_names
        return delegate

    @property
    def calibrating(self) -> bool:
        return False

    @property
    def quantized_element_size(self) -> float:
        return self._delegate.quantized_element_size

    def validate_environment(self, *args, **kwargs) -> None:
        require_package(method_spec(self.quantization_config.method))  # before any weight is read, also to reload
        self._delegate.validate_environment(*args, **kwargs)

    def update_device_map(self, device_map):
        return self._delegate.update_device_map(device_map)

    def adjust_max_memory(self, max_memory):
        return self._delegate.adjust_max_memory(max_memory)

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs) -> bool:
        return self._delegate.param_needs_quantization(model, param_name, **kwargs)

    def _process_model_before_weight_loading(self, model: PreTrainedModel, dtype: torch.dtype | None = None, **kwargs):
        import bitsandbytes as bnb

        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
        )
        self._delegate = self._make_delegate(self.modules_to_not_convert, dtype or model.dtype)
        self._delegate._process_model_before_weight_loading(model, device_map=kwargs.get("device_map"))
        if not self.pre_quantized and cfg.method != "llm_int8":
            for module in model.modules():  # the placeholder's attributes become the quantized weight's
                if isinstance(module, bnb.nn.Linear4bit):
                    module.weight.blocksize = cfg.group_size
        self.modules_to_not_convert = self._delegate.modules_to_not_convert
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        self._delegate._process_model_after_weight_loading(model, **kwargs)  # sets is_loaded_in_4bit / 8bit
        return super()._process_model_after_weight_loading(model, **kwargs)

    def get_quantize_ops(self):
        return self._delegate.get_quantize_ops()

    def get_load_operations(self) -> dict:
        return self._delegate.get_load_operations()

    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        restore_4bit_layout(model)
        return super().get_state_dict_and_metadata(model)

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None):
        return self._delegate._dequantize(model, dtype=dtype)


@torch.no_grad()
def quantize_loaded_model(model: PreTrainedModel, config: PtqConfig, skip: list[str]) -> BnbHfQuantizer:
    """Quantize the Linears of an in-memory model with bitsandbytes, as `from_pretrained` would: swap in
    `Linear4bit` / `Linear8bitLt` and run the same quantize op on each float weight. Returns the quantizer."""
    quantizer = BnbHfQuantizer(config, pre_quantized=False)
    require_package(method_spec(config.method))
    originals = {name: module for name, module in quantizable_linears(model, skip)}
    quantizer._process_model_before_weight_loading(model, dtype=model.dtype)
    quantize_op = quantizer.get_quantize_ops()
    for name, original in originals.items():
        weight, bias, key = original.weight, original.bias, f"{name}.weight"
        module = model.get_submodule(name)
        module.train(original.training)  # bitsandbytes picks its CPU inference kernel in eval mode only
        module.weight = quantize_op.convert({key: weight.detach()}, model=model, full_layer_name=key)[key]
        if bias is not None:
            module.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    quantizer._process_model_after_weight_loading(model)
    return quantizer

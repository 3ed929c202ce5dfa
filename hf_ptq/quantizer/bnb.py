"""bitsandbytes methods (`nf4`, `fp4`, `llm_int8`) behind `PtqConfig`, by delegation to transformers' own quantizers.

Why delegate rather than call bitsandbytes directly: transformers' `Bnb4BitHfQuantizer` / `Bnb8BitHfQuantizer`
already quantize each weight while it streams from the checkpoint, and write and read bitsandbytes' serialized
quantization state (`weight.absmax`, `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4`, `SCB`, ...) in the
layout every bitsandbytes reader expects. The layers are bitsandbytes' own `Linear4bit` / `Linear8bitLt`, which is
what peft's LoRA recognises for QLoRA, and what `Trainer` accepts through `is_trainable`. Calling bitsandbytes
directly would mean re-implementing that (de)serialization for no gain. What hf_ptq adds: its one config (the
`BitsAndBytesConfig` is derived from it, and `PtqConfig` is what config.json records), its block size choice
(`group_size`, which transformers does not expose), its skip list, tags and Hub upload with model card, and saves
that reload to the model that was saved, where transformers' do not after bitsandbytes' CPU repack
(`restore_4bit_layout`, `prepare_4bit_layers`, and the deserialize converters dropped after a reload).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from transformers import BitsAndBytesConfig
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from ..methods import method_spec, require_package
from .hf_quantizer import PtqHfQuantizer, register_backend

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


STANDARD_STATE = "_hf_ptq_standard_quant_state"  # Linear4bit attribute: its QuantState before the CPU repack


def cpu_repack_applies(module: torch.nn.Module) -> bool:
    """Whether bitsandbytes' CPU repack (`_convert_weight_packed_for_cpu`, run at the first forward on CPUs with
    AVX512-BF16) can take this `Linear4bit`: out_features a multiple of its tile of 32 rows and in_features a multiple
    of the block size. On other shapes (a 16-row k_proj, a block wider than a row) it fails in the forward."""
    state = module.weight.quant_state
    out_features, in_features = state.shape
    return out_features % 32 == 0 and in_features % state.blocksize == 0


def remember_standard_state(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a `Linear4bit`: keep the quantization state that bitsandbytes' CPU repack is about to
    overwrite in place (a shallow copy: the repack replaces the state's tensors, it does not write into them)."""
    if not module.support_avx512bf16_for_cpu or module.weight.device.type != "cpu":
        return  # no repack: nothing to keep
    state = getattr(module.weight, "quant_state", None)
    state = module.quant_state if state is None else state
    if state is not None and not getattr(state, "packing_format_for_cpu", False):
        setattr(module, STANDARD_STATE, copy.copy(state))


def prepare_4bit_layers(model: torch.nn.Module) -> None:
    """Make every `Linear4bit` of a loaded model save what it computes with: layers bitsandbytes' CPU kernel cannot
    take run on its generic path (instead of failing at the first forward), the others remember their standard
    quantization state before each repack (`remember_standard_state`, used by `restore_4bit_layout`)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or getattr(module.weight, "quant_state", None) is None:
            continue
        if not cpu_repack_applies(module):
            module.support_avx512bf16_for_cpu = False
        elif not getattr(module, "_hf_ptq_prepared", False):
            module.register_forward_pre_hook(remember_standard_state)
            module._hf_ptq_prepared = True


def cpu_absmax(state) -> torch.Tensor:
    """The block scales bitsandbytes' CPU repack makes of a standard `state`: dequantized, [blocks_per_row, out],
    bf16 (the same operations as `_convert_weight_packed_for_cpu`)."""
    from bitsandbytes import functional

    absmax = state.absmax
    if state.nested:
        absmax = functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        absmax = absmax.float()
    out_features, in_features = state.shape
    return absmax.reshape(out_features, in_features // state.blocksize).T.to(torch.bfloat16)


def restore_4bit_layout(model: torch.nn.Module) -> int:
    """Turn `Linear4bit` weights that bitsandbytes repacked for its CPU kernel back into the standard layout, so that
    a save writes what a reload reads; returns how many layers were restored.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight at its first forward: the packed weight is
    a permutation of the standard one, the block scales become dequantized bf16 in a transposed [blocks_per_row, out]
    layout. Its own inverse, run by `Linear4bit._save_to_state_dict`, restores the weight but leaves non-nested
    absmax transposed (a reload reads the scales in the wrong order) and re-quantizes nested (double quant) absmax
    from the bf16 values (not the saved model's scales). Here the weight is inverted and the quantization state is
    the one the layer had before the repack (`remember_standard_state`), checked against the scales the layer
    computes with; without it, the scales the layer computes with are written, in block order, not nested. The next
    forward repacks again, to the same tensors.
    """
    import bitsandbytes as bnb
    from bitsandbytes import functional

    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    restored = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if not isinstance(module, bnb.nn.Linear4bit) or not getattr(state, "packing_format_for_cpu", False):
            continue
        packed_absmax = state.absmax
        standard = getattr(module, STANDARD_STATE, None)
        if standard is not None and not torch.equal(cpu_absmax(standard), packed_absmax):
            standard = None  # the state changed after the hook saw it: write what the layer computes with
        if standard is None:
            state.original_nested = False  # keeps the inverse from re-quantizing the bf16 scales
        data, state = inverse(module.weight.data, state)
        if standard is None:
            state.absmax = packed_absmax.T.reshape(-1).float().contiguous()
        else:
            state = standard
        module.weight.data, module.weight.quant_state, module.quant_state = data, state, state
        restored += 1
    return restored


@register_backend("bitsandbytes")
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
        prepare_4bit_layers(model)
        if self.pre_quantized:
            # transformers keeps the deserialize converters to revert them on save, but they have no reverse op: a
            # reloaded model would fail to save (NotImplementedError). Its state dict already holds the serialized
            # names the converters read (`weight`, `weight.absmax`, `SCB`, ...), so saving needs no conversion.
            ops = tuple(self._delegate.get_load_operations().values())
            conversions = getattr(model, "_weight_conversions", None) or []
            model._weight_conversions = [
                c for c in conversions if not any(isinstance(op, ops) for op in getattr(c, "operations", ()))
            ]
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
        restore_4bit_layout(model)  # bitsandbytes' dequantize reads the standard layout only
        return self._delegate._dequantize(model, dtype=dtype)

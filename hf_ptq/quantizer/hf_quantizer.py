"""`PtqHfQuantizer`: what transformers calls around `from_pretrained` for a `PtqConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils import logging

from ..methods import method_spec
from ..nn import QuantLinear, replace_linears

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..config import PtqConfig

logger = logging.get_logger("hf_ptq")


class PtqHfQuantizer(HfQuantizer):
    """Quantize-on-load for calibration-free methods; rebuilds packed modules for saved hf_ptq checkpoints."""

    requires_calibration = False
    quantization_config: PtqConfig

    def validate_environment(self, *args, **kwargs) -> None:
        spec = method_spec(self.quantization_config.method)
        if spec.needs_calibration and not self.pre_quantized:
            raise NotImplementedError(f"method={spec.name!r} needs calibration, which this version cannot run yet.")

    @property
    def quantized_element_size(self) -> float:
        return self.quantization_config.bits / 8

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and tensor_name == "weight"

    def _process_model_before_weight_loading(self, model: PreTrainedModel, dtype: torch.dtype | None = None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
        )
        names = replace_linears(
            model,
            bits=cfg.bits,
            group_size=cfg.group_size,
            sym=cfg.sym,
            skip=self.modules_to_not_convert,
            dtype=dtype or model.dtype,
            compute_dtype=cfg.compute_dtype,
            expect_float_weight=not self.pre_quantized,
        )
        if not names:
            logger.warning("hf_ptq: no Linear layer to quantize was found; the model is left in full precision.")
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        from ..formats.hub import attach_push_to_hub

        model.add_model_tags(["hf-ptq", self.quantization_config.method, f"{self.quantization_config.bits}-bit"])
        attach_push_to_hub(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def get_quantize_ops(self):
        from .ops import QuantizeOnLoad

        return QuantizeOnLoad(self)

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None):
        """Replace every QuantLinear by an `nn.Linear` holding its dequantized weight."""
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear):
                weight = module.dequantized_weight(dtype or module.weight_scale.dtype)
                linear = torch.nn.Linear(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    device=weight.device,
                    dtype=weight.dtype,
                )
                linear.weight.data.copy_(weight)
                if module.bias is not None:
                    linear.bias.data.copy_(module.bias)
                model.set_submodule(name, linear)
        return model

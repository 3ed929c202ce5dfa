"""`SmoothQuantHfQuantizer`: what transformers calls around `from_pretrained` for a `SmoothQuantConfig`.

Calibration, the sequential pipeline and the Hub glue are those of `PtqHfQuantizer`; only the modules that a saved
checkpoint is loaded into differ (`W8A8Linear`, with an `input_scale` for static activation scales).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..nn.replace import replace_with_w8a8_linears
from .hf_quantizer import PtqHfQuantizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..smoothquant_config import SmoothQuantConfig


class SmoothQuantHfQuantizer(PtqHfQuantizer):
    """Calibrate-after-load for SmoothQuant W8A8; rebuilds `W8A8Linear`s for saved checkpoints."""

    quantization_config: SmoothQuantConfig

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs) -> bool:
        return False  # always calibrated after loading, never quantized while streaming

    def _replace_modules(self, model: PreTrainedModel, dtype: torch.dtype) -> list[str]:
        return replace_with_w8a8_linears(
            model, static=self.quantization_config.static, skip=self.modules_to_not_convert, dtype=dtype
        )

    def model_tags(self) -> list[str]:
        return ["hf-ptq", "smoothquant", "w8a8", "int8"]

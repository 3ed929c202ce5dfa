"""Functions for people who already hold a model in memory."""

from __future__ import annotations

from torch import nn

from .config import PtqConfig
from .nn import QUANTIZED_MODULES
from .nn.quant_embedding import EMBEDDING_MODULES
from .smoothquant_config import SmoothQuantConfig


def quantize(model: nn.Module, config: PtqConfig | SmoothQuantConfig, tokenizer=None) -> nn.Module:
    """Quantize the Linears of an in-memory transformers model in place, as `from_pretrained` would.

    The quantizer registered for `config` runs its own loading hooks on the model (`quantize_in_memory`): a fix to
    loading is a fix here. Calibrated methods (`gptq`, `awq`, SmoothQuant) run the sequential pipeline on
    `config.dataset`; text is tokenized with `tokenizer` (default: `config.tokenizer`, else the tokenizer of the
    model's repo). The result saves with `save_pretrained` and reloads with `from_pretrained` like a model quantized
    on load.
    """
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    already = getattr(model, "hf_quantizer", None) is not None
    if already or any(isinstance(m, (*QUANTIZED_MODULES, *EMBEDDING_MODULES)) for m in model.modules()):
        raise ValueError("quantize(): this model is already quantized.")
    quantizer = AUTO_QUANTIZER_MAPPING[config.quant_method](config, pre_quantized=False)
    quantizer.tokenizer = tokenizer
    return quantizer.quantize_in_memory(model)

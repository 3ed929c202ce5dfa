"""Functions for people who already hold a model in memory."""

from __future__ import annotations

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .config import PtqConfig
from .core.finite import require_finite_weight
from .methods import method_spec, require_package
from .nn import QUANTIZED_MODULES, quantizable_linears
from .nn.quant_embedding import EMBEDDING_MODULES
from .nn.replace import check_group_size, float_weight, replace_linears
from .nn.replace_embeddings import check_embedding_modules, quantize_embeddings
from .pipeline import calibrate_and_quantize
from .pipeline.preflight import prepare_calibration, warn_unmatched_modules
from .smoothquant_config import SmoothQuantConfig


@torch.no_grad()
def quantize(model: nn.Module, config: PtqConfig | SmoothQuantConfig, tokenizer=None) -> nn.Module:
    """Quantize the Linears of an in-memory transformers model in place, as `from_pretrained` would.

    Calibrated methods (`gptq`, SmoothQuant) run the sequential pipeline on `config.dataset`; text is tokenized with
    `tokenizer` (default: `config.tokenizer`, else the tokenizer of the model's repo). The result saves with
    `save_pretrained` and reloads with `from_pretrained` like a model quantized on load.
    """
    already = getattr(model, "hf_quantizer", None) is not None
    if already or any(isinstance(m, (*QUANTIZED_MODULES, *EMBEDDING_MODULES)) for m in model.modules()):
        raise ValueError("quantize(): this model is already quantized.")
    spec = method_spec(config.method)
    skip = HfQuantizer.get_modules_to_not_convert(
        model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
    )
    if not spec.needs_calibration:  # calibrated methods warn in prepare_calibration
        warn_unmatched_modules(model, config.modules_to_not_convert)
    if spec.backend == "bitsandbytes":
        from .quantizer.bnb import quantize_loaded_model

        return _mark_quantized(model, config, skip, quantize_loaded_model(model, config, skip))
    require_package(spec)
    originals = dict(quantizable_linears(model, skip))
    check_group_size(list(originals.items()), config.group_size)
    embeddings = getattr(config, "embeddings", None)
    if embeddings:
        check_embedding_modules(model, embeddings)
    if spec.needs_calibration:  # quantizes the embeddings too, after calibration
        batches = prepare_calibration(model, config, tokenizer)  # checked against the model; None: data-free
        calibrate_and_quantize(model, config, skip, batches)
        return _mark_quantized(model, config, skip)
    for name, original in originals.items():  # before any module is replaced: an error leaves the model as it was
        require_finite_weight(float_weight(original), name)
    replace_linears(
        model,
        bits=config.bits,
        group_size=config.group_size,
        sym=config.sym,
        skip=skip,
        dtype=model.dtype,
        compute_dtype=config.compute_dtype,
        float_zero_point=spec.float_zero_point,
    )
    for name, original in originals.items():
        module = model.get_submodule(name)
        weight = original.weight.t() if module.transposed_source else original.weight
        module.to_empty(device=weight.device)
        module.weight_shape.copy_(torch.tensor([module.out_features, module.in_features]))
        module.set_quantized(spec.quantize_weight(weight, config))
        if original.bias is not None:
            module.bias = nn.Parameter(original.bias.detach().clone(), requires_grad=False)
    if embeddings:
        quantize_embeddings(model, config)
    return _mark_quantized(model, config, skip)


def _mark_quantized(
    model: nn.Module, config: PtqConfig | SmoothQuantConfig, skip: list[str], quantizer: HfQuantizer | None = None
) -> nn.Module:
    """Attach the quantizer and config transformers expects on a quantized model (for save / reload / push)."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from .formats.save import attach_model_methods

    quantizer = quantizer or AUTO_QUANTIZER_MAPPING[config.quant_method](config, pre_quantized=False)
    quantizer.modules_to_not_convert = skip
    model.hf_quantizer = quantizer
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.add_model_tags(quantizer.model_tags())
    attach_model_methods(model)
    return model

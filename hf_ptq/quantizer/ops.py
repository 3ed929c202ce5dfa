"""The conversion op transformers runs on each float weight while loading: quantize it, emit packed tensors."""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps

from ..core.embeddings import pack_rows
from ..core.page_release import release_file_pages, trim_heap
from ..methods import method_spec
from ..nn.quant_embedding import PackedRows


class QuantizeOnLoad(ConversionOps):
    """Turns `{"<layer>.weight": float tensor}` into the layer's packed buffers, one layer at a time.

    The float weight is freed as soon as its packed form exists, so the full-precision model is never held.
    """

    def __init__(self, hf_quantizer) -> None:
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None, missing_keys=None, **kwargs
    ):
        value = next(iter(input_dict.values()))
        weight = value[0] if isinstance(value, list) else value
        module_name = full_layer_name.rsplit(".", 1)[0]
        module = model.get_submodule(module_name)
        if module.transposed_source:
            weight = weight.t()
        self.hf_quantizer.non_finite.check(weight, module_name)  # raised after loading: see core/finite.py
        config = self.hf_quantizer.quantization_config
        if isinstance(module, PackedRows):  # the input embedding or an untied head: `embeddings=` (RTN rows)
            qweight = None
            packed = {
                f"{module_name}.{k}": v for k, v in pack_rows(weight, module.scheme, module.weight_scale.dtype).items()
            }
        else:
            spec = method_spec(config.method)
            qweight = spec.quantize_without_statistics(weight, config.scheme_for(module_name), config.options)
            packed = module.packed_tensors(qweight, module_name + ".")
        packed = {k: v.to(weight.device) for k, v in packed.items()}
        release_file_pages(weight)
        module._parameters.pop("weight", None)  # the meta placeholder that routed the float weight here
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        input_dict.clear()  # the float weight is no longer needed: free it before trimming the heap
        del weight, value, qweight
        trim_heap()
        return packed

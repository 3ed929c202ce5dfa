"""Per-layer grids for a GGUF preset: quantize each Linear onto the grid of the type it will be exported as.

llama.cpp's presets give layers different types (Q4_K_M: Q4_K, Q6_K for some attn_v / ffn_down, and Q5_0 / Q8_0
where rows are not whole 256-input super-blocks, as in every 576-wide layer of SmolLM2). A model quantized with one
4-bit grid can only be written into those types by rounding again from its dequantized weights. `gguf_layer_schemes`
returns the `layer_schemes` map that quantizes every Linear onto its own type's grid (`gguf_types.TYPE_GRIDS`), so
that GPTQ / AWQ optimise the integers the file will hold: the export then writes them unchanged (32-block types) or
refits them (K-quants' sub-scales).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.layer_schemes import compact_schemes
from . import gguf_file
from .gguf_types import PRESETS, TYPE_GRIDS


def _model_config(model_config: Any) -> Any:
    if isinstance(model_config, (str, bytes)) or hasattr(model_config, "__fspath__"):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_config)
    if not hasattr(model_config, "model_type"):
        raise TypeError(
            f"gguf_layer_schemes: model_config must be a transformers config or a model id / folder, got "
            f"{type(model_config).__name__}"
        )
    return model_config


def layer_types(model_config: Any, gguf_type: str) -> dict[str, str]:
    """Every Linear of the model `model_config` describes (its output layer left out: hf_ptq keeps it float) ->
    the GGUF type `export(format="gguf", gguf_type=gguf_type)` writes it as. Built on the meta device: no weights."""
    from transformers import AutoModelForCausalLM

    if gguf_type not in PRESETS:
        raise ValueError(
            f"gguf_layer_schemes: gguf_type={gguf_type!r} is invalid: it must be one of {', '.join(PRESETS)} (a "
            "llama.cpp preset; 'auto' follows the model's own grids and needs no map)."
        )
    cfg = _model_config(model_config)
    arch, _ = gguf_file.check_architecture(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    gguf = gguf_file.gguf_module()
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    head = model.get_output_embeddings()
    types = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        gguf_name = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"gguf_layer_schemes: no GGUF tensor name for {name!r} (architecture {arch}).")
        shape = (module.out_features, module.in_features)
        types[name] = gguf_file.type_of(gguf_name, shape, None, gguf_type, False, "preset", cfg.num_hidden_layers)
    return types


def gguf_layer_schemes(model_config: Any, gguf_type: str) -> dict[str, dict[str, Any]]:
    """The `PtqConfig(layer_schemes=...)` map (compact: one regex per layer kind and grid) that quantizes each Linear
    of `model_config`'s model (a transformers config, or a model id / folder to read one from) onto the grid of the
    type `gguf_type` (a llama.cpp preset: "q4_k_m", "q4_0", ...) exports it as:

        schemes = hf_ptq.gguf_layer_schemes(model_id, "q4_k_m")
        cfg = hf_ptq.PtqConfig(method="gptq", bits=4, group_size=32, layer_schemes=schemes, dataset=texts)
        model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=cfg)
        hf_ptq.export(model, out, format="gguf", gguf_type="q4_k_m", tokenizer=tokenizer)
    """
    return compact_schemes({name: dict(TYPE_GRIDS[t]) for name, t in layer_types(model_config, gguf_type).items()})

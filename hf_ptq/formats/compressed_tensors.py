"""Export to compressed-tensors: what plain transformers (with the `compressed-tensors` package) and vLLM load.

hf_ptq's checkpoint tensors already are compressed-tensors' `pack-quantized` tensors, bit for bit: `weight_packed`
(int32 words, 32 values to `bits` words along the input dimension, value i at bits [i*bits, (i+1)*bits) of the
little-endian stream, stored offset by 2^(bits-1)), `weight_scale` [out, groups], `weight_zero_point` packed the same
way along the output dimension (per-tensor: int8 [1], unpacked), `weight_shape`, and `weight_g_idx` for act-order;
both dequantize `(q - zero_point) * scale`. So the export writes the same tensors and replaces `quantization_config`
with compressed-tensors' schema: one config group targeting `Linear` (one per scheme, naming its layers, for mixed
precision), the full-precision Linears in `ignore`.
Quantized embeddings and heads (`embeddings=`), which the schema has no place for, are written as their dequantized
float matrices (the head in `ignore`); such a model's `save_pretrained` keeps hf_ptq's own config block.

W8A8 models (`SmoothQuantConfig`) likewise hold compressed-tensors' `int-quantized` tensors (`weight` int8 [out, in],
`weight_scale` [out, 1], `input_scale` [1] for static activation scales): their group has int8 symmetric channel
weights and int8 symmetric input activations, per token and dynamic, or per tensor and static.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..nn import QuantLinear
from .checkpoint import write_checkpoint
from .export_formats import export_format
from .layers import (
    float_linears,
    float_state_dict,
    quantized_embeddings,
    quantized_layers,
    refuse_float_zero_points,
    refuse_transposed,
    w8a8_layers,
)

FORMAT = "compressed-tensors"
PACKED = "pack-quantized"
INT_QUANTIZED = "int-quantized"  # unpacked int8 weights; compressed-tensors' format for W8A8


def weight_args(bits: int, group_size: int, sym: bool, act_order: bool) -> dict[str, Any]:
    """compressed-tensors' `QuantizationArgs` of hf_ptq weights (only keys every supported version accepts)."""
    strategy = {-1: "channel", 0: "tensor"}.get(group_size, "group")
    args: dict[str, Any] = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": strategy,
        "group_size": group_size if strategy == "group" else None,
        "dynamic": False,
    }
    if act_order:  # columns reordered, `weight_g_idx` maps each input channel to its group
        args["actorder"] = "group"
    return args


def w8a8_activation_args(static: bool) -> dict[str, Any]:
    """compressed-tensors' `QuantizationArgs` of W8A8 input activations: int8 symmetric, one scale per token
    computed on every call (dynamic) or one per tensor from calibration (static, stored as `input_scale`)."""
    return {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "tensor" if static else "token",
        "group_size": None,
        "dynamic": not static,
    }


def _w8a8_scheme(model: nn.Module) -> bool | None:
    """For a W8A8 model, whether its activation scales are static (shared by every layer); None for other models.
    ValueError when it cannot be exported."""
    layers = w8a8_layers(model)
    if not layers:
        return None
    refuse_transposed(layers, FORMAT)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(
            f"export(format={FORMAT!r}) expects one scheme for all quantized layers; this model mixes W8A8 layers "
            "with weight-only ones. Supported: a model quantized with one SmoothQuantConfig or one PtqConfig."
        )
    statics = {m.static for _, m in layers}
    if len(statics) != 1:
        raise ValueError(
            f"export(format={FORMAT!r}) expects one activation scheme for all W8A8 layers, got static and dynamic"
        )
    return statics.pop()


def _schemes(model: nn.Module) -> dict[tuple[int, int, bool, bool], list[str]]:
    """(bits, group_size, sym, act_order) -> the quantized layers of that scheme (several for mixed precision), in
    model order; ValueError when the model cannot be exported."""
    layers = quantized_layers(model, FORMAT)
    refuse_float_zero_points(layers, FORMAT)
    schemes: dict[tuple[int, int, bool, bool], list[str]] = {}
    for name, m in layers:
        schemes.setdefault((m.bits, m.group_size, m.sym, m.weight_g_idx is not None), []).append(name)
    if len({sym for _, _, sym, _ in schemes}) > 1:
        raise ValueError(
            f"export(format={FORMAT!r}) expects one symmetry for all quantized layers, got {sorted(schemes)}"
        )
    if len(schemes) > 1 and not next(iter(schemes))[2]:
        raise ValueError(
            f"export(format={FORMAT!r}) cannot write asymmetric mixed-precision weights: transformers reads packed "
            "zero points only through its dequantize-on-load path, which decodes every dense layer with the first "
            "config group's scheme. Supported: a mixed-precision model quantized with sym=True (one config group per "
            "scheme), or this model with format='gguf' (a type per tensor)."
        )
    if any(act_order and not sym for _, _, sym, act_order in schemes):
        raise ValueError(
            f"export(format={FORMAT!r}) cannot write asymmetric act-order weights (weight_g_idx with zero points): "
            "transformers' compressed-tensors loader drops weight_g_idx when it dequantizes, and cannot read packed "
            "zero points otherwise. Supported: symmetric act-order, or any weights without act-order. Export this "
            "model with format='gptq', or quantize with sym=True, desc_act=False or static_groups=True."
        )
    return schemes


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` block of config.json for the exported model.

    One config group per scheme: targeting `Linear` when every quantized layer shares it, else the layers' names
    (mixed precision). Asymmetric group / channel weights get `dequantize: true`: transformers then unpacks the
    packed zero points while loading (its compressed path cannot load them); vLLM ignores the key.
    """
    static = _w8a8_scheme(model)
    if static is None:
        schemes = _schemes(model)
        sym = next(iter(schemes))[2] if schemes else True
        grouped = any(group_size != 0 for _, group_size, _, _ in schemes)
        parts = [(weight_args(*scheme), None, PACKED, names) for scheme, names in schemes.items()]
        fmt = PACKED
    else:  # W8A8: int8 symmetric channel weights, int8 activations
        sym, grouped, fmt = True, True, INT_QUANTIZED
        parts = [(weight_args(8, -1, True, False), w8a8_activation_args(static), INT_QUANTIZED, None)]
    groups = {
        f"group_{i}": {
            "targets": ["Linear"] if names is None or len(parts) == 1 else names,
            "weights": weights,
            "input_activations": activations,
            "output_activations": None,
            "format": part_fmt,
        }
        for i, (weights, activations, part_fmt, names) in enumerate(parts)
    }
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": float_linears(model),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    if not sym and grouped:
        config["dequantize"] = True
    return config


HF_PTQ_KEY = "hf_ptq"  # hf_ptq's own config inside a saved compressed-tensors block (its readers ignore the key)


def portable_block(model: nn.Module) -> dict[str, Any] | None:
    """config.json's `quantization_config` for `save_pretrained`: the compressed-tensors block that plain
    transformers (with compressed-tensors) and vLLM read, with hf_ptq's own config under `HF_PTQ_KEY` so that hf_ptq
    rebuilds exactly its model; None when compressed-tensors cannot express the model (`why_not_portable`)."""
    if quantized_embeddings(model):
        return None
    try:
        block = quantization_config(model)  # raises ValueError where `check` would (`why_not_portable`)
    except ValueError:
        return None
    return block | {HF_PTQ_KEY: model.config.quantization_config.to_dict()}


def why_not_portable(model: nn.Module) -> str | None:
    """Why compressed-tensors cannot hold `model` (quantized embeddings, float zero points, asymmetric act-order,
    GPT-2 Conv1D layers, mixed schemes, another package's modules), or None when it can."""
    embeddings = quantized_embeddings(model)
    if embeddings:
        return (
            f"export(format={FORMAT!r}): {embeddings[0]!r} holds a quantized embedding (embeddings="
            f"{getattr(model.config.quantization_config, 'embeddings', None)!r}), which compressed-tensors has no "
            "place for. export(format='compressed-tensors') writes it dequantized."
        )
    try:
        check(model)
    except ValueError as err:
        return str(err)
    return None


def check(model: nn.Module, tokenizer: Any = None) -> None:
    if _w8a8_scheme(model) is None:
        _schemes(model)


@export_format(
    FORMAT,
    "pack-quantized int2-8 weights, groups and act-order, and int-quantized W8A8; transformers and vLLM read it",
    check,
    w8a8=True,
)
def write(model: nn.Module, folder: Path, tokenizer: Any = None) -> None:
    write_checkpoint(model, folder, float_state_dict(model), quantization_config(model))

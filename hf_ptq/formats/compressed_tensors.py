"""Export to compressed-tensors: what plain transformers (with the `compressed-tensors` package) and vLLM load.

hf_ptq's checkpoint tensors already are compressed-tensors' `pack-quantized` tensors, bit for bit: `weight_packed`
(int32 words, 32 values to `bits` words along the input dimension, value i at bits [i*bits, (i+1)*bits) of the
little-endian stream, stored offset by 2^(bits-1)), `weight_scale` [out, groups], `weight_zero_point` packed the same
way along the output dimension (per-tensor: int8 [1], unpacked), `weight_shape`, and `weight_g_idx` for act-order;
both dequantize `(q - zero_point) * scale`. So the export writes the same tensors and replaces `quantization_config`
with compressed-tensors' schema: one config group targeting `Linear`, the full-precision Linears in `ignore`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import write_checkpoint
from .export import export_format
from .layers import float_linears, quantized_layers, refuse_float_zero_points

FORMAT = "compressed-tensors"
PACKED = "pack-quantized"


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


def _scheme(model: nn.Module) -> tuple[int, int, bool, bool]:
    """(bits, group_size, sym, act_order) shared by every quantized layer; ValueError when it cannot be exported."""
    layers = quantized_layers(model, FORMAT)
    refuse_float_zero_points(layers, FORMAT)
    schemes = {(m.bits, m.group_size, m.sym, m.weight_g_idx is not None) for _, m in layers}
    if len(schemes) != 1:
        raise ValueError(
            f"export(format={FORMAT!r}) expects one scheme for all quantized layers, got {sorted(schemes)}"
        )
    bits, group_size, sym, act_order = scheme = schemes.pop()
    if act_order and not sym:
        raise ValueError(
            f"export(format={FORMAT!r}) cannot write asymmetric act-order weights (weight_g_idx with zero points): "
            "transformers' compressed-tensors loader drops weight_g_idx when it dequantizes, and cannot read packed "
            "zero points otherwise. Supported: symmetric act-order, or any weights without act-order. Export this "
            "model with format='gptq', or quantize with sym=True, desc_act=False or static_groups=True."
        )
    return scheme


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` block of config.json for the exported model.

    Asymmetric group / channel weights get `dequantize: true`: transformers then unpacks the packed zero points
    while loading (its compressed path cannot load them); vLLM ignores the key.
    """
    bits, group_size, sym, act_order = _scheme(model)
    group = {
        "targets": ["Linear"],
        "weights": weight_args(bits, group_size, sym, act_order),
        "input_activations": None,
        "output_activations": None,
        "format": PACKED,
    }
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": PACKED,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": float_linears(model),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    if not sym and group_size != 0:
        config["dequantize"] = True
    return config


def check(model: nn.Module, tokenizer: Any = None) -> None:
    _scheme(model)


@export_format(FORMAT, "pack-quantized int2-8 weights, groups and act-order; transformers and vLLM read it", check)
def write(model: nn.Module, folder: Path, tokenizer: Any = None) -> None:
    write_checkpoint(model, folder, model.state_dict(), quantization_config(model))

"""Export to the GPTQ checkpoint format (`quant_method: "gptq"`): `checkpoint_format="gptq"` (v1, the default,
what every GPTQ reader takes) or `"gptq_v2"` (zero points stored as they are; gptqmodel's own loader takes it for
asymmetric weights, which it refuses in v1 unless gptqmodel itself wrote the file).

Per quantized Linear with `in` inputs, `out` outputs, `b` bits and `G` groups (G = 1 per-channel / per-tensor):
    qweight  int32 [in*b/32, out]   unsigned values u = q + 2^(b-1) in [0, 2^b), packed along the input dimension:
                                    value i of every run of 32 at bits [i*b, (i+1)*b) of the little-endian bit stream
                                    of b consecutive words (4-bit: eight to a word, the first in the lowest nibble;
                                    3-bit values straddle words)
    qzeros   int32 [G, out*b/32]    unsigned zero points MINUS ONE (the v1 convention; v2: the zero points), packed
                                    the same way along the output dimension; symmetric weights store 2^(b-1) - 1
                                    (0x77777777 for 4-bit; v2: 0x88888888)
    scales   float16 [G, out]
    g_idx    int32 [in]             group of each input channel (act-order: as GPTQ left it; else i // group_size)
    bias     [out]                  when the Linear has one
and a weight is `scales[g_idx[i], o] * (u[i, o] - (qzeros[g_idx[i], o] + 1))`. gptqmodel, vLLM (gptq / gptq_marlin)
and transformers' GPTQ integration read this v1 layout (gptqmodel converts it to its internal v2 by adding 1).

hf_ptq's packed words already are this bit stream along the input dimension, so `qweight` is `weight_packed`
transposed. A v1 zero point cannot be 0 (stored as -1, it overflows when loaders add 1): an asymmetric group whose
zero is 0 (all its weights >= 0) is shifted to zero 1 with its integers raised by one, which is exact unless the
group also holds the top value 2^b - 1; those values are clamped (one step of error) and counted in a warning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..core.packing import pack_int32
from ..core.quant import qrange
from ..nn import QuantLinear
from .checkpoint import write_checkpoint
from .export_formats import export_format
from .layers import float_linears, float_state_dict, quantized_layers, refuse_float_zero_points
from .third_party.gptq import BITS as GPTQ_BITS  # the bit widths GPTQ checkpoints hold, read and written

logger = logging.get_logger(__name__)

FORMAT = "gptq"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _group_of_inputs(layer: QuantLinear) -> torch.Tensor:
    """int64 [in]: the group of every input channel (g_idx), for grouped, per-channel and per-tensor layers."""
    if layer.weight_g_idx is not None:
        return layer.weight_g_idx.long()
    per_group = layer.in_features if layer.group_size <= 0 else layer.group_size
    return torch.arange(layer.in_features) // per_group


def gptq_tensors(layer: QuantLinear, v1: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """The GPTQ v1 (or v2) tensors of one layer (names without prefix), and how many values had to be clamped."""
    qw = layer.quantized_weight()
    bits, out_f = layer.bits, layer.out_features
    g_idx = _group_of_inputs(layer)
    groups = int(g_idx.max()) + 1
    scale = qw.scale.float().reshape(-1, 1).expand(out_f, groups) if layer.group_size == 0 else qw.scale.float()
    if qw.zero_point is None:
        zero = torch.zeros(out_f, groups, dtype=torch.int16)
    else:
        zp = qw.zero_point.to(torch.int16)
        zero = zp.reshape(1, 1).expand(out_f, groups).clone() if layer.group_size == 0 else zp.clone()
    q = qw.q.to(torch.int16)
    qmin, qmax = qrange(bits)
    # v1 stores zero - 1: move groups whose unsigned zero is 0 (signed qmin) to 1, raising their integers by one
    low = zero == qmin  # [out, groups]
    clamped = 0
    if v1 and low.any():
        raise_q = low.gather(1, g_idx.expand(out_f, -1))  # [out, in]: members of such groups
        clamped = int((raise_q & (q == qmax)).sum())
        q = torch.where(raise_q, (q + 1).clamp(max=qmax), q)
        zero = torch.where(low, zero + 1, zero)
    tensors = {
        "qweight": pack_int32(q.to(torch.int8).t().contiguous(), bits, dim=0),
        "qzeros": pack_int32((zero - 1 if v1 else zero).to(torch.int8).t().contiguous(), bits, dim=1),
        "scales": scale.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    return tensors, clamped


def _setting(cfg: Any, name: str, default: Any) -> Any:
    """A GPTQ setting of the hf_ptq config, or GPTQ's default where the method has none (e.g. RTN)."""
    value = getattr(cfg, name, None)
    return default if value is None else value


def quantization_config(model: nn.Module, checkpoint_format: str = "gptq") -> dict[str, Any]:
    """config.json's `quantization_config` (also written as quantize_config.json, where older loaders look)."""
    from ..version import __version__

    layers = quantized_layers(model, FORMAT)
    bits, group_size, sym = layers[0][1].bits, layers[0][1].group_size, layers[0][1].sym
    cfg = getattr(model.config, "quantization_config", None)
    config: dict[str, Any] = {
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "bits": bits,
        "group_size": group_size if group_size > 0 else -1,
        "desc_act": any(m.weight_g_idx is not None for _, m in layers),
        "sym": sym,
        "static_groups": _setting(cfg, "static_groups", False),
        "true_sequential": _setting(cfg, "true_sequential", True),
        "damp_percent": _setting(cfg, "damp_percent", 0.01),
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"hf_ptq:{__version__}"]},
    }
    skipped = [n for n in float_linears(model) if n != "lm_head"]
    if skipped:  # gptqmodel / vLLM: "-:" rules name modules left in full precision
        config["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in skipped}
    return config


def check(model: nn.Module, tokenizer: Any = None, checkpoint_format: str = "gptq") -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"export(format={FORMAT!r}) checkpoint_format={checkpoint_format!r} is invalid: checkpoint_format must be "
            "'gptq' (v1, read by every GPTQ loader) or 'gptq_v2' (gptqmodel's own loader)."
        )
    layers = quantized_layers(model, FORMAT)
    refuse_float_zero_points(layers, FORMAT)
    schemes = {(m.bits, m.group_size, m.sym) for _, m in layers}
    if len(schemes) != 1:
        raise ValueError(
            f"export(format={FORMAT!r}) expects one scheme for all quantized layers, got {sorted(schemes)} (bits, "
            "group_size, sym): GPTQ checkpoints hold one bit width and group size. A mixed-precision model exports "
            "with format='compressed-tensors' (one config group per scheme) or format='gguf' (a type per tensor)."
        )
    bits = layers[0][1].bits
    if bits not in GPTQ_BITS:
        raise ValueError(
            f"export(format={FORMAT!r}) writes {', '.join(map(str, GPTQ_BITS))}-bit weights (what GPTQ loaders read); "
            f"this model's are {bits}-bit. Export it with format='compressed-tensors' or format='gguf'."
        )
    per_word = 32 if bits == 3 else 32 // bits  # 3-bit values fill whole words only in runs of 32
    for name, layer in layers:
        for dim, size in (("in_features", layer.in_features), ("out_features", layer.out_features)):
            if size % per_word:
                raise ValueError(
                    f"export(format={FORMAT!r}): layer {name!r} has {dim}={size}, not a multiple of {per_word}; GPTQ "
                    f"packs {bits}-bit values {per_word} to whole int32 words along both dimensions. Supported: "
                    "layers whose in and out features are multiples of 32 / bits (32 for 3-bit)."
                )
        if layer.weight_scale.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"export(format={FORMAT!r}): layer {name!r} has scales beyond float16's range")


@export_format(
    FORMAT,
    "GPTQ v1 (or checkpoint_format='gptq_v2') qweight / qzeros / scales / g_idx; gptqmodel, vLLM, transformers read it",
    check,
    options=("checkpoint_format",),
)
def write(model: nn.Module, folder: Path, tokenizer: Any = None, checkpoint_format: str = "gptq") -> None:
    layers = dict(quantized_layers(model, FORMAT))
    # quantized embeddings / heads (`embeddings=`) as their dequantized matrices: GPTQ checkpoints hold float ones
    tensors = {k: v for k, v in float_state_dict(model).items() if k.rsplit(".", 1)[0] not in layers}
    clamped = 0
    for name, layer in logging.tqdm(layers.items(), desc="gptq export", unit="layer"):
        layer_tensors, n = gptq_tensors(layer, v1=checkpoint_format == "gptq")
        clamped += n
        tensors.update({f"{name}.{k}": v for k, v in layer_tensors.items()})
    if clamped:
        logger.warning(
            f"gptq export: {clamped} weight(s) in groups with zero point 0 were clamped by one step (the v1 format "
            "stores zero - 1 and cannot hold 0)."
        )
    config = quantization_config(model, checkpoint_format)
    write_checkpoint(model, folder, tensors, config)
    (folder / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

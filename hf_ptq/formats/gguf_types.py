"""GGUF tensor types for an export: which type each tensor gets (llama.cpp's presets), and its bytes.

Block types of 32 inputs (fp16 scale d per block, plus m where offset):
    Q8_0  w = d * q,  q in [-128, 127]       Q4_0  w = d * (u - 8),  u in [0, 15]   Q4_1  w = d * u + m, u in [0, 15]
    Q5_0  w = d * (u - 16), u in [0, 31]     Q5_1  w = d * u + m,    u in [0, 31]
K-quants, super-blocks of 256 inputs with 6- or 8-bit sub-block scales (`gguf_kquants`): Q4_K, Q5_K, Q6_K.

A hf_ptq weight is `n * scale`, `n = q - zero_point`. Into a 32-block type the integers are written unchanged
(only the scale is stored in fp16) wherever every block lies inside one hf_ptq group and its integers fit the type;
a 4-bit asymmetric grid (n in [-15, 15]) fits Q5_0 exactly. Into a K-quant, the super-block's sub-scales are 6-bit
(8-bit for Q6_K) multiples of one fp16 scale, which a hf_ptq grid rarely is: the K grid is fitted to the model's own
grid (`gguf_kquants.encode(..., grid=)`) and the model's (GPTQ / AWQ-optimised) weights are rounded onto it, keeping
their integers wherever the grid is reproduced. Anything else is quantized again from the dequantized weight, with a
warning. Float tensors (embeddings, layers kept in full precision) are quantized from their weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.quant import QuantizedWeight
from . import gguf_kquants
from .gguf_kquants import K_TYPES, SUPER_BLOCK

BLOCK = 32  # inputs per block of the 32-block types
TYPE_BITS = {"Q8_0": 8, "Q6_K": 6, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4}
EXACT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the 32-block types a hf_ptq grid can be written into
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # rows not a multiple of 256 inputs (as llama.cpp)


@dataclass(frozen=True)
class Preset:
    """A `gguf_type`: the layers' type, the output's, and llama.cpp's "more bits" rule for attn_v / ffn_down."""

    layers: str
    output: str = "Q6_K"
    more_bits: str | None = None  # "m": Q6_K on use_more_bits layers; "s": Q5_K on the first layers
    file_type: str = ""


PRESETS = {
    "q8_0": Preset("Q8_0", "Q8_0", file_type="MOSTLY_Q8_0"),
    "q4_0": Preset("Q4_0", file_type="MOSTLY_Q4_0"),
    "q4_1": Preset("Q4_1", file_type="MOSTLY_Q4_1"),
    "q4_k": Preset("Q4_K", file_type="MOSTLY_Q4_K_S"),
    "q4_k_s": Preset("Q4_K", more_bits="s", file_type="MOSTLY_Q4_K_S"),
    "q4_k_m": Preset("Q4_K", more_bits="m", file_type="MOSTLY_Q4_K_M"),
    "q5_k": Preset("Q5_K", file_type="MOSTLY_Q5_K_S"),
    "q5_k_s": Preset("Q5_K", file_type="MOSTLY_Q5_K_S"),
    "q5_k_m": Preset("Q5_K", more_bits="m", file_type="MOSTLY_Q5_K_M"),
    "q6_k": Preset("Q6_K", file_type="MOSTLY_Q6_K"),
}
GGUF_TYPES = ("auto", *PRESETS)
EMBEDDING_TYPES = ("preset", "f16")


def _use_more_bits(index: int, count: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in *_M mixes: the first and last eighth, every third."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


def fitted(type_name: str, in_features: int) -> str:
    """`type_name`, or llama.cpp's fallback when rows of `in_features` do not hold whole super-blocks."""
    if type_name in K_TYPES and in_features % SUPER_BLOCK:
        return FALLBACK[type_name]
    return type_name


def layer_type(preset: Preset, role: str, index: int, count: int) -> str:
    """The type of a Linear in block `index` of `count`: `role` is the GGUF tensor kind ("attn_v", "ffn_down", ...)."""
    value = role in ("attn_v", "attn_qkv")  # llama.cpp gives a fused q / k / v (Phi-3) attn_v's types
    if value or role == "ffn_down":
        if preset.more_bits == "m" and _use_more_bits(index, count):
            return "Q6_K"
        if preset.more_bits == "s" and index < (4 if value else count // 8):
            return "Q5_K"
    if value and count == 80 and preset.layers == "Q4_K":  # llama.cpp's 70B rule: 8 heads share each attn_v row
        return "Q5_K"
    return preset.layers


def more_bits_blocks(gguf_type: str, role: str, count: int) -> list[int]:
    """The blocks (of `count`) whose `role` tensor ("attn_v" or "ffn_down") preset `gguf_type` stores with more bits
    than its layers: quantize those Linears with more bits, or keep them in full precision (`modules_to_not_convert`),
    so that the export has more to write there than the 4-bit layers hold."""
    preset = PRESETS[gguf_type]
    return [i for i in range(count) if layer_type(preset, role, i, count) != preset.layers]


def auto_type(bits: int, sym: bool, float_zero_point: bool) -> str:
    """The smallest 32-block type holding a hf_ptq grid's integers exactly."""
    if bits > 5:
        return "Q8_0"
    size = 4 if bits <= 4 else 5
    return f"Q{size}_0" if sym and not float_zero_point else f"Q{size}_1"


# The hf_ptq grid whose integers each type holds as they are (a `layer_schemes` entry): the 32-block types exactly;
# Q4_K / Q5_K the asymmetric grid of groups of 32 their sub-blocks refit (`kquant_grid`); Q6_K the symmetric 6-bit
# full-range grid of its sub-blocks of 16 (its levels q - 32 in [-32, 31], the largest |w| on -32).
TYPE_GRIDS = {
    "Q8_0": {"bits": 8, "group_size": BLOCK, "sym": True, "full_range": True},
    "Q6_K": {"bits": 6, "group_size": 16, "sym": True, "full_range": True},
    "Q5_0": {"bits": 5, "group_size": BLOCK, "sym": True, "full_range": True},
    "Q5_1": {"bits": 5, "group_size": BLOCK, "sym": False, "full_range": False},
    "Q5_K": {"bits": 5, "group_size": BLOCK, "sym": False, "full_range": False},
    "Q4_0": {"bits": 4, "group_size": BLOCK, "sym": True, "full_range": True},
    "Q4_1": {"bits": 4, "group_size": BLOCK, "sym": False, "full_range": False},
    "Q4_K": {"bits": 4, "group_size": BLOCK, "sym": False, "full_range": False},
}


# ---- bytes ------------------------------------------------------------------------------------------------------


def _block_params(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """(q int16 [out, in/32, 32]; zero point [out, in/32] (integer or float) or None; scale fp32 [out, in/32]) of the
    blocks of 32 inputs of a layer's weight `qw`, or None when a block spans two hf_ptq groups."""
    if qw.g_idx is not None or (qw.group_size > 0 and qw.group_size % BLOCK):
        return None
    out_f, in_f = qw.q.shape
    blocks = in_f // BLOCK
    if qw.group_size == 0:
        scale = qw.scale.float().reshape(1, 1).expand(out_f, blocks)
        zero = None if qw.zero_point is None else qw.zero_point.reshape(1, 1).expand(out_f, blocks)
    else:
        repeat = blocks // qw.scale.shape[1]
        scale = qw.scale.float().repeat_interleave(repeat, dim=1)
        zero = None if qw.zero_point is None else qw.zero_point.repeat_interleave(repeat, dim=1)
    return qw.q.to(torch.int16).reshape(out_f, blocks, BLOCK), zero, scale


def encode_exact(qw: QuantizedWeight, type_name: str) -> np.ndarray | None:
    """A layer's integers (`qw`) as blocks of the 32-block type `type_name` (uint8 [out, in/32 * block bytes]),
    unchanged, with fp16 scales; None when they do not fit (blocks spanning groups, integers outside the type)."""
    params = _block_params(qw) if type_name in EXACT_TYPES else None
    if params is None:
        return None
    q, zero, scale = params
    d = scale.to(torch.float16)
    if not torch.isfinite(d).all():
        return None
    levels = 32 if type_name.startswith("Q5") else 16
    if zero is not None and zero.is_floating_point():  # HQQ: w = d * u + m, u = q + 2^(b-1), m = -d * (z + 2^(b-1))
        offset = 1 << (qw.bits - 1)
        if type_name not in ("Q4_1", "Q5_1") or 2 * offset > levels:
            return None
        m = (-(scale * (zero.float() + offset))).to(torch.float16)
        return _pack(type_name, d, q + offset, m)
    n = q if zero is None else q - zero.to(torch.int16).unsqueeze(-1)  # w = n * scale
    if type_name == "Q8_0":
        return None if n.min() < -128 or n.max() > 127 else _pack(type_name, d, n)
    if type_name in ("Q4_0", "Q5_0"):
        half = levels // 2
        return None if n.min() < -half or n.max() >= half else _pack(type_name, d, n + half)
    c = _offset(n, scale, levels)  # Q4_1 / Q5_1: u = n - c per block, m = d * c
    if c is None:
        return None
    return _pack(type_name, d, n - c.unsqueeze(-1), (scale * c.float()).to(torch.float16))


def _offset(n: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor | None:
    """Per block, the offset c (int16 [out, blocks]) with `n - c` in [0, levels) whose `m = scale * c` float16 holds
    best (exactly, for bf16 scales, in all but rare blocks); None when a block spans more than `levels` steps."""
    low, high = n.amin(-1), n.amax(-1)
    if (high - low).max() >= levels:
        return None
    candidates = low.unsqueeze(-1) - torch.arange(levels, dtype=torch.int16)  # [out, blocks, levels]
    m = scale.unsqueeze(-1) * candidates.float()
    error = (m.to(torch.float16).float() - m).abs()
    error[high.unsqueeze(-1) - candidates >= levels] = float("inf")
    return candidates.gather(-1, error.argmin(-1, keepdim=True)).squeeze(-1)


def _pack(type_name: str, d: torch.Tensor, u: torch.Tensor, m: torch.Tensor | None = None) -> np.ndarray:
    """Blocks of `type_name` from fp16 d [out, blocks], integers u [out, blocks, 32] (signed for Q8_0, else
    unsigned) and fp16 m [out, blocks] (Q4_1 / Q5_1)."""
    parts = [d.unsqueeze(-1)] + ([] if m is None else [m.unsqueeze(-1)])
    if type_name == "Q8_0":
        parts.append(u.to(torch.int8))
    else:
        u = u.to(torch.uint8)
        if type_name.startswith("Q5"):
            high = (u >> 4).to(torch.int32) << torch.arange(BLOCK, dtype=torch.int32)
            parts.append(high.sum(-1, dtype=torch.int32).unsqueeze(-1))  # bit j: the fifth bit of value j
            u = u & 15
        parts.append(u[..., :16] | (u[..., 16:] << 4))  # byte j: value j (low nibble), value j + 16 (high)
    as_bytes = [p.contiguous().view(torch.uint8) for p in parts]
    return torch.cat(as_bytes, dim=-1).reshape(u.shape[0], -1).numpy()


def kquant_grid(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A layer's grid (`qw`) per block of 32 as K-quants describe it, `w = scale * u - offset` with u = q + 2^(b-1)
    (scale, offset fp32 [out, in/32]); None when its blocks of 32 span groups."""
    params = _block_params(qw)
    if params is None:
        return None
    _, zero, scale = params
    shift = float(1 << (qw.bits - 1))
    offset = scale * shift if zero is None else scale * (zero.float() + shift)
    # full-range grids have negative scales; K-quants' are positive: count the levels from the other end,
    # w = scale * u - offset = (-scale) * (top - u) - (offset - top * scale)
    top = float((1 << qw.bits) - 1)
    negative = scale < 0
    offset = torch.where(negative, offset - top * scale, offset)
    return scale.abs().contiguous(), offset.contiguous()


def encode_float(weight: torch.Tensor, type_name: str) -> np.ndarray:
    """A float tensor [rows, cols] quantized to `type_name` (gguf's reference quantizer for the 32-block types,
    `gguf_kquants` for the K-quants); uint8 [rows, row bytes]."""
    import gguf

    w = weight.detach().float()
    if type_name in K_TYPES:
        return gguf_kquants.encode(w, type_name)
    return gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, type_name))

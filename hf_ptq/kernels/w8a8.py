"""int8 x int8 -> int32 matmuls for W8A8 layers, and the activation quantization they need.

Activations are quantized symmetrically to [-127, 127]: per token (one scale per row, `max|x_row| / 127`,
computed on every call: "dynamic") or per tensor with a scale fixed at calibration ("static"). `torch._int_mm`
multiplies the int8 activations by the int8 weight with int32 accumulation (VNNI / AMX on x86 CPUs, tensor cores on
CUDA), and the int32 result is rescaled by `input_scale[row] * weight_scale[out]` in fp32.

For few rows (decoding), quantizing the activations costs more than the matmul saves: there `W8A8Linear` uses the
int8 weight-only kernel with bf16 activations instead (see `weight_only_max_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..core.quant import qrange

INT8_MAX = qrange(8)[1]  # activations use the symmetric range [-127, 127]

# Up to this many rows a W8A8 layer runs the int8 weight-only kernel (bf16 activations, not quantized); more rows
# quantize the activations and run `torch._int_mm`. Crossover measured on a 2-core AMD EPYC (Zen 5, AVX512-VNNI
# and AVX512-BF16) for SmolLM2's layer shapes (576x576, 1536x576, 576x1536); see docs/smoothquant.md.
WEIGHT_ONLY_MAX_ROWS = 16
# `torch._int_mm` on CUDA needs more than 16 rows and inner / outer sizes that are multiples of 8.
_CUDA_MIN_ROWS = 17
_CUDA_MULTIPLE = 8


def weight_only_max_rows() -> int:
    """Most rows a W8A8 layer sends through the weight-only kernel; `HF_PTQ_KERNEL_MAX_ROWS` overrides it
    (0: every call quantizes its activations)."""
    override = kernels.KERNEL_MAX_ROWS
    return WEIGHT_ONLY_MAX_ROWS if override is None else override


def int_mm_supported(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, in], scale fp32 [rows, 1]) with `x ≈ q * scale` for x [rows, in]: one scale per row,
    `scale = max|x_row| / 127`, `q = round_half_even(x * (127 / max|x_row|))` (no clamp needed: |q| <= 127).
    Rows of zeros quantize to 0. One fp32 copy of x, then in-place ops (measured 16% faster than dividing)."""
    xf = x.to(torch.float32, copy=True)
    amax = xf.abs().amax(1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    q = xf.mul_(INT8_MAX / amax).round_().to(torch.int8)
    return q, amax.div_(INT8_MAX)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [rows, in] with `x ≈ q * scale` for x [rows, in] and a fixed fp32 scale [1]:
    `q = clamp(round_half_even(x / scale), -127, 127)` (values beyond 127 * scale saturate)."""
    return x.to(torch.float32, copy=True).div_(scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def int8_mm(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """q int8 [rows, in] @ weight int8 [out, in]ᵀ -> int32 [rows, out], exact (int32 accumulation).

    On CUDA the operands are zero-padded to the shapes `torch._int_mm` accepts (`padded_int_mm`)."""
    if q.device.type == "cuda":
        return padded_int_mm(q, weight, _CUDA_MIN_ROWS, _CUDA_MULTIPLE)
    return torch._int_mm(q, weight.t())


def padded_int_mm(q: torch.Tensor, weight: torch.Tensor, min_rows: int, multiple: int) -> torch.Tensor:
    """`int8_mm` with q zero-padded to at least `min_rows` rows and the inner and output sizes to multiples of
    `multiple`; the padding only adds zero products, and the result is cut back to [rows, out]."""
    rows, inner = q.shape
    out = weight.shape[0]
    pad_rows, pad_inner, pad_out = max(min_rows - rows, 0), -inner % multiple, -out % multiple
    if pad_rows or pad_inner:
        q = F.pad(q, (0, pad_inner, 0, pad_rows))
    if pad_inner or pad_out:
        weight = F.pad(weight, (0, pad_inner, 0, pad_out))
    return torch._int_mm(q, weight.t())[:rows, :out]


def w8a8_matmul(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None
) -> torch.Tensor:
    """x [rows, in] -> fp32 [rows, out]: activations quantized (per token when `input_scale` is None, else with
    that fp32 [1] scale), int8 matmul against weight int8 [out, in], rescaled by the activation scale and
    weight_scale fp32 [out]."""
    if input_scale is None:
        q, scale = quantize_per_token(x)
    else:
        q, scale = quantize_per_tensor(x, input_scale), input_scale
    return int8_mm(q, weight).float().mul_(scale).mul_(weight_scale)

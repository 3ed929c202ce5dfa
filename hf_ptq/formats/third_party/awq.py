"""Loading AWQ checkpoints (AutoAWQ, gptqmodel, llm-awq's GEMM layout) onto hf_ptq's packed modules.

AutoAWQ's GEMM layout, per quantized Linear with `in` inputs, `out` outputs, 4 bits and `G` groups:
    qweight  int32 [in, out/8]   unsigned 4-bit values packed along the OUTPUT dimension, eight to a word in the
                                 interleaved order of AWQ's kernels: nibble i of word c holds output 8c + ORDER[i]
    qzeros   int32 [G, out/8]    unsigned zero points, packed the same way
    scales   float [G, out]
    bias     [out]
and a weight is `scales[g, o] * (q[i, o] - zero[g, o])` with g = i // group_size. `zero_point: false`
checkpoints hold no `qzeros`: their zero is the middle of the grid, 8 (as compressed-tensors' AutoAWQ converter
reads them). The loader unpacks the nibbles,
transposes and repacks them along the input dimension as hf_ptq's `weight_packed`.

The GEMV layout (AutoAWQ / gptqmodel `version: gemv`) packs along the input instead, in plain order:
    qweight  int32 [out, in/8]   nibble i of word c holds input 8c + i: hf_ptq's `weight_packed`, as it is
    qzeros   int32 [out, W]      zero points of the groups of each output, packed the same way
    scales   float [out, 8W]     W = the group count in words, rounded up (see `gemv_zeros_width`), padded with 0
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.packing import pack_int32, unpack_int32
from ..safetensors_file import TensorEntry
from .shell import CheckpointLinear

FORMAT = "awq"
VERSIONS = ("gemm", "gemv")
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column (within a run of 8) held by nibble i of a word
_NIBBLE_OF_COLUMN = tuple(ORDER.index(c) for c in range(8))


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, n/8] in AWQ's interleaved order -> unsigned values int16 [rows, n] in column order."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # [rows, n/8, 8]: nibble i of each word
    order = torch.tensor(_NIBBLE_OF_COLUMN, device=words.device)
    return nibbles[..., order].reshape(words.shape[0], -1).to(torch.int16)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_awq`: unsigned 4-bit values [rows, n] -> int32 [rows, n/8] (for tests and exports)."""
    rows = values.shape[0]
    runs = values.to(torch.int64).view(rows, -1, 8)[..., list(ORDER)]  # nibble i holds column ORDER[i]
    words = (runs << torch.arange(0, 32, 4, device=values.device)).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


class AwqGemmLinear(CheckpointLinear):
    """An AWQ GEMM Linear's tensors as saved, converted into a `QuantLinear` after loading."""

    checkpoint_format = FORMAT

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group_size: int, dtype: torch.dtype, zero_point: bool
    ) -> None:
        super().__init__(in_features, out_features, bias, 4, group_size, dtype)
        self.register_buffer("qweight", torch.empty(in_features, out_features // 8, dtype=torch.int32))
        zeros = torch.empty(self.groups, out_features // 8, dtype=torch.int32) if zero_point else None
        self.register_buffer("qzeros", zeros)
        self.register_buffer("scales", torch.empty(self.groups, out_features, dtype=dtype))

    def explain(self, tensor: str) -> str:
        return {
            "qweight": "AWQ GEMM packs 4-bit values eight to a word along the output",
            "qzeros": f"the config says group_size={self.group_size}",
            "scales": f"the config says group_size={self.group_size}",
        }.get(tensor, super().explain(tensor))

    def facts(self) -> tuple[bool, bool]:
        return self.qzeros is None or bool((unpack_awq(self.qzeros) == 8).all()), False

    def convert(self, sym: bool, act_order: bool) -> torch.nn.Module:
        q = (unpack_awq(self.qweight) - 8).to(torch.int8).t().contiguous()  # [out, in], signed
        zero = None
        if not sym:
            zeros = unpack_awq(self.qzeros) if self.qzeros is not None else torch.full_like(self.scales, 8)
            zero = (zeros - 8).to(torch.int8).t().contiguous()
        return self._quant_linear(q, self.scales.t(), zero, sym, None, packed=pack_int32(q, 4, dim=1))


def _layout(config: Any) -> str:
    """The saved `version` ("gemm", ...); transformers holds it as an `AwqFormat` enum member."""
    fmt = getattr(config, "format", "gemm")
    return str(getattr(fmt, "value", fmt)).lower()


def gemv_zeros_width(in_features: int, group_size: int) -> int:
    """Words of GEMV `qzeros` per output: the groups in words of 8, rounded up to a multiple of 8 / 4 / 2 / 1
    words for group sizes 16 / 32 / 64 / 128 and more (AutoAWQ's `calculate_zeros_width`)."""
    words = -(-(in_features // group_size) // 8)
    multiple = 1 if group_size >= 128 else 2 if group_size >= 64 else 4 if group_size >= 32 else 8
    return -(-words // multiple) * multiple


class AwqGemvLinear(CheckpointLinear):
    """An AWQ GEMV Linear's tensors as saved, converted into a `QuantLinear` after loading."""

    checkpoint_format = FORMAT

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, bias, 4, group_size, dtype)
        width = gemv_zeros_width(in_features, group_size)
        self.register_buffer("qweight", torch.empty(out_features, in_features // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(out_features, width, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(out_features, 8 * width, dtype=dtype))

    def _zeros(self) -> torch.Tensor:
        """Signed zero points int8 [out, groups]."""
        return unpack_int32(self.qzeros, 4, self.groups, dim=1)

    def facts(self) -> tuple[bool, bool]:
        return bool((self._zeros() == 0).all()), False

    def convert(self, sym: bool, act_order: bool) -> torch.nn.Module:
        zero = None if sym else self._zeros()  # qweight already is hf_ptq's weight_packed: every nibble is a value
        scale = self.scales[:, : self.groups]
        return self._quant_linear(None, scale, zero, sym, None, packed=self.qweight.contiguous())


def describe(config: Any) -> str:
    group = "per-channel" if config.group_size == -1 else f"g{config.group_size}"
    return f"AWQ ({_layout(config).upper()}) {config.bits}-bit {group}" + (
        "" if config.zero_point else " no-zero-point"
    )


def check_config(config: Any) -> None:
    """ValueError naming the field for AWQ settings hf_ptq does not run, before any weight is read."""
    fmt = _layout(config)
    if fmt not in VERSIONS:
        raise ValueError(
            f"quantization_config.version={fmt!r}: hf_ptq runs AWQ checkpoints in the layouts "
            f"{', '.join(map(repr, VERSIONS))} (exllama, ipex and marlin layouts are refused). Choose "
            "transformers' own loader for it: hf_ptq.use_backend('awq', 'transformers')."
        )
    if config.bits != 4:
        raise ValueError(f"quantization_config.bits={config.bits!r}: AWQ's GEMM layout holds 4-bit weights only.")


def layer_for(
    config: Any, name: str, module: torch.nn.Linear, tensors: dict[str, TensorEntry], dtype: torch.dtype
) -> CheckpointLinear | None:
    """The shell for Linear `name` when the checkpoint holds `name.qweight`, else None (kept in full precision)."""
    if f"{name}.qweight" not in tensors:
        return None
    in_f, out_f, bias = module.in_features, module.out_features, module.bias is not None
    if _layout(config) == "gemv":
        if config.group_size <= 0:
            raise ValueError("quantization_config.group_size=-1: hf_ptq runs AWQ GEMV checkpoints with groups only.")
        return AwqGemvLinear(in_f, out_f, bias, config.group_size, dtype)
    # gptqmodel writes qzeros (all 8) also for zero_point=False; AutoAWQ-style files without them mean zero 8
    return AwqGemmLinear(in_f, out_f, bias, config.group_size, dtype, f"{name}.qzeros" in tensors)

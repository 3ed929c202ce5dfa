"""Loading GPTQ checkpoints (AutoGPTQ, gptqmodel, optimum, TheBloke's) onto hf_ptq's packed modules.

Per quantized Linear with `in` inputs, `out` outputs, `b` bits and `G` groups (see `hf_ptq.formats.gptq`, the
exporter, for the same layout written down):
    qweight  int32 [in*b/32, out]   unsigned values packed along the input, a little-endian bit stream per column
    qzeros   int32 [G, out*b/32]    unsigned zero points packed along the output; `checkpoint_format` "gptq" (v1)
                                    stores zero - 1, "gptq_v2" the zero itself
    scales   float [G, out]
    g_idx    int32 [in]             group of each input channel (act-order: a permutation's groups)
    bias     [out]                  when the Linear has one
A weight is `scales[g, o] * (u[i, o] - zero[g, o])` with g = g_idx[i]. hf_ptq's `weight_packed` is the same bit
stream along the input, so `qweight` becomes it by a transpose; zero points are unpacked, offset and repacked.

v1 zero points are read the way gptqmodel (the tool that writes most GPTQ checkpoints today) converts v1 to v2:
for 2, 4 and 8 bits it adds 1 to every field of the packed word at once (0x11111111 for 4 bits), so a zero of 0,
which its writer stores as a borrow into the next field, reads back exactly; for 3 bits each field gets 1 added,
modulo 2^b. Checkpoints without zeros of 0 (AutoGPTQ's) read the same either way.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.packing import unpack_int32
from ..safetensors_file import TensorEntry
from .shell import CheckpointLinear

FORMAT = "gptq"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 (zero - 1 stored) and v2 (zero stored)
BITS = (2, 3, 4, 8)
_V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}  # a 1 in every field of a word


class GptqLinear(CheckpointLinear):
    """A GPTQ Linear's tensors as saved, converted into a `QuantLinear` after loading."""

    checkpoint_format = FORMAT

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int,
        dtype: torch.dtype,
        v1: bool,
        has_g_idx: bool,
    ) -> None:
        super().__init__(in_features, out_features, bias, bits, group_size, dtype)
        self.v1 = v1
        groups = -(-in_features // group_size) if group_size > 0 else 1
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, -(-out_features * bits // 32), dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=dtype))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32) if has_g_idx else None)

    def explain(self, tensor: str) -> str:
        return {
            "qweight": f"the config says bits={self.bits}",
            "qzeros": f"the config says bits={self.bits}, group_size={self.group_size}",
            "scales": f"the config says group_size={self.group_size}",
            "g_idx": "GPTQ layers carry a g_idx",
        }.get(tensor, super().explain(tensor))

    def _zeros(self) -> torch.Tensor:
        """Unsigned zero points int16 [groups, out]."""
        mid, mask = 1 << (self.bits - 1), (1 << self.bits) - 1
        words = self.qzeros
        if self.v1 and self.bits in _V1_WORD_OFFSET:  # one added to every field, carries included
            total = (words.to(torch.int64) + _V1_WORD_OFFSET[self.bits]) & 0xFFFFFFFF
            words = (total - ((total >> 31) << 32)).to(torch.int32)
        zeros = unpack_int32(words, self.bits, self.out_features, dim=1).to(torch.int16) + mid
        return (zeros + 1) & mask if self.v1 and self.bits not in _V1_WORD_OFFSET else zeros

    def facts(self) -> tuple[bool, bool]:
        return bool((self._zeros() == 1 << (self.bits - 1)).all()), self._is_act_order(self.g_idx)

    def convert(self, sym: bool, act_order: bool) -> torch.nn.Module:
        g_idx = None
        if act_order:
            g_idx = self.g_idx if self.g_idx is not None else self._natural_g_idx(self.qweight.device)
            self._check_g_idx("g_idx", g_idx)
        zero = None if sym else (self._zeros() - (1 << (self.bits - 1))).to(torch.int8).t().contiguous()
        return self._quant_linear(None, self.scales.t(), zero, sym, g_idx, packed=self.qweight.t().contiguous())


def describe(config: Any) -> str:
    """One line for logs, e.g. `GPTQ (checkpoint_format gptq) 4-bit g128 act-order`."""
    group = "per-channel" if config.group_size == -1 else f"g{config.group_size}"
    text = f"GPTQ (checkpoint_format {config.format}) {config.bits}-bit {group}"
    return text + (" act-order" if config.desc_act else "")


def check_config(config: Any) -> None:
    """ValueError naming the field for GPTQ settings hf_ptq does not run, before any weight is read. (gptqmodel's
    per-module `dynamic` rules do not survive transformers' `GPTQConfig`: modules left in full precision are found
    from the tensors, and a module quantized with other bits fails the layout check.)"""
    fmt = str(getattr(config, "format", "gptq")).lower()
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"quantization_config.checkpoint_format={fmt!r}: hf_ptq runs GPTQ checkpoints in the formats "
            f"{', '.join(map(repr, CHECKPOINT_FORMATS))} (marlin, bitblas, ipex and other repacked layouts are "
            "refused). Choose transformers' own loader for it: hf_ptq.use_backend('gptq', 'transformers')."
        )
    if config.bits not in BITS:
        raise ValueError(f"quantization_config.bits={config.bits!r}: hf_ptq runs GPTQ with bits in {BITS}.")


def layer_for(
    config: Any, name: str, module: torch.nn.Linear, tensors: dict[str, TensorEntry], dtype: torch.dtype
) -> GptqLinear | None:
    """The shell for Linear `name` when the checkpoint holds `name.qweight`, else None (kept in full precision)."""
    if f"{name}.qweight" not in tensors:
        return None
    in_f, out_f, bias = module.in_features, module.out_features, module.bias is not None
    return GptqLinear(
        in_f,
        out_f,
        bias,
        config.bits,
        config.group_size,
        dtype,
        v1=str(config.format).lower() == "gptq",
        has_g_idx=f"{name}.g_idx" in tensors,
    )

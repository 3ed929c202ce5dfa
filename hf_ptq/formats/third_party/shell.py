"""`CheckpointLinear`: a Linear's tensors as another tool wrote them, held only until they are converted.

transformers loads a checkpoint's tensors into modules whose buffers carry the checkpoint's names. For formats whose
names or layouts differ from hf_ptq's (GPTQ's `qweight` / `qzeros`, AWQ's interleaved nibbles, unpacked int8
weights), the loader builds one of these shells per quantized Linear on the meta device; after the weights are
loaded, each shell converts itself into a `QuantLinear` (or `W8A8Linear`) and is dropped, so a model holds at most
one layer twice and the float weights are never built.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.quant import QuantizedWeight, qrange
from ...nn import QuantLinear
from ..safetensors_file import CheckpointError


class CheckpointLinear(nn.Module):
    """Base of the shells: shapes, bias, and the conversion helpers every format shares."""

    checkpoint_format = ""  # e.g. "gptq", named in errors
    transposed_source = False

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int, dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.dtype = dtype
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @property
    def groups(self) -> int:
        return 1 if self.group_size <= 0 else self.in_features // self.group_size

    def explain(self, tensor: str) -> str:
        """Which setting of the checkpoint's config decides the shape of `tensor` (for layout errors)."""
        return f"{self.checkpoint_format} layer with bits={self.bits}, group_size={self.group_size}"

    def facts(self) -> tuple[bool, bool]:
        """(symmetric, act-order) of this layer's data: every zero point at the middle of the grid; a group index
        that is not the natural `i // group_size`. The loader decides once for all layers."""
        raise NotImplementedError

    def convert(self, sym: bool, act_order: bool) -> nn.Module:
        """The hf_ptq module holding this layer's weights (on the shell's device)."""
        raise NotImplementedError

    # --- shared helpers --------------------------------------------------------------------------------------
    def _natural_g_idx(self, device: torch.device) -> torch.Tensor:
        per_group = self.in_features if self.group_size <= 0 else self.group_size
        return torch.arange(self.in_features, device=device) // per_group

    def _is_act_order(self, g_idx: torch.Tensor | None) -> bool:
        return g_idx is not None and not torch.equal(g_idx.long(), self._natural_g_idx(g_idx.device))

    def _check_g_idx(self, name: str, g_idx: torch.Tensor) -> None:
        groups, g = self.groups, g_idx.long()
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
            raise CheckpointError(
                f"{name}: group indices must lie in [0, {groups}) for group_size={self.group_size}; found "
                f"[{int(g.min())}, {int(g.max())}]"
            )
        sizes = torch.bincount(g, minlength=groups)
        if self.group_size > 0 and not bool((sizes == self.group_size).all()):
            raise CheckpointError(
                f"{name}: act-order groups of {self.group_size} channels each are supported; group sizes found "
                f"{sizes.unique().tolist()}"
            )

    def _quant_linear(
        self,
        q: torch.Tensor | None,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        sym: bool,
        g_idx: torch.Tensor | None,
        packed: torch.Tensor | None = None,
    ) -> QuantLinear:
        """A `QuantLinear` from signed integers `q` int8 [out, in] (or, when given, `packed`: them already packed
        as `weight_packed`), scales [out, groups], signed zero points int8 [out, groups] (None: symmetric) and
        `g_idx` [in] (act-order only)."""
        for name, values in (("weight", q), ("zero point", zero)):
            lo, hi = qrange(self.bits)
            if values is not None and values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
                raise CheckpointError(f"{self.checkpoint_format} {name} values outside the {self.bits}-bit grid")
        if not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"{self.checkpoint_format} layer has non-finite scales (NaN or inf)")
        layer = QuantLinear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            self.bits,
            self.group_size,
            sym,
            dtype=self.dtype,
            act_order=g_idx is not None,
            device=scale.device,
        )
        if packed is None:
            layer.set_quantized(QuantizedWeight(q, scale, None if sym else zero, self.bits, self.group_size, g_idx))
        else:
            layer.weight_packed = packed
            layer.weight_scale = scale.to(self.dtype).contiguous()
            if not sym:
                layer.weight_zero_point = layer._stored_zero_point(zero)
            if g_idx is not None:
                layer.weight_g_idx = g_idx.to(torch.int32)
            layer.invalidate_caches()
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().to(self.dtype), requires_grad=False)
        return layer

"""`W8A8Linear`: int8 weights and int8 activations, multiplied as integers (SmoothQuant's W8A8).

Buffers carry the checkpoint names of compressed-tensors' `int-quantized` format (scheme W8A8: int8 weights with
a symmetric scale per output channel; int8 activations, dynamic per token or static per tensor), so
`state_dict()` is the on-disk layout and safetensors round-trips with no converter:
    weight         int8 [out, in]
    weight_scale   [out, 1], in the model's dtype
    input_scale    [1], in the model's dtype; static activation scales only
    bias           [out], when the Linear had one
Forward, by the number of rows (tokens x batch) of the call, on CPU and CUDA:
- more than `weight_only_max_rows(x)` (4 on CPU, 16 without the C kernels or on CUDA; prefill, batches): the
  activations are quantized to int8 (per token, or with `input_scale`), `torch._int_mm` multiplies them by the
  int8 weight with int32 accumulation, and the result is rescaled in fp32: the W8A8 computation.
- up to that many rows (decoding): the int8 weight-only kernel runs with bf16 activations, which are *not*
  quantized: int8 weights, bf16 activations (W8A16), faster for one row and at least as accurate.
On other devices the W8A8 computation runs with fp32 matmuls of the same integers.
With autograd on (an adapter trained around the layer), the input gradient is the straight-through one, from the
dequantized weight (`hf_ptq.nn.frozen_grad`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..core.quant import QuantizedWeight, W8A8Weight, dequantize, round_onto
from ..kernels import w8a8
from .frozen_grad import frozen_matmul, needs_input_grad
from .quant_linear import QuantLinear, _bf16_rows


class W8A8Linear(nn.Module):
    """int8 x int8 replacement for `nn.Linear` (and GPT-2's transposed `Conv1D`)."""

    transposed_source = False  # True when the float weight it replaces is stored [in, out] (GPT-2 Conv1D)
    bits, group_size = 8, -1  # int8 weights, one scale per output channel

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        static: bool,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device}
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, **kw))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=dtype, **kw))
        if static:
            self.register_buffer("input_scale", torch.empty(1, dtype=dtype, **kw))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self._scales: dict[tuple, torch.Tensor] = {}  # weight / input scales in the dtypes the kernels take

    @property
    def static(self) -> bool:
        """True for a static per-tensor activation scale, False for dynamic per-token scales."""
        return self.input_scale is not None

    def set_quantized(self, w: W8A8Weight) -> None:
        """Store `w` (shapes and activation scheme must match the constructor's)."""
        qw = w.weight
        if tuple(qw.q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight shape {tuple(qw.q.shape)} != {(self.out_features, self.in_features)}")
        if qw.bits != 8 or qw.group_size != -1 or qw.zero_point is not None:
            raise ValueError("W8A8Linear holds 8-bit symmetric per-channel weights (bits=8, group_size=-1, sym)")
        if (w.input_scale is not None) != self.static:
            raise ValueError(f"this W8A8Linear has {'static' if self.static else 'dynamic'} activation scales")
        self.weight = qw.q.to(torch.int8).contiguous()
        self.weight_scale = qw.scale.reshape(self.out_features, 1).to(self.weight_scale.dtype)
        if self.static:
            self.input_scale = w.input_scale.reshape(1).to(self.input_scale.dtype)
        self.invalidate_caches()

    def invalidate_caches(self) -> None:
        """Drop the scales cached in kernel dtypes, after changing the buffers."""
        self._scales.clear()

    # Multiply output channels (their scales and bias) by factors, exactly as QuantLinear does with its row scales:
    # how a smoothing scale is folded into a quantized producer (v_proj before o_proj, up_proj before down_proj).
    scale_output_channels_ = QuantLinear.scale_output_channels_

    def quantized_weight(self) -> W8A8Weight:
        """The stored weight and activation scheme (what `set_quantized` took), e.g. for exporters."""
        qw = QuantizedWeight(self.weight, self.weight_scale, None, 8, -1)
        return W8A8Weight(qw, self.input_scale)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] the int8 values stand for, in `dtype` (default: the scale's dtype)."""
        return dequantize(self.weight, self.weight_scale, None, -1, None, dtype or self.weight_scale.dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Store `weight` [out, in] rounded onto this layer's own per-channel scales (a merged LoRA delta)."""
        qw = self.quantized_weight()
        qw.weight.q = round_onto(weight, qw.weight)
        self.set_quantized(qw)

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_input_grad(x, self.bias):  # training an adapter: straight-through input gradient
            dense = kernels.compute_dtypes("auto", x)[1]
            grad = lambda g: g.to(dense) @ self.dequantized_weight(dense)  # noqa: E731
            return frozen_matmul(x, self.bias, self._forward_frozen, grad)
        return self._forward_frozen(x)

    def _forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= w8a8.weight_only_max_rows(x2) and w8a8.int_mm_supported(x2.device):
            y = kernels.int8_matmul(_bf16_rows(x2), self.weight, self._scale("weight", torch.bfloat16))
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        else:
            y = self._w8a8(x2, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_w8a8(self, x: torch.Tensor) -> torch.Tensor:
        """The W8A8 computation (quantized activations, int8 matmul) whatever the number of rows, fp32 out."""
        return self._w8a8(x.reshape(-1, self.in_features), torch.float32).reshape(*x.shape[:-1], self.out_features)

    def _w8a8(self, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x2 [rows, in] -> [rows, out] in `out_dtype`, bias included (added in fp32, one final rounding):
        `torch._int_mm` on CPU / CUDA, fp32 matmuls elsewhere."""
        bias = self._scale("bias", torch.float32) if self.bias is not None else None
        weight_scale = self._scale("weight", torch.float32)
        if not w8a8.int_mm_supported(x2.device):
            q, scale = self.quantize_input(x2)
            return w8a8.rescale(q.float() @ self.weight.float().t(), scale, weight_scale, bias).to(out_dtype)
        input_scale = self._scale("input", torch.float32) if self.static else None
        return w8a8.w8a8_matmul(x2, self.weight, weight_scale, input_scale, out_dtype, bias)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The W8A8 computation in float64 from the stored integers and scales, fp32 out: what the int8 path is
        checked against (float64 represents every int32 accumulator exactly)."""
        x2 = x.reshape(-1, self.in_features)
        q, scale = self.quantize_input(x2)
        acc = q.double() @ self.weight.double().t()
        y = acc * scale.double() * self.weight_scale.double().reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.double()
        return y.float().reshape(*x.shape[:-1], self.out_features)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [rows, in], scale fp32 [rows, 1] or [1]): the int8 activations the W8A8 path multiplies."""
        if self.static:
            scale = self.input_scale.float()
            return w8a8.quantize_per_tensor(x2, scale), scale
        return w8a8.quantize_per_token(x2)

    def _scale(self, which: str, dtype: torch.dtype) -> torch.Tensor:
        """`weight_scale` as [out], `input_scale` as [1] or `bias` as [out] in `dtype` (contiguous, on the
        buffers' device), cached until the buffers change (`invalidate_caches`)."""
        key = (which, dtype)
        cached = self._scales.get(key)
        if cached is None:
            source = {"weight": self.weight_scale.reshape(-1), "input": self.input_scale, "bias": self.bias}[which]
            cached = self._scales[key] = source.detach().to(dtype).contiguous()
        return cached

    def _apply(self, fn, recurse: bool = True):
        self.invalidate_caches()  # cached scales follow the buffers' device and dtype
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_caches()  # load_state_dict copies new values into the buffers
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        acts = "static per-tensor" if self.static else "dynamic per-token"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel weights, "
            f"int8 {acts} activations, bias={self.bias is not None}"
        )

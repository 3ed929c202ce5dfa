"""Gradients through a frozen quantized layer: y = x W^T + b by the layer's own inference kernels, dL/dx = dL/dy W.

The packed kernels (torch's int4 / int8 weight-only ops, hf_ptq's C kernels, `torch._int_mm`) have no backward, and
autograd through the dense path would keep each layer's dequantized weight alive from forward to backward: a float
copy of the whole model during every training step. Here the forward runs exactly as in inference and saves no
tensor; the backward dequantizes the layer's weight once, multiplies, and drops it. W8A8 layers quantize their
activations in forward: their input gradient is the straight-through one (the rounding of the activations is taken
as the identity), as in quantization-aware training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def needs_input_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a call with input x must build a graph (grad mode on, and x or the bias requires a gradient)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


class _FrozenWeightMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, forward, weight, dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return forward(x)  # autograd runs this with grad mode off: the inference path

    @staticmethod
    def backward(ctx, grad_y):
        out_features = grad_y.shape[-1]
        g2 = grad_y.reshape(-1, out_features)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.weight(ctx.dtype)  # [out, in], built now and dropped after the product
            grad_x = (g2.to(ctx.dtype) @ w).to(ctx.x_dtype).reshape(*grad_y.shape[:-1], w.shape[1])
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            grad_bias = g2.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None


def frozen_matmul(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    forward: Callable[[torch.Tensor], torch.Tensor],
    weight: Callable[[torch.dtype], torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """`forward(x)` (x [..., in] -> [..., out], bias included) with gradients for x and `bias`: dL/dx = dL/dy @
    `weight(dtype)`, the layer's weight [out, in] built during backward only, multiplied in `dtype` (the layer's
    dense-path dtype: fp32 on CPUs without fast bf16) and returned in x's dtype."""
    return _FrozenWeightMatmul.apply(x, bias, forward, weight, dtype)

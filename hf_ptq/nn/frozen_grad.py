"""Gradients through a frozen quantized layer: y = x W^T + b by the layer's own inference kernels, dL/dx = dL/dy W.

The packed kernels (torch's int4 / int8 weight-only ops, hf_ptq's C kernels, `torch._int_mm`) have no backward, and
autograd through the dense path would keep each layer's dequantized weight alive from forward to backward: a float
copy of the whole model during every training step. Here the forward runs exactly as in inference and saves no
tensor; the backward dequantizes the layer's weight (a large head: a chunk of rows at a time), multiplies, and drops
it. W8A8 layers quantize their
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
    def forward(ctx, x, bias, forward, input_grad):
        ctx.input_grad, ctx.x_dtype = input_grad, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return forward(x)  # autograd runs this with grad mode off: the inference path

    @staticmethod
    def backward(ctx, grad_y):
        out_features = grad_y.shape[-1]
        g2 = grad_y.reshape(-1, out_features)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.input_grad(g2).to(ctx.x_dtype)
            grad_x = grad_x.reshape(*grad_y.shape[:-1], grad_x.shape[-1])
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            grad_bias = g2.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


def frozen_matmul(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    forward: Callable[[torch.Tensor], torch.Tensor],
    input_grad: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`forward(x)` (x [..., in] -> [..., out], bias included) with gradients for x and `bias`: dL/dx is
    `input_grad(g)` for g = dL/dy as [rows, out] (g @ W, the layer's weight [out, in] dequantized during backward only,
    in the layer's dense-path dtype: fp32 on CPUs without fast bf16), returned in x's dtype."""
    return _FrozenWeightMatmul.apply(x, bias, forward, input_grad)

"""Reading float weights and installing quantized modules, also where accelerate has offloaded a block.

With accelerate's offloading (CPU or disk), a Linear's weight sits on the meta device between forwards and its
`_hf_hook` loads it for each call. The weight is read inside `align_module_device`, and the quantized module that
replaces the Linear is placed on the hook's execution device (packed weights are small) with no hook.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn

from ..core.quant import QuantizedWeight, W8A8Weight
from ..nn.replace import filled_quant_linear, filled_w8a8_linear, float_weight

# The module that holds each kind of method result: (float module, result, config, dtype, device) -> module.
QUANTIZED_MODULE_FOR: dict[type, Callable[..., nn.Module]] = {
    QuantizedWeight: lambda module, qw, config, dtype, device: filled_quant_linear(
        module, qw, dtype=dtype, compute_dtype=config.compute_dtype, device=device
    ),
    W8A8Weight: lambda module, w, config, dtype, device: filled_w8a8_linear(module, w, dtype=dtype, device=device),
}


def read_float_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] float weight of a Linear / Conv1D, materialized if offloaded."""
    if has_offloaded_params(module):
        with align_module_device(module):
            return float_weight(module).detach().clone()
    return float_weight(module).detach()


def execution_device(module: nn.Module, weight: torch.Tensor) -> torch.device:
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return weight.device


def install_quantized(
    scope: nn.Module, name: str, module: nn.Module, qw: QuantizedWeight | W8A8Weight, config, dtype: torch.dtype
) -> None:
    """Replace `scope.<name>` (the float `module`) by the quantized module that holds `qw` (`QUANTIZED_MODULE_FOR`)."""
    device = execution_device(module, float_weight(module))
    qw = qw.to(device)
    # an offloaded module's bias is on meta outside align_module_device
    with align_module_device(module) if has_offloaded_params(module) else nullcontext():
        new = QUANTIZED_MODULE_FOR[type(qw)](module, qw, config, dtype, device)
    scope.set_submodule(name, new)

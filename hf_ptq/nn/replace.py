"""Find the Linears of a model that should be quantized and swap them for `QuantLinear`s / `W8A8Linear`s."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from ..core.quant import QuantizedWeight, W8A8Weight
from ..core.scheme import WeightScheme
from .quant_linear import QuantLinear
from .w8a8_linear import W8A8Linear

QUANTIZED_MODULES = (QuantLinear, W8A8Linear)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or of GPT-2's Conv1D (weight stored [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def float_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear or of GPT-2's Conv1D (stored [in, out])."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def filled_quant_linear(
    module: nn.Module,
    qw: QuantizedWeight,
    *,
    dtype: torch.dtype,
    compute_dtype: str = "auto",
    device: torch.device | str | None = None,
) -> QuantLinear:
    """A `QuantLinear` holding `qw` (and `module`'s bias) in place of the Linear / Conv1D `module`; its symmetry and
    zero-point kind are `qw`'s own (per-layer schemes may differ from the config's)."""
    in_f, out_f = linear_shape(module)
    new = QuantLinear(
        in_f,
        out_f,
        module.bias is not None,
        qw.bits,
        qw.group_size,
        qw.zero_point is None,
        dtype=dtype,
        act_order=qw.g_idx is not None,
        compute_dtype=compute_dtype,
        device=device,
        float_zero_point=qw.zero_point is not None and qw.zero_point.is_floating_point(),
    )
    new.transposed_source = isinstance(module, Conv1D)
    new.set_quantized(qw)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().to(device=device, dtype=dtype).clone(), requires_grad=False)
    return new


def filled_w8a8_linear(
    module: nn.Module, w: W8A8Weight, *, dtype: torch.dtype, device: torch.device | str | None = None
) -> W8A8Linear:
    """A `W8A8Linear` holding `w` (and `module`'s bias) in place of the Linear / Conv1D `module`."""
    in_f, out_f = linear_shape(module)
    new = W8A8Linear(in_f, out_f, module.bias is not None, w.input_scale is not None, dtype=dtype, device=device)
    new.transposed_source = isinstance(module, Conv1D)
    new.set_quantized(w)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().to(device=device, dtype=dtype).clone(), requires_grad=False)
    return new


def quantizable_linears(model: nn.Module, skip: list[str] | None) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv1D not matched by `skip` (transformers' matching rules)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, QUANTIZED_MODULES):
            if should_convert_module(name, skip):
                yield name, module


def check_group_size(targets: list[tuple[str, nn.Module]], scheme_of: Callable[[str], WeightScheme]) -> None:
    """Raise before any weight is read when a target layer's group size (`scheme_of(name).group_size`) does not
    divide its in_features."""
    bad = []
    for name, module in targets:
        group_size = scheme_of(name).group_size
        if group_size > 0 and linear_shape(module)[0] % group_size:
            bad.append((name, linear_shape(module)[0], group_size))
    if bad:
        name, in_f, group_size = bad[0]
        divisors = [g for g in (32, 64, 128) if all(f % g == 0 for _, f, _ in bad)] or [-1]
        raise ValueError(
            f"PtqConfig.group_size={group_size} does not divide in_features={in_f} of layer {name!r} "
            f"({len(bad)} layer(s) affected). Use a group_size that divides every layer's in_features "
            f"(for example {divisors[0]}), -1 for per-channel scales, or list those layers in modules_to_not_convert "
            "(or give them a group_size of their own in layer_schemes)."
        )


def replace_linears(
    model: nn.Module,
    *,
    scheme_of: Callable[[str], WeightScheme],
    skip: list[str] | None,
    dtype: torch.dtype,
    compute_dtype: str = "auto",
    act_order_of: Callable[[WeightScheme], bool] = lambda scheme: False,
    expect_float_weight: bool = False,
    float_zero_point: bool = False,
) -> list[str]:
    """Swap target Linears for empty `QuantLinear`s on the meta device, each of its grid `scheme_of(name)` (with a
    `weight_g_idx` when `act_order_of(scheme)`); returns the swapped names.

    With `expect_float_weight`, each new module keeps a meta placeholder `weight` of the original layout so that
    transformers routes the checkpoint's float weight to the quantize-on-load op, which drops it.
    """
    targets = list(quantizable_linears(model, skip))
    check_group_size(targets, scheme_of)

    def build(name: str, module: nn.Module, in_f: int, out_f: int) -> QuantLinear:
        scheme = scheme_of(name)
        new = QuantLinear(
            in_f,
            out_f,
            module.bias is not None,
            scheme.bits,
            scheme.group_size,
            scheme.sym,
            dtype=dtype,
            act_order=act_order_of(scheme),
            compute_dtype=compute_dtype,
            float_zero_point=float_zero_point,
        )
        if expect_float_weight:
            new.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
        return new

    return _swap_on_meta(model, targets, build)


def replace_with_w8a8_linears(
    model: nn.Module, *, static: bool, skip: list[str] | None, dtype: torch.dtype
) -> list[str]:
    """Swap target Linears for empty `W8A8Linear`s on the meta device (to load a saved W8A8 checkpoint into);
    returns the swapped names."""
    targets = list(quantizable_linears(model, skip))

    def build(name: str, module: nn.Module, in_f: int, out_f: int) -> W8A8Linear:
        return W8A8Linear(in_f, out_f, module.bias is not None, static, dtype=dtype)

    return _swap_on_meta(model, targets, build)


def _swap_on_meta(
    model: nn.Module, targets: list[tuple[str, nn.Module]], build: Callable[[str, nn.Module, int, int], nn.Module]
) -> list[str]:
    """Replace each target by `build(name, module, in_features, out_features)`, created on the meta device."""
    for name, module in targets:
        in_f, out_f = linear_shape(module)
        with torch.device("meta"):
            new = build(name, module, in_f, out_f)
        new.transposed_source = isinstance(module, Conv1D)
        model.set_submodule(name, new)
    return [name for name, _ in targets]

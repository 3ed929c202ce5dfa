"""Folding per-input-channel scales into the op that feeds a group of Linears, checked on the block's output.

AWQ and SmoothQuant rescale the inputs of a group of Linears that read one tensor: x -> x / s, W -> W * s (input
channels). The division is folded into the producer of x (`families.ScaleGroup.prev`: a norm's weight and bias, or
a Linear's output rows and bias), so the model computes the same function before rounding and nothing is added at
inference. Whether a fold is exact depends on the architecture (a post-norm block reuses the norm's output as its
residual), so every fold is checked: the block runs on one calibration batch before and after the fold, with the
group's Linears seeing `x * s` (what `W * s` will undo); a block output that moved is a fold that does not fit, which
is undone, and the group is quantized unscaled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..nn import QUANTIZED_MODULES
from .families import FamilyLayout, ScaleGroup

logger = logging.getLogger("hf_ptq")

Undo = Callable[[], None]

# Largest relative change of the block output (Frobenius norm) a fold may cause. A fold that fits changes it only by
# rounding: a few 1e-3 where quantized layers compute in bf16 (their default on CPU); one that does not fit, by the
# spread of s (tens of percent).
FOLD_TOLERANCE = 2e-2


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _resident(module: nn.Module) -> None:
    """Give an accelerate-offloaded module its weights back on its execution device (hook removed), so that they
    can be changed: an offloaded weight is reloaded from its offload store on every call."""
    if not has_offloaded_params(module):
        return
    device = module._hf_hook.execution_device
    with align_module_device(module):
        tensors = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
    remove_hook_from_module(module)
    for name, tensor in tensors.items():
        setattr(module, name, nn.Parameter(tensor.to(device), requires_grad=False))


def _snapshot(module: nn.Module, names: tuple[str, ...]) -> Undo:
    """A function restoring the tensors `names` of `module` (and dropping a quantized module's derived layouts)."""
    saved = {n: getattr(module, n).detach().clone() for n in names if getattr(module, n, None) is not None}

    def undo() -> None:
        for name, tensor in saved.items():
            getattr(module, name).data.copy_(tensor)
        if isinstance(module, QUANTIZED_MODULES):
            module.invalidate_caches()

    return undo


def _rows_to_divide(out_features: int, n: int, parts: int) -> slice | None:
    """The last n of out_features rows when they are the last of `parts` equal parts, else None."""
    return slice(out_features - n, out_features) if out_features == parts * n else None


def producer_fits(block: nn.Module, group: ScaleGroup, n: int) -> bool:
    """Whether `group.prev` exists and can take a scale over n channels: a Linear with `parts` x n output rows
    (not under grouped-query attention, where v is narrower than o_proj's input) whose scales are per row, or a
    norm whose weight has n elements."""
    prev = _submodule(block, group.prev)
    if isinstance(prev, QUANTIZED_MODULES):
        return prev.group_size != 0 and _rows_to_divide(prev.out_features, n, group.parts) is not None
    if isinstance(prev, (nn.Linear, Conv1D)):
        out_features = prev.nf if isinstance(prev, Conv1D) else prev.out_features
        return _rows_to_divide(out_features, n, group.parts) is not None
    weight = getattr(prev, "weight", None)
    return group.parts == 1 and isinstance(weight, torch.Tensor) and weight.ndim == 1 and weight.numel() == n


def fold_into_producer(block: nn.Module, group: ScaleGroup, layout: FamilyLayout, s: torch.Tensor) -> Undo:
    """Divide the output channels of `group.prev` that feed `group.linears` by s [n] (> 0), in place; returns a
    function that undoes it. The producer must fit (`producer_fits`)."""
    if not producer_fits(block, group, s.numel()):
        raise ValueError(f"{group.prev} cannot take a scale over {s.numel()} channels")
    prev = block.get_submodule(group.prev)
    n = s.numel()
    if isinstance(prev, QUANTIZED_MODULES):
        rows = _rows_to_divide(prev.out_features, n, group.parts)
        undo = _snapshot(prev, ("weight_scale", "bias"))
        prev.scale_output_channels_(1.0 / s, rows.start)
        return undo
    if isinstance(prev, (nn.Linear, Conv1D)):
        out_features = prev.nf if isinstance(prev, Conv1D) else prev.out_features
        rows = _rows_to_divide(out_features, n, group.parts)
        _resident(prev)
        undo = _snapshot(prev, ("weight", "bias"))
        w = prev.weight.data
        inv = (1.0 / s).to(w.device, torch.float32)
        if isinstance(prev, Conv1D):  # weight [in, out]: output channels are columns
            w[:, rows] = (w[:, rows].float() * inv).to(w.dtype)
        else:
            w[rows] = (w[rows].float() * inv[:, None]).to(w.dtype)
        if prev.bias is not None:
            prev.bias.data[rows] = (prev.bias.data[rows].float() * inv).to(prev.bias.dtype)
        return undo
    _resident(prev)
    undo = _snapshot(prev, ("weight", "bias"))
    inv = (1.0 / s).to(prev.weight.device, torch.float32)
    offset = layout.norm_offset
    prev.weight.data.copy_(((prev.weight.float() + offset) * inv - offset).to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data.copy_((bias.float() * inv).to(bias.dtype))
    return undo


def fold_checked(
    block: nn.Module,
    group: ScaleGroup,
    layout: FamilyLayout,
    s: torch.Tensor,
    run_block: Callable[[], torch.Tensor],
) -> bool:
    """Fold s into `group.prev` if the block's function stays the same; True when folded.

    `run_block()` runs the block on one calibration batch and returns its output. The Linears of the group get
    `x * s` during the second run, standing in for their weights' coming `W * s`.
    """
    before = run_block()
    undo = fold_into_producer(block, group, layout, s)

    def unscale(module, args):
        return (args[0] * s.to(args[0].device, args[0].dtype), *args[1:])

    handles = [block.get_submodule(n).register_forward_pre_hook(unscale) for n in group.linears]
    try:
        after = run_block()
    finally:
        for handle in handles:
            handle.remove()
    change = ((after.float() - before.float()).norm() / before.float().norm().clamp(min=1e-12)).item()
    if change <= FOLD_TOLERANCE:
        return True
    undo()
    logger.debug("hf_ptq: folding into %s changed the block output by %.3g; not folded", group.prev, change)
    return False


class BlockSmoother:
    """Searches (the method's `smooth`) and folds the input scale of each Linear group of one block.

    `run_block()` runs the block on one calibration batch (for `fold_checked`). Groups left unscaled because no
    table entry names them, or because their fold would change the block's output, are collected in `unscaled`;
    those whose producer is structurally unable to take a scale (grouped-query v_proj) or that the table lists as
    unscaled are skipped silently.
    """

    def __init__(self, block: nn.Module, layout: FamilyLayout, spec, config, run_block: Callable[[], torch.Tensor]):
        self.block, self.layout, self.spec, self.config, self.run_block = block, layout, spec, config, run_block
        self.unscaled: list[tuple[str, ...]] = []

    def smooth(self, group: list[str], weight: torch.Tensor, stats, scheme) -> torch.Tensor | None:
        """The scale s [in] folded into the producer of `group`'s input (weight [out, in] are the stacked weights
        to multiply by s), searched on the grid of `scheme`, or None when the group stays unscaled."""
        entry = self.layout.group_for(group)
        if entry is None:
            if not set(group) <= set(self.layout.unscaled):
                self.unscaled.append(tuple(group))
            return None
        if not producer_fits(self.block, entry, weight.shape[1]):
            return None
        s = self.spec.smooth(weight, scheme, self.config.options, stats)
        if s is None:
            return None
        if not fold_checked(self.block, entry, self.layout, s, self.run_block):
            self.unscaled.append(tuple(group))
            return None
        return s

    def warn_unscaled(self, warned: set[tuple[str, ...]], method: str, model_type: str | None) -> None:
        """One warning per group name not reported before (blocks of one model share their names)."""
        new = [g for g in self.unscaled if g not in warned]
        if new:
            warned.update(new)
            logger.warning(
                "hf_ptq %s: no op feeding %s in %s blocks can absorb a per-channel scale; those Linears are quantized "
                "without it (add the layout to hf_ptq/pipeline/families.py to scale them).",
                method,
                " / ".join(", ".join(g) for g in new),
                model_type or "these",
            )

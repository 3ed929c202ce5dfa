"""The sequential calibration pipeline: quantize a model block by block with a calibrated method.

For each block, in order:
1. statistics: run the calibration batches through the block with forward pre-hooks on its Linears, feeding the
   method's statistics (one accumulator per *input*: Linears called on the same tensor, e.g. q/k/v, share it).
   With `true_sequential` this happens stage by stage (the Linears sharing an input, in call order: q/k/v, then
   o_proj, then gate/up, then down_proj), each stage seeing the already quantized stages before it. Every pass
   stops (sentinel exception) as soon as the stage's last input has been seen.
2. quantize: the method turns each input group's stacked float weights and statistics into `QuantizedWeight`s;
   `QuantLinear`s replace the Linears.
3. propagate: the batches go through the quantized block; its outputs are the next block's inputs, so later
   blocks see the quantization error of earlier ones.
Memory beyond the model: the hidden states of the calibration set (replaced in place) and one batch's
activations. Linears outside the blocks (e.g. BERT's pooler) get statistics from whole-model passes at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from accelerate.utils import has_offloaded_params
from torch import nn
from transformers.utils.logging import tqdm

from ..calibration.self_generated import input_device
from ..core.quant import QuantizedWeight
from ..kernels import cpu_has_fast_bf16
from ..methods import MethodSpec, method_spec
from ..nn.replace import check_group_size, linear_shape, quantizable_linears
from .blocks import find_blocks
from .capture import BlockCall, StopForward, capture_inputs, no_cache_kwargs
from .offload import install_quantized, read_float_weight

logger = logging.getLogger("hf_ptq")

Stage = list[list[str]]  # groups of Linear names (relative to their block) sharing one input, in call order


def discover_groups(block: nn.Module, names: list[str], hidden: torch.Tensor, call: BlockCall) -> tuple[Stage, list]:
    """Groups of `names` called on the same input tensor, in call order, and the names never called."""
    seen: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []  # inputs stay alive during the pass, so their ids are not reused

    def hook(name: str):
        def fn(module, args):
            keep.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)

        return fn

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        call.run(block, hidden)
    finally:
        for h in handles:
            h.remove()
    groups = list(seen.values())
    called = {n for g in groups for n in g}
    return groups, [n for n in names if n not in called]


def collect(
    block: nn.Module,
    groups: Stage,
    statistics: Callable[[int], object],
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
) -> list[object]:
    """Statistics of each group's input over all batches; each pass stops after the last group's input."""
    stats = [statistics(linear_shape(block.get_submodule(g[0]))[0]) for g in groups]

    def hook(index: int):
        def fn(module, args):
            stats[index].add_batch(args[0])
            if index == len(groups) - 1:
                raise StopForward

        return fn

    handles = [block.get_submodule(g[0]).register_forward_pre_hook(hook(i)) for i, g in enumerate(groups)]
    try:
        for h, call in zip(hidden, calls, strict=True):
            try:
                call.run(block, h)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _rows(qw: QuantizedWeight, rows: slice) -> QuantizedWeight:
    """The rows `rows` of a quantized weight, each tensor with its own storage (they are saved separately)."""
    per_row = qw.group_size != 0  # per-tensor qparams ([1]) are shared by all rows

    def take(t: torch.Tensor | None, by_row: bool) -> torch.Tensor | None:
        return None if t is None else (t[rows] if by_row else t).clone()

    return QuantizedWeight(
        take(qw.q, True),
        take(qw.scale, per_row),
        take(qw.zero_point, per_row),
        qw.bits,
        qw.group_size,
        take(qw.g_idx, False),
    )


def _float_dtype(blocks: nn.ModuleList) -> torch.dtype:
    """The dtype of the blocks' float parameters (the model's dtype)."""
    for p in blocks.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def calibration_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """dtype the blocks run in during calibration: fp32 for half-precision models on CPUs without native bf16
    (where half matmuls are up to 10x slower than fp32) unless accelerate offloads weights; else the model's."""
    offloaded = any(has_offloaded_params(m) for m in model.modules())
    on_cpu = all(p.device.type in ("cpu", "meta") for p in model.parameters())
    if dtype in (torch.bfloat16, torch.float16) and on_cpu and not offloaded and not cpu_has_fast_bf16():
        return torch.float32
    return dtype


def quantize_group(
    scope: nn.Module, group: list[str], stats: object | None, spec: MethodSpec, config, dtype: torch.dtype
) -> None:
    """Quantize the Linears of `group` (sharing `stats`) with `spec`, stacked row-wise; swap in QuantLinears.

    `dtype` is the model's dtype: the weights are quantized as stored in it and the scales are kept in it."""
    modules = [scope.get_submodule(n) for n in group]
    weights = [read_float_weight(m).to(dtype) for m in modules]
    stacked = torch.cat(weights, 0) if len(weights) > 1 else weights[0]
    if stats is None:
        logger.warning("hf_ptq: %s saw no calibration input; quantized with RTN instead.", ", ".join(group))
        qw = method_spec("rtn").quantize_weight(stacked, config)
    else:
        qw = spec.quantize_weight(stacked, config, stats)
    row = 0
    for name, module, weight in zip(group, modules, weights, strict=True):
        part = _rows(qw, slice(row, row + weight.shape[0]))
        row += weight.shape[0]
        install_quantized(scope, name, module, part, config, dtype)


@torch.no_grad()
def quantize_blocks(
    model: nn.Module, config, batches: list[torch.Tensor], skip: list[str] | None, desc: str | None = None
) -> list[str]:
    """Quantize every Linear of `model` not matched by `skip`, block by block; returns the quantized names."""
    spec = method_spec(config.method)
    targets = dict(quantizable_linears(model, skip))
    check_group_size(list(targets.items()), config.group_size)
    prefix, blocks = find_blocks(model)
    dtype = _float_dtype(blocks)
    work_dtype = calibration_dtype(model, dtype)
    captured = capture_inputs(model, blocks, batches)
    captured.to_dtype(work_dtype)
    hidden = captured.hidden
    samples = sum(h.shape[0] for h in hidden)
    groups_by_type: dict[type, tuple[Stage, list[str]]] = {}
    done: list[str] = []
    bar = tqdm(total=len(blocks), desc=desc or f"hf_ptq {config.method}", unit="block")
    bar.set_postfix_str(f"{samples} samples")
    for i, block in enumerate(blocks):
        head = f"{prefix}.{i}."
        names = [n[len(head) :] for n in targets if n.startswith(head)]
        calls = captured.calls[i]
        block.to(work_dtype)
        if names:
            key = (type(block), tuple(names))
            if key not in groups_by_type:
                groups_by_type[key] = discover_groups(block, names, hidden[0], calls[0])
            groups, uncalled = groups_by_type[key]
            stages = [[g] for g in groups] if config.true_sequential else [groups]
            for stage in stages:
                for group, stats in zip(stage, collect(block, stage, spec.statistics, hidden, calls), strict=True):
                    quantize_group(block, group, stats, spec, config, dtype)
            for name in uncalled:
                quantize_group(block, [name], None, spec, config, dtype)
            done += [head + n for n in names]
        for b, call in enumerate(calls):
            hidden[b] = call.run(block, hidden[b])
        captured.calls[i] = []  # this block's arguments are no longer needed
        block.to(dtype)
        bar.update(1)
    bar.close()
    del hidden, captured
    quantized = set(done)
    leftovers = [n for n in targets if n not in quantized]
    if leftovers:
        quantize_outside_blocks(model, leftovers, spec, config, batches, dtype)
        done += leftovers
    return done


def quantize_outside_blocks(
    model: nn.Module, names: list[str], spec: MethodSpec, config, batches: list[torch.Tensor], dtype: torch.dtype
) -> None:
    """Linears outside the blocks (e.g. a pooler): statistics from whole-model passes, stopped once all are seen."""
    stats = {n: spec.statistics(linear_shape(model.get_submodule(n))[0]) for n in names}
    seen: set[str] = set()  # reached in the current forward
    reached: set[str] = set()  # reached in any forward

    def hook(name: str):
        def fn(module, args):
            stats[name].add_batch(args[0])
            seen.add(name)
            reached.add(name)
            if len(seen) == len(names):
                raise StopForward

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    extra = no_cache_kwargs(model)
    try:
        for ids in batches:
            seen.clear()
            try:
                model(input_ids=ids.to(input_device(model)), **extra)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        quantize_group(model, [name], stats[name] if name in reached else None, spec, config, dtype)

"""Capturing what every block receives: block 0's hidden states and each block's other arguments, per batch.

One forward of the model per calibration batch, with every block's `forward` temporarily replaced by a stub that
records its arguments and hands the hidden states on unchanged; the last block's stub stops the forward with a
sentinel exception, so nothing after the blocks (final norm, LM head) runs. Masks, rotary embeddings, cache
positions, per-layer masks (sliding-window layers) are recorded exactly as the model passes them: no tracing.
Blocks that hand each other more than hidden states (T5's position bias, computed by block 0 and passed on) are
captured with `run_blocks=True`: each stub records its arguments and then runs the float block, so every block
receives what the model really passes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.devices import input_device


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what was needed has been seen."""


@dataclass
class BlockCall:
    """The arguments of one block call besides the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Call `block` on hidden [batch, seq, dim] with these arguments; returns its output hidden states."""
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class CapturedInputs:
    hidden: list[torch.Tensor]  # block 0's hidden-state input, per batch
    calls: list[list[BlockCall]]  # calls[block][batch]

    def calls_to_dtype(self, dtype: torch.dtype) -> None:
        """Cast every floating-point tensor of the calls (masks, rotary tables...) to `dtype`, in place; the hidden
        states stay as captured. Tensors shared between calls (one mask for all blocks) stay shared."""
        memo: dict[int, torch.Tensor] = {}
        for per_block in self.calls:
            for call in per_block:
                call.args, call.kwargs = cast_tensors(call.args, dtype, memo), cast_tensors(call.kwargs, dtype, memo)


def cast_tensors(value: Any, dtype: torch.dtype, memo: dict[int, torch.Tensor] | None = None, copy: bool = False):
    """`value` with every floating-point tensor inside (tuples, lists, dicts) cast to `dtype`; `memo` keeps tensors
    shared between values shared; `copy` returns new tensors even where the dtype already matches."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        if memo is None:
            return value.to(dtype, copy=copy)
        if id(value) not in memo:
            memo[id(value)] = value.to(dtype, copy=copy)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(cast_tensors(v, dtype, memo, copy) for v in value)
    if isinstance(value, dict):
        return {k: cast_tensors(v, dtype, memo, copy) for k, v in value.items()}
    return value


@contextmanager
def patched_forwards(replacements: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Within: each module's `forward` is the given function (called through the module as usual)."""
    saved = {m: m.__dict__.get("forward") for m in replacements}  # accelerate hooks keep a wrapped forward there
    try:
        for module, fn in replacements.items():
            module.forward = fn
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    kwargs = dict(kwargs)
    if args:
        return args[0], BlockCall(tuple(args[1:]), kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs)


def no_cache_kwargs(model: nn.Module) -> dict[str, bool]:
    """Forward kwargs that turn the KV cache off for models that have one (calibration needs no cache)."""
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    forward: Callable[[torch.Tensor], Any] | None = None,
    run_blocks: bool = False,
) -> CapturedInputs:
    """Run each batch of input ids [b, seq] up to the blocks and record their inputs.

    `forward(ids)` runs the model (or the part holding `blocks`) on one batch; default: `model(input_ids=ids)` with
    the KV cache disabled. `run_blocks`: every block but the last runs for real after its arguments are recorded
    (for blocks that pass each other more than hidden states), instead of handing its input on unchanged."""
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    last = len(blocks) - 1
    originals = [block.forward for block in blocks]  # bound methods, or accelerate's wrapped forwards

    def record(i: int, args: tuple, kwargs: dict):
        h, call = _split_hidden(args, kwargs)
        if i == 0:
            hidden.append(h.detach())
        calls[i].append(call)
        if i == last:
            raise StopForward
        return originals[i](*args, **kwargs) if run_blocks else h

    if forward is None:
        extra, device = no_cache_kwargs(model), input_device(model)

        def forward(ids: torch.Tensor) -> Any:
            return model(input_ids=ids.to(device), **extra)

    stubs = {block: (lambda *a, _i=i, **k: record(_i, a, k)) for i, block in enumerate(blocks)}
    with patched_forwards(stubs):
        for ids in batches:
            try:
                forward(ids)
            except StopForward:
                pass
            else:
                raise RuntimeError("hf_ptq: the model's forward did not go through its last block")
    return CapturedInputs(hidden, calls)

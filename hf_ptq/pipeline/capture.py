"""Capturing what every block receives: block 0's hidden states and each block's other arguments, per batch.

One forward of the model per calibration batch, with every block's `forward` temporarily replaced by a stub that
records its arguments and hands the hidden states on unchanged; the last block's stub stops the forward with a
sentinel exception, so nothing after the blocks (final norm, LM head) runs. Masks, rotary embeddings, cache
positions, per-layer masks (sliding-window layers) are recorded exactly as the model passes them: no tracing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calibration.self_generated import input_device


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

    def to_dtype(self, dtype: torch.dtype) -> None:
        """Cast every floating-point tensor (hidden states, masks, rotary tables...) to `dtype`, in place.

        Tensors shared between calls (one mask for all blocks) stay shared."""
        memo: dict[int, torch.Tensor] = {}

        def cast(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if not value.is_floating_point() or value.dtype == dtype:
                    return value
                if id(value) not in memo:
                    memo[id(value)] = value.to(dtype)
                return memo[id(value)]
            if isinstance(value, (tuple, list)):
                return type(value)(cast(v) for v in value)
            if isinstance(value, dict):
                return {k: cast(v) for k, v in value.items()}
            return value

        self.hidden = [cast(h) for h in self.hidden]
        for per_block in self.calls:
            for call in per_block:
                call.args, call.kwargs = cast(call.args), cast(call.kwargs)


@contextmanager
def _stubbed(blocks: nn.ModuleList, record) -> Iterator[None]:
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate hooks keep a wrapped forward there
    try:
        for i, block in enumerate(blocks):
            block.forward = lambda *a, _i=i, **k: record(_i, a, k)
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    kwargs = dict(kwargs)
    if args:
        return args[0], BlockCall(tuple(args[1:]), kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs)


def no_cache_kwargs(model: nn.Module) -> dict[str, bool]:
    """Forward kwargs that turn the KV cache off for models that have one (calibration needs no cache)."""
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]) -> CapturedInputs:
    """Run each batch of input ids [b, seq] up to the blocks and record their inputs (KV cache disabled)."""
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    last = len(blocks) - 1

    def record(i: int, args: tuple, kwargs: dict):
        h, call = _split_hidden(args, kwargs)
        if i == 0:
            hidden.append(h.detach())
        calls[i].append(call)
        if i == last:
            raise StopForward
        return h

    extra = no_cache_kwargs(model)
    device = input_device(model)
    with _stubbed(blocks, record):
        for ids in batches:
            try:
                model(input_ids=ids.to(device), **extra)
            except StopForward:
                pass
            else:
                raise RuntimeError("hf_ptq: the model's forward did not go through its last block")
    return CapturedInputs(hidden, calls)

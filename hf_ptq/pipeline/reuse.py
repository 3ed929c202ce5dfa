"""Reusing the outputs of a block's finished sub-modules across the passes over that block.

With `true_sequential`, a block runs over the calibration set once per stage, then once more to produce the next
block's inputs. A direct child of the block (e.g. Llama's `self_attn`) whose quantized Linears, and every Linear
called before it, are all quantized gives the same output on every later pass: it is computed once more, stored
per batch in the model's dtype (as the model itself passes it on), and served from that store afterwards. For a
Llama block this computes the attention twice instead of four times. Only children called once per block call
and returning tensors no larger than the block's input (or tuples / lists of those and None) are reused; the store
lives for one block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import cast_tensors, patched_forwards


@dataclass(frozen=True)
class ReusableChild:
    """A direct child of a block, and the Linears (relative names) whose quantization fixes its output."""

    name: str
    needs: frozenset[str]


def is_reusable_output(value: Any, max_numel: int) -> bool:
    """Tensors of at most `max_numel` elements (the block input's size: attention probabilities returned by eager
    attention are not kept), None, and tuples / lists of those: what the store can hand back faithfully."""
    items = value if isinstance(value, (tuple, list)) else [value]
    if not isinstance(value, (tuple, list)) and not isinstance(value, torch.Tensor):
        return False
    return all(v is None or (isinstance(v, torch.Tensor) and v.numel() <= max_numel) for v in items)


class OutputStore:
    """Per-batch outputs of a block's finished children, for one block."""

    def __init__(self, block: nn.Module, children: list[ReusableChild], dtype: torch.dtype, work_dtype: torch.dtype):
        self.block, self.children = block, children
        self.dtype, self.work_dtype = dtype, work_dtype
        self.batch = 0  # index of the batch the block is running on; set before each call
        self._outputs: dict[str, dict[int, Any]] = {}

    @contextmanager
    def replaying_finished_children(self, quantized: set[str], record: bool) -> Iterator[None]:
        """Within: the children finished once the Linears in `quantized` are answer from the store; those not
        recorded yet run, and are recorded when `record` (False on the last pass over the block)."""
        stubs = {}
        for child in self.children:
            if child.needs <= quantized:
                module = self.block.get_submodule(child.name)
                stubs[module] = self._replay(child.name, module.forward, record)
        with patched_forwards(stubs):
            yield

    def clear(self) -> None:
        """Drop every recorded output (the block is done)."""
        self._outputs.clear()

    def _replay(self, name: str, forward, record: bool):
        outputs = self._outputs.setdefault(name, {})

        def run(*args, **kwargs):
            if self.batch in outputs:  # a copy: the block may modify its children's outputs in place
                return cast_tensors(outputs[self.batch], self.work_dtype, copy=True)
            out = forward(*args, **kwargs)
            if record:
                outputs[self.batch] = cast_tensors(out, self.dtype, copy=True)
            return out

        return run

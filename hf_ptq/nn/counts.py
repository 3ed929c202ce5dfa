"""Parameter counts and memory footprints of models holding hf_ptq's quantized modules.

A quantized layer keeps its weight in buffers (`weight_packed`, scales, ...: the checkpoint's tensors), so
transformers' `num_parameters()` (which counts `named_parameters`) misses every quantized weight, and
`get_memory_footprint(return_buffers=False)` misses their bytes. `attach_counts` gives a model both methods answering
as for the float model: each quantized weight counts as the `out x in` values it stands for (frozen, so never
trainable; a quantized input embedding is an embedding), and its stored tensors count as the bytes the model holds.
Everything else (biases, norms, adapters, bitsandbytes' parameters) is counted by transformers' own methods.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import torch
from torch import nn

from .quant_embedding import PackedRows, QuantEmbedding
from .quant_linear import QuantLinear
from .w8a8_linear import W8A8Linear

PACKED_WEIGHT_MODULES = (QuantLinear, W8A8Linear, PackedRows)  # modules whose weight is stored in buffers


def _packed_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Each module of `model` whose weight lives in buffers (a tied head holds none: its embedding is counted)."""
    return (m for m in model.modules() if isinstance(m, PACKED_WEIGHT_MODULES))


def packed_weight_numel(module: nn.Module) -> int:
    """Values of the float weight a quantized module stands for (`out x in`); 0 while its float placeholder `weight`
    (quantize-on-load) is still a Parameter, which transformers counts itself."""
    if "weight" in module._parameters:
        return 0
    return module.out_features * module.in_features


def num_parameters(model: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' `num_parameters` of `model`, plus the values of each quantized weight: the float model's count.
    Quantized weights are frozen (left out with `only_trainable`); quantized input embeddings are embeddings (left
    out with `exclude_embeddings`), output heads are not, as for `nn.Embedding` / `nn.Linear`."""
    total = type(model).num_parameters(model, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    if only_trainable:
        return total
    skip = QuantEmbedding if exclude_embeddings else ()
    return total + sum(packed_weight_numel(m) for m in _packed_modules(model) if not isinstance(m, skip))


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes of the buffers that hold the quantized weights of `model` (each tensor once)."""
    seen: dict[int, torch.Tensor] = {}
    for module in _packed_modules(model):
        for tensor in module.buffers(recurse=False):
            seen.setdefault(id(tensor), tensor)
    return sum(t.numel() * t.element_size() for t in seen.values())


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """transformers' `get_memory_footprint` of `model`; without `return_buffers`, the quantized weights' buffers
    still count (they are the weights: what is left out is the other buffers, such as rotary tables)."""
    total = type(model).get_memory_footprint(model, return_buffers=return_buffers)
    return total if return_buffers else total + packed_weight_bytes(model)


def attach_counts(model: nn.Module) -> None:
    """Make `model.num_parameters()` and `model.get_memory_footprint()` count the quantized weights (see above)."""
    model.num_parameters = types.MethodType(num_parameters, model)
    model.get_memory_footprint = types.MethodType(memory_footprint, model)

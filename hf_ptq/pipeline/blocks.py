"""Finding a model's repeated blocks (decoder layers, encoder layers) without model-family knowledge."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the `nn.ModuleList` of same-class blocks holding the most parameters and some Linear.

    e.g. `model.layers` (Llama, Qwen, Gemma), `model.decoder.layers` (OPT), `transformer.h` (GPT-2),
    `encoder.layer` (BERT). Raises ValueError when the model has none.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, (nn.Linear, Conv1D)) for m in module.modules()):
            continue
        size = _numel(module)
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(f"hf_ptq: found no list of repeated blocks holding Linear layers in {type(model).__name__}.")
    return best[1], best[2]

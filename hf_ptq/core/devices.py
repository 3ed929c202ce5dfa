"""Where a model's inputs go."""

from __future__ import annotations

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """The device of the input embedding's weight (CPU when it is offloaded: accelerate then moves inputs itself)."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.device.type == "meta":  # offloaded: accelerate moves inputs itself
        return torch.device("cpu")
    return weight.device

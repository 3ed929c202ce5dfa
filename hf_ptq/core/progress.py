"""Progress inside `generate`: a stopping criterion that never stops, advancing a tqdm bar by one token per row at
every generation step. Pure torch (duck-typed: transformers calls it like its own StoppingCriteria)."""

from __future__ import annotations

from typing import Any

import torch


class TokenProgress:
    """Pass as `generate(..., stopping_criteria=[TokenProgress(bar)])`: `bar` counts the tokens generated."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        self.bar.update(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

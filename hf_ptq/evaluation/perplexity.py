"""Perplexity of a causal LM over non-overlapping token windows, with fp32 logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def read_text(path: str | Path) -> str:
    """The evaluation text: `path` itself, or `path/test.txt` when `path` is a folder."""
    path = Path(path)
    return (path / "test.txt" if path.is_dir() else path).read_text(encoding="utf-8")


def token_windows(input_ids: torch.Tensor, window: int, count: int | None = None) -> torch.Tensor:
    """The first `count` (default: all) non-overlapping windows of `window` tokens of 1-D `input_ids`, [n, window]."""
    ids = input_ids.reshape(-1)
    available = ids.numel() // window
    n = available if count is None else count
    if n > available:
        raise ValueError(f"{count} windows of {window} tokens need {count * window} tokens; the text has {ids.numel()}")
    return ids[: n * window].reshape(n, window)


@torch.inference_mode()
def causal_lm_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of one forward without a KV cache, upcast to float32."""
    device = next(model.parameters()).device
    return model(input_ids.to(device), use_cache=False).logits.float()


def nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (fp32) and the number of predicted tokens."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = input_ids[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, targets, reduction="sum").item(), targets.numel()


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean NLL) over all predicted tokens of `windows` [n, seq], one window per forward."""
    total, count = 0.0, 0
    for window in windows:
        nll, n = nll_sum(causal_lm_logits(model, window[None]), window[None])
        total, count = total + nll, count + n
    return float(torch.tensor(total / count).exp())

"""Perplexity of a causal LM with fp32 logits: non-overlapping windows, or the sliding window of transformers'
perplexity guide (windows of `max_length` tokens every `stride` tokens, each scoring only the tokens no earlier
window scored, so every scored token sees at least `max_length - stride` tokens of context)."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Window:
    """Tokens `[begin, end)` of the text; the window scores its tokens from `begin + first` on (`first >= 1`)."""

    begin: int
    end: int
    first: int


def sliding_windows(num_tokens: int, max_length: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """Windows of up to `max_length` tokens starting every `stride` tokens until the text's end is reached.

    Each window scores the tokens after the previous window's end (the first window: all but its first token), so
    every token but the first is scored once. `stride == max_length` gives non-overlapping windows.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride={stride} must be in [1, max_length={max_length}]")
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens of text; got {num_tokens}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append(Window(begin, end, max(1, prev_end - begin)))
        prev_end = end
        if end == num_tokens or len(windows) == max_windows:
            break
    return windows


@torch.inference_mode()
def causal_lm_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of one forward without a KV cache, upcast to float32."""
    device = next(model.parameters()).device
    return model(input_ids.to(device), use_cache=False).logits.float()


def nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, first: int = 1) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (fp32) of the tokens at positions `first..` of `input_ids`
    [batch, seq] from `logits` [batch, seq, vocab], and the number of tokens scored."""
    shift_logits = logits[:, first - 1 : -1].reshape(-1, logits.shape[-1]).float()
    targets = input_ids[:, first:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, targets, reduction="sum").item(), targets.numel()


def perplexity(
    model: torch.nn.Module, input_ids: torch.Tensor, max_length: int = 512, stride: int | None = None
) -> float:
    """exp(mean NLL) of 1-D `input_ids` over `sliding_windows(max_length, stride)` (default stride: max_length)."""
    ids = input_ids.reshape(1, -1)
    total, count = 0.0, 0
    for w in sliding_windows(ids.shape[1], max_length, stride or max_length):
        window = ids[:, w.begin : w.end]
        nll, n = nll_sum(causal_lm_logits(model, window), window, w.first)
        total, count = total + nll, count + n
    return float(torch.tensor(total / count).exp())

"""Throughput of a causal LM: prefill (one forward over a long prompt) and decode (greedy generation, batch 1).

Both report the best of several timed runs after a warm-up. On a shared machine the other processes' CPU use
spoils timings, so `CpuMonitor` measures it during a timing and `wait_for_idle_cpu` waits for a quiet moment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _no_step() -> None:
    pass


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int, step: Callable[[], object] = _no_step) -> float:
    """Shortest wall time of `repeats` calls of `fn`, after `warmup` untimed ones; `step()` after each call (outside
    the timing: a progress bar's update)."""
    for _ in range(warmup):
        fn()
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        step()
    return best


@torch.inference_mode()
def prefill_tokens_per_s(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    repeats: int = 3,
    warmup: int = 1,
    step: Callable[[], object] = _no_step,
) -> float:
    """Tokens/s of one forward over `input_ids` [batch, seq] as `generate` runs it (KV cache, last logits only);
    `step()` after each of the `warmup + repeats` runs."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    seconds = best_seconds(lambda: model(ids, use_cache=True, logits_to_keep=1), repeats, warmup, step)
    return ids.numel() / seconds


@torch.inference_mode()
def decode_tokens_per_s(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    step: Callable[[], object] = _no_step,
) -> float:
    """New tokens/s of greedy `generate` from a (short) prompt [1, seq], forced to exactly `new_tokens` tokens;
    `step()` after each of the `warmup + repeats` runs."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": getattr(model.generation_config, "eos_token_id", None),
    }
    for _ in range(warmup):  # a short generation warms the same code paths
        model.generate(ids, **(kwargs | {"max_new_tokens": min(new_tokens, 8), "min_new_tokens": min(new_tokens, 8)}))
        step()
    seconds = best_seconds(lambda: model.generate(ids, **kwargs), repeats, 0, step)
    return new_tokens / seconds


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process and its waited-for children), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
    t = os.times()
    own = round((t.user + t.system + t.children_user + t.children_system) * _CLOCK_TICKS)
    return busy, own


class CpuMonitor:
    """CPU cores used by *other* processes between `start()` and `stop()` (Linux; None elsewhere)."""

    def start(self) -> CpuMonitor:
        self._t0, self._j0 = time.monotonic(), _cpu_jiffies()
        return self

    def stop(self) -> float | None:
        j1 = _cpu_jiffies()
        elapsed = time.monotonic() - self._t0
        if self._j0 is None or j1 is None or elapsed <= 0:
            return None
        others = (j1[0] - self._j0[0]) - (j1[1] - self._j0[1])
        return max(others, 0) / _CLOCK_TICKS / elapsed


def wait_for_idle_cpu(max_wait_s: float = 120.0, threshold: float = 0.3, interval_s: float = 1.0) -> float | None:
    """Sleep until other processes use fewer than `threshold` cores (or `max_wait_s` passes); their last load."""
    deadline = time.monotonic() + max_wait_s
    while True:
        monitor = CpuMonitor().start()
        time.sleep(interval_s)
        load = monitor.stop()
        if load is None or load < threshold or time.monotonic() >= deadline:
            return load

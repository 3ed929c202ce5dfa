"""What the CPU can do and how many threads torch uses on it: read by the kernels, the methods and the pipeline."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX), where bf16 compute is the fast path."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without mkldnn
        return False


# Every multi-threaded op waits for all its threads: on a loaded machine (2 cores, busy neighbours) that is a
# scheduler time slice per op, milliseconds for an op of microseconds. Work too small to gain from more threads runs
# inside `cpu_threads(1)`; what must run with the caller's count (LAPACK factorizations, whose bits depend on it, and
# large ops) reads `full_thread_count()`.
_FULL_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("hf_ptq_full_threads", default=None)


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Within: torch runs `count` intra-op threads (None: unchanged); `full_thread_count()` still answers the count
    outside the outermost `cpu_threads`."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    token = _FULL_THREADS.set(_FULL_THREADS.get() or before)
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _FULL_THREADS.reset(token)


def full_thread_count() -> int:
    """torch's thread count outside any `cpu_threads` section (the caller's count)."""
    return _FULL_THREADS.get() or torch.get_num_threads()

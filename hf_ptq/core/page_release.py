"""Give back the page-cache pages of a float weight read from a memory-mapped checkpoint once it is quantized.

Quantizing while loading reads every float weight once. The checkpoint is memory-mapped, so each page read stays
in the process's resident set until the mapping closes, and the peak RSS of a quantize-on-load would approach the
full-precision checkpoint size. After a weight is packed, `release_file_pages` drops its pages from this process
with `madvise(MADV_DONTNEED)`. Only whole pages lying inside that weight's bytes, in a file mapping of a
`.safetensors` file, are released: the weight is discarded after packing, and a later read of those pages would
fault them back in from the file. Elsewhere (other OSes, anonymous memory, GPU tensors) it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4
_libc = None


def _checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of mappings of .safetensors files in this process."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip().endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def checkpoint_files_mapped() -> bool:
    """Whether a checkpoint file is memory-mapped in this process now. A walk that starts with none mapped holds no
    float weight in one, so it can skip `release_file_pages`, which reads /proc/self/maps on every call."""
    return sys.platform.startswith("linux") and bool(_checkpoint_mappings())


def _c_library():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`), so temporaries of one layer do not pile up in RSS.

    Quantizing layer after layer interleaves short-lived float temporaries with long-lived packed tensors; glibc
    keeps the holes resident (what it saves: docs/kernels.md, "Measurements behind the code").
    """
    if sys.platform.startswith("linux"):
        trim = getattr(_c_library(), "malloc_trim", None)
        if trim is not None:
            trim(0)


def release_file_pages(*tensors: torch.Tensor) -> int:
    """Drop the whole pages under each tensor from RSS where they belong to a mapped checkpoint; returns bytes
    released. The process's mappings are read once per call, so pass a layer's or a block's tensors together."""
    if not sys.platform.startswith("linux"):
        return 0
    page = mmap.PAGESIZE
    mappings: list[tuple[int, int]] | None = None
    released = 0
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        lo, hi = -(-start // page) * page, end // page * page
        if hi <= lo:
            continue
        mappings = _checkpoint_mappings() if mappings is None else mappings
        if not any(a <= start and end <= b for a, b in mappings):
            continue
        if _c_library().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
            released += hi - lo
    return released

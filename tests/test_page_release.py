"""Giving back the pages of memory-mapped checkpoint tensors (Linux): released, and still readable afterwards."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

from hf_ptq.core.page_release import release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps: Linux")


def mapping_rss_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_release_file_pages_of_mapped_checkpoint(tmp_path: Path) -> None:
    values = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    path = tmp_path / "weights.safetensors"
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, like a loaded checkpoint
    tensor = torch.frombuffer(mapped, dtype=torch.float32)
    first, second = tensor[: 1 << 19], tensor[1 << 19 :]
    assert float(tensor.sum()) == float(values.sum())  # every page read: resident
    assert mapping_rss_kb(path) >= 4000
    released = release_file_pages(first, second, torch.ones(3))  # a tensor outside any checkpoint is ignored
    assert released == 4 << 20
    assert mapping_rss_kb(path) < 100
    assert torch.equal(tensor, values)  # read again from the file
    del tensor, first, second


def test_release_file_pages_ignores_anonymous_memory() -> None:
    assert release_file_pages(torch.ones(1 << 20)) == 0

"""Reading safetensors files that may be damaged: the header as the file states it, checked by the safetensors
library itself, and the bytes of each tensor, for checksums.

A safetensors file is an 8-byte little-endian header length, a JSON header (`{name: {dtype, shape,
data_offsets}}`, plus `__metadata__`: str -> str), then the tensors' bytes; offsets count from the end of the
header.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class CheckpointError(ValueError):
    """A checkpoint on disk is damaged, or disagrees with its config; the message names the file, the tensor and,
    where one is to blame, the config field."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header states it."""

    dtype: str  # safetensors' name, e.g. "I32", "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets of its data in the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """The header of the safetensors file `path`, after the safetensors library has checked the file (header
    syntax, dtypes, that the offsets match the shapes and cover the data exactly: a truncated or padded file
    fails here). CheckpointError naming the file otherwise."""
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}); the file is damaged or truncated."
        ) from None
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {length} bytes is larger than allowed.")
        raw = json.loads(f.read(length))
    start = 8 + length
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {
        name: TensorEntry(e["dtype"], tuple(e["shape"]), start + e["data_offsets"][0], start + e["data_offsets"][1])
        for name, e in raw.items()
    }
    return SafetensorsHeader(path, tensors, dict(metadata))


def read_tensor(path: Path, name: str):
    """Tensor `name` of file `path`, read whole (for the small tensors whose values are checked)."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


@contextmanager
def mapped_file(path: Path) -> Iterator[memoryview]:
    """The bytes of `path` as a read-only memory map (no copy: hashing reads the page cache directly)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                yield view
            finally:
                view.release()


def sort_metadata(path: Path) -> bool:
    """Rewrite the header of the safetensors file `path` in place with its `__metadata__` keys sorted.

    The safetensors library writes metadata from a hash map, in an order that changes from one save to the next,
    so two saves of the same model differ in bytes once there are two keys ("format" and the checksums). Sorting
    them makes saves reproducible. The header keeps its length (same keys and values), so no data moves; returns
    False, changing nothing, when the header cannot be reproduced byte for byte that way.
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _MAX_HEADER_BYTES:
            return False
        raw = f.read(length)
        text = raw.rstrip(b" ")
        header = json.loads(text, object_pairs_hook=dict)
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or list(metadata) == sorted(metadata):
            return isinstance(metadata, dict)
        compact = {"separators": (",", ":"), "ensure_ascii": False}
        if json.dumps(header, **compact).encode() != text:
            return False  # not the compact form this function can reproduce
        header = {"__metadata__": dict(sorted(metadata.items()))} | {
            k: v for k, v in header.items() if k != "__metadata__"
        }
        new = json.dumps(header, **compact).encode()
        if len(new) != len(text):
            return False
        f.seek(8)
        f.write(new)
    return True

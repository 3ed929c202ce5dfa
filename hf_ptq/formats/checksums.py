"""SHA-256 of every tensor's bytes, recorded in the safetensors metadata at save and export and checked on load.

Shape checks cannot see flipped bytes inside a tensor; a digest can. The digests of all tensors of a checkpoint are
one JSON object `{name: hex digest}` under the metadata key `hf_ptq.sha256` of each file (transformers gives every
shard the same metadata), over the tensor's bytes exactly as the file stores them (C order, little-endian).
Hashing runs on several threads (hashlib releases the GIL); its cost per GB is in docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from .safetensors_file import CheckpointError, SafetensorsHeader, mapped_file

METADATA_KEY = "hf_ptq.sha256"


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of the bytes of `tensor` as safetensors writes them."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: digest} of every tensor that holds data (meta tensors of offloaded layers are skipped)."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"]
    with ThreadPoolExecutor(_workers()) as pool:
        digests = pool.map(lambda item: tensor_digest(item[1]), items)
        return {name: digest for (name, _), digest in zip(items, digests, strict=True)}


def checksum_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata entry recording the digests of `tensors`."""
    return {METADATA_KEY: json.dumps(tensor_digests(tensors), sort_keys=True, separators=(",", ":"))}


def recorded_digests(header: SafetensorsHeader) -> dict[str, str] | None:
    """The digests a file's metadata records, None when it records none (written before checksums existed, or
    by another tool)."""
    raw = header.metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        digests = json.loads(raw)
    except json.JSONDecodeError:
        digests = None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{header.path}: the metadata entry {METADATA_KEY!r} is damaged (not a JSON object).")
    return digests


def check_checksums(headers: Iterable[SafetensorsHeader]) -> tuple[int, list[str]]:
    """Check every recorded digest of these files against the bytes on disk (each file mapped once, read-only,
    its tensors hashed on several threads).

    Returns (tensors checked, names of tensors without a recorded digest); CheckpointError listing every tensor
    whose bytes differ from its digest, with its file.
    """
    checked, unverified, bad = 0, [], []
    with ThreadPoolExecutor(_workers()) as pool:
        for header in headers:
            digests = recorded_digests(header)
            names = [n for n in header.tensors if digests is not None and n in digests]
            unverified += [n for n in header.tensors if digests is None or n not in digests]
            if not names:
                continue
            with mapped_file(header.path) as data:
                entries = [header.tensors[n] for n in names]
                found = pool.map(lambda e: hashlib.sha256(data[e.begin : e.end]).hexdigest(), entries)
                bad += [f"{n} in {header.path.name}" for n, got in zip(names, found, strict=True) if got != digests[n]]
            checked += len(names)
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise CheckpointError(
            f"checksum mismatch: the bytes of {len(bad)} tensor(s) differ from the SHA-256 recorded when they were "
            f"saved ({shown}): the file was damaged after saving (disk, copy or download). Re-download or re-save it."
        )
    return checked, unverified

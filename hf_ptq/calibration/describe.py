"""A JSON-safe description of calibration data, so config.json says what was used without embedding it."""

from __future__ import annotations

import codecs
import hashlib
import os
from typing import Any

# Dataset names loaded through `datasets` (see `hf_ptq.calibration.data`).
DATASET_NAMES = ("wikitext2", "c4")
TEXT_CHECK_BYTES = 1 << 20  # how much of a calibration file is checked for text at construction


def not_text_error(path: str, detail: str) -> ValueError:
    """The error for a calibration file that is not UTF-8 text."""
    return ValueError(
        f"PtqConfig.dataset={path!r} is not a UTF-8 text file ({detail}): pass a plain text file (convert it, e.g. "
        "iconv -t UTF-8), a list of texts, or token ids."
    )


def check_text_file(path: str) -> None:
    """Refuse a file whose first `TEXT_CHECK_BYTES` are binary (a NUL byte) or not UTF-8; the rest is checked as it
    is read (`hf_ptq.calibration.data`), still before any weight is."""
    try:
        with open(path, "rb") as f:
            head = f.read(TEXT_CHECK_BYTES)
    except OSError as err:
        raise ValueError(f"PtqConfig.dataset={path!r}: the file cannot be read ({err.strerror or err}).") from err
    nul = head.find(b"\0")
    if nul >= 0:
        raise not_text_error(path, f"a NUL byte at offset {nul}: binary data")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < TEXT_CHECK_BYTES)
    except UnicodeDecodeError as err:
        raise not_text_error(path, f"invalid UTF-8 at byte {err.start}") from None


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def describe_dataset(dataset: Any) -> dict[str, Any]:
    """Source kind, size and a short content hash of `dataset`; raises ValueError for unsupported types."""
    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    if isinstance(dataset, str):
        if os.path.isfile(dataset):
            if os.path.getsize(dataset) == 0:
                raise ValueError(f"PtqConfig.dataset: the file {dataset!r} is empty.")
            check_text_file(dataset)
            return {"source": "file", "name": os.path.basename(dataset), "bytes": os.path.getsize(dataset)}
        if not dataset.strip():
            raise ValueError(
                "PtqConfig.dataset is an empty string: pass a dataset name, a file path or a list of texts."
            )
        if dataset not in DATASET_NAMES:
            raise ValueError(
                f"PtqConfig.dataset={dataset!r} is neither an existing text file nor a known dataset name; known "
                f"names: {', '.join(map(repr, DATASET_NAMES))} (or pass texts, token ids, a datasets.Dataset, or "
                "None to calibrate on text sampled from the model)."
            )
        return {"source": "name", "name": dataset}
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise ValueError("PtqConfig.dataset is an empty list: pass at least one text or token sequence.")
        if all(isinstance(t, str) for t in dataset):
            empty = [i for i, t in enumerate(dataset) if not t.strip()]
            if empty:
                raise ValueError(
                    f"PtqConfig.dataset[{empty[0]}] is an empty string ({len(empty)} of {len(dataset)} texts are "
                    "empty): drop them, e.g. [t for t in texts if t.strip()]."
                )
            return {"source": "texts", "count": len(dataset), "sha256": _digest([t.encode() for t in dataset])}
        if all(isinstance(t, (list, tuple)) and all(isinstance(i, int) for i in t) for t in dataset):
            if any(len(t) == 0 for t in dataset):
                raise ValueError("PtqConfig.dataset: a token id list is empty.")
            return {
                "source": "token_ids",
                "count": len(dataset),
                "sha256": _digest([repr(list(t)).encode() for t in dataset]),
            }
        raise ValueError("PtqConfig.dataset: a list must hold only strings or only lists of token ids.")
    try:
        import torch

        if isinstance(dataset, torch.Tensor):
            if dataset.dtype != torch.long or dataset.ndim != 2 or dataset.numel() == 0:
                raise ValueError("PtqConfig.dataset: a tensor must be a LongTensor of token ids shaped [n, seq].")
            return {"source": "tensor", "shape": list(dataset.shape), "sha256": _digest([dataset.numpy().tobytes()])}
    except ImportError:  # pragma: no cover
        pass
    if hasattr(dataset, "column_names") and hasattr(dataset, "num_rows"):
        if dataset.num_rows == 0:
            raise ValueError("PtqConfig.dataset: the datasets.Dataset has no rows.")
        return {
            "source": "datasets.Dataset",
            "rows": int(dataset.num_rows),
            "fingerprint": getattr(dataset, "_fingerprint", None),
        }
    raise ValueError(
        f"PtqConfig.dataset of type {type(dataset).__name__} is not supported: pass a list of strings, token ids "
        "(LongTensor [n, seq] or list of lists), a datasets.Dataset, a text file path or a dataset name."
    )

"""Calibration data → token batches: every `PtqConfig.dataset` form becomes a list of LongTensors [batch, seq].

Text (a list of strings, a `datasets.Dataset`, a text file, a dataset name) is joined (texts with a blank line
between them), tokenized without special tokens, and cut into `num_samples` consecutive chunks of `seq_len`
tokens from the start. Only as much text as needed is tokenized. Token ids (a LongTensor [n, seq] or lists of
ids) are used as given, the first `num_samples` of them. `dataset=None` (text sampled from the model) needs the
loaded model and lives in `self_generated.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .describe import DATASET_NAMES, not_text_error

logger = logging.getLogger("hf_ptq")

_MARGIN = 64  # tokens tokenized past what is kept, so that the cut of a text prefix never changes kept tokens
_FILE_CHUNK = 1 << 20
# name -> (load_dataset positional args, keyword args)
_NAMED: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}),
    "c4": (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}),
}
assert set(_NAMED) == set(DATASET_NAMES)


def is_pretokenized(dataset: Any) -> bool:
    """True for a LongTensor [n, seq] or a list of token id lists (no tokenizer needed)."""
    if isinstance(dataset, torch.Tensor):
        return True
    return isinstance(dataset, (list, tuple)) and bool(dataset) and not isinstance(dataset[0], str)


def resolve_tokenizer(tokenizer: Any, model_path: str | os.PathLike | None) -> Any:
    """`tokenizer` itself, loaded from its name / folder when a string, else the tokenizer of `model_path`."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = tokenizer or model_path
    if not source:
        raise ValueError(
            "PtqConfig.dataset holds text, which needs a tokenizer, and the model has no known repo to load it from: "
            "pass PtqConfig(tokenizer=...) (or quantize(..., tokenizer=...)) or pre-tokenized ids."
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001  (any loading failure gets the same advice)
        raise ValueError(
            f"PtqConfig.dataset holds text, which needs a tokenizer, and none could be loaded from {str(source)!r} "
            f"({type(err).__name__}: {err}). Pass PtqConfig(tokenizer=...) or pre-tokenized ids."
        ) from err


def load_named_dataset(name: str):
    """`wikitext2` / `c4` through `datasets.load_dataset` (network or the HF cache), with an actionable error."""
    advice = "pass a list of texts, a local text file, token ids, or dataset=None (text sampled from the model)"
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"PtqConfig.dataset={name!r} is loaded with the `datasets` package, which is not installed: "
            f"pip install datasets, or {advice}."
        ) from err
    args, kwargs = _NAMED[name]
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # noqa: BLE001  (offline, hub errors, missing files: one message)
        raise ValueError(
            f"PtqConfig.dataset={name!r}: `datasets` could not load it ({type(err).__name__}: {err}). "
            f"Offline? {advice.capitalize()}."
        ) from err


def _text_column(dataset: Any) -> str:
    if "text" in dataset.column_names:
        return "text"
    for name, feature in dataset.features.items():
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            return name
    raise ValueError(f"PtqConfig.dataset: the datasets.Dataset has no text column (columns: {dataset.column_names}).")


def _file_chunks(path: str) -> Iterator[str]:
    """The file's text in chunks; ValueError naming the file where it is not UTF-8 (past the part checked when the
    config was built)."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(_FILE_CHUNK):
                yield chunk
    except UnicodeDecodeError as err:
        raise not_text_error(path, f"invalid UTF-8 ({err.reason})") from None


def _text_pieces(dataset: Any) -> tuple[Iterable[str], str]:
    """(pieces of text, separator joining them) for every text form of `dataset`."""
    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    if isinstance(dataset, str):
        if os.path.isfile(dataset):
            return _file_chunks(dataset), ""
        dataset = load_named_dataset(dataset)
    if isinstance(dataset, (list, tuple)):
        return dataset, "\n\n"
    column = _text_column(dataset)
    return (row[column] for row in dataset), "\n\n"


def tokenize_prefix(pieces: Iterable[str], sep: str, tokenizer: Any, needed: int) -> list[int]:
    """Token ids of `sep.join(pieces)`, exact for at least the first `needed` ids, tokenizing no more than needed.

    Blank pieces are skipped when joining with a separator (dataset rows). A growing prefix is tokenized until
    it yields `needed` ids plus a margin, or the text runs out.
    """
    it = iter(pieces)
    parts: list[str] = []
    chars, target, exhausted = 0, max(needed * 8, 4096), False
    while True:
        while chars < target and not exhausted:
            piece = next(it, None)
            if piece is None:
                exhausted = True
            elif piece.strip() or not sep:
                parts.append(piece)
                chars += len(piece) + len(sep)
        ids = tokenizer(sep.join(parts), add_special_tokens=False, verbose=False)["input_ids"]
        if exhausted or len(ids) >= needed + _MARGIN:
            return list(ids) if exhausted else list(ids[:needed])
        target *= 2


def token_samples(dataset: Any, num_samples: int, seq_len: int, tokenizer: Any = None) -> list[torch.Tensor]:
    """Calibration samples, LongTensors [len] (`seq_len` for text, as given for token ids).

    Raises ValueError when there is less than one sample of text, warns when fewer than `num_samples` fit.
    """
    if isinstance(dataset, torch.Tensor):
        return list(dataset[:num_samples].long().cpu())
    if is_pretokenized(dataset):
        return [torch.tensor(list(ids), dtype=torch.long, device="cpu") for ids in dataset[:num_samples]]
    pieces, sep = _text_pieces(dataset)
    needed = num_samples * seq_len
    ids = tokenize_prefix(pieces, sep, tokenizer, needed)
    if len(ids) < seq_len:
        raise ValueError(
            f"PtqConfig.dataset: the calibration text is {len(ids)} tokens long, fewer than one sample of "
            f"seq_len={seq_len} tokens: pass more text or lower seq_len."
        )
    count = min(num_samples, len(ids) // seq_len)
    if count < num_samples:
        logger.warning(
            "hf_ptq: the calibration text holds %d tokens, enough for %d of num_samples=%d samples of %d tokens.",
            len(ids),
            count,
            num_samples,
            seq_len,
        )
    flat = torch.tensor(ids[: count * seq_len], dtype=torch.long, device="cpu")
    return list(flat.reshape(count, seq_len))


def make_batches(samples: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack samples into batches [≤ batch_size, len] of equal-length samples, keeping their order per length."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for sample in samples:
        by_length.setdefault(sample.numel(), []).append(sample.reshape(-1))
    return [
        torch.stack(group[i : i + batch_size]) for group in by_length.values() for i in range(0, len(group), batch_size)
    ]


def calibration_batches(config: Any, tokenizer: Any = None, model_path: str | None = None) -> list[torch.Tensor]:
    """Token batches for `config.dataset` (not None); the tokenizer is only loaded for text data."""
    dataset = config.dataset
    if not is_pretokenized(dataset):
        tokenizer = resolve_tokenizer(tokenizer if tokenizer is not None else config.tokenizer, model_path)
    samples = token_samples(dataset, config.num_samples, config.seq_len, tokenizer)
    return make_batches(samples, config.batch_size)

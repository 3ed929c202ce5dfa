"""The registry of export formats: `ExportFormat` and the `export_format` decorator each format module uses to fill
`FORMATS` (see `hf_ptq.formats.export`, which imports every format)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ExportFormat:
    """One export format: what it is, its keyword options, and how to check and write a model."""

    name: str
    summary: str  # one line: what it holds and who reads it
    check: Callable[..., None]  # check(model, tokenizer, **options): raise ValueError when it cannot be exported
    write: Callable[..., None]  # write(model, folder, tokenizer, **options) into an empty folder
    options: tuple[str, ...] = ()
    needs_tokenizer: bool = False
    w8a8: bool = False  # holds W8A8 layers (SmoothQuantConfig: int8 weights and int8 activations)


FORMATS: dict[str, ExportFormat] = {}


def export_format(
    name: str,
    summary: str,
    check: Callable[..., None],
    options: tuple[str, ...] = (),
    needs_tokenizer: bool = False,
    w8a8: bool = False,
):
    """Decorator: register `write(model, folder, tokenizer, **options)` as the writer of format `name`."""

    def wrap(write: Callable[..., None]) -> Callable[..., None]:
        FORMATS[name] = ExportFormat(name, summary, check, write, options, needs_tokenizer, w8a8)
        return write

    return wrap

"""`hf_ptq.export(model, out_dir, format=...)`: write a quantized model in a format other engines read.

Formats are registered in `FORMATS` (`export_formats`: a dict filled by the `export_format` decorator): each has a
`check`, which raises ValueError before anything is written when the model cannot be exported (naming what is
supported), and a `write` into an empty staging folder that is renamed into place only when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils import logging

from ..folders import check_output_folder, staged_folder
from . import compressed_tensors, gguf_file, gptq  # noqa: F401  (each registers its format)
from .export_formats import FORMATS, ExportFormat
from .layers import w8a8_layers, weight_only_methods

logger = logging.get_logger(__name__)


def format_names() -> list[str]:
    return sorted(FORMATS)


def format_spec(name: str) -> ExportFormat:
    """The registered format `name`; ValueError listing the formats otherwise."""
    if name not in FORMATS:
        listed = "; ".join(f"{n!r} ({FORMATS[n].summary})" for n in format_names())
        raise ValueError(f"export format={name!r} is unknown. Supported formats: {listed}.")
    return FORMATS[name]


def export(
    model: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str = "compressed-tensors",
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write `model` (quantized by hf_ptq, or the folder it was saved to) to `out_dir` in `format`.

    Formats: `"compressed-tensors"` (plain transformers and vLLM load it without hf_ptq; the only one that holds
    W8A8 models of `SmoothQuantConfig`), `"gptq"` (GPTQ v1
    checkpoint: gptqmodel, vLLM, transformers' GPTQ integration) and `"gguf"` (llama.cpp, transformers'
    `gguf_file=`; option `gguf_type="auto" | "q8_0" | "q4_0" | "q4_1"`). See docs/export.md.

    `tokenizer` (a tokenizer or its name / folder; default: the one saved with the model, when there is one) is
    written with the model; GGUF needs it. Unsupported combinations raise ValueError before anything is written;
    the output is staged and renamed into place when complete, so an error leaves `out_dir` as it was (replaced
    only with `overwrite=True`). Returns `out_dir` as a Path.
    """
    format_spec(format)  # an unknown format fails before a model is loaded
    target = check_output_folder(out_dir, overwrite, "out_dir")
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = _load(model, tokenizer)
    spec, tokenizer = check_export(model, format, tokenizer, **options)
    with staged_folder(target, overwrite, "out_dir") as staging:
        spec.write(model, staging, tokenizer, **options)
        if tokenizer is not None and not spec.needs_tokenizer:
            tokenizer.save_pretrained(staging)
    logger.info(f"Exported to {target} ({format}).")
    return target


def check_export(model: nn.Module, format: str, tokenizer: Any = None, **options: Any) -> tuple[ExportFormat, Any]:
    """Everything `export` checks before writing: the format, its options, the tokenizer (default: the one saved
    with the model) and whether the model can be written. Returns the format and the tokenizer to write."""
    spec = format_spec(format)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ValueError(f"export(format={format!r}) got unknown option(s) {unknown}; its options: {allowed}.")
    _refuse_w8a8(model, spec)
    if tokenizer is None:
        tokenizer = saved_tokenizer(getattr(model, "name_or_path", None))
    elif isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if spec.needs_tokenizer and tokenizer is None:
        raise ValueError(
            f"export(format={format!r}) writes the tokenizer into the file and found none saved with the model: "
            "pass tokenizer=AutoTokenizer.from_pretrained(...) (CLI: --tokenizer)."
        )
    spec.check(model, tokenizer, **options)
    return spec, tokenizer


def _refuse_w8a8(model: nn.Module, spec: ExportFormat) -> None:
    """ValueError naming the formats that hold W8A8 layers when `model` has some and `spec` does not hold them."""
    if spec.w8a8 or not w8a8_layers(model):
        return
    able = ", ".join(f"format={n!r}" for n in format_names() if FORMATS[n].w8a8)
    raise ValueError(
        f"export(format={spec.name!r}) writes weight-only quantized models (hf_ptq.PtqConfig: methods "
        f"{', '.join(weight_only_methods())}); this model has W8A8 layers (SmoothQuantConfig: int8 weights and int8 "
        f"activations), which {spec.name} cannot describe. Supported for W8A8: {able}."
    )


def _load(path: str | os.PathLike, tokenizer: Any) -> tuple[nn.Module, Any]:
    """Load a saved hf_ptq model folder (or Hub id) and, unless given, its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return model, tokenizer if tokenizer is not None else saved_tokenizer(path)


def saved_tokenizer(path: str | os.PathLike | None) -> Any:
    """The tokenizer saved in folder `path`, or None when there is none."""
    if not path or not (Path(path) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

"""`hf-ptq export DIR --format gguf|compressed-tensors|gptq [--out OUT]`: write a saved model in another format.

Loads the folder written by `hf-ptq quantize` (or `save_pretrained`) with hf_ptq, checks that the format can hold it
(before anything is written), and writes the export to a staging folder renamed into place when complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import choices
from .models import local_folder, resolve_model

NAME = "export"
HELP = "write a saved quantized model as compressed-tensors, GGUF or GPTQ (for vLLM, llama.cpp, ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="folder written by `hf-ptq quantize` or save_pretrained")
    parser.add_argument("--format", required=True, choices=choices.EXPORT_FORMATS, help="export format")
    parser.add_argument("--out", help="output folder (default: DIR-<format>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--gguf-type",
        default="auto",
        choices=choices.GGUF_TYPES,
        help="GGUF types: llama.cpp's preset (default auto: the exact fit)",
    )
    parser.add_argument(
        "--gguf-embeddings",
        default="preset",
        choices=choices.GGUF_EMBEDDINGS,
        help="GGUF token embedding and output: as the preset quantizes them (default) or f16",
    )
    parser.add_argument(
        "--checkpoint-format",
        default="gptq",
        choices=("gptq", "gptq_v2"),
        help="GPTQ layout: gptq (v1, every GPTQ loader; default) or gptq_v2 (gptqmodel's own loader)",
    )
    parser.add_argument("--tokenizer", metavar="NAME", help="tokenizer folder or Hub id (default: the one in DIR)")


def export_options(args: argparse.Namespace) -> dict:
    """The `export` keyword options of the chosen format from the flags."""
    if args.format == "gguf":
        return {"gguf_type": args.gguf_type, "embeddings": args.gguf_embeddings}
    return {"checkpoint_format": args.checkpoint_format} if args.format == "gptq" else {}


def saved_model_folder(text: str) -> Path:
    """`text` as a folder holding a saved model; ValueError naming it otherwise."""
    folder = local_folder(text)
    if not (folder / "config.json").exists():
        raise ValueError(f"{text} is not a saved model folder (no config.json)")
    return folder


def run(args: argparse.Namespace) -> int:
    from ..folders import check_output_folder

    saved_model_folder(args.model)
    out = check_output_folder(args.out or f"{str(args.model).rstrip('/')}-{args.format}", args.overwrite, "--out")
    tokenizer = None
    if args.tokenizer:
        name = resolve_model(args.tokenizer, "--tokenizer ")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    from ..formats.export import export

    folder = export(args.model, out, args.format, tokenizer=tokenizer, overwrite=args.overwrite, **export_options(args))
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    print(f"Exported {args.model} as {args.format} -> {folder} ({files})")
    return 0

"""`hf-ptq push DIR REPO [--metrics FILE.json] [--private] [--format F]`: upload a saved model (or its export in
format F) with hf_ptq's model card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import choices
from .export import export_options, saved_model_folder

NAME = "push"
HELP = "upload a saved quantized model to the Hub with a model card"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="folder written by `hf-ptq quantize` or save_pretrained")
    parser.add_argument("repo", metavar="REPO", help="Hub repo id, e.g. me/model-gptq-w4")
    parser.add_argument("--metrics", metavar="FILE", help="JSON of `hf-ptq eval --json`, or a {name: value} dict")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--commit-message", help="commit message (default: names the method)")
    parser.add_argument(
        "--format",
        choices=choices.EXPORT_FORMATS,
        help="upload this export instead of hf_ptq's checkpoint (see `export`)",
    )
    parser.add_argument(
        "--gguf-type", default="auto", choices=choices.GGUF_TYPES, help="with --format gguf: the block type"
    )
    parser.add_argument(
        "--gguf-embeddings", default="preset", choices=choices.GGUF_EMBEDDINGS, help="with --format gguf: preset or f16"
    )


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Model-card metrics from `hf-ptq eval --json` output or from a flat {name: value} JSON file."""
    from ..evaluation import EvalResult

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return EvalResult.from_dict(data).headline()
    if not isinstance(data, dict) or not all(isinstance(v, (str, int, float)) for v in data.values()):
        raise ValueError(f"--metrics {path}: expected `hf-ptq eval --json` output or a {{name: value}} object")
    return data


def push_folder(folder: str | Path, repo: str, metrics: dict[str, Any] | None = None, **kwargs: Any):
    """Load the saved model and tokenizer from `folder` and upload them with hf_ptq's model card."""
    from transformers import AutoModelForCausalLM

    from ..formats.export import saved_tokenizer
    from ..formats.hub import push_to_hub

    model = AutoModelForCausalLM.from_pretrained(folder)
    if getattr(model.config, "quantization_config", None) is None:
        raise ValueError(f"{folder} holds no quantized model (no quantization_config in config.json)")
    tokenizer = saved_tokenizer(folder)
    info = push_to_hub(model, repo, metrics=metrics, tokenizer=tokenizer, **kwargs)
    print(f"Pushed {folder} to https://huggingface.co/{repo}")
    return info


def run(args: argparse.Namespace) -> int:
    saved_model_folder(args.model)
    metrics = read_metrics(args.metrics) if args.metrics else None
    options = export_options(args) if args.format else {}
    push_folder(
        args.model,
        args.repo,
        metrics,
        private=args.private or None,
        commit_message=args.commit_message,
        format=args.format,
        **options,
    )
    return 0

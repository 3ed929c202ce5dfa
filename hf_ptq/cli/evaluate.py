"""`hf-ptq eval DIR [--reference MODEL] [--data FILE] [--json FILE]`: measure a saved (quantized) model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_eval_arguments, eval_options, thresholds
from .models import resolve_model

NAME = "eval"
HELP = "measure a saved model: perplexity, KL / top-1 vs a reference, speed, memory, size, checklist"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="model folder (or Hub id) to measure")
    add_eval_arguments(parser, with_reference=True)
    parser.add_argument("--json", metavar="FILE", help="also write every number to this JSON file")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a checklist item fails")


def run(args: argparse.Namespace) -> int:
    options = eval_options(args)
    limits = thresholds(args)
    model = resolve_model(args.model)
    reference = None if args.reference is None else resolve_model(args.reference, "--reference ")
    from ..evaluation import evaluate

    result = evaluate(model, reference=reference, **options)
    print(f"\nEvaluation: {result.data}; {result.windows} window(s), {result.tokens_scored} tokens scored.\n")
    print(result.to_markdown(limits))
    if args.reference is None:
        print("\nPass --reference MODEL (the unquantized model) for KL, top-1 agreement, the ratios and the checklist.")
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    failed = [c.name for c in result.checklist(limits) if c.passed is False]
    return 1 if args.strict and failed else 0

"""`hf-ptq compare [MODEL] --methods rtn,gptq,awq,int8 --out DIR`: one model, several methods, one report."""

from __future__ import annotations

import argparse

from .common import (
    EMBEDDED_NAME,
    add_config_arguments,
    add_eval_arguments,
    check_method,
    config_from_args,
    default_output,
    embedded_model,
    eval_options,
    thresholds,
)
from .models import resolve_model

NAME = "compare"
HELP = "quantize one model several ways; write report.md and comparison.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", default="rtn,int8", help="comma-separated methods (default rtn,int8)")
    add_config_arguments(parser)
    add_eval_arguments(parser)
    parser.add_argument(
        "--out", help="report folder (default: ~/.cache/hf_ptq/comparisons/<model>-<methods>, or under $HF_PTQ_CACHE)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    parser.add_argument("--no-plot", action="store_true", help="skip comparison.png")


def run(args: argparse.Namespace) -> int:
    methods = [check_method(m.strip()) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty: name at least one method, e.g. --methods rtn,int8")
    embedded = args.model is None
    configs = [config_from_args(m, args, embedded, lenient=True) for m in methods]  # all validated up front
    options = eval_options(args)
    out, overwrite = args.out, args.overwrite
    if out is None:  # hf_ptq's cache: what it holds there it may replace
        out, overwrite = default_output(args.model or EMBEDDED_NAME, "comparisons", "-".join(methods)), True
    from ..folders import check_output_folder

    check_output_folder(out, overwrite, "--out")
    model_id = embedded_model() if embedded else resolve_model(args.model)
    from ..evaluation import compare

    comparison = compare(
        configs,
        model_id,
        out_dir=out,
        overwrite=overwrite,
        thresholds=thresholds(args),
        plot=not args.no_plot,
        **options,
    )
    print(comparison.markdown)
    print(f"\nWrote {comparison.report_path}" + (f" and {comparison.plot_path}" if comparison.plot_path else ""))
    return 0

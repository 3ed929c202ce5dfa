"""`hf-ptq compare [MODEL] --methods rtn,gptq,awq,int8 --out DIR`: one model, several methods, one report."""

from __future__ import annotations

import argparse

from .common import (
    add_config_arguments,
    add_eval_arguments,
    check_method,
    config_from_args,
    embedded_model,
    eval_options,
    thresholds,
)

NAME = "compare"
HELP = "quantize one model several ways; write report.md and comparison.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", default="rtn,int8", help="comma-separated methods (default rtn,int8)")
    add_config_arguments(parser)
    add_eval_arguments(parser)
    parser.add_argument("--out", default="hf_ptq-comparison", help="report folder (default ./hf_ptq-comparison)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    parser.add_argument("--no-plot", action="store_true", help="skip comparison.png")


def run(args: argparse.Namespace) -> int:
    import hf_ptq
    from hf_ptq.folders import check_output_folder

    methods = [check_method(m.strip()) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty: name at least one method, e.g. --methods rtn,int8")
    embedded = args.model is None
    configs = [config_from_args(m, args, embedded, lenient=True) for m in methods]  # all validated up front
    options = eval_options(args)
    check_output_folder(args.out, args.overwrite, "--out")
    model_id = embedded_model() if embedded else args.model
    comparison = hf_ptq.compare(
        configs,
        model_id,
        out_dir=args.out,
        overwrite=args.overwrite,
        thresholds=thresholds(args),
        plot=not args.no_plot,
        **options,
    )
    print(comparison.markdown)
    print(f"\nWrote {comparison.report_path}" + (f" and {comparison.plot_path}" if comparison.plot_path else ""))
    return 0

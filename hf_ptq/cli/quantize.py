"""`hf-ptq quantize [MODEL] --method gptq --bits 4 --group-size 128 [--dataset ...] [--out DIR] [--push-to-hub REPO]`

Quantizes on load, saves the packed checkpoint and tokenizer (staged: an interrupted run leaves no folder), then
reloads it and prints its measurements and the checklist against the original model. Without --out the folder goes
to hf_ptq's cache (~/.cache/hf_ptq/quantized/, or $HF_PTQ_CACHE/quantized/) and is replaced by the next run of the
same command; the folder written is printed.

With no MODEL: the embedded SmolLM2-135M-Instruct, offline, and its measured best default, GPTQ w4 g64 calibrated
on 32 x 256 tokens of text sampled from the model itself, with int8 embeddings (docs/cli.md, "The embedded
default"); any flag given replaces the default of the same field. --method auto chooses from --prefer / --deploy /
--finetune and --dataset; --method smoothquant is W8A8 (--alpha, --activations, --weight-method).
"""

from __future__ import annotations

import argparse
import gc
import time

from . import choices
from .common import (
    EMBEDDED_NAME,
    add_config_arguments,
    add_eval_arguments,
    add_method_arguments,
    config_from_args,
    default_output,
    embedded_model,
    eval_options,
)
from .common import thresholds as checklist_thresholds
from .models import resolve_model

NAME = "quantize"
HELP = "quantize a model, save it, and check it against the original"
DEFAULT_METHOD = "rtn"
# The embedded model's default (measured: docs/cli.md, "The embedded default"); used when no MODEL and no --method.
EMBEDDED_DEFAULTS = {"method": "gptq", "num_samples": 32, "seq_len": 256, "embeddings": "int8"}


def embedded_flags() -> str:
    """The embedded default as command-line flags, e.g. `--method gptq --num-samples 32`."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in EMBEDDED_DEFAULTS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--method",
        choices=choices.QUANTIZE_METHODS,
        help=f"quantization method (default {DEFAULT_METHOD}; without MODEL and --method, the embedded model's "
        f"measured default: {embedded_flags()}, each flag given replacing its own); auto: chosen from --prefer / "
        "--deploy / --finetune / --dataset; smoothquant: W8A8",
    )
    add_config_arguments(parser)
    add_method_arguments(parser)
    parser.add_argument(
        "--out", help="output folder (default: ~/.cache/hf_ptq/quantized/<model>-<config>, or under $HF_PTQ_CACHE)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo, with a model card")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    parser.add_argument("--no-eval", action="store_true", help="skip the measurements and the checklist")
    add_eval_arguments(parser)


def _with_embedded_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the embedded model's measured default for every field the command line left unset (only when
    neither MODEL nor --method is given)."""
    if args.model is not None or args.method is not None:
        return args
    given = vars(args)
    return argparse.Namespace(**{**given, **{k: v for k, v in EMBEDDED_DEFAULTS.items() if given.get(k) is None}})


def run(args: argparse.Namespace) -> int:
    embedded = args.model is None
    args = _with_embedded_defaults(args)
    cfg = config_from_args(args.method or DEFAULT_METHOD, args, embedded)  # every field validated before any work
    options = eval_options(args)
    limits = checklist_thresholds(args)
    out, overwrite = args.out, args.overwrite
    if out is None:  # hf_ptq's cache: what it holds there it may replace
        out, overwrite = default_output(args.model or EMBEDDED_NAME, "quantized", cfg.describe()), True
    from ..folders import check_output_folder, staged_folder

    out = check_output_folder(out, overwrite, "--out")
    model_id = embedded_model() if embedded else resolve_model(args.model)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluation import evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    print(f"Quantizing {args.model or model_id} with {cfg.describe()}...")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=cfg, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    report = getattr(model.config.quantization_config, "_mixed_report", None) or getattr(cfg, "_mixed_report", None)
    if report:  # target_bits chose each layer's scheme
        from ..core.bit_budget import format_report

        print(format_report(report))
    with staged_folder(out, overwrite, "--out") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    del model
    gc.collect()
    print(f"Quantized in {seconds:.1f} s -> {out}")

    result = None
    if not args.no_eval:
        print(f"Measuring {out} against {args.model or model_id}...")
        result = evaluate(str(out), tokenizer, reference=model_id, **options)
        result.model.quantize_seconds = seconds
        print(f"\nEvaluation: {result.data}; {result.windows} window(s), {result.tokens_scored} tokens scored.\n")
        print(result.to_markdown(limits))
    if args.push_to_hub:
        from .push import push_folder

        push_folder(out, args.push_to_hub, metrics=result.headline() if result else None, private=args.private)
    print(f"\nSaved to {out}")
    return 0
